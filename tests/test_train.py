import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lathe.config import TrainConfig
from lathe.io import read_jsonl
from lathe.train.schedule import lr_at

WORKER = Path(__file__).parent / "train_worker.py"
ENV = {**os.environ, "LATHE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def run_worker(*args, check=True, launcher=(sys.executable,)):
    return subprocess.run([*launcher, str(WORKER), *map(str, args)], env=ENV, capture_output=True, text=True,
                          check=False, timeout=240)


def final_params(out: Path) -> dict:
    return load_file(str(out / "final.safetensors"))


def assert_same(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k} differs by {(a[k] - b[k]).abs().max()}"


def test_schedules_warm_up_then_decay():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert abs(lr_at(100, cfg) - 0.1) < 1e-9 and lr_at(50, cfg) < lr_at(20, cfg)
    wsd = cfg.model_copy(update={"schedule": "wsd", "wsd_decay_fraction": 0.2})
    assert lr_at(79, wsd) == 1.0 and lr_at(90, wsd) < 1.0 and abs(lr_at(100, wsd) - 0.1) < 1e-9


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_worker(straight, "--steps", 20).returncode == 0
    # batch 13 is asked for during step 13, after the step-10 checkpoint: the kill loses 3 steps of work
    crash = run_worker(killed, "--steps", 20, "--kill-at-batch", 13)
    assert crash.returncode == -9, crash.stderr
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-000010"
    resumed = run_worker(killed, "--steps", 20, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same(final_params(straight), final_params(killed), atol=1e-6)
    # the resumed loss curve continues the first one: same steps, no duplicates
    steps = [r["step"] for r in read_jsonl(killed / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [r["step"] for r in read_jsonl(straight / "metrics.jsonl") if r["kind"] == "train"]


def test_torchrun_two_processes_match_gradient_accumulation(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    r1 = run_worker(single, "--steps", 6, "--accum", 2, "--dropout", 0)
    assert r1.returncode == 0, r1.stderr
    torchrun = (str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", "--master_port=29517")
    r2 = run_worker(ddp, "--steps", 6, "--accum", 1, "--dropout", 0, launcher=torchrun)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert_same(final_params(single), final_params(ddp), atol=1e-5)
    # both curves log the same loss (mean over the same 2 micro-batches)
    l1 = [r["loss"] for r in read_jsonl(single / "metrics.jsonl") if r["kind"] == "train"]
    l2 = [r["loss"] for r in read_jsonl(ddp / "metrics.jsonl") if r["kind"] == "train"]
    assert len(l1) == len(l2) > 0 and all(abs(a - b) < 1e-5 for a, b in zip(l1, l2))
