"""Classification fine-tuning: a linear head on a pretrained lathe GPT, trained on (text, label) pairs.

    report = run_classify(base="runs/base", data=["../shared/data/classify"], out="runs/polarity")

Pooling (`pooling=`): "last" feeds the head the final-norm hidden state of each text's last real
token: under causal attention it is the only position that has seen the whole text. "mean" averages
the hidden states of all real tokens (each has seen the text up to itself), which gives a small model
a bag-of-features view that is easier to train; "meanmax" concatenates that mean with the per-feature
maximum over the tokens (ULMFiT's concat pooling, without the last state). Pads come after the real
tokens (right padding), so causal attention never lets a real token see one and no attention mask is
needed. Texts are encoded as <|bos|> + tokens (as documents are in pretraining) and cut to
block_size tokens from the start.

Data: .jsonl rows {"text", "label"}, .csv/.tsv files with a header naming `text` and `label`, or a
folder holding the sentence-polarity files rt-polarity.pos / rt-polarity.neg (latin-1, one sentence
a line). Examples are split into train/val/test by a hash of the text (10% val, 10% test), so the
split is the same on every machine and a repeated sentence never straddles two splits.

Small data (a few thousand examples) overfits a transformer quickly. The options that regularise it:
`head_dropout` (on the pooled features), `lm_weight` (the next-token loss on the training texts kept as
an auxiliary objective, as in GPT-1: loss = classification + lm_weight * LM), `freeze_steps` (the
first steps train the zero-initialised head alone, so its early noise does not reach the body),
`body_lr_scale` (the pretrained body learns at this fraction of the head's learning rate: ULMFiT's
discriminative fine-tuning) and `select="accuracy"` (keep the checkpoint of the best val accuracy
rather than val loss).

The test split is scored with accuracy, per-class and macro precision / recall / F1 and a confusion
matrix, beside a bag-of-words logistic regression (scikit-learn) trained on the same train split, and
the two are compared on the same sentences (paired bootstrap interval, exact McNemar test).
The checkpoint stores the backbone and the head (keys gpt.* and head.*); its state.json records the
labels, and `load_classifier(out)` rebuilds the model.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lathe.config import ModelConfig, TrainConfig
from lathe.console import info, warn
from lathe.errors import LatheError
from lathe.eval.metrics import bootstrap_ci, classification_report, confusion_matrix
from lathe.finetune.sft import (apply_lora_if, hash_unit, load_base_model, markdown_table, output_dir,
                                prepare_output, save_lora_outputs, stage_options, write_stage_report)
from lathe.io import write_json, write_text
from lathe.model import GPT
from lathe.rundir import RunDir
from lathe.train.checkpoint import load_state, load_weights, resolve_checkpoint, save_checkpoint
from lathe.train.loop import train

POLARITY_FILES = {"pos": "rt-polarity.pos", "neg": "rt-polarity.neg"}
VAL_FRACTION, TEST_FRACTION = 0.1, 0.1
CLASSIFY_DEFAULTS = {"max_steps": 400, "lr": 5e-4, "warmup_steps": 20, "batch_size": 32, "eval_every": 50,
                     "checkpoint_every": 50, "log_every": 10, "weight_decay": 0.1}


# --- the model ---------------------------------------------------------------------------------
POOLINGS = ("last", "mean", "meanmax", "channel")


def channel_prefix(label: str) -> str:
    """The text written before a sentence to condition it on a label (a line of its own, as
    sentences start lines in pretraining documents)."""
    return f"{label}:\n"


class ChannelHead(nn.Module):
    """The noisy-channel readout: logit_c = log p(text | label c written first) + prior_c, with the
    base's own LM head. It needs no new weights but a prior per label, so a small labelled set only
    adapts what pretraining learned (Min et al. 2022, "Noisy Channel Language Model Prompting")."""

    def __init__(self, prefixes: list[list[int]]):
        super().__init__()
        self.prefixes = [list(map(int, p)) for p in prefixes]
        self.bias = nn.Parameter(torch.zeros(len(prefixes)))

    @property
    def prefix_tokens(self) -> int:
        return max(map(len, self.prefixes))

    def text_logprobs(self, gpt: GPT, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, n_labels): the summed log-probability of each text's tokens after each label's prefix."""
        room = gpt.cfg.block_size - 1 - self.prefix_tokens  # longer texts are cut (as in training)
        text, n_text = idx[:, 1 : 1 + room], (lengths - 1).clamp(max=room)  # idx = <|bos|> + text, right-padded
        real = torch.arange(text.size(1), device=idx.device)[None, :] < n_text[:, None]
        scores = []
        for prefix in self.prefixes:
            p = torch.tensor(prefix, device=idx.device).expand(idx.size(0), -1)
            h = gpt.hidden_states(torch.cat([idx[:, :1], p, text], dim=1))
            logits = gpt.lm_head(h[:, len(prefix) : len(prefix) + text.size(1)]).float()
            logp = logits.log_softmax(-1).gather(-1, text.unsqueeze(-1)).squeeze(-1)
            scores.append((logp * real).sum(1))
        return torch.stack(scores, dim=1)


class Classifier(nn.Module):
    """A lathe GPT plus a linear head on pooled hidden states, or the channel readout (see the
    module docstring)."""

    def __init__(self, gpt: GPT, labels: list[str], pooling: str = "mean", head_dropout: float = 0.0,
                 train_lm_head: bool = False, prefixes: list[list[int]] | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise LatheError(f"pooling '{pooling}': one of {', '.join(POOLINGS)}")
        self.gpt = gpt
        self.labels = list(labels)
        self.pooling = pooling
        self.head_drop = nn.Dropout(head_dropout)
        if pooling == "channel":
            if prefixes is None or len(prefixes) != len(labels):
                raise LatheError("channel pooling needs one token prefix per label")
            if gpt.cfg.direction == "backward":
                raise LatheError("channel pooling reads the label prefix before the text: it needs a forward model")
            self.head = ChannelHead(prefixes)
            return
        self.head = nn.Linear(gpt.cfg.n_embd * (2 if pooling == "meanmax" else 1), len(labels))
        nn.init.zeros_(self.head.weight)  # start from uniform predictions; the backbone is already trained
        nn.init.zeros_(self.head.bias)
        if not gpt.cfg.tie_embeddings and not train_lm_head:  # an unused untied LM head is frozen (DDP
            gpt.lm_head.weight.requires_grad_(False)  # needs every trainable parameter to get a gradient)

    @property
    def cfg(self) -> ModelConfig:  # checkpoints record the backbone's config
        return self.gpt.cfg

    @property
    def prefix_tokens(self) -> int:
        """Tokens the readout adds in front of each text (the channel prefixes)."""
        return self.head.prefix_tokens if self.pooling == "channel" else 0

    def pool(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.pooling == "last":
            return h[torch.arange(h.size(0), device=h.device), lengths - 1]
        real = (torch.arange(h.size(1), device=h.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        mean = (h * real).sum(1) / lengths[:, None]
        if self.pooling == "mean":
            return mean
        return torch.cat([mean, h.masked_fill(~real, float("-inf")).amax(1)], dim=-1)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor, lm_loss: bool = False, frozen_body: bool = False,
                labels: torch.Tensor | None = None):
        """idx (B, T) right-padded, lengths (B,) real tokens per row -> logits (B, n_labels); with
        lm_loss=True also the next-token loss on the real tokens (the auxiliary objective; for the
        channel readout, of each text after its true label, so `labels` is needed). With
        frozen_body=True no gradient reaches the GPT (the head trains alone)."""
        if self.pooling == "channel":
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_body):
                logprobs = self.head.text_logprobs(self.gpt, idx, lengths)
            logits = logprobs + self.head.bias
            if not lm_loss:
                return logits
            return logits, -logprobs.gather(1, labels[:, None]).sum() / (lengths - 1).sum().clamp(min=1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_body):
            h = self.gpt.hidden_states(idx)
        logits = self.head(self.head_drop(self.pool(h, lengths)))
        if not lm_loss:
            return logits
        targets = idx[:, 1:].masked_fill(torch.arange(1, idx.size(1), device=idx.device)[None, :] >= lengths[:, None],
                                         -100)  # pads are not predicted
        lm_logits = self.gpt.lm_head(h[:, :-1]).float()
        return logits, F.cross_entropy(lm_logits.reshape(-1, lm_logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def classifier_state(model: Classifier) -> dict:
    """What state.json records beside the weights so that load_classifier can rebuild the model."""
    state = {"labels": model.labels, "pooling": model.pooling}
    if model.pooling == "channel":
        state["prefixes"] = model.head.prefixes
    return state


def classifier_checkpoint(path: str | Path) -> Path:
    """The checkpoint a classifier run's report scored: a checkpoint dir as given; for a run or
    checkpoints dir, the best val checkpoint the run recorded (else its latest)."""
    path = Path(path)
    ckpt = resolve_checkpoint(path)
    if ckpt == path:
        return ckpt
    best = load_state(ckpt).get("best_checkpoint")
    return ckpt.parent / best if best and (ckpt.parent / best / "state.json").exists() else ckpt


def load_classifier(path: str | Path, device: str = "cpu") -> Classifier:
    """A classifier saved by `run_classify` (a run dir or checkpoints dir: its best val checkpoint;
    or a checkpoint dir)."""
    ckpt = classifier_checkpoint(path)
    state = load_state(ckpt)
    if "labels" not in state or "pooling" not in state:
        raise LatheError(f"{ckpt}: not a classifier checkpoint (no labels or pooling in state.json)")
    model = Classifier(GPT(ModelConfig.model_validate(state["model"])), state["labels"], state["pooling"],
                       prefixes=state.get("prefixes"))
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
    """Token ids (<|bos|> + text, cut to max_len) and label indices of one split. For a backward model
    the text's tokens come reversed, as its pretraining stream had them (see `in_reading_order`)."""

    def __init__(self, tok, examples: list[tuple[str, str]], labels: list[str], max_len: int,
                 direction: str = "forward"):
        index = {label: i for i, label in enumerate(labels)}
        encoded = tok.encode_batch([text for text, _ in examples])
        if direction == "backward":
            encoded = [ids[::-1] for ids in encoded]
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
    """get_batch(i) -> (ids, lengths, labels, i): a pure function of (seed, i). The micro-batch index
    rides along so the loss knows the step (for freeze_steps) on a fresh or resumed run alike."""

    def get_batch(i: int):
        picks = np.random.default_rng([seed, i]).integers(0, len(split), size=batch_size)
        return (*split.batch(picks), torch.tensor([i]))

    return get_batch


def classify_loss_fn(lm_weight: float = 0.0, freeze_batches: int = 0):
    """The loss for the training loop: cross-entropy of the labels, plus lm_weight x the next-token
    loss of the same texts (GPT-1's auxiliary objective). Micro-batches before index freeze_batches
    train the head alone (the zero-initialised head would otherwise send noise into the body)."""

    def loss_fn(model, batch) -> torch.Tensor:
        ids, lengths, labels, index = batch
        frozen = int(index[0]) < freeze_batches
        if lm_weight and not frozen:
            logits, lm = model(ids, lengths, lm_loss=True, labels=labels)
            return F.cross_entropy(logits.float(), labels) + lm_weight * lm
        return F.cross_entropy(model(ids, lengths, frozen_body=frozen).float(), labels)

    return loss_fn


def predict(model, split: EncodedSplit, batch_size: int = 64) -> tuple[np.ndarray, float]:
    """Predicted label indices for the whole split and the mean cross-entropy (see predict_proba)."""
    probs, nll = predict_proba(model, split, batch_size)
    return probs.argmax(-1), nll


@torch.no_grad()
def predict_proba(model, split: EncodedSplit, batch_size: int = 64) -> tuple[np.ndarray, float]:
    """Label probabilities (N, n_labels) for the whole split and the mean cross-entropy, in eval mode
    (no dropout); the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        return _predict_proba(model, split, batch_size)
    finally:
        model.train(was_training)


def _predict_proba(model, split: EncodedSplit, batch_size: int) -> tuple[np.ndarray, float]:
    device = next(model.parameters()).device
    order = np.argsort([len(ids) for ids in split.ids], kind="stable")  # similar lengths: little padding
    probs = np.zeros((len(split), len(model.labels)), dtype=np.float64)
    nll = 0.0
    for start in range(0, len(split), batch_size):
        picks = order[start : start + batch_size]
        ids, lengths, labels = split.batch(picks)
        logits = model(ids.to(device), lengths.to(device)).float()
        nll += F.cross_entropy(logits, labels.to(device), reduction="sum").item()
        probs[picks] = logits.softmax(-1).double().cpu().numpy()
    return probs, nll / max(1, len(split))


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
SELECT_ON = ("loss", "accuracy")


def train_classifier(model: Classifier, splits: dict[str, EncodedSplit], cfg: TrainConfig, out: Path,
                     resume: bool = False, lm_weight: float = 0.0, freeze_steps: int = 0, select: str = "loss",
                     body_lr_scale: float = 1.0):
    """Fine-tune with the shared loop; afterwards the model holds the weights of the best val score.

    select="loss": the best val cross-entropy. select="accuracy": the best val accuracy; the loop keeps
    the checkpoint of the lowest "val_loss", so that metric is then the val error rate (1 - accuracy,
    the 0-1 loss) and the cross-entropy is logged as val_nll."""
    if select not in SELECT_ON:
        raise LatheError(f"select '{select}': one of {', '.join(SELECT_ON)}")

    def evaluate(m) -> dict:
        preds, nll = predict(m, splits["val"])
        accuracy = float(np.mean(preds == splits["val"].labels))
        if select == "accuracy":
            return {"val_loss": 1.0 - accuracy, "val_nll": nll, "val_accuracy": accuracy}
        return {"val_loss": nll, "val_accuracy": accuracy}

    if freeze_steps and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LatheError("freeze_steps needs a single process: DDP expects a gradient for every parameter")
    loss_fn = classify_loss_fn(lm_weight, freeze_steps * cfg.grad_accum)
    result = train(model, cfg, classify_batches(splits["train"], cfg.batch_size, cfg.seed), evaluate, out,
                   resume=resume, loss_fn=loss_fn, stage="classify",
                   extra_state=classifier_state(model),
                   lr_scale=lambda name: 1.0 if name.startswith("head.") else body_lr_scale)
    best = load_state(resolve_checkpoint(out)).get("best_checkpoint")
    if best and (out / "checkpoints" / best).exists():
        load_weights(model, out / "checkpoints" / best)  # selected on val, so the test split stays unseen
    return result, best


def run_classify(base: str | Path, data: list[str | Path], out: str | Path | None = None, name: str | None = None,
                 overrides: Iterable[str] = (), resume: bool = False, lora: bool = False,
                 lora_rank: int = 8, baseline: bool = True, pooling: str = "mean", head_dropout: float = 0.0,
                 lm_weight: float = 0.0, freeze_steps: int = 0, select: str = "loss", score_test: bool = True,
                 body_lr_scale: float = 1.0) -> dict:
    """`lathe finetune classify`: writes <out>/classify_report.{md,json} and returns the summary.

    head_dropout: dropout on the pooled features. lm_weight: weight of the auxiliary next-token loss
    on the training texts. freeze_steps: the first steps train the head alone. body_lr_scale: the
    backbone's learning rate as a fraction of the head's. select: keep the
    weights of the best val "loss" or "accuracy". score_test=False scores the val split instead of
    the test split (for choosing settings without looking at test)."""
    from lathe.tokenizer import Tokenizer

    if not 0 < body_lr_scale <= 1:  # before any output is written
        raise LatheError(f"body_lr_scale {body_lr_scale}: a fraction of the head's learning rate, in (0, 1]")
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
    torch.manual_seed(cfg.seed)
    prefixes = [tok.encode(channel_prefix(label)) for label in labels] if pooling == "channel" else None
    model = Classifier(gpt, labels, pooling, head_dropout, train_lm_head=lm_weight > 0, prefixes=prefixes)
    max_len = gpt.cfg.block_size - model.prefix_tokens
    encoded = {split: EncodedSplit(tok, rows, labels, max_len, gpt.cfg.direction) for split, rows in raw.items()}
    info("classify: " + ", ".join(f"{n} {len(s)}" for n, s in encoded.items()) + f" examples, labels {labels}")
    if lora:
        model.gpt = apply_lora_if(model.gpt, lora, lora_rank)  # the head stays fully trainable
    result, best = train_classifier(model, encoded, cfg, out, resume, lm_weight, freeze_steps, select, body_lr_scale)
    if lora:  # <out>/merged: a plain classifier checkpoint that load_classifier reads
        model.gpt = save_lora_outputs(model.gpt, out)
        save_checkpoint(out / "merged", result.step, model, None, classifier_state(model))

    scored = "test" if score_test else "val"
    preds, scored_loss = predict(model, encoded[scored])
    summary = {"base": str(base_run.path), "data": [str(p) for p in data], "labels": labels,
               "counts": {n: len(s) for n, s in encoded.items()},
               "truncated": {n: s.truncated for n, s in encoded.items()},
               "options": {"pooling": pooling, "head_dropout": head_dropout, "lm_weight": lm_weight,
                           "freeze_steps": freeze_steps, "select": select, "body_lr_scale": body_lr_scale,
                           "lr": cfg.lr, "max_steps": cfg.max_steps,
                           "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay,
                           "dropout": gpt.cfg.dropout},
               "pooling": pooling, "steps": result.step, "stopped": result.stopped, "best_checkpoint": best,
               "scored_split": scored, f"{scored}_loss": scored_loss, "lora": lora, "prefixes": prefixes,
               **score_predictions(raw, scored, labels, encoded[scored].labels, preds, baseline)}
    _classify_report(out, summary)
    return summary


def score_predictions(raw: dict[str, list[tuple[str, str]]], scored: str, labels: list[str], truth: np.ndarray,
                      preds: np.ndarray, baseline: bool = True) -> dict:
    """{"lathe": scores} of predicted label indices on split `scored`, and with baseline=True the
    bag-of-words logistic regression's scores on the same examples and the paired comparison."""
    y_true, y_pred = [labels[i] for i in truth], [labels[i] for i in preds]
    summary = {"lathe": scores(y_true, y_pred, labels)}
    bow = bag_of_words_baseline(raw["train"], raw["val"], raw[scored]) if baseline else {}
    if bow:
        summary["baseline"] = {"C": bow["C"], **scores(y_true, bow["predictions"], labels)}
        summary["comparison"] = paired_comparison(y_true, y_pred, bow["predictions"])
    return summary


# --- ensembles of fine-tuned classifiers ----------------------------------------------------------
ENSEMBLE_METHODS = ("mean", "soup")


def average_classifiers(classifiers: list[Classifier]) -> Classifier:
    """A uniform "model soup" (Wortsman et al. 2022): one classifier whose every weight is the mean of
    the members'. Members fine-tuned from one base with different seeds usually stay in one basin,
    so the average works as one model; they must share the architecture, labels and readout."""
    first = classifiers[0]
    for other in classifiers[1:]:
        if (other.cfg, other.labels, classifier_state(other)) != (first.cfg, first.labels, classifier_state(first)):
            raise LatheError("a weight average needs members with the same model config, labels and pooling")
    states = [m.state_dict() for m in classifiers]
    soup = Classifier(GPT(first.cfg), first.labels, first.pooling, prefixes=classifier_state(first).get("prefixes"))
    soup.load_state_dict({k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) for k, v in states[0].items()})
    return soup.to(next(first.parameters()).device)


def score_ensemble(runs: list[str | Path], data: list[str | Path], out: str | Path | None = None,
                   method: str = "mean", score_test: bool = True, baseline: bool = True,
                   device: str = "cpu") -> dict:
    """Score several classifier runs (from `run_classify`, each at its best val checkpoint) as one:
    method="mean" averages their label probabilities, "soup" averages their weights into one model.
    Reports each member's val accuracy, the ensemble's val accuracy and the scored split (test, or val
    with score_test=False) against the bag-of-words baseline; writes <out>/ensemble_report.{json,md}."""
    if method not in ENSEMBLE_METHODS:
        raise LatheError(f"ensemble method '{method}': one of {', '.join(ENSEMBLE_METHODS)}")
    if len(runs) < 2:
        raise LatheError(f"an ensemble needs at least 2 classifier runs, got {len(runs)}")
    members = [_ensemble_member(Path(path), device) for path in runs]
    labels = members[0]["model"].labels
    for m in members[1:]:
        if m["model"].labels != labels:
            raise LatheError(f"{m['run']}: labels {m['model'].labels} differ from {members[0]['run']}'s {labels}")
    raw = split_labeled([ex for path in data for ex in read_labeled(path)])
    unknown = sorted({lb for rows in raw.values() for _, lb in rows} - set(labels))
    if unknown:
        raise LatheError(f"labels {unknown} in {[str(p) for p in data]} are not among the classifiers' {labels}")
    scored = "test" if score_test else "val"
    splits = sorted({"val", scored})
    truth = {split: np.asarray([labels.index(lb) for _, lb in raw[split]]) for split in splits}
    accuracy = lambda probs, split: float(np.mean(probs.argmax(-1) == truth[split]))  # noqa: E731

    def probs_of(model, tok, split: str) -> np.ndarray:
        max_len = model.cfg.block_size - model.prefix_tokens
        return predict_proba(model, EncodedSplit(tok, raw[split], labels, max_len, model.cfg.direction))[0]

    member_probs = [{split: probs_of(m["model"], m["tok"], split) for split in splits} for m in members]
    for m, probs in zip(members, member_probs):
        m["val_accuracy"] = accuracy(probs["val"], "val")
    if method == "soup":
        if len({m["run"].joinpath("tokenizer.json").read_bytes() for m in members}) > 1:
            raise LatheError("a weight average needs members that share one tokenizer")
        soup = average_classifiers([m["model"] for m in members])
        ensemble = {split: probs_of(soup, members[0]["tok"], split) for split in splits}
    else:
        ensemble = {split: np.mean([probs[split] for probs in member_probs], axis=0) for split in splits}
    summary = {"method": method, "data": [str(p) for p in data], "labels": labels,
               "counts": {n: len(rows) for n, rows in raw.items()},
               "members": [{"run": str(m["run"]), "checkpoint": m["checkpoint"].name, "val_accuracy": m["val_accuracy"]}
                           for m in members],
               "val_accuracy": accuracy(ensemble["val"], "val"), "scored_split": scored,
               **score_predictions(raw, scored, labels, truth[scored], ensemble[scored].argmax(-1), baseline)}
    if out is not None:
        _ensemble_report(Path(out), summary)
    line = (f"ensemble ({method}) of {len(members)}: val accuracy {summary['val_accuracy']:.4f} (members "
            + ", ".join(f"{m['val_accuracy']:.4f}" for m in members) + ")")
    if scored != "val":
        line += f"; {scored} accuracy {summary['lathe']['accuracy']:.4f}"
    if "comparison" in summary:
        line += f" (bag-of-words logistic regression {summary['baseline']['accuracy']:.4f}, McNemar p " \
                f"{summary['comparison']['mcnemar_p']:.3g})"
    info(line)
    return summary


def _ensemble_member(path: Path, device: str) -> dict:
    """A run dir (at its best val checkpoint) or one checkpoint of a run: its classifier and tokenizer."""
    from lathe.tokenizer import Tokenizer

    ckpt = classifier_checkpoint(path)
    run = next((d for d in (path, ckpt.parent.parent) if (d / "tokenizer.json").is_file()), None)
    if run is None:
        raise LatheError(f"{path}: not a classifier run (no tokenizer.json)")
    return {"run": run, "checkpoint": ckpt, "model": load_classifier(ckpt, device).eval(),
            "tok": Tokenizer.from_file(run / "tokenizer.json")}


def _ensemble_report(out: Path, s: dict) -> None:
    split = s["scored_split"]
    how = "their label probabilities averaged" if s["method"] == "mean" else "their weights averaged into one model"
    lines = [f"# Classifier ensemble: `{out.name}`", "",
             f"{len(s['members'])} fine-tuned classifiers, {how}; {split} split scored "
             f"({s['counts'][split]} examples). Ensemble val accuracy {s['val_accuracy']:.4f}.", "",
             *markdown_table(["member", "checkpoint", "val accuracy"],
                             [[m["run"], m["checkpoint"], m["val_accuracy"]] for m in s["members"]]), "",
             f"## {split.capitalize()} scores", "",
             *markdown_table(["model", "accuracy", "macro F1"],
                             [[n, s[k]["accuracy"], s[k]["macro"]["f1"]] for n, k in
                              (("lathe ensemble", "lathe"), ("bag-of-words logistic regression", "baseline")) if k in s])]
    if "comparison" in s:
        c = s["comparison"]
        lines += ["", f"Paired: ensemble minus bag-of-words accuracy {c['difference']:+.4f}, bootstrap 95% interval "
                  f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], exact McNemar p = {c['mcnemar_p']:.4f}."]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ensemble_report.json", s)
    write_text(out / "ensemble_report.md", "\n".join(lines) + "\n")
    info(f"report: {out / 'ensemble_report.md'}")


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test: the chance of a split at least this uneven of the items that
    exactly one of two systems got right, if each were equally likely to be the one."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(y_true: list, pred_a: list, pred_b: list, seed: int = 0) -> dict:
    """Accuracy of a minus accuracy of b on the same items: a paired bootstrap 95% interval and the
    exact McNemar p-value. The difference is beyond noise when the interval excludes 0 (p < 0.05)."""
    right_a = np.asarray([t == p for t, p in zip(y_true, pred_a)], dtype=np.float64)
    right_b = np.asarray([t == p for t, p in zip(y_true, pred_b)], dtype=np.float64)
    ci = bootstrap_ci(right_a - right_b, n=2000, seed=seed)
    only_a, only_b = int(((right_a == 1) & (right_b == 0)).sum()), int(((right_a == 0) & (right_b == 1)).sum())
    return {"difference": ci["estimate"], "ci_low": ci["low"], "ci_high": ci["high"],
            "only_a_right": only_a, "only_b_right": only_b, "mcnemar_p": mcnemar_p(only_a, only_b)}


def scores(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    report = classification_report(y_true, y_pred, labels)
    matrix, _ = confusion_matrix(y_true, y_pred, labels)
    return {"accuracy": report["accuracy"], "macro": report["macro"], "per_class": report["per_class"],
            "confusion_matrix": matrix}


def _classify_report(out: Path, s: dict) -> None:
    split, o = s["scored_split"], s["options"]
    systems = [("lathe fine-tuned", s["lathe"])] + ([("bag-of-words logistic regression", s["baseline"])]
                                                   if "baseline" in s else [])
    header = ["model", "accuracy", "macro precision", "macro recall", "macro F1"]
    table = [[n, r["accuracy"], r["macro"]["precision"], r["macro"]["recall"], r["macro"]["f1"]] for n, r in systems]
    sections = [f"{split.capitalize()} split scored: {s['counts'][split]} examples (train {s['counts']['train']}, "
                f"val {s['counts']['val']}, test {s['counts']['test']}); {s['steps']} steps ({s['stopped']}), "
                f"weights of the best val {o['select']} ({s['best_checkpoint']}), {s['pooling']} pooling, "
                f"head dropout {o['head_dropout']}, auxiliary LM loss weight {o['lm_weight']}, "
                f"head alone for {o['freeze_steps']} steps, body learning rate x{o['body_lr_scale']}.", "",
                f"## {split.capitalize()} scores", "", *markdown_table(header, table)]
    if "comparison" in s:
        c = s["comparison"]
        sections += ["", f"Paired on the same {s['counts'][split]} sentences: lathe minus bag-of-words accuracy "
                     f"{c['difference']:+.4f}, bootstrap 95% interval [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]; "
                     f"only lathe right on {c['only_a_right']}, only bag-of-words right on {c['only_b_right']}, "
                     f"exact McNemar p = {c['mcnemar_p']:.4f}."]
    for name, r in systems:
        sections += ["", f"### {name}", "", "per class:", "",
                     *markdown_table(["label", "precision", "recall", "F1", "support"],
                                     [[lb, c["precision"], c["recall"], c["f1"], c["support"]]
                                      for lb, c in r["per_class"].items()]),
                     "", "confusion matrix (rows: true label, columns: predicted):", "",
                     *markdown_table(["true \\ predicted", *s["labels"]],
                                     [[lb, *row] for lb, row in zip(s["labels"], r["confusion_matrix"])])]
    write_stage_report(out, "classify", "Classification fine-tuning", s, sections)
    line = f"classify: {split} accuracy {s['lathe']['accuracy']:.4f}"
    if "baseline" in s:
        line += f" (bag-of-words logistic regression {s['baseline']['accuracy']:.4f}, McNemar p " \
                f"{s['comparison']['mcnemar_p']:.3g})"
    info(line)
