"""Evaluation metrics as pure functions: language modelling, classification, BLEU/chrF, GSM8K-style
exact match, multiple choice, arena win rates and noise-aware comparison of scores.

Nothing here touches a model: callers score outputs elsewhere and pass plain numbers and strings in.
Empty or inconsistent input raises ValueError with a message naming the problem, never a silent 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from decimal import Decimal
from statistics import NormalDist

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

# ---------------------------------------------------------------------------------------------
# Language modelling
# ---------------------------------------------------------------------------------------------


def perplexity(total_nats: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token); math.inf when that overflows a float."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if total_nats < 0:
        raise ValueError(f"total_nats is a negative log-likelihood and cannot be negative, got {total_nats}")
    try:
        return math.exp(total_nats / n_tokens)
    except OverflowError:  # loss above ~709 nats/token: an untrained or diverged model
        return math.inf


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Total log-loss in bits divided by the UTF-8 bytes scored: comparable across tokenizers."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, got {n_bytes}")
    if total_nats < 0:
        raise ValueError(f"total_nats cannot be negative, got {total_nats}")
    return total_nats / math.log(2) / n_bytes


def unigram_entropy(token_counts: Mapping[Hashable, int] | Sequence[int] | np.ndarray) -> float:
    """Entropy in nats/token of the empirical unigram distribution given by the counts.

    `token_counts` is a mapping token -> count or an array of counts (e.g. np.bincount of token ids).
    This is the loss of the best model that ignores context, so a language model must beat it."""
    values = list(token_counts.values()) if isinstance(token_counts, Mapping) else token_counts
    counts = np.asarray(values, dtype=np.float64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("token_counts must be a flat collection of non-negative counts")
    total = counts.sum()
    if total <= 0:
        raise ValueError("token_counts is empty or all zero")
    p = counts[counts > 0] / total  # 0 * log 0 = 0, so unseen tokens drop out
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def _check_pairs(a: Sequence, b: Sequence, names: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{names} differ in length: {len(a)} vs {len(b)}")
    if len(a) == 0:
        raise ValueError(f"{names} are empty")


def _default_labels(y_true: Sequence, y_pred: Sequence) -> list:
    seen = list(dict.fromkeys([*y_true, *y_pred]))
    try:
        return sorted(seen)
    except TypeError:  # mixed, unorderable label types: keep first-appearance order
        return seen


def confusion_matrix(
    y_true: Sequence, y_pred: Sequence, labels: Sequence | None = None
) -> tuple[list[list[int]], list]:
    """Counts with rows = true label and columns = predicted label (the scikit-learn convention).

    `labels` fixes the order and may include labels that never occur (their row and column are 0).
    A value outside an explicit `labels` raises ValueError: dropping it would silently inflate scores."""
    _check_pairs(y_true, y_pred, "y_true and y_pred")
    labels = list(labels) if labels is not None else _default_labels(y_true, y_pred)
    index = {label: i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        raise ValueError(f"labels contain duplicates: {labels}")
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred):
        missing = [v for v in (t, p) if v not in index]
        if missing:
            raise ValueError(f"label {missing[0]!r} is not in labels {labels}")
        matrix[index[t]][index[p]] += 1
    return matrix, labels


def _ratio(num: float, den: float) -> float:
    """num/den with 0/0 (and x/0) defined as 0.0: no predictions or no examples earn no credit."""
    return num / den if den else 0.0


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return precision, recall, _ratio(2 * precision * recall, precision + recall)


def classification_report(y_true: Sequence, y_pred: Sequence, labels: Sequence | None = None) -> dict:
    """Accuracy plus per-class, macro, micro and weighted precision / recall / F1.

    Returns {"accuracy", "per_class": {label: {precision, recall, f1, support}}, "macro", "micro",
    "weighted"}. Any 0/0 (a class never predicted, or never present) is 0.0, as in scikit-learn with
    zero_division=0. Macro F1 is the mean of per-class F1 (not the F1 of macro P and R); macro
    averages include classes listed in `labels` with support 0. Every example has exactly one label
    in `labels`, so micro precision = recall = F1 = accuracy."""
    matrix, labels = confusion_matrix(y_true, y_pred, labels)
    m = np.asarray(matrix, dtype=np.float64)
    tp, support = np.diag(m), m.sum(axis=1)
    fp, fn = m.sum(axis=0) - tp, support - tp
    per_class = {}
    for i, label in enumerate(labels):
        p, r, f = _prf(tp[i], fp[i], fn[i])
        per_class[label] = {"precision": p, "recall": r, "f1": f, "support": int(support[i])}
    keys = ("precision", "recall", "f1")
    weights = support / support.sum()
    micro = _prf(tp.sum(), fp.sum(), fn.sum())
    return {
        "accuracy": float(tp.sum() / m.sum()),
        "per_class": per_class,
        "macro": {k: float(np.mean([c[k] for c in per_class.values()])) for k in keys},
        "micro": {k: float(v) for k, v in zip(keys, micro)},
        "weighted": {k: float(sum(w * c[k] for w, c in zip(weights, per_class.values()))) for k in keys},
    }


# ---------------------------------------------------------------------------------------------
# Translation-style overlap metrics (sacrebleu, corpus level)
# ---------------------------------------------------------------------------------------------


def _reference_streams(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[list[str | None]]:
    """Per-hypothesis references -> sacrebleu's layout: one stream per reference slot, None where a
    hypothesis has fewer references than the most (sacrebleu skips None)."""
    _check_pairs(hypotheses, references, "hypotheses and references")
    per_hyp = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not refs for refs in per_hyp):
        raise ValueError("every hypothesis needs at least one reference")
    width = max(len(refs) for refs in per_hyp)
    return [[refs[k] if k < len(refs) else None for refs in per_hyp] for k in range(width)]


def bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU (0-100) with sacrebleu defaults (13a tokenization, exp smoothing).

    `references[i]` is one string or a list of strings for hypothesis i. Corpus BLEU needs 4-gram
    statistics, so a corpus of only 1-3 word sentences scores 0 even when every word matches."""
    streams = _reference_streams(hypotheses, references)
    return float(BLEU().corpus_score(list(hypotheses), streams).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus chrF (0-100) with sacrebleu defaults (character 6-grams, beta = 2); references as in bleu."""
    streams = _reference_streams(hypotheses, references)
    return float(CHRF().corpus_score(list(hypotheses), streams).score)


# ---------------------------------------------------------------------------------------------
# Exact match (GSM8K-style "#### <answer>")
# ---------------------------------------------------------------------------------------------

# A number right after the marker; it must end at whitespace, punctuation or the end of the text,
# so "#### 42abc" is malformed rather than read as 42.
_GSM8K_ANSWER = re.compile(r"\s*(-?\d[\d,]*(?:\.\d+)?)(?=$|[\s.,;:!?)\]])")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")


def extract_gsm8k_answer(text: str) -> str | None:
    """The number after the last '####', with commas removed and a trailing period dropped
    ("#### 1,234." -> "1234"); None when there is no '####' or no number right after the last one."""
    _, marker, tail = text.rpartition("####")
    if not marker:
        return None
    match = _GSM8K_ANSWER.match(tail)
    return match.group(1).replace(",", "") if match else None


def is_well_formed_gsm8k(text: str) -> bool:
    """True when the text ends its reasoning with '#### <number>', i.e. an answer can be extracted."""
    return extract_gsm8k_answer(text) is not None


def normalize_number(text: str) -> str | None:
    """Canonical form of a written number so that equal values compare equal as strings:
    "$1,000.00" -> "1000", "3.50" -> "3.5", "-0" -> "0". None when the text is not a plain number."""
    cleaned = text.strip().replace(",", "").removeprefix("$").rstrip(".")
    if not _NUMBER.fullmatch(cleaned):
        return None  # also keeps out "nan", "inf" and "1e3", which Decimal would accept
    value = Decimal(cleaned)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _answer_key(answer: str) -> str:
    number = normalize_number(answer)
    return number if number is not None else answer.strip()


def exact_match(
    predictions: Sequence[str],
    references: Sequence[str],
    extract: Callable[[str], str | None] | None = extract_gsm8k_answer,
) -> float:
    """Fraction of predictions whose extracted answer equals the reference's.

    `extract` is applied to both sides (GSM8K references carry '#### answer' too); pass None to
    compare the raw strings. Answers compare after normalize_number when numeric, else stripped.
    A prediction without an answer counts as wrong; a reference without one raises ValueError."""
    _check_pairs(predictions, references, "predictions and references")
    get = extract or (lambda s: s)
    hits = 0
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        gold = get(ref)
        if gold is None:
            raise ValueError(f"reference {i} has no extractable answer: {ref[-80:]!r}")
        guess = get(pred)
        hits += guess is not None and _answer_key(guess) == _answer_key(gold)
    return hits / len(predictions)


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------


def multiple_choice_accuracy(
    option_logprobs: Sequence[Sequence[float]],
    answers: Sequence[int],
    normalize_lengths: Sequence[Sequence[int]] | None = None,
) -> float:
    """Fraction of questions whose highest-scoring option is the answer.

    An option's score is its summed log-probability, divided by its length when `normalize_lengths`
    is given (tokens or bytes; per-byte is lm-eval's acc_norm) so long options are not penalised for
    having more tokens. Questions may have different numbers of options. A tie goes to the first
    option of the tied ones."""
    _check_pairs(option_logprobs, answers, "option_logprobs and answers")
    if normalize_lengths is not None:
        _check_pairs(option_logprobs, normalize_lengths, "option_logprobs and normalize_lengths")
    hits = 0
    for i, (logprobs, answer) in enumerate(zip(option_logprobs, answers)):
        scores = np.asarray(logprobs, dtype=np.float64)
        if not 0 <= answer < len(scores):
            raise ValueError(f"question {i}: answer {answer} is not an index into its {len(scores)} options")
        if normalize_lengths is not None:
            scores = scores / _lengths(normalize_lengths[i], len(scores), i)
        hits += int(np.argmax(scores)) == answer
    return hits / len(answers)


def _lengths(lengths: Sequence[int], n_options: int, question: int) -> np.ndarray:
    arr = np.asarray(lengths, dtype=np.float64)
    if arr.shape != (n_options,) or (arr <= 0).any():
        raise ValueError(f"question {question}: need {n_options} positive lengths, got {list(lengths)}")
    return arr


# ---------------------------------------------------------------------------------------------
# Arenas, confidence intervals and noise-aware comparison
# ---------------------------------------------------------------------------------------------


def win_rate(wins: int, losses: int, ties: int, confidence: float = 0.95) -> dict:
    """A's win rate against B with ties counted as half a win, and its Wilson score interval.

    Wilson rather than the normal (Wald) interval because it stays inside [0, 1] and is honest at
    small n and at rates near 0 or 1. Treating a tie as half a win is a slight approximation (a tie
    carries less variance than a coin flip), which makes the interval a little conservative."""
    if min(wins, losses, ties) < 0:
        raise ValueError(f"counts must be non-negative, got wins={wins} losses={losses} ties={ties}")
    n = wins + losses + ties
    if n == 0:
        raise ValueError("no games: wins + losses + ties is 0")
    rate = (wins + 0.5 * ties) / n
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    denom = 1 + z * z / n
    center = (rate + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return {"rate": rate, "low": max(0.0, center - half), "high": min(1.0, center + half)}


def bootstrap_ci(
    values: Sequence | np.ndarray,
    stat: Callable[[np.ndarray], float] = np.mean,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Percentile bootstrap interval for `stat(values)`: {"estimate", "low", "high"}.

    Resamples items (rows) with replacement. For a paired comparison pass one row per item, e.g.
    shape (items, 2) with stat=lambda r: r[:, 0].mean() - r[:, 1].mean(), or the per-item
    differences directly: resampling whole rows keeps each item's pair together, so item difficulty
    cancels out and the interval is much tighter than comparing two independent intervals."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim == 0 or len(data) == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if n < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n >= 1 and 0 < alpha < 1, got n={n} alpha={alpha}")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(data), size=(n, len(data)))
    samples = np.array([stat(data[idx]) for idx in rows], dtype=np.float64)
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return {"estimate": float(stat(data)), "low": float(low), "high": float(high)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1, the unbiased variance). A single value has no
    spread estimate and reports std 0.0; significantly_better refuses such input."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("mean_std needs at least one value")
    std = float(data.std(ddof=1)) if data.size > 1 else 0.0
    return float(data.mean()), std


def significantly_better(
    candidate_scores: Sequence[float],
    champion_scores: Sequence[float],
    margin_sigma: float = 2.0,
) -> bool:
    """True when mean(candidate) - mean(champion) > margin_sigma * SE of that difference, where
    SE = sqrt(s_cand^2 / n_cand + s_champ^2 / n_champ) (Welch's unpooled standard error); higher
    scores are better. With the default 2.0 a candidate that is really no better passes about 2.3%
    of the time given many runs per side, more with few (about 6% for 3 vs 3, since the SE is
    itself estimated from so few runs).

    Why this test: gate scores are repeated runs (seeds, sampled eval subsets) of each model, which
    are independent and may differ in count and in noise, so an unpaired test with unequal
    variances fits; a paired test would need the same items scored by both. When per-item scores
    of both models on one eval set are available, bootstrap_ci on their differences is sharper.
    Each side needs at least 2 scores to estimate its noise. If both sides are noiseless (std 0)
    any strictly higher mean passes."""
    if len(candidate_scores) < 2 or len(champion_scores) < 2:
        raise ValueError("significantly_better needs at least 2 scores per side to estimate noise")
    if margin_sigma < 0:
        raise ValueError(f"margin_sigma must be non-negative, got {margin_sigma}")
    cand_mean, cand_std = mean_std(candidate_scores)
    champ_mean, champ_std = mean_std(champion_scores)
    se = math.sqrt(cand_std**2 / len(candidate_scores) + champ_std**2 / len(champion_scores))
    return cand_mean - champ_mean > margin_sigma * se
