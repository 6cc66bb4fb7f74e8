"""Classification fine-tuning: a linear head on a pretrained lathe GPT, trained on (text, label) pairs.

    report = run_classify(base="runs/base", data=["../shared/data/classify"], out="runs/polarity")

Pooling (`pooling=`): "last" feeds the head the final-norm hidden state of each text's last real
token: under causal attention it is the only position that has seen the whole text. "mean" averages
the hidden states of all real tokens (each has seen the text up to itself), which gives a small model
a bag-of-features view that is easier to train. Pads come after the real tokens (right padding), so
causal attention never lets a real token see one and no attention mask is needed. Texts are encoded
as <|bos|> + tokens (as documents are in pretraining) and cut to block_size tokens from the start.

Data: .jsonl rows {"text", "label"}, .csv/.tsv files with a header naming `text` and `label`, or a
folder holding the sentence-polarity files rt-polarity.pos / rt-polarity.neg (latin-1, one sentence
a line). Examples are split into train/val/test by a hash of the text (10% val, 10% test), so the
split is the same on every machine and a repeated sentence never straddles two splits.

The test split is scored with accuracy, per-class and macro precision / recall / F1 and a confusion
matrix, beside a bag-of-words logistic regression (scikit-learn) trained on the same train split.
The checkpoint stores the backbone and the head (keys gpt.* and head.*); its state.json records the
labels, and `load_classifier(out)` rebuilds the model.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lathe.config import ModelConfig, TrainConfig
from lathe.console import info, warn
from lathe.errors import LatheError
from lathe.eval.metrics import classification_report, confusion_matrix
from lathe.finetune.sft import (apply_lora_if, hash_unit, load_base_model, markdown_table, output_dir,
                                prepare_output, save_lora_outputs, stage_options, write_stage_report)
from lathe.model import GPT
from lathe.rundir import RunDir
from lathe.train.checkpoint import load_state, load_weights, resolve_checkpoint, save_checkpoint
from lathe.train.loop import train

POLARITY_FILES = {"pos": "rt-polarity.pos", "neg": "rt-polarity.neg"}
VAL_FRACTION, TEST_FRACTION = 0.1, 0.1
CLASSIFY_DEFAULTS = {"max_steps": 400, "lr": 5e-4, "warmup_steps": 20, "batch_size": 32, "eval_every": 50,
                     "checkpoint_every": 50, "log_every": 10, "weight_decay": 0.1}


# --- the model --------------------------------------------------------------------------------
POOLINGS = ("last", "mean")


class Classifier(nn.Module):
    """A lathe GPT plus a linear head on pooled hidden states (see the module docstring)."""

    def __init__(self, gpt: GPT, labels: list[str], pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise LatheError(f"pooling '{pooling}': one of {', '.join(POOLINGS)}")
        self.gpt = gpt
        self.labels = list(labels)
        self.pooling = pooling
        self.head = nn.Linear(gpt.cfg.n_embd, len(labels))
        nn.init.zeros_(self.head.weight)  # start from uniform predictions; the backbone is already trained
        nn.init.zeros_(self.head.bias)
        if not gpt.cfg.tie_embeddings:  # an untied LM head is unused here: freeze it (DDP needs every
            gpt.lm_head.weight.requires_grad_(False)  # trainable parameter to get a gradient)

    @property
    def cfg(self) -> ModelConfig:  # checkpoints record the backbone's config
        return self.gpt.cfg

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """idx (B, T) right-padded, lengths (B,) real tokens per row -> logits (B, n_labels)."""
        h = self.gpt.hidden_states(idx)
        if self.pooling == "last":
            return self.head(h[torch.arange(idx.size(0), device=idx.device), lengths - 1])
        real = (torch.arange(idx.size(1), device=idx.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        return self.head((h * real).sum(1) / lengths[:, None])


def load_classifier(path: str | Path, device: str = "cpu") -> Classifier:
    """A classifier saved by `run_classify` (a run dir, checkpoints dir or checkpoint dir)."""
    ckpt = resolve_checkpoint(path)
    state = load_state(ckpt)
    if "labels" not in state or "pooling" not in state:
        raise LatheError(f"{ckpt}: not a classifier checkpoint (no labels or pooling in state.json)")
    model = Classifier(GPT(ModelConfig.model_validate(state["model"])), state["labels"], state["pooling"])
    load_weights(model, ckpt)
    return model.to(device)


# --- data -------------------------------------------------------------------------------------
def read_polarity(folder: str | Path) -> list[tuple[str, str]]:
    """The Pang & Lee sentence-polarity files: (sentence, 'pos' | 'neg'), in file order."""
    folder = Path(folder)
    examples = []
    for label, name in POLARITY_FILES.items():
        path = folder / name
        if not path.is_file():
            raise LatheError(f"{path} is missing (a polarity folder holds {' and '.join(POLARITY_FILES.values())})")
        # latin-1: the files are not UTF-8 (a few accented names), and latin-1 decodes any byte
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.strip():
                examples.append((line.strip(), label))
    return examples


def _label_of(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise LatheError(f"{where}: 'label' must be a non-empty string or an integer, got {value!r}")
    return str(value).strip()


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LatheError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "label" not in row:
                raise LatheError(f"{where}: expected an object with a string 'text' and a 'label'")
            examples.append((row["text"], _label_of(row["label"], where)))
    return examples


def _read_table(path: Path) -> list[tuple[str, str]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = {"text", "label"} - set(reader.fieldnames or [])
        if missing:
            raise LatheError(f"{path}:1: the header must name 'text' and 'label' columns (missing {sorted(missing)})")
        examples = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if row["text"] is None or row["label"] is None:
                raise LatheError(f"{where}: fewer columns than the header")
            examples.append((row["text"], _label_of(row["label"], where)))
    return examples


def read_labeled(path: str | Path) -> list[tuple[str, str]]:
    """(text, label) pairs from a .jsonl / .csv / .tsv file or a polarity folder."""
    path = Path(path)
    if path.is_dir():
        return read_polarity(path)
    if not path.is_file():
        raise LatheError(f"classification data {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return _read_table(path)
    raise LatheError(f"{path}: unsupported file type (use .jsonl, .csv, .tsv or a polarity folder)")


def split_labeled(examples: list[tuple[str, str]], val_fraction: float = VAL_FRACTION,
                  test_fraction: float = TEST_FRACTION) -> dict[str, list[tuple[str, str]]]:
    """Deterministic train/val/test split by a hash of the text (the data stage's rule)."""
    splits = {"train": [], "val": [], "test": []}
    for text, label in examples:
        u = hash_unit(text)
        split = "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"
        splits[split].append((text, label))
    for name in ("val", "test"):
        if not splits[name]:
            raise LatheError(f"only {len(examples)} examples: the {name} split is empty; add more data")
    return splits


class EncodedSplit:
    """Token ids (<|bos|> + text, cut to max_len) and label indices of one split."""

    def __init__(self, tok, examples: list[tuple[str, str]], labels: list[str], max_len: int):
        index = {label: i for i, label in enumerate(labels)}
        encoded = tok.encode_batch([text for text, _ in examples])
        self.truncated = sum(len(ids) + 1 > max_len for ids in encoded)
        self.ids = [np.asarray([tok.bos_id, *ids][:max_len], dtype=np.int64) for ids in encoded]
        self.labels = np.asarray([index[label] for _, label in examples], dtype=np.int64)
        self.pad_id = tok.pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, picks: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (B, T) right-padded with <|pad|>, lengths (B,), labels (B,))."""
        picks = list(picks)
        lengths = [len(self.ids[k]) for k in picks]
        ids = np.full((len(picks), max(lengths)), self.pad_id, dtype=np.int64)
        for row, k in enumerate(picks):
            ids[row, : lengths[row]] = self.ids[k]
        return torch.from_numpy(ids), torch.tensor(lengths), torch.from_numpy(self.labels[picks])


def classify_batches(split: EncodedSplit, batch_size: int, seed: int):
    """get_batch(i) -> (ids, lengths, labels): a pure function of (seed, i)."""

    def get_batch(i: int):
        return split.batch(np.random.default_rng([seed, i]).integers(0, len(split), size=batch_size))

    return get_batch


def classify_loss(model, batch) -> torch.Tensor:
    ids, lengths, labels = batch
    return F.cross_entropy(model(ids, lengths).float(), labels)


@torch.no_grad()
def predict(model, split: EncodedSplit, batch_size: int = 64) -> tuple[np.ndarray, float]:
    """Predicted label indices for the whole split and the mean cross-entropy."""
    device = next(model.parameters()).device
    order = np.argsort([len(ids) for ids in split.ids], kind="stable")  # similar lengths: little padding
    preds = np.zeros(len(split), dtype=np.int64)
    nll = 0.0
    for start in range(0, len(split), batch_size):
        picks = order[start : start + batch_size]
        ids, lengths, labels = split.batch(picks)
        logits = model(ids.to(device), lengths.to(device)).float()
        nll += F.cross_entropy(logits, labels.to(device), reduction="sum").item()
        preds[picks] = logits.argmax(-1).cpu().numpy()
    return preds, nll / max(1, len(split))


# --- the baseline -----------------------------------------------------------------------------
def bag_of_words_baseline(train: list[tuple[str, str]], val: list[tuple[str, str]],
                          test: list[tuple[str, str]]) -> dict:
    """Logistic regression on word counts; the regularisation strength C is picked on val."""
    try:
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        warn("scikit-learn is not installed: no bag-of-words baseline (pip install scikit-learn)")
        return {}
    vectorizer = CountVectorizer(token_pattern=r"(?u)\b\w+\b|[^\w\s]")  # words and punctuation marks
    x_train = vectorizer.fit_transform([t for t, _ in train])
    y_train = [label for _, label in train]
    best = None
    for c in (0.1, 0.3, 1.0, 3.0):
        model = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train)
        val_acc = float(np.mean(model.predict(vectorizer.transform([t for t, _ in val])) == [lb for _, lb in val]))
        if best is None or val_acc > best[0]:
            best = (val_acc, c, model)
    val_acc, c, model = best
    predictions = list(model.predict(vectorizer.transform([t for t, _ in test])))
    return {"C": c, "val_accuracy": val_acc, "predictions": predictions}


# --- the stage --------------------------------------------------------------------------------
def train_classifier(model: Classifier, splits: dict[str, EncodedSplit], cfg: TrainConfig, out: Path,
                     resume: bool = False):
    """Fine-tune with the shared loop; afterwards the model holds the weights of the best val loss."""

    def evaluate(m) -> dict:
        preds, loss = predict(m, splits["val"])
        return {"val_loss": loss, "val_accuracy": float(np.mean(preds == splits["val"].labels))}

    result = train(model, cfg, classify_batches(splits["train"], cfg.batch_size, cfg.seed), evaluate, out,
                   resume=resume, loss_fn=classify_loss, stage="classify",
                   extra_state={"labels": model.labels, "pooling": model.pooling})
    best = load_state(resolve_checkpoint(out)).get("best_checkpoint")
    if best and (out / "checkpoints" / best).exists():
        load_weights(model, out / "checkpoints" / best)  # selected on val, so the test split stays unseen
    return result, best


def run_classify(base: str | Path, data: list[str | Path], out: str | Path | None = None, name: str | None = None,
                 overrides: Iterable[str] = (), resume: bool = False, lora: bool = False,
                 lora_rank: int = 8, baseline: bool = True, pooling: str = "mean") -> dict:
    """`lathe finetune classify`: writes <out>/classify_report.{md,json} and returns the summary."""
    from lathe.tokenizer import Tokenizer

    base_run = RunDir.resolve(base)
    out = output_dir(out, name, f"{base_run.path.name}-classify")
    tok = Tokenizer.from_file(base_run.require(base_run.tokenizer, "tokenizer"))
    cfg, model_overrides = stage_options(base_run, CLASSIFY_DEFAULTS, overrides)
    examples = [ex for path in data for ex in read_labeled(path)]
    labels = sorted({label for _, label in examples})
    if len(labels) < 2:
        raise LatheError(f"classification needs at least 2 labels, found {labels} in {[str(p) for p in data]}")
    raw = split_labeled(examples)
    prepare_output(out, base_run.tokenizer)

    gpt = load_base_model(base_run.path, model_overrides)
    encoded = {split: EncodedSplit(tok, rows, labels, gpt.cfg.block_size) for split, rows in raw.items()}
    info("classify: " + ", ".join(f"{n} {len(s)}" for n, s in encoded.items()) + f" examples, labels {labels}")
    torch.manual_seed(cfg.seed)
    model = Classifier(gpt, labels, pooling)
    if lora:
        model.gpt = apply_lora_if(model.gpt, lora, lora_rank)  # the head stays fully trainable
    result, best = train_classifier(model, encoded, cfg, out, resume)
    if lora:  # <out>/merged: a plain classifier checkpoint that load_classifier reads
        model.gpt = save_lora_outputs(model.gpt, out)
        save_checkpoint(out / "merged", result.step, model, None, {"labels": labels, "pooling": pooling})

    preds, test_loss = predict(model, encoded["test"])
    y_true = [labels[i] for i in encoded["test"].labels]
    y_pred = [labels[i] for i in preds]
    summary = {"base": str(base_run.path), "data": [str(p) for p in data], "labels": labels,
               "counts": {n: len(s) for n, s in encoded.items()},
               "truncated": {n: s.truncated for n, s in encoded.items()},
               "pooling": pooling, "steps": result.step, "stopped": result.stopped, "best_checkpoint": best,
               "test_loss": test_loss, "lathe": scores(y_true, y_pred, labels), "lora": lora}
    if baseline:
        bow = bag_of_words_baseline(raw["train"], raw["val"], raw["test"])
        if bow:
            summary["baseline"] = {"C": bow["C"], **scores(y_true, bow["predictions"], labels)}
    _classify_report(out, summary)
    return summary


def scores(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    report = classification_report(y_true, y_pred, labels)
    matrix, _ = confusion_matrix(y_true, y_pred, labels)
    return {"accuracy": report["accuracy"], "macro": report["macro"], "per_class": report["per_class"],
            "confusion_matrix": matrix}


def _classify_report(out: Path, s: dict) -> None:
    systems = [("lathe fine-tuned", s["lathe"])] + ([("bag-of-words logistic regression", s["baseline"])]
                                                   if "baseline" in s else [])
    header = ["model", "accuracy", "macro precision", "macro recall", "macro F1"]
    table = [[n, r["accuracy"], r["macro"]["precision"], r["macro"]["recall"], r["macro"]["f1"]] for n, r in systems]
    sections = [f"Test split: {s['counts']['test']} examples (train {s['counts']['train']}, val {s['counts']['val']}); "
                f"{s['steps']} steps ({s['stopped']}), weights of the best val loss ({s['best_checkpoint']}), "
                f"{s['pooling']} pooling.", "",
                "## Test scores", "", *markdown_table(header, table)]
    for name, r in systems:
        sections += ["", f"### {name}", "", "per class:", "",
                     *markdown_table(["label", "precision", "recall", "F1", "support"],
                                     [[lb, c["precision"], c["recall"], c["f1"], c["support"]]
                                      for lb, c in r["per_class"].items()]),
                     "", "confusion matrix (rows: true label, columns: predicted):", "",
                     *markdown_table(["true \\ predicted", *s["labels"]],
                                     [[lb, *row] for lb, row in zip(s["labels"], r["confusion_matrix"])])]
    write_stage_report(out, "classify", "Classification fine-tuning", s, sections)
    line = f"classify: test accuracy {s['lathe']['accuracy']:.4f}"
    if "baseline" in s:
        line += f" (bag-of-words logistic regression {s['baseline']['accuracy']:.4f})"
    info(line)
