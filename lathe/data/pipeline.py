"""The data stage: sources -> clean -> filter (length, exact dedup, byte budget) -> split -> jsonl + manifest.

Files are read round-robin across sources (one file from each in turn), so a `max_total_bytes` budget
samples every source instead of filling up on the first one. Byte counts are UTF-8 bytes of cleaned text,
except for files never decoded (skipped, or not read after the budget), which count their size on disk.

The split of a document depends only on its text: h = sha256(cleaned text), u = int(h[:8], 16) / 2**32;
u < val_fraction -> val, u < val_fraction + test_fraction -> test, else train. The same documents land in
the same splits on any machine, in any order. Rows within a split file are sorted by hash, so the files are
a function of the set of documents. With >= 3 documents no wanted split is left empty: an empty split
takes the smallest-hash document of the largest split (nearly always train).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Iterator

from lathe.config import DataConfig
from lathe.console import info, progress_bar, warn
from lathe.data.clean import clean_text, text_hash
from lathe.data.sources import Source, SkipFile, read_texts, resolve_sources
from lathe.errors import LatheError
from lathe.io import atomic_path, write_json
from lathe.rundir import RunDir

SPLITS = ("train", "val", "test")
FILTERS = ("too_short", "too_long", "duplicate", "binary_or_non_utf8", "unreadable", "over_max_total_bytes")
MAX_LISTED_SKIPS = 20  # skipped file names kept per source in the manifest
MAX_SKIP_WARNINGS = 10  # warnings printed before the rest are only counted


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


def _new_stats(source: Source) -> dict:
    return {
        "spec": source.spec,
        "files": len(source.files),
        "files_read": 0,
        "files_skipped": 0,
        "documents": 0,
        "bytes": 0,
        "skipped_files": [],
        "removed": {f: {"files": 0, "documents": 0, "bytes": 0} for f in FILTERS},
    }


class Collector:
    """Reads the sources, cleans and filters documents, and keeps the counts for the manifest."""

    def __init__(self, cfg: DataConfig, sources: list[Source]):
        self.cfg, self.sources = cfg, sources
        self.stats = {s.label: _new_stats(s) for s in sources}
        self.docs: list[Doc] = []
        self.seen: set[str] = set()
        self.total_bytes = 0
        self.budget_reached = False
        self.skips_warned = 0

    def _remove(self, label: str, reason: str, nbytes: int, files: int = 0, documents: int = 1) -> None:
        entry = self.stats[label]["removed"][reason]
        entry["files"] += files
        entry["documents"] += documents
        entry["bytes"] += nbytes

    def add(self, label: str, raw: str) -> None:
        """Clean one raw text and keep it unless a filter removes it. Sets budget_reached when full."""
        text = clean_text(raw)
        nbytes = len(text.encode("utf-8"))
        h = text_hash(text)
        if len(text) < max(self.cfg.min_chars, 1):  # an empty document is never kept
            return self._remove(label, "too_short", nbytes)
        if len(text) > self.cfg.max_chars:
            return self._remove(label, "too_long", nbytes)
        if h in self.seen:
            return self._remove(label, "duplicate", nbytes)
        budget = self.cfg.max_total_bytes
        if budget is not None and self.total_bytes + nbytes > budget:
            self.budget_reached = True  # this document would overflow the budget: it and all later are left out
            return self._remove(label, "over_max_total_bytes", nbytes)
        self.seen.add(h)
        self.docs.append(Doc(h, label, text))
        self.total_bytes += nbytes
        self.stats[label]["documents"] += 1
        self.stats[label]["bytes"] += nbytes

    def skip(self, label: str, path: Path, err: SkipFile) -> None:
        stats = self.stats[label]
        stats["files_skipped"] += 1
        if len(stats["skipped_files"]) < MAX_LISTED_SKIPS:
            stats["skipped_files"].append({"file": str(path), "reason": err.reason})
        self._remove(label, err.kind, _size(path), files=1, documents=0)
        self.skips_warned += 1
        if self.skips_warned <= MAX_SKIP_WARNINGS:
            warn(f"skipped {err.reason}")
        elif self.skips_warned == MAX_SKIP_WARNINGS + 1:
            warn("more files skipped; the manifest lists them per source")

    def read_file(self, label: str, path: Path) -> None:
        if self.budget_reached:  # not read at all: count the file and its size on disk
            return self._remove(label, "over_max_total_bytes", _size(path), files=1, documents=0)
        try:
            for raw in read_texts(path, self.cfg.text_field):
                self.add(label, raw)
                if self.budget_reached:
                    break  # the rest of a .jsonl file is not read
        except SkipFile as err:
            return self.skip(label, path, err)
        self.stats[label]["files_read"] += 1


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _round_robin(sources: list[Source]) -> Iterator[tuple[str, Path]]:
    """(label, file) taking one file from each source in turn."""
    lanes = [[(s.label, f) for f in s.files] for s in sources]
    for row in zip_longest(*lanes):
        yield from (item for item in row if item is not None)


def collect(cfg: DataConfig, sources: list[Source]) -> Collector:
    col = Collector(cfg, sources)
    with progress_bar() as p:
        task = p.add_task("data", total=sum(len(s.files) for s in sources), status="")
        for label, path in _round_robin(sources):
            col.read_file(label, path)
            p.update(task, advance=1, status=f"{label}: {col.total_bytes / 1e6:.1f} MB kept")
    return col


# --- splitting ----------------------------------------------------------------------------------
def assign_splits(docs: list[Doc], val_fraction: float, test_fraction: float) -> dict[str, list[Doc]]:
    """Split by hash (see the module docstring). Rows in each split are sorted by hash."""
    splits: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    for d in sorted(docs, key=lambda d: d.hash):
        u = d.unit
        splits["val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"].append(d)
    wanted = ["train"] + [s for s, f in (("val", val_fraction), ("test", test_fraction)) if f > 0]
    if len(docs) >= 3:
        for name in wanted:
            if not splits[name]:
                donor = max(SPLITS, key=lambda s: len(splits[s]))  # ties: train first
                splits[name].append(splits[donor].pop(0))  # lists are hash-sorted: pop(0) = smallest hash
    else:
        empty = [s for s in wanted if not splits[s]]
        if empty:
            warn(f"only {len(docs)} document(s): split(s) {', '.join(empty)} are empty")
    return splits


# --- writing ------------------------------------------------------------------------------------
def _write_split(path: Path, docs: list[Doc]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "source": d.source, "text": d.text}, ensure_ascii=False) + "\n")


def _totals(stats: dict) -> dict:
    counts = ("files", "files_read", "files_skipped", "documents", "bytes")
    totals: dict = {k: sum(s[k] for s in stats.values()) for k in counts}
    totals["removed"] = {
        r: {k: sum(s["removed"][r][k] for s in stats.values()) for k in ("files", "documents", "bytes")}
        for r in FILTERS
    }
    return totals


def build_manifest(cfg: DataConfig, col: Collector, splits: dict[str, list[Doc]]) -> dict:
    return {
        "version": 1,
        "config": cfg.model_dump(mode="json"),
        "sources": col.stats,
        "totals": _totals(col.stats),
        "budget_reached": col.budget_reached,
        "splits": {
            name: {
                "documents": len(docs),
                "chars": sum(len(d.text) for d in docs),
                "bytes": sum(len(d.text.encode("utf-8")) for d in docs),
            }
            for name, docs in splits.items()
        },
    }


def _no_documents_error(cfg: DataConfig, col: Collector) -> LatheError:
    removed = _totals(col.stats)["removed"]
    why = ", ".join(f"{r} {v['documents']} documents/{v['files']} files"
                    for r, v in removed.items() if v["documents"] or v["files"])
    return LatheError(
        f"no documents left from data sources {cfg.sources or '(python stdlib)'} "
        f"(removed: {why or 'nothing'}; min_chars={cfg.min_chars}, max_chars={cfg.max_chars}, "
        f"max_total_bytes={cfg.max_total_bytes})"
    )


def prepare_data(cfg: DataConfig, run: RunDir) -> dict:
    """Collect, clean, filter and split documents into run.data/{train,val,test}.jsonl; return the manifest."""
    sources = resolve_sources(cfg.sources, cfg.extensions)
    col = collect(cfg, sources)
    if not col.docs:
        raise _no_documents_error(cfg, col)
    splits = assign_splits(col.docs, cfg.val_fraction, cfg.test_fraction)
    run.manifest.unlink(missing_ok=True)  # the manifest marks a complete data stage: written last
    for name, docs in splits.items():
        _write_split(run.split_file(name), docs)
    manifest = build_manifest(cfg, col, splits)
    write_json(run.manifest, manifest)
    if col.budget_reached:
        info(f"data: stopped at max_total_bytes={cfg.max_total_bytes:,} ({col.total_bytes:,} bytes kept)")
    return manifest


def read_split(run: RunDir, split: str) -> Iterator[dict]:
    """The rows {"id", "source", "text"} of one split, in file order."""
    if split not in SPLITS:
        raise LatheError(f"unknown split '{split}' (one of: {', '.join(SPLITS)})")
    path = run.require(run.split_file(split), "data")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise LatheError(f"{path}:{lineno}: not valid JSON ({e.msg}); rerun `lathe data`") from None
