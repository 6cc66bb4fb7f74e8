"""Language-model evaluation: loss, perplexity and bits-per-byte on a token array."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lathe.train.batches import sequential_windows


@torch.no_grad()
def evaluate_lm(model, tokens: np.ndarray, token_bytes: np.ndarray, max_tokens: int) -> dict:
    """Score up to `max_tokens` next-token predictions over non-overlapping context windows.

    bits-per-byte divides the total log-loss (in bits) by the UTF-8 bytes the targets stand for,
    so models with different tokenizers compare fairly."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    byte_table = torch.from_numpy(np.asarray(token_bytes, dtype=np.int64))
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for x, y in sequential_windows(tokens, model.cfg.block_size, max_tokens):
        logits, _ = model(x.to(device))
        nats = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1).to(device), reduction="sum")
        total_nats += nats.item()
        total_tokens += y.numel()
        total_bytes += int(byte_table[y].sum())
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError("no tokens to evaluate")
    loss = total_nats / total_tokens
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": total_nats / math.log(2) / max(1, total_bytes),
        "tokens": total_tokens,
    }
