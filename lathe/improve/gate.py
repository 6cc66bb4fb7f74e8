"""Promote a candidate only when it beats the champion by more than the measured noise.

Both models answer the same held-out prompts, so the comparison is paired: per item the difference
is +1 (only the candidate right), -1 (only the champion right) or 0. Its noise has two parts:
  - item noise: the bootstrap spread of the mean paired difference (resampling held-out items);
  - run noise: how much the accuracy of the same recipe moves between training seeds, measured by
    training extra base models (gate.noise_runs) or extra tuning runs; 0 when not measured.
noise = sqrt(item^2 + run^2); promote when gain > margin_sigma * noise and gain > min_gain.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

from lathe.eval.metrics import bootstrap_ci

ONE_SIGMA = 2 * (1 - NormalDist().cdf(1.0))  # alpha of a central +-1 sigma interval (0.317)


@dataclass
class GateDecision:
    promote: bool
    reason: str
    candidate: float  # accuracy
    champion: float
    gain: float
    noise: float  # one sigma of the gain
    item_noise: float
    run_noise: float

    def as_dict(self) -> dict:
        return asdict(self)


def item_noise(candidate_correct, champion_correct, n_boot: int = 1000, seed: int = 0) -> float:
    """One sigma of the mean paired difference, by bootstrap over the held-out items."""
    diff = np.asarray(candidate_correct, dtype=np.float64) - np.asarray(champion_correct, dtype=np.float64)
    ci = bootstrap_ci(diff, n=n_boot, seed=seed, alpha=ONE_SIGMA)
    return (ci["high"] - ci["low"]) / 2


def decide(candidate_correct, champion_correct, margin_sigma: float = 2.0, min_gain: float = 0.0,
           run_noise: float = 0.0, n_boot: int = 1000, seed: int = 0) -> GateDecision:
    """Compare two models' per-item correctness (0/1 lists over the same held-out prompts)."""
    if len(candidate_correct) != len(champion_correct) or not candidate_correct:
        raise ValueError("the gate needs both models scored on the same, non-empty held-out set")
    cand, champ = float(np.mean(candidate_correct)), float(np.mean(champion_correct))
    gain = cand - champ
    items = item_noise(candidate_correct, champion_correct, n_boot, seed)
    noise = math.sqrt(items**2 + run_noise**2)
    bar = max(margin_sigma * noise, min_gain)
    if gain > bar:
        reason = f"promoted: gain {gain:+.3f} > {margin_sigma:g} x noise {noise:.3f}"
        if min_gain > margin_sigma * noise:
            reason = f"promoted: gain {gain:+.3f} > min_gain {min_gain:.3f}"
        return GateDecision(True, reason, cand, champ, gain, noise, items, run_noise)
    if gain <= 0:
        why = f"no gain ({gain:+.3f})"
    elif min_gain >= margin_sigma * noise:
        why = f"gain {gain:+.3f} <= min_gain {min_gain:.3f}"
    else:
        why = f"gain {gain:+.3f} within noise ({margin_sigma:g} x {noise:.3f} = {margin_sigma * noise:.3f})"
    return GateDecision(False, f"champion kept: {why}", cand, champ, gain, noise, items, run_noise)


def run_spread(accuracies: list[float]) -> float:
    """Run-to-run noise of one model's accuracy: the sample std over seeds (0 with one run)."""
    return float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0
