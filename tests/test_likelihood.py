"""LLaDA's Monte-Carlo ELBO: exact expectation by enumeration, unbiasedness, sampling law, determinism, TP=2.

The reference for the expectation is computed independently of the estimator's code: the expected NLL of
decoding the answer one token at a time in each of the L! orders, straight from log_softmax of a tiny dense
model whose logits depend strongly on which answer tokens are masked.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from multiproc import run_distributed
from mdu_dist.config import ModelConfig
from mdu_dist.eval.likelihood import answer_elbo, sample_masks, score_masks
from mdu_dist.models.dense import dense_forward, init_weights

MASK = 6
CFG = ModelConfig(arch="llada", num_layers=1, hidden_size=16, num_attention_heads=2, num_query_groups=2,
                  ffn_hidden_size=32, vocab_size=7, mask_token_id=MASK, eos_token_id=1, pad_token_id=1,
                  init_std=0.6)
WEIGHTS = init_weights(CFG, seed=1, dtype=torch.float64)
PROMPT = torch.tensor([2, 3, 1])
ANSWER = torch.tensor([4, 0, 5, 2])


def logits_fn(ids: torch.Tensor) -> torch.Tensor:
    return dense_forward(CFG, WEIGHTS, ids)


def masked_logits_fn(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return logits_fn(ids)[positions]


def any_order_nll(prompt: torch.Tensor, answer: torch.Tensor) -> float:
    """E over the L! decoding orders of sum_k -log p(r_order(k) | prompt, earlier ones visible, rest masked).

    All orders advance together: step k is one forward of L! rows, row o revealing position orders[o][k].
    """
    n_prompt, length = len(prompt), len(answer)
    orders = torch.tensor(list(itertools.permutations(range(length))))
    x = torch.full((len(orders), length), MASK)
    rows = torch.arange(len(orders))
    total = torch.zeros(len(orders), dtype=torch.float64)
    for k in range(length):
        pos = orders[:, k]
        logits = logits_fn(torch.cat([prompt.expand(len(orders), -1), x], dim=1))[rows, n_prompt + pos]
        total -= torch.log_softmax(logits, dim=-1)[rows, answer[pos]]
        x[rows, pos] = answer[pos]
    return total.mean().item()


def all_masks(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (l, S) with its probability under the estimator's law: P(l) P(S | l) = 1/L * 1/C(L, l)."""
    masks, probs = [], []
    for l in range(1, length + 1):
        for subset in itertools.combinations(range(length), l):
            row = torch.zeros(length, dtype=torch.bool)
            row[list(subset)] = True
            masks.append(row)
            probs.append(1 / (length * math.comb(length, l)))
    return torch.stack(masks), torch.tensor(probs, dtype=torch.float64)


def test_expectation_by_enumeration_equals_any_order_nll():
    masks, probs = all_masks(len(ANSWER))
    scores = score_masks(masked_logits_fn, PROMPT, ANSWER, masks, mask_token_id=MASK, vocab_size=CFG.vocab_size)
    exact = any_order_nll(PROMPT, ANSWER)
    assert (probs * scores).sum().item() == pytest.approx(exact, rel=1e-12)
    # The model is context-sensitive enough that a wrong weighting would show: the scores spread widely.
    assert scores.std().item() > 0.1 * scores.mean().item()


def test_monte_carlo_mean_converges_to_the_exact_expectation():
    exact = any_order_nll(PROMPT, ANSWER) / len(ANSWER)
    est = answer_elbo(masked_logits_fn, PROMPT, ANSWER, mask_token_id=MASK, vocab_size=CFG.vocab_size,
                      generator=torch.Generator().manual_seed(0), num_samples=8000, batch_size=2000)
    assert est.stderr < 0.01 * exact
    assert abs(est.nll - exact) < 4 * est.stderr
    assert est.probability == pytest.approx(math.exp(-est.nll))


def test_sampling_law_is_uniform_l_then_uniform_subset():
    n, length = 36000, 3
    masks = sample_masks(length, n, torch.Generator().manual_seed(1))
    every, probs = all_masks(length)
    counts = torch.tensor([(masks == row).all(dim=1).sum().item() for row in every], dtype=torch.float64)
    assert counts.sum().item() == n  # every draw is one of the (l, S) pairs, l >= 1
    sigma = torch.sqrt(probs * (1 - probs) / n)
    assert ((counts / n - probs).abs() < 5 * sigma).all(), (counts / n, probs)


def test_single_token_answer_is_exact():
    answer = torch.tensor([5])
    est = answer_elbo(masked_logits_fn, PROMPT, answer, mask_token_id=MASK, vocab_size=CFG.vocab_size,
                      generator=torch.Generator().manual_seed(2), num_samples=8)
    ids = torch.cat([PROMPT, torch.tensor([MASK])])[None]
    expected = -torch.log_softmax(logits_fn(ids)[0, -1], dim=-1)[5].item()
    assert torch.allclose(est.scores, torch.full((8,), expected, dtype=torch.float64), rtol=1e-12)


def test_prompt_is_never_masked_and_exactly_l_answer_tokens_are():
    seen = []

    def recording(ids, positions):
        seen.append(ids.clone())
        assert torch.equal(positions, ids == MASK)  # the output layer runs at the masked positions only
        return masked_logits_fn(ids, positions)

    masks = sample_masks(len(ANSWER), 64, torch.Generator().manual_seed(3))
    score_masks(recording, PROMPT, ANSWER, masks, mask_token_id=MASK, vocab_size=CFG.vocab_size, batch_size=16)
    ids = torch.cat(seen)
    assert len(seen) == 4 and ids.shape == (64, len(PROMPT) + len(ANSWER))
    assert (ids[:, :len(PROMPT)] == PROMPT).all()
    assert torch.equal(ids[:, len(PROMPT):] == MASK, masks)
    assert torch.equal(torch.where(masks, ANSWER, ids[:, len(PROMPT):]), ANSWER.expand(64, -1))


def test_deterministic_given_the_seed_and_independent_of_batch_size():
    def run(seed, batch_size):
        return answer_elbo(masked_logits_fn, PROMPT, ANSWER, mask_token_id=MASK, vocab_size=CFG.vocab_size,
                           generator=torch.Generator().manual_seed(seed), num_samples=40,
                           batch_size=batch_size).scores

    a = run(5, 7)
    assert torch.equal(a, run(5, 7))
    assert torch.allclose(a, run(5, 40), rtol=1e-12, atol=0)
    assert not torch.allclose(a, run(6, 7))


def _tp_scores(seed: int) -> list[float]:
    """One rank of TP=2: logits of its vocab slice (vocab 7 padded to 8, 4 columns each, padding at -inf)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, vocab_local = dist.get_rank(), 4
    start = rank * vocab_local

    def sliced(ids, positions):
        full = torch.nn.functional.pad(masked_logits_fn(ids, positions), (0, 2 * vocab_local - CFG.vocab_size),
                                       value=-math.inf)
        return full[..., start:start + vocab_local]

    est = answer_elbo(sliced, PROMPT, ANSWER, mask_token_id=MASK, vocab_size=CFG.vocab_size,
                      generator=torch.Generator().manual_seed(seed), num_samples=24, batch_size=8,
                      vocab_start=start, group=dist.group.WORLD)
    return est.scores.tolist()


def test_vocab_parallel_equals_single_process():
    single = answer_elbo(masked_logits_fn, PROMPT, ANSWER, mask_token_id=MASK, vocab_size=CFG.vocab_size,
                         generator=torch.Generator().manual_seed(11), num_samples=24, batch_size=8).scores
    for scores in run_distributed(_tp_scores, 2, 11):
        assert torch.allclose(torch.tensor(scores, dtype=torch.float64), single, rtol=1e-12, atol=1e-12)
