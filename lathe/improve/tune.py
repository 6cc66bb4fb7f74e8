"""`lathe improve --tune`: the trainer proposes changes to its own recipe and keeps what helps.

Each trial applies one change (learning rate, width, depth, schedule, data mix) to the current best
recipe, trains from scratch under the same fixed budget (train.max_steps / train.max_time_s) on the
same data (the originals plus every kept rework round), and is scored on the held-out set. It is
kept only if it beats the current recipe beyond noise (the gate of the loop, with the run-to-run
spread measured by training the starting recipe with several seeds). A trial that crashes (an
invalid config, an error while training) is logged as crashed and the tuner goes on.

Changes are written `name<op>value`: op is = * / + -, name an alias (lr, width, depth, heads, batch,
schedule, warmup, rework_share) or a dotted field (train.weight_decay).
Results: tune_results.tsv (every trial) and tune_best.yaml (the recipe that won) in the run dir.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

import yaml
from pydantic import ValidationError

from lathe.config import format_validation_error
from lathe.console import info, warn
from lathe.errors import LatheError
from lathe.improve.config import ImproveConfig, dump_config
from lathe.improve.data import ImproveRun, load_originals, load_rework
from lathe.improve.gate import decide, run_spread
from lathe.improve.loop import Workshop, setup_run
from lathe.io import read_json, write_json, write_text

ALIASES = {
    "lr": ["train.lr", "retrain.lr"],
    "width": ["model.n_embd"],
    "depth": ["model.n_layer"],
    "heads": ["model.n_head"],
    "batch": ["train.batch_size", "retrain.batch_size"],
    "schedule": ["train.schedule", "retrain.schedule"],
    "warmup": ["train.warmup_steps", "retrain.warmup_steps"],
    "rework_share": ["rework_share"],
}
TUNABLE = ("model", "train", "retrain", "retrain_from", "rework_share")
CHANGE = re.compile(r"\s*([A-Za-z_][\w.]*)\s*([=*/+-])\s*(.+?)\s*")
COLUMNS = ["trial", "change", "score", "noise", "status", "reason", "seconds"]


def apply_change(cfg: ImproveConfig, change: str) -> ImproveConfig:
    """The config with one change applied; an unknown field or an invalid result is a LatheError."""
    match = CHANGE.fullmatch(change)
    if match is None:
        raise LatheError(f"change {change!r} must look like name=value, name*2, name/2, name+1 or name-1")
    name, op, text = match.groups()
    raw = cfg.model_dump()
    value = yaml.safe_load(text)
    for path in ALIASES.get(name, [name]):
        if path.split(".")[0] not in TUNABLE:
            raise LatheError(f"change {change!r}: tuning changes the training recipe only ({', '.join(TUNABLE)})")
        *parents, leaf = path.split(".")
        node = raw
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise LatheError(f"change {change!r}: no section '{key}'")
            node = node[key]
        if leaf not in node:
            raise LatheError(f"change {change!r}: unknown field '{path}'")
        node[leaf] = value if op == "=" else _arithmetic(node[leaf], op, value, change)
    try:
        return ImproveConfig.model_validate(raw)
    except ValidationError as e:
        raise LatheError(format_validation_error(e, f"change {change!r}")) from None


def _arithmetic(current, op: str, operand, change: str):
    if not isinstance(current, (int, float)) or isinstance(current, bool) or not isinstance(operand, (int, float)):
        raise LatheError(f"change {change!r}: '{op}' needs a numeric field and a number")
    result = {"*": current * operand, "/": current / operand, "+": current + operand, "-": current - operand}[op]
    return round(result) if isinstance(current, int) and float(result).is_integer() else result


@dataclass
class Trial:
    accuracy: float
    correct: list[int]
    seconds: float


def run_trial(ws: Workshop, run: ImproveRun, cfg: ImproveConfig, seed: int, examples, rework) -> Trial:
    """Train cfg from scratch under its train budget and score it; reuses a finished identical trial."""
    key = hashlib.sha256(f"{dump_config(cfg)}{seed}".encode()).hexdigest()[:12]
    out = run.path / "tune" / f"trial-{key}"
    if (out / "score.json").exists():
        saved = read_json(out / "score.json")
        return Trial(saved["accuracy"], saved["correct"], saved["seconds"])
    started = time.perf_counter()
    train_cfg = cfg.train.model_copy(update={"seed": seed})
    model = ws.new_model(cfg, seed)
    ws.fit(model, train_cfg, examples, rework, out, cfg.rework_share, f"tune seed {seed}")
    scored = ws.score(model)
    trial = Trial(scored["accuracy"], scored["correct"], time.perf_counter() - started)
    write_json(out / "score.json", {**trial.__dict__, "config": cfg.model_dump(mode="json")})
    return trial


def tune(run: ImproveRun, cfg: ImproveConfig) -> list[dict]:
    """Run every trial of cfg.tune.trials in order; write tune_results.tsv and tune_best.yaml."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run.path.mkdir(parents=True, exist_ok=True)
    setup_run(run, cfg)
    ws = Workshop(run, cfg)
    examples = load_originals(run)
    rework = load_rework(run, 10**6)
    baseline = [run_trial(ws, run, cfg, cfg.train.seed + s, examples, rework) for s in range(cfg.tune.seeds)]
    noise = run_spread([t.accuracy for t in baseline])
    best, best_trial = cfg, baseline[0]
    rows = [{"trial": 0, "change": "(baseline)", "score": best_trial.accuracy, "noise": noise, "status": "kept",
             "reason": f"starting recipe; {len(baseline)} seeds: "
                       + ", ".join(f"{t.accuracy:.3f}" for t in baseline), "seconds": sum(t.seconds for t in baseline)}]
    _write_results(run, rows)
    for i, change in enumerate(cfg.tune.trials, 1):
        row = {"trial": i, "change": change, "score": "", "noise": ""}
        try:
            candidate = apply_change(best, change)
            trial = run_trial(ws, run, candidate, cfg.train.seed, examples, rework)
            d = decide(trial.correct, best_trial.correct, cfg.gate.margin_sigma, cfg.gate.min_gain, noise,
                       cfg.gate.bootstrap, seed=i)
            row.update(score=trial.accuracy, noise=d.noise, status="kept" if d.promote else "discarded",
                       reason=d.reason.replace("champion", "current recipe"), seconds=trial.seconds)
            if d.promote:
                best, best_trial = candidate, trial
        except Exception as e:  # noqa: BLE001 - a broken trial is a result, never the end of tuning
            row.update(status="crashed", reason=f"{type(e).__name__}: {e}".replace("\n", " "), seconds=0.0)
            warn(f"tune trial {i} ({change}) crashed: {row['reason']}")
        rows.append(row)
        _write_results(run, rows)
        info(f"tune trial {i}: {change:<16} {row['status']:<9} {row['reason']}")
    write_text(run.path / "tune_best.yaml", dump_config(best))
    info(format_table(rows))
    info(f"tune: results in {run.path / 'tune_results.tsv'}, best recipe in {run.path / 'tune_best.yaml'}")
    return rows


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("\t", " ")


def _write_results(run: ImproveRun, rows: list[dict]) -> None:
    lines = ["\t".join(COLUMNS)] + ["\t".join(_cell(r.get(c, "")) for c in COLUMNS) for r in rows]
    write_text(run.path / "tune_results.tsv", "\n".join(lines) + "\n")


def format_table(rows: list[dict]) -> str:
    head = f"{'trial':>5}  {'change':<18} {'score':>7} {'± noise':>8}  {'status':<9} reason"
    body = [f"{r['trial']:>5}  {r['change']:<18} {_cell(r['score']):>7} {_cell(r['noise']):>8}  {r['status']:<9} {r['reason']}"
            for r in rows]
    return "\n".join([head, *body])
