"""`lathe improve`: the self-improvement loop, and `--tune` for its own recipe.

Cheap to import (the `lathe` command imports every area's CLI): torch comes in inside the handler.
"""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("improve", help="let the model improve itself: propose, verify, retrain, gate, repeat")
    p.add_argument("--name", help="run name under runs/ (default: improve-<timestamp>)")
    p.add_argument("--recipe", help="improve config: a YAML path or a built-in name (default: improve, the "
                                    "3-digit addition demo; improve-tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set propose.temperature=0.8 (repeatable)")
    rounds = p.add_mutually_exclusive_group()
    rounds.add_argument("--rounds", type=int, help="rounds after the base model (default: the config's, 5)")
    rounds.add_argument("--forever", action="store_true",
                        help="keep going; .jsonl files dropped into runs/<name>/inbox/ join the originals")
    p.add_argument("--max-rounds", type=int, help="with --forever: stop after this round anyway")
    p.add_argument("--resume", action="store_true", help="continue the run --name from its last finished step")
    p.add_argument("--tune", action="store_true", help="tune the training recipe instead: trials under one budget")
    p.add_argument("--task", choices=["addition", "sorting", "reversal"], help="the task (task.kind)")
    p.add_argument("--no-controls", action="store_true", help="skip the no-loop and keep-all comparison arms")
    p.add_argument("--father-url", help="OpenAI-compatible endpoint of a stronger proposer, e.g. http://host:8000/v1")
    p.add_argument("--father-model", help="the father's model name")
    p.add_argument("--device", help="cpu, cuda, ... (train.device and retrain.device)")
    p.set_defaults(handler=_improve)


def overrides_of(args) -> list[str]:
    out = []
    if args.rounds is not None:
        out.append(f"rounds={args.rounds}")
    if args.task:
        out.append(f"task.kind={args.task}")
        if args.task != "addition":
            out.append("task.answer_order=natural")  # reversed digits are an addition trick
    if args.no_controls:
        out.append("controls=false")
    if args.father_url or args.father_model:
        out += [f"propose.father_url={json.dumps(args.father_url)}", f"propose.father_model={json.dumps(args.father_model)}"]
    if args.device:
        out += [f"train.device={args.device}", f"retrain.device={args.device}"]
    return out + list(args.overrides)  # explicit --set wins


def default_recipe(args) -> str | None:
    """The addition demo (recipes/improve.yaml), or for another task the plain defaults."""
    return "improve" if args.task in (None, "addition") else None


def _improve(args) -> int:
    import time

    from lathe.errors import LatheError
    from lathe.improve.config import dump_config, load_improve_config
    from lathe.improve.data import ImproveRun
    from lathe.io import write_text
    from lathe.rundir import RUNS_ROOT

    if args.resume and not args.name:
        raise LatheError("--resume needs --name of the run to continue")
    name = args.name or time.strftime("improve-%Y%m%d-%H%M%S")
    run = ImproveRun(RUNS_ROOT / name)
    if args.tune:
        from lathe.improve.tune import tune

        saved = run.config if run.config.exists() else None
        cfg = load_improve_config(args.recipe or saved or default_recipe(args), overrides_of(args))
        tune(run, cfg)
        return 0
    if args.resume:
        if not run.config.exists():
            raise LatheError(f"nothing to resume: {run.config} does not exist")
        cfg = load_improve_config(args.recipe or run.config, overrides_of(args))
    else:
        if run.state.exists():
            raise LatheError(f"{run.path} already holds an improve run: pass --resume to continue it, or pick another --name")
        if run.path.is_dir() and any(run.path.iterdir()) and not run.config.exists():
            raise LatheError(f"{run.path} exists and is not an improve run: pick another --name")
        cfg = load_improve_config(args.recipe or default_recipe(args), overrides_of(args))
    from lathe.improve.loop import improve

    run.path.mkdir(parents=True, exist_ok=True)
    write_text(RUNS_ROOT / "latest", name + "\n")
    write_text(run.config, dump_config(cfg))
    improve(run, cfg, forever=args.forever, max_rounds=args.max_rounds)
    return 0
