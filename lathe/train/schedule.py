"""Learning-rate schedules: linear warmup, then cosine or warmup-stable-decay (WSD) or constant."""

from __future__ import annotations

import math

from lathe.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))
    # WSD: hold the peak, then decay linearly over the last `wsd_decay_fraction` of training
    decay_steps = max(1, int(cfg.wsd_decay_fraction * cfg.max_steps))
    decay_start = cfg.max_steps - decay_steps
    if step < decay_start:
        return cfg.lr
    return cfg.lr + (min_lr - cfg.lr) * min(1.0, (step - decay_start) / decay_steps)
