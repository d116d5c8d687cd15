"""TOFU metrics against hand computation, rouge_score (what open-unlearning calls) and scipy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from mdu_dist.data import BUNDLED_TOFU
from mdu_dist.eval.metrics import (MODEL_UTILITY_KEYS, forget_quality, forget_truth_ratio, harmonic_mean,
                                   ks_2samp_pvalue, lcs_length, model_utility, normalised_probabilities,
                                   normalised_probability, probability, rouge_l, rouge_l_recall, rouge_tokens,
                                   truth_ratios, utility_truth_ratio)

TOFU = BUNDLED_TOFU
LN = math.log


# ------------------------------------------------------------------------------------------------- ROUGE-L

def test_lcs_by_hand():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # CLRS's example: BCBA
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(list("abc"), list("abc")) == 3


def test_rouge_l_by_hand():
    r = rouge_l("the cat is on the mat", "The cat sat on the mat.", stem=False)
    assert (r.precision, r.recall, r.fmeasure) == pytest.approx((5 / 6, 5 / 6, 5 / 6))
    r = rouge_l("He wrote a book", "he writes books", stem=False)  # LCS = (he)
    assert (r.precision, r.recall) == pytest.approx((1 / 4, 1 / 3))
    assert r.fmeasure == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))
    assert rouge_tokens("Jaime's 1st-ever NOVEL!", stem=False) == ["jaime", "s", "1st", "ever", "novel"]
    assert rouge_l("", "some answer", stem=False) == rouge_l("...", "some answer", stem=False)
    assert rouge_l("", "some answer", stem=False).recall == 0.0
    assert rouge_l_recall(["a b", "c"], ["a b", "d"], stem=False) == pytest.approx(0.5)


def test_rouge_l_with_stemming_by_hand():
    pytest.importorskip("nltk")
    # "writes" and "books" stem to "write" and "book"; "wrote" stays: LCS = (he, book).
    r = rouge_l("He wrote a book", "he writes books")
    assert (r.precision, r.recall) == pytest.approx((2 / 4, 2 / 3))
    assert r.fmeasure == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert rouge_tokens("The authors were writing") == ["the", "author", "were", "write"]


def _tofu_pairs() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in open(TOFU / "forget10_perturbed.json")]
    pairs = [(r["paraphrased_answer"], r["answer"]) for r in rows]
    pairs += [(r["perturbed_answer"][0], r["answer"]) for r in rows[:100]]
    pairs += [("", "x"), ("Ünïcödé — dashes; and 'quotes'", "unicode dashes and quotes"), ("a", "a a a")]
    return pairs


@pytest.mark.parametrize("stem", [True, False])
def test_rouge_l_equals_rouge_score_on_tofu_answers(stem):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")  # test extra; it brings nltk
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
    for prediction, reference in _tofu_pairs():
        want = scorer.score(reference, prediction)["rougeL"]  # open-unlearning: score(ground truth, generation)
        got = rouge_l(prediction, reference, stem=stem)
        assert (got.precision, got.recall, got.fmeasure) == pytest.approx(
            (want.precision, want.recall, want.fmeasure), abs=1e-15), (prediction, reference)


# ------------------------------------------------------------------------------ probabilities, truth ratio

def test_probability_is_the_mean_of_length_normalised_probabilities():
    assert probability([0.0, LN(2)]) == pytest.approx((1 + 0.5) / 2)


def test_normalised_probability_divides_by_the_sum_over_options():
    # item 0: P = 0.5 against two wrong options at 0.25 each; item 1: 0.2 against 0.2 and 0.6.
    correct = [LN(2), -LN(0.2)]
    wrong = [[LN(4), LN(4)], [-LN(0.2), -LN(0.6)]]
    assert normalised_probabilities(correct, wrong) == pytest.approx([0.5, 0.2])
    assert normalised_probability(correct, wrong) == pytest.approx(0.35)


def test_truth_ratio_uses_the_geometric_mean_of_perturbed_probabilities():
    # item 0: paraphrase P = 0.5; perturbed 0.25 and 0.0625 -> geometric mean 0.125 -> tr = 0.25
    #         (an arithmetic mean would give 0.15625 / 0.5 = 0.3125).
    # item 1: paraphrase P = 0.1; perturbed 0.2 and 0.2 -> tr = 2.
    correct = [LN(2), -LN(0.1)]
    perturbed = [[LN(4), LN(16)], [-LN(0.2), -LN(0.2)]]
    tr = truth_ratios(correct, perturbed)
    assert tr == pytest.approx([0.25, 2.0], rel=1e-8)
    assert forget_truth_ratio(tr) == pytest.approx((min(0.25, 4.0) + min(2.0, 0.5)) / 2, rel=1e-8)
    assert utility_truth_ratio(tr) == pytest.approx((0.75 + 0.0) / 2, rel=1e-8)


# -------------------------------------------------------------------------- forget quality, model utility

def test_ks_pvalue_by_hand():
    # Two values each, fully separated: D = 1, reached only by the 2 of the C(4, 2) = 6 orders that are separated.
    assert ks_2samp_pvalue([0.0, 1.0], [2.0, 3.0]) == pytest.approx(1 / 3)
    # Interleaved x y x y: D = 1/2, and P(D >= 1/2) = 1 for two samples of two.
    assert ks_2samp_pvalue([0.0, 2.0], [1.0, 3.0]) == pytest.approx(1.0)


@pytest.mark.parametrize("m,n,shift", [(400, 400, 0.0), (400, 400, 0.25), (400, 400, 1.5), (40, 400, 0.5),
                                       (7, 5, 1.0), (123, 77, 0.8), (1, 3, 0.0)])
def test_ks_pvalue_equals_scipy(m, n, shift):
    rng = np.random.default_rng(m * 1000 + n)
    x, y = rng.lognormal(0.0, 1.0, m), rng.lognormal(shift, 1.0, n)
    assert ks_2samp_pvalue(x, y) == pytest.approx(scipy.stats.ks_2samp(x, y).pvalue, rel=1e-9, abs=1e-300)


def test_ks_pvalue_with_ties_equals_scipy():
    x = np.array([1, 2, 2, 3, 3, 3, 4, 5, 5, 9], dtype=float)
    y = np.array([2, 3, 3, 4, 6, 6, 7, 8, 8, 8, 9, 9], dtype=float)
    assert ks_2samp_pvalue(x, y) == pytest.approx(scipy.stats.ks_2samp(x, y).pvalue, rel=1e-12)


def test_forget_quality_is_the_ks_pvalue_of_the_truth_ratios():
    rng = np.random.default_rng(0)
    unlearned, retain_model = rng.lognormal(-0.3, 0.6, 400), rng.lognormal(0.0, 0.5, 400)
    fq = forget_quality(unlearned, retain_model)
    assert fq == pytest.approx(scipy.stats.ks_2samp(unlearned, retain_model).pvalue, rel=1e-9)
    # open-unlearning's older helper tested 1 / tr: the same p-value.
    assert fq == pytest.approx(scipy.stats.ks_2samp(1 / unlearned, 1 / retain_model).pvalue, rel=1e-9)
    assert 0 < fq < 0.05


def test_harmonic_mean_by_hand_and_scipy():
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    values = [0.9, 0.8, 0.45, 0.6, 0.7, 0.33, 0.5, 0.85, 0.4]
    assert harmonic_mean(values) == pytest.approx(scipy.stats.hmean(values), rel=1e-14)
    assert harmonic_mean([0.5, 0.0, 0.9]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([0.5, -0.1])


def test_model_utility_is_the_harmonic_mean_of_the_nine_numbers():
    values = dict(zip(MODEL_UTILITY_KEYS, [0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 1.0, 1.0, 1.0]))
    assert model_utility(values) == pytest.approx(9 / (3 * 2 + 3 * 4 + 3 * 1))
    with pytest.raises(ValueError, match="missing"):
        model_utility({k: 0.5 for k in MODEL_UTILITY_KEYS[:8]})
    with pytest.raises(ValueError, match="unexpected"):
        model_utility({**values, "forget_Q_A_Prob": 0.1})
