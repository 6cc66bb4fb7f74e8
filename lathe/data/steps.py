"""lathe's datatrove PipelineSteps. Documents carry metadata {"source": label, "pos": position}.

Each stage's steps share one Ledger (see ledger.py); the stage's last lathe step saves it to
work/stats/<stage>/<rank>.json. Steps only read and write through the work DataFolder (a local folder, or
s3://... on a cluster), so the same objects run under the local, Slurm and Ray executors.

Stage "prepare" (one task per shard):  ReadSources -> Clean -> ScrubPII -> LengthFilter -> Filter(s)
                                         -> WriteShard -> datatrove MinhashDedupSignature
Stage "buckets" (one task per band):    datatrove MinhashDedupBuckets
Stage "clusters" (one task):            FindDuplicates
Stage "finalize" (one task per shard):  ReadShard -> RemoveBoilerplate -> WriteSplits
Stage "merge" (one task):               MergeSplits (data/*.jsonl, manifest, card)
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
from typing import Optional

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import get_filter_result

from lathe.config import DataConfig
from lathe.data.boilerplate import EdgeCounter, LineRemover, edge_lines
from lathe.data.clean import clean_text, make_cleaner, text_hash
from lathe.data.dedup import EXACT, KEY_DTYPE, NEAR, find_duplicates, text_key
from lathe.data.ledger import Ledger
from lathe.data.pii import PIIScrubber
from lathe.data.plan import Plan, position
from lathe.data.readers import FileNotes, SkipFile, json_loads, read_file
from lathe.data.splits import SPLITS, copies, split_of


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def example_key(text: str) -> str:
    """Orders removed documents so the examples shown are the same however the corpus was sharded."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


class LatheStep(PipelineStep):
    type = "🔧 - LATHE"

    def __init__(self, work: str, ledger: Optional[Ledger] = None):
        super().__init__()
        self.work = get_datafolder(work)
        self.ledger = ledger if ledger is not None else Ledger()

    def save_ledger(self, stage: str, rank: int) -> None:
        with self.work.open(f"stats/{stage}/{rank:05d}.json", "w") as f:
            f.write(self.ledger.to_json())

    def remove(self, reason: str, doc: Document, detail: str = "", kept: Optional[int] = None) -> None:
        where = {"pos": doc.metadata["pos"]} | ({"kept": kept} if kept is not None else {})
        self.ledger.removed(reason, doc.metadata["source"], nbytes(doc.text), detail=detail, text=doc.text,
                            key=example_key(doc.text), where=json.dumps(where))


# --- stage "prepare" ----------------------------------------------------------------------------
class ReadSources(LatheStep):
    name = "📖 read sources"

    def __init__(self, work: str, cfg: DataConfig, ledger: Ledger):
        super().__init__(work, ledger)
        self.cfg = cfg

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.work.open("plan.jsonl", "r") as f:
            files = Plan.files_from_lines(f.read(), task=rank)
        with self.work.open("sources.json", "r") as f:
            sources = json.load(f)
        for entry in files:
            src = sources[entry.source]
            yield from self._read(entry, src["label"], src["text_field"])

    def _read(self, entry, label: str, text_field: str) -> DocumentsPipeline:
        notes, n = FileNotes(), 0
        try:
            for raw in read_file(entry.path, entry.size, text_field, self.cfg, notes, entry.limit):
                pos = position(entry.idx, n)
                n += 1
                if raw.text is None:
                    self.ledger.removed(raw.removed, label, raw.nbytes, where=json.dumps({"pos": pos}))
                    continue
                self.ledger.passed("read", label, raw.nbytes)
                self.ledger.hist("input", label, len(raw.text))
                yield Document(raw.text, id=str(pos), metadata={"source": label, "pos": pos})
        except SkipFile as e:
            reason = e.reason + (f" (after {n} documents)" if n else "")
            self.ledger.count(label, "files_skipped")
            self.ledger.problem(label, entry.path, reason, e.kind)
            self.ledger.removed(e.kind, label, entry.size, files=1, documents=0)
            return
        self.ledger.count(label, "files_read")
        self._record_notes(label, entry, notes)

    def _record_notes(self, label: str, entry, notes: FileNotes) -> None:
        led = self.ledger
        for name, value in [("bytes_repaired", notes.repaired_bytes), ("bytes_replaced", notes.replaced_bytes)]:
            if value:
                led.count(label, name, value)
                led.count(label, "files_" + name.split("_")[1])
        for size in notes.overlong:
            led.removed("too_long", label, size)  # a line longer than max_chars: never held in memory
        if notes.bad_records:
            led.removed("bad_record", label, 0, documents=notes.bad_records)
            for reason in notes.bad_reasons:
                led.problem(label, entry.path, reason, "bad_record")
        if notes.broken:
            led.count(label, "files_cut_short")
            led.problem(label, entry.path, notes.broken, "cut_short")
        if notes.stopped_at_budget:
            led.removed("over_max_total_bytes", label, max(entry.size - notes.bytes_read, 0), documents=0)
        if notes.pieces > 1:
            led.count(label, "files_split")
            led.count(label, "documents_from_split_files", notes.pieces)


class Clean(LatheStep):
    name = "🧽 clean"

    def __init__(self, work: str, cfg: DataConfig, ledger: Ledger):
        super().__init__(work, ledger)
        self.clean = make_cleaner(cfg.clean)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            cleaned = self.clean(doc.text)
            if cleaned != doc.text:
                self.ledger.count(doc.metadata["source"], "documents_changed_by_cleaning")
                doc.text = cleaned
            self.ledger.passed("clean", doc.metadata["source"], nbytes(doc.text))
            yield doc


class ScrubPII(LatheStep):
    name = "🕵 PII"

    def __init__(self, work: str, cfg: DataConfig, ledger: Ledger):
        super().__init__(work, ledger)
        self.scrubber = PIIScrubber(cfg.pii)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            src = doc.metadata["source"]
            doc.text, counts = self.scrubber.scrub(doc.text)
            for kind, n in counts.items():
                self.ledger.count(src, f"pii_{kind}", n)
            self.ledger.passed("pii", src, nbytes(doc.text))
            yield doc


class LengthFilter(LatheStep):
    """min_chars <= len(text) <= max_chars; an empty document is never kept."""
    name = "📏 length"

    def __init__(self, work: str, cfg: DataConfig, ledger: Ledger, step: str = "length",
                 short_reason: str = "too_short"):
        super().__init__(work, ledger)
        self.min_chars, self.max_chars = max(cfg.min_chars, 1), cfg.max_chars
        self.step, self.short_reason = step, short_reason

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            if len(doc.text) < self.min_chars:
                self.remove(self.short_reason, doc)
            elif len(doc.text) > self.max_chars:
                self.remove("too_long", doc)
            else:
                self.ledger.passed(self.step, doc.metadata["source"], nbytes(doc.text))
                yield doc


class Filter(LatheStep):
    """Runs a datatrove filter (Gopher, C4, FineWeb, language, decontamination) and counts what it removes."""

    def __init__(self, work: str, label: str, inner, ledger: Ledger, detail_key: str = ""):
        super().__init__(work, ledger)
        self.label, self.inner, self.detail_key = label, inner, detail_key
        self.name = f"🔻 {label}"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            before = doc.text  # C4 edits the text of the documents it keeps
            keep, reason = get_filter_result(self.inner.filter(doc))
            if keep:
                self.ledger.passed(self.label, doc.metadata["source"], nbytes(doc.text))
                yield doc
            else:
                doc.text = before
                self.remove(self.label, doc, detail=doc.metadata.get(self.detail_key) or reason or "")


class WriteShard(LatheStep):
    """Writes this task's documents to work/docs, their exact-dedup keys to work/keys, and boilerplate
    candidates to work/edges; passes the documents on (to MinHash signatures)."""
    name = "💾 write shard"

    def __init__(self, work: str, cfg: DataConfig, ledger: Ledger):
        super().__init__(work, ledger)
        self.cfg = cfg

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        bp = self.cfg.boilerplate
        keys, edges = [], {}
        with self.work.open(f"docs/{rank:05d}.jsonl", "w", encoding="utf-8") as out:
            for doc in data:
                src, pos = doc.metadata["source"], doc.metadata["pos"]
                out.write(json.dumps({"text": doc.text, "source": src, "pos": pos}, ensure_ascii=False) + "\n")
                keys.append((text_key(doc.text), pos))
                if bp.enabled:
                    edges.setdefault(src, EdgeCounter()).add(edge_lines(doc.text, bp.edge_lines, bp.min_line_chars))
                yield doc
        with self.work.open(f"keys/{rank:05d}.npy", "wb") as f:
            np.save(f, np.array(keys, dtype=KEY_DTYPE))
        with self.work.open(f"edges/{rank:05d}.json", "w") as f:
            json.dump({src: c.to_dict() for src, c in edges.items()}, f)
        self.save_ledger("prepare", rank)


# --- stage "clusters" ---------------------------------------------------------------------------
class FindDuplicates(LatheStep):
    """One task: exact + near-duplicate clusters -> work/dedup/<rank>.npy; boilerplate lines -> boilerplate.json."""
    name = "🫂 find duplicates"

    def __init__(self, work: str, cfg: DataConfig, shards: int, near: bool):
        super().__init__(work)
        self.cfg, self.shards, self.near = cfg, shards, near

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        keys = []
        for r in range(self.shards):
            with self.work.open(f"keys/{r:05d}.npy", "rb") as f:
                keys.append(np.load(io.BytesIO(f.read())))
        dups = get_datafolder(self.work.resolve_paths("minhash/dups")) if self.near else None
        for r, records in enumerate(find_duplicates(keys, dups, exact=self.cfg.dedup.exact)):
            with self.work.open(f"dedup/{r:05d}.npy", "wb") as f:
                np.save(f, records)
        self._boilerplate()
        return iter(())

    def _boilerplate(self) -> None:
        counters: dict[str, EdgeCounter] = {}
        for r in range(self.shards):
            with self.work.open(f"edges/{r:05d}.json", "r") as f:
                for src, d in json.load(f).items():
                    counters.setdefault(src, EdgeCounter()).merge(EdgeCounter.from_dict(d))
        found = {src: c.boilerplate(self.cfg.boilerplate) for src, c in sorted(counters.items())}
        with self.work.open("boilerplate.json", "w") as f:
            json.dump(found, f, ensure_ascii=False, indent=1)


# --- stage "finalize" ---------------------------------------------------------------------------
class ReadShard(LatheStep):
    """Reads back this task's documents, dropping the duplicates FindDuplicates chose."""
    name = "📖 read shard"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.work.open(f"dedup/{rank:05d}.npy", "rb") as f:
            removals = {int(r["idx"]): (int(r["reason"]), int(r["kept"])) for r in np.load(io.BytesIO(f.read()))}
        with self.work.open(f"docs/{rank:05d}.jsonl", "r", encoding="utf-8") as f:
            for idx, line in enumerate(f):
                row = json_loads(line)
                doc = Document(row["text"], id=str(row["pos"]), metadata={"source": row["source"], "pos": row["pos"]})
                reason, kept = removals.get(idx, (0, 0))
                if reason == EXACT:
                    self.remove("duplicate", doc, kept=kept)
                    continue
                self.ledger.passed("exact_dedup", row["source"], nbytes(doc.text))
                if reason == NEAR:
                    self.remove("near_duplicate", doc, kept=kept)
                    continue
                self.ledger.passed("near_dedup", row["source"], nbytes(doc.text))
                yield doc


class RemoveBoilerplate(LatheStep):
    name = "✂️ boilerplate"

    def __init__(self, work: str, cfg: DataConfig, ledger: Ledger):
        super().__init__(work, ledger)
        self.cfg = cfg

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.work.open("boilerplate.json", "r") as f:
            lines = json.load(f)
        removers: dict[str, LineRemover] = {}
        for doc in data:
            src = doc.metadata["source"]
            if src not in removers:
                removers[src] = LineRemover(lines.get(src, []), self.cfg.boilerplate.patterns)
            if removers[src]:
                text, n = removers[src].remove(doc.text)
                if n:
                    self.ledger.count(src, "boilerplate_lines_removed", n)
                    self.ledger.count(src, "documents_with_boilerplate")
                    doc.text = clean_text(text, normalization="none")  # re-collapse the blank lines left behind
            yield doc


class WriteSplits(LatheStep):
    """Applies the mixture weights and the split rule; writes work/splits/<split>/<rank>.tsv sorted by hash,
    each line '<sha256>\\t<chars>\\t<bytes>\\t<json row>', so the merge never parses JSON."""
    name = "🗂 write splits"

    def __init__(self, work: str, cfg: DataConfig, ledger: Ledger, weights: dict[str, float]):
        super().__init__(work, ledger)
        self.cfg, self.weights = cfg, weights

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        spill = {s: self.work.open(f"splits/{s}/{rank:05d}.unsorted", "wb") for s in SPLITS}
        index: dict[str, list[tuple[str, int, int]]] = {s: [] for s in SPLITS}  # (hash, offset, length)
        offsets = dict.fromkeys(SPLITS, 0)
        for doc in data:
            src, text = doc.metadata["source"], doc.text
            h = text_hash(text)
            split = split_of(h, self.cfg.val_fraction, self.cfg.test_fraction)
            n = copies(h, self.weights.get(src, 1.0), split)
            size = nbytes(text)
            if n == 0:
                self.remove("mixture_downsampled", doc)
                continue
            self.ledger.passed("final", src, size)
            self.ledger.passed("mixture", src, size * n, documents=n)
            self.ledger.passed(f"split_{split}", src, size * n, documents=n)
            self.ledger.hist("output", src, len(text), n)
            row = json.dumps({"id": h[:16], "source": src, "text": text}, ensure_ascii=False)
            line = f"{h}\t{len(text)}\t{size}\t{row}\n".encode("utf-8")
            for _ in range(n):
                spill[split].write(line)
                index[split].append((h, offsets[split], len(line)))
                offsets[split] += len(line)
        for split in SPLITS:
            spill[split].close()
            self._sort(split, rank, index[split])
        self.save_ledger("finalize", rank)
        return iter(())

    def _sort(self, split: str, rank: int, index: list[tuple[str, int, int]]) -> None:
        """Rewrite the spilled rows in hash order, holding only (hash, offset, length) per row in memory."""
        index.sort()
        name = f"splits/{split}/{rank:05d}"
        with self.work.open(f"{name}.unsorted", "rb") as src, self.work.open(f"{name}.tsv", "wb") as out:
            for _, offset, length in index:
                src.seek(offset)
                out.write(src.read(length))
        self.work.rm(f"{name}.unsorted")


# --- stage "merge" ------------------------------------------------------------------------------
def merged_rows(work, split: str, shards: int):
    """(hash, '<chars>\\t<bytes>\\t<json row>') of one split, merged across tasks in hash order."""
    files = [work.open(f"splits/{split}/{r:05d}.tsv", "r", encoding="utf-8") for r in range(shards)]
    try:
        def rows(f):
            for line in f:
                h, row = line.rstrip("\n").split("\t", 1)
                yield h, row
        yield from heapq.merge(*(rows(f) for f in files))
    finally:
        for f in files:
            f.close()


class MergeSplits(LatheStep):
    """One task: merges the per-task split files into run/data/*.jsonl, then writes the manifest and card."""
    name = "🧩 merge splits"

    def __init__(self, work: str, cfg: DataConfig, run_path: str, shards: int):
        super().__init__(work)
        self.cfg, self.run_path, self.shards = cfg, run_path, shards

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from lathe.data.card import finish

        finish(self.work, self.cfg, self.run_path, self.shards)
        return iter(())
