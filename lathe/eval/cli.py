"""CLI verbs `lathe eval` and `lathe arena`. Cheap to import: models and torch load in the handlers.

    lathe eval                                  test-split loss / perplexity / bits-per-byte (the pipeline stage)
    lathe eval --text notes.txt other.md        perplexity and bits-per-byte on any text
    lathe eval --task gsm8k --data test.jsonl [--chat] [--limit 100]
    lathe eval --task mc --data questions.jsonl
    lathe eval --task classify --data preds.jsonl
    lathe eval --task translate --data pairs.jsonl
    lathe eval --bias [probe.json]              the bias probe of the report card
    lathe eval --harness hellaswag,arc_easy     lm-evaluation-harness tasks (needs lm-eval and the task data)
    lathe arena --a RUN --b RUN --task addition --verifier addition [--judge RUN]

Task results go to <run>/eval/<name>.json (summary) and .jsonl (per example); `lathe report` shows them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

TASK_CHOICES = ("gsm8k", "mc", "classify", "translate")


def register(sub) -> None:
    from lathe.cli import add_recipe_options

    p = sub.add_parser("eval", help="test-split perplexity, or --text/--task/--bias/--harness evaluations",
                       description="With no task options: the test split's loss, perplexity and bits-per-byte.")
    add_recipe_options(p)
    p.add_argument("--text", nargs="+", metavar="FILE", help="perplexity and bits-per-byte of these text files")
    p.add_argument("--task", choices=TASK_CHOICES, help="an evaluation task on --data")
    # dest avoids `data`/`max_tokens`: lathe.cli.overrides_of turns those into recipe overrides
    p.add_argument("--data", dest="task_data", metavar="FILE", help="the task's jsonl file")
    p.add_argument("--bias", nargs="?", const=True, metavar="FILE",
                   help="run the bias probe (optionally with a JSON file of templates and groups)")
    p.add_argument("--harness", metavar="TASKS", help="comma-separated lm-evaluation-harness task names")
    p.add_argument("--harness-include", metavar="DIR", help="a folder of extra lm-eval task YAML files")
    p.add_argument("--chat", action="store_true", help="prompt through the chat template (a chat-tuned model)")
    p.add_argument("--template", help="prompt template, e.g. 'Q: {question}\\nA:' (gsm8k) or '{source} =' (translate)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N examples")
    p.add_argument("--max-tokens", dest="gen_tokens", type=int, metavar="N",
                   help="tokens to generate per answer (gsm8k 256, translate 128) or to score per --text file")
    p.add_argument("--name", help="result name of --text/--task under <run>/eval/ (default: 'text', or the task "
                   "and data file name)")
    p.set_defaults(handler=eval_command)

    a = sub.add_parser("arena", help="two models answer the same prompts; a verifier or judge model decides")
    a.add_argument("--a", required=True, metavar="RUN", help="model A's run directory")
    a.add_argument("--b", required=True, metavar="RUN", help="model B's run directory")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", metavar="FILE", help=".jsonl {prompt[, answer]} or a text file, one prompt a line")
    src.add_argument("--task", dest="arena_task", metavar="KIND", help="generated tasks: addition, sorting, reversal")
    a.add_argument("--n", type=int, default=50, help="generated tasks (with --task)")
    a.add_argument("--verifier", help="verifier name from lathe.verify (default with --task: the task's own)")
    a.add_argument("--judge", metavar="RUN", help="a judge model: the answer it finds likelier per token wins")
    a.add_argument("--chat", action="store_true", help="prompt through the chat template")
    a.add_argument("--max-tokens", dest="gen_tokens", type=int, default=64, metavar="N")
    a.add_argument("--stop", action="append", help="stop string (repeatable; default with --task: newline)")
    a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); else sampled, same seeds")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default="auto")
    a.add_argument("--out", metavar="DIR", help="where results go (default: A's run directory, eval/arena-<B>.json)")
    a.set_defaults(handler=arena_command)


# --- lathe eval ---------------------------------------------------------------------------------------
def eval_command(args) -> int:
    from lathe import pipeline
    from lathe.cli import overrides_of
    from lathe.config import load_recipe
    from lathe.errors import LatheError
    from lathe.eval.loglik import load_run_model
    from lathe.rundir import RunDir

    run = RunDir.resolve(args.run)
    if args.template:
        args.template = args.template.replace("\\n", "\n")  # a shell passes "\n" as two characters
    if args.task_data and not args.task:
        raise LatheError("--data needs --task (gsm8k, mc, classify or translate)")
    if args.task and not args.task_data:
        raise LatheError(f"--task {args.task} needs --data FILE")
    if args.name and args.text and args.task:
        raise LatheError("--name names one result: give --text and --task in separate commands")
    if not (args.text or args.task or args.bias or args.harness):
        pipeline.stage_eval(run, pipeline.run_recipe_of(run, overrides_of(args), args.recipe))
        return 0
    recipe = load_recipe(args.recipe or (run.recipe if run.recipe.exists() else None), overrides_of(args))
    device = recipe.train.device
    model = functools.cache(lambda: load_run_model(run.path, device))  # loaded once, and only if needed
    if args.text:
        _finish(run, args.name or "text", *_text(args, model, recipe.eval.max_tokens))
    if args.task:
        _finish(run, args.name or f"{args.task}-{Path(args.task_data).stem}", *_task(run, args, model, device))
    if args.bias:
        _finish(run, "bias", _bias(run, args, device), [])
    if args.harness:
        _finish(run, "harness", _harness(args, model), [])
    return 0


def _finish(run, name: str, summary: dict, examples: list[dict]) -> None:
    from lathe.console import info
    from lathe.eval.tasks import save_result

    path = save_result(run.path, name, summary, examples)
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary["metrics"].items())
    info(f"eval {name}: {shown} (n={summary.get('n', 'n/a')}) -> {path}")


def _text(args, model, default_tokens: int):
    from lathe.eval.tasks import eval_text

    return eval_text(*model(), args.text, args.gen_tokens or default_tokens)


def _task(run, args, model, device):
    from lathe.eval import tasks as T

    data = args.task_data
    if args.task == "classify":
        from lathe.tokenizer import Tokenizer
        from lathe.train.dist import pick_device

        rows = T.limit_rows(T.read_classify(data), args.limit)
        needs_model = "prediction" not in rows[0]
        classifier = T.load_classifier_if_any(run.path, pick_device(device)) if needs_model else None
        tok = Tokenizer.from_file(run.require(run.tokenizer, "tokenizer")) if needs_model else None
        return T.eval_classify(rows, classifier, tok, data=data)
    if args.task == "translate":
        rows = T.limit_rows(T.read_translate(data), args.limit)
        given = all("hypothesis" in r for r in rows)
        return T.eval_translate(*((None, None) if given else model()), rows, args.chat, args.gen_tokens or 128,
                                args.template, data=data)
    if args.task == "gsm8k":
        rows = T.limit_rows(T.read_gsm8k(data), args.limit)
        return T.eval_gsm8k(*model(), rows, args.chat, args.gen_tokens or 256, args.template, data=data)
    return T.eval_mc(*model(), T.limit_rows(T.read_mc(data), args.limit), data=data)


def _bias(run, args, device) -> dict:
    from lathe.errors import LatheError
    from lathe.eval.bias import GROUPS, TEMPLATES, probe_run, read_probe_file

    templates, groups = read_probe_file(args.bias) if isinstance(args.bias, str) else (TEMPLATES, GROUPS)
    result = probe_run(run.path, device, templates, groups)
    if result is None:
        raise LatheError(f"{run.path}: no language-model checkpoint to probe")
    return result


def _harness(args, model) -> dict:
    from lathe.errors import LatheError

    try:
        from lathe.eval.harness import LatheLM, run_harness
    except ImportError as e:
        raise LatheError(f"--harness needs lm-evaluation-harness: pip install lm-eval ({e})") from None
    gpt, tok = model()
    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    return run_harness(LatheLM(model=gpt, tokenizer=tok), tasks, args.limit, args.harness_include)


# --- lathe arena ------------------------------------------------------------------------------------------
def arena_command(args) -> int:
    from lathe.console import info
    from lathe.eval.arena import Contestant, arena_name, read_prompts, run_arena, task_prompts
    from lathe.eval.loglik import load_run_model
    from lathe.eval.tasks import save_result
    from lathe.rundir import RunDir

    run_a, run_b = RunDir.resolve(args.a), RunDir.resolve(args.b)
    prompts = read_prompts(args.prompts) if args.prompts else task_prompts(args.arena_task, args.n, args.seed)
    verifier = args.verifier or args.arena_task
    stop = args.stop if args.stop is not None else (["\n"] if args.arena_task else [])
    a = Contestant(str(run_a.path), *load_run_model(run_a.path, args.device))
    b = Contestant(str(run_b.path), *load_run_model(run_b.path, args.device))
    judge = Contestant(args.judge, *load_run_model(args.judge, args.device)) if args.judge else None
    summary, rows = run_arena(a, b, prompts, verifier, judge, args.chat, args.gen_tokens, stop, args.temperature,
                              args.seed)
    path = save_result(Path(args.out) if args.out else run_a.path, arena_name(run_b.path), summary, rows)
    r = summary["win_rate"]
    info(f"arena: A {summary['wins']} wins, B {summary['losses']} wins, "
         f"{summary['ties']} ties; A's win rate {r['rate']:.3f} (95% CI {r['low']:.3f}-{r['high']:.3f}) -> {path}")
    print(json.dumps({k: summary[k] for k in ("a", "b", "n", "wins", "losses", "ties", "win_rate")}))
    return 0

