"""Verifiers, the registry, task generators, the kinematics simulator, the A/B judge and filters."""

import math
import random

import pytest

from lathe.errors import LatheError
from lathe.verify import (
    Verdict,
    combine,
    generate,
    get_filter,
    get_verifier,
    judge_pair,
    list_filters,
    list_verifiers,
    register,
)
from lathe.verify.code import extract_code
from lathe.verify.physics import closed_form_range, simulate

# --- verdicts and the registry -------------------------------------------------------------------


def test_verdict_bounds_and_threshold():
    assert Verdict(1.0, "ok").passed and not Verdict(0.99, "close").passed
    assert Verdict(0.6, "enough", threshold=0.5).passed
    with pytest.raises(ValueError):
        Verdict(1.5, "too good")


def test_registry_lists_builtins_and_rejects_unknown_names():
    assert {"addition", "sorting", "reversal", "python", "kinematics"} <= set(list_verifiers())
    assert {"dedup", "degenerate"} <= set(list_filters())
    with pytest.raises(LatheError, match="unknown verifier 'nope'.*addition"):
        get_verifier("nope")
    with pytest.raises(LatheError, match="unknown filter"):
        get_filter("nope")
    with pytest.raises(KeyError) as caught:  # also a KeyError, for mapping-style callers
        get_verifier("nope")
    assert str(caught.value).startswith("unknown verifier 'nope'")  # not quoted like KeyError's


def test_register_custom_verifier_and_refuse_a_clashing_name():
    @register("test-always-half")
    def half(prompt, answer, **ctx):
        return Verdict(0.5, "half")

    assert get_verifier("test-always-half") is half
    with pytest.raises(ValueError, match="already registered"):
        register("test-always-half")(lambda prompt, answer, **ctx: Verdict(1.0, "other"))


def test_combine_weights_scores_joins_reasons_and_passes_only_if_all_pass():
    def has_zero(prompt, answer, **ctx):
        return Verdict(1.0 if "0" in answer else 0.0, "has a 0" if "0" in answer else "no 0")

    reward = combine(["addition", has_zero], weights=[3, 1])
    right_no_zero = reward("123+456=", "579")
    assert right_no_zero.score == pytest.approx(0.75) and not right_no_zero.passed
    assert right_no_zero.reason == "addition: correct: 579; has_zero: no 0"
    assert reward("123+456=", "578").score == 0.0
    assert combine(["addition", has_zero])("3+7=", "10").passed
    with pytest.raises(ValueError):
        combine(["addition"], weights=[1, 2])
    with pytest.raises(ValueError):
        combine(["addition"], weights=[0])


# --- procedural tasks ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["addition", "sorting", "reversal", "kinematics"])
def test_generators_are_deterministic_and_their_answers_verify(kind):
    tasks = generate(kind, 7, 30)
    assert tasks == generate(kind, random.Random(7), 30)
    assert tasks != generate(kind, 8, 30)
    assert len({t.prompt for t in tasks}) > 20  # varied, not one task repeated
    verifier = get_verifier(kind)
    for task in tasks:
        assert task.kind == kind
        assert verifier(task.prompt, task.answer).passed, task


def test_unknown_task_kind():
    with pytest.raises(LatheError, match="unknown task kind"):
        generate("calculus", 0, 1)


def test_addition_digits_option():
    tasks = generate("addition", 0, 200, digits=5)
    operands = [int(x) for t in tasks for x in t.prompt.rstrip("=").split("+")]
    assert max(operands) < 10**5 and any(x >= 10**4 for x in operands)
    assert all(int(t.answer) == sum(int(x) for x in t.prompt.rstrip("=").split("+")) for t in tasks)


@pytest.mark.parametrize("answer, score, reason", [
    ("579", 1.0, "correct: 579"),
    ("  579 \nand some rambling 578", 1.0, "correct: 579"),
    ("579.", 1.0, "correct: 579"),
    ("578", 0.0, "expected 579, got '578'"),
    ("five hundred", 0.0, "expected 579, got 'five hundred' (not a number)"),
    ("", 0.0, "expected 579, got nothing"),
])
def test_addition_verifier(answer, score, reason):
    verdict = get_verifier("addition")("123+456=", answer)
    assert (verdict.score, verdict.reason) == (score, reason)


def test_sorting_and_reversal_verifiers():
    sort = get_verifier("sorting")
    assert sort("sort 3 10 2 =", "2 3 10").passed  # numbers by value, not as text
    assert sort("sort 3 1 2 =", "[1, 2, 3]\n").passed
    assert sort("sort d a c =", "a c d").passed
    wrong = sort("sort 3 1 2 =", "1 3 2")
    assert not wrong.passed and wrong.reason == "expected 1 2 3, got '1 3 2'"
    assert not sort("sort 3 1 2 =", "1 2").passed
    rev = get_verifier("reversal")
    assert rev("reverse abcde =", " edcba\n").passed
    assert rev("reverse abcde =", "edcab").reason == "expected edcba, got 'edcab'"


def test_verifier_given_the_wrong_kind_of_prompt_is_a_bug_not_a_zero():
    with pytest.raises(ValueError, match="not a addition prompt"):
        get_verifier("addition")("reverse abc =", "cba")


# --- kinematics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("speed, angle", [(12, 35), (30, 45), (5, 80), (20, 15)])
def test_simulator_agrees_with_closed_form(speed, angle):
    flight = simulate(speed, angle)
    assert flight.range_m == pytest.approx(closed_form_range(speed, angle), rel=1e-4)
    assert flight.flight_time_s == pytest.approx(2 * speed * math.sin(math.radians(angle)) / 9.81, rel=1e-4)
    assert flight.max_height_m == pytest.approx((speed * math.sin(math.radians(angle))) ** 2 / (2 * 9.81), rel=1e-3)


def test_drag_shortens_the_flight_and_bad_launches_are_refused():
    assert simulate(30, 45, drag=0.01).range_m < 0.7 * simulate(30, 45).range_m
    with pytest.raises(ValueError):
        simulate(10, 0)


def test_kinematics_verifier_tolerance():
    check = get_verifier("kinematics")
    prompt = "A ball is thrown at 12 m/s at 35 degrees. How far away does it land, in meters?"
    expected = closed_form_range(12, 35)  # 13.79
    assert check(prompt, f"It lands about {expected * 1.015:.2f} meters away.").passed
    far = check(prompt, "15 m")
    assert not far.passed and far.reason.startswith("expected 13.79 m, got 15 (off by 8.")
    assert check(prompt, "15 m", rel_tol=0.1).passed
    assert check(prompt, "no idea").reason == "expected 13.79 m, got no number"
    timing = "A ball is thrown at 12 m/s at 35 degrees. How long is it in the air, in seconds?"
    assert check(timing, "1.40 s").passed and not check(timing, "13.79").passed


# --- python code -------------------------------------------------------------------------------


def test_python_verifier_with_stdin_tests():
    check = get_verifier("python")
    tests = [("2 3\n", "5"), ("10 -4\n", "6"), ("0 0\n", "0")]
    right = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert check("add two numbers", right, tests=tests).score == 1.0
    wrong = check("add two numbers", "a, b = map(int, input().split())\nprint(a * b)", tests=tests)
    assert wrong.score == pytest.approx(1 / 3)
    assert wrong.reason == "1/3 cases passed; first failure: case 1 (stdin '2 3\\n'): expected output '5', got '6'"


def test_python_verifier_with_calls_and_expressions():
    check = get_verifier("python")
    program = "def square(x):\n    return x * x\n\nif __name__ == '__main__':\n    print(square(int(input())))"
    tests = [{"call": "square(3)", "expected": 9}, {"call": "square(-2)", "expected": 4}]
    assert check("square", program, tests=tests).passed
    assert check("sum", "sum(range(10))", expected=45).passed
    assert check("sum", "print(sum(range(10)))", expected=45).passed  # a program: its output counts
    assert not check("sum", "sum(range(11))", expected=45).passed


def test_python_verifier_reports_crashes_and_sandbox_stops():
    check = get_verifier("python")
    crash = check("p", "print(1 / 0)", tests=[("", "1")])
    assert crash.score == 0 and "error: ZeroDivisionError: division by zero" in crash.reason
    blocked = check("p", "import socket\nsocket.socket().connect(('127.0.0.1', 1))\nprint(1)", tests=[("", "1")])
    assert blocked.reason.endswith("stopped: blocked: network")
    assert check("p", "", tests=[("", "1")]).reason == "no code in the answer"
    with pytest.raises(ValueError, match="tests"):
        check("p", "print(1)")


def test_extract_code_takes_the_first_fenced_block():
    answer = "Here you go:\n```py\nprint(1)\n```\nand a test:\n```python\nprint(2)\n```"
    assert extract_code(answer) == "print(1)"
    assert extract_code("print(3)") == "print(3)"


# --- judge ---------------------------------------------------------------------------------------


def test_judge_with_a_verifier():
    result = judge_pair("123+456=", "579", "578", verifier="addition")
    assert (result.winner, result.score_a, result.score_b) == ("a", 1.0, 0.0)
    assert "expected 579, got '578'" in result.reason
    assert judge_pair("123+456=", "1", "579", verifier="addition").winner == "b"
    assert judge_pair("123+456=", "1", "2", verifier="addition").winner == "tie"


def test_judge_with_a_scorer_and_tie_breaking():
    def shorter_is_better(prompt, answer):
        return -float(len(answer))

    assert judge_pair("q", "long answer", "short", scorer=shorter_is_better).winner == "b"
    assert judge_pair("q", "abc", "xyz", scorer=shorter_is_better).winner == "tie"
    assert judge_pair("q", "abcd", "xyz", scorer=shorter_is_better, margin=2).winner == "tie"
    broken = judge_pair("123+456=", "1", "22", verifier="addition", scorer=shorter_is_better)
    assert broken.winner == "a" and "tie broken by scorer shorter_is_better" in broken.reason
    assert judge_pair("q", "a", "b", scorer=lambda p, a: math.nan if a == "a" else 0.0).winner == "b"
    with pytest.raises(ValueError):
        judge_pair("q", "a", "b")


# --- filters -------------------------------------------------------------------------------------


def test_dedup_exact_near_and_new():
    dedup = get_filter("dedup")
    assert dedup("p", "The answer is 579 because 123 + 456 = 579.").passed
    exact = dedup("p", "  the answer is 579   because 123 + 456 = 579. ")
    assert not exact.passed and exact.reason == "exact duplicate of sample 0"
    near = dedup("p", "The answer is 579, because 123 + 456 = 579.")
    assert not near.passed and near.reason.startswith("near duplicate of sample 0")
    assert dedup("p", "Something else entirely, about sorting lists.").passed
    assert dedup("other prompt", "The answer is 579 because 123 + 456 = 579.").passed  # new pair
    assert dedup("p", "579").passed and dedup("p", "578").passed  # short answers: exact only
    assert get_filter("dedup")("p", "The answer is 579 because 123 + 456 = 579.").passed  # fresh state
    by_answer = get_filter("dedup", by="answer")
    assert by_answer("p1", "same").passed and not by_answer("p2", "same").passed
    by_answer.reset()
    assert by_answer("p2", "same").passed


@pytest.mark.parametrize("answer, problem", [
    ("", "empty answer"),
    ("   \n ", "empty answer"),
    ("x" * 5000, "too long"),
    ("ok \x00\x01\x02\x03\x04\x05 junk", "non-printable junk"),
    ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab", "mostly one repeated character 'a'"),
    ("yes yes yes yes yes yes yes yes no maybe", "mostly one repeated token 'yes'"),
    ("Let me think. I think that I think that I think that I think that I think that", "stuck in a loop"),
])
def test_degenerate_rejects(answer, problem):
    verdict = get_filter("degenerate")("p", answer)
    assert not verdict.passed and verdict.reason.startswith(problem)
    if problem == "stuck in a loop":
        assert "I think that" in verdict.reason and "repeated 5 times" in verdict.reason


@pytest.mark.parametrize("answer", [
    "579",
    "0 0 0 0 0",  # short repeats can be right answers
    "The ball lands 13.79 meters away, after 1.40 seconds in the air.",
    "def f(x):\n    return x * x\n\nprint(f(3))",
])
def test_degenerate_accepts_normal_answers(answer):
    assert get_filter("degenerate")("p", answer).passed
