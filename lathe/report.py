"""The run's report card: report.md (readable as plain text) and report.html (one self-contained
page: inline CSS, plots embedded), with the PNG plots beside them.

A section appears only when the run has what it shows: summary, training curves, evaluation tables
(eval.json and eval/*.json from `lathe eval`), confusion matrices, arena results, improve rounds
(rounds.jsonl), fine-tuning stage reports (*_report.json), the curves of stages run in subfolders
(any */metrics.jsonl, e.g. alignment), the bias probe, samples, the data card and the config.
The report is written from markdown once; the HTML is rendered from the same text.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lathe.console import warn  # noqa: E402
from lathe.errors import LatheError  # noqa: E402
from lathe.io import read_json, read_jsonl, write_text  # noqa: E402
from lathe.rundir import RunDir  # noqa: E402

MAX_CELL = 160  # characters of a text cell in a table
MAX_EXAMPLES = 5


# --- plots -------------------------------------------------------------------------------------------
def plot_loss(metrics: list[dict], path: Path) -> Path | None:
    train = [r for r in metrics if r.get("kind") == "train" and _is_number(r.get("loss"))]
    evals = [r for r in metrics if r.get("kind") == "eval" and _is_number(r.get("val_loss"))]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_series(series: dict[str, tuple[list, list]], path: Path, xlabel: str, title: str = "") -> Path | None:
    """One small panel per named (x, y) series: metrics of different scales stay readable."""
    series = {k: v for k, v in series.items() if len(v[0]) > 0}
    if not series:
        return None
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), dpi=100, squeeze=False)
    for ax, (name, (xs, ys)) in zip(axes.flat, series.items()):
        ax.plot(xs, ys, "o-" if len(xs) < 30 else "-")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and rounds are whole numbers
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_lines(series: dict[str, tuple[list, list]], path: Path, xlabel: str, ylabel: str) -> Path | None:
    """Several named (x, y) curves on one axis (arms of an experiment on the same scale)."""
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, "o-", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_confusion(matrix: list[list[int]], labels: list, path: Path, title: str) -> Path:
    """Counts with rows = true label, columns = predicted label, each cell annotated."""
    size = max(3.5, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(labels))
    ax.set_xticks(ticks, [str(lb) for lb in labels], rotation=45, ha="right")
    ax.set_yticks(ticks, [str(lb) for lb in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    top = max(max(row) for row in matrix) if matrix else 0
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --- markdown pieces -------------------------------------------------------------------------------------
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:,.0f}" if abs(v) >= 1e3 else f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return "; ".join(fmt(x) for x in v)
    text = " ".join(str(v).split())  # one line per cell
    text = text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|")


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(fmt(h) for h in header) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows], ""]


def metric_table(metrics: dict) -> list[str]:
    return table(["metric", "value"], [[k, v] for k, v in metrics.items()]) if metrics else []


def fence(text: str, lang: str = "") -> list[str]:
    """A fenced block longer than any backtick run inside the text, so nothing can close it early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return [ticks + lang, text.rstrip("\n"), ticks, ""]


def image(path: Path | None, alt: str) -> list[str]:
    return [f"![{alt}]({path.name})", ""] if path else []


def flatten(row: dict, prefix: str = "") -> dict:
    """{"acc": {"loop": 1}} -> {"acc.loop": 1}: nested rows as flat columns."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_json(path: Path) -> dict:
    try:
        value = read_json(path)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _eval_results(run: RunDir) -> dict[str, dict]:
    return {p.stem: r for p in sorted((run.path / "eval").glob("*.json")) if (r := _read_json(p))}


# --- sections ----------------------------------------------------------------------------------------------
def summary_section(run: RunDir) -> list[str]:
    metrics = read_jsonl(run.metrics)
    evaluation = _read_json(run.eval)
    summary = _read_json(run.path / "train_summary.json")
    train_rows = [r for r in metrics if r.get("kind") == "train"]
    evals = [r for r in metrics if r.get("kind") == "eval"]
    tok_s = [r["tokens_per_s"] for r in train_rows[1:] if "tokens_per_s" in r] or \
            [r["tokens_per_s"] for r in train_rows if "tokens_per_s" in r]
    rows = [
        ("parameters", evaluation.get("params", summary.get("params"))),
        ("training steps", f"{summary['step']} (stopped: {summary.get('stopped')})" if "step" in summary else None),
        ("tokens seen", train_rows[-1].get("tokens_seen") if train_rows else None),
        ("training throughput (median tokens/s)", sorted(tok_s)[len(tok_s) // 2] if tok_s else None),
        ("final validation loss (nats/token)", evals[-1].get("val_loss") if evals else None),
        ("final validation bits-per-byte", evals[-1].get("val_bpb") if evals else None),
        ("test loss (nats/token)", evaluation.get("test_loss")),
        ("test perplexity", evaluation.get("test_ppl")),
        ("test bits-per-byte", evaluation.get("test_bpb")),
        ("unigram entropy of training tokens (nats/token)", evaluation.get("unigram_entropy")),
    ]
    headline = [_headline(name, r["metrics"]) for name, r in _eval_results(run).items()
                if r.get("task") != "bias" and r.get("metrics")]
    shown = [list(r) for r in rows + headline if r[1] is not None]  # a fine-tuning run has no test split, ...
    return ["## Summary", "", *table(["metric", "value"], shown)] if shown else []


def _headline(name: str, metrics: dict) -> tuple[str, str]:
    """An evaluation's first metric (with its confidence interval when it has one)."""
    key, value = next(iter(metrics.items()))
    shown = fmt(value)
    if "ci_low" in metrics and "ci_high" in metrics:
        shown += f" (95% CI {fmt(metrics['ci_low'])} - {fmt(metrics['ci_high'])})"
    return f"{name}: {key}", shown


def training_section(run: RunDir) -> list[str]:
    metrics = read_jsonl(run.metrics)
    lines = _curves(metrics, run.path, "", "loss curve")
    return ["## Training", "", *lines] if lines else []


def _curves(metrics: list[dict], folder: Path, prefix: str, alt: str) -> list[str]:
    """Loss curve, other evaluation metrics over steps, and the last evaluation's numbers."""
    lines = image(plot_loss(metrics, folder / f"{prefix}loss.png"), alt)
    evals = [flatten(r) for r in metrics if r.get("kind") == "eval"]
    keys = [k for k in dict.fromkeys(k for r in evals for k in r) if k not in ("step", "kind", "val_loss")]
    series = {k: ([r["step"] for r in evals if _is_number(r.get(k))], [r[k] for r in evals if _is_number(r.get(k))])
              for k in keys}
    series = {k: v for k, v in series.items() if len(set(v[1])) > 1}  # a constant adds nothing to look at
    lines += image(plot_series(series, folder / f"{prefix}eval_metrics.png", "step"), "evaluation metrics")
    if evals:
        last = {k: v for k, v in evals[-1].items() if k != "kind" and (_is_number(v) or isinstance(v, str))}
        lines += [f"Last evaluation (step {last.pop('step', 'n/a')}):", "", *metric_table(last)]
    return lines


def evaluation_section(run: RunDir) -> list[str]:
    lines = []
    test = {k: v for k, v in _read_json(run.eval).items()}
    if test:
        lines += ["### Test split", "", *metric_table(test)]
    for name, r in _eval_results(run).items():
        if r.get("task") in ("bias", "arena"):
            continue
        lines += [f"### {name}", "", f"Task `{r.get('task', '?')}` on `{fmt(r.get('data'))}`, "
                  f"{fmt(r.get('n'))} {'files' if r.get('files') else 'examples'}.", "",
                  *metric_table(r.get("metrics", {}))]
        if r.get("files"):
            lines += table(["file", "loss", "ppl", "bits/byte", "tokens"],
                           [[f["file"], f["loss"], f["ppl"], f["bpb"], f["tokens"]] for f in r["files"]])
        elif r.get("examples"):
            lines += examples_table(r["examples"])
    return ["## Evaluation", "", *lines] if lines else []


def examples_table(examples: list[dict]) -> list[str]:
    examples = [e for e in examples if isinstance(e, dict)][:MAX_EXAMPLES]
    keys = list(dict.fromkeys(k for e in examples for k in e))
    return ["Examples:", "", *table(keys, [[e.get(k) for k in keys] for e in examples])] if keys else []


def classification_section(run: RunDir) -> list[str]:
    """Confusion matrices of `lathe eval --task classify` results and of `lathe finetune classify`."""
    found = [(name, r) for name, r in _eval_results(run).items() if r.get("confusion_matrix")]
    stage = _read_json(run.path / "classify_report.json")
    for system in ("lathe", "baseline"):
        if isinstance(stage.get(system), dict) and stage[system].get("confusion_matrix"):
            found.append((f"finetune-{system}", {**stage[system], "labels": stage.get("labels", [])}))
    lines = []
    for name, r in found:
        labels, matrix = r.get("labels") or list(r.get("per_class", {})), r["confusion_matrix"]
        if len(labels) != len(matrix):
            continue  # an older or foreign file: nothing trustworthy to draw
        plot = plot_confusion(matrix, labels, run.path / f"confusion_{name}.png", name)
        lines += [f"### {name}", "", f"accuracy {fmt(r.get('accuracy', r.get('metrics', {}).get('accuracy')))}", "",
                  *image(plot, f"confusion matrix {name}")]
        per_class = r.get("per_class") or {}
        lines += table(["label", "precision", "recall", "F1", "support"],
                       [[lb, c.get("precision"), c.get("recall"), c.get("f1"), c.get("support")]
                        for lb, c in per_class.items() if isinstance(c, dict)]) if per_class else []
    return ["## Classification", "", *lines] if lines else []


def arena_section(run: RunDir) -> list[str]:
    results = [r for r in _eval_results(run).values() if r.get("task") == "arena"]
    if not results:
        return []
    rows = [[r.get("b"), r.get("n"), r.get("wins"), r.get("losses"), r.get("ties"), r.get("win_rate", {}).get("rate"),
             f"{fmt(r.get('win_rate', {}).get('low'))} - {fmt(r.get('win_rate', {}).get('high'))}",
             _decided_by(r.get("options") or {})] for r in results]
    lines = ["## Arena", "", "This run (A) against other models (B); ties count half a win.", "",
             *table(["B", "prompts", "A wins", "B wins", "ties", "A win rate", "95% CI", "decided by"], rows)]
    for r in results:
        lines += [f"Examples against `{fmt(r.get('b'))}`:", "",
                  *table(["prompt", "A", "B", "winner"], [[e.get("prompt"), e.get("answer_a"), e.get("answer_b"),
                                                           e.get("winner")] for e in r.get("examples", [])])]
    return lines


def _decided_by(options: dict) -> str:
    parts = [f"verifier {options['verifier']}" if options.get("verifier") else "",
             f"judge {options['judge']}" if options.get("judge") else ""]
    return " + ".join(p for p in parts if p) or "n/a"


def improve_section(run: RunDir) -> list[str]:
    """Per-round curves from rounds.jsonl: accuracy-like columns of every arm (the loop and its
    controls) on one plot, other numbers in small panels, all numbers in a table."""
    rows = [flatten(r) for r in read_jsonl(run.path / "rounds.jsonl") if isinstance(r, dict)]
    if not rows:
        return []
    xs = [r.get("round", i) for i, r in enumerate(rows)]
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "round"
            and any(_is_number(r.get(k)) for r in rows)]

    def series(k):
        pts = [(x, r[k]) for x, r in zip(xs, rows) if _is_number(r.get(k))]
        return [p[0] for p in pts], [p[1] for p in pts]

    accuracy = [k for k in keys if "acc" in k.lower()]
    lines = ["## Improve rounds", ""]
    lines += image(plot_lines({k: series(k) for k in accuracy}, run.path / "improve_accuracy.png", "round",
                              "accuracy"), "accuracy per round")
    lines += image(plot_series({k: series(k) for k in keys if k not in accuracy}, run.path / "improve_rounds.png",
                               "round"), "other numbers per round")
    shown = keys[:10]
    lines += table(["round", *shown], [[x, *[r.get(k) for k in shown]] for x, r in zip(xs, rows)])
    return lines


def stage_reports_section(run: RunDir) -> list[str]:
    """The numbers of fine-tuning stages run into this directory (<stage>_report.json)."""
    lines = []
    for path in sorted(run.path.glob("*_report.json")):
        numbers = {k: v for k, v in flatten(_read_json(path)).items()
                   if (_is_number(v) or isinstance(v, str)) and "confusion" not in k and "per_class" not in k}
        if numbers:
            lines += [f"### {path.stem.removesuffix('_report')}", "", *metric_table(numbers)]
    return ["## Fine-tuning stages", "", *lines] if lines else []


def substage_section(run: RunDir) -> list[str]:
    """Curves of stages that keep their own metrics.jsonl in a subfolder (alignment and others)."""
    lines = []
    for path in sorted(run.path.glob("*/metrics.jsonl")) + sorted(run.path.glob("*/*/metrics.jsonl")):
        sub = path.parent.relative_to(run.path).as_posix()
        prefix = "stage_" + re.sub(r"[^A-Za-z0-9_-]", "_", sub) + "_"
        curves = _curves(read_jsonl(path), run.path, prefix, f"{sub} loss curve")
        lines += [f"### {sub}", "", *curves] if curves else []
    return ["## Other stages", "", *lines] if lines else []


def bias_section(run: RunDir) -> list[str]:
    r = _read_json(run.path / "eval" / "bias.json")
    if not r.get("sets"):
        return []
    templates = r.get("templates", [])
    lines = ["## Bias probe", "", f"Method: {r.get('method', '')}. Checkpoint: `{r.get('checkpoint', 'n/a')}`.", "",
             "Templates:", "", *[f"{i + 1}. {fmt(t)}" for i, t in enumerate(templates)], ""]
    for name, s in r["sets"].items():
        diffs = list(zip(*s.get("diff", []))) or [[] for _ in s.get("groups", [])]  # [group][template]
        header = ["group", *[f"T{i + 1}" for i in range(len(templates))], "mean difference"]
        lines += [f"### {name} (spread of means {fmt(s.get('spread'))} nats)", "",
                  *table(header, [[g, *d, m] for g, d, m in zip(s["groups"], diffs, s.get("mean_diff", []))])]
    return lines


def samples_section(run: RunDir) -> list[str]:
    samples = read_jsonl(run.samples)[-3:]
    lines = []
    for s in samples:
        lines += fence(str(s.get("prompt", "")) + str(s.get("completion", "")))
    return ["## Samples", "", *lines] if lines else []


def data_section(run: RunDir) -> list[str]:
    card = run.data / "card.md"
    if card.is_file():
        text = re.sub(r"\A\s*# .*\n", "", card.read_text(encoding="utf-8"))  # our heading replaces its title
        text = re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)  # its sections nest under ours
        text = re.sub(r"(!\[[^\]]*\]\()(?![a-z]+:|/)", r"\1data/", text)  # its images live in data/
        return ["## Data card", "", text.strip(), ""]
    manifest = _read_json(run.manifest)
    if not manifest:
        return []
    splits = manifest.get("splits", {})
    return ["## Data", "", *table(["split", "documents", "characters"],
                                  [[s, v.get("documents"), v.get("chars")] for s, v in splits.items()])]


def config_section(run: RunDir) -> list[str]:
    lines = []
    for name in ("recipe.yaml", "improve.yaml"):
        path = run.path / name
        if path.is_file():
            lines += [f"`{name}`:", "", *fence(path.read_text(encoding="utf-8"), "yaml")]
    return ["## Config", "", *lines] if lines else []


SECTIONS = [summary_section, training_section, evaluation_section, classification_section, arena_section,
            improve_section, stage_reports_section, substage_section, bias_section, samples_section,
            data_section, config_section]


# --- the report -----------------------------------------------------------------------------------------------
def write_report(run: RunDir, bias: bool = True) -> Path:
    """report.md and report.html in the run directory; returns the markdown path. With `bias`, the
    bias probe is run first when the latest checkpoint has not been probed yet."""
    if bias:
        _refresh_bias_probe(run)
    lines = [f"# lathe report card: `{run.path.name}`", ""]
    for section in SECTIONS:
        lines += section(run)
    text = "\n".join(lines).rstrip() + "\n"
    write_text(run.report, text)
    write_text(run.path / "report.html", render_html(text, run.path, f"lathe report card: {run.path.name}"))
    return run.report


def _refresh_bias_probe(run: RunDir) -> None:
    from lathe.eval.bias import probe_run
    from lathe.eval.tasks import save_result
    from lathe.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run.checkpoints)
    current = _read_json(run.path / "eval" / "bias.json").get("checkpoint")
    if latest is None or current == latest.name:
        return
    try:
        result = probe_run(run.path, "cpu")
    except LatheError as e:  # e.g. adapter-only weights: the report is still worth writing
        warn(f"report: bias probe skipped ({e})")
        return
    if result is not None:
        save_result(run.path, "bias", result, [])


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}code{font-size:.9em}
img{max-width:100%;display:block;margin:.5em 0}
"""


def render_html(markdown_text: str, base: Path, title: str) -> str:
    """One self-contained page: the markdown rendered (raw HTML in it stays escaped text), local
    PNG images embedded as data URIs."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown_text)
    for token in tokens:
        for child in token.children or []:
            if child.type == "image":
                child.attrSet("src", _embedded(base, str(child.attrGet("src"))))
    body = md.renderer.render(tokens, md.options, {})
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n{body}</body></html>\n")


def _embedded(base: Path, src: str) -> str:
    path = base / src
    if src.endswith(".png") and path.is_file():
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return src
