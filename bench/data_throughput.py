"""Data pipeline throughput: lathe's datatrove pipeline on 1 and 2 processes beside a plain single-process
Python loop doing the same steps, on a corpus built from ../shared/data/text repeated to --mb megabytes.

The baseline calls the same per-document functions (readers, cleaning, PII, length filter, MinHash
shingles and signatures, split rule) but keeps everything in memory: a set for exact duplicates, a dict
per LSH band, union-find, one sort, one write. So the ratio is the price (or gain) of lathe's
orchestration: shards, intermediate files, five stages, processes, bounded memory. Both must produce
the same train/val/test files; the script checks that.

Copy k of each shared file has the words of every line shuffled with seed k (copy 0 is the original),
so copies are different documents with the same statistics instead of duplicates that dedup would drop.

    python bench/data_throughput.py                  # 200 MB, 1 and 2 processes, baseline
    python bench/data_throughput.py --mb 20 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_TEXT = ROOT.parent / "shared" / "data" / "text"


def build_corpus(out: Path, target_mb: float) -> int:
    """Shuffled copies of every shared text file, until the corpus holds target_mb megabytes."""
    files = sorted(SHARED_TEXT.glob("*/*.txt"))
    total, k = 0, 0
    while total < target_mb * 1e6:
        for path in files:
            lines = path.read_bytes().split(b"\n")
            rng = random.Random(f"{k}/{path.name}")
            if k:
                lines = [b" ".join(rng.sample(w, len(w))) if (w := line.split()) else line for line in lines]
            dest = out / path.parent.name / f"{path.stem}.{k:03d}.txt"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(b"\n".join(lines))
            total += dest.stat().st_size
        k += 1
    return total


# --- the plain baseline -------------------------------------------------------------------------
def baseline(cfg, out: Path) -> None:
    """The same steps, one process, everything in memory."""
    from lathe.data.clean import make_cleaner, text_hash
    from lathe.data.dedup import UnionFind, lsh_params, signature_step, text_key
    from lathe.data.pii import PIIScrubber
    from lathe.data.plan import position
    from lathe.data.readers import FileNotes, read_file
    from lathe.data.sources import resolve_sources
    from lathe.data.splits import SPLITS, copies, split_of

    import numpy as np

    clean, pii = make_cleaner(cfg.clean), PIIScrubber(cfg.pii)
    sig = signature_step(str(out / "unused"), cfg.dedup)
    bands, _ = lsh_params(cfg.dedup)
    docs = []  # (pos, source, text)
    file_idx = 0
    for src in resolve_sources(cfg):
        for ref in src.files:
            for n, raw in enumerate(read_file(ref.path, ref.size, src.text_field, cfg, FileNotes())):
                if raw.text is None:
                    continue
                text = pii.scrub(clean(raw.text))[0]
                if max(cfg.min_chars, 1) <= len(text) <= cfg.max_chars:
                    docs.append((position(file_idx, n), src.label, text))
            file_idx += 1
    uf = UnionFind(np.array([d[0] for d in docs], dtype=np.uint64))
    first_with_key: dict[int, int] = {}
    buckets: list[dict] = [{} for _ in range(bands)]
    for i, (_, _, text) in enumerate(docs):
        key = text_key(text)
        if key in first_with_key:
            uf.union(first_with_key[key], i)
        first_with_key.setdefault(key, i)
        shingles = sig.get_shingles(text)
        if shingles.size:
            for b, band in enumerate(sig.get_signature(shingles)):
                j = buckets[b].setdefault(tuple(band), i)
                if j != i:
                    uf.union(j, i)
    rows = {s: [] for s in SPLITS}
    for i, (_, source, text) in enumerate(docs):
        if uf.find(i) == i:
            h = text_hash(text)
            split = split_of(h, cfg.val_fraction, cfg.test_fraction)
            row = json.dumps({"id": h[:16], "source": source, "text": text}, ensure_ascii=False)
            rows[split] += [(h, row)] * copies(h, 1.0, split)
    out.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        items.sort()
        (out / f"{split}.jsonl").write_text("".join(r + "\n" for _, r in items), encoding="utf-8")


# --- measuring ----------------------------------------------------------------------------------
def run_lathe(cfg, run_dir: Path) -> None:
    from lathe.data import prepare_data
    from lathe.rundir import RunDir

    prepare_data(cfg, RunDir(run_dir))


class Timer:
    """Wall seconds, CPU seconds of this process and its finished children, and the machine's load."""

    def __init__(self, results: dict, name: str):
        self.results, self.name = results, name

    def __enter__(self):
        self.load = os.getloadavg()[0]
        self.wall, self.cpu = time.perf_counter(), _cpu()

    def __exit__(self, *exc):
        self.results[self.name] = {"wall": time.perf_counter() - self.wall, "cpu": _cpu() - self.cpu, "load": self.load}


def _cpu() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=200, help="corpus size in MB (default 200)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    ap.add_argument("--tasks", type=int, default=8, help="shards (the same for every process count)")
    ap.add_argument("--dir", help="work folder (default: a temporary one, removed after)")
    args = ap.parse_args()
    os.environ.setdefault("LATHE_NO_PROGRESS", "1")

    from lathe.config import DataConfig

    root = Path(args.dir or tempfile.mkdtemp(prefix="lathe-bench-"))
    try:
        corpus = root / "corpus"
        t0 = time.perf_counter()
        size = build_corpus(corpus, args.mb)
        print(f"corpus: {size / 1e6:.1f} MB in {sum(1 for _ in corpus.rglob('*.txt'))} files "
              f"({time.perf_counter() - t0:.0f}s to build)")
        sources = [str(corpus / name) for name in ("abc", "state_union", "webtext")]
        results = {}
        with Timer(results, "baseline (1 process, in memory)"):
            baseline(DataConfig(sources=sources), root / "baseline")
        for w in args.workers:
            with Timer(results, f"lathe, {args.tasks} tasks on {w} process{'es' * (w > 1)}"):
                run_lathe(DataConfig(sources=sources, tasks=args.tasks, workers=w), root / f"lathe{w}")
            for split in ("train", "val", "test"):
                same = (root / f"lathe{w}" / "data" / f"{split}.jsonl").read_bytes() == \
                       (root / "baseline" / f"{split}.jsonl").read_bytes()
                if not same:
                    raise SystemExit(f"{split}.jsonl differs between lathe ({w} processes) and the baseline")
        base = results["baseline (1 process, in memory)"]["wall"]
        print(f"{'pipeline':40s} {'wall s':>7s} {'MB/s':>6s} {'vs baseline':>12s} {'CPU s':>7s} "
              f"{'MB/CPU-s':>9s} {'load avg':>9s}")
        for name, r in results.items():
            print(f"{name:40s} {r['wall']:7.1f} {size / 1e6 / r['wall']:6.2f} {base / r['wall']:11.2f}x "
                  f"{r['cpu']:7.1f} {size / 1e6 / r['cpu']:9.2f} {r['load']:9.1f}")
        print(f"outputs identical to the baseline's; {os.cpu_count()} CPU cores on this machine. MB/s is wall-clock; "
              "MB/CPU-s is per second of CPU used (all processes); load avg: the 1-minute load average when the "
              "run started, other programs included (above the core count, processes wait for a core)")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
