"""Sampling with a KV cache: temperature, top-k, top-p, stop strings, a seed, streaming.

Several samples of one prompt share one prefill: the prompt is run once and its cache rows are
repeated, then all samples decode together as a batch.
"""

from __future__ import annotations

from typing import Iterator

import torch

from lathe.errors import LatheError
from lathe.model import GPT


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the top-k tokens and the smallest set whose probability reaches top_p; mask the rest."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus is full
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def require_forward(model: GPT) -> None:
    """Decoders and continuation scorers call this first: a backward model predicts the token before."""
    if model.cfg.direction == "backward":
        raise LatheError("a backward model (model.direction = 'backward') reads texts back to front for "
                         "classification; it does not generate or score continuations")


@torch.no_grad()
def stream_ids(
    model: GPT,
    prompt_ids: list[int],
    max_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: set[int] = frozenset(),
) -> Iterator[list[int | None]]:
    """Yield one list per decoding step: the new token of each sample, or None once it stopped.

    Stops at a stop id, at max_tokens, or when the context (block_size) is full."""
    require_forward(model)
    model.eval()
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    prompt_ids = list(prompt_ids)[-model.cfg.block_size + 1 :] or [0]
    budget = min(max_tokens, model.cfg.block_size - len(prompt_ids))
    cache = model.make_cache(1, len(prompt_ids) + budget)
    h = model.hidden_states(torch.tensor([prompt_ids], device=device), cache)
    cache.repeat_rows(num_samples)
    logits = model.lm_head(h[:, -1]).expand(num_samples, -1)
    done = [False] * num_samples
    for _ in range(budget):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        step = []
        for i, t in enumerate(nxt.tolist()):
            step.append(None if done[i] else t)
            done[i] = done[i] or t in stop_ids
        yield step
        if all(done):
            return
        h = model.hidden_states(nxt.unsqueeze(1), cache)
        logits = model.lm_head(h[:, -1])


def generate(model: GPT, tokenizer, prompt: str, max_tokens: int = 100, num_samples: int = 1,
             temperature: float = 1.0, top_k=None, top_p=None, stop: list[str] = (), seed=None) -> list[str]:
    """Generate `num_samples` completions of `prompt` (the completion text only, cut at a stop string)."""
    outputs: list[list[int]] = [[] for _ in range(num_samples)]
    texts = [""] * num_samples  # decoded so far, kept only while stop strings are watched
    stop_ids = {tokenizer.eos_id, tokenizer.bos_id}
    for step in stream_ids(model, tokenizer.encode(prompt), max_tokens, num_samples, temperature, top_k, top_p,
                           seed, stop_ids):
        for i, t in enumerate(step):
            if t is not None and t not in stop_ids and not _hit_stop(texts[i], stop):
                outputs[i].append(t)
        if stop:  # decoding every step is only needed to watch for stop strings
            texts = [tokenizer.decode(ids) for ids in outputs]
            if all(_hit_stop(t, stop) for t in texts):
                break
    return [_cut_at_stop(tokenizer.decode(ids), stop) for ids in outputs]


def _hit_stop(text: str, stop) -> bool:
    return any(s in text for s in stop)


def _cut_at_stop(text: str, stop) -> str:
    cut = min((text.index(s) for s in stop if s in text), default=len(text))
    return text[:cut]
