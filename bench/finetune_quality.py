"""Fine-tuning on real data: sentence polarity vs a bag-of-words baseline, GSM8K answer format before/after SFT.

    python bench/finetune_quality.py                      # pretrain a small base, then both demos (CPU: a while)
    python bench/finetune_quality.py --base runs/my-run   # reuse a pretrained run (its tokenizer and weights)
    python bench/finetune_quality.py --device cuda --pretrain-steps 3000

1. Pretraining (skipped with --base): lathe's own pipeline (data -> tokenizer -> pretrain) on the shared
   text corpus (State of the Union, ABC transcripts, web text) plus the *unlabelled* sentences of the
   polarity train split, in the spirit of ULMFiT's domain-adaptive pretraining. No val/test
   sentence and no label is seen before fine-tuning.
2. Classification: `run_classify` on ../shared/data/classify (hash split 80/10/10); the test accuracy
   of the fine-tuned model beside a scikit-learn logistic regression on word counts (C picked on val),
   trained on the same train split, with the paired McNemar test. This is the quick check on the shared
   block-384 base; bench/polarity.py is the tuned recipe (a short-context base made for classification).
3. SFT: `run_sft` on GSM8K train; the share of well-formed answers ('#### <number>') on the first
   --format-eval test questions, greedy, before and after SFT. Correctness is not expected at this size.

Everything lands in --workdir (report files of each stage, and finetune_quality.json with the numbers).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from lathe.config import load_recipe
from lathe.finetune.classify import read_polarity, run_classify, split_labeled
from lathe.finetune.sft import run_sft
from lathe.io import write_json, write_text
from lathe.pipeline import save_recipe, stage_data, stage_pretrain, stage_tokenizer
from lathe.rundir import RunDir
from lathe.train.checkpoint import latest_checkpoint, load_state

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def polarity_pretraining_text(path: Path, shared: Path, sentences_per_doc: int = 40) -> Path:
    """The polarity train split's sentences, unlabelled, as documents of `sentences_per_doc` lines."""
    train = [text for text, _ in split_labeled(read_polarity(shared / "classify"))["train"]]
    docs = ["\n".join(train[i : i + sentences_per_doc]) for i in range(0, len(train), sentences_per_doc)]
    write_text(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def english_sources(shared: Path, domain: Path, domain_weight: float) -> list:
    """The shared English text plus the unlabelled polarity sentences, weighted (3: each polarity
    sentence appears three times in train, about a third of the tokens)."""
    sources: list = [str(shared / "text" / name) for name in ("state_union", "abc", "webtext")]
    sources.append({"path": str(domain), "weight": domain_weight, "name": "polarity-unlabelled"})
    return sources


def pretrain_run(path: Path, recipe, fresh: bool = False) -> Path:
    """A run made by lathe's pipeline (data -> tokenizer -> pretrain) at `path`; finished stages are
    reused and an unfinished pretraining resumes."""
    run = RunDir(path)
    if fresh:
        shutil.rmtree(run.path, ignore_errors=True)
    run.path.mkdir(parents=True, exist_ok=True)
    save_recipe(run, recipe)
    if not run.manifest.exists():
        stage_data(run, recipe)
    if not (run.tokens / "meta.json").exists():
        stage_tokenizer(run, recipe)
    latest = latest_checkpoint(run.checkpoints)
    if latest is None or load_state(latest)["step"] < recipe.train.max_steps:  # not finished yet: resume
        stage_pretrain(run, recipe, resume=True)
    return run.path


def pretrain_base(workdir: Path, shared: Path, args) -> Path:
    """workdir/base: a block-384 base (GSM8K chats need the context) on the English sources."""
    domain = polarity_pretraining_text(workdir / "polarity_train_unlabelled.jsonl", shared)
    recipe = load_recipe("default", {
        "data.sources": english_sources(shared, domain, args.domain_weight), "data.max_total_bytes": 20_000_000,
        "data.min_chars": 64,
        "model.block_size": args.block_size, "model.n_layer": args.n_layer, "model.n_embd": args.n_embd,
        "model.n_head": args.n_embd // 32,
        "train.max_steps": args.pretrain_steps, "train.max_time_s": None, "train.device": args.device,
        "train.eval_every": 250, "train.checkpoint_every": 100, "train.batch_size": args.pretrain_batch,
        "train.lr": 3e-3,
    })
    return pretrain_run(workdir / "base", recipe, args.fresh)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/bench-finetune"))
    p.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder")
    p.add_argument("--base", type=Path, help="a pretrained run to fine-tune (skips pretraining)")
    p.add_argument("--fresh", action="store_true", help="delete workdir/base and pretrain from scratch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--pretrain-steps", type=int, default=1600)
    p.add_argument("--domain-weight", type=float, default=3.0, help="mixture weight of the unlabelled polarity text")
    p.add_argument("--pretrain-batch", type=int, default=12)
    p.add_argument("--block-size", type=int, default=384, help="GSM8K chats are ~220 tokens, 6%% over 384")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--classify-steps", type=int, default=600)
    p.add_argument("--sft-steps", type=int, default=800)
    p.add_argument("--format-eval", type=int, default=60, help="GSM8K test questions answered before/after")
    p.add_argument("--skip", choices=["classify", "sft"], action="append", default=[])
    args = p.parse_args()
    if not args.shared.is_dir():
        print(f"shared data not found at {args.shared}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    numbers: dict = {"device": args.device}
    start = time.perf_counter()
    base = args.base or pretrain_base(args.workdir, args.shared, args)
    numbers["base"] = str(base)
    numbers["pretrain_s"] = round(time.perf_counter() - start, 1)
    device = [f"train.device={args.device}"]

    if "classify" not in args.skip:
        t = time.perf_counter()
        s = run_classify(base, [args.shared / "classify"], out=args.workdir / "polarity",
                         overrides=device + [f"train.max_steps={args.classify_steps}", "train.eval_every=100",
                                             "train.checkpoint_every=100", "model.dropout=0.1"])
        numbers["polarity"] = {"lathe_accuracy": s["lathe"]["accuracy"], "lathe_macro_f1": s["lathe"]["macro"]["f1"],
                               "bow_lr_accuracy": s["baseline"]["accuracy"],
                               "bow_lr_macro_f1": s["baseline"]["macro"]["f1"],
                               "mcnemar_p": s["comparison"]["mcnemar_p"],
                               "test_examples": s["counts"]["test"], "seconds": round(time.perf_counter() - t, 1)}
    if "sft" not in args.skip:
        t = time.perf_counter()
        s = run_sft(base, [args.shared / "gsm8k" / "train.jsonl"], out=args.workdir / "gsm8k-sft",
                    test=args.shared / "gsm8k" / "test.jsonl", format_eval=args.format_eval, max_answer_tokens=200,
                    overrides=device + [f"train.max_steps={args.sft_steps}", "train.eval_every=100",
                                        "train.checkpoint_every=100"])
        numbers["gsm8k_format"] = {"before": s["format_before"]["share"], "after": s["format_after"]["share"],
                                   "questions": s["format_after"]["n"], "val_loss": s["final_val_loss"],
                                   "truncated_train_examples": s["data_stats"]["train"]["truncated"],
                                   "seconds": round(time.perf_counter() - t, 1)}
    write_json(args.workdir / "finetune_quality.json", numbers)
    print(json.dumps(numbers, indent=2))
    if "polarity" in numbers:
        n = numbers["polarity"]
        print(f"polarity test accuracy: lathe {n['lathe_accuracy']:.4f} vs bag-of-words LR {n['bow_lr_accuracy']:.4f} "
              f"(difference {n['lathe_accuracy'] - n['bow_lr_accuracy']:+.4f}, {n['test_examples']} test sentences, "
              f"McNemar p = {n['mcnemar_p']:.3g})")
    if "gsm8k_format" in numbers:
        n = numbers["gsm8k_format"]
        print(f"GSM8K well-formed answers: {n['before']:.1%} before SFT -> {n['after']:.1%} after "
              f"({n['questions']} test questions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
