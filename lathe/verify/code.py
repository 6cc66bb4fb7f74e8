"""The `python` verifier: run a model's program in the sandbox against test cases.

ctx gives either
  tests=[(stdin, expected_stdout), ..., {"call": "add(2, 3)", "expected": 5}, ...]
    a pair feeds stdin and compares what the program prints; a "call" dict runs the program as a
    module (its `if __name__ == "__main__"` block stays quiet), evaluates the call and compares values;
or
  expected=VALUE
    the answer is an expression whose value must equal VALUE, or else a program whose output must.
Score = the fraction of cases that pass; the reason names the first failure.
"""

from __future__ import annotations

import ast
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

from lathe.verify.base import Verdict, register
from lathe.verify.sandbox import SandboxResult, run_python

FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
NO_VALUE = object()

# Runs the program as a module named "solution", then prints the marked repr of one expression.
HARNESS = """\
import linecache
program = {program!r}
linecache.cache["solution.py"] = (len(program), None, program.splitlines(True), "solution.py")
namespace = {{"__name__": "solution"}}
exec(compile(program, "solution.py", "exec"), namespace)
value = eval(compile({expression!r}, "<test>", "eval"), namespace)
print({mark!r} + repr(value))
"""


@dataclass(frozen=True)
class Case:
    stdin: str = ""
    expected_stdout: str | None = None  # compare printed output ...
    call: str | None = None  # ... or the value of this expression ...
    expected: Any = NO_VALUE  # ... against this value
    or_printed: bool = False  # for a call: output equal to str(expected) also passes
    run_program: bool = True  # for a call: run the program first (False: the call is the answer)

    def describe(self) -> str:
        return f"call {_short(self.call)}" if self.call is not None else f"stdin {_short(self.stdin)}"


def extract_code(answer: str) -> str:
    """The first fenced code block if the answer has one, else the whole answer."""
    match = FENCE.search(answer)
    return (match[1] if match else answer).strip("\n")


@register("python")
def verify_python(prompt: str, answer: str, **ctx) -> Verdict:
    program = extract_code(answer)
    if not program.strip():
        return Verdict(0.0, "no code in the answer")
    cases = _cases(program, ctx)
    limits = {k: ctx[k] for k in ("timeout_s", "memory_mb", "cpu_s") if k in ctx}
    passed, first_failure = 0, None
    for i, case in enumerate(cases, 1):
        failure = _check(program, case, limits)
        if failure is None:
            passed += 1
        elif first_failure is None:
            first_failure = f"case {i} ({case.describe()}): {failure}"
    reason = f"{passed}/{len(cases)} cases passed" + (f"; first failure: {first_failure}" if first_failure else "")
    return Verdict(passed / len(cases), reason)


def _cases(program: str, ctx: dict) -> list[Case]:
    if ctx.get("tests"):
        return [_as_case(test) for test in ctx["tests"]]
    if "expected" not in ctx:
        raise ValueError("the python verifier needs tests=[...] or expected=... in ctx")
    if _is_expression(program):
        # print(...) is an expression too: then what it printed may carry the value instead.
        return [Case(call=program, expected=ctx["expected"], or_printed=True, run_program=False)]
    return [Case(expected_stdout=str(ctx["expected"]))]


def _as_case(test) -> Case:
    if isinstance(test, Case):
        return test
    if isinstance(test, dict):
        stdin = test.get("stdin") or ""
        if "call" in test:
            return Case(stdin=stdin, call=test["call"], expected=test["expected"])
        return Case(stdin=stdin, expected_stdout=test["expected"])
    stdin, expected_stdout = test
    return Case(stdin=stdin or "", expected_stdout=expected_stdout)


def _is_expression(program: str) -> bool:
    try:
        ast.parse(program, mode="eval")
        return True
    except SyntaxError:
        return False


def _check(program: str, case: Case, limits: dict) -> str | None:
    """None when the case passes, else what went wrong in a few words."""
    if case.call is None:
        result = run_python(program, stdin=case.stdin, **limits)
        if not result.ok:
            return _run_failure(result)
        got, want = _normalize(result.stdout), _normalize(str(case.expected_stdout))
        return None if got == want else f"expected output {_short(want)}, got {_short(got)}"
    # A fresh mark each run, so that a program cannot simply print a fake result line.
    mark = f"\x1elathe-result-{secrets.token_hex(8)}:"
    harness = HARNESS.format(program=program if case.run_program else "", expression=case.call, mark=mark)
    result = run_python(harness, stdin=case.stdin, **limits)
    if not result.ok:
        return _run_failure(result)
    printed, _, text = result.stdout.rpartition(mark)
    text = text.split("\n", 1)[0]
    got = _literal(text)
    if text == repr(case.expected) or (got is not NO_VALUE and _same(got, case.expected)):
        return None
    if case.or_printed and _normalize(printed) == _normalize(str(case.expected)):
        return None
    return f"expected {case.expected!r}, got {_short(text, quote=False)}"


def _run_failure(result: SandboxResult) -> str:
    if result.killed_reason:
        return f"stopped: {result.killed_reason}"
    lines = result.stderr.strip().splitlines()
    return f"error: {_short(lines[-1] if lines else f'exit code {result.returncode}', quote=False)}"


def _normalize(output: str) -> str:
    # Trailing spaces and blank lines at either end are not worth failing a program over.
    return "\n".join(line.rstrip() for line in output.strip("\n").splitlines()).strip("\n")


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return NO_VALUE


def _same(got, expected) -> bool:
    numbers = (int, float)
    if isinstance(got, numbers) and isinstance(expected, numbers) and not isinstance(got, bool):
        return math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12)
    return got == expected


def _short(text, limit: int = 60, quote: bool = True) -> str:
    text = repr(text) if quote else str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
