"""The tasks behind `lathe eval`: perplexity on any text, GSM8K exact match, multiple choice by
log-likelihood, classification and translation. Each reads its data file strictly (a bad row names
file:line), runs the model through `lathe.eval.loglik`, takes every number from `lathe.eval.metrics`,
and returns (summary, per-example rows); `save_result` writes them to <run>/eval/<name>.{json,jsonl},
where the report card finds them.

Data formats (one JSON object per line):
    gsm8k      {"question", "answer"}                  the answer ends in "#### <number>"
    mc         {"question", "options": [...], "answer": index}
    classify   {"label", "prediction"}                 scores given predictions, or
               {"text", "label"}                       runs the run's classifier checkpoint on the texts
    translate  {"source", "reference": str | [str]}    the model translates, or with "hypothesis" on
                                                       every row, given translations are scored
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import numpy as np

from lathe.console import warn
from lathe.errors import LatheError
from lathe.eval import metrics as M
from lathe.io import iter_jsonl_objects, write_json, write_text

PLAIN_TEMPLATES = {"gsm8k": "Question: {question}\nAnswer:", "translate": "Source: {source}\nTranslation:"}
CHAT_TEMPLATES = {"gsm8k": "{question}", "translate": "Translate: {source}"}
PLAIN_STOPS = {"gsm8k": ["\nQuestion:"], "translate": ["\n"]}  # where a plain completion's answer ends
N_EXAMPLES = 5  # examples kept in the summary for the report card


# --- reading data -----------------------------------------------------------------------------------
def read_rows(path: str | Path, required: dict[str, type | tuple]) -> list[dict]:
    """JSON objects, one a line, each with the `required` fields of the given types."""
    rows = []
    for where, row in iter_jsonl_objects(path):
        for field, kind in required.items():
            if not isinstance(row.get(field), kind) or isinstance(row.get(field), bool):
                raise LatheError(f"{where}: field '{field}' is missing or not {_type_name(kind)}")
        row["_where"] = where
        rows.append(row)
    if not rows:
        raise LatheError(f"{path}: no rows")
    return rows


def _type_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({str: "a string", int: "an integer", list: "a list", dict: "an object"}.get(k, k.__name__)
                       for k in kinds)


def limit_rows(rows: list[dict], limit: int | None) -> list[dict]:
    return rows[:limit] if limit else rows


# --- saving -----------------------------------------------------------------------------------------
def save_result(run_path: Path, name: str, summary: dict, examples: list[dict]) -> Path:
    """<run>/eval/<name>.json (summary) and <run>/eval/<name>.jsonl (one row per example)."""
    folder = Path(run_path) / "eval"
    write_text(folder / f"{name}.jsonl", "".join(json.dumps(e, default=str) + "\n" for e in examples))
    write_json(folder / f"{name}.json", summary)
    return folder / f"{name}.json"


def _summary(task: str, data, n: int, metrics: dict, examples: list[dict], **extra) -> dict:
    return {"task": task, "data": str(data), "n": n, "metrics": metrics, **extra, "examples": examples[:N_EXAMPLES]}


# --- perplexity and bits-per-byte on any text ---------------------------------------------------------
def eval_text(model, tok, paths: list[str | Path], max_tokens: int) -> tuple[dict, list[dict]]:
    """Loss, perplexity and bits-per-byte of each file (<|bos|> + its text, up to max_tokens
    predictions per file) and of all files together."""
    from lathe.eval.loglik import prompt_ids
    from lathe.eval.perplexity import evaluate_lm

    token_bytes = tok.token_bytes()
    per_file, total_nats, total_tokens, total_bytes = [], 0.0, 0, 0
    for path in paths:
        tokens = np.asarray(prompt_ids(tok, _read_text(path)), dtype=np.int64)
        if model.cfg.direction == "backward":  # <|bos|>, then the text back to front (see EncodedSplit)
            tokens = np.concatenate([tokens[:1], tokens[1:][::-1]])
        if len(tokens) < 2:
            raise LatheError(f"{path}: no text to score")
        r = evaluate_lm(model, tokens, token_bytes, max_tokens)
        n_bytes = int(token_bytes[tokens[1 : r["tokens"] + 1]].sum())  # the targets evaluate_lm scored
        per_file.append({"file": str(path), "loss": r["loss"], "ppl": r["ppl"], "bpb": r["bpb"],
                         "tokens": r["tokens"], "bytes": n_bytes})
        total_nats += r["loss"] * r["tokens"]
        total_tokens += r["tokens"]
        total_bytes += n_bytes
    overall = {"loss": total_nats / total_tokens, "ppl": M.perplexity(total_nats, total_tokens),
               "bpb": M.bits_per_byte(total_nats, max(1, total_bytes)), "tokens": total_tokens, "bytes": total_bytes}
    return _summary("text", [str(p) for p in paths], len(per_file), overall, per_file, files=per_file), per_file


def _read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise LatheError(f"text file {path} does not exist")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        warn(f"{path}: not valid UTF-8 (first bad byte at offset {e.start}); bad bytes scored as U+FFFD")
        return data.decode("utf-8", errors="replace")


# --- generation tasks: GSM8K and translation ------------------------------------------------------------
def task_prompt(tok, task: str, fields: dict, chat: bool, template: str | None) -> tuple[list[int], dict]:
    """Prompt ids and the completion's stopping rule for one example.

    chat: the chat template with the generation prompt, stopping at <|assistant_end|>; plain: the
    template as text after <|bos|>, stopping where the plain format's answer ends."""
    from lathe.chat import render_chat
    from lathe.eval.loglik import prompt_ids

    template = template or (CHAT_TEMPLATES if chat else PLAIN_TEMPLATES)[task]
    try:
        text = template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise LatheError(f"template {template!r}: only {', '.join('{' + f + '}' for f in fields)} can be filled "
                         f"({e!r})") from None
    if chat:
        ids, _ = render_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)
        return ids, {"stop_ids": {tok.special_id("<|assistant_end|>"), tok.eos_id, tok.bos_id}}
    return prompt_ids(tok, text), {"until": PLAIN_STOPS[task]}


def _check_template(template: str | None, field: str) -> None:
    if template is not None and "{" + field + "}" not in template:
        raise LatheError(f"--template must contain {{{field}}}, got {template!r}")


def read_gsm8k(path) -> list[dict]:
    rows = read_rows(path, {"question": str, "answer": str})
    for row in rows:
        if M.extract_gsm8k_answer(row["answer"]) is None:
            raise LatheError(f"{row['_where']}: field 'answer' has no final '#### <number>'")
    return rows


def eval_gsm8k(model, tok, rows: list[dict], chat: bool = False, max_tokens: int = 256,
               template: str | None = None, data="") -> tuple[dict, list[dict]]:
    """Greedy answers; exact match of the number after '####' and the share of well-formed answers."""
    from lathe.eval.loglik import complete

    _check_template(template, "question")
    examples = []
    for row in rows:
        ids, stop = task_prompt(tok, "gsm8k", {"question": row["question"]}, chat, template)
        prediction = complete(model, tok, ids, max_tokens, **stop)
        examples.append({"question": row["question"], "prediction": prediction,
                         "predicted": M.extract_gsm8k_answer(prediction),
                         "gold": M.extract_gsm8k_answer(row["answer"])})
    predictions = [e["prediction"] for e in examples]
    metrics = {"exact_match": M.exact_match(predictions, [r["answer"] for r in rows]),
               "well_formed": sum(M.is_well_formed_gsm8k(p) for p in predictions) / len(predictions)}
    options = {"chat": chat, "max_tokens": max_tokens, "template": template}
    return _summary("gsm8k", data, len(rows), metrics, examples, options=options), examples


def read_translate(path) -> list[dict]:
    rows = read_rows(path, {"source": str, "reference": (str, list)})
    for row in rows:
        refs = row["reference"]
        if isinstance(refs, list) and (not refs or not all(isinstance(r, str) for r in refs)):
            raise LatheError(f"{row['_where']}: field 'reference' must be a string or a non-empty list of strings")
        if "hypothesis" in row and not isinstance(row["hypothesis"], str):
            raise LatheError(f"{row['_where']}: field 'hypothesis' must be a string")
    return rows


def eval_translate(model, tok, rows: list[dict], chat: bool = False, max_tokens: int = 128,
                   template: str | None = None, data="") -> tuple[dict, list[dict]]:
    """Corpus BLEU and chrF (sacrebleu) of the model's translations, or of the rows' given
    "hypothesis" when every row has one (then `model` may be None)."""
    from lathe.eval.loglik import complete

    _check_template(template, "source")
    given = all("hypothesis" in r for r in rows)
    if not given and model is None:
        raise LatheError(f"{data}: rows without 'hypothesis' need a model to translate them")
    hypotheses = []
    for row in rows:
        if given:
            hypotheses.append(row["hypothesis"])
            continue
        ids, stop = task_prompt(tok, "translate", {"source": row["source"]}, chat, template)
        hypotheses.append(complete(model, tok, ids, max_tokens, **stop).strip())
    references = [r["reference"] for r in rows]
    metrics = {"bleu": M.bleu(hypotheses, references), "chrf": M.chrf(hypotheses, references)}
    examples = [{"source": r["source"], "hypothesis": h, "reference": r["reference"]} for r, h in zip(rows, hypotheses)]
    options = {"chat": chat, "max_tokens": max_tokens, "template": template, "given_hypotheses": given}
    return _summary("translate", data, len(rows), metrics, examples, options=options), examples


# --- multiple choice by log-likelihood --------------------------------------------------------------------
def read_mc(path) -> list[dict]:
    rows = read_rows(path, {"question": str, "options": list, "answer": int})
    for row in rows:
        options = row["options"]
        if len(options) < 2 or not all(isinstance(o, str) and o for o in options):
            raise LatheError(f"{row['_where']}: field 'options' must list at least 2 non-empty strings")
        if not 0 <= row["answer"] < len(options):
            raise LatheError(f"{row['_where']}: field 'answer' {row['answer']} is not an index into its "
                             f"{len(options)} options")
    return rows


def option_text(question: str, option: str) -> str:
    """The continuation scored for an option: the option after one space, unless the question
    already ends in whitespace ("...?\nAnswer:" + " Paris")."""
    return option if question[-1:].isspace() else " " + option


def eval_mc(model, tok, rows: list[dict], batch_size: int = 32, data="") -> tuple[dict, list[dict]]:
    """Each option's summed log-probability given the question. Accuracy picks the highest sum;
    accuracy_norm divides by the option's UTF-8 bytes first (lm-evaluation-harness's acc_norm), so
    a long option is not penalised for having more tokens."""
    from lathe.eval.loglik import encode_pair, score_continuations

    texts = [[option_text(r["question"], o) for o in r["options"]] for r in rows]
    pairs = [encode_pair(tok, r["question"], t) for r, ts in zip(rows, texts) for t in ts]
    scores = iter(score_continuations(model, pairs, batch_size))
    logprobs = [[next(scores).logprob for _ in ts] for ts in texts]
    lengths = [[len(t.encode("utf-8")) for t in ts] for ts in texts]
    answers = [r["answer"] for r in rows]
    metrics = {"accuracy": M.multiple_choice_accuracy(logprobs, answers),
               "accuracy_norm": M.multiple_choice_accuracy(logprobs, answers, lengths),
               "chance": mean(1 / len(ts) for ts in texts)}
    examples = [{"question": r["question"], "options": r["options"], "answer": r["answer"], "logprobs": lp,
                 "chosen": int(np.argmax(lp)), "chosen_norm": int(np.argmax(np.asarray(lp) / ln))}
                for r, lp, ln in zip(rows, logprobs, lengths)]
    return _summary("mc", data, len(rows), metrics, examples), examples


# --- classification ----------------------------------------------------------------------------------------
def read_classify(path) -> list[dict]:
    """Rows of {"label", "prediction"} or of {"text", "label"}, the same kind throughout."""
    rows = read_rows(path, {})
    kind = "prediction" if "prediction" in rows[0] else "text"
    for row in rows:
        for field in ("label", kind):
            value = row.get(field)
            if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
                raise LatheError(f"{row['_where']}: field '{field}' must be a non-empty string or integer "
                                 f"(every row has 'label' and '{kind}', like the first row)")
    return rows


def eval_classify(rows: list[dict], classifier=None, tok=None, data="") -> tuple[dict, list[dict]]:
    """Accuracy, per-class / macro / weighted precision, recall and F1, and the confusion matrix,
    of the rows' predictions or of `classifier` (lathe.finetune.classify) run on the rows' texts."""
    y_true = [str(r["label"]).strip() for r in rows]
    if "prediction" in rows[0]:
        y_pred = [str(r["prediction"]).strip() for r in rows]
    else:
        y_pred = classifier_predictions(classifier, tok, rows, data)
    labels = sorted(set(y_true) | set(y_pred) | set(getattr(classifier, "labels", [])))
    report = M.classification_report(y_true, y_pred, labels)
    matrix, _ = M.confusion_matrix(y_true, y_pred, labels)
    metrics = {"accuracy": report["accuracy"], **{f"macro_{k}": v for k, v in report["macro"].items()},
               **{f"weighted_{k}": v for k, v in report["weighted"].items()}}
    examples = [{"label": t, "prediction": p, **({"text": r["text"]} if "text" in r else {})}
                for r, t, p in zip(rows, y_true, y_pred)]
    return _summary("classify", data, len(rows), metrics, examples, labels=labels,
                    per_class=report["per_class"], confusion_matrix=matrix), examples


def classifier_predictions(classifier, tok, rows: list[dict], data) -> list[str]:
    if classifier is None:
        raise LatheError(f"{data}: rows with 'text' need a classifier run (`lathe finetune classify`); "
                         f"or give rows of {{\"label\", \"prediction\"}}")
    from lathe.finetune.classify import EncodedSplit, predict

    unknown = sorted({str(r["label"]).strip() for r in rows} - set(classifier.labels))
    if unknown:
        raise LatheError(f"{data}: labels {unknown} are not among the classifier's {classifier.labels}")
    examples = [(str(r["text"]), str(r["label"]).strip()) for r in rows]
    split = EncodedSplit(tok, examples, classifier.labels, classifier.cfg.block_size, classifier.cfg.direction)
    predicted, _ = predict(classifier, split)
    return [classifier.labels[i] for i in predicted]


def load_classifier_if_any(run_path: Path, device):
    """The run's classifier (a checkpoint whose state records labels; its best val one), else None."""
    from lathe.finetune.classify import classifier_checkpoint, load_classifier
    from lathe.train.checkpoint import load_state

    try:
        ckpt = classifier_checkpoint(run_path)
    except LatheError:
        return None
    if "labels" not in load_state(ckpt):
        return None
    return load_classifier(ckpt, device).eval()

