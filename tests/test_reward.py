"""Reward model: Bradley-Terry on pairs whose rule is learnable (the chosen reply has more vowels)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lathe.align.pairs import score_batch, split_holdout, tokenize_pair
from lathe.align.reward import (RewardModel, bradley_terry_loss, load_reward_model, pairwise_metrics,
                                reward_from_model, train_reward_model)
from lathe.cli import main
from lathe.config import ModelConfig, TokenizerConfig, TrainConfig
from lathe.model import GPT
from lathe.tokenizer import train_tokenizer
from lathe.train.checkpoint import save_checkpoint

VOWELS, CONSONANTS = "aeiou", "bcdfghjklmnpqrstvwxz"


def word(rng, letters: str, n: int) -> str:
    return "".join(rng.choice(list(letters), n))


def vowel_rows(n: int, seed: int) -> list[dict]:
    """Two random 6-letter replies per prompt; the one with more vowels is chosen (ties skipped)."""
    rng, rows = np.random.default_rng(seed), []
    while len(rows) < n:
        a, b = word(rng, VOWELS + CONSONANTS, 6), word(rng, VOWELS + CONSONANTS, 6)
        va, vb = (sum(c in VOWELS for c in w) for w in (a, b))
        if va != vb:
            chosen, rejected = (a, b) if va > vb else (b, a)
            rows.append({"prompt": f"say {word(rng, VOWELS + CONSONANTS, 3)}:", "chosen": " " + chosen,
                         "rejected": " " + rejected})
    return rows


@pytest.fixture(scope="module")
def vowel_task():
    rows = vowel_rows(600, seed=0)
    tok = train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], TokenizerConfig(vocab_size=300))
    torch.manual_seed(0)
    base = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=64, block_size=32))
    return rows, tok, base


def test_reward_reads_the_last_token_and_the_loss_is_bradley_terry(vowel_task):
    _, tok, base = vowel_task
    model = RewardModel.from_base(base).eval()
    assert torch.equal(model.embed.weight, base.embed.weight) and model.reward_head.weight.abs().max() < 0.2
    x = torch.randint(13, tok.vocab_size, (4, 10))
    last = torch.tensor([9, 5, 9, 5])
    r = model(x, last)
    y = x.clone()
    y[1, 6:] = 13  # tokens after row 1's last one do not count
    assert torch.allclose(model(y, last), r, atol=1e-6)
    assert torch.allclose(bradley_terry_loss(model, (x, last)), -F.logsigmoid(r[:2] - r[2:]).mean(), atol=1e-6)
    assert score_batch([([1, 2], [3]), ([4], [5, 6, 7])], pad_id=2)[1].tolist() == [2, 3]


def test_reward_model_learns_the_rule_on_held_out_pairs(vowel_task, tmp_path):
    rows, tok, base = vowel_task
    pairs = [tokenize_pair(tok, r, base.cfg.block_size) for r in rows]
    train_pairs, val_pairs = split_holdout(pairs, 1 / 6, seed=0)
    cfg = TrainConfig(max_steps=80, batch_size=16, lr=1e-3, warmup_steps=10, weight_decay=0.0, eval_every=40,
                      log_every=20, checkpoint_every=40, device="cpu")
    model, summary = train_reward_model(base, tok, train_pairs, val_pairs, cfg, tmp_path)
    assert summary["before"]["accuracy"] < 0.75  # the untrained head is near chance ...
    assert summary["after"]["accuracy"] > 0.9, summary  # ... the trained one learned the rule
    assert summary["after"]["pairs"] == 100 and summary["after"]["loss"] < summary["before"]["loss"]

    loaded = load_reward_model(tmp_path)  # the head is saved and loaded with the transformer
    assert abs(pairwise_metrics(loaded, val_pairs, tok.pad_id)["margin"] - summary["after"]["margin"]) < 1e-4
    score = reward_from_model(loaded, tok)
    fresh = vowel_rows(40, seed=99)  # never seen: the score ranks them like the rule
    assert np.mean([score(r["prompt"], r["chosen"]) > score(r["prompt"], r["rejected"]) for r in fresh]) > 0.85


def test_reward_cli_trains_and_names_bad_rows(vowel_task, tmp_path, capsys):
    rows, tok, base = vowel_task
    run = tmp_path / "base"
    tok.save(run / "tokenizer.json")
    save_checkpoint(run / "checkpoints", 0, base, None, {})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:60]))
    out = tmp_path / "rm"
    assert main(["align", "reward", "--base", str(run), "--data", str(data), "--out", str(out), "--steps", "4",
                 "--device", "cpu", "--set", "train.eval_every=2"]) == 0
    report = json.loads((out / "reward_report.json").read_text())
    assert report["steps"] == 4 and report["after"]["pairs"] == 6 and (out / "reward_report.md").exists()
    assert load_reward_model(out).reward_head.weight.shape == (1, 64)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "a"}) + "\n")
    assert main(["align", "reward", "--base", str(run), "--data", str(bad), "--out", str(out)]) == 2
    assert f"{bad}:2: missing field(s) rejected" in capsys.readouterr().err
