"""Boilerplate: lines repeated at the start or end of many documents of one source (site headers, footers,
licence banners, "Subscribe to our newsletter"), found in one streaming pass and removed in a later one.

Pass 1 (every task): the first and last `edge_lines` non-blank lines of each document are candidates; each
source keeps a Misra-Gries summary of them (`EdgeCounter`): at most CAPACITY lines with counts that are
exact while a source has fewer distinct candidates, and otherwise never over-count and miss any line that
is at the edges of more than 1/CAPACITY of the documents. Summaries from all tasks merge into one.

Pass 2 (every task): a line is boilerplate when it was counted at the edges of at least `min_docs`
documents and `min_fraction` of the source's documents; such lines (and lines matching `patterns`) are
removed wherever they appear in that source.
"""

from __future__ import annotations

import re
from typing import Iterable

from lathe.config import BoilerplateConfig

CAPACITY = 4096  # lines tracked per source per summary
MAX_LINE_CHARS = 300  # longer lines are content, not boilerplate


def edge_lines(text: str, k: int, min_chars: int) -> set[str]:
    """The distinct stripped lines among the first and last k non-blank lines."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    edges = lines[:k] + lines[-k:]
    return {line for line in edges if min_chars <= len(line) <= MAX_LINE_CHARS}


class EdgeCounter:
    """Misra-Gries heavy hitters for one source: `documents` seen and approximate counts per line."""

    def __init__(self, counts: dict[str, int] | None = None, documents: int = 0):
        self.counts = counts or {}
        self.documents = documents

    def add(self, lines: Iterable[str]) -> None:
        self.documents += 1
        for line in lines:
            if line in self.counts:
                self.counts[line] += 1
            elif len(self.counts) < CAPACITY:
                self.counts[line] = 1
            else:  # full: every counter loses one, the zeros make room
                self.counts = {k: v - 1 for k, v in self.counts.items() if v > 1}

    def merge(self, other: "EdgeCounter") -> None:
        for line, n in other.counts.items():
            self.counts[line] = self.counts.get(line, 0) + n
        self.documents += other.documents
        if len(self.counts) > CAPACITY:  # keep the CAPACITY largest, less the next count (Agarwal et al. 2012)
            ranked = sorted(self.counts.values(), reverse=True)
            cut = ranked[CAPACITY]
            self.counts = {k: v - cut for k, v in self.counts.items() if v > cut}

    def boilerplate(self, cfg: BoilerplateConfig) -> list[str]:
        need = max(cfg.min_docs, cfg.min_fraction * self.documents)
        return sorted(line for line, n in self.counts.items() if n >= need)

    def to_dict(self) -> dict:
        return {"documents": self.documents, "counts": self.counts}

    @classmethod
    def from_dict(cls, d: dict) -> "EdgeCounter":
        return cls(d["counts"], d["documents"])


class LineRemover:
    """Removes the boilerplate lines of one source (exact match after stripping) and pattern matches."""

    def __init__(self, lines: Iterable[str], patterns: list[str]):
        self.lines = set(lines)
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

    def __bool__(self) -> bool:
        return bool(self.lines or self.pattern)

    def remove(self, text: str) -> tuple[str, int]:
        kept, removed = [], 0
        for line in text.split("\n"):
            stripped = line.strip()
            if stripped and (stripped in self.lines or (self.pattern and self.pattern.search(line))):
                removed += 1
            else:
                kept.append(line)
        return ("\n".join(kept) if removed else text), removed
