"""CLI verbs: `lathe align reward | dpo | rl | pairs`.

Cheap to import (the `lathe` command imports every area's CLI): the stage modules, and torch with
them, are imported inside the handlers.

    lathe align reward --base runs/x --data pairs.jsonl                 reward model (Bradley-Terry)
    lathe align dpo    --base runs/x-sft --data pairs.jsonl --beta 0.1  DPO against a frozen reference
    lathe align rl     --base runs/x-sft --task addition --steps 100    GRPO with verifier rewards
    lathe align pairs  --base runs/x --task addition --out pairs.jsonl  pairs from ranked own samples
"""

from __future__ import annotations

import argparse

from lathe.cli import add_stage_options, stage_overrides_of as overrides_of

RL_FLAGS = {"group_size": "group_size", "prompts_per_step": "prompts_per_step", "max_new_tokens": "max_new_tokens",
            "temperature": "temperature", "kl": "kl_coef", "clip": "clip_eps", "inner_epochs": "inner_epochs",
            "eval_samples": "eval_samples", "eval_temperature": "eval_temperature"}


def _add_stage_options(p: argparse.ArgumentParser, batch: bool = True) -> None:
    p.add_argument("--base", help="the run to start from (default: the newest run under runs/)")
    add_stage_options(p, batch="pairs per micro-batch" if batch else None,  # RL's batch: prompts x group size
                      set_help="train.FIELD=VALUE, model.dropout=VALUE, or for rl: rl.FIELD=VALUE (repeatable)")


def _add_pairs_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, help='pairs .jsonl files: {"prompt", "chosen", "rejected"}')
    p.add_argument("--val-data", nargs="+", help="held-out pairs (default: --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of pairs held out for accuracy")


def register(sub) -> None:
    align = sub.add_parser("align", help="align a model: reward model, DPO, RL with verifiable rewards")
    verbs = align.add_subparsers(dest="align_command", required=True)

    p = verbs.add_parser("reward", help="train a reward model on preference pairs; held-out pairwise accuracy")
    _add_stage_options(p)
    _add_pairs_options(p)
    p.set_defaults(handler=_reward)

    p = verbs.add_parser("dpo", help="DPO on preference pairs against a frozen copy of the base")
    _add_stage_options(p)
    _add_pairs_options(p)
    p.add_argument("--beta", type=float, default=0.1, help="how strongly the policy is held to the reference")
    p.add_argument("--sft-weight", type=float, default=0.0,
                   help="add this much NLL of the chosen replies (DPO + NLL); keeps their likelihood up")
    p.set_defaults(handler=_dpo)

    p = verbs.add_parser("rl", help="GRPO with verifiable rewards (lathe.verify verifiers, a reward model)")
    _add_stage_options(p, batch=False)
    p.add_argument("--prompts", help="prompts file: .jsonl rows {\"prompt\", ...verifier fields} or one per line")
    p.add_argument("--heldout-prompts", help="held-out prompts file (default: --heldout of --prompts)")
    p.add_argument("--task", help="generate prompts with a lathe.verify task (addition, sorting, reversal)")
    p.add_argument("--n-prompts", type=int, default=1000, help="training prompts generated with --task")
    p.add_argument("--heldout", type=int, default=64, help="held-out prompts for the reward curve")
    p.add_argument("--reward", help="verifier names with weights, e.g. addition or addition:1,python:0.5 "
                                    "(default: the --task verifier)")
    p.add_argument("--reward-model", help="a `lathe align reward` run whose score is a reward (named reward_model)")
    p.add_argument("--group-size", type=int, help="completions per prompt (rl.group_size)")
    p.add_argument("--prompts-per-step", type=int, help="prompts per step (rl.prompts_per_step)")
    p.add_argument("--max-new-tokens", type=int, help="completion length limit (rl.max_new_tokens)")
    p.add_argument("--temperature", type=float, help="rollout sampling temperature (rl.temperature)")
    p.add_argument("--kl", type=float, help="KL penalty to the base model, 0 = none (rl.kl_coef)")
    p.add_argument("--clip", type=float, help="PPO ratio clip (rl.clip_eps)")
    p.add_argument("--inner-epochs", type=int, help="optimization passes per sampled batch (rl.inner_epochs)")
    p.add_argument("--eval-samples", type=int, help="held-out samples per prompt (rl.eval_samples)")
    p.add_argument("--eval-temperature", type=float, help="held-out decoding, 0 = greedy (rl.eval_temperature)")
    p.set_defaults(handler=_rl)

    p = verbs.add_parser("pairs", help="preference pairs from the model's own samples, ranked by a verifier")
    p.add_argument("--base", help="the run whose model samples (default: the newest run under runs/)")
    p.add_argument("--out", required=True, help="pairs .jsonl file to write")
    p.add_argument("--prompts", help="prompts file (.jsonl with 'prompt', or one per line)")
    p.add_argument("--task", help="generate prompts with a lathe.verify task; its verifier ranks by default")
    p.add_argument("--n", type=int, default=200, help="prompts generated with --task")
    p.add_argument("--verifier", help="lathe.verify verifier that scores the samples")
    p.add_argument("--reward-model", help="rank by a `lathe align reward` run's score instead")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_pairs)


def _reward(args) -> int:
    from lathe.align.reward import run_reward

    run_reward(args.base, args.data, args.out, args.name, overrides_of(args), args.val_data, args.val_fraction,
               args.resume)
    return 0


def _dpo(args) -> int:
    from lathe.align.dpo import run_dpo

    run_dpo(args.base, args.data, args.beta, args.out, args.name, overrides_of(args), args.val_data,
            args.val_fraction, args.sft_weight, args.resume)
    return 0


def _rl(args) -> int:
    from lathe.align.grpo import run_rl

    options = {field: getattr(args, flag) for flag, field in RL_FLAGS.items() if getattr(args, flag) is not None}
    run_rl(args.base, args.reward, args.prompts, args.heldout_prompts, args.task, args.n_prompts, args.heldout,
           args.reward_model, args.out, args.name, overrides_of(args), options, args.resume)
    return 0


def _pairs(args) -> int:
    from lathe.align.pairs import run_pairs

    run_pairs(args.base, args.out, args.prompts, args.task, args.n, args.verifier, args.reward_model, args.k,
              args.max_tokens, args.temperature, args.seed)
    return 0
