"""Batched completion for many short prompts at once: the loop's proposals and its greedy scoring.

`lathe.generate.stream_ids` decodes one prompt at a time; the loop scores hundreds of held-out
prompts and samples thousands of candidates per round, so here whole batches decode together:
prompts are left-padded into one prefill (pad keys masked, positions per row), each prompt's cache
rows are repeated for its k samples, and every step feeds one token per row.
"""

from __future__ import annotations

import torch

from lathe.generate import require_forward, sample_next
from lathe.model import GPT


@torch.no_grad()
def complete(model: GPT, prompts: list[list[int]], max_new: int, k: int = 1, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, stop_ids=frozenset(), pad_id: int = 0,
             banned_ids=frozenset(), chunk: int = 256) -> list[list[list[int]]]:
    """k completions of each prompt (token ids, the stop token left out): result[prompt][sample].

    Temperature 0 is greedy. The same seed gives the same samples. `banned_ids` are never produced
    (control tokens have no place inside an answer)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    out = []
    for start in range(0, len(prompts), chunk):
        out += _complete_chunk(model, prompts[start : start + chunk], max_new, k, temperature, top_k, generator,
                               stop_ids, pad_id, banned_ids)
    model.train(was_training)
    return out


def _complete_chunk(model, prompts, max_new, k, temperature, top_k, generator, stop_ids, pad_id, banned_ids):
    require_forward(model)
    device = model.lm_head.weight.device
    longest = max(len(p) for p in prompts)
    max_new = min(max_new, model.cfg.block_size - longest)
    if max_new < 1:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in block_size {model.cfg.block_size}")
    idx = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    positions = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, longest - len(p):] = torch.tensor(p)
        positions[row, longest - len(p):] = torch.arange(len(p))
    cache = model.make_cache(len(prompts), longest + max_new)
    cache.key_mask = torch.ones(len(prompts), cache.max_len, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        cache.key_mask[row, : longest - len(p)] = False
    h = model.hidden_states(idx.to(device), cache, positions.to(device))
    logits = model.lm_head(h[:, -1]).repeat_interleave(k, dim=0)
    cache.repeat_rows(k)  # k samples share each prompt's prefill
    next_pos = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(k)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    tokens, done = [], torch.zeros(len(next_pos), dtype=torch.bool, device=device)
    banned = torch.tensor(sorted(banned_ids), dtype=torch.long, device=device)
    for _ in range(max_new):
        logits = logits.index_fill(-1, banned, float("-inf")) if len(banned) else logits
        nxt = sample_next(logits, temperature, top_k, None, generator)
        tokens.append(nxt)
        done |= torch.isin(nxt, stops)
        if done.all():
            break
        h = model.hidden_states(nxt[:, None], cache, next_pos[:, None])
        logits = model.lm_head(h[:, -1])
        next_pos += 1
    rows = torch.stack(tokens, 1).tolist()
    samples = [_until_stop(r, stop_ids) for r in rows]
    return [samples[i * k : (i + 1) * k] for i in range(len(prompts))]


def _until_stop(ids: list[int], stop_ids) -> list[int]:
    for n, t in enumerate(ids):
        if t in stop_ids:
            return ids[:n]
    return ids
