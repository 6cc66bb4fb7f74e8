"""A-versus-B arena: two models answer the same prompts with the same decoding (greedy, or sampled
with the same seed per prompt); a verifier from `lathe.verify` or a judge model decides each pair,
and A's win rate (ties count half) comes with a Wilson confidence interval.

A judge model prefers the answer it finds likelier: the mean log-probability per token of the
answer given the prompt (per token, or the shorter answer would win on length alone). With both a
verifier and a judge, the judge breaks the verifier's ties.
"""

from __future__ import annotations

from pathlib import Path

from lathe.errors import LatheError
from lathe.eval.metrics import win_rate


def read_prompts(path: str | Path) -> list[dict]:
    """.jsonl rows {"prompt"[, "answer"]} (an answer is passed to the verifier as expected=) or a
    text file with one prompt a line."""
    path = Path(path)
    if not path.is_file():
        raise LatheError(f"prompts file {path} does not exist")
    if path.suffix != ".jsonl":
        prompts = [{"prompt": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from lathe.eval.tasks import read_rows

        prompts = [{"prompt": r["prompt"], **({"answer": str(r["answer"])} if "answer" in r else {})}
                   for r in read_rows(path, {"prompt": str})]
    if not prompts:
        raise LatheError(f"{path}: no prompts")
    return prompts


def task_prompts(kind: str, n: int, seed: int) -> list[dict]:
    """n generated tasks (addition, sorting, reversal) with their answers."""
    from lathe.verify.tasks import generate

    return [{"prompt": t.prompt, "answer": t.answer} for t in generate(kind, seed, n)]


def loglik_scorer(model, tok):
    """(prompt, answer) -> mean log-probability per token of the answer given <|bos|> + prompt;
    an empty answer scores -inf (saying nothing never wins)."""
    from lathe.eval.loglik import encode_pair, score_continuations

    def judge_model(prompt: str, answer: str) -> float:
        context, continuation = encode_pair(tok, prompt, answer)
        if not continuation:
            return float("-inf")
        continuation = continuation[: model.cfg.block_size]
        [scored] = score_continuations(model, [(context, continuation)])
        return scored.logprob / scored.tokens

    return judge_model


class Contestant:
    """A model and its tokenizer, answering prompts in plain text or through the chat template."""

    def __init__(self, name: str, model, tok):
        self.name, self.model, self.tok = name, model, tok

    def answer(self, prompt: str, chat: bool, max_tokens: int, stop: list[str], temperature: float, seed: int) -> str:
        from lathe.chat import render_chat
        from lathe.eval.loglik import complete, prompt_ids

        if chat:
            ids, _ = render_chat(self.tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
            stop_ids = {self.tok.special_id("<|assistant_end|>"), self.tok.eos_id, self.tok.bos_id}
            return complete(self.model, self.tok, ids, max_tokens, stop, stop_ids, temperature, seed)
        return complete(self.model, self.tok, prompt_ids(self.tok, prompt), max_tokens, stop,
                        temperature=temperature, seed=seed)


def run_arena(a: Contestant, b: Contestant, prompts: list[dict], verifier: str | None = None,
              judge: Contestant | None = None, chat: bool = False, max_tokens: int = 64, stop: list[str] = (),
              temperature: float = 0.0, seed: int = 0) -> tuple[dict, list[dict]]:
    """(summary, per-prompt rows); a verifier name, a judge model or both decide. Prompt i is
    answered by both models with seed + i (it matters only when sampling)."""
    from lathe.verify import judge_pair

    if verifier is None and judge is None:
        raise LatheError("the arena needs a verifier (--verifier NAME) or a judge model (--judge RUN)")
    if verifier is not None:
        from lathe.verify import get_verifier

        get_verifier(verifier)  # an unknown name fails before any model runs
    scorer = loglik_scorer(judge.model, judge.tok) if judge is not None else None
    rows = []
    for i, p in enumerate(prompts):
        answers = [c.answer(p["prompt"], chat, max_tokens, list(stop), temperature, seed + i) for c in (a, b)]
        ctx = {"expected": p["answer"]} if verifier is not None and "answer" in p else {}
        result = judge_pair(p["prompt"], *answers, verifier=verifier, scorer=scorer, **ctx)
        rows.append({"prompt": p["prompt"], "answer_a": answers[0], "answer_b": answers[1], "winner": result.winner,
                     "reason": result.reason, "score_a": result.score_a, "score_b": result.score_b})
    options = {"verifier": verifier, "judge": judge.name if judge else None, "chat": chat,
               "max_tokens": max_tokens, "stop": list(stop), "temperature": temperature, "seed": seed}
    return summarize(a.name, b.name, rows, options), rows


def summarize(name_a: str, name_b: str, rows: list[dict], options: dict) -> dict:
    counts = {w: sum(r["winner"] == w for r in rows) for w in ("a", "b", "tie")}
    rate = win_rate(counts["a"], counts["b"], counts["tie"])
    return {"task": "arena", "a": name_a, "b": name_b, "n": len(rows), "wins": counts["a"], "losses": counts["b"],
            "ties": counts["tie"], "win_rate": rate, "options": options,
            "metrics": {"win_rate": rate["rate"], "ci_low": rate["low"], "ci_high": rate["high"]},
            "examples": rows[:5]}


def arena_name(b_path: str | Path) -> str:
    return "arena-" + "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(b_path).resolve().name)

