"""Verdicts, the verifier calling convention, and the registries of verifiers and filters.

A verifier is any plain callable `(prompt, answer, **ctx) -> Verdict`. The improve loop uses them to
keep good samples; RL alignment uses `Verdict.score` as a reward, often several combined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from lathe.errors import LatheError


@dataclass(frozen=True)
class Verdict:
    """A score in [0, 1] and a one-line reason a person can read."""

    score: float
    reason: str
    threshold: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"verdict score must be in [0, 1], got {self.score}")

    @property
    def passed(self) -> bool:
        return self.score >= self.threshold


class Verifier(Protocol):
    def __call__(self, prompt: str, answer: str, **ctx) -> Verdict: ...


class UnknownName(LatheError, KeyError):
    """A verifier or filter name not in the registry. A LatheError (the user named it) that is also
    a KeyError, for callers that treat the registry as a mapping."""

    __str__ = LatheError.__str__  # KeyError would quote the message


_VERIFIERS: dict[str, Verifier] = {}
_FILTERS: dict[str, Callable[..., Verifier]] = {}


def register(name: str):
    """Decorator: make a verifier callable available as get_verifier(name)."""

    def decorate(fn: Verifier) -> Verifier:
        _add(_VERIFIERS, name, fn, "verifier")
        return fn

    return decorate


def register_filter(name: str):
    """Decorator for a filter factory: get_filter(name, **options) builds a fresh one each time,
    because some filters (dedup) remember what they have seen."""

    def decorate(factory: Callable[..., Verifier]):
        _add(_FILTERS, name, factory, "filter")
        return factory

    return decorate


def _add(registry: dict, name: str, obj, what: str) -> None:
    if name in registry and registry[name] is not obj:
        raise ValueError(f"a {what} named {name!r} is already registered")
    registry[name] = obj


def get_verifier(name: str) -> Verifier:
    _load_builtins()
    if name not in _VERIFIERS:
        raise UnknownName(f"unknown verifier {name!r}; known: {', '.join(list_verifiers())}")
    return _VERIFIERS[name]


def get_filter(name: str, **options) -> Verifier:
    _load_builtins()
    if name not in _FILTERS:
        raise UnknownName(f"unknown filter {name!r}; known: {', '.join(list_filters())}")
    return _FILTERS[name](**options)


def list_verifiers() -> list[str]:
    _load_builtins()
    return sorted(_VERIFIERS)


def list_filters() -> list[str]:
    _load_builtins()
    return sorted(_FILTERS)


def _load_builtins() -> None:
    # The built-in verifiers register themselves on import; importing the package pulls them all in.
    import lathe.verify  # noqa: F401


def verifier_name(v: Verifier | str) -> str:
    if isinstance(v, str):
        return v
    for name, registered in _VERIFIERS.items():
        if registered is v:
            return name
    return getattr(v, "__name__", type(v).__name__)


def combine(verifiers: Sequence[Verifier | str], weights: Sequence[float] | None = None) -> Verifier:
    """One verifier whose score is the weighted mean of the given ones' scores; reasons are joined.

    Its pass threshold is the weighted mean of the parts' thresholds: with the default 1.0 it passes
    only when every weighted part scores 1.0."""
    if not verifiers:
        raise ValueError("combine needs at least one verifier")
    weights = [1.0] * len(verifiers) if weights is None else [float(w) for w in weights]
    if len(weights) != len(verifiers):
        raise ValueError(f"combine got {len(verifiers)} verifiers but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"combine weights must be non-negative with a positive sum, got {weights}")
    parts = [(verifier_name(v), get_verifier(v) if isinstance(v, str) else v) for v in verifiers]
    total = sum(weights)

    def combined(prompt: str, answer: str, **ctx) -> Verdict:
        verdicts = [fn(prompt, answer, **ctx) for _, fn in parts]
        score = sum(w * v.score for w, v in zip(weights, verdicts)) / total
        threshold = min(1.0, sum(w * v.threshold for w, v in zip(weights, verdicts)) / total)
        reason = "; ".join(f"{name}: {v.reason}" for (name, _), v in zip(parts, verdicts))
        return Verdict(min(1.0, score), reason, threshold=threshold)

    combined.__name__ = "+".join(name for name, _ in parts)
    return combined
