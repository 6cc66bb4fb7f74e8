"""An lm-evaluation-harness adapter: run its tasks on a lathe model, where you have the task data.

    from lathe.eval.harness import LatheLM, run_harness
    lm = LatheLM(run="runs/x")                           # or LatheLM(model=gpt, tokenizer=tok)
    results = run_harness(lm, ["hellaswag"], limit=100)  # lm_eval.simple_evaluate underneath

or `lathe eval --harness hellaswag,arc_easy [--harness-include DIR]`. Importing this module also
registers the model as "lathe" (`--model lathe --model_args run=runs/x` where lm-eval's own
command line imports it). The three request types go through `lathe.eval.loglik`, so a harness
log-likelihood is exactly lathe's own: contexts start with <|bos|> as documents do in pretraining.
Generation is greedy unless a task asks for do_sample. Chat templates are not supported.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lathe.eval.loglik import complete, encode_pair, load_run_model, prompt_ids, score_continuations


@register_model("lathe")
class LatheLM(LM):
    def __init__(self, run=None, model=None, tokenizer=None, device: str = "auto", batch_size: int | str = 32,
                 max_gen_toks: int | str = 256):
        super().__init__()
        if model is None:
            model, tokenizer = load_run_model(run, device)
        elif tokenizer is None:
            raise ValueError("LatheLM(model=...) also needs tokenizer=")
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self._device = model.lm_head.weight.device

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tok, context, continuation) for context, continuation in (r.args for r in requests)]
        return [(s.logprob, s.greedy) for s in score_continuations(self.model, pairs, self.batch_size)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each string's full log-likelihood after <|bos|>, every token predicted exactly once, in
        windows of block_size tokens that each see as much preceding text as fits."""
        windows, owner = [], []
        for i, request in enumerate(requests):
            ids = self.tok.encode(request.args[0])
            for window in get_rolling_token_windows(ids, self.tok.bos_id, self.model.cfg.block_size, 1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, scored in zip(owner, score_continuations(self.model, windows, self.batch_size)):
            totals[i] += scored.logprob
        return totals

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = kwargs.get("do_sample", False) and float(kwargs.get("temperature", 0) or 0) > 0
            outputs.append(complete(self.model, self.tok, prompt_ids(self.tok, context),
                                    int(kwargs.get("max_gen_toks", self.max_gen_toks)), until,
                                    temperature=float(kwargs["temperature"]) if sample else 0.0,
                                    seed=int(kwargs.get("seed", 0)) if sample else None))
        return outputs


def run_harness(lm: LatheLM, tasks: list[str], limit: int | None = None, include_path: str | None = None,
                num_fewshot: int | None = None, include_defaults: bool = True) -> dict:
    """lm_eval.simple_evaluate on `lm`; returns {"task": "harness", "tasks", "n", "metrics", "results"}
    with metrics flattened to "<task>/<metric>" (numbers only). `include_path` adds a folder of task
    YAML files (your own tasks on local data); include_defaults=False skips indexing lm-eval's
    thousands of built-in tasks when only those are needed."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    out = simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                          log_samples=False, bootstrap_iters=0)
    results = out["results"] if out else {}
    metrics, sizes = {}, []
    for task, scores in results.items():
        for name, value in scores.items():
            if name == "sample_len":
                sizes.append(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{task}/{name.replace(',none', '')}"] = value
    return {"task": "harness", "tasks": tasks, "limit": limit, "n": sum(sizes) if sizes else None,
            "metrics": metrics, "results": results, "examples": []}
