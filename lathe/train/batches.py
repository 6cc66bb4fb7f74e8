"""Batches from a flat token array. Batch `i` depends only on (seed, i): resumable with no state."""

from __future__ import annotations

import numpy as np
import torch


def in_reading_order(tokens: np.ndarray, cfg) -> np.ndarray:
    """The token stream as the model reads it: a backward model reads it back to front (a view, no copy),
    so each document comes reversed and followed, not preceded, by its <|bos|>."""
    return tokens[::-1] if cfg.direction == "backward" else tokens


def random_windows(tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
    """get_batch(i) -> (x, y): `batch_size` random windows of `block_size` tokens, y shifted by one."""
    n_starts = len(tokens) - block_size - 1
    if n_starts < 1:
        raise ValueError(f"only {len(tokens)} tokens: need more than block_size + 1 = {block_size + 1}")

    def get_batch(i: int):
        starts = np.random.default_rng([seed, i]).integers(0, n_starts, size=batch_size)
        window = np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)
        window = torch.from_numpy(window)
        return window[:, :-1], window[:, 1:]

    return get_batch


def sequential_windows(tokens: np.ndarray, block_size: int, max_tokens: int):
    """Non-overlapping (x, y) windows from the start of `tokens`, covering at most max_tokens targets."""
    n = min(len(tokens) - 1, max_tokens)
    for start in range(0, n, block_size):
        length = min(block_size, n - start)
        chunk = torch.from_numpy(np.ascontiguousarray(tokens[start : start + length + 1], dtype=np.int64))
        yield chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0)
