"""One run directory per run. Every stage reads the previous stage's outputs from here.

runs/<name>/
  recipe.yaml                 the resolved recipe (after overrides)
  data/{train,val,test}.jsonl cleaned documents, one {"text", "source"} per line
  data/manifest.json          per-source counts and what each filter removed
  tokenizer.json              Hugging Face `tokenizers` format
  tokens/{train,val,test}.bin token shards (raw uint16/uint32, documents separated by <|bos|>)
  tokens/meta.json            dtype, token counts, bytes per split
  checkpoints/step-NNNNNN/    model.safetensors, optim.pt, state.json
  checkpoints/latest          name of the newest complete checkpoint
  metrics.jsonl               one row per logged train step / evaluation
  eval.json                   final test-split metrics
  samples.jsonl               generated samples
  report.md, loss.png         the run's report
"""

from __future__ import annotations

import time
from pathlib import Path

from lathe.errors import LatheError
from lathe.io import write_text

RUNS_ROOT = Path("runs")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # --- layout -------------------------------------------------------------------------
    recipe = property(lambda self: self.path / "recipe.yaml")
    data = property(lambda self: self.path / "data")
    manifest = property(lambda self: self.path / "data" / "manifest.json")
    tokenizer = property(lambda self: self.path / "tokenizer.json")
    tokens = property(lambda self: self.path / "tokens")
    checkpoints = property(lambda self: self.path / "checkpoints")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    eval = property(lambda self: self.path / "eval.json")
    samples = property(lambda self: self.path / "samples.jsonl")
    report = property(lambda self: self.path / "report.md")

    def split_file(self, split: str) -> Path:
        return self.data / f"{split}.jsonl"

    def token_file(self, split: str) -> Path:
        return self.tokens / f"{split}.bin"

    def require(self, path: Path, stage: str) -> Path:
        """Fail clearly when a previous stage's output is missing."""
        if not path.exists():
            raise LatheError(f"{path} is missing: run `lathe {stage} --run {self.path}` first")
        return path

    # --- creation -----------------------------------------------------------------------
    @classmethod
    def create(cls, name: str | None = None, root: Path = RUNS_ROOT) -> "RunDir":
        name = name or time.strftime("run-%Y%m%d-%H%M%S")
        run = cls(root / name)
        run.path.mkdir(parents=True, exist_ok=True)
        # `runs/latest` names the newest run, so stage verbs work without --run
        write_text(root / "latest", name + "\n")
        return run

    @classmethod
    def resolve(cls, path: str | Path | None, root: Path = RUNS_ROOT) -> "RunDir":
        """An explicit run path, or the newest run under runs/."""
        if path is None:
            latest = root / "latest"
            if not latest.exists():
                raise LatheError(f"no run given and {latest} does not exist: pass --run DIR")
            path = root / latest.read_text().strip()
        run = cls(path)
        if not run.path.is_dir():
            raise LatheError(f"run directory {run.path} does not exist")
        return run
