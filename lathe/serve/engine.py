"""The generation engine: batched, streamed, constrained, tool-using generation with a KV cache.

    engine = Engine.load("runs/my-run")                        # or Engine(model, tokenizer, memory=store)
    [result] = engine.generate([Request(messages=[{"role": "user", "content": "What is 6*7?"}],
                                        max_tokens=64, temperature=0.7, tools=True)])
    result.choices[0].text, result.choices[0].finish_reason, result.usage.completion_tokens

    for delta in engine.stream(Request(prompt="def ", n=2, stop=["\\n\\n"])):
        print(delta.index, delta.text, end="")                 # text as it decodes, per sample

API for servers and UIs
- `Request`: one prompt (`prompt` text or ids, or chat `messages`) and how to sample it (see its fields).
  Build it from JSON with `Request.model_validate(d)` or `as_request(d)` (a LatheError naming the field).
- `generate(requests) -> list[Result]`: several requests decode together as one batch.
- `stream(request)` / `stream_many(requests)` yield `Delta`s: `text` is new text of sample `index`
  of request `request` (whole characters only: a character split across tokens waits for its last
  byte); `tool_call` is a call the engine ran (with its result); the last delta of a sample has
  `finish_reason` ("stop", "length" or "tool_calls"), and the last delta of a request also carries
  its full `Result` (choices, `usage`, the prompt ids, the memory entries used).
- `prompt_ids(request)`: the exact token ids the model will see (chat template, memory, all).
- `constrainer().matcher(constraint)`: compiles a constraint (cached); a bad one raises LatheError.
- `Request.logprobs`: `Choice.logprobs` gets the model's log-probability of each token it wrote.
- finish_reason: "stop" = an end token, a stop string or a complete constraint; "length" = max_tokens
  or the context ran out; "tool_calls" = the model wrote a tool call the engine did not run (tools
  off, or max_tool_rounds spent): the call is in `Choice.tool_calls` with result None, for the caller.

Threads: one Engine runs one batch at a time. A second `generate`/`stream` while one is running
raises EngineBusy; a server serializes requests through a queue (and may merge the queued ones into
one `stream_many` batch). Close an abandoned stream (`gen.close()`) to release the engine at once.

How a batch decodes: prompts of different lengths are left-padded into one prefill (pad keys masked,
positions per row), each prompt's cache rows are then repeated for its n samples (one prefill, n
samples), and every step feeds one token per row. Per step: repetition penalty, constraint masks
(llguidance, for all constrained rows at once), sampling per request with its own seeded generator,
then per row text decoding, stop strings, tool calls. Tool results are fed back one token per step
like forced tokens, so rows never leave the shared cache position. Finished rows leave the batch.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from pydantic import Field, ValidationError, model_validator

from lathe.chat import render_chat, validate_messages
from lathe.config import Section, format_validation_error
from lathe.errors import LatheError
from lathe.generate import require_forward, sample_next
from lathe.serve.constrained import Constraint, Constrainer, check_matcher
from lathe.serve.memory import Hit, MemoryStore, memory_note, query_of, with_memory
from lathe.serve.tools import ToolCall, ToolError, parse_tool_call, run_tool_call


class EngineBusy(RuntimeError):
    """The engine is decoding another batch: one Engine runs one batch at a time."""


class Request(Section):
    """One generation request. Give exactly one of `prompt` (text or token ids) and `messages`."""

    prompt: str | list[int] | None = None
    messages: list[dict] | None = None  # chat messages, rendered with the chat template + assistant start
    max_tokens: int = Field(256, ge=1, description="tokens the model may write (tool results not counted)")
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages tokens already in the context")
    stop: list[str] = Field(default_factory=list, description="stop strings, cut from the output")
    seed: int | None = None
    n: int = Field(1, ge=1, le=256, description="samples sharing one prefill")
    constraint: Constraint | None = None
    tools: bool = Field(False, description="run the model's calculator/python tool calls and feed results back")
    max_tool_rounds: int = Field(4, ge=0)
    memory_task: str | None = Field(None, description="put this task's most relevant memory entries in the prompt")
    memory_k: int = Field(3, ge=1)
    ignore_eos: bool = Field(False, description="treat end tokens as text: always write max_tokens (benchmarks)")
    logprobs: bool = Field(False, description="report the model's log-probability of each token it wrote")

    @model_validator(mode="after")
    def _check(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self


def as_request(value: Request | dict) -> Request:
    if isinstance(value, Request):
        return value
    try:
        return Request.model_validate(value)
    except ValidationError as e:
        raise LatheError(format_validation_error(e, "request").replace("invalid recipe", "invalid request")) from None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int  # tokens the model wrote, all samples together

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Choice:
    index: int
    text: str  # what the model wrote, without special tokens, tool-call JSON or the stop string
    token_ids: list[int]  # everything after the prompt: the model's tokens and the tool results fed back
    finish_reason: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[float | None] | None = None  # per token_ids entry (None for fed-back tool results)


@dataclass
class Result:
    choices: list[Choice]
    usage: Usage
    prompt_ids: list[int]
    memory: list[Hit] = field(default_factory=list)  # entries retrieved into the prompt


@dataclass
class Delta:
    request: int  # position of the request in the batch (0 for `stream`)
    index: int  # sample number within the request
    text: str = ""
    tool_call: ToolCall | None = None
    finish_reason: str | None = None
    result: Result | None = None  # on the last delta of a request


@dataclass(eq=False)
class _Row:
    """One sample being decoded."""

    request: int
    index: int
    spec: Request
    prompt_len: int
    generator: torch.Generator | None
    matcher: object | None
    decoder: object  # tokenizers.decoders.DecodeStream: bytes -> whole characters
    ids: list[int] = field(default_factory=list)  # fed after the prompt
    generated: int = 0
    held: str = ""  # decoded, not yet emitted: it may be the start of a stop string
    text: list[str] = field(default_factory=list)
    call: list[int] | None = None  # the ids of a tool call being written
    inject: deque = field(default_factory=deque)  # tool-result tokens waiting to be fed
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_rounds: int = 0
    logprobs: list[float | None] = field(default_factory=list)
    feed: int | None = None  # the token to feed next step
    finish: str | None = None


@dataclass
class _Batch:
    rows: list[_Row]
    cache: object
    positions: torch.Tensor  # (rows,) position of the next token fed
    seen: torch.Tensor | None  # (rows, vocab) bool, for the repetition penalty
    logits: torch.Tensor


class Engine:
    def __init__(self, model, tokenizer, memory: MemoryStore | None = None):
        from lathe.tokenizer import SPECIAL_TOKENS

        require_forward(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.memory = memory
        self.device = model.lm_head.weight.device
        self.context = model.cfg.block_size
        self.text_vocab = min(tokenizer.vocab_size, model.cfg.vocab_size)
        self.call_start = tokenizer.special_id("tool_call_start")
        self.call_end = tokenizer.special_id("tool_call_end")
        # every other special token ends the sample: an end token, or the model starting another turn
        self.stop_ids = frozenset(range(len(SPECIAL_TOKENS))) - {self.call_start, self.call_end}
        self._constrainer: Constrainer | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", memory: MemoryStore | None = None) -> "Engine":
        """An engine for a run directory or checkpoint (the tokenizer.json is found beside the run)."""
        from lathe.tokenizer import Tokenizer
        from lathe.train.checkpoint import load_model, resolve_checkpoint

        ckpt = resolve_checkpoint(path)
        for folder in (ckpt, ckpt.parent, ckpt.parent.parent):
            if (folder / "tokenizer.json").is_file():
                return cls(load_model(ckpt, device), Tokenizer.from_file(folder / "tokenizer.json"), memory)
        raise LatheError(f"{path}: no tokenizer.json beside the checkpoint {ckpt}")

    # --- public API ---------------------------------------------------------------------------
    def generate(self, requests: Iterable[Request | dict]) -> list[Result]:
        results = {}
        for delta in self.stream_many(requests):
            if delta.result is not None:
                results[delta.request] = delta.result
        return [results[i] for i in range(len(results))]

    def stream(self, request: Request | dict) -> Iterator[Delta]:
        return self.stream_many([request])

    def stream_many(self, requests: Iterable[Request | dict]) -> Iterator[Delta]:
        """Bad requests raise LatheError here, before the first delta (a server can still answer 400)."""
        requests = [as_request(r) for r in requests]
        prompts = [self.prompt_ids(r) for r in requests]
        for r in requests:
            if r.constraint is not None:
                self.constrainer().matcher(r.constraint)  # compiles (and caches) the grammar: errors now
        return self._locked(requests, prompts)

    def _locked(self, requests, prompts) -> Iterator[Delta]:
        if not requests:
            return
        if not self._lock.acquire(blocking=False):
            raise EngineBusy("this Engine is decoding another batch; serialize calls (one batch at a time)")
        try:
            yield from self._decode(requests, prompts)
        finally:
            self._lock.release()

    def prompt_ids(self, request: Request) -> tuple[list[int], list[Hit]]:
        """The token ids the model sees for `request`, and the memory entries put into them."""
        tok, hits = self.tokenizer, []
        if request.messages is not None:
            messages = validate_messages(request.messages, "request.messages")
            hits = self._recall(request, query_of(messages))
            ids, _ = render_chat(tok, with_memory(messages, hits), add_generation_prompt=True)
        elif isinstance(request.prompt, str):
            hits = self._recall(request, request.prompt)
            text = f"{memory_note(hits)}\n\n{request.prompt}" if hits else request.prompt
            ids = [tok.bos_id] + tok.encode(text)  # documents start with <|bos|> in training, so prompts do too
        else:
            if request.memory_task:
                raise LatheError("request.memory_task: memory needs a text prompt or messages, not token ids")
            ids = list(request.prompt)
            if not ids or min(ids) < 0 or max(ids) >= self.text_vocab:
                raise LatheError(f"request.prompt: token ids must be in [0, {self.text_vocab}) and not empty")
        if len(ids) >= self.context:
            raise LatheError(f"request: the prompt is {len(ids)} tokens; the model's context is {self.context}")
        return ids, hits

    def _recall(self, request: Request, query: str) -> list[Hit]:
        if not request.memory_task:
            return []
        if self.memory is None:
            raise LatheError("request.memory_task: this engine has no memory store")
        return self.memory.search(request.memory_task, query, request.memory_k)

    # --- the decoding loop ----------------------------------------------------------------------
    def _decode(self, requests: list[Request], prompts: list[tuple[list[int], list[Hit]]]) -> Iterator[Delta]:
        rows = self._make_rows(requests, [ids for ids, _ in prompts])
        batch = self._prefill(requests, [ids for ids, _ in prompts], rows)
        finished: list[list[_Row]] = [[] for _ in requests]
        while batch.rows:
            logprobs = self._log_softmax(batch)
            tokens = self._sample(self._shape_logits(batch), batch.rows)
            for k, (row, token) in enumerate(zip(batch.rows, tokens)):
                for delta in self._advance(row, token, logprobs[k, token].item() if logprobs is not None else None):
                    if delta.finish_reason is not None:
                        done = finished[row.request]
                        done.append(row)
                        if len(done) == row.spec.n:  # the request's last sample: attach its result
                            delta.result = self._result(done, prompts[row.request])
                    yield delta
            self._drop_finished(batch)
            if batch.rows:
                self._step(batch)

    def _make_rows(self, requests: list[Request], prompts: list[list[int]]) -> list[_Row]:
        from tokenizers.decoders import DecodeStream

        rows = []
        for i, (req, ids) in enumerate(zip(requests, prompts)):
            generator = None
            if req.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(req.seed)
            for s in range(req.n):
                matcher = self.constrainer().matcher(req.constraint) if req.constraint else None
                rows.append(_Row(i, s, req, len(ids), generator, matcher, DecodeStream(skip_special_tokens=False)))
        return rows

    def constrainer(self) -> Constrainer:
        if self._constrainer is None:
            stops = [self.tokenizer.eos_id, self.tokenizer.special_id("assistant_end")]
            self._constrainer = Constrainer(self.tokenizer, stops)
        return self._constrainer

    @torch.inference_mode()
    def _prefill(self, requests: list[Request], prompts: list[list[int]], rows: list[_Row]) -> _Batch:
        """Run all prompts at once, left-padded; then give each prompt's cache rows to its n samples."""
        longest = max(len(p) for p in prompts)
        idx = torch.full((len(prompts), longest), self.tokenizer.pad_id, dtype=torch.long)
        positions = torch.zeros((len(prompts), longest), dtype=torch.long)
        for j, p in enumerate(prompts):
            pad = longest - len(p)
            idx[j, pad:] = torch.tensor(p)
            positions[j, pad:] = torch.arange(len(p))
        cache = self.model.make_cache(len(prompts), longest + self._steps_needed(requests, prompts))
        if any(len(p) < longest for p in prompts):
            cache.key_mask = torch.ones(len(prompts), cache.max_len, dtype=torch.bool, device=self.device)
            for j, p in enumerate(prompts):
                cache.key_mask[j, : longest - len(p)] = False
        h = self.model.hidden_states(idx.to(self.device), cache, positions.to(self.device))
        logits = self.model.lm_head(h[:, -1])
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        if len(rows) > len(prompts):  # n samples per prompt: repeat rows instead of prefilling again
            owner = torch.tensor([row.request for row in rows], device=self.device)
            cache.select_rows(owner)
            logits, lengths = logits[owner], lengths[owner]
        seen = None
        if any(r.repetition_penalty != 1.0 for r in requests):
            seen = torch.zeros(len(rows), logits.size(-1), dtype=torch.bool, device=self.device)
            for k, row in enumerate(rows):
                seen[k, torch.tensor(prompts[row.request], device=self.device)] = True
        return _Batch(rows, cache, lengths.clone(), seen, logits)

    def _steps_needed(self, requests: list[Request], prompts: list[list[int]]) -> int:
        """Cache slots after the prompt: tool results can fill the context, otherwise max_tokens bounds it."""
        return max(self.context - len(p) if r.tools else min(r.max_tokens, self.context - len(p))
                   for r, p in zip(requests, prompts))

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> None:
        feed = torch.tensor([row.feed for row in batch.rows], device=self.device)
        h = self.model.hidden_states(feed[:, None], batch.cache, batch.positions[:, None])
        batch.logits = self.model.lm_head(h[:, -1])
        batch.positions += 1
        if batch.seen is not None:
            batch.seen[torch.arange(len(batch.rows), device=self.device), feed] = True

    @torch.inference_mode()
    def _log_softmax(self, batch: _Batch) -> torch.Tensor | None:
        """The model's own log-probabilities (before penalty and masks), when a request asks for them."""
        if not any(row.spec.logprobs for row in batch.rows):
            return None
        return batch.logits.float().log_softmax(-1).cpu()

    @torch.inference_mode()
    def _shape_logits(self, batch: _Batch) -> torch.Tensor:
        """Repetition penalty, then the constraint masks; ids beyond the tokenizer are never sampled."""
        logits = batch.logits.float()
        if logits.size(-1) > self.text_vocab:
            logits = logits.clone()  # batch.logits may be float already: never write into it
            logits[:, self.text_vocab:] = float("-inf")
        if batch.seen is not None:
            penalty = torch.tensor([row.spec.repetition_penalty for row in batch.rows], device=self.device)[:, None]
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)  # the CTRL / HF rule
            logits = torch.where(batch.seen, penalized, logits)
        constrained = [(row.matcher, k) for k, row in enumerate(batch.rows) if row.matcher is not None and not row.inject]
        if constrained:
            allowed = self.constrainer().allowed(constrained, len(batch.rows), logits.size(-1))
            logits = logits.masked_fill(~allowed.to(self.device), float("-inf"))
        return logits

    @torch.inference_mode()
    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """One token per row. Rows with the same settings and generator sample together (all greedy rows
        in one argmax); each seeded request draws from its own generator, so its samples do not depend
        on what else is in the batch."""
        out: list[int] = []
        while len(out) < len(rows):
            start, key = len(out), _sampling_key(rows[len(out)])
            end = start + 1
            while end < len(rows) and _sampling_key(rows[end]) == key:
                end += 1
            r = rows[start].spec
            out += sample_next(logits[start:end], r.temperature, r.top_k, r.top_p, rows[start].generator).tolist()
        return out

    # --- one token of one row -------------------------------------------------------------------
    def _advance(self, row: _Row, token: int, logprob: float | None) -> list[Delta]:
        """Take the row's sampled token (or its next tool-result token) and decide what comes next."""
        if row.inject:  # feeding a tool result: the engine's text, so the sample is discarded
            row.feed = row.inject.popleft()
            row.ids.append(row.feed)
            row.logprobs.append(None)
            return []
        row.generated += 1
        control = not row.spec.ignore_eos
        if control and token in self.stop_ids:
            return [self._finish(row, "stop")]
        if row.matcher is not None:
            check_matcher(row.matcher, token)
        row.feed = token
        row.ids.append(token)
        row.logprobs.append(logprob)
        if control and token == self.call_start and row.call is None:
            deltas = []
            row.call = []
        elif control and token == self.call_end and row.call is not None:
            deltas = self._tool_call(row)
        elif row.call is not None:
            row.call.append(token)
            deltas = []
        else:
            deltas = self._text(row, token)
        if row.finish is None:
            if row.matcher is not None and row.matcher.is_stopped():
                deltas.append(self._finish(row, "stop"))  # the grammar is complete
            elif row.generated >= row.spec.max_tokens or row.prompt_len + len(row.ids) > self.context:
                deltas.append(self._finish(row, "length"))
        return deltas

    def _text(self, row: _Row, token: int) -> list[Delta]:
        piece = row.decoder.step(self.tokenizer.hf, token)
        if not piece:
            return []  # the middle of a multi-byte character
        row.held += piece
        stops = row.spec.stop
        if stops:
            cut = min((row.held.find(s) for s in stops if s in row.held), default=-1)
            if cut >= 0:
                row.held = row.held[:cut]
                return [self._finish(row, "stop")]
        keep = _stop_prefix_len(row.held, stops)  # text that may begin a stop string waits
        out, row.held = row.held[: len(row.held) - keep], row.held[len(row.held) - keep:]
        return [self._emit(row, out)] if out else []

    def _tool_call(self, row: _Row) -> list[Delta]:
        raw, row.call = self.tokenizer.decode(row.call), None
        if not row.spec.tools or row.tool_rounds >= row.spec.max_tool_rounds:
            row.tool_calls.append(_unrun_call(raw))  # the caller runs it
            return [self._finish(row, "tool_calls")]
        call = run_tool_call(raw)
        row.tool_rounds += 1
        row.tool_calls.append(call)
        sp = self.tokenizer.special_id
        # exactly what render_chat writes for an assistant tool call followed by a tool message
        tail = [sp("assistant_end"), sp("tool_result_start"), *self.tokenizer.encode(call.result),
                sp("tool_result_end"), sp("assistant_start")]
        delta = Delta(row.request, row.index, tool_call=call)
        if row.prompt_len + len(row.ids) + len(tail) > self.context:
            return [delta, self._finish(row, "length")]
        row.inject.extend(tail)
        return [delta]

    def _emit(self, row: _Row, text: str) -> Delta:
        row.text.append(text)
        return Delta(row.request, row.index, text=text)

    def _finish(self, row: _Row, reason: str) -> Delta:
        row.finish = reason
        text, row.held = row.held, ""
        if text:
            row.text.append(text)
        return Delta(row.request, row.index, text=text, finish_reason=reason)

    def _drop_finished(self, batch: _Batch) -> None:
        """Finished rows leave the batch, so later steps only compute live rows."""
        keep = [k for k, row in enumerate(batch.rows) if row.finish is None]
        if len(keep) == len(batch.rows):
            return
        batch.rows = [batch.rows[k] for k in keep]
        if keep:
            index = torch.tensor(keep, device=self.device)
            batch.cache.select_rows(index)
            batch.positions = batch.positions[index]
            if batch.seen is not None:
                batch.seen = batch.seen[index]

    @staticmethod
    def _result(rows: list[_Row], prompt: tuple[list[int], list[Hit]]) -> Result:
        ids, hits = prompt
        generated = sum(r.generated for r in rows)
        choices = [Choice(r.index, "".join(r.text), r.ids, r.finish, r.tool_calls,
                          r.logprobs if r.spec.logprobs else None)
                   for r in sorted(rows, key=lambda r: r.index)]
        return Result(choices, Usage(len(ids), generated), ids, hits)


def _sampling_key(row: _Row) -> tuple:
    r = row.spec
    if r.temperature == 0:
        return ("greedy",)
    return r.temperature, r.top_k, r.top_p, id(row.generator)


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _unrun_call(raw: str) -> ToolCall:
    try:
        name, arguments = parse_tool_call(raw)
    except ToolError:
        name, arguments = "", {}
    return ToolCall(name, arguments, None, raw)

