"""The whole recipe through the real CLI on the tiny recipe (default corpus: Python stdlib sources)."""

import json
import os
import random
import subprocess
import sys

ENV = {**os.environ, "LATHE_NO_PROGRESS": "1"}


def lathe(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "lathe", *map(str, args)], cwd=cwd, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_tiny_recipe_end_to_end(tmp_path):
    lathe("run", "--recipe", "tiny", "--name", "e2e", cwd=tmp_path)
    run = tmp_path / "runs" / "e2e"
    for name in ["recipe.yaml", "data/manifest.json", "tokenizer.json", "tokens/train.bin", "tokens/meta.json",
                 "checkpoints/latest", "metrics.jsonl", "eval.json", "samples.jsonl", "report.md", "loss.png"]:
        assert (run / name).exists(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev = json.loads((run / "eval.json").read_text())
    assert ev["test_loss"] < ev["unigram_entropy"], ev  # the model uses context
    report = (run / "report.md").read_text()
    assert "tokens/s" in report and "bits-per-byte" in report and "parameters" in report

    # the stage verbs work on the newest run; CLI flags override the recipe
    out = lathe("generate", "--prompt", "import ", "--max-tokens", "8", "--num-samples", "2", "--seed", "3", cwd=tmp_path)
    assert out.stdout.count("import ") >= 2
    again = lathe("generate", "--prompt", "import ", "--max-tokens", "8", "--num-samples", "2", "--seed", "3", cwd=tmp_path)
    assert again.stdout == out.stdout
    lathe("eval", "--run", run, cwd=tmp_path)
    assert json.loads((run / "eval.json").read_text())["test_loss"] == ev["test_loss"]


def test_run_on_own_folder_with_resume(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    rng = random.Random(0)
    words = "river stone lamp quiet orbit maple signal harbor velvet ember cobalt meadow".split()
    for i in range(40):  # distinct documents: near-duplicate removal must keep them all
        (docs / f"{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(120)) + ".")
    lathe("run", "--recipe", "tiny", "--data", "docs", "--name", "own", "--steps", "20", cwd=tmp_path)
    manifest = json.loads((tmp_path / "runs/own/data/manifest.json").read_text())
    assert list(manifest["sources"]) == ["docs"]
    assert sum(v["documents"] for v in manifest["splits"].values()) == 40
    # continuing a finished run with more steps resumes from its last checkpoint
    out = lathe("run", "--recipe", "tiny", "--data", "docs", "--name", "own", "--steps", "30", "--resume", cwd=tmp_path)
    assert "resuming pretrain" in out.stderr
    rows = [json.loads(l) for l in (tmp_path / "runs/own/metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 30
    # resuming a run that already finished trains nothing and keeps its summary
    summary = (tmp_path / "runs/own/train_summary.json").read_text()
    out = lathe("run", "--recipe", "tiny", "--data", "docs", "--name", "own", "--steps", "30", "--resume", cwd=tmp_path)
    assert "already finished at step 30" in out.stderr
    assert (tmp_path / "runs/own/train_summary.json").read_text() == summary
    assert json.loads(summary)["last_eval"]["val_loss"] > 0
