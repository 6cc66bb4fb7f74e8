"""Proposing: which prompts a round works on, and who answers them.

Prompts come fresh from the task generator, or are taken from the originals to rework (a fraction,
`propose.rework_fraction`). Held-out prompts are never proposed. The champion answers each prompt
k times (one shared prefill, see Workshop.answers in loop.py) and can write new tasks of its own
(sampled freely from <|bos|>); optionally a stronger "father" model behind an OpenAI-compatible
endpoint answers instead, and can write new tasks too.
"""

from __future__ import annotations

import os
import random

from lathe.errors import LatheError
from lathe.improve.config import ProposeConfig, TaskConfig
from lathe.verify.tasks import generate


def make_tasks(task: TaskConfig, seed, n: int, exclude: set[str] = frozenset(), options: dict | None = None) -> list[dict]:
    """n distinct {prompt, answer} rows of the task, none of whose prompts is in `exclude`."""
    rng = random.Random(str(seed))  # a string seed: any tuple of ints and names gives its own stream
    rows, seen = [], set(exclude)
    for _ in range(100):  # small task spaces run dry: give up after a bounded number of draws
        for t in generate(task.kind, rng, n - len(rows), **(task.options if options is None else options)):
            if t.prompt not in seen:
                seen.add(t.prompt)
                rows.append({"prompt": t.prompt, "answer": t.answer})
        if len(rows) == n:
            break
    return rows


def choose_prompts(task: TaskConfig, cfg: ProposeConfig, round_: int, originals: list[dict],
                   heldout: set[str]) -> list[tuple[str, str]]:
    """(prompt, source) pairs for one round: fresh generator prompts plus reworked original prompts."""
    n_rework = round(cfg.prompts_per_round * cfg.rework_fraction) if originals else 0
    fresh = make_tasks(task, (task.seed, "propose", round_), cfg.prompts_per_round - n_rework, exclude=heldout)
    picks = [(row["prompt"], f"generator:{task.kind}") for row in fresh]
    if n_rework:
        rng = random.Random(str((task.seed, "rework", round_)))
        picks += [(row["prompt"], "rework:orig") for row in rng.sample(originals, min(n_rework, len(originals)))]
    return picks


def written_prompts(texts: list[str], exclude: set[str]) -> list[str]:
    """New prompts from a model's free samples: each text up to its first '=' (every task's prompt ends
    there), without repeats or excluded (held-out, already chosen) prompts. Malformed ones stay: the
    verifier rejects them with a reason."""
    out, seen = [], set(exclude)
    for text in texts:
        head, sep, _ = text.partition("=")
        prompt = (head + sep).strip()
        if sep and prompt != "=" and prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


# --- the father: a stronger model behind an OpenAI-compatible endpoint --------------------------------
class Father:
    """Answers prompts (k samples each) and writes new tasks, by few-shot chat completions."""

    def __init__(self, url: str, model: str, api_key: str | None = None, examples: list[dict] = ()):
        from openai import OpenAI  # only needed when a father is configured

        self.name = f"father {model} at {url}"
        self.model = model
        self.client = OpenAI(base_url=url, api_key=api_key or "none", max_retries=1, timeout=60)
        self.examples = list(examples)[:8]

    @classmethod
    def from_config(cls, cfg: ProposeConfig, examples: list[dict]) -> "Father":
        return cls(cfg.father_url, cfg.father_model, os.environ.get(cfg.father_api_key_env), examples)

    def _chat(self, messages: list[dict], n: int, temperature: float) -> list[str]:
        from openai import OpenAIError

        try:
            reply = self.client.chat.completions.create(model=self.model, messages=messages, n=n,
                                                        temperature=temperature)
        except OpenAIError as e:
            raise LatheError(f"{self.name}: request failed ({e})") from None
        return [(c.message.content or "").strip() for c in reply.choices]

    def answer(self, prompts: list[str], k: int, temperature: float) -> list[list[str]]:
        shots = []
        for ex in self.examples:
            shots += [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["answer"]}]
        system = {"role": "system", "content": "Complete the task. Reply with the answer only, nothing else."}
        return [self._chat([system, *shots, {"role": "user", "content": p}], k, temperature) for p in prompts]

    def new_tasks(self, n: int) -> list[str]:
        """Up to n new prompts in the examples' format, one per line (the verifier rejects malformed ones)."""
        listing = "\n".join(ex["prompt"] for ex in self.examples)
        ask = f"Here are tasks, one per line:\n{listing}\nWrite {n} new, different tasks in exactly this format, one per line, no answers."
        [text] = self._chat([{"role": "user", "content": ask}], 1, 1.0)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[:n]
