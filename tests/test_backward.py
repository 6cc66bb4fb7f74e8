"""Backward models (model.direction = "backward"): ULMFiT's second reader of the same text. It pretrains
on the token stream back to front, its classifiers read their texts reversed, and it refuses to generate."""

import json
import random

import numpy as np
import pytest
import torch

from lathe.config import ModelConfig, TokenizerConfig, load_recipe
from lathe.errors import LatheError
from lathe.eval.loglik import score_continuations
from lathe.eval.perplexity import evaluate_lm
from lathe.finetune.classify import (Classifier, EncodedSplit, load_classifier, predict_proba, run_classify,
                                     score_ensemble, split_labeled)
from lathe.generate import generate
from lathe.interop.hf import export_hf
from lathe.io import read_jsonl
from lathe.model import GPT
from lathe.pipeline import stage_eval, stage_generate, stage_pretrain
from lathe.rundir import RunDir
from lathe.serve.engine import Engine
from lathe.tokenizer import encode_shards, load_tokens, train_tokenizer
from lathe.train.batches import in_reading_order, random_windows, sequential_windows
from lathe.train.checkpoint import load_model, save_checkpoint

BACKWARD = ModelConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=32, direction="backward")


def test_reading_order_reverses_each_document_and_windows_read_the_reversed_view():
    stream = np.array([0, 5, 6, 7, 0, 8, 9], dtype=np.uint16)  # <|bos|> = 0 before each document
    back = in_reading_order(stream, BACKWARD)
    assert back.tolist() == [9, 8, 0, 7, 6, 5, 0]  # each document reversed, its <|bos|> after it
    assert in_reading_order(stream, ModelConfig()) is stream
    x, y = random_windows(back, 3, 4, seed=0)(0)
    rows = {tuple(back[s : s + 3].tolist()) for s in range(len(back) - 3)}
    assert all(tuple(row) in rows for row in x.tolist()) and torch.equal(x[:, 1:], y[:, :-1])
    chunks = list(sequential_windows(back, 3, 6))
    assert torch.cat([c[0] for c in chunks], dim=1)[0].tolist() == back[:6].tolist()


def pair_text(rng: random.Random) -> str:
    """Pairs "x f(x)" with f many-to-one: read backward, a space is followed by one of 3 letters,
    read forward by any of 26, so a model trained on one order is far worse on the other."""
    return " ".join(f"{c}{'aei'[ord(c) % 3]}" for c in rng.choices("bcdfghjklmnpqrstvwxyz", k=40))


def test_backward_pretraining_learns_the_reversed_stream(tmp_path):
    run, rng = RunDir(tmp_path / "run"), random.Random(0)
    run.data.mkdir(parents=True)
    for split, n in (("train", 300), ("val", 20), ("test", 20)):
        run.split_file(split).write_text("".join(json.dumps({"text": pair_text(rng)}) + "\n" for _ in range(n)))
    tok = train_tokenizer([pair_text(rng) for _ in range(50)], TokenizerConfig(vocab_size=269))
    tok.save(run.tokenizer)
    encode_shards(run, tok)
    recipe = load_recipe("default", {"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "model.block_size": 32,
                                     "model.direction": "backward", "train.max_steps": 150, "train.batch_size": 16,
                                     "train.eval_every": 150, "train.checkpoint_every": 150, "train.device": "cpu",
                                     "train.lr": 1e-2, "train.warmup_steps": 10,
                                     "train.max_time_s": None, "eval.max_tokens": 2000})
    stage_pretrain(run, recipe)
    model, bytes_ = load_model(run.path), tok.token_bytes()
    assert model.cfg.direction == "backward"
    val = load_tokens(run, "val")
    backward_loss = evaluate_lm(model, val[::-1], bytes_, 2000)["loss"]
    assert backward_loss < evaluate_lm(model, val, bytes_, 2000)["loss"] - 0.3
    assert stage_eval(run, recipe)["test_loss"] == pytest.approx(
        evaluate_lm(model, load_tokens(run, "test")[::-1], bytes_, 2000)["loss"])
    assert stage_generate(run, recipe) == []  # `lathe run` ends with samples: skipped, not an error


def labelled(n: int) -> list[dict]:
    rng = random.Random(1)
    return [{"text": f"{rng.choice(['great', 'awful'])} film {' '.join(rng.choices('abcde', k=4))} {i}",
             "label": "x"} for i in range(n)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A forward and a backward random-init base sharing one tokenizer."""
    root = tmp_path_factory.mktemp("bases")
    rows = labelled(200)
    tok = train_tokenizer([r["text"] for r in rows], TokenizerConfig(vocab_size=300, min_frequency=1))
    paths = {}
    for direction in ("forward", "backward"):
        paths[direction] = root / direction
        paths[direction].mkdir()
        tok.save(paths[direction] / "tokenizer.json")
        torch.manual_seed(0)
        cfg = BACKWARD.model_copy(update={"vocab_size": tok.vocab_size, "direction": direction})
        save_checkpoint(paths[direction] / "checkpoints", 0, GPT(cfg), None, {})
    return paths, tok


def test_a_backward_classifier_reads_reversed_and_ensembles_with_a_forward_one(tmp_path, bases):
    paths, tok = bases
    rows = [{**r, "label": r["text"].split()[0]} for r in labelled(200)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = EncodedSplit(tok, [("great film", "great")], ["awful", "great"], 32, "backward")
    assert split.ids[0].tolist() == [tok.bos_id, *tok.encode("great film")[::-1]]

    train = ["train.max_steps=10", "train.eval_every=10", "train.checkpoint_every=10", "train.batch_size=8",
             "train.device=cpu"]
    runs = {d: tmp_path / d for d in paths}
    for direction, out in runs.items():
        run_classify(paths[direction], [str(data)], out=out, overrides=train, baseline=False, select="accuracy")
    members = {d: load_classifier(run) for d, run in runs.items()}
    assert members["backward"].cfg.direction == "backward"

    raw = split_labeled([(r["text"], r["label"]) for r in read_jsonl(data)])
    probs = [predict_proba(m, EncodedSplit(tok, raw["test"], m.labels, 32, d))[0] for d, m in members.items()]
    truth = EncodedSplit(tok, raw["test"], members["forward"].labels, 32).labels
    summary = score_ensemble(list(runs.values()), [str(data)], baseline=False)
    assert summary["lathe"]["accuracy"] == pytest.approx(float(np.mean(np.mean(probs, 0).argmax(-1) == truth)))
    with pytest.raises(LatheError, match="same model config"):  # no weight average across directions
        score_ensemble(list(runs.values()), [str(data)], method="soup", baseline=False)
    with pytest.raises(LatheError, match="forward model"):
        Classifier(GPT(members["backward"].cfg), ["a", "b"], "channel", prefixes=[[5], [6]])


def test_a_backward_model_does_not_generate_score_continuations_or_export(tmp_path, bases):
    paths, tok = bases
    model = load_model(paths["backward"])
    with pytest.raises(LatheError, match="does not generate"):
        generate(model, tok, "great", max_tokens=3)
    with pytest.raises(LatheError, match="does not generate"):
        Engine(model, tok)
    with pytest.raises(LatheError, match="score continuations"):  # the pairs are in text order
        score_continuations(model, [([tok.bos_id], tok.encode("great"))])
    with pytest.raises(LatheError, match="model.direction"):
        export_hf(model, tok, tmp_path / "hf")
