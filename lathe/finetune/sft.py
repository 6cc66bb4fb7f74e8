"""Instruction SFT: chat or prompt/response jsonl -> lathe's chat template -> packed rows -> the training loop.

    result = run_sft(base="runs/base", data=["chat.jsonl"], out="runs/base-sft")

Data rows (one JSON object per line), all rendered with `lathe.chat.render_chat`:
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
    {"prompt": ..., "response": ...[, "system": ...]}
    {"question": ..., "answer": ...}                  GSM8K: question -> user, answer -> assistant

Only assistant tokens are trained (the chat template's loss mask). Short examples are packed into
rows of block_size + 1 tokens; each example starts with its own <|bos|>, which separates it from the
one before. Attention is *not* reset at example boundaries inside a row: a later example can attend
to an earlier one, as documents do in pretraining rows, where the model learned that <|bos|> starts
something new. Resetting would need a block-diagonal mask per row; at this scale the cheaper packing
is the better trade (the loss on the earlier example is unaffected: attention is causal). Examples
longer than a row are cut (counted as "truncated"); an example left with no assistant token is
dropped (counted).

This module also holds the pieces every fine-tuning stage shares (classify.py and distill.py import
them): the output run directory, the training options and the stage report.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from lathe.chat import render_chat, validate_messages
from lathe.config import ModelConfig, TrainConfig, format_validation_error, load_recipe, parse_override
from lathe.console import info
from lathe.errors import LatheError
from lathe.eval.metrics import is_well_formed_gsm8k
from lathe.generate import stream_ids
from lathe.io import iter_jsonl_objects, read_jsonl, write_json, write_text
from lathe.model import GPT
from lathe.report import plot_loss
from lathe.rundir import RUNS_ROOT, RunDir
from lathe.train.checkpoint import load_state, load_weights, resolve_checkpoint, save_checkpoint
from lathe.train.loop import train

# =============================================================================================
# Shared by the fine-tuning stages
# =============================================================================================
# Settings the base run's recipe passes on to fine-tuning; the rest (lr, steps, ...) are per stage.
INHERITED_TRAIN_FIELDS = ("device", "dtype", "compile", "seed")


def output_dir(out: str | Path | None, name: str | None, default_name: str) -> Path:
    """--out DIR wins; else runs/<--name>; else runs/<default_name>."""
    if out is not None:
        return Path(out)
    return RUNS_ROOT / (name or default_name)


def prepare_output(out: Path, tokenizer_file: Path) -> None:
    """The output is a run directory of its own: it carries the tokenizer its checkpoints use."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer.json").exists() or (out / "tokenizer.json").read_bytes() != tokenizer_file.read_bytes():
        shutil.copyfile(tokenizer_file, out / "tokenizer.json")


def stage_options(base: RunDir | None, defaults: dict, overrides: Iterable[str] = ()) -> tuple[TrainConfig, dict]:
    """TrainConfig for a fine-tuning stage and the `model.*` overrides.

    Precedence: `--set train.x=v` overrides > the stage's defaults > device/dtype/compile/seed of the base
    run's recipe > TrainConfig defaults."""
    train = {}
    if base is not None and base.recipe.exists():
        inherited = load_recipe(base.recipe).train
        train = {k: getattr(inherited, k) for k in INHERITED_TRAIN_FIELDS}
    train.update(defaults)
    model: dict = {}
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) != 2 or keys[0] not in ("train", "model"):
            raise LatheError(f"--set {text}: fine-tuning accepts train.FIELD=VALUE or model.FIELD=VALUE")
        (train if keys[0] == "train" else model)[keys[1]] = value
    try:
        return TrainConfig(**train), model
    except ValidationError as e:
        raise LatheError(format_validation_error(e, "fine-tuning options")) from None


def load_base_model(path: str | Path, model_overrides: dict | None = None) -> GPT:
    """The base checkpoint's GPT. Fine-tuning keeps its shape; only `model.dropout` may be overridden
    (dropout modules are built in __init__, so the model is rebuilt with the new config)."""
    other = sorted(set(model_overrides or {}) - {"dropout"})
    if other:
        raise LatheError(f"model.{other[0]}: fine-tuning keeps the base model's shape; only model.dropout can be set")
    ckpt = resolve_checkpoint(path)
    try:
        cfg = ModelConfig.model_validate({**load_state(ckpt)["model"], **(model_overrides or {})})
    except ValidationError as e:
        raise LatheError(format_validation_error(e, "--set model.*")) from None
    model = GPT(cfg)
    load_weights(model, ckpt)
    return model


def write_stage_report(out: Path, stage: str, title: str, summary: dict, sections: list[str]) -> Path:
    """<out>/<stage>_report.json (numbers), <out>/<stage>_report.md (readable) and loss.png."""
    write_json(out / f"{stage}_report.json", summary)
    plot = plot_loss(read_jsonl(out / "metrics.jsonl"), out / "loss.png")
    lines = [f"# {title}: `{out.name}`", "", *sections]
    if plot:
        lines += ["", "## Loss curve", "", f"![loss curve]({plot.name})"]
    path = out / f"{stage}_report.md"
    write_text(path, "\n".join(lines) + "\n")
    info(f"report: {path}")
    return path


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]]


def hash_unit(text: str) -> float:
    """A stable number in [0, 1) from the text: the split coordinate (the data stage's rule, without
    importing the data pipeline)."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def apply_lora_if(model: GPT, lora: bool, rank: int = 8) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters on the attention projections (base frozen) when asked."""
    if not lora:
        return model
    try:  # lazily: peft is an optional dependency
        from lathe.finetune.lora import LoraConfig, apply_lora
    except ImportError as e:
        raise LatheError(f"--lora needs lathe.finetune.lora and peft ({e})") from None
    return apply_lora(model, LoraConfig(rank=rank, alpha=2 * rank))


def save_lora_outputs(peft_model, out: Path) -> GPT:
    """After LoRA training: the adapter alone in <out>/adapter; returns the GPT with it merged in.
    (The loop's checkpoints hold the peft-wrapped model, which is what --resume needs.)"""
    from lathe.finetune.lora import merge_adapter, save_adapter

    save_adapter(peft_model, out / "adapter")
    return merge_adapter(peft_model)


# =============================================================================================
# SFT data
# =============================================================================================
Conversation = list[dict]


def row_to_messages(row, where: str) -> Conversation:
    """One jsonl row -> chat messages (see the module docstring for the accepted shapes)."""
    if not isinstance(row, dict):
        raise LatheError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = validate_messages(row["messages"], f"{where}: messages")
    elif "prompt" in row and "response" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        if "system" in row:
            messages.insert(0, {"role": "system", "content": row["system"]})
    elif "question" in row and "answer" in row:  # GSM8K
        messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
    else:
        raise LatheError(f"{where}: expected 'messages', 'prompt'+'response' or 'question'+'answer' "
                         f"(got fields {sorted(row)})")
    for i, m in enumerate(messages):
        if not isinstance(m.get("content", ""), str):
            raise LatheError(f"{where}: message {i} content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise LatheError(f"{where}: no assistant message to learn from")
    return messages


def read_conversations(path: str | Path) -> list[Conversation]:
    """All examples of a jsonl file; a malformed line is a LatheError naming file:line."""
    path = Path(path)
    conversations = [row_to_messages(row, where) for where, row in iter_jsonl_objects(path, "SFT data file")]
    if not conversations:
        raise LatheError(f"{path}: no examples")
    return conversations


def split_conversations(conversations: list[Conversation], val_fraction: float) -> tuple[list, list]:
    """Deterministic train/val split by a hash of each example's content."""
    train, val = [], []
    for c in conversations:
        (val if hash_unit(json.dumps(c, sort_keys=True)) < val_fraction else train).append(c)
    if not val and len(train) > 1:  # always validate on something
        val.append(train.pop())
    return train, val


def prompt_messages(conversation: Conversation) -> Conversation:
    """The conversation up to (not including) its last assistant message: what a model is asked."""
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return conversation[:last]


def reference_answer(conversation: Conversation) -> str:
    return [m for m in conversation if m["role"] == "assistant"][-1].get("content", "")


# =============================================================================================
# Rendering and packing
# =============================================================================================
def encode_conversations(tok, conversations: list[Conversation], max_len: int) -> tuple[list, dict]:
    """(ids, loss_mask) per example, cut to max_len tokens; stats on what was cut or dropped."""
    examples, truncated, dropped = [], 0, 0
    for c in conversations:
        ids, mask = render_chat(tok, c)
        if len(ids) > max_len:
            truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask[1:]):  # the first token is never a target
            dropped += 1
            continue
        examples.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
    stats = {"examples": len(conversations), "kept": len(examples), "truncated": truncated, "dropped": dropped}
    return examples, stats


def pack_examples(examples: list, row_len: int, pad_id: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pack (ids, mask) examples into rows of `row_len` tokens (next-fit, in a seeded shuffled order).

    Returns rows (N, row_len) int64 and masks (N, row_len) bool; unused tail slots hold pad with mask
    False. Every example lands whole in exactly one row (examples are at most row_len long)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    rows, masks, row, mask = [], [], [], []
    for k in order:
        ids, m = examples[k]
        if len(ids) > row_len:
            raise ValueError(f"example of {len(ids)} tokens does not fit a row of {row_len}")
        if len(row) + len(ids) > row_len:
            rows.append(row), masks.append(mask)
            row, mask = [], []
        row, mask = row + ids.tolist(), mask + m.tolist()
    if row:
        rows.append(row), masks.append(mask)
    out_rows = np.full((len(rows), row_len), pad_id, dtype=np.int64)
    out_masks = np.zeros((len(rows), row_len), dtype=bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        out_rows[i, : len(r)], out_masks[i, : len(m)] = r, m
    return out_rows, out_masks


def row_batches(rows: np.ndarray, masks: np.ndarray, batch_size: int, seed: int) -> Callable:
    """get_batch(i) -> (x, y, loss_mask): random packed rows; a pure function of (seed, i)."""
    rows_t, masks_t = torch.from_numpy(rows), torch.from_numpy(masks)

    def get_batch(i: int):
        pick = torch.from_numpy(np.random.default_rng([seed, i]).integers(0, len(rows), size=batch_size))
        r, m = rows_t[pick], masks_t[pick]
        return r[:, :-1], r[:, 1:], m[:, 1:]  # a target counts when it is an assistant token

    return get_batch


@torch.no_grad()
def masked_loss(model, rows: np.ndarray, masks: np.ndarray, max_tokens: int, batch_size: int = 16) -> float:
    """Mean cross-entropy over the assistant tokens of `rows` (up to about max_tokens of them)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        r = torch.from_numpy(rows[start : start + batch_size]).to(device)
        m = torch.from_numpy(masks[start : start + batch_size, 1:]).to(device)
        logits, _ = model(r[:, :-1])
        nll = F.cross_entropy(logits.float().transpose(1, 2), r[:, 1:], reduction="none")
        total += float(nll[m].sum())
        count += int(m.sum())
        if count >= max_tokens:
            break
    return total / max(1, count)


# =============================================================================================
# Answers and the format check
# =============================================================================================
@torch.no_grad()
def answer(model, tok, messages: Conversation, max_tokens: int = 256) -> str:
    """The model's greedy reply to `messages` (rendered with the generation prompt)."""
    ids, _ = render_chat(tok, messages, add_generation_prompt=True)
    stop = {tok.special_id("<|assistant_end|>"), tok.eos_id, tok.bos_id}
    out = []
    for step in stream_ids(model, ids, max_tokens, temperature=0.0, stop_ids=stop):
        if step[0] is None or step[0] in stop:
            break
        out.append(step[0])
    return tok.decode(out, skip_special_tokens=True)


def format_share(model, tok, conversations: list[Conversation], check: Callable[[str], bool] = is_well_formed_gsm8k,
                 max_tokens: int = 256) -> dict:
    """Share of greedy answers that pass `check` (default: GSM8K's '#### <number>')."""
    answers = [answer(model, tok, prompt_messages(c), max_tokens) for c in conversations]
    ok = sum(bool(check(a)) for a in answers)
    return {"n": len(answers), "well_formed": ok, "share": ok / max(1, len(answers)), "examples": answers[:3]}


# =============================================================================================
# The stage
# =============================================================================================
SFT_DEFAULTS = {"max_steps": 300, "lr": 1e-3, "warmup_steps": 20, "eval_every": 50, "checkpoint_every": 50,
                "eval_tokens": 16384, "batch_size": 8, "log_every": 10}


def sft_train(model, tok, train_conv: list, val_conv: list, cfg: TrainConfig, out: Path, resume: bool = False,
              n_samples: int = 2, sample_tokens: int = 128) -> tuple:
    """Pack, train with the shared loop (loss on assistant tokens), evaluate val loss + sample answers."""
    row_len = model.cfg.block_size + 1
    train_ex, train_stats = encode_conversations(tok, train_conv, row_len)
    val_ex, val_stats = encode_conversations(tok, val_conv, row_len)
    if not train_ex:
        raise LatheError("no SFT training examples left after rendering (every one was empty)")
    rows, masks = pack_examples(train_ex, row_len, tok.pad_id, cfg.seed)
    val_rows, val_masks = pack_examples(val_ex, row_len, tok.pad_id, cfg.seed) if val_ex else (rows[:0], masks[:0])
    packing = {"rows": len(rows), "fill": float((rows != tok.pad_id).mean()) if len(rows) else 0.0}
    info(f"sft: {train_stats['kept']} train examples in {len(rows)} rows of {row_len} tokens "
         f"({packing['fill']:.0%} full), {train_stats['truncated']} truncated, {train_stats['dropped']} dropped; "
         f"{len(val_ex)} val examples")
    probes = val_conv[:n_samples]

    def evaluate(m) -> dict:
        metrics = {"val_loss": masked_loss(m, val_rows, val_masks, cfg.eval_tokens)} if len(val_rows) else {}
        metrics["samples"] = [{"prompt": prompt_messages(c)[-1]["content"],
                               "answer": answer(m, tok, prompt_messages(c), sample_tokens)} for c in probes]
        return metrics

    result = train(model, cfg, row_batches(rows, masks, cfg.batch_size, cfg.seed), evaluate, out,
                   resume=resume, stage="sft")
    return result, {"train": train_stats, "val": val_stats, "packing": packing}


def run_sft(base: str | Path, data: list[str | Path], out: str | Path | None = None, name: str | None = None,
            overrides: Iterable[str] = (), val_fraction: float = 0.05, test: str | Path | None = None,
            format_eval: int = 0, max_answer_tokens: int = 256, resume: bool = False, lora: bool = False,
            lora_rank: int = 8) -> dict:
    """`lathe finetune sft`: SFT a base run's model on chat jsonl files; writes <out>/sft_report.{md,json}.

    With `test` and format_eval > 0, the share of well-formed GSM8K answers ('#### <number>') on the
    first `format_eval` test examples is measured before and after SFT."""
    from lathe.tokenizer import Tokenizer

    base_run = RunDir.resolve(base)
    out = output_dir(out, name, f"{base_run.path.name}-sft")
    tok = Tokenizer.from_file(base_run.require(base_run.tokenizer, "tokenizer"))
    cfg, model_overrides = stage_options(base_run, SFT_DEFAULTS, overrides)
    conversations = [c for path in data for c in read_conversations(path)]
    train_conv, val_conv = split_conversations(conversations, val_fraction)
    test_conv = read_conversations(test)[:format_eval] if test and format_eval else []
    prepare_output(out, base_run.tokenizer)

    model = load_base_model(base_run.path, model_overrides)
    before = _format_before(out, model, tok, test_conv, max_answer_tokens, resume)
    model = apply_lora_if(model, lora, lora_rank)
    result, data_stats = sft_train(model, tok, train_conv, val_conv, cfg, out, resume)
    if lora:  # <out>/merged: a plain checkpoint that load_model, generate and serve read
        model = save_lora_outputs(model, out)
        save_checkpoint(out / "merged", result.step, model, None, {})
    after = format_share(model, tok, test_conv, max_tokens=max_answer_tokens) if test_conv else None
    summary = {"base": str(base_run.path), "data": [str(p) for p in data], "steps": result.step,
               "stopped": result.stopped, "best_val_loss": result.best_val,
               "final_val_loss": result.last_eval.get("val_loss"), "samples": result.last_eval.get("samples", []),
               "data_stats": data_stats, "format_before": before, "format_after": after, "lora": lora}
    _sft_report(out, summary)
    return summary


def _format_before(out: Path, model, tok, test_conv, max_tokens: int, resume: bool) -> dict | None:
    """The base model's share, measured once (a resumed run reuses the saved number)."""
    if not test_conv:
        return None
    saved = out / "format_before.json"
    if resume and saved.exists():
        return json.loads(saved.read_text())
    share = format_share(model, tok, test_conv, max_tokens=max_tokens)
    write_json(saved, share)
    return share


def _sft_report(out: Path, s: dict) -> None:
    stats = s["data_stats"]
    rows = [["steps", f"{s['steps']} ({s['stopped']})"],
            ["best validation loss (assistant tokens)", s["best_val_loss"]],
            ["final validation loss", s["final_val_loss"]],
            ["train examples kept / truncated / dropped",
             f"{stats['train']['kept']} / {stats['train']['truncated']} / {stats['train']['dropped']}"],
            ["packed rows (fill)", f"{stats['packing']['rows']} ({stats['packing']['fill']:.0%})"]]
    if s["format_before"]:
        b, a = s["format_before"], s["format_after"]
        rows += [["well-formed answers before SFT", f"{b['well_formed']}/{b['n']} ({b['share']:.1%})"],
                 ["well-formed answers after SFT", f"{a['well_formed']}/{a['n']} ({a['share']:.1%})"]]
        info(f"sft: well-formed answers {b['share']:.1%} before -> {a['share']:.1%} after ({a['n']} test questions)")
    sections = ["## Summary", "", *markdown_table(["metric", "value"], rows), "", "## Sample answers", ""]
    for sample in s["samples"]:
        sections += [f"**prompt:** {sample['prompt'][:300]}", "", "```", sample["answer"], "```", ""]
    write_stage_report(out, "sft", "Instruction SFT", s, sections)

