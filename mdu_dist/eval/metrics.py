"""TOFU metrics, with open-unlearning's definitions (locuslab/open-unlearning, ``src/evals/metrics/`` and
``configs/eval/tofu_metrics/``), from per-item per-token NLLs and generated texts.

For a masked diffusion model the per-token NLL ν of an answer is the ELBO estimate of
``mdu_dist.eval.likelihood`` (open-unlearning's ``avg_loss``: summed token NLL / number of answer tokens);
its length-normalised probability is P^(1/len) = exp(-ν). Per item (question) i:

    probability                p_i = exp(-ν_i)                                     (``probability``)
    normalised probability     p_i = exp(-ν_i) / (exp(-ν_i) + Σ_j exp(-ν_ij) + 1e-10)
                               ν_ij over the item's wrong options                  (``probability_w_options``)
    truth ratio                tr_i = exp(-mean_j ν_ij) / (exp(-ν_i^correct) + 1e-10)
                               = (Π_j P_ij^(1/len_ij))^(1/k) / P_correct^(1/len)     (``truth_ratio``)

The truth ratio's numerator is the GEOMETRIC mean over the k perturbed answers of their length-normalised
probabilities, because open-unlearning averages the losses before exponentiating (so does TOFU's own code;
the TOFU paper's formula writes an arithmetic mean). "correct" is the paraphrased answer for forget and
retain, the answer itself for real_authors and world_facts (they have no paraphrase).

A split's number is the mean over its items of p_i, of ROUGE-L recall, or, for the truth ratio,

    forget split                        mean_i min(tr_i, 1 / (tr_i + 1e-10))     (``closer_to_1_better``)
    retain, real_authors, world_facts   mean_i max(0, 1 - tr_i)                  (``true_better``)

    forget quality  = two-sided two-sample Kolmogorov-Smirnov p-value between the per-item forget-split truth
                      ratios of the unlearned model and of the retain-only model (``ks_test``)
    model utility   = harmonic mean of MODEL_UTILITY_KEYS (``hm_aggregate``): probability, ROUGE-L recall and
                      truth ratio on retain; normalised probability, ROUGE-L recall and truth ratio on
                      real_authors and on world_facts.

ROUGE-L is rouge_score's ``rougeL`` with ``use_stemmer=True`` as open-unlearning calls it, ``score(target=
ground truth, prediction=generation)``; open-unlearning reports its recall, and its F1 as ``rougeL_f1``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

# open-unlearning's guard against division by zero; kept so the numbers match its to the last digit.
EPS = 1e-10

MODEL_UTILITY_KEYS = (
    "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
    "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio",
)

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


# ---------------------------------------------------------------------------------------------------------------
# ROUGE-L


@functools.lru_cache(maxsize=1)
def _porter():
    # NLTK's Porter stemmer (default NLTK_EXTENSIONS mode) is the one rouge_score's tokenizer uses.
    try:
        # deferred: nltk costs ~3 s of start-up; eval.run (reached by report and launch) imports this module
        from nltk.stem import porter
    except ImportError as e:
        raise ImportError("ROUGE-L with stemming (open-unlearning's setting) needs nltk: pip install nltk") from e
    return porter.PorterStemmer()


@functools.lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _porter().stem(word)


def rouge_tokens(text: str, stem: bool = True) -> list[str]:
    """rouge_score's default tokenizer: lower-case, every run of non-[a-z0-9] is a separator, and (stem=True)
    Porter-stem the words longer than 3 characters."""
    words = _NON_ALPHANUMERIC.sub(" ", text.lower()).split()
    return [_stem(w) if stem and len(w) > 3 else w for w in words]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(|a| |b|))."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


@dataclass(frozen=True)
class RougeL:
    precision: float  # LCS / |prediction tokens|
    recall: float  # LCS / |reference tokens|
    fmeasure: float  # 2 P R / (P + R), 0 when P + R = 0


def rouge_l(prediction: str, reference: str, stem: bool = True) -> RougeL:
    """Sentence-level ROUGE-L of ``prediction`` against ``reference`` (all zero if either has no tokens)."""
    pred, ref = rouge_tokens(prediction, stem), rouge_tokens(reference, stem)
    if not pred or not ref:
        return RougeL(0.0, 0.0, 0.0)
    lcs = lcs_length(ref, pred)
    precision, recall = lcs / len(pred), lcs / len(ref)
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return RougeL(precision, recall, f)


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str], stem: bool = True) -> float:
    """A split's ROUGE number: mean over items of the ROUGE-L recall of the generation."""
    _same_length(predictions, references)
    return float(np.mean([rouge_l(p, r, stem).recall for p, r in zip(predictions, references)]))


# ---------------------------------------------------------------------------------------------------------------
# Probabilities and truth ratio, from per-token NLLs


def _same_length(a: Sequence | np.ndarray, b: Sequence | np.ndarray) -> None:
    if len(a) != len(b):
        raise ValueError(f"per-item inputs differ in length: {len(a)} vs {len(b)}")


def probability(nll: ArrayLike) -> float:
    """Mean over items of exp(-ν_i)."""
    return float(np.mean(np.exp(-np.asarray(nll, dtype=np.float64))))


def normalised_probabilities(correct_nll: ArrayLike, wrong_nll: ArrayLike) -> np.ndarray:
    """[n]: exp(-ν_i) / (exp(-ν_i) + Σ_j exp(-ν_ij) + 1e-10), ``wrong_nll`` [n, k] over the wrong options."""
    correct = np.exp(-np.asarray(correct_nll, dtype=np.float64))
    wrong = np.exp(-np.asarray(wrong_nll, dtype=np.float64))
    _same_length(correct, wrong)
    return correct / (correct + wrong.sum(axis=1) + EPS)


def normalised_probability(correct_nll: ArrayLike, wrong_nll: ArrayLike) -> float:
    """real_authors / world_facts probability: mean over items of ``normalised_probabilities``."""
    return float(np.mean(normalised_probabilities(correct_nll, wrong_nll)))


def truth_ratios(correct_nll: ArrayLike, perturbed_nll: ArrayLike) -> np.ndarray:
    """[n]: tr_i = exp(-mean_j ν_ij) / (exp(-ν_i) + 1e-10), ``perturbed_nll`` [n, k]."""
    correct = np.asarray(correct_nll, dtype=np.float64)
    perturbed = np.asarray(perturbed_nll, dtype=np.float64)
    _same_length(correct, perturbed)
    return np.exp(-perturbed.mean(axis=1)) / (np.exp(-correct) + EPS)


def forget_truth_ratio(tr: ArrayLike) -> float:
    """Forget split: mean_i min(tr_i, 1 / (tr_i + 1e-10)); 1 when correct and perturbed are equally likely."""
    tr = np.asarray(tr, dtype=np.float64)
    return float(np.mean(np.minimum(tr, 1 / (tr + EPS))))


def utility_truth_ratio(tr: ArrayLike) -> float:
    """Retain / real_authors / world_facts: mean_i max(0, 1 - tr_i); higher when the correct answer wins."""
    return float(np.mean(np.maximum(0.0, 1 - np.asarray(tr, dtype=np.float64))))


# ---------------------------------------------------------------------------------------------------------------
# Forget quality and model utility


def _ks_statistic_units(x: np.ndarray, y: np.ndarray) -> int:
    """max_t |n F_x(t) - m F_y(t)| (an integer) for samples of sizes m = |x|, n = |y|: D = that / (m n)."""
    pooled = np.concatenate([x, y])
    below_x = np.searchsorted(np.sort(x), pooled, side="right")
    below_y = np.searchsorted(np.sort(y), pooled, side="right")
    return int(np.max(np.abs(below_x * len(y) - below_y * len(x))))


def ks_2samp_pvalue(x: ArrayLike, y: ArrayLike) -> float:
    """Exact two-sided p-value P(D >= d) of the two-sample Kolmogorov-Smirnov test, for continuous data.

    Under H0 the pooled order of the m + n values is a uniformly random lattice path from (0, 0) to (m, n)
    (a step right for an x, up for a y), and D = max over the path of |i/m - j/n|. The p-value is the
    probability that the path touches a point with |i n - j m| >= d m n: the mass of a uniformly random path
    is pushed along the anti-diagonals i + j = s (from (i, j) it steps right with probability
    (m - i) / (m + n - i - j)) and is absorbed where it first touches such a point. Summing the absorbed mass,
    rather than subtracting the survivors from 1, keeps tiny p-values accurate. O(m n) time.

    scipy.stats.ks_2samp (method="auto", as open-unlearning calls it) returns the same exact p-value when both
    samples have at most 10000 values, and an asymptotic approximation above.
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    m, n = len(x), len(y)
    if m == 0 or n == 0:
        raise ValueError("the KS test needs two non-empty samples")
    h = _ks_statistic_units(x, y)
    if h == 0:
        return 1.0
    outside = 0.0
    mass = np.ones(1)  # mass[i] at the point (i, s - i) of anti-diagonal s; s = 0 holds (0, 0)
    for s in range(m + n):
        i = np.arange(max(0, s - n), min(s, m) + 1)
        right = (m - i) / (m + n - s)
        nxt_i = np.arange(max(0, s + 1 - n), min(s + 1, m) + 1)
        nxt = np.zeros(len(nxt_i))
        # Stepping right from (i, s - i) lands on (i + 1, s - i), stepping up on (i, s + 1 - i); a step off the
        # grid has probability 0 and is left out.
        go_right, go_up = i < m, s - i < n
        nxt[i[go_right] + 1 - nxt_i[0]] += (mass * right)[go_right]
        nxt[i[go_up] - nxt_i[0]] += (mass * (1 - right))[go_up]
        crossed = np.abs(nxt_i * n - (s + 1 - nxt_i) * m) >= h
        outside += nxt[crossed].sum()
        mass = np.where(crossed, 0.0, nxt)
    return float(min(outside, 1.0))


def forget_quality(unlearned_forget_tr: ArrayLike, retain_model_forget_tr: ArrayLike) -> float:
    """KS p-value between the forget-split truth ratios tr_i of the unlearned model and of the retain-only model.

    High (near 1) when the unlearned model's distribution is indistinguishable from a model never trained on
    the forget set. (open-unlearning's ``ks_test`` compares tr; its older helper compared 1 / tr, which gives
    the same p-value since the test depends only on the pooled order.)
    """
    return ks_2samp_pvalue(unlearned_forget_tr, retain_model_forget_tr)


def harmonic_mean(values: ArrayLike) -> float:
    """n / Σ 1/v for non-negative values; 0 if any value is 0 (scipy.stats.hmean's convention)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or (v < 0).any():
        raise ValueError(f"the harmonic mean needs non-negative values, got {v.tolist()}")
    if (v == 0).any():
        return 0.0
    return float(v.size / np.sum(1.0 / v))


def model_utility(values: Mapping[str, float]) -> float:
    """Harmonic mean of the nine split numbers named in MODEL_UTILITY_KEYS (exactly those keys)."""
    missing, extra = set(MODEL_UTILITY_KEYS) - set(values), set(values) - set(MODEL_UTILITY_KEYS)
    if missing or extra:
        raise ValueError(f"model utility needs exactly {MODEL_UTILITY_KEYS}: missing {sorted(missing)}, "
                         f"unexpected {sorted(extra)}")
    return harmonic_mean([values[k] for k in MODEL_UTILITY_KEYS])
