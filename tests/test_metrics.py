"""lathe.eval.metrics against values worked out by hand (the arithmetic is in the comments)."""

import math

import numpy as np
import pytest

from lathe.eval.metrics import (
    bits_per_byte,
    bleu,
    bootstrap_ci,
    chrf,
    classification_report,
    confusion_matrix,
    exact_match,
    extract_gsm8k_answer,
    is_well_formed_gsm8k,
    mean_std,
    multiple_choice_accuracy,
    normalize_number,
    perplexity,
    significantly_better,
    unigram_entropy,
    win_rate,
)

approx = pytest.approx

# ---------------------------------------------------------------------------------------------
# Language modelling
# ---------------------------------------------------------------------------------------------


def test_perplexity_and_bits_per_byte():
    # 10 tokens at ln 4 nats each: mean loss ln 4, so perplexity e^(ln 4) = 4.
    assert perplexity(10 * math.log(4), 10) == approx(4.0)
    assert perplexity(0.0, 5) == 1.0  # a perfect model
    # 12 ln 2 nats = 12 bits over 4 bytes = 3 bits/byte.
    assert bits_per_byte(12 * math.log(2), 4) == approx(3.0)


def test_perplexity_overflow_is_inf_not_an_error():
    assert perplexity(1000.0, 1) == math.inf  # e^1000 does not fit in a float


@pytest.mark.parametrize("call", [
    lambda: perplexity(1.0, 0),
    lambda: perplexity(-1.0, 3),
    lambda: bits_per_byte(1.0, 0),
    lambda: bits_per_byte(-1.0, 3),
])
def test_lm_metrics_reject_bad_counts(call):
    with pytest.raises(ValueError):
        call()


def test_unigram_entropy_by_hand():
    # p = (1/2, 1/4, 1/4): H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1/2 ln 2 + ln 2 = 1.5 ln 2 nats.
    assert unigram_entropy({"a": 2, "b": 1, "c": 1}) == approx(1.5 * math.log(2))
    # Array of counts as from np.bincount; the zero count (unseen token) contributes nothing.
    assert unigram_entropy(np.array([2, 0, 1, 1])) == approx(1.5 * math.log(2))
    assert unigram_entropy([5, 5, 5, 5]) == approx(math.log(4))  # uniform over 4
    assert unigram_entropy([7]) == 0.0  # one token type: no uncertainty


@pytest.mark.parametrize("counts", [[], [0, 0], {}, [1, -1]])
def test_unigram_entropy_rejects_empty_or_negative(counts):
    with pytest.raises(ValueError):
        unigram_entropy(counts)


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------

Y_TRUE = ["cat", "cat", "dog", "dog", "dog", "bird"]
Y_PRED = ["cat", "dog", "dog", "dog", "cat", "cat"]


def test_confusion_matrix_rows_true_cols_pred():
    matrix, labels = confusion_matrix(Y_TRUE, Y_PRED)
    assert labels == ["bird", "cat", "dog"]  # sorted union
    assert matrix == [
        [0, 1, 0],  # bird -> cat
        [0, 1, 1],  # cat -> cat, dog
        [0, 1, 2],  # dog -> dog, dog, cat
    ]


def test_classification_report_by_hand():
    r = classification_report(Y_TRUE, Y_PRED)
    assert r["accuracy"] == approx(3 / 6)  # diagonal 0 + 1 + 2 of 6
    # bird: never predicted, so precision 0/0 := 0; recall 0/1; F1 0.
    assert r["per_class"]["bird"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # cat: TP 1, predicted 3 times, present 2 times -> P 1/3, R 1/2, F1 = 2(1/6)/(5/6) = 2/5.
    cat = r["per_class"]["cat"]
    assert (cat["precision"], cat["recall"], cat["f1"]) == (approx(1 / 3), approx(1 / 2), approx(0.4))
    assert cat["support"] == 2
    # dog: TP 2, predicted 3, present 3 -> P = R = F1 = 2/3.
    dog = r["per_class"]["dog"]
    assert (dog["precision"], dog["recall"], dog["f1"], dog["support"]) == (approx(2 / 3),) * 3 + (3,)
    # macro: P (0 + 1/3 + 2/3)/3 = 1/3; R (0 + 1/2 + 2/3)/3 = 7/18; F1 (0 + 2/5 + 2/3)/3 = 16/45.
    assert r["macro"] == approx({"precision": 1 / 3, "recall": 7 / 18, "f1": 16 / 45})
    # weighted by support 1, 2, 3 of 6: P (2/3 + 2)/6 = 4/9; R (1 + 2)/6 = 1/2; F1 (4/5 + 2)/6 = 7/15.
    assert r["weighted"] == approx({"precision": 4 / 9, "recall": 1 / 2, "f1": 7 / 15})
    # micro: TP 3, FP 3, FN 3 -> all 1/2, equal to accuracy.
    assert r["micro"] == approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})


def test_label_that_never_occurs_gets_zero_row_and_counts_in_macro():
    r = classification_report(Y_TRUE, Y_PRED, labels=["bird", "cat", "dog", "fish"])
    assert r["per_class"]["fish"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # macro F1 now averages over 4 classes: (0 + 2/5 + 2/3 + 0)/4 = 16/60.
    assert r["macro"]["f1"] == approx(16 / 60)
    assert r["weighted"]["f1"] == approx(7 / 15)  # zero support, zero weight
    assert confusion_matrix(Y_TRUE, Y_PRED, ["bird", "cat", "dog", "fish"])[0][3] == [0, 0, 0, 0]


def test_predicted_label_absent_from_truth():
    # "x" is only ever predicted: precision 0/1, recall 0/0 := 0; class "a" recall 1/2.
    r = classification_report(["a", "a"], ["a", "x"])
    assert r["per_class"]["x"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r["per_class"]["a"]["recall"] == approx(0.5)
    assert r["accuracy"] == approx(0.5)


@pytest.mark.parametrize("y_true, y_pred, labels", [
    ([], [], None),  # empty
    (["a"], ["a", "b"], None),  # length mismatch
    (["a", "b"], ["a", "c"], ["a", "b"]),  # prediction outside explicit labels
    (["a"], ["a"], ["a", "a"]),  # duplicate labels
])
def test_classification_rejects_bad_input(y_true, y_pred, labels):
    with pytest.raises(ValueError):
        classification_report(y_true, y_pred, labels)


def test_report_agrees_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    labels = ["bird", "cat", "dog", "fish"]
    r = classification_report(Y_TRUE, Y_PRED, labels)
    for avg in ("macro", "micro", "weighted"):
        p, rec, f, _ = metrics.precision_recall_fscore_support(
            Y_TRUE, Y_PRED, labels=labels, average=avg, zero_division=0
        )
        assert (r[avg]["precision"], r[avg]["recall"], r[avg]["f1"]) == approx((p, rec, f))


# ---------------------------------------------------------------------------------------------
# BLEU and chrF
# ---------------------------------------------------------------------------------------------


def test_bleu_identical_disjoint_and_hand_value():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == approx(100.0)
    assert bleu(["a b c d"], ["e f g h"]) == 0.0
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat", 6 words each so brevity penalty 1.
    # clipped n-gram precisions: 1-gram 5/6 (second "the" unmatched), 2-gram 3/5, 3-gram 2/4, 4-gram 1/3.
    # BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 100 * (1/12) ** 0.25 = 53.728...
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == approx(100 * (1 / 12) ** 0.25)
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == approx(53.7285, abs=1e-4)


def test_bleu_several_references_per_hypothesis():
    # Each hypothesis equals one of its references, and the counts of references differ: 100.
    hyps = ["the quick brown fox", "one two three four five"]
    refs = [["a slow red dog", "the quick brown fox"], ["one two three four five"]]
    assert bleu(hyps, refs) == approx(100.0)
    # Only the unrelated references: no word overlaps, 0.
    assert bleu(hyps, [["a slow red dog"], ["six seven eight nine"]]) == 0.0


def test_chrf_hand_value():
    assert chrf(["hello world"], ["hello world"]) == approx(100.0)
    assert chrf(["ab"], ["cd"]) == 0.0
    # "ab" vs "ac": 1-grams P = R = 1/2; 2-grams "ab" vs "ac" P = R = 0; orders 3-6 have no n-grams
    # and are skipped. Averages P = R = 1/4, so F2 = (1 + 4) P R / (4 P + R) = 5/16 / (5/4) = 1/4.
    assert chrf(["ab"], ["ac"]) == approx(25.0)


@pytest.mark.parametrize("metric", [bleu, chrf])
def test_overlap_metrics_reject_bad_input(metric):
    with pytest.raises(ValueError):
        metric([], [])
    with pytest.raises(ValueError):
        metric(["a b c d"], ["a b c d", "x"])
    with pytest.raises(ValueError):
        metric(["a b c d"], [[]])  # a hypothesis with no reference


# ---------------------------------------------------------------------------------------------
# GSM8K-style exact match
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, answer", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234.", "1234"),  # commas removed, trailing period dropped
    ("####42", "42"),
    ("#### -3.50 dollars", "-3.50"),
    ("#### 5 first, then\n#### 8", "8"),  # the last marker wins
    ("no marker here", None),
    ("#### ", None),
    ("#### forty", None),
    ("#### 42abc", None),
    ("#### 5\nthen #### nothing", None),  # last marker has no number
])
def test_extract_gsm8k_answer(text, answer):
    assert extract_gsm8k_answer(text) == answer
    assert is_well_formed_gsm8k(text) == (answer is not None)


@pytest.mark.parametrize("text, canonical", [
    ("1,000", "1000"), ("3.50", "3.5"), ("$18", "18"), ("18.", "18"), ("-0", "0"),
    ("2.000", "2"), (".5", "0.5"), (" 7 ", "7"),
    ("nan", None), ("1e3", None), ("seven", None), ("", None), ("1.2.3", None),
])
def test_normalize_number(text, canonical):
    assert normalize_number(text) == canonical


def test_exact_match_gsm8k():
    preds = ["so #### 18", "The answer is\n#### 1,000.", "#### 7", "I don't know"]
    refs = ["9 + 9 = 18\n#### 18", "#### 1000", "#### 8", "#### 3"]
    # right, right (after normalisation), wrong, no answer -> 2/4.
    assert exact_match(preds, refs) == 0.5


def test_exact_match_without_extraction():
    # Numbers compare by value ("18.0" == "18"), other strings after stripping only.
    assert exact_match(["18.0", "Paris", "paris"], ["18", " Paris ", "Paris"], extract=None) == approx(2 / 3)


def test_exact_match_rejects_bad_input():
    with pytest.raises(ValueError):
        exact_match([], [])
    with pytest.raises(ValueError):
        exact_match(["#### 1"], ["#### 1", "#### 2"])
    with pytest.raises(ValueError, match="reference 0"):
        exact_match(["#### 1"], ["the answer is one"])  # malformed gold is a data bug


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------


def test_multiple_choice_accuracy_raw_and_length_normalised():
    logprobs = [[-1.0, -2.0], [-3.0, -1.5], [-4.0, -6.0, -9.0]]
    answers = [0, 0, 1]
    # Raw argmax picks 0, 1, 0: only question 1 right -> 1/3.
    assert multiple_choice_accuracy(logprobs, answers) == approx(1 / 3)
    # Per length, question 3 becomes -4/2 = -2, -6/6 = -1, -9/3 = -3 -> picks 1: 2/3 right.
    lengths = [[1, 1], [1, 1], [2, 6, 3]]
    assert multiple_choice_accuracy(logprobs, answers, lengths) == approx(2 / 3)


def test_multiple_choice_tie_goes_to_first_option():
    assert multiple_choice_accuracy([[-1.0, -1.0]], [0]) == 1.0
    assert multiple_choice_accuracy([[-1.0, -1.0]], [1]) == 0.0


@pytest.mark.parametrize("logprobs, answers, lengths", [
    ([], [], None),
    ([[-1.0, -2.0]], [2], None),  # answer out of range
    ([[-1.0, -2.0]], [0, 1], None),
    ([[-1.0, -2.0]], [0], [[1]]),  # wrong number of lengths
    ([[-1.0, -2.0]], [0], [[1, 0]]),  # zero length
])
def test_multiple_choice_rejects_bad_input(logprobs, answers, lengths):
    with pytest.raises(ValueError):
        multiple_choice_accuracy(logprobs, answers, lengths)


# ---------------------------------------------------------------------------------------------
# Win rate, bootstrap, noise-aware comparison
# ---------------------------------------------------------------------------------------------

Z95 = 1.959963984540054


def test_win_rate_wilson_by_hand():
    # 7 wins of 10: p = 0.7, z^2/n = 0.384146, denominator 1.384146.
    # centre = (0.7 + z^2/20) / 1.384146 = 0.892073 / 1.384146 = 0.644493
    # half = z / 1.384146 * sqrt(0.21/10 + z^2/400) = 1.416010 * 0.174939 = 0.247715
    # -> (0.3968, 0.8922), the textbook Wilson interval for 7/10.
    r = win_rate(7, 3, 0)
    assert r["rate"] == 0.7
    assert r["low"] == approx(0.396778, abs=1e-5)
    assert r["high"] == approx(0.892209, abs=1e-5)


def test_win_rate_ties_count_half():
    # 2 ties are worth 1 win + 1 loss: 2-2-2 scores like 3-3-0 (rate 1/2, same n, same interval).
    assert win_rate(2, 2, 2) == win_rate(3, 3, 0)
    assert win_rate(3, 1, 2)["rate"] == approx(4 / 6)  # (3 + 2/2) / 6


def test_win_rate_all_ties():
    # 4 ties: p = 1/2, symmetric interval around 1/2.
    # half = z / (1 + z^2/4) * sqrt(0.25/4 + z^2/64) = 0.999796 * 0.350033 = 0.349960
    r = win_rate(0, 0, 4)
    assert r["rate"] == 0.5
    half = Z95 / (1 + Z95**2 / 4) * math.sqrt(0.25 / 4 + Z95**2 / 64)
    assert half == approx(0.34996, abs=1e-5)
    assert (r["low"], r["high"]) == (approx(0.5 - half), approx(0.5 + half))


def test_win_rate_extremes_stay_in_unit_interval():
    r = win_rate(10, 0, 0)
    # Wilson for 10/10: low = n / (n + z^2) = 10 / 13.841459 = 0.722467, high = 1.
    assert r["low"] == approx(10 / (10 + Z95**2))
    assert r["high"] == approx(1.0)


@pytest.mark.parametrize("counts", [(0, 0, 0), (-1, 2, 0)])
def test_win_rate_rejects_bad_counts(counts):
    with pytest.raises(ValueError):
        win_rate(*counts)


def test_bootstrap_two_point_distribution():
    # Mean of a resample of [0, 1] is 0 (p 1/4), 1/2 (p 1/2) or 1 (p 1/4): with 1000 draws the
    # 2.5th percentile is 0 and the 97.5th is 1.
    r = bootstrap_ci([0.0, 1.0])
    assert r == {"estimate": 0.5, "low": 0.0, "high": 1.0}


def test_bootstrap_constant_collapses_and_is_seeded():
    assert bootstrap_ci([3.0] * 5) == {"estimate": 3.0, "low": 3.0, "high": 3.0}
    data = np.random.default_rng(1).normal(size=50)
    assert bootstrap_ci(data, seed=7) == bootstrap_ci(data, seed=7)
    r = bootstrap_ci(data)
    assert r["low"] < r["estimate"] < r["high"]


def test_bootstrap_paired_rows_keep_pairs_together():
    # Item scores vary a lot, but the candidate beats the baseline by exactly 1 on every item.
    base = np.arange(20, dtype=float) * 10
    pairs = np.stack([base + 1, base], axis=1)
    r = bootstrap_ci(pairs, stat=lambda rows: rows[:, 0].mean() - rows[:, 1].mean())
    assert (r["estimate"], r["low"], r["high"]) == (approx(1.0), approx(1.0), approx(1.0))


@pytest.mark.parametrize("kwargs", [{"values": []}, {"values": [1.0], "n": 0}, {"values": [1.0], "alpha": 1.5}])
def test_bootstrap_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        bootstrap_ci(**kwargs)


def test_mean_std_by_hand():
    # mean 4; squared deviations 4, 0, 4 sum 8; sample variance 8 / (3 - 1) = 4; std 2.
    assert mean_std([2.0, 4.0, 6.0]) == (approx(4.0), approx(2.0))
    assert mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_significantly_better_by_hand():
    candidate = [0.70, 0.72, 0.74]  # mean 0.72, std 0.02
    # SE = sqrt(0.02^2/3 + 0.02^2/3) = 0.016330; 2 SE = 0.032660.
    assert significantly_better(candidate, [0.60, 0.62, 0.64])  # +0.10 > 0.0327
    assert not significantly_better(candidate, [0.69, 0.71, 0.73])  # +0.01 < 0.0327
    assert not significantly_better([0.60, 0.62, 0.64], candidate)  # worse
    # +0.03 passes at 1 SE (0.0163) but not at 2 SE (0.0327).
    assert significantly_better(candidate, [0.67, 0.69, 0.71], margin_sigma=1.0)
    assert not significantly_better(candidate, [0.67, 0.69, 0.71], margin_sigma=2.0)


def test_significantly_better_noiseless_and_bad_input():
    assert significantly_better([0.5, 0.5], [0.4, 0.4])  # SE 0: any strict gain passes
    assert not significantly_better([0.5, 0.5], [0.5, 0.5])
    with pytest.raises(ValueError):
        significantly_better([0.9], [0.1, 0.2])  # one run cannot estimate noise
    with pytest.raises(ValueError):
        significantly_better([0.9, 0.8], [0.1, 0.2], margin_sigma=-1)
