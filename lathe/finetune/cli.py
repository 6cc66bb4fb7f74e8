"""CLI verbs: `lathe finetune classify`, `lathe finetune ensemble`, `lathe finetune sft` and `lathe distill`.

Cheap to import (the `lathe` command imports every area's CLI): the stage modules, and torch with
them, are imported inside the handlers.
"""

from __future__ import annotations

import argparse

from lathe.cli import add_stage_options, stage_overrides_of as overrides_of


def _add_finetune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="the run to start from (default: the newest run under runs/)")
    p.add_argument("--data", nargs="+", required=True, help="training data files (or a polarity folder)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA update (alpha = 2 * rank)")
    add_stage_options(p)


def register(sub) -> None:
    ft = sub.add_parser("finetune", help="fine-tune a trained run: a classification head or instruction SFT")
    verbs = ft.add_subparsers(dest="finetune_command", required=True)

    p = verbs.add_parser("classify", help="train a classification head on (text, label) data; test-split report")
    _add_finetune_options(p)
    p.add_argument("--no-baseline", action="store_true", help="skip the bag-of-words logistic regression")
    p.add_argument("--pooling", choices=["mean", "meanmax", "last", "channel"], default="mean",
                   help="the head reads the mean of the hidden states, mean and max, or the last token's; "
                        "channel: no head, the log-likelihood of the text after each label")
    p.add_argument("--head-dropout", type=float, default=0.0, help="dropout on the pooled features")
    p.add_argument("--lm-weight", type=float, default=0.0,
                   help="weight of the next-token loss kept as an auxiliary objective (GPT-1: 0.5)")
    p.add_argument("--freeze-steps", type=int, default=0, help="first steps that train the head alone")
    p.add_argument("--body-lr-scale", type=float, default=1.0,
                   help="the pretrained body's learning rate as a fraction of the head's (0, 1]")
    p.add_argument("--select", choices=["loss", "accuracy"], default="loss",
                   help="keep the checkpoint of the best val loss or the best val accuracy")
    p.set_defaults(handler=_classify)

    p = verbs.add_parser("ensemble", help="score several classifier runs as one (averaged probabilities or weights)")
    p.add_argument("runs", nargs="+", help="classifier run directories (from `lathe finetune classify`)")
    p.add_argument("--data", nargs="+", required=True, help="the labelled data they were trained on")
    p.add_argument("--out", help="folder for ensemble_report.{md,json} (default: print only)")
    p.add_argument("--method", choices=["mean", "soup"], default="mean",
                   help="mean: average the label probabilities; soup: average the weights into one model")
    p.add_argument("--val-only", action="store_true", help="score the val split, not test (for choosing members)")
    p.add_argument("--no-baseline", action="store_true", help="skip the bag-of-words logistic regression")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=_ensemble)

    p = verbs.add_parser("sft", help="instruction SFT on chat / prompt-response / GSM8K jsonl")
    _add_finetune_options(p)
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of examples held out for val loss")
    p.add_argument("--test", help="jsonl whose questions measure the share of well-formed '#### <number>' answers")
    p.add_argument("--format-eval", type=int, default=100, help="test questions to answer before and after SFT")
    p.add_argument("--max-answer-tokens", type=int, default=256)
    p.set_defaults(handler=_sft)

    p = sub.add_parser("distill", help="train a smaller student from a teacher run; compare with scratch")
    p.add_argument("--teacher", required=True, help="the teacher run directory")
    p.add_argument("--data-run", help="run whose tokenizer and token shards the student uses (default: the teacher)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the KL loss")
    p.add_argument("--kl-weight", type=float, default=0.9, help="weight of the KL term; the rest is cross-entropy")
    p.add_argument("--text-chars", type=int, default=400_000,
                   help="characters of teacher-written text when the tokenizers differ")
    p.add_argument("--no-baseline", action="store_true", help="skip the same student trained from scratch")
    add_stage_options(p)
    p.set_defaults(handler=_distill)


def _classify(args) -> int:
    from lathe.finetune.classify import run_classify

    run_classify(args.base, args.data, args.out, args.name, overrides_of(args), resume=args.resume, lora=args.lora,
                 lora_rank=args.lora_rank, baseline=not args.no_baseline, pooling=args.pooling,
                 head_dropout=args.head_dropout, lm_weight=args.lm_weight, freeze_steps=args.freeze_steps,
                 body_lr_scale=args.body_lr_scale, select=args.select)
    return 0


def _ensemble(args) -> int:
    from lathe.finetune.classify import score_ensemble

    score_ensemble(args.runs, args.data, args.out, method=args.method, score_test=not args.val_only,
                   baseline=not args.no_baseline, device=args.device)
    return 0


def _sft(args) -> int:
    from lathe.finetune.sft import run_sft

    run_sft(args.base, args.data, args.out, args.name, overrides_of(args), val_fraction=args.val_fraction,
            test=args.test, format_eval=args.format_eval, max_answer_tokens=args.max_answer_tokens,
            resume=args.resume, lora=args.lora, lora_rank=args.lora_rank)
    return 0


def _distill(args) -> int:
    from lathe.finetune.distill import run_distill

    run_distill(args.teacher, args.out, args.name, args.data_run, overrides_of(args), temperature=args.temperature,
                kl_weight=args.kl_weight, text_chars=args.text_chars, baseline=not args.no_baseline,
                resume=args.resume)
    return 0
