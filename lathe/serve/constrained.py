"""Constrained decoding: the output must match a JSON schema, a regular expression or a Lark grammar.

    c = Constraint.json_schema({"type": "object", "properties": {...}, "required": [...]})
    engine.generate([Request(prompt="...", constraint=c)])

Before each sampling step, `llguidance` computes which tokens keep the output a valid prefix of the
grammar; every other token's logit is set to -inf, so whatever the sampler picks stays valid, even
from an untrained model. When the grammar is complete the row stops with finish_reason "stop", and
its text parses. With finish_reason "length" (max_tokens or the context ran out first) the text is a
valid but unfinished prefix: give bounded schemas (enum, pattern, maxLength, maximum, maxItems) and
enough max_tokens when every output must parse.

Why llguidance: it works on the tokenizer's bytes, so it accepts any tokenization the model picks
(not only the canonical one), computes a mask in tens of microseconds from Rust with the GIL
released and in parallel over a batch, compiles JSON schema, regex and Lark from one API, and is
maintained as a structured-output backend of vLLM, SGLang and llama.cpp.

JSON is compact (no optional whitespace): a model cannot wander off into endless spaces, and the
output costs fewer tokens. Schema keywords llguidance does not implement (uniqueItems, ...) are a
LatheError when the request arrives, never silently ignored. Lark grammars may name lathe's special tokens (`<|tool_call_start|>`) to
constrain tool calls. The constraint covers what the model writes: text the engine injects (tool
results) is outside it, so `start: <|tool_call_start|> CALL <|tool_call_end|> ANSWER` describes a
call followed, after the tool's result, by the answer.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import torch
from pydantic import field_validator

from lathe.config import Section
from lathe.errors import LatheError

JSON_OPTIONS = {"whitespace_flexible": False}


class Constraint(Section):
    """What the output must match. `spec` is the schema (dict or JSON text), the regex or the grammar."""

    kind: Literal["json_schema", "regex", "lark"]
    spec: str | dict

    @field_validator("spec")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("must not be empty")
        return v

    @classmethod
    def json_schema(cls, schema: dict | str) -> "Constraint":
        return cls(kind="json_schema", spec=schema)

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        return cls(kind="regex", spec=pattern)

    @classmethod
    def lark(cls, grammar: str) -> "Constraint":
        return cls(kind="lark", spec=grammar)

    def key(self) -> str:
        """A stable key for caching compiled grammars."""
        spec = self.spec if isinstance(self.spec, str) else json.dumps(self.spec, sort_keys=True)
        return f"{self.kind}:{spec}"


def grammar_of(constraint: Constraint) -> str:
    """The llguidance grammar text of a constraint (not yet checked)."""
    import llguidance as llg

    if constraint.kind == "json_schema":
        try:
            return llg.LLMatcher.grammar_from_json_schema(constraint.spec, overrides=JSON_OPTIONS)
        except ValueError as e:
            raise LatheError(f"constraint json_schema: not a JSON object ({e})") from None
    if constraint.kind == "regex":
        if not isinstance(constraint.spec, str):
            raise LatheError("constraint regex: spec must be a string")
        return llg.LLMatcher.grammar_from_regex(constraint.spec)
    if not isinstance(constraint.spec, str):
        raise LatheError("constraint lark: spec must be a string")
    return llg.LLMatcher.grammar_from_lark(constraint.spec)


class Constrainer:
    """Compiles constraints for one tokenizer and masks a batch of logits.

    `stop_ids` are the tokens that end an output (the grammar allows them once it is complete)."""

    def __init__(self, tokenizer, stop_ids: list[int]):
        import llguidance as llg

        self._llg = llg
        # Built from the tokenizer.json text: llguidance reads the byte-level vocabulary and the
        # special tokens (which grammar text can never produce, only <|name|> references).
        self.lltok = llg.LLTokenizer(tokenizer.hf.to_str(), n_vocab=tokenizer.vocab_size, eos_token=list(stop_ids))
        self.executor = llg.LLExecutor()
        self._compiled: dict[str, object] = {}  # constraint key -> a fresh matcher to copy

    def matcher(self, constraint: Constraint):
        """A new matcher at the start of the grammar; bad grammars raise LatheError."""
        key = constraint.key()
        if key not in self._compiled:
            if len(self._compiled) >= 256:  # a server sees many schemas: keep the cache bounded
                self._compiled.pop(next(iter(self._compiled)))
            grammar = grammar_of(constraint)
            is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self.lltok)
            if is_error:
                raise LatheError(f"constraint {constraint.kind}: {messages[0].strip()}")
            self._compiled[key] = self._llg.LLMatcher(self.lltok, grammar, log_level=0)
        return self._compiled[key].deep_copy()

    def allowed(self, matchers: list[tuple[object, int]], batch: int, vocab: int) -> torch.Tensor:
        """(batch, vocab) bool: True where a token is allowed. Rows not listed allow everything;
        ids past the tokenizer's vocabulary (a padded embedding) are never allowed for listed rows."""
        import llguidance.numpy as lln

        bits = lln.allocate_token_bitmask(batch, self.lltok.vocab_size)
        lln.fill_next_token_bitmask_par(self.executor, matchers, bits)
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")
        out = np.zeros((batch, vocab), dtype=bool)
        width = min(vocab, self.lltok.vocab_size)
        out[:, :width] = allowed[:, :width]
        constrained = np.zeros(batch, dtype=bool)
        constrained[[row for _, row in matchers]] = True
        out[~constrained] = True
        return torch.from_numpy(out)


def check_matcher(matcher, token: int) -> None:
    """Consume a sampled token; the mask makes failure impossible, so failure is a bug worth a loud error."""
    if not matcher.consume_token(token):
        raise RuntimeError(f"constrained decoding: token {token} rejected: {matcher.get_error()}")
