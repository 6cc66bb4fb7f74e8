"""Deduplication and decontamination.

Near-duplicates: datatrove's MinHash stages compute signatures (stage 1, per task) and find, per LSH band,
the documents whose band signatures are equal (stage 2, one task per band). Two documents with Jaccard
similarity s of their word n-gram sets become candidates with probability 1 - (1 - s^rows)^bands;
`lsh_params` picks bands and rows for data.dedup.threshold the way datasketch does (least weighted
false-positive + false-negative area), unless both are given.

Exact duplicates: the same text after cleaning (its sha256).

`find_duplicates` (one task) joins both into clusters with union-find and keeps, in each cluster, the
document that comes first in the input (source order, file order, order within the file). That choice
depends only on the documents, never on how they were sharded, so the same corpus gives the same
output with 1 task or 1000. datatrove's own clustering step keeps a shard-dependent one; that is why
lathe has this step instead. Its memory is ~40 bytes per document (a 20M-document corpus: under 1 GB).

Decontamination: every word n-gram of the evaluation sets goes into an index of 64-bit hashes, in the
format datatrove's NGramsDecontFilter reads; training documents sharing any n-gram with it are dropped.
(datatrove's own index builder needs lighteval's task registry; lathe reads plain files instead.)
"""

from __future__ import annotations

import json
import re
import struct
import unicodedata
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
from datatrove.utils.text import ngrams, simplify_text

from lathe.config import DataConfig, DecontaminateConfig, DedupConfig, EvalSetConfig
from lathe.errors import LatheError

EXACT, NEAR = 1, 2
REMOVAL_DTYPE = np.dtype([("idx", "<u4"), ("reason", "u1"), ("kept", "<u8")])
KEY_DTYPE = np.dtype([("hash", "<u8"), ("pos", "<u8")])


# --- LSH parameters -----------------------------------------------------------------------------
def candidate_probability(s: float, bands: int, rows: int) -> float:
    return 1 - (1 - s ** rows) ** bands


def lsh_params(cfg: DedupConfig) -> tuple[int, int]:
    """(bands, rows) minimizing the false-positive area below the threshold plus the false-negative area
    above it (equal weights), with bands * rows <= num_perm."""
    if cfg.bands is not None:
        return cfg.bands, cfg.rows
    return _optimal_bands_rows(cfg.threshold, cfg.num_perm)


@lru_cache(maxsize=None)
def _optimal_bands_rows(t: float, num_perm: int) -> tuple[int, int]:
    below, above = np.linspace(0, t, 200), np.linspace(t, 1, 200)
    best, best_error = (1, 1), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - below ** r) ** b, below)
            fn = np.trapezoid((1 - above ** r) ** b, above)
            if fp + fn < best_error:
                best, best_error = (b, r), fp + fn
    return best


def minhash_config(cfg: DedupConfig):
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    bands, rows = lsh_params(cfg)
    return MinhashConfig(n_grams=cfg.ngram, num_buckets=bands, hashes_per_bucket=rows, seed=cfg.seed,
                         hash_config=HashConfig(precision=64, hash_fc="xxhash"))


class MinhashSignatures(MinhashDedupSignature):
    """datatrove's MinHash signature step (stage 1 of its near-dedup), with the very same shingles and
    signatures, made faster and smaller: the Unicode-diacritics pass runs only on text still non-ASCII
    when it comes to it (it is the last normalization and cannot change ASCII), and signatures are taken
    over blocks of shingles. tests/test_data_scale.py checks both against datatrove's."""

    def get_shingles(self, text: str) -> np.ndarray:
        words = self.word_tokenizer.word_tokenize(simplify(text, self.config.norm_config))
        hashes = (self._hash_func(" ".join(g)) for g in ngrams(words, self.config.n_grams))
        return np.fromiter(hashes, dtype=np.uint64).reshape((-1, 1))

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        """datatrove's, over blocks of shingles: the same minima, without (shingles x hashes) temporaries
        of ~50 MB for a 100k-character document."""
        a, b = self.parameters
        mins = np.full(a.shape[1], np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), SHINGLE_BLOCK):
            phv = (shingles[start:start + SHINGLE_BLOCK] * a + b) % _MERSENNE
            if self.config.hash_config.precision == 32:
                phv = np.bitwise_and(phv, self.config.hash_config.max)
            np.minimum(mins, phv.min(axis=0), out=mins)
        mins = mins.astype(self.config.hash_config.np_dtype)
        return [x.tolist() for x in np.split(mins, self.config.num_buckets)]


SHINGLE_BLOCK = 1024
_MERSENNE = np.uint64((1 << 61) - 1)


def simplify(text: str, norm) -> str:
    """datatrove's simplify_text, with its last pass (NFD, then drop combining marks) run only on the runs
    of non-ASCII characters: decomposition and mark reordering never cross an ASCII character."""
    if not norm.norm_unicode_diacritics:
        return simplify_text(text, norm)
    text = simplify_text(text, replace(norm, norm_unicode_diacritics=False))
    return text if text.isascii() else _NON_ASCII.sub(_strip_marks, text).strip()


_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def _strip_marks(m: re.Match) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", m.group()) if unicodedata.category(c) != "Mn")


def signature_step(folder: str, cfg: DedupConfig) -> MinhashSignatures:
    from lathe.data.filters import word_tokenizer

    return MinhashSignatures(folder, minhash_config(cfg), language=word_tokenizer())


# --- clustering ---------------------------------------------------------------------------------
class UnionFind:
    """Over document numbers 0..n-1; each root is the member with the smallest position."""

    def __init__(self, positions: np.ndarray):
        self.pos = positions
        self.parent = np.arange(len(positions), dtype=np.int64)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, int(self.parent[x])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if self.pos[rb] < self.pos[ra]:
                ra, rb = rb, ra
            self.parent[rb] = ra


def _near_pairs(dups_folder, offsets: np.ndarray):
    """(a, b) global document numbers from datatrove's MinHash stage-2 .dups files."""
    from datatrove.utils.binaryio import read_tuples_from_file

    for name in dups_folder.list_files(glob_pattern="*.dups"):
        with dups_folder.open(name, "rb") as f:
            for f1, d1, f2, d2 in read_tuples_from_file(f, "4I", lines_to_buffer=4096):
                yield int(offsets[f1] + d1), int(offsets[f2] + d2)


def find_duplicates(keys: list[np.ndarray], dups_folder=None, exact: bool = True) -> list[np.ndarray]:
    """Per task, the removal records (idx within the task, EXACT or NEAR, position of the kept document).
    `keys[rank]` holds (hash, pos) for each document of task `rank`, in order."""
    counts = np.array([len(k) for k in keys], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    hashes = np.concatenate([k["hash"] for k in keys]) if keys else np.zeros(0, np.uint64)
    positions = np.concatenate([k["pos"] for k in keys]) if keys else np.zeros(0, np.uint64)
    uf = UnionFind(positions)
    if exact and len(hashes):
        order = np.argsort(hashes, kind="stable")
        same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
        for i in same:
            uf.union(int(order[i]), int(order[i + 1]))
    if dups_folder is not None:
        for a, b in _near_pairs(dups_folder, offsets):
            uf.union(a, b)
    removals = []
    for rank in range(len(keys)):
        records = []
        for idx in range(int(counts[rank])):
            g = int(offsets[rank]) + idx
            if uf.parent[g] == g:
                continue
            root = uf.find(g)
            reason = EXACT if hashes[g] == hashes[root] else NEAR
            records.append((idx, reason, int(positions[root])))
        removals.append(np.array(records, dtype=REMOVAL_DTYPE))
    return removals


def text_key(text: str) -> int:
    """The 64-bit exact-dedup key: the first 8 bytes of the text's sha256."""
    import hashlib

    return struct.unpack("<Q", hashlib.sha256(text.encode("utf-8")).digest()[:8])[0]


# --- decontamination ----------------------------------------------------------------------------
def decont_config(cfg: DecontaminateConfig):
    from datatrove.pipeline.decont.n_grams import NGramsDecontConfig
    from datatrove.utils.hashing import HashConfig

    return NGramsDecontConfig(n_grams=cfg.ngram, hash_config=HashConfig(precision=64, hash_fc="xxhash"))


def _eval_texts(entry: EvalSetConfig, data_cfg: DataConfig):
    """The texts of one evaluation set: each listed (or every string) field of each record, or whole files."""
    from lathe.data.readers import FileNotes, SkipFile, json_loads, open_binary, read_file

    path = entry.path
    if path.lower().endswith((".jsonl", ".jsonl.gz")):
        import gzip

        with open_binary(path) as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.lower().endswith(".gz") else raw
            for lineno, line in enumerate(stream, 1):
                if line.strip():
                    try:
                        row = json_loads(line)
                    except ValueError as e:
                        raise LatheError(f"{path}:{lineno}: not valid JSON ({e})") from None
                    yield from _fields(row, entry, f"{path}:{lineno}")
    elif path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        for row in pq.read_table(path).to_pylist():
            yield from _fields(row, entry, path)
    else:
        try:
            for doc in read_file(path, Path(path).stat().st_size, "text", data_cfg, FileNotes()):
                if doc.text:
                    yield doc.text
        except SkipFile as e:
            raise LatheError(f"decontamination set {e.reason}") from None


def _fields(row, entry: EvalSetConfig, where: str):
    if not isinstance(row, dict):
        raise LatheError(f"{where}: expected a JSON object")
    for name in entry.fields or [k for k, v in row.items() if isinstance(v, str)]:
        if name not in row:
            raise LatheError(f"{where}: no '{name}' field (data.decontaminate.sets fields)")
        if isinstance(row[name], str):
            yield row[name]


def eval_set_name(entry: EvalSetConfig) -> str:
    return Path(entry.path).name.replace(" ", "_")


def build_decont_index(cfg: DataConfig, folder) -> dict[str, int]:
    """Write <set>.index.hashes for every evaluation set into `folder`; returns n-grams per set."""
    from datatrove.utils.hashing import create_hash_func
    from datatrove.utils.text import ngrams, simplify_text

    from lathe.data.filters import word_tokenizer

    config = decont_config(cfg.decontaminate)
    hash_fn, tok = create_hash_func(config.hash_config), word_tokenizer()
    sizes = {}
    for raw in cfg.decontaminate.sets:
        entry = EvalSetConfig(path=raw) if isinstance(raw, str) else raw
        if not Path(entry.path).exists() and "://" not in entry.path:
            raise LatheError(f"decontamination set {entry.path} does not exist")
        hashes = set()
        for text in _eval_texts(entry, cfg):
            words = tok.word_tokenize(simplify_text(text, config.norm_config))
            hashes.update(hash_fn(" ".join(g)) for g in ngrams(words, config.n_grams))
        name = eval_set_name(entry)
        with folder.open(f"{name}.index.hashes", "wb") as f:
            f.write(np.array(sorted(hashes), dtype="<u8").tobytes())
        sizes[name] = len(hashes)
    return sizes


def save_json(folder, name: str, obj) -> None:
    with folder.open(name, "w") as f:
        json.dump(obj, f)


def load_json(folder, name: str):
    with folder.open(name, "r") as f:
        return json.load(f)
