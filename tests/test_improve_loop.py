"""The improve loop end to end on a tiny setting: accuracy rises, a kill anywhere resumes without losing or
duplicating data, the inbox joins the originals under --forever, rollbacks are recorded, --tune logs trials."""

import hashlib
import json
import os
import subprocess
import sys

from lathe.improve.config import load_improve_config
from lathe.improve.data import ImproveRun
from lathe.improve.loop import DIE_AT, improve
from lathe.improve.tune import tune
from lathe.io import read_json, read_jsonl

ENV = {**os.environ, "LATHE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def lathe_improve(cwd, *args, die_at=None):
    env = {**ENV, DIE_AT: die_at} if die_at else {k: v for k, v in ENV.items() if k != DIE_AT}
    return subprocess.run([sys.executable, "-m", "lathe", "improve", "--recipe", "improve-tiny", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def kept_by_round(run_dir) -> dict[int, list[tuple[str, str]]]:
    rework = run_dir / "data" / "rework"
    return {int(p.name.split("-")[1]): [(r["prompt"], r["answer"]) for r in read_jsonl(p / "samples.jsonl")]
            for p in sorted(rework.iterdir()) if p.name.startswith("round-")}


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_accuracy_rises_and_a_killed_loop_resumes_without_losing_or_duplicating(tmp_path):
    straight = lathe_improve(tmp_path, "--name", "straight")
    assert straight.returncode == 0, straight.stderr
    rows = read_jsonl(tmp_path / "runs/straight/rounds.jsonl")
    base = read_json(tmp_path / "runs/straight/work/round-0/eval.json")["accuracy"]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[-1]["accuracy"] > base + 0.1, (base, rows)  # the loop made the model better
    assert any(r["promoted"] for r in rows)
    assert (tmp_path / "runs/straight/report.md").exists() and (tmp_path / "runs/straight/improve.png").exists()
    verdicts = read_jsonl(tmp_path / "runs/straight/work/round-1/verdicts.jsonl")
    written = [v for v in verdicts if v["source"] == "self:new-task"]  # prompts the champion wrote itself
    assert written and any(v["kept"] for v in written)

    # killed after round 1's samples are in place but before state.json knows it
    first = lathe_improve(tmp_path, "--name", "k", die_at="loop:1:accumulate")
    assert first.returncode == -9, first.stderr
    run = tmp_path / "runs/k"
    assert (run / "data/rework/round-1/samples.jsonl").exists()
    assert read_json(run / "state.json")["phase"] == "verify"
    orig_before = digest(run / "data/orig")
    # resumed, then killed in the middle of round 2's retraining (after its step-50 checkpoint)
    second = lathe_improve(tmp_path, "--name", "k", "--resume", die_at="loop:2:retrain@70")
    assert second.returncode == -9, second.stderr
    third = lathe_improve(tmp_path, "--name", "k", "--resume")
    assert third.returncode == 0, third.stderr

    kept = kept_by_round(run)
    every = [pair for pairs in kept.values() for pair in pairs]
    assert len(every) == len(set(every)) > 0  # each kept sample exactly once across the round folders
    assert kept == kept_by_round(tmp_path / "runs/straight")  # and nothing lost against the uninterrupted run
    assert digest(run / "data/orig") == orig_before  # the originals are byte-identical
    assert [r["round"] for r in read_jsonl(run / "rounds.jsonl")] == [1, 2]
    for r, pairs in kept.items():
        manifest = read_json(run / f"data/rework/round-{r}/manifest.json")
        assert manifest["kept"] == len(pairs)
    sample = read_jsonl(run / "data/rework/round-1/samples.jsonl")[0]
    assert sample["model"].startswith("round-0 champion models/round-0/checkpoints/step-")
    assert sample["verifier"] == "addition" and sample["reason"].startswith("correct")


def test_forever_inbox_joins_the_originals_and_rollbacks_are_recorded(tmp_path):
    # min_gain 1.0 can never be met: every candidate is rolled back, with the reason recorded
    cfg = load_improve_config("improve-tiny", ["gate.min_gain=1.0", "train.max_steps=100", "retrain.max_steps=20",
                                               "propose.prompts_per_round=100"])
    run = ImproveRun(tmp_path / "f")
    improve(run, cfg, forever=True, max_rounds=1)
    seed_bytes = (run.orig / "seed.jsonl").read_bytes()
    run.inbox.mkdir()
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(90, 95)]
    (run.inbox / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    improve(run, cfg, forever=True, max_rounds=2)
    files = read_json(run.orig / "manifest.json")["files"]
    joined = [meta for name, meta in files.items() if name.startswith("inbox-")]
    assert len(joined) == 1 and joined[0]["round"] == 2 and joined[0]["from"] == "new.jsonl"
    assert not any(run.inbox.iterdir())
    assert (run.orig / "seed.jsonl").read_bytes() == seed_bytes
    rounds = read_jsonl(run.rounds)
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(not r["promoted"] and r["champion"] == 0 and "champion kept" in r["reason"] for r in rounds)
    assert "champion kept" in (run.path / "report.md").read_text()
    assert not (run.path / "controls").exists()  # no control arms under --forever


def test_tune_keeps_a_helpful_change_discards_a_harmful_one_and_logs_a_crash(tmp_path):
    # single-digit sums and a one-layer model: seconds per trial. The starting recipe's learning rate
    # is far too small to learn anything in the budget.
    cfg = load_improve_config("improve-tiny", [
        "task.options={digits: 1}", "task.seed_sets=[{size: 60}]", "task.heldout_size=40", "task.answer_order=natural",
        "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=12", "train.weight_decay=0.1",
        "train.max_steps=200", "train.eval_every=200", "propose.max_answer_tokens=3", "train.lr=1e-5",
        'tune.trials=["lr*500", "lr/500", "width=33"]'])
    run = ImproveRun(tmp_path / "t")
    tune(run, cfg)
    lines = (run.path / "tune_results.tsv").read_text().splitlines()
    header, *rows = [line.split("\t") for line in lines]
    assert header == ["trial", "change", "score", "noise", "status", "reason", "seconds"]
    status = {r[1]: r[4] for r in rows}
    assert status == {"(baseline)": "kept", "lr*500": "kept", "lr/500": "discarded", "width=33": "crashed"}
    crashed = next(r for r in rows if r[1] == "width=33")
    assert "n_embd" in crashed[5]
    assert abs(load_improve_config(run.path / "tune_best.yaml").train.lr - 5e-3) < 1e-12


def test_control_arms_run_side_by_side_in_worker_processes_with_the_same_results(tmp_path):
    short = ["train.max_steps=100", "retrain.max_steps=20", "propose.prompts_per_round=100", "controls=true",
             "rounds=1"]
    results = {}
    for workers in (1, 2):
        cfg = load_improve_config("improve-tiny", short + [f"workers={workers}"])
        results[workers] = improve(ImproveRun(tmp_path / f"workers-{workers}"), cfg)

    def comparable(arms):  # seconds differ; everything else is a function of the seeds
        return {arm: [{k: v for k, v in row.items() if k != "seconds"} for row in rows] for arm, rows in arms.items()}

    assert set(results[2]) == {"loop", "keep-all", "no-loop"}
    assert all([row["round"] for row in rows] == [1] for rows in results[2].values())
    assert comparable(results[2]) == comparable(results[1])
