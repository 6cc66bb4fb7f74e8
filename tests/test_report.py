"""The report card: report.md and a self-contained report.html from a run directory filled by the real
stages (training loop, eval tasks, arena, bias probe); every PNG it shows opens as an image."""

import base64
import io
import json
import re

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from PIL import Image

from lathe.config import ModelConfig, TokenizerConfig, TrainConfig, dump_recipe, load_recipe
from lathe.eval import arena, tasks
from lathe.eval.perplexity import evaluate_lm
from lathe.io import append_jsonl, write_json
from lathe.model import GPT
from lathe.report import write_report
from lathe.rundir import RunDir
from lathe.tokenizer import train_tokenizer
from lathe.train.batches import random_windows
from lathe.train.loop import train

DOCS = [f"{a}+{b}={a + b}\nThe man was kind. The woman was a doctor.\n" for a in range(10) for b in range(10)]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    """A run with pretraining metrics, eval results of several tasks, an arena, improve rounds, a
    subfolder stage, samples, a data card and a recipe."""
    run = RunDir(tmp_path_factory.mktemp("card"))
    tok = train_tokenizer(DOCS, TokenizerConfig(vocab_size=300, min_frequency=1))
    tok.save(run.tokenizer)
    tokens = np.array([t for d in DOCS for t in [tok.bos_id, *tok.encode(d)]])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=32))
    cfg = TrainConfig(max_steps=12, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=4, checkpoint_every=12,
                      log_every=2, device="cpu")

    def evaluate(m):
        return {f"val_{k}": v for k, v in evaluate_lm(m, tokens[:400], tok.token_bytes(), 200).items()}

    result = train(model, cfg, random_windows(tokens, 32, 4, 0), evaluate, run.path)
    write_json(run.path / "train_summary.json", result.__dict__)
    write_json(run.eval, {f"test_{k}": v for k, v in evaluate_lm(model, tokens[400:], tok.token_bytes(), 300).items()})
    run.recipe.write_text(dump_recipe(load_recipe("tiny")))
    (run.data).mkdir()
    (run.data / "card.md").write_text("# Data card\n\n| source | documents |\n| --- | --- |\n| notes | 100 |\n\n"
                                      "![lengths](lengths.png)\n")
    Image.new("RGB", (8, 8), "red").save(run.data / "lengths.png")
    append_jsonl(run.samples, {"prompt": "def ", "completion": "f():\n    ``` | <script>alert(1)</script>"})

    mc = [{"question": "2+2=", "options": ["4", "5"], "answer": 0},
          {"question": "1+1=", "options": ["3", "2"], "answer": 1}]
    tasks.save_result(run.path, "mc-quiz", *tasks.eval_mc(model, tok, mc, data="quiz.jsonl"))
    pairs = [("pos", "pos"), ("neg", "pos"), ("neg", "neg"), ("pos|x", "neg")]
    rows = [{"label": t, "prediction": p} for t, p in pairs]
    tasks.save_result(run.path, "classify-preds", *tasks.eval_classify(rows, data="preds.jsonl"))
    me = arena.Contestant("me", model, tok)
    tasks.save_result(run.path, "arena-me", *arena.run_arena(me, me, arena.task_prompts("addition", 3, 0),
                                                             verifier="addition", max_tokens=4, stop=["\n"]))
    for r in range(3):  # improve rounds: the loop and its two controls
        append_jsonl(run.path / "rounds.jsonl", {"round": r, "accuracy": {"loop": 0.3 + 0.2 * r, "no_loop": 0.3,
                                                                         "keep_all": 0.3 + 0.05 * r}, "kept": 10 * r})
    train(GPT(model.cfg), cfg.model_copy(update={"max_steps": 4}), random_windows(tokens, 32, 4, 1), evaluate,
          run.path / "dpo")
    write_report(run)
    return run


def pngs_in(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_report_has_every_section(run):
    md = run.report.read_text()
    for heading in ["## Summary", "## Training", "## Evaluation", "### mc-quiz", "## Classification",
                    "## Arena", "## Improve rounds", "## Other stages", "### dpo", "## Bias probe",
                    "### gender", "## Samples", "## Data card", "## Config"]:
        assert heading in md, heading
    assert "tokens/s" in md and "bits-per-byte" in md and "parameters" in md
    html = (run.path / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html
    assert html.count("<h2>") == md.count("\n## ") and "<table>" in html


def test_every_plot_is_a_png_that_opens(run):
    md = run.report.read_text()
    names = pngs_in(md)
    for expected in ["loss.png", "confusion_classify-preds.png", "improve_accuracy.png", "stage_dpo_loss.png",
                     "data/lengths.png"]:
        assert expected in names, names
    for name in names:
        data = (run.path / name).read_bytes()
        assert data[:8] == PNG, name
        Image.open(io.BytesIO(data)).verify()
        assert mpimg.imread(run.path / name).shape[0] > 0
    # the HTML embeds the same images, so the page stands alone
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', (run.path / "report.html").read_text())
    assert len(embedded) == len(names)
    assert all(base64.b64decode(e)[:8] == PNG for e in embedded)


def test_tables_show_the_saved_numbers(run):
    md = run.report.read_text()
    mc = json.loads((run.path / "eval" / "mc-quiz.json").read_text())
    assert f"| accuracy | {mc['metrics']['accuracy']:.4f} |" in md
    bias = json.loads((run.path / "eval" / "bias.json").read_text())
    woman = bias["sets"]["gender"]["groups"].index("woman")
    assert f"{bias['sets']['gender']['mean_diff'][woman]:.4f} |" in md.split("### gender")[1].split("###")[0]
    assert bias["checkpoint"] == "step-000012"
    rate = json.loads((run.path / "eval" / "arena-me.json").read_text())["win_rate"]
    assert rate["rate"] == 0.5 and f"| {rate['rate']:.4f} |" in md
    assert "| 2 | 0.7000 | 0.3000 | 0.4000 | 20 |" in md  # improve round 2: loop, no_loop, keep_all, kept


def test_text_cannot_break_the_page(run):
    md, html = run.report.read_text(), (run.path / "report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html  # sample text stays text
    assert "``` | <script>" in md.split("## Samples")[1]  # a longer fence keeps the sample whole
    assert "pos\\|x" in md and "<td>pos|x</td>" in html  # a pipe inside a cell stays in its cell


def test_report_reuses_the_bias_probe_of_the_same_checkpoint(run):
    bias = run.path / "eval" / "bias.json"
    before = bias.stat().st_mtime_ns
    write_report(run)
    assert bias.stat().st_mtime_ns == before


def test_plain_run_without_extras(tmp_path):
    run = RunDir(tmp_path)
    append_jsonl(run.metrics, {"step": 1, "kind": "train", "loss": 3.0, "tokens_per_s": 10.0, "tokens_seen": 64})
    append_jsonl(run.metrics, {"step": 2, "kind": "train", "loss": 2.5, "tokens_per_s": 12.0, "tokens_seen": 128})
    write_report(run)
    md = run.report.read_text()
    assert "## Training" in md and "## Bias probe" not in md and "## Arena" not in md
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG
    assert (tmp_path / "report.html").exists()
