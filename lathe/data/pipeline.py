"""The data stage: sources -> plan -> datatrove stages -> data/{train,val,test}.jsonl, manifest, card.

    manifest = prepare_data(recipe.data, run)
    for row in read_split(run, "train"): row["id"], row["source"], row["text"]

prepare_data resolves the sources (errors before anything is written), makes the plan (budget, tasks;
see plan.py), writes it to the work folder, builds the five stages (executors.py) and runs them. Locally
it waits, then reports: a warning per skipped file, the budget, and the mixture with its estimated
tokens. On Slurm it returns once the job arrays are submitted; the manifest appears when they finish.

The work folder (data.work_dir, default <run>/data/.work) holds the intermediate files: shards of
cleaned documents, MinHash signatures, duplicate lists, per-task counts. It is removed after a
successful local run unless data.keep_work. Cluster runs resume: tasks already completed are skipped
when the configuration and the plan are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterator

from lathe.config import DataConfig
from lathe.console import info, warn
from lathe.data.card import TOKEN_ESTIMATE, est_tokens
from lathe.data.dedup import build_decont_index, candidate_probability, lsh_params
from lathe.data.filters import language_unavailable
from lathe.data.ledger import Ledger
from lathe.data.plan import Plan, make_plan
from lathe.data.sources import resolve_sources
from lathe.data.splits import SPLITS, Doc, assign_splits  # noqa: F401  (Doc, assign_splits: public API)
from lathe.errors import LatheError
from lathe.io import read_json
from lathe.rundir import RunDir

MAX_SKIP_WARNINGS = 10  # warnings printed before the rest are only counted
FILTER_NAMES = ("gopher_repetition", "gopher_quality", "c4", "fineweb", "language")


def work_dir(cfg: DataConfig, run: RunDir) -> str:
    return cfg.work_dir or str((run.data / ".work").resolve())


def prepare_data(cfg: DataConfig, run: RunDir) -> dict:
    """Collect, clean, filter, deduplicate, mix and split documents into run.data/{train,val,test}.jsonl;
    return the manifest (on Slurm: a note of what was submitted)."""
    from datatrove.io import get_datafolder

    from lathe.data.executors import build_stages, make_executors, run_cluster, run_local

    sources = resolve_sources(cfg)
    ledger = Ledger()
    plan = make_plan(cfg, sources, ledger)
    work = work_dir(cfg, run)
    folder = get_datafolder(work)
    fingerprint = _fingerprint(cfg, plan)
    if cfg.executor == "local" or not _same_fingerprint(folder, fingerprint):
        _clear(folder, work)
    _write_plan(folder, cfg, plan, ledger, fingerprint)
    run.data.mkdir(parents=True, exist_ok=True)
    weights = {s["label"]: s["weight"] for s in plan.sources}
    stages = build_stages(cfg, work, str(run.path.resolve()), plan.tasks, weights)
    executors = make_executors(stages, cfg, work)
    info(f"data: {sum(len(s.files) for s in sources):,} files in {len(sources)} source(s), "
         f"{len(plan.files):,} to read in {plan.tasks} task(s) with the {cfg.executor} executor")
    if cfg.executor != "local":
        run_cluster(executors)
        if cfg.executor == "slurm":
            info(f"data: submitted to Slurm; {run.manifest} appears when the last job ends (logs: {work}/logs)")
            return {"submitted": "slurm", "work_dir": work, "splits": {}}
    else:
        run_local(stages, executors)
    manifest = read_json(run.manifest)
    _report(cfg, manifest)
    info(f"data: card at {run.data / 'card.md'}")
    if cfg.executor == "local" and not cfg.keep_work:
        folder.rm("", recursive=True)
    return manifest


def _fingerprint(cfg: DataConfig, plan: Plan) -> str:
    text = cfg.model_dump_json() + plan.to_lines()
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _clear(folder, work: str) -> None:
    """Empty the work folder, but only one lathe made (it has a fingerprint) or an empty one."""
    if not folder.exists(""):
        return
    if not folder.exists("fingerprint") and folder.ls("", detail=False):
        raise LatheError(f"data.work_dir {work} holds files that lathe did not write; give a new or empty folder")
    folder.rm("", recursive=True)


def _same_fingerprint(folder, fingerprint: str) -> bool:
    try:
        with folder.open("fingerprint", "r") as f:
            return f.read().strip() == fingerprint
    except FileNotFoundError:
        return False


def _write_plan(folder, cfg: DataConfig, plan: Plan, ledger: Ledger, fingerprint: str) -> None:
    """Everything the tasks read besides the documents: plan, sources, settings for the card, plan counts."""
    with folder.open("plan.jsonl", "w") as f:
        f.write(plan.to_lines())
    with folder.open("sources.json", "w") as f:
        json.dump(plan.sources, f)
    with folder.open("stats/plan/00000.json", "w") as f:
        f.write(ledger.to_json())
    decont_sets = build_decont_index(cfg, _subfolder(folder, "decont")) if cfg.decontaminate.sets else {}
    with folder.open("run.json", "w") as f:
        json.dump(_card_settings(cfg, plan, decont_sets), f)
    with folder.open("fingerprint", "w") as f:
        f.write(fingerprint)


def _subfolder(folder, name: str):
    from datatrove.io import get_datafolder

    return get_datafolder(folder.resolve_paths(name))


def _card_settings(cfg: DataConfig, plan: Plan, decont_sets: dict) -> dict:
    bands, rows = lsh_params(cfg.dedup)
    filters = {}
    for name in FILTER_NAMES:
        section = getattr(cfg.filters, name)
        status = "on" if section.enabled else "off"
        if name == "language" and section.enabled and (why := language_unavailable(cfg.filters)):
            status = why
        filters[name] = {"status": status, "params": section.model_dump(exclude={"enabled"}) if status == "on" else {}}
    return {
        "sources": plan.sources, "tasks": plan.tasks, "budget_reached": plan.budget_reached, "filters": filters,
        "dedup": {"exact": cfg.dedup.exact, "near": cfg.dedup.near, "ngram": cfg.dedup.ngram,
                  "threshold": cfg.dedup.threshold, "bands": bands, "rows": rows,
                  "curve": {s: candidate_probability(s, bands, rows) for s in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)}},
        "decontamination": {"ngram": cfg.decontaminate.ngram, "sets": decont_sets},
        "boilerplate": cfg.boilerplate.model_dump(),
    }


def _report(cfg: DataConfig, manifest: dict) -> None:
    """Warnings for skipped files, the budget, and the mixture the tokenizer will see."""
    skips = [(name, s) for name, src in manifest["sources"].items() for s in src["skipped_files"]]
    for _, s in skips[:MAX_SKIP_WARNINGS]:
        warn(f"skipped {s['reason']}")
    if len(skips) > MAX_SKIP_WARNINGS or manifest["totals"]["files_skipped"] > len(skips[:MAX_SKIP_WARNINGS]):
        warn(f"{manifest['totals']['files_skipped']:,} files skipped in all; the manifest lists them per source")
    empty = [s for s in SPLITS if not manifest["splits"][s]["documents"]
             and (s == "train" or getattr(cfg, f"{s}_fraction") > 0)]
    if empty:
        warn(f"only {manifest['totals']['documents']} document(s): split(s) {', '.join(empty)} are empty")
    if manifest["budget_reached"]:
        info(f"data: stopped at max_total_bytes={cfg.max_total_bytes:,} "
             f"({manifest['budget']['selected_bytes']:,} input bytes read, {manifest['totals']['bytes']:,} kept)")
    train = sum(src["steps"].get("split_train", {}).get("bytes", 0) for src in manifest["sources"].values()) or 1
    info(f"data: mixture of train (tokens = {TOKEN_ESTIMATE}):")
    for name, src in manifest["sources"].items():
        t = src["steps"].get("split_train", {"documents": 0, "bytes": 0})
        info(f"  {name:24s} weight {src['weight']:<5g} {t['documents']:>9,} rows {est_tokens(t['bytes']):>13,} "
             f"tokens  {t['bytes'] / train:6.1%}")


def read_split(run: RunDir, split: str) -> Iterator[dict]:
    """The rows {"id", "source", "text"} of one split, in file order."""
    from lathe.data.readers import json_loads

    if split not in SPLITS:
        raise LatheError(f"unknown split '{split}' (one of: {', '.join(SPLITS)})")
    path = run.require(run.split_file(split), "data")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json_loads(line)
                except ValueError as e:
                    raise LatheError(f"{path}:{lineno}: not valid JSON ({e}); rerun `lathe data`") from None
