"""An A-versus-B judge: which of two answers to one prompt is better.

Model-agnostic: it decides with a verifier when there is one (exact, cheap), else with a `scorer`
the caller supplies, such as a model's log-likelihood `(prompt, answer) -> float`, higher = better.
With both, the scorer breaks the verifier's ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

from lathe.verify.base import Verifier, get_verifier, verifier_name

Scorer = Callable[[str, str], float]


@dataclass(frozen=True)
class JudgeResult:
    winner: Literal["a", "b", "tie"]
    reason: str
    score_a: float | None = None
    score_b: float | None = None


def judge_pair(
    prompt: str,
    answer_a: str,
    answer_b: str,
    verifier: Verifier | str | None = None,
    scorer: Scorer | None = None,
    *,
    margin: float = 0.0,
    **ctx,
) -> JudgeResult:
    """Scores within `margin` of each other are a tie. ctx goes to the verifier."""
    if verifier is None and scorer is None:
        raise ValueError("judge_pair needs a verifier or a scorer")
    if verifier is not None:
        check = get_verifier(verifier) if isinstance(verifier, str) else verifier
        va, vb = check(prompt, answer_a, **ctx), check(prompt, answer_b, **ctx)
        reason = f"{verifier_name(verifier)}: a {va.score:.2f} ({va.reason}), b {vb.score:.2f} ({vb.reason})"
        result = _decide(va.score, vb.score, margin, reason)
        if result.winner != "tie" or scorer is None:
            return result
        return _by_scorer(prompt, answer_a, answer_b, scorer, margin, prefix=f"{reason}; tie broken by ")
    return _by_scorer(prompt, answer_a, answer_b, scorer, margin)


def _by_scorer(prompt: str, a: str, b: str, scorer: Scorer, margin: float, prefix: str = "") -> JudgeResult:
    sa, sb = float(scorer(prompt, a)), float(scorer(prompt, b))
    name = getattr(scorer, "__name__", type(scorer).__name__)
    return _decide(sa, sb, margin, f"{prefix}scorer {name}: a {sa:.4g}, b {sb:.4g}")


def _decide(sa: float, sb: float, margin: float, reason: str) -> JudgeResult:
    # NaN (a scorer that overflowed) loses to any number and ties with NaN.
    sa_, sb_ = (-math.inf if math.isnan(s) else s for s in (sa, sb))
    winner = "tie" if sa_ == sb_ or abs(sa_ - sb_) <= margin else ("a" if sa_ > sb_ else "b")
    return JudgeResult(winner, reason, sa, sb)
