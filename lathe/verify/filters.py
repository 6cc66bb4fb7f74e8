"""Filters for self-generated samples, with the verifier calling convention `(prompt, answer) -> Verdict`.

`dedup` remembers what it accepted and rejects repeats; `degenerate` rejects answers no one should
train on. Build fresh ones with get_filter(name, **options): dedup is stateful.
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import groupby

from lathe.verify.base import Verdict, register_filter


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.casefold()).strip()


def char_ngrams(text: str, n: int) -> frozenset[str]:
    return frozenset(text[i : i + n] for i in range(max(1, len(text) - n + 1)))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@register_filter("dedup")
class Dedup:
    """Rejects exact repeats (after normalizing case and whitespace) and near-repeats: answers whose
    character n-gram Jaccard similarity with one accepted before is at or above `threshold`.

    by="pair": a repeat is the same prompt with the same (or a near-same) answer; the same answer to
    another prompt is new. by="answer": answers are compared across all prompts. Answers shorter
    than `min_chars` are only compared exactly: "579" and "578" are not near-repeats. Near-repeat
    search is linear in what was kept, which suits the loop's small sample sets."""

    def __init__(self, threshold: float = 0.8, n: int = 3, by: str = "pair", min_chars: int = 20):
        if by not in ("pair", "answer"):
            raise ValueError(f"by must be 'pair' or 'answer', got {by!r}")
        self.threshold, self.n, self.by, self.min_chars = threshold, n, by, min_chars
        self.reset()

    def reset(self) -> None:
        self._seen: dict[tuple[str, str], int] = {}  # (group, answer) -> sample index
        self._grams: dict[str, list[tuple[int, frozenset]]] = {}  # group -> n-grams of long answers

    def __call__(self, prompt: str, answer: str, **ctx) -> Verdict:
        group = normalize(prompt) if self.by == "pair" else ""
        text = normalize(answer)
        if (group, text) in self._seen:
            return Verdict(0.0, f"exact duplicate of sample {self._seen[group, text]}")
        grams = char_ngrams(text, self.n) if len(text) >= self.min_chars else None
        if grams is not None:
            for index, other in self._grams.get(group, []):
                similarity = jaccard(grams, other)
                if similarity >= self.threshold:
                    return Verdict(0.0, f"near duplicate of sample {index} (similarity {similarity:.2f})")
        index = len(self._seen)
        self._seen[group, text] = index
        if grams is not None:
            self._grams.setdefault(group, []).append((index, grams))
        return Verdict(1.0, f"new (sample {index})")


@register_filter("degenerate")
class Degenerate:
    """Rejects empty answers, overlong ones, non-printable junk, answers that are mostly one
    character or one token, and text stuck in a loop (one chunk repeated over and over).

    Repetition checks skip answers shorter than `min_length`: "0 0 0 0" may be a right answer."""

    def __init__(self, max_chars: int = 4000, max_repeat: float = 0.5, max_junk: float = 0.05,
                 min_length: int = 24, max_period: int = 64):
        self.max_chars, self.max_repeat, self.max_junk = max_chars, max_repeat, max_junk
        self.min_length, self.max_period = min_length, max_period

    def __call__(self, prompt: str, answer: str, **ctx) -> Verdict:
        text = answer.strip()
        for check in (self._empty, self._too_long, self._junk, self._one_char, self._one_token, self._loop):
            problem = check(text)
            if problem:
                return Verdict(0.0, problem)
        return Verdict(1.0, "not degenerate")

    def _empty(self, text: str) -> str | None:
        return None if text else "empty answer"

    def _too_long(self, text: str) -> str | None:
        return f"too long: {len(text)} characters (limit {self.max_chars})" if len(text) > self.max_chars else None

    def _junk(self, text: str) -> str | None:
        junk = sum(1 for c in text if c == "\ufffd" or not (c.isprintable() or c in "\n\t"))
        return f"non-printable junk: {junk} of {len(text)} characters" if junk > self.max_junk * len(text) else None

    def _one_char(self, text: str) -> str | None:
        chars = text.replace(" ", "").replace("\n", "")
        if len(text) < self.min_length or not chars:
            return None
        char, count = Counter(chars).most_common(1)[0]
        share = count / len(chars)
        return f"mostly one repeated character {char!r} ({share:.0%})" if share > self.max_repeat else None

    def _one_token(self, text: str) -> str | None:
        tokens = text.split()
        if len(text) < self.min_length or len(tokens) < 8:
            return None
        token, count = Counter(tokens).most_common(1)[0]
        share = count / len(tokens)
        return f"mostly one repeated token {token!r} ({share:.0%})" if share > self.max_repeat else None

    def _loop(self, text: str) -> str | None:
        """A chunk of 2..max_period characters repeated back to back at least 4 times, covering more
        than max_repeat of the answer: the model fell into a loop."""
        if len(text) < self.min_length:
            return None
        for period in range(2, min(self.max_period, len(text) // 4) + 1):
            start, run = _longest_run(text, period)
            span = run + period  # characters covered by the repeating chunk
            if span >= 4 * period and span > self.max_repeat * len(text):
                return f"stuck in a loop: {text[start:start + period]!r} repeated {span // period} times"
        return None


def _longest_run(text: str, period: int) -> tuple[int, int]:
    """(start, length) of the longest stretch where each character equals the one `period` later."""
    best_start, best, position = 0, 0, 0
    for same, group in groupby(a == b for a, b in zip(text, text[period:])):
        length = sum(1 for _ in group)
        if same and length > best:
            best_start, best = position, length
        position += length
    return best_start, best
