import json

import numpy as np
import pytest
import torch

from lathe.config import ModelConfig, TokenizerConfig, TrainConfig
from lathe.errors import LatheError
from lathe.finetune.distill import distill_and_compare, kd_loss, run_distill, student_config
from lathe.model import GPT
from lathe.tokenizer import Tokenizer, train_tokenizer
from lathe.train.batches import random_windows
from lathe.train.checkpoint import load_model, save_checkpoint
from lathe.train.loop import train

VOCAB = 32


def markov_tokens(n: int, seed: int) -> np.ndarray:
    """A random bigram language with real uncertainty: soft teacher targets carry more than samples."""
    transitions = np.random.default_rng(0).dirichlet(np.full(VOCAB, 0.3), size=VOCAB).cumsum(1)
    u = np.random.default_rng(seed).random(n)
    out, state = np.zeros(n, dtype=np.int64), 0
    for i in range(n):
        state = min(int(np.searchsorted(transitions[state], u[i])), VOCAB - 1)
        out[i] = state
    return out


def quick(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 16, "lr": 1e-2, "warmup_steps": 3, "eval_every": 1000, "checkpoint_every": 1000,
                          "log_every": 1000, "device": "cpu", "eval_tokens": 4000, **kw})


def test_distilled_student_beats_the_same_student_from_scratch(tmp_path):
    train_tokens, val_tokens = markov_tokens(20_000, 1), markov_tokens(4_000, 2)
    torch.manual_seed(0)
    teacher = GPT(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=32, block_size=32))
    train(teacher, quick(max_steps=120), random_windows(train_tokens, 32, 16, 0), None, tmp_path / "teacher")
    student = ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=32)
    summary = distill_and_compare(teacher, student, quick(max_steps=30, batch_size=4), train_tokens, val_tokens,
                                  np.ones(VOCAB), tmp_path / "student")
    assert summary["student_params"] < summary["teacher_params"]
    distilled, scratch = summary["distilled"]["final_val_loss"], summary["scratch"]["final_val_loss"]
    assert distilled < scratch - 0.05, (distilled, scratch)
    assert (tmp_path / "student" / "checkpoints" / "latest").exists()
    assert (tmp_path / "student" / "scratch" / "metrics.jsonl").exists()


def test_kd_loss_is_pure_cross_entropy_weight_when_student_equals_teacher():
    torch.manual_seed(0)
    teacher = GPT(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=16))
    x = torch.randint(0, VOCAB, (2, 16))
    y = torch.randint(0, VOCAB, (2, 16))
    _, ce = teacher(x, targets=y)
    # same weights: KL is 0 at any temperature, only the cross-entropy share remains
    for temperature in (1.0, 2.0):
        assert kd_loss(teacher, temperature, 0.75)(teacher, (x, y)).item() == pytest.approx(0.25 * ce.item(), rel=1e-5)
    # a different student: T^2 * KL(teacher_T || student_T), by hand
    student = GPT(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=16))
    with torch.no_grad():
        student.embed.weight.mul_(30)  # confident, so the distributions differ clearly
        p = (teacher(x)[0] / 2).softmax(-1)
        q = (student(x)[0] / 2).softmax(-1)
    expected = 4 * (p * (p.log() - q.log())).sum(-1).mean().item()
    assert expected > 0.05
    assert kd_loss(teacher, 2.0, 1.0)(student, (x, y)).item() == pytest.approx(expected, rel=1e-4)
    with pytest.raises(LatheError):
        kd_loss(teacher, 0.0, 0.5)


def test_student_config_is_checked():
    teacher = ModelConfig(vocab_size=100, n_layer=4, n_head=4, n_embd=64, block_size=64)
    assert student_config(teacher, {}).n_layer == 2
    assert student_config(teacher, {"n_embd": 32, "n_head": 2}).n_embd == 32
    with pytest.raises(LatheError, match="block_size"):
        student_config(teacher, {"block_size": 128})
    with pytest.raises(LatheError, match="n_embd"):
        student_config(teacher, {"n_embd": 30})
    with pytest.raises(LatheError, match="vocab_size"):
        student_config(teacher, {"vocab_size": 50})


def make_run(path, texts, split_digits, n_embd):
    """A run directory with a tokenizer, a random-init checkpoint and token shards."""
    path.mkdir(parents=True)
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=320, min_frequency=1, split_digits=split_digits))
    tok.save(path / "tokenizer.json")
    save_checkpoint(path / "checkpoints", 0, GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2,
                                                              n_embd=n_embd, block_size=32)), None, {})
    (path / "tokens").mkdir()
    ids = np.concatenate([[tok.bos_id, *tok.encode(t)] for t in texts]).astype(np.uint16)
    ids.tofile(path / "tokens" / "train.bin")
    ids[:400].tofile(path / "tokens" / "val.bin")
    (path / "tokens" / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": tok.vocab_size, "bos_id": 0,
        "splits": {"train": {"tokens": len(ids)}, "val": {"tokens": 400}}}))
    return path


def test_different_tokenizers_distill_through_teacher_text(tmp_path):
    texts = [f"the {w} sat on the mat number {i}." for i, w in enumerate(["cat", "dog", "fox", "owl"] * 30)]
    teacher = make_run(tmp_path / "teacher", texts, True, 32)
    student_data = make_run(tmp_path / "student-data", texts, False, 16)  # a different tokenizer
    out = tmp_path / "student"
    summary = run_distill(teacher, out=out, data=student_data, text_chars=1500, baseline=False,
                          overrides=["train.max_steps=4", "train.batch_size=4", "train.device=cpu", "model.n_embd=16"])
    assert summary["mode"] == "teacher_text" and summary["kl_weight"] is None
    written = [json.loads(line)["text"] for line in (out / "teacher_text.jsonl").read_text().splitlines()]
    assert sum(map(len, written)) >= 1500
    assert load_model(out).cfg.vocab_size == Tokenizer.from_file(student_data / "tokenizer.json").vocab_size
    assert (out / "tokenizer.json").read_bytes() == (student_data / "tokenizer.json").read_bytes()
    assert "teacher-written text" in (out / "distill_report.md").read_text()
