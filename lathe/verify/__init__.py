"""Verifiers (exact checkers, a code sandbox, a physics simulator), filters and an A/B judge.

Importing the package registers every built-in verifier and filter; see base.get_verifier."""

from lathe.verify.base import (
    Verdict,
    Verifier,
    combine,
    get_filter,
    get_verifier,
    list_filters,
    list_verifiers,
    register,
    register_filter,
)
# Importing these registers their verifiers, filters and task generators.
from lathe.verify import code, filters, physics, tasks
from lathe.verify.judge import JudgeResult, judge_pair
from lathe.verify.sandbox import SandboxResult, run_python
from lathe.verify.tasks import Task, generate

__all__ = [
    "JudgeResult",
    "SandboxResult",
    "Task",
    "Verdict",
    "Verifier",
    "combine",
    "generate",
    "get_filter",
    "get_verifier",
    "judge_pair",
    "list_filters",
    "list_verifiers",
    "register",
    "register_filter",
    "run_python",
]
