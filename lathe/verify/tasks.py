"""Procedural tasks with exact answers: addition, sorting, string reversal.

Each kind has a generator `(rng, n, **options) -> list[Task]`, deterministic for a given seed, and a
registered verifier of the same name. The verifiers recompute the answer from the prompt, so a
sample needs no stored answer; `expected=` in ctx overrides that.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Callable

from lathe.errors import LatheError
from lathe.verify.base import Verdict, register


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: str
    kind: str  # also the name of the verifier that checks it


Generator = Callable[..., list[Task]]
GENERATORS: dict[str, Generator] = {}


def task_generator(kind: str):
    def decorate(fn: Generator) -> Generator:
        GENERATORS[kind] = fn
        return fn

    return decorate


def generate(kind: str, rng: random.Random | int, n: int, **options) -> list[Task]:
    """n tasks of one kind; an int rng is a seed, so the same seed gives the same tasks."""
    if kind not in GENERATORS:
        raise LatheError(f"unknown task kind {kind!r}; known: {', '.join(sorted(GENERATORS))}")
    return GENERATORS[kind](as_rng(rng), n, **options)


def as_rng(rng: random.Random | int) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def first_line(answer: str) -> str:
    """What a model answered: the first non-blank line, without surrounding spaces."""
    for line in answer.strip().splitlines():
        return line.strip()
    return ""


def exact_verdict(expected: str, got: str) -> Verdict:
    if got == expected:
        return Verdict(1.0, f"correct: {expected}")
    return Verdict(0.0, f"expected {expected}, got {got!r}" if got else f"expected {expected}, got nothing")


def parse_prompt(pattern: re.Pattern, prompt: str, kind: str) -> re.Match:
    # A prompt the verifier cannot read is a wiring bug (wrong verifier for the task), not a wrong answer.
    match = pattern.fullmatch(prompt.strip())
    if match is None:
        raise ValueError(f"not a {kind} prompt: {prompt!r}")
    return match


# --- addition: "123+456=" -> "579" ---------------------------------------------------------------

ADDITION = re.compile(r"(\d+)\s*\+\s*(\d+)\s*=")


@task_generator("addition")
def generate_addition(rng: random.Random, n: int, digits: int = 3) -> list[Task]:
    """Operands have 1..digits digits, drawn so that long operands are as common as short ones."""
    if digits < 1:
        raise ValueError("digits must be at least 1")

    def operand() -> int:
        width = rng.randint(1, digits)
        return rng.randint(0 if width == 1 else 10 ** (width - 1), 10**width - 1)

    tasks = []
    for _ in range(n):
        a, b = operand(), operand()
        tasks.append(Task(f"{a}+{b}=", str(a + b), "addition"))
    return tasks


@register("addition")
def verify_addition(prompt: str, answer: str, **ctx) -> Verdict:
    match = parse_prompt(ADDITION, prompt, "addition")
    expected = str(ctx.get("expected", int(match[1]) + int(match[2])))
    got = first_line(answer).rstrip(".")
    if got and not re.fullmatch(r"[+-]?\d+", got):
        return Verdict(0.0, f"expected {expected}, got {got!r} (not a number)")
    return exact_verdict(expected, str(int(got)) if got else "")


# --- sorting: "sort 3 1 2 =" -> "1 2 3" ----------------------------------------------------------

SORTING = re.compile(r"sort\s+(.+?)\s*=")


@task_generator("sorting")
def generate_sorting(rng: random.Random, n: int, length: int = 5, letters: bool = False,
                     max_value: int = 9) -> list[Task]:
    """Lists of `length` small ints in 0..max_value, or lowercase letters when letters=True."""
    tasks = []
    for _ in range(n):
        if letters:
            items = [rng.choice(string.ascii_lowercase) for _ in range(length)]
            ordered = sorted(items)
        else:
            values = [rng.randint(0, max_value) for _ in range(length)]
            items, ordered = [str(v) for v in values], [str(v) for v in sorted(values)]
        tasks.append(Task(f"sort {' '.join(items)} =", " ".join(ordered), "sorting"))
    return tasks


def sort_items(items: list[str]) -> list[str]:
    # Numbers sort by value (10 after 9); anything else sorts as text.
    if all(re.fullmatch(r"-?\d+", item) for item in items):
        return sorted(items, key=int)
    return sorted(items)


@register("sorting")
def verify_sorting(prompt: str, answer: str, **ctx) -> Verdict:
    match = parse_prompt(SORTING, prompt, "sorting")
    expected = ctx.get("expected") or " ".join(sort_items(match[1].split()))
    # Accept "1 2 3", "1, 2, 3" or "[1, 2, 3]": compare the items, not the punctuation.
    items = re.split(r"[\s,]+", first_line(answer).strip("[]()."))
    return exact_verdict(expected, " ".join(item for item in items if item))


# --- reversal: "reverse abcde =" -> "edcba" ------------------------------------------------------

REVERSAL = re.compile(r"reverse\s+(\S+)\s*=")


@task_generator("reversal")
def generate_reversal(rng: random.Random, n: int, min_length: int = 3, max_length: int = 8) -> list[Task]:
    tasks = []
    for _ in range(n):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_length, max_length)))
        tasks.append(Task(f"reverse {word} =", word[::-1], "reversal"))
    return tasks


@register("reversal")
def verify_reversal(prompt: str, answer: str, **ctx) -> Verdict:
    match = parse_prompt(REVERSAL, prompt, "reversal")
    expected = ctx.get("expected") or match[1][::-1]
    return exact_verdict(expected, first_line(answer))
