"""The ledger: every count the manifest and the data card show, kept per source by each task and summed after.

For each source it records
  steps      documents and bytes leaving each step (read, clean, pii, filters..., splits), in pipeline order
  removed    reason -> files, documents, bytes (and sub-reasons, e.g. which Gopher rule fired)
  examples   reason -> the EXAMPLES removed documents with the smallest keys (a hash of their text), so the
             examples are the same however the corpus was sharded
  counts     anything else worth a number (files read/skipped/split, PII replaced, bytes repaired, ...)
  problems   files skipped or cut short, with the reason
  hist       document lengths (characters) in power-of-two bins, as read and as written

Ledgers are plain JSON; `merge` adds one into another (sums, smallest-key examples, concatenated problems).
"""

from __future__ import annotations

import json
from typing import Iterable, Optional

EXAMPLES = 3  # removed documents kept as examples per reason per source
SNIPPET = 240  # characters of an example shown in the card
HIST_BINS = 32  # bin k holds lengths in [2**k, 2**(k+1)); bin 0 also holds 0
BASE_REASONS = ("too_short", "too_long", "duplicate", "near_duplicate", "binary_or_non_utf8", "unreadable",
                "over_max_total_bytes")


def _new_source() -> dict:
    return {"steps": {}, "removed": {}, "examples": {}, "counts": {}, "problems": [],
            "hist": {"input": [0] * HIST_BINS, "output": [0] * HIST_BINS}}


def length_bin(n: int) -> int:
    return min(max(n, 1).bit_length() - 1, HIST_BINS - 1)


class Ledger:
    def __init__(self, data: Optional[dict] = None):
        self.sources: dict[str, dict] = data or {}

    def _src(self, source: str) -> dict:
        if source not in self.sources:
            self.sources[source] = _new_source()
        return self.sources[source]

    # --- recording ------------------------------------------------------------------------------
    def passed(self, step: str, source: str, nbytes: int, documents: int = 1) -> None:
        entry = self._src(source)["steps"].setdefault(step, {"documents": 0, "bytes": 0})
        entry["documents"] += documents
        entry["bytes"] += nbytes

    def removed(self, reason: str, source: str, nbytes: int, *, documents: int = 1, files: int = 0,
                detail: str = "", text: Optional[str] = None, key: str = "", where: str = "") -> None:
        entry = self._src(source)["removed"].setdefault(reason, {"files": 0, "documents": 0, "bytes": 0})
        entry["files"] += files
        entry["documents"] += documents
        entry["bytes"] += nbytes
        if detail:
            details = entry.setdefault("details", {})
            details[detail] = details.get(detail, 0) + documents
        if text is not None:
            example = {"key": key, "where": where, "detail": detail, "chars": len(text), "text": text[:SNIPPET]}
            self._keep_example(self._src(source)["examples"].setdefault(reason, []), example)

    @staticmethod
    def _keep_example(examples: list, example: dict) -> None:
        if len(examples) < EXAMPLES or example["key"] < examples[-1]["key"]:
            examples.append(example)
            examples.sort(key=lambda e: e["key"])
            del examples[EXAMPLES:]

    def count(self, source: str, name: str, n: int = 1) -> None:
        counts = self._src(source)["counts"]
        counts[name] = counts.get(name, 0) + n

    def problem(self, source: str, file: str, reason: str, kind: str) -> None:
        self._src(source)["problems"].append({"file": file, "kind": kind, "reason": reason})

    def hist(self, which: str, source: str, chars: int, n: int = 1) -> None:
        self._src(source)["hist"][which][length_bin(chars)] += n

    # --- combining ------------------------------------------------------------------------------
    def merge(self, other: "Ledger") -> "Ledger":
        for name, theirs in other.sources.items():
            ours = self._src(name)
            for step, v in theirs["steps"].items():
                self.passed(step, name, v["bytes"], v["documents"])
            for reason, v in theirs["removed"].items():
                entry = ours["removed"].setdefault(reason, {"files": 0, "documents": 0, "bytes": 0})
                for k in ("files", "documents", "bytes"):
                    entry[k] += v[k]
                for detail, n in v.get("details", {}).items():
                    entry.setdefault("details", {})[detail] = entry.get("details", {}).get(detail, 0) + n
            for reason, examples in theirs["examples"].items():
                for e in examples:
                    self._keep_example(ours["examples"].setdefault(reason, []), e)
            for k, n in theirs["counts"].items():
                self.count(name, k, n)
            ours["problems"] += theirs["problems"]
            for which, bins in theirs["hist"].items():
                ours["hist"][which] = [a + b for a, b in zip(ours["hist"][which], bins)]
        return self

    @classmethod
    def merged(cls, ledgers: Iterable["Ledger"], order: Iterable[str] = ()) -> "Ledger":
        """One ledger from many, with sources in `order` first (the configured order), problems sorted."""
        total = cls()
        for name in order:
            total._src(name)
        for ledger in ledgers:
            total.merge(ledger)
        for src in total.sources.values():
            src["problems"].sort(key=lambda p: (p["file"], p["reason"]))
            for reason in BASE_REASONS:
                src["removed"].setdefault(reason, {"files": 0, "documents": 0, "bytes": 0})
        return total

    def to_json(self) -> str:
        return json.dumps(self.sources, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Ledger":
        return cls(json.loads(text))
