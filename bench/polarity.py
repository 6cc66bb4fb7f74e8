"""Sentence polarity end to end: pretrain a small lathe GPT, fine-tune it as a classifier, compare it
with a bag-of-words logistic regression on the same split, paired.

    python bench/polarity.py --threads 1                  # from nothing: data, tokenizer, pretrain, classify
    python bench/polarity.py --threads 1 --skip-pretrain  # reuse workdir/base as it is
    python bench/polarity.py --threads 1 --skip-pretrain --seeds 5  # an ensemble of 5 fine-tuned classifiers
    python bench/polarity.py --threads 1 --backward --name polarity-backward  # a backward base (base-backward)

1. Pretraining (lathe's pipeline: data -> tokenizer -> pretrain) of a classification base: English text
   only (State of the Union, ABC transcripts, web text; no code), lower-cased like the polarity files,
   plus the *unlabelled* sentences of the polarity train split (domain text, ULMFiT-style). No val/test
   sentence and no label is seen before fine-tuning. Polarity sentences are 20-35 tokens, so the base
   has a short context (block 64), which makes each step cheap, and a word-friendly vocabulary (8k).
2. Classification: `run_classify` with the options that help a small model on 8.6k examples: the LM
   loss kept as an auxiliary objective, dropout on the pooled features, optionally a lower LR for the
   body than the head (--body-lr-scale) or the channel readout (--pooling channel), and the checkpoint
   of the best val accuracy (the test split is scored once, for it).
   With --seeds N, N classifiers are fine-tuned from the one base (train.seed = 1..N, folders NAME-seedK)
   and scored as one: their label probabilities averaged (--ensemble-method mean) or their weights
   (soup), each member at its best val checkpoint (`score_ensemble`).
   With --backward the base (workdir/base-backward, model.direction = backward) reads the token
   stream back to front, and so do its classifiers: ULMFiT's second direction. Forward and backward
   classifiers ensemble with `lathe finetune ensemble ... --method mean` (a soup needs one direction).
3. The comparison: test accuracy of both, the paired bootstrap interval of the difference and an exact
   McNemar test on the same 1036 test sentences (both from `run_classify`'s report).

polarity.json also holds `domain_lm_loss`: the base's LM loss on polarity sentences it pretrained on
(train) and on held-out ones (val). The domain text repeats every epoch, so a small base memorizes it;
the gap shows how much (--pretrain-dropout counters it).

Everything lands in --workdir; polarity.json holds the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lathe.config import load_recipe
from lathe.eval.loglik import load_run_model
from lathe.eval.perplexity import evaluate_lm
from lathe.finetune.classify import (ENSEMBLE_METHODS, EncodedSplit, read_polarity, run_classify, score_ensemble,
                                     split_labeled)
from lathe.io import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_quality import SHARED, english_sources, polarity_pretraining_text, pretrain_run  # noqa: E402


def base_dir(workdir: Path, args) -> Path:
    return workdir / ("base-backward" if args.backward else "base")


def pretrain_base(workdir: Path, shared: Path, args) -> Path:
    """workdir/base (or base-backward): a short-context (block 64), word-friendly (8k vocab), lower-cased base."""
    domain = polarity_pretraining_text(workdir / "polarity_train_unlabelled.jsonl", shared)
    recipe = load_recipe("default", {
        "name": "polarity-base",
        "data.sources": english_sources(shared, domain, args.domain_weight), "data.max_total_bytes": 20_000_000,
        "data.min_chars": 64, "data.clean.lowercase": True, "data.workers": 1,
        "tokenizer.vocab_size": args.vocab_size,
        "model.block_size": args.block_size, "model.n_layer": args.n_layer, "model.n_embd": args.n_embd,
        "model.n_head": args.n_embd // 32, "model.dropout": args.pretrain_dropout,
        "model.direction": "backward" if args.backward else "forward",
        "train.max_steps": args.pretrain_steps, "train.max_time_s": None, "train.device": args.device,
        "train.batch_size": args.pretrain_batch, "train.lr": 3e-3, "train.warmup_steps": 50,
        "train.eval_every": 200, "train.checkpoint_every": 200, "train.eval_tokens": 16384,
    })
    return pretrain_run(base_dir(workdir, args), recipe, args.fresh)


def domain_lm_loss(base: Path, shared: Path, limit: int = 1000) -> dict:
    """The base's LM loss (nats/token) on polarity sentences it was pretrained on (train) and on ones
    it never saw (val): text only, no labels, each sentence as <|bos|> + its tokens in the base's
    reading order (EncodedSplit's). A wide gap means the repeated domain text was memorized rather
    than learned from, which the val sentences' loss shows first."""
    model, tok = load_run_model(base, "cpu")
    splits = split_labeled(read_polarity(shared / "classify"))
    token_bytes, losses = tok.token_bytes(), {}
    for name in ("train", "val"):
        rows = splits[name][:limit]
        encoded = EncodedSplit(tok, rows, sorted({label for _, label in rows}), model.cfg.block_size, model.cfg.direction)
        scored = [evaluate_lm(model, ids, token_bytes, len(ids)) for ids in encoded.ids]
        losses[name] = round(sum(s["loss"] * s["tokens"] for s in scored) / sum(s["tokens"] for s in scored), 4)
    return losses


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/bench-polarity"))
    p.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder")
    p.add_argument("--fresh", action="store_true", help="delete the base (workdir/base or base-backward) and pretrain from scratch")
    p.add_argument("--skip-pretrain", action="store_true", help="use workdir/base as it is")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--pretrain-steps", type=int, default=2400)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--backward", action="store_true",
                   help="a backward base (workdir/base-backward): it reads texts back to front (ULMFiT)")
    p.add_argument("--pretrain-dropout", type=float, default=0.0,
                   help="dropout while pretraining (the domain sentences repeat for many epochs)")
    p.add_argument("--domain-weight", type=float, default=3.0, help="mixture weight of the unlabelled polarity text")
    p.add_argument("--classify-steps", type=int, default=1500)
    p.add_argument("--classify-lr", type=float, default=5e-4)
    p.add_argument("--pooling", default="mean", choices=["mean", "meanmax", "last", "channel"])
    p.add_argument("--dropout", type=float, default=0.1, help="dropout inside the GPT while fine-tuning")
    p.add_argument("--head-dropout", type=float, default=0.3, help="dropout on the pooled features")
    p.add_argument("--lm-weight", type=float, default=0.5, help="weight of the auxiliary LM loss (GPT-1: 0.5)")
    p.add_argument("--freeze-steps", type=int, default=0, help="steps that train the head alone")
    p.add_argument("--body-lr-scale", type=float, default=1.0, help="the body's learning rate as a fraction of the head's")
    p.add_argument("--seeds", type=int, default=1, help="fine-tune this many classifiers and score their ensemble")
    p.add_argument("--ensemble-method", default="mean", choices=ENSEMBLE_METHODS,
                   help="mean: average the members' label probabilities; soup: average their weights")
    p.add_argument("--val-only", action="store_true", help="score the val split, not test (for choosing settings)")
    p.add_argument("--resume", action="store_true",
                   help="continue workdir/NAME's classifier run (a finished one is only scored again)")
    p.add_argument("--name", help="the classifier's folder in workdir (default: polarity, or polarity-val)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="train.FIELD=VALUE",
                   help="extra classification overrides (repeatable; they win)")
    args = p.parse_args()
    args.name = args.name or ("polarity-val" if args.val_only else "polarity")
    return args


def classify(base: Path, args, name: str, seed: int | None = None) -> dict:
    overrides = [f"train.device={args.device}", f"train.max_steps={args.classify_steps}", f"train.lr={args.classify_lr}",
                 "train.warmup_steps=50", "train.eval_every=100", "train.checkpoint_every=100",
                 f"model.dropout={args.dropout}", *([f"train.seed={seed}"] if seed is not None else []), *args.overrides]
    return run_classify(base, [args.shared / "classify"], out=args.workdir / name, overrides=overrides,
                        pooling=args.pooling, head_dropout=args.head_dropout, lm_weight=args.lm_weight,
                        freeze_steps=args.freeze_steps, body_lr_scale=args.body_lr_scale, select="accuracy",
                        score_test=not args.val_only,
                        resume=args.resume)


def main() -> int:
    args = parse_args()
    if not args.shared.is_dir():
        print(f"shared data not found at {args.shared}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = base_dir(args.workdir, args) if args.skip_pretrain else pretrain_base(args.workdir, args.shared, args)
    numbers: dict = {"device": args.device, "threads": torch.get_num_threads(), "base": str(base),
                     "pretrain_s": round(time.perf_counter() - start, 1),
                     "domain_lm_loss": domain_lm_loss(base, args.shared)}
    t = time.perf_counter()
    if args.seeds > 1:
        names = [f"{args.name}-seed{k}" for k in range(1, args.seeds + 1)]
        members = [classify(base, args, name, seed=k) for k, name in enumerate(names, 1)]
        s = score_ensemble([args.workdir / n for n in names], [args.shared / "classify"],
                           out=args.workdir / f"{args.name}-ensemble", method=args.ensemble_method,
                           score_test=not args.val_only)
        s["options"] = {**members[0]["options"], "seeds": args.seeds, "ensemble_method": args.ensemble_method}
        s["best_checkpoint"] = [m["checkpoint"] for m in s["members"]]
        numbers.update({"member_accuracies": [m["lathe"]["accuracy"] for m in members],
                        "ensemble_val_accuracy": s["val_accuracy"]})
    else:
        s = classify(base, args, args.name)
    c, split = s["comparison"], s["scored_split"]
    numbers.update({"classify_s": round(time.perf_counter() - t, 1), "scored_split": split,
                    "options": s["options"], "best_checkpoint": s["best_checkpoint"],
                    "lathe_accuracy": s["lathe"]["accuracy"], "bow_lr_accuracy": s["baseline"]["accuracy"],
                    "lathe_macro_f1": s["lathe"]["macro"]["f1"], "bow_lr_macro_f1": s["baseline"]["macro"]["f1"],
                    "comparison": c, "examples": s["counts"][split], "total_s": round(time.perf_counter() - start, 1)})
    write_json(args.workdir / f"{args.name}.json", numbers)
    print(json.dumps(numbers, indent=2))
    print(f"polarity {split} accuracy: lathe {numbers['lathe_accuracy']:.4f} vs bag-of-words LR "
          f"{numbers['bow_lr_accuracy']:.4f} ({numbers['examples']} sentences); difference {c['difference']:+.4f}, "
          f"paired bootstrap 95% [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], McNemar p = {c['mcnemar_p']:.3g} "
          f"({'beyond noise' if c['mcnemar_p'] < 0.05 else 'within noise'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
