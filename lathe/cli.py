"""The `lathe` command. Each verb is a thin wrapper over the stage function of the same name.

Bad input ends in one clear line on stderr and a non-zero exit code, never a traceback wall.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from lathe.errors import LatheError

# Each area registers its own verbs: a module with `register(subparsers)` whose parsers call
# `set_defaults(handler=fn)`, fn(args) -> exit code. Keep these modules light to import.
EXTENSIONS = ["lathe.interop.cli", "lathe.improve.cli", "lathe.finetune.cli", "lathe.align.cli", "lathe.eval.cli",
              "lathe.serve.cli"]


def add_recipe_options(p: argparse.ArgumentParser, with_run: bool = True) -> None:
    if with_run:
        p.add_argument("--run", help="run directory (default: the newest run under runs/)")
    p.add_argument("--recipe", help="YAML recipe path or built-in name (default, tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a recipe field, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--steps", type=int, help="shortcut for --set train.max_steps=N")
    p.add_argument("--device", help="shortcut for --set train.device=DEV (cpu, cuda, ...)")


def add_stage_options(p: argparse.ArgumentParser, batch: str | None = "examples per micro-batch",
                      set_help: str = "train.FIELD=VALUE or model.FIELD=VALUE (repeatable)") -> None:
    """Options of every verb that trains a base into an output run (fine-tuning, distillation, alignment)."""
    p.add_argument("--out", help="output run directory (default: runs/<--name>)")
    p.add_argument("--name", help="output run name under runs/")
    p.add_argument("--steps", type=int, help="training steps (train.max_steps)")
    p.add_argument("--lr", type=float, help="peak learning rate (train.lr)")
    if batch:
        p.add_argument("--batch-size", type=int, help=f"{batch} (train.batch_size)")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps (train.device)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE", help=set_help)
    p.add_argument("--resume", action="store_true", help="continue from the output's latest checkpoint")


STAGE_FLAGS = {"steps": "max_steps", "lr": "lr", "batch_size": "batch_size", "device": "device"}


def stage_overrides_of(args) -> list[str]:
    """The train.* overrides of add_stage_options' flags, then --set (which wins)."""
    out = [f"train.{field}={json.dumps(getattr(args, flag))}" for flag, field in STAGE_FLAGS.items()
           if getattr(args, flag, None) is not None]
    return out + list(args.overrides)


def overrides_of(args) -> list[str]:
    out = list(args.overrides)
    if getattr(args, "steps", None) is not None:
        out.append(f"train.max_steps={args.steps}")
    if getattr(args, "device", None):
        out.append(f"train.device={args.device}")
    if getattr(args, "executor", None):
        out.append(f"data.executor={args.executor}")
    if getattr(args, "data", None):
        out.append(f"data.sources={json.dumps(args.data)}")  # JSON is valid YAML
    for flag, field in GENERATE_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"generate.{field}={json.dumps(value)}")
    return out


GENERATE_FLAGS = {"prompt": "prompt", "max_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k",
                  "top_p": "top_p", "seed": "seed", "num_samples": "num_samples"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lathe", description="Train language models end to end.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole recipe: data, tokenizer, pretrain, eval, generate, report")
    add_recipe_options(p, with_run=False)
    p.add_argument("--data", nargs="+", help="your own files, folders or globs (default: Python stdlib sources)")
    p.add_argument("--name", help="run name under runs/ (default: run-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of the same --name")

    for verb, text in [("data", "collect, clean, deduplicate and split text"),
                       ("tokenizer", "train the BPE tokenizer and encode token shards"),
                       ("pretrain", "train the GPT on the token shards"),
                       ("generate", "sample text from the trained model"),
                       ("report", "write the report card: report.md, report.html and plots")]:
        p = sub.add_parser(verb, help=text)
        add_recipe_options(p)
        if verb == "data":
            p.add_argument("--data", nargs="+", help="files, folders or globs")
            p.add_argument("--name", help="start a new run with this name (default: use --run or a new run)")
            p.add_argument("--executor", choices=["local", "slurm", "ray"], help="where the data pipeline runs")
        if verb == "pretrain":
            p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        if verb == "generate":
            p.add_argument("--prompt")
            p.add_argument("--max-tokens", type=int)
            p.add_argument("--temperature", type=float)
            p.add_argument("--top-k", type=int)
            p.add_argument("--top-p", type=float)
            p.add_argument("--seed", type=int)
            p.add_argument("--num-samples", type=int)
            p.add_argument("--stop", action="append", help="stop string (repeatable)")
    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not (e.name and name.startswith(e.name)):  # area not built yet
                raise
            continue
        module.register(sub)
    return parser


def dispatch(args) -> int:
    from lathe import pipeline
    from lathe.config import load_recipe
    from lathe.rundir import RunDir

    if args.command == "run":
        recipe = load_recipe(args.recipe or "default", overrides_of(args))
        if args.resume and not args.name:
            raise LatheError("--resume needs --name of the run to continue")
        pipeline.run_recipe(recipe, RunDir.create(args.name), resume=args.resume)
        return 0
    if args.command == "data" and (args.name or not args.run):
        run = RunDir.create(args.name)
        recipe = load_recipe(args.recipe or "default", overrides_of(args))
        pipeline.save_recipe(run, recipe)
    else:
        run = RunDir.resolve(args.run)
        recipe = pipeline.run_recipe_of(run, overrides_of(args), args.recipe)
    if args.command == "data":
        pipeline.stage_data(run, recipe)
    elif args.command == "tokenizer":
        pipeline.stage_tokenizer(run, recipe)
    elif args.command == "pretrain":
        pipeline.stage_pretrain(run, recipe, resume=args.resume)
    elif args.command == "generate":
        if args.stop:
            recipe.generate.stop = args.stop
        for text in pipeline.stage_generate(run, recipe):
            print(recipe.generate.prompt + text)
            print("-" * 60)
    elif args.command == "report":
        pipeline.stage_report(run)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler = getattr(args, "handler", None)
        return handler(args) if handler else dispatch(args)
    except LatheError as e:
        print(f"lathe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lathe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
