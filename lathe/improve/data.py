"""The loop's data: untouched originals, versioned rework rounds, the held-out set, the inbox.

runs/<name>/
  improve.yaml                    the resolved config
  data/orig/seed.jsonl            the seed set, written once and never touched again
  data/orig/inbox-<sha>.jsonl     inbox files (--forever), copied in byte for byte, named by content
  data/orig/manifest.json         sha256 of every original file: checked every round
  data/heldout.jsonl              prompts every model is scored on; never trained on, never proposed
  data/rework/round-N/            samples.jsonl (kept samples of round N) + manifest.json
  tokenizer.json
  models/round-N/checkpoints/     the model trained in round N (round 0: the base model)
  work/round-N/                   the round's candidates, verdicts and evaluation
  state.json, rounds.jsonl        where the loop is; one row per finished round
  inbox/                          drop .jsonl files of {"prompt", "answer"} rows here
  controls/<arm>/                 the comparison arms: their own rework, models, work, state

The training mix is always the originals plus every kept round, never a replacement.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from lathe.errors import LatheError
from lathe.io import atomic_path, iter_jsonl_objects, read_json, read_jsonl, write_json, write_text
from lathe.rundir import RunDir

SEED_FILE = "seed.jsonl"
MANIFEST = "manifest.json"


class ImproveRun(RunDir):
    """A run directory of the improve loop. An arm's directory shares the originals, the held-out
    set, the tokenizer and the base model of its `home` run, and keeps its own rounds."""

    def __init__(self, path: str | Path, home: "ImproveRun | None" = None):
        super().__init__(path)
        self.home = home or self

    config = property(lambda self: self.path / "improve.yaml")
    orig = property(lambda self: self.home.path / "data" / "orig")
    heldout = property(lambda self: self.home.path / "data" / "heldout.jsonl")
    tokenizer = property(lambda self: self.home.path / "tokenizer.json")
    inbox = property(lambda self: self.home.path / "inbox")
    state = property(lambda self: self.path / "state.json")
    rounds = property(lambda self: self.path / "rounds.jsonl")
    rework_root = property(lambda self: self.path / "data" / "rework")

    def rework(self, round_: int) -> Path:
        return self.rework_root / f"round-{round_}"

    def model_dir(self, round_: int) -> Path:
        return (self.home if round_ == 0 else self).path / "models" / f"round-{round_}"

    def work(self, round_: int) -> Path:
        return (self.home if round_ == 0 else self).path / "work" / f"round-{round_}"

    def arm(self, name: str) -> "ImproveRun":
        return ImproveRun(self.path / "controls" / name, home=self)


# --- examples and files ------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_examples(path: Path) -> list[dict]:
    """Rows with string "prompt" and "answer" fields; a bad row is an error naming file and line."""
    rows = []
    for where, row in iter_jsonl_objects(path, "examples file"):
        if not all(isinstance(row.get(f), str) and row.get(f) for f in ("prompt", "answer")):
            raise LatheError(f"{where}: a row needs non-empty string fields 'prompt' and 'answer'")
        rows.append(row)
    return rows


# --- the originals --------------------------------------------------------------------------
def write_originals(run: ImproveRun, seed_rows: list[dict]) -> None:
    """Write the seed set and its manifest once; the manifest is written last and marks completion."""
    write_jsonl(run.orig / SEED_FILE, seed_rows)
    write_json(run.orig / MANIFEST, {"files": {SEED_FILE: {"sha256": sha256_file(run.orig / SEED_FILE), "round": 0}}})


def check_originals(run: ImproveRun) -> dict:
    """Fail if any original file changed, vanished or appeared since it was written."""
    manifest_path = run.require(run.orig / MANIFEST, "improve")
    files = read_json(manifest_path)["files"]
    for name, meta in files.items():
        path = run.orig / name
        if not path.exists():
            raise LatheError(f"{path} is gone: the originals must never be removed")
        if sha256_file(path) != meta["sha256"]:
            raise LatheError(f"{path} changed since it was written (sha256 mismatch): the originals must never be edited")
    extra = sorted(p.name for p in run.orig.iterdir() if p.name != MANIFEST and p.name not in files
                   and not p.name.startswith("."))
    if extra:
        raise LatheError(f"{run.orig}: unexpected files {extra}: put new data in {run.inbox}/ instead")
    return files


def ingest_inbox(run: ImproveRun, round_: int) -> list[str]:
    """Move inbox/*.jsonl into the originals. Each file is validated, copied byte for byte under a
    name made from its content hash, recorded in the manifest, and only then deleted from the inbox:
    a kill at any point leaves it either still in the inbox or already in (never twice)."""
    if not run.inbox.is_dir():
        return []
    manifest = read_json(run.orig / MANIFEST)
    added = []
    for src in sorted(run.inbox.glob("*.jsonl")):
        read_examples(src)  # refuse bad files before they join the originals
        data = src.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        name = f"inbox-{digest[:16]}.jsonl"
        if name not in manifest["files"]:
            with atomic_path(run.orig / name) as tmp:
                tmp.write_bytes(data)
            manifest["files"][name] = {"sha256": digest, "round": round_, "from": src.name}
            write_json(run.orig / MANIFEST, manifest)
            added.append(name)
        src.unlink()
    return added


def load_originals(run: ImproveRun) -> list[dict]:
    files = check_originals(run)
    return [row for name in files for row in read_examples(run.orig / name)]


def load_rework(run: ImproveRun, upto: int) -> list[dict]:
    """Kept samples of rounds 1..upto, in round order."""
    rows = []
    for r in range(1, upto + 1):
        path = run.rework(r) / "samples.jsonl"
        if path.exists():
            rows += read_jsonl(path)
    return rows


def write_round(run: ImproveRun, round_: int, kept: list[dict], manifest: dict) -> None:
    """The round's folder appears whole or not at all: written under a temporary name, then renamed."""
    with atomic_path(run.rework(round_)) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / "samples.jsonl", kept)
        write_json(tmp / MANIFEST, {**manifest, "samples_sha256": sha256_file(tmp / "samples.jsonl")})


# --- token rows and batches ----------------------------------------------------------------------
def encode_example(tok, prompt: str, answer: str | None = None) -> tuple[list[int], int]:
    """[bos] prompt [answer eos] and the prompt's length (with bos). Prompt and answer are encoded
    apart, exactly as the model sees them when it answers a prompt."""
    ids = [tok.bos_id] + tok.encode(prompt)
    n_prompt = len(ids)
    if answer is not None:
        ids += tok.encode(answer) + [tok.eos_id]
    return ids, n_prompt


def pad_rows(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, loss_mask) of (ids, skip) rows: the loss covers the tokens after the first `skip` (the
    answer and the closing eos; with skip 1, the prompt too)."""
    length = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), length), pad_id, dtype=torch.long)
    y = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (ids, n_prompt) in enumerate(rows):
        t = torch.tensor(ids)
        x[i, : len(ids) - 1], y[i, : len(ids) - 1] = t[:-1], t[1:]
        mask[i, n_prompt - 1 : len(ids) - 1] = True
    return x, y, mask


def mix_batches(orig: list, rework: list, batch_size: int, seed: int, rework_share: float | None, pad_id: int):
    """get_batch(i) over the originals plus the rework rows; batch i depends only on (seed, i).

    rework_share None samples every row alike; a number puts that share of each batch's draws on rework."""
    rows = orig + rework
    if not rows:
        raise LatheError("no training data: the originals are empty")
    if rework_share is None or not rework or not orig:
        weights = np.full(len(rows), 1.0 / len(rows))
    else:
        weights = np.concatenate([np.full(len(orig), (1 - rework_share) / len(orig)),
                                  np.full(len(rework), rework_share / len(rework))])

    def get_batch(i: int):
        picks = np.random.default_rng([seed, i]).choice(len(rows), size=batch_size, p=weights)
        return pad_rows([rows[j] for j in picks], pad_id)

    return get_batch
