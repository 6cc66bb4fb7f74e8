"""The plan: which files are read, how much of each, and by which task. Made once, before any task runs.

Budget (data.max_total_bytes): the budget is shared evenly by the sources; a source smaller than its share
gives the rest to the others. Within a source, files are taken in order: whole while they fit; a
multi-document file (.jsonl, .parquet, a long text file that is split) that does not fit is read up to
what is left of the share, which ends that source; a one-document file that does not fit is left out and
the next files are tried. Files left out are counted as over_max_total_bytes with their size on disk.

Tasks: data.tasks, or one per data.shard_mb of selected input (a function of the data, not of the
machine, though the output does not depend on it anyway). Files go to tasks largest first, each to the
least-loaded task, so tasks finish at about the same time.

A document's position is (file index << 32) | (document index within the file): the input order,
which the near-duplicate step uses to decide which copy to keep.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import asdict, dataclass
from typing import Optional

from lathe.config import DataConfig
from lathe.data.ledger import Ledger
from lathe.data.readers import is_multi_document
from lathe.data.sources import Source


@dataclass
class PlannedFile:
    idx: int  # index in the whole plan: the high half of each document's position
    source: int  # index into the plan's sources
    path: str
    size: int
    limit: Optional[int]  # read at most this many input bytes (None: all)
    task: int = 0


def position(file_idx: int, doc_idx: int) -> int:
    return (file_idx << 32) | doc_idx


def file_of(pos: int) -> tuple[int, int]:
    return pos >> 32, pos & 0xFFFFFFFF


def budget_shares(budget: int, sizes: list[int]) -> list[int]:
    """Split `budget` evenly; a source smaller than its share keeps its size and frees the rest (water-filling)."""
    shares = [0] * len(sizes)
    left, remaining = list(range(len(sizes))), budget
    while left:
        each = remaining // len(left)
        small = [i for i in left if sizes[i] <= each]
        if not small:
            for k, i in enumerate(left):  # the few bytes that do not divide go to the first sources
                shares[i] = each + (1 if k < remaining - each * len(left) else 0)
            break
        for i in small:
            shares[i] = sizes[i]
            remaining -= sizes[i]
        left = [i for i in left if i not in small]
    return shares


@dataclass
class Plan:
    sources: list[dict]  # label, spec, weight, text_field, files, size, share, selected_bytes
    files: list[PlannedFile]
    tasks: int
    budget_reached: bool

    def to_lines(self) -> str:
        return "".join(json.dumps(asdict(f)) + "\n" for f in self.files)

    @staticmethod
    def files_from_lines(text: str, task: Optional[int] = None) -> list[PlannedFile]:
        files = [PlannedFile(**json.loads(line)) for line in text.splitlines() if line.strip()]
        return [f for f in files if task is None or f.task == task]


def make_plan(cfg: DataConfig, sources: list[Source], ledger: Ledger) -> Plan:
    """Choose files within the budget and assign them to tasks; files left out are counted in `ledger`."""
    shares = budget_shares(cfg.max_total_bytes, [s.size for s in sources]) if cfg.max_total_bytes else None
    files: list[PlannedFile] = []
    summary = []
    budget_reached = False
    for si, src in enumerate(sources):
        left = shares[si] if shares else None
        selected = 0
        for ref in src.files:
            if left is None or ref.size <= left:
                limit = None
            elif left > 0 and is_multi_document(ref.path, ref.size, cfg):
                limit = left
            else:
                ledger.removed("over_max_total_bytes", src.label, ref.size, files=1, documents=0)
                budget_reached = True
                continue
            take = ref.size if limit is None else limit
            files.append(PlannedFile(len(files), si, ref.path, ref.size, limit))
            selected += take
            if left is not None:
                left -= take
                budget_reached |= limit is not None
        summary.append({"label": src.label, "spec": src.spec, "weight": src.weight, "text_field": src.text_field,
                        "files": len(src.files), "size": src.size, "share": shares[si] if shares else None,
                        "selected_bytes": selected})
    tasks = cfg.tasks or max(1, min(len(files), math.ceil(sum(s["selected_bytes"] for s in summary)
                                                            / (cfg.shard_mb * 1e6))))
    _assign_tasks(files, tasks)
    return Plan(summary, files, tasks, budget_reached)


def _assign_tasks(files: list[PlannedFile], tasks: int) -> None:
    """Largest file first, each to the least-loaded task (ties: the lower task)."""
    load = [(0, t) for t in range(tasks)]
    for f in sorted(files, key=lambda f: (-(f.limit if f.limit is not None else f.size), f.idx)):
        size, t = heapq.heappop(load)
        f.task = t
        heapq.heappush(load, (size + (f.limit if f.limit is not None else f.size), t))
