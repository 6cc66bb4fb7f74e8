"""The pretraining recipe as stages. Each stage reads the previous stage's outputs from the run dir.

data -> tokenizer -> pretrain -> eval -> generate -> report. `run_recipe` runs them all; the CLI
verbs and the Python API call the same functions.
"""

from __future__ import annotations

import numpy as np
import torch

from lathe.config import Recipe, dump_recipe, load_recipe
from lathe.console import info
from lathe.data import prepare_data
from lathe.errors import LatheError
from lathe.eval.metrics import unigram_entropy
from lathe.eval.perplexity import evaluate_lm
from lathe.generate import generate
from lathe.io import append_jsonl, read_json, write_json, write_text
from lathe.model import GPT
from lathe.report import write_report
from lathe.rundir import RunDir
from lathe.tokenizer import Tokenizer, encode_shards, load_tokens, train_tokenizer_stage
from lathe.train.batches import in_reading_order, random_windows
from lathe.train.checkpoint import latest_checkpoint, load_model
from lathe.train.loop import TrainResult, train


def save_recipe(run: RunDir, recipe: Recipe) -> None:
    write_text(run.recipe, dump_recipe(recipe))


def run_recipe_of(run: RunDir, overrides: list[str] | None = None, recipe_path=None) -> Recipe:
    """The recipe a stage uses: the run's saved recipe (or the one given) plus CLI overrides."""
    if recipe_path is None and run.recipe.exists():
        recipe_path = run.recipe
    recipe = load_recipe(recipe_path, overrides)
    save_recipe(run, recipe)
    return recipe


# --- stages ------------------------------------------------------------------------------------
def stage_data(run: RunDir, recipe: Recipe) -> dict:
    manifest = prepare_data(recipe.data, run)
    splits = manifest.get("splits", {})
    info("data: " + ", ".join(f"{s} {v.get('documents', 0)} docs" for s, v in splits.items()))
    return manifest


def stage_tokenizer(run: RunDir, recipe: Recipe) -> dict:
    run.require(run.split_file("train"), "data")
    if run.tokenizer.exists() and latest_checkpoint(run.checkpoints) is not None:
        # the run's model was trained (or imported) with this tokenizer: retraining would orphan it
        info("tokenizer: the run already has a model; keeping its tokenizer and encoding shards only")
        tok = Tokenizer.from_file(run.tokenizer)
    else:
        tok = train_tokenizer_stage(run, recipe.tokenizer)
    meta = encode_shards(run, tok)
    info(f"tokenizer: vocab {tok.vocab_size}, " + ", ".join(
        f"{s} {v['tokens']:,} tokens" for s, v in meta["splits"].items()))
    return meta


def model_config_for(run: RunDir, recipe: Recipe):
    tok = Tokenizer.from_file(run.require(run.tokenizer, "tokenizer"))
    if recipe.model.vocab_size is None:
        return recipe.model.model_copy(update={"vocab_size": tok.vocab_size}), tok
    if recipe.model.vocab_size < tok.vocab_size:
        raise LatheError(f"model.vocab_size {recipe.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    return recipe.model, tok


def stage_pretrain(run: RunDir, recipe: Recipe, resume: bool = False):
    model_cfg, tok = model_config_for(run, recipe)
    run.require(run.token_file("train"), "tokenizer")
    train_tokens, val_tokens = (in_reading_order(load_tokens(run, s), model_cfg) for s in ("train", "val"))
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) < 2:
            raise LatheError(f"the {split} split of {run.path} has no tokens: give the data stage more distinct "
                             f"documents (see {run.manifest}) or raise data.val_fraction")
    finished = finished_training(run, recipe) if resume else None
    if finished is not None:
        info(f"pretrain: already finished at step {finished.step} ({finished.stopped}); nothing to resume")
        return finished
    torch.manual_seed(recipe.train.seed)  # weight init is part of the recipe
    model = GPT(model_cfg)
    token_bytes = tok.token_bytes()
    get_batch = random_windows(train_tokens, model_cfg.block_size, recipe.train.batch_size, recipe.train.seed)

    def evaluate(m):
        return {f"val_{k}": v for k, v in evaluate_lm(m, val_tokens, token_bytes, recipe.train.eval_tokens).items()}

    result = train(model, recipe.train, get_batch, evaluate, run.path, resume=resume)
    info(f"pretrain: {result.step} steps ({result.stopped}), val loss {result.last_eval.get('val_loss', float('nan')):.4f}, "
         f"{result.tokens_per_s:,.0f} tok/s, {result.params:,} parameters")
    write_json(run.path / "train_summary.json", result.__dict__)
    return result


def finished_training(run: RunDir, recipe: Recipe) -> TrainResult | None:
    """The summary of a pretraining run that ended (max_steps reached or stopped early) at its latest
    checkpoint: resuming it must not train again or overwrite the summary. A raised max_steps resumes."""
    path = run.path / "train_summary.json"
    if not path.exists():
        return None
    summary = TrainResult(**read_json(path))
    ckpt = latest_checkpoint(run.checkpoints)
    at_end = summary.step >= recipe.train.max_steps or summary.stopped == "early_stop"
    return summary if ckpt is not None and read_json(ckpt / "state.json")["step"] == summary.step and at_end else None


def stage_eval(run: RunDir, recipe: Recipe) -> dict:
    """Test-split loss/perplexity/bits-per-byte beside the unigram entropy of the training tokens."""
    tok = Tokenizer.from_file(run.require(run.tokenizer, "tokenizer"))
    model = load_model(run.path)
    test = in_reading_order(load_tokens(run, "test"), model.cfg)
    metrics = {f"test_{k}": v for k, v in evaluate_lm(model, test, tok.token_bytes(), recipe.eval.max_tokens).items()}
    counts = np.bincount(np.asarray(load_tokens(run, "train")), minlength=tok.vocab_size)
    metrics["unigram_entropy"] = unigram_entropy(counts)
    metrics["params"] = model.num_params()
    write_json(run.eval, metrics)
    info(f"eval: test loss {metrics['test_loss']:.4f} nats/token (unigram entropy {metrics['unigram_entropy']:.4f}), "
         f"ppl {metrics['test_ppl']:.2f}, {metrics['test_bpb']:.3f} bits/byte")
    return metrics


def stage_generate(run: RunDir, recipe: Recipe) -> list[str]:
    g = recipe.generate
    tok = Tokenizer.from_file(run.require(run.tokenizer, "tokenizer"))
    model = load_model(run.path)
    if model.cfg.direction == "backward":
        info("generate: skipped (a backward model reads text back to front; it does not generate)")
        return []
    texts = generate(model, tok, g.prompt, g.max_tokens, g.num_samples, g.temperature, g.top_k, g.top_p, g.stop, g.seed)
    for text in texts:
        append_jsonl(run.samples, {"prompt": g.prompt, "completion": text, "temperature": g.temperature, "seed": g.seed})
    return texts


def stage_report(run: RunDir) -> str:
    path = write_report(run)
    info(f"report: {path}")
    return str(path)


def run_recipe(recipe: Recipe, run: RunDir, resume: bool = False) -> dict:
    save_recipe(run, recipe)
    info(f"run directory: {run.path}")
    if not (resume and run.manifest.exists()):
        stage_data(run, recipe)
    if not (resume and (run.tokens / "meta.json").exists()):
        stage_tokenizer(run, recipe)
    stage_pretrain(run, recipe, resume=resume)
    metrics = stage_eval(run, recipe)
    for text in stage_generate(run, recipe):
        info("─" * 60 + "\n" + recipe.generate.prompt + text)
    stage_report(run)
    return metrics


def read_eval(run: RunDir) -> dict:
    return read_json(run.eval) if run.eval.exists() else {}
