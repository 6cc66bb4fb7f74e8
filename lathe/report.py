"""The run's report: report.md with the numbers that matter and a loss-curve PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from lathe.io import read_json, read_jsonl, write_text  # noqa: E402
from lathe.rundir import RunDir  # noqa: E402


def plot_loss(metrics: list[dict], path: Path) -> Path | None:
    train = [r for r in metrics if r.get("kind") == "train"]
    evals = [r for r in metrics if r.get("kind") == "eval" and "val_loss" in r]
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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def write_report(run: RunDir) -> Path:
    metrics = read_jsonl(run.metrics)
    evaluation = read_json(run.eval) if run.eval.exists() else {}
    summary = read_json(run.path / "train_summary.json") if (run.path / "train_summary.json").exists() else {}
    manifest = read_json(run.manifest) if run.manifest.exists() else {}
    samples = read_jsonl(run.samples)[-3:]
    plot = plot_loss(metrics, run.path / "loss.png")
    train_rows = [r for r in metrics if r.get("kind") == "train"]
    evals = [r for r in metrics if r.get("kind") == "eval"]
    tok_s = [r["tokens_per_s"] for r in train_rows[1:]] or [r["tokens_per_s"] for r in train_rows]

    lines = [f"# lathe run report: `{run.path.name}`", ""]
    lines += ["## Summary", "", "| metric | value |", "| --- | --- |"]
    rows = [
        ("parameters", f"{evaluation.get('params', summary.get('params', 0)):,}"),
        ("training steps", f"{summary.get('step', 'n/a')} (stopped: {summary.get('stopped', 'n/a')})"),
        ("tokens seen", f"{train_rows[-1]['tokens_seen']:,}" if train_rows else "n/a"),
        ("training throughput (median tokens/s)", f"{sorted(tok_s)[len(tok_s) // 2]:,.0f}" if tok_s else "n/a"),
        ("final validation loss (nats/token)", _fmt(evals[-1].get("val_loss") if evals else None)),
        ("final validation bits-per-byte", _fmt(evals[-1].get("val_bpb") if evals else None)),
        ("test loss (nats/token)", _fmt(evaluation.get("test_loss"))),
        ("test perplexity", _fmt(evaluation.get("test_ppl"), ".2f")),
        ("test bits-per-byte", _fmt(evaluation.get("test_bpb"))),
        ("unigram entropy of training tokens (nats/token)", _fmt(evaluation.get("unigram_entropy"))),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if plot:
        lines += ["", "## Loss curve", "", f"![loss curve]({plot.name})"]
    if manifest:
        lines += ["", "## Data", "", "| split | documents | characters |", "| --- | --- | --- |"]
        for split, v in manifest.get("splits", {}).items():
            lines.append(f"| {split} | {v.get('documents', 'n/a')} | {v.get('chars', 'n/a')} |")
    if samples:
        lines += ["", "## Samples", ""]
        for s in samples:
            lines += ["```", s["prompt"] + s["completion"], "```", ""]
    write_text(run.report, "\n".join(lines) + "\n")
    return run.report
