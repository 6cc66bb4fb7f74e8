"""The training loop, shared by pretraining and every fine-tuning stage.

Written by hand because it is the project's own craft: exact resume and DDP equivalence depend on
how batches are indexed. Micro-batch `i` of the whole run is a pure function of `i`
(`get_batch(i)`), with i = step * (world * accum) + rank * accum + micro. So a resumed run sees the
same batches as an uninterrupted one, and 2 processes x 1 micro-batch see exactly the batches of
1 process x 2 micro-batches.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from lathe.config import TrainConfig
from lathe.console import info, progress_bar
from lathe.io import append_jsonl, read_jsonl, write_text
from lathe.train.checkpoint import latest_checkpoint, restore, save_checkpoint
from lathe.train.dist import Dist, all_reduce_mean, any_rank, autocast_context, setup_distributed
from lathe.train.schedule import lr_at

Batch = tuple  # tensors; the loss function knows their meaning
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


def lm_loss(model, batch: Batch) -> torch.Tensor:
    """Next-token loss; an optional third tensor masks which targets count (SFT)."""
    x, y, *rest = batch
    _, loss = model(x, targets=y, loss_mask=rest[0] if rest else None)
    return loss


@dataclass
class TrainResult:
    step: int
    stopped: str  # "max_steps" | "early_stop" | "time_budget"
    best_val: float | None
    last_eval: dict = field(default_factory=dict)
    tokens_per_s: float = 0.0
    params: int = 0


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                   lr_scale: Callable[[str], float] | None = None):
    """AdamW over trainable parameters; matrices decay, vectors (norms, biases) do not. Fused on GPU.

    lr_scale(parameter name) -> a multiplier of the scheduled learning rate (discriminative
    fine-tuning: a pretrained body learns slower than a fresh head); groups record it as "lr_scale"."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.dim() >= 2, lr_scale(name) if lr_scale else 1.0), []).append(p)
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
                    for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled learning rate times each group's lr_scale (1 in checkpoints older than it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def micro_index(step: int, micro: int, d: Dist, cfg: TrainConfig) -> int:
    return step * (d.world_size * cfg.grad_accum) + d.rank * cfg.grad_accum + micro


def truncate_metrics(path: Path, step: int) -> None:
    """After a resume, rows logged past the checkpoint would be logged again: drop them."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def train(
    model: torch.nn.Module,
    cfg: TrainConfig,
    get_batch: Callable[[int], Batch],
    evaluate: Callable[[torch.nn.Module], dict] | None,
    out_dir: Path,
    resume: bool = False,
    loss_fn: LossFn = lm_loss,
    stage: str = "pretrain",
    extra_state: dict | None = None,
    lr_scale: Callable[[str], float] | None = None,
) -> TrainResult:
    """Train `model` in place. Writes out_dir/checkpoints/ and out_dir/metrics.jsonl.

    `evaluate(model)` returns metrics including "val_loss" (used for early stopping). `lr_scale`: see
    make_optimizer."""
    d = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    ckpt_root, metrics_path = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(d.device)
    optimizer = make_optimizer(model, cfg, d.device, lr_scale)
    state = {"tokens_seen": 0, "best_val": None, "best_checkpoint": None, "bad_evals": 0, "elapsed_s": 0.0}
    start_step = 0
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    if ckpt is not None:
        start_step = restore(ckpt, model, optimizer, state)
        if d.is_main:
            truncate_metrics(metrics_path, start_step)
            info(f"resuming {stage} from {ckpt} (step {start_step})")
    elif d.is_main and metrics_path.exists() and not resume:
        metrics_path.unlink()  # a fresh run starts a fresh curve

    train_model = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None) if d.enabled else model
    if cfg.compile:
        train_model = torch.compile(train_model)
    autocast = autocast_context(d.device, cfg.dtype)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.dtype == "float16")
    params = sum(p.numel() for p in model.parameters())

    def run_eval(step: int) -> dict:
        model.eval()
        with torch.no_grad(), autocast:
            metrics = evaluate(model) if evaluate else {}
        model.train()
        if d.is_main:
            append_jsonl(metrics_path, {"step": step, "kind": "eval", **metrics})
        return metrics

    saved_at = {start_step}

    def checkpoint(step: int) -> None:
        if d.is_main and step not in saved_at:
            saved_at.add(step)
            save_checkpoint(ckpt_root, step, model, optimizer, {**state, **(extra_state or {})}, keep=cfg.keep_checkpoints)

    model.train()
    step, stopped, last_eval = start_step, "max_steps", {}
    window_tokens, window_start = 0, time.perf_counter()
    run_start = time.perf_counter() - state["elapsed_s"]
    tok_per_s = 0.0
    with progress_bar() as bar:
        task = bar.add_task(stage, total=cfg.max_steps, completed=start_step, status="", visible=d.is_main)
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            set_lr(optimizer, lr)
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                batch = tuple(t.to(d.device, non_blocking=True) for t in get_batch(micro_index(step, micro, d, cfg)))
                sync = not d.enabled or micro == cfg.grad_accum - 1
                with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast:
                    loss = loss_fn(train_model, batch) / cfg.grad_accum
                scaler.scale(loss).backward()
                loss_sum += loss.item()
                window_tokens += batch[0].numel() * d.world_size
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")).item()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["tokens_seen"] += cfg.batch_size * cfg.grad_accum * d.world_size * batch[0].size(-1)
            state["elapsed_s"] = time.perf_counter() - run_start

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                loss_avg = all_reduce_mean(loss_sum, d)
                tok_per_s = window_tokens / max(1e-9, time.perf_counter() - window_start)
                window_tokens, window_start = 0, time.perf_counter()
                if d.is_main:
                    append_jsonl(metrics_path, {"step": step, "kind": "train", "loss": loss_avg, "lr": lr,
                                                "grad_norm": grad_norm, "tokens_per_s": tok_per_s,
                                                "tokens_seen": state["tokens_seen"], "elapsed_s": state["elapsed_s"]})
                bar.update(task, completed=step, status=f"loss {loss_avg:.3f}  {tok_per_s:,.0f} tok/s")
            else:
                bar.update(task, completed=step)

            out_of_time = any_rank(cfg.max_time_s is not None and state["elapsed_s"] > cfg.max_time_s, d)
            final = step == cfg.max_steps or out_of_time
            if evaluate and (step % cfg.eval_every == 0 or final):
                last_eval = run_eval(step)
                val = last_eval.get("val_loss")
                if val is not None and (state["best_val"] is None or val < state["best_val"]):
                    state.update(best_val=val, best_checkpoint=f"step-{step:06d}", bad_evals=0)
                    checkpoint(step)
                else:
                    state["bad_evals"] += 1
                if cfg.early_stop_patience and state["bad_evals"] >= cfg.early_stop_patience:
                    stopped = "early_stop"
            if out_of_time and stopped == "max_steps":
                stopped = "time_budget"
            if step % cfg.checkpoint_every == 0 or final or stopped != "max_steps":
                checkpoint(step)
            if stopped != "max_steps":
                break
    return TrainResult(step, stopped, state["best_val"], last_eval, tok_per_s, params)
