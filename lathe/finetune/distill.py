"""Distillation: train a smaller student from a teacher run, and the same student from scratch to compare.

    summary = run_distill(teacher="runs/base", out="runs/base-student", overrides=["model.n_layer=2"])

Two ways, chosen by the tokenizers:
- same tokenizer (identical tokenizer.json): the student matches the teacher's token distributions
  on the training tokens. loss = kl_weight * T^2 * KL(teacher_T || student_T) + (1 - kl_weight) * CE,
  where _T is the softmax at temperature T; T^2 keeps the gradient scale independent of T (Hinton
  et al. 2015). The teacher runs under no_grad inside the loss, batch by batch.
- different tokenizers: distributions over different vocabularies cannot be compared, so the teacher
  *writes* the training data instead: documents sampled at temperature 1 (its own distribution),
  re-encoded with the student's tokenizer, saved to <out>/teacher_text.jsonl (reused on --resume).

Either way the student is compared with the same student (same config, initial weights, batches and
steps) trained from scratch with plain cross-entropy on the real training tokens, in <out>/scratch/;
both validation losses go in <out>/distill_report.{md,json}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from lathe.config import ModelConfig, TrainConfig, format_validation_error, load_recipe
from lathe.console import info, warn
from lathe.errors import LatheError
from lathe.eval.perplexity import evaluate_lm
from lathe.finetune.sft import markdown_table, output_dir, prepare_output, stage_options, write_stage_report
from lathe.generate import generate
from lathe.io import read_jsonl, write_text
from lathe.model import GPT
from lathe.rundir import RunDir
from lathe.train.batches import in_reading_order, random_windows
from lathe.train.checkpoint import load_model
from lathe.train.loop import LossFn, lm_loss, train

DISTILL_DEFAULTS = {"max_steps": 300, "lr": 3e-3, "warmup_steps": 20, "eval_every": 100, "checkpoint_every": 100,
                    "log_every": 10}


def student_config(teacher_cfg: ModelConfig, model_overrides: dict, vocab_size: int | None = None) -> ModelConfig:
    """The teacher's config with half its layers (unless overridden) and the `--set model.*` overrides.

    `vocab_size` is the student tokenizer's, when it differs from the teacher's (teacher-text mode)."""
    if "vocab_size" in model_overrides:
        raise LatheError("model.vocab_size: the student's vocabulary is its tokenizer's")
    values = {**teacher_cfg.model_dump(), "n_layer": max(1, teacher_cfg.n_layer // 2), **model_overrides}
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    try:
        cfg = ModelConfig.model_validate(values)
    except ValidationError as e:
        raise LatheError(format_validation_error(e, "student model (--set model.*)")) from None
    if vocab_size is None and cfg.block_size > teacher_cfg.block_size:
        raise LatheError(f"model.block_size {cfg.block_size}: the teacher only reads {teacher_cfg.block_size} tokens")
    return cfg


def kd_loss(teacher: GPT, temperature: float = 1.0, kl_weight: float = 0.9) -> LossFn:
    """A loss_fn for the training loop: KL to the teacher's distributions mixed with cross-entropy."""
    if temperature <= 0 or not 0 <= kl_weight <= 1:
        raise LatheError(f"distillation needs temperature > 0 and 0 <= kl_weight <= 1 "
                         f"(got {temperature}, {kl_weight})")
    teacher.eval().requires_grad_(False)

    def loss_fn(model, batch) -> torch.Tensor:
        x, y = batch[:2]
        if teacher.lm_head.weight.device != x.device:
            teacher.to(x.device)  # the loop moves the batch and the student; the teacher follows once
        logits, _ = model(x)
        with torch.no_grad():
            teacher_logits, _ = teacher(x)
        s = logits.float().flatten(0, 1)
        t = teacher_logits.float().flatten(0, 1)
        kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                      reduction="batchmean") * temperature**2
        if kl_weight == 1:
            return kl
        return kl_weight * kl + (1 - kl_weight) * F.cross_entropy(s, y.reshape(-1))

    return loss_fn


def train_student(cfg: ModelConfig, train_cfg: TrainConfig, train_tokens: np.ndarray, val_tokens: np.ndarray,
                  token_bytes: np.ndarray, out: Path, loss_fn: LossFn = lm_loss, resume: bool = False,
                  stage: str = "distill"):
    """A fresh student (weights seeded by train_cfg.seed) trained on random windows of train_tokens."""
    torch.manual_seed(train_cfg.seed)
    student = GPT(cfg)
    get_batch = random_windows(train_tokens, cfg.block_size, train_cfg.batch_size, train_cfg.seed)

    def evaluate(m) -> dict:
        return {f"val_{k}": v for k, v in evaluate_lm(m, val_tokens, token_bytes, train_cfg.eval_tokens).items()}

    result = train(student, train_cfg, get_batch, evaluate, out, resume=resume, loss_fn=loss_fn, stage=stage)
    return student, result


def distill_and_compare(teacher: GPT, student_cfg: ModelConfig, train_cfg: TrainConfig, train_tokens: np.ndarray,
                        val_tokens: np.ndarray, token_bytes: np.ndarray, out: Path, temperature: float = 1.0,
                        kl_weight: float = 0.9, student_tokens: np.ndarray | None = None, baseline: bool = True,
                        resume: bool = False) -> dict:
    """The KL student on `train_tokens` (or a CE student on `student_tokens`, teacher-written text),
    then the scratch student on `train_tokens`. Returns both results' numbers."""
    if student_tokens is None:
        loss_fn, data = kd_loss(teacher, temperature, kl_weight), train_tokens
    else:
        loss_fn, data = lm_loss, student_tokens
    student, result = train_student(student_cfg, train_cfg, data, val_tokens, token_bytes, out, loss_fn, resume)
    summary = {"student_params": student.num_params(), "teacher_params": teacher.num_params(),
               "distilled": _numbers(result)}
    if baseline:
        _, scratch = train_student(student_cfg, train_cfg, train_tokens, val_tokens, token_bytes, out / "scratch",
                                   lm_loss, resume, stage="scratch")
        summary["scratch"] = _numbers(scratch)
    return summary


def _numbers(result) -> dict:
    return {"steps": result.step, "stopped": result.stopped, "best_val_loss": result.best_val,
            "final_val_loss": result.last_eval.get("val_loss"), "final_val_bpb": result.last_eval.get("val_bpb")}


# --- teacher-written data (different tokenizers) ----------------------------------------------
def teacher_texts(teacher: GPT, teacher_tok, n_chars: int, seed: int, batch: int = 32) -> list[str]:
    """Documents sampled from the teacher at temperature 1 until about n_chars characters exist."""
    texts, total, round_ = [], 0, 0
    while total < n_chars:
        # an empty prompt starts at <|bos|>: whole documents, ended by the teacher's next <|bos|>
        new = generate(teacher, teacher_tok, "", max_tokens=teacher.cfg.block_size - 1, num_samples=batch,
                       temperature=1.0, seed=seed * 100_003 + round_)
        new = [t for t in new if t.strip()]
        texts += new
        total += sum(len(t) for t in new)
        round_ += 1
        if round_ > 10 and not texts:
            raise LatheError("the teacher generates only empty documents: is it trained?")
    return texts


def teacher_text_tokens(out: Path, teacher: GPT, teacher_tok, student_tok, n_chars: int, seed: int,
                        resume: bool) -> np.ndarray:
    """Teacher-written documents encoded as the student's token stream (<|bos|> before each)."""
    path = out / "teacher_text.jsonl"
    if resume and path.exists():
        texts = [r["text"] for r in read_jsonl(path)]
    else:
        info(f"distill: the tokenizers differ; the teacher writes ~{n_chars:,} characters of training text")
        texts = teacher_texts(teacher, teacher_tok, n_chars, seed)
        write_text(path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    ids = []
    for encoded in student_tok.encode_batch(texts):
        ids += [student_tok.bos_id, *encoded]
    return np.asarray(ids, dtype=np.int64)


# --- the stage --------------------------------------------------------------------------------
def run_distill(teacher: str | Path, out: str | Path | None = None, name: str | None = None,
                data: str | Path | None = None, overrides: Iterable[str] = (), temperature: float = 1.0,
                kl_weight: float = 0.9, text_chars: int = 400_000, baseline: bool = True,
                resume: bool = False) -> dict:
    """`lathe distill`: a student from a teacher run. `data` is a run whose tokenizer and token shards
    the student uses (default: the teacher run); a different tokenizer means teacher-written text."""
    from lathe.tokenizer import Tokenizer, load_tokens

    teacher_run = RunDir.resolve(teacher)
    data_run = RunDir.resolve(data) if data is not None else teacher_run
    out = output_dir(out, name, f"{teacher_run.path.name}-student")
    teacher_tok_file = teacher_run.require(teacher_run.tokenizer, "tokenizer")
    student_tok_file = data_run.require(data_run.tokenizer, "tokenizer")
    same_tokenizer = teacher_tok_file.read_bytes() == student_tok_file.read_bytes()
    student_tok = Tokenizer.from_file(student_tok_file)

    teacher_model = load_model(teacher_run.path)
    defaults = dict(DISTILL_DEFAULTS)
    if data_run.recipe.exists():  # the data run's batch shape and eval budget suit its data
        t = load_recipe(data_run.recipe).train
        defaults.update(batch_size=t.batch_size, eval_tokens=t.eval_tokens)
    train_cfg, model_overrides = stage_options(data_run, defaults, overrides)
    cfg = student_config(teacher_model.cfg, model_overrides, None if same_tokenizer else student_tok.vocab_size)
    if cfg.n_layer * cfg.n_embd**2 >= teacher_model.cfg.n_layer * teacher_model.cfg.n_embd**2:
        warn("the student is not smaller than the teacher (set model.n_layer / model.n_embd)")
    prepare_output(out, student_tok_file)

    train_tokens, val_tokens = (in_reading_order(load_tokens(data_run, s), cfg) for s in ("train", "val"))
    student_tokens = None
    if not same_tokenizer:
        teacher_tok = Tokenizer.from_file(teacher_tok_file)
        student_tokens = teacher_text_tokens(out, teacher_model, teacher_tok, student_tok, text_chars,
                                             train_cfg.seed, resume)
    mode = "kl" if same_tokenizer else "teacher_text"
    info(f"distill: mode {mode}, teacher {teacher_model.cfg.n_layer}x{teacher_model.cfg.n_embd} -> "
         f"student {cfg.n_layer}x{cfg.n_embd} (layers x width)")
    summary = distill_and_compare(teacher_model, cfg, train_cfg, train_tokens, val_tokens, student_tok.token_bytes(),
                                  out, temperature, kl_weight, student_tokens, baseline, resume)
    summary.update(mode=mode, teacher=str(teacher_run.path), data=str(data_run.path), temperature=temperature,
                   kl_weight=kl_weight if same_tokenizer else None, student_model=cfg.model_dump())
    _distill_report(out, summary)
    return summary


def _distill_report(out: Path, s: dict) -> None:
    runs = [("distilled student", s["distilled"])] + ([("same student from scratch", s["scratch"])]
                                                     if "scratch" in s else [])
    table = markdown_table(["student", "steps", "best val loss", "final val loss", "final val bits/byte"],
                           [[n, r["steps"], r["best_val_loss"], r["final_val_loss"], r["final_val_bpb"]]
                            for n, r in runs])
    how = (f"KL to the teacher's distributions (T={s['temperature']}, kl_weight={s['kl_weight']})" if s["mode"] == "kl"
           else "cross-entropy on teacher-written text (tokenizers differ)")
    sections = [f"Teacher `{s['teacher']}` ({s['teacher_params']:,} parameters) -> student of "
                f"{s['student_params']:,} parameters, trained with {how}. Validation: the val split of `{s['data']}`.",
                "", "## Validation loss (nats/token)", "", *table]
    write_stage_report(out, "distill", "Distillation", s, sections)
    line = f"distill: student val loss {s['distilled']['final_val_loss']:.4f}"
    if "scratch" in s:
        line += f" vs {s['scratch']['final_val_loss']:.4f} from scratch"
    info(line)
