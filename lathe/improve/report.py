"""The improve run's report: report.md (rounds, kept/rejected with reasons, accuracy and perplexity per
round, promotions and rollbacks, the control arms) and improve.png (the curves of every arm)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from lathe.improve.data import ImproveRun  # noqa: E402
from lathe.io import read_json, read_jsonl, write_text  # noqa: E402

ARMS = ("loop", "keep-all", "no-loop")
LABELS = {"loop": "verifier-filtered loop", "keep-all": "keep-all (no verifier)", "no-loop": "no loop (same steps, originals only)"}


def arm_rows(run: ImproveRun) -> dict[str, list[dict]]:
    """rounds.jsonl of every arm that ran, each starting with a round-0 row for the shared base model."""
    base = read_json(run.work(0) / "eval.json")
    base_row = {"round": 0, "accuracy": base["accuracy"], "candidate_accuracy": base["accuracy"], "ppl": base["ppl"],
                "candidate_ppl": base["ppl"]}
    out = {}
    for name in ARMS:
        arm = run if name == "loop" else run.arm(name)
        if name == "loop" or arm.rounds.exists():
            out[name] = [base_row] + read_jsonl(arm.rounds)
    return out


def plot(arms: dict[str, list[dict]], path: Path) -> Path:
    fig, (acc, ppl) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for name, rows in arms.items():
        rounds = [r["round"] for r in rows]
        line, = acc.plot(rounds, [r["accuracy"] for r in rows], "o-", label=f"{LABELS[name]}: champion")
        acc.plot(rounds, [r["candidate_accuracy"] for r in rows], "x:", color=line.get_color(), alpha=0.6)
        ppl.plot(rounds, [r["ppl"] for r in rows], "o-", color=line.get_color(), label=LABELS[name])
        ppl.plot(rounds, [r["candidate_ppl"] for r in rows], "x:", color=line.get_color(), alpha=0.6)
    acc.set_title("held-out accuracy (greedy); x = candidate")
    acc.set_xlabel("round")
    acc.set_ylim(0, 1.02)
    ppl.set_title("held-out perplexity (answer tokens); x = candidate")
    ppl.set_xlabel("round")
    for ax in (acc, ppl):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(run: ImproveRun) -> Path:
    arms = arm_rows(run)
    state = read_json(run.state) if run.state.exists() else {}
    noise = read_json(run.work(0) / "noise.json") if (run.work(0) / "noise.json").exists() else {}
    image = plot(arms, run.path / "improve.png")
    loop = arms["loop"]
    lines = [f"# lathe improve report: `{run.path.name}`", ""]
    lines += [f"- base model (round 0): {loop[0]['accuracy']:.1%} held-out accuracy, perplexity {loop[0]['ppl']:.3f}"]
    if noise.get("accuracies", [])[1:]:
        lines += [f"- run-to-run spread of the base recipe: {noise['run_noise']:.3f} "
                  f"(accuracies {', '.join(f'{a:.3f}' for a in noise['accuracies'])})"]
    champion = max(loop, key=lambda r: r["round"])
    lines += [f"- champion after round {champion['round']}: round {champion.get('champion', 0)}, "
              f"{champion['accuracy']:.1%} held-out accuracy"]
    promoted = [r["round"] for r in loop[1:] if r["promoted"]]
    rolled_back = [r["round"] for r in loop[1:] if not r["promoted"]]
    lines += [f"- promotions: {len(promoted)} (rounds {', '.join(map(str, promoted)) or '-'}); rollbacks "
              f"(champion kept): {len(rolled_back)} (rounds {', '.join(map(str, rolled_back)) or '-'})"]
    if state.get("stopped"):
        lines += [f"- the loop stopped: {state['stopped']}"]
    lines += ["", f"![accuracy and perplexity per round]({image.name})", ""]
    lines += ["## Accuracy per round (champion after the round)", "",
              "| round | " + " | ".join(LABELS[a] for a in arms) + " |", "| --- |" + " --- |" * len(arms)]
    for i in range(max(len(rows) for rows in arms.values())):
        cells = [f"{rows[i]['accuracy']:.1%}" if i < len(rows) else "" for rows in arms.values()]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    for name, rows in arms.items():
        lines += ["", f"## {LABELS[name]}", "",
                  "| round | candidate acc | champion acc | ppl (candidate) | kept / candidates | rejected by | decision | seconds |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows[1:]:
            rejected = ", ".join(f"{k} {v}" for k, v in sorted(r["rejected_by"].items())) or "-"
            lines.append(f"| {r['round']} | {r['candidate_accuracy']:.1%} | {r['accuracy']:.1%} | "
                         f"{r['candidate_ppl']:.3f} | {r['kept']} / {r['candidates']} | {rejected} | "
                         f"{r['reason']} | {r.get('seconds', 'n/a')} |")
    lines += _rejection_examples(run, loop)
    write_text(run.path / "report.md", "\n".join(lines) + "\n")
    return run.path / "report.md"


def _rejection_examples(run: ImproveRun, rows: list[dict]) -> list[str]:
    out = []
    for r in rows[1:]:
        manifest = run.rework(r["round"]) / "manifest.json"
        if manifest.exists():
            for example in read_json(manifest).get("rejected_examples", []):
                out.append(f"- round {r['round']}: `{example}`")
    return ["", "## Some rejected samples (loop)", "", *out] if out else []
