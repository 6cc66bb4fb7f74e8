"""The split rule and the mixture rule: both are functions of a document's final text alone.

Split: h = sha256(text), u = int(h[:8], 16) / 2**32; u < val_fraction -> val, u < val_fraction +
test_fraction -> test, else train. The same documents land in the same splits on any machine, in any
order, with any number of tasks. Rows within a split file are sorted by hash, so the files are a function
of the set of documents. With >= 3 documents no wanted split is left empty: an empty split takes the
smallest-hash document of the largest split (nearly always train).

Mixture: a source's weight w gives each of its documents floor(w) copies plus one more with probability
frac(w), decided by v = int(h[8:16], 16) / 2**32 < frac(w). Weights below 1 thin a source in every split;
repeats (w > 1) go to train only, since a repeated test document measures nothing new.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


SPLITS = ("train", "val", "test")


@dataclass
class Doc:
    hash: str
    source: str
    text: str

    @property
    def id(self) -> str:
        return self.hash[:16]

    @property
    def unit(self) -> float:
        """A stable number in [0, 1) from the hash: the split coordinate."""
        return int(self.hash[:8], 16) / 2**32


def split_of(h: str, val_fraction: float, test_fraction: float) -> str:
    u = int(h[:8], 16) / 2**32
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def copies(h: str, weight: float, split: str) -> int:
    """How many times a document of a source with this weight is written to this split."""
    whole, frac = math.floor(weight), weight - math.floor(weight)
    extra = 1 if int(h[8:16], 16) / 2**32 < frac else 0
    n = whole + extra
    return n if split == "train" else min(n, 1)


def wanted_splits(val_fraction: float, test_fraction: float) -> list[str]:
    return ["train"] + [s for s, f in (("val", val_fraction), ("test", test_fraction)) if f > 0]


def donations(counts: dict[str, int], val_fraction: float, test_fraction: float) -> list[tuple[str, str]]:
    """(donor, receiver) moves that leave no wanted split empty, in order; each move hands over the
    donor's smallest-hash remaining document. Needs >= 3 documents, else no moves."""
    counts = dict(counts)
    moves = []
    if sum(counts.values()) >= 3:
        for name in wanted_splits(val_fraction, test_fraction):
            if not counts[name]:
                donor = max(SPLITS, key=lambda s: counts[s])  # ties: train first
                moves.append((donor, name))
                counts[donor] -= 1
                counts[name] += 1
    return moves


def assign_splits(docs: list[Doc], val_fraction: float, test_fraction: float) -> dict[str, list[Doc]]:
    """The split rule over documents in memory (the pipeline applies the same rule streaming)."""
    splits: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    for d in sorted(docs, key=lambda d: d.hash):
        splits[split_of(d.hash, val_fraction, test_fraction)].append(d)
    for donor, receiver in donations({s: len(v) for s, v in splits.items()}, val_fraction, test_fraction):
        splits[receiver].append(splits[donor].pop(0))  # lists are hash-sorted: pop(0) = smallest hash
    return splits
