"""What every model-based evaluation asks of a model: the log-likelihood of a continuation given a
context, and a greedy completion that stops at given strings.

    model, tok = load_run_model("runs/x")
    ctx, cont = encode_pair(tok, "The capital of France is", " Paris")
    [s] = score_continuations(model, [(ctx, cont)])      # s.logprob, s.greedy, s.tokens
    text = complete(model, tok, prompt_ids(tok, "Q: 2+2=\nA:"), max_tokens=8, until=["\n"])

Contexts start with <|bos|> (`prompt_ids`), as every document does in the token shards, so a
context-free score (an empty context) is P(text | start of a document). Multiple choice, the bias
probe, the arena's judge model and the lm-evaluation-harness adapter all score through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from lathe.generate import require_forward, stream_ids


@dataclass(frozen=True)
class Scored:
    logprob: float  # summed natural-log probability of the continuation tokens
    greedy: bool  # every continuation token is the model's argmax given what precedes it
    tokens: int  # continuation length in tokens


def load_run_model(path: str | Path | None, device: str = "auto"):
    """(model, tokenizer) of a run directory (or the newest run), the model in eval mode."""
    from lathe.rundir import RunDir
    from lathe.tokenizer import Tokenizer
    from lathe.train.checkpoint import load_model
    from lathe.train.dist import pick_device

    run = RunDir.resolve(path)
    tok = Tokenizer.from_file(run.require(run.tokenizer, "tokenizer"))
    model = load_model(run.path, pick_device(device)).eval()
    return model, tok


def prompt_ids(tok, text: str) -> list[int]:
    """<|bos|> + the text's tokens: how a document starts in the training shards."""
    return [tok.bos_id, *tok.encode(text)]


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (<|bos|> + context, continuation), encoded separately so the continuation's
    tokens are exactly the ones scored. Trailing spaces of the context move to the continuation
    (lm-evaluation-harness does the same): "Answer: " + "4" is scored as "Answer:" + " 4", the way
    a byte-level BPE tokenizes running text."""
    stripped = context.rstrip(" ")
    moved = context[len(stripped):]
    return prompt_ids(tok, stripped), tok.encode(moved + continuation)


def _batches(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def score_continuations(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                        batch_size: int = 32) -> list[Scored]:
    """Score each (context ids, continuation ids) pair in one forward pass per batch.

    A sequence longer than block_size + 1 keeps its last block_size + 1 tokens (the context is cut
    from the left); a continuation longer than block_size cannot be scored and raises ValueError.
    Rows are right-padded: attention is causal, so padding after a row's end changes nothing before it.
    The pairs are text order, so a backward model is refused (its log p(continuation | context) is not this)."""
    require_forward(model)
    block = model.cfg.block_size
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        if len(cont) > block:
            raise ValueError(f"pair {i}: continuation of {len(cont)} tokens exceeds block_size {block}")
        if not ctx:
            raise ValueError(f"pair {i}: empty context (start it with <|bos|>: see prompt_ids)")
        rows.append((list(ctx) + list(cont))[-(block + 1):])
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    results: list[Scored | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths share a batch
    for chunk in _batches(order, batch_size):
        width = max(len(rows[i]) - 1 for i in chunk)
        x = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            x[r, : len(rows[i]) - 1] = torch.tensor(rows[i][:-1])
        logprobs = model(x.to(device))[0].float().log_softmax(-1)
        for r, i in enumerate(chunk):
            results[i] = _score_row(logprobs[r], rows[i], len(pairs[i][1]))
    model.train(was_training)
    return results


def _score_row(logprobs: torch.Tensor, row: list[int], n: int) -> Scored:
    if n == 0:
        return Scored(0.0, True, 0)
    end = len(row) - 1  # logits at position t predict token t + 1
    predicted = logprobs[end - n : end]
    target = torch.tensor(row[-n:], device=predicted.device)
    token_logprobs = predicted.gather(-1, target[:, None]).squeeze(-1)
    return Scored(float(token_logprobs.sum()), bool((predicted.argmax(-1) == target).all()), n)


def complete(model, tok, prompt: Sequence[int], max_tokens: int, until: Sequence[str] = (),
             stop_ids: Iterable[int] | None = None, temperature: float = 0.0, seed: int | None = None) -> str:
    """The model's completion of `prompt` (token ids), greedy by default, cut before the first of
    the `until` strings. It also stops at a stop id (default <|eos|> and <|bos|>, which never belong
    inside a completion), after max_tokens, or when the context is full."""
    stops = set(stop_ids) if stop_ids is not None else {tok.eos_id, tok.bos_id}
    out: list[int] = []
    for step in stream_ids(model, list(prompt), max_tokens, temperature=temperature, seed=seed, stop_ids=stops):
        if step[0] is None or step[0] in stops:
            break
        out.append(step[0])
        if until and any(s in tok.decode(out) for s in until):
            break
    text = tok.decode(out)
    return text[: min((text.index(s) for s in until if s in text), default=len(text))]
