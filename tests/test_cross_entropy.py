"""Vocab-parallel cross entropy against a dense float64 reference, and LLaDA's masked-diffusion loss by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finite_difference import assert_gradient_matches_finite_differences
from multiproc import run_distributed
from mdu_dist.losses.cross_entropy import masked_diffusion_loss, masked_diffusion_nll, vocab_parallel_cross_entropy

VOCAB, PADDED, ROWS = 37, 40, 7


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(ROWS, PADDED, generator=g) * 3
    logits[:, VOCAB:] = torch.tensor([float("nan"), float("inf"), 1e4])  # padding garbage must not count
    target = torch.randint(0, VOCAB, (ROWS,), generator=g)
    target[:3] = torch.tensor([0, VOCAB - 1, 19])  # first and last real ids, and one on the second TP=2 rank
    weights = torch.rand(ROWS, generator=g, dtype=torch.float64) + 0.5
    return logits, target, weights


def _compare(group, tp: int, tp_rank: int, seed: int) -> float:
    """Worst |kernel - reference| / (1 + |reference|) of nll and gathered gradient, chunked and not."""
    import torch.distributed as dist

    logits, target, weights = _inputs(seed)
    dense = logits[:, :VOCAB].double().requires_grad_(True)
    want = F.cross_entropy(dense, target, reduction="none")
    (want * weights).sum().backward()
    want_grad = torch.cat([dense.grad, torch.zeros(ROWS, PADDED - VOCAB, dtype=torch.float64)], dim=-1)
    v_local, worst = PADDED // tp, 0.0
    lo = tp_rank * v_local
    for chunk_size in (3, 1024):
        z = logits[:, lo:lo + v_local].clone().requires_grad_(True)
        got = vocab_parallel_cross_entropy(z, target, group, vocab_start=lo, vocab_size=VOCAB, chunk_size=chunk_size)
        (got * weights.float()).sum().backward()
        grad = z.grad.double()
        if group is not None:
            parts = [torch.empty_like(z.grad) for _ in range(tp)]
            dist.all_gather(parts, z.grad, group=group)
            grad = torch.cat(parts, dim=-1).double()
        for x, ref in ((got.detach().double(), want.detach()), (grad, want_grad)):
            worst = max(worst, ((x - ref).abs() / (1 + ref.abs())).max().item())
    return worst


def _tp_1_and_2(seed: int) -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    singles = [dist.new_group([r]) for r in range(2)]
    return {2: _compare(dist.group.WORLD, 2, dist.get_rank(), seed),
            1: _compare(singles[dist.get_rank()], 1, 0, seed)}


def test_matches_dense_reference_at_tp_1_and_2():
    results = run_distributed(_tp_1_and_2, 2, 5)
    assert all(set(r) == {1, 2} and max(r.values()) <= 1e-6 for r in results), results


def test_single_process_and_float64_finite_differences():
    assert _compare(None, 1, 0, 6) <= 1e-6
    logits, target, _ = _inputs(8)
    assert_gradient_matches_finite_differences(
        lambda x: vocab_parallel_cross_entropy(x, target, None, vocab_start=0, vocab_size=VOCAB, chunk_size=2),
        logits)


def test_rejects_targets_outside_the_vocabulary():
    logits, target, _ = _inputs(1)
    target[0] = VOCAB  # a padding id
    with pytest.raises(ValueError, match="target ids"):
        vocab_parallel_cross_entropy(logits, target, None, vocab_start=0, vocab_size=VOCAB)


# Two sequences of length 4: position 0 is prompt, row 1 ends in padding. CE values are arbitrary numbers.
TOKEN_NLL = torch.tensor([[9.0, 1.0, 2.0, 3.0], [9.0, 4.0, 5.0, 9.0]])
RESPONSE = torch.tensor([[False, True, True, True], [False, True, True, False]])
MASKED = torch.tensor([[False, True, False, True], [False, False, True, False]])
T = torch.tensor([0.5, 0.25])


def _geometric(i: int, clean: list[int], p: float = 0.3) -> float:
    return sum(0.5 * p * (1 - p) ** (abs(i - j) - 1) for j in clean)


@pytest.mark.parametrize("weighting,want_rows", [
    # row 0: masked CE 1 and 3 over 3 response tokens; row 1: masked CE 5 over 2 response tokens
    ("inverse_t", [(1 + 3) / 0.5 / 3, 5 / 0.25 / 2]),
    ("none", [(1 + 3) / 3, 5 / 2]),
    # clean (unmasked) positions: row 0 {0, 2}, row 1 {0, 1, 3}
    ("geometric", [(_geometric(1, [0, 2]) * 1 + _geometric(3, [0, 2]) * 3) / 3, _geometric(2, [0, 1, 3]) * 5 / 2]),
])
def test_masked_diffusion_loss_by_hand(weighting, want_rows):
    rows = masked_diffusion_nll(TOKEN_NLL, MASKED, RESPONSE, T, weighting)
    assert torch.allclose(rows, torch.tensor(want_rows), rtol=1e-6)
    loss = masked_diffusion_loss(TOKEN_NLL, MASKED, RESPONSE, T, weighting)
    assert math.isclose(loss.item(), sum(want_rows) / 2, rel_tol=1e-6)


def test_geometric_weights_by_hand():
    assert math.isclose(_geometric(1, [0, 2]), 0.3) and math.isclose(_geometric(3, [0, 2]), 0.15 * 0.49 + 0.15)


def test_nothing_masked_gives_zero_and_finite_gradients():
    nll = TOKEN_NLL.clone().requires_grad_(True)
    none_masked = torch.zeros_like(MASKED)
    no_response = torch.zeros_like(RESPONSE)
    for masked, response in ((none_masked, RESPONSE), (none_masked, no_response)):
        loss = masked_diffusion_loss(nll, masked, response, T)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(nll.grad).all() and (nll.grad == 0).all()


def test_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="'cart'.*inverse_t, none, geometric"):
        masked_diffusion_loss(TOKEN_NLL, MASKED, RESPONSE, T, "cart")
