"""The vocab-parallel divergence kernel against a dense float64 reference, at TP = 1, 2 and 4.

One spawn of 4 gloo processes covers every TP size: the whole world is the TP=4 group, [0, 1] and [2, 3] are
two TP=2 groups and each rank alone is a TP=1 group, so all three run the same cases side by side (and the
kernel is exercised on sub-groups, as it is under megatron). ``group=None`` is tested in this process.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mdu_dist.bench import LiveBytes
from mdu_dist.losses.divergence import DIRECTIONS, vocab_parallel_divergence
from finite_difference import assert_gradient_matches_finite_differences
from multiproc import run_distributed

VOCAB, PADDED, ROWS, CHUNK = 37, 40, 6, 4  # 37 is padded to 40 for TP=4: the last rank holds 3 padding columns
SPECIAL = torch.tensor([0, 11, 36])  # on three different TP=4 ranks, the last one next to the padding
CASES = list(itertools.product(DIRECTIONS, (0.0, 0.25, 1.0), (0.0, 0.5), (False, True)))


def _inputs(seed: int, rows: int = ROWS, vocab: int = VOCAB, padded: int = PADDED):
    """Random logits and anchor over the padded vocabulary; the padding columns hold garbage on purpose."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, padded, generator=g) * 3
    anchor = torch.randn(rows, padded, generator=g) * 3
    garbage = torch.tensor([float("nan"), float("inf"), 1e4, -float("inf")])
    logits[:, vocab:] = garbage[: padded - vocab]
    anchor[:, vocab:] = garbage.flip(0)[: padded - vocab]
    weights = torch.rand(rows, generator=g, dtype=torch.float64) + 0.5
    return logits, anchor, weights


def reference(logits, anchor, keep, direction, tau, eta):
    """Dense float64 divergence per row over the kept columns, by plain log_softmax maths."""
    z, a = logits.double()[:, keep], anchor.double()[:, keep]
    target = (a - eta * (z - a)).detach()
    logp, logq = F.log_softmax(z, -1), F.log_softmax(tau * target, -1)
    p, q = logp.exp(), logq.exp()
    if direction == "forward":
        return (p * (logp - logq)).sum(-1)
    if direction == "reverse":
        return (q * (logq - logp)).sum(-1)
    logm = torch.log(0.5 * (p + q))
    return 0.5 * (p * (logp - logm)).sum(-1) + 0.5 * (q * (logq - logm)).sum(-1)


def _keep(special: bool) -> torch.Tensor:
    keep = torch.ones(PADDED, dtype=torch.bool)
    keep[VOCAB:] = False
    if special:
        keep[SPECIAL] = False
    return keep


def _reference_with_grad(logits, anchor, weights, special, direction, tau, eta):
    full = logits.double().requires_grad_(True)
    value = reference(full, anchor, _keep(special), direction, tau, eta)
    (value * weights).sum().backward()
    return value.detach(), full.grad


def _compare(group, tp: int, tp_rank: int, seed: int) -> float:
    """Worst |kernel - reference| / (1 + |reference|) over every case, loss and gathered gradient, for one TP
    group, as a fraction of the tolerance.

    Tolerance 1e-6, except for gradients under extrapolated targets (tau (1 + eta) > 1): there log q reaches
    -30 and float32 rounds each operation on it by ~1e-6, so the gradient p (log p - log q - KL) is held to
    5e-6; a dense float32 autograd computation of the same maths errs as much (up to ~4e-6 on such inputs).
    """
    import torch.distributed as dist

    v_local = PADDED // tp
    lo = tp_rank * v_local
    worst = 0.0
    for i, (direction, tau, eta, special) in enumerate(CASES):
        logits, anchor, weights = _inputs(seed + i)
        want, want_grad = _reference_with_grad(logits, anchor, weights, special, direction, tau, eta)
        z = logits[:, lo:lo + v_local].clone().requires_grad_(True)
        a = anchor[:, lo:lo + v_local].clone().requires_grad_(True)
        got = vocab_parallel_divergence(z, a, group, vocab_start=lo, vocab_size=VOCAB, direction=direction,
                                        tau=tau, eta=eta, exclude_ids=SPECIAL if special else None,
                                        chunk_size=CHUNK)
        (got * weights.float()).sum().backward()
        assert got.dtype == torch.float32 and a.grad is None
        grad = z.grad.double()
        if group is not None:
            parts = [torch.empty_like(z.grad) for _ in range(tp)]
            dist.all_gather(parts, z.grad, group=group)
            grad = torch.cat(parts, dim=-1).double()
        assert (grad[:, ~_keep(special)] == 0).all(), f"{direction}: removed columns got a gradient"
        errors = [((x - ref).abs() / (1 + ref.abs())).max().item()
                  for x, ref in ((got.detach().double(), want), (grad, want_grad))]
        tolerance = (1e-6, 1e-6 if tau * (1 + eta) <= 1 else 5e-6)
        assert errors[0] <= tolerance[0] and errors[1] <= tolerance[1], \
            f"TP={tp} {direction} tau={tau} eta={eta} special={special}: errors {errors} > {tolerance}"
        worst = max(worst, errors[0] / tolerance[0], errors[1] / tolerance[1])
    empty = torch.zeros(0, v_local, requires_grad=True)
    out = vocab_parallel_divergence(empty, torch.zeros(0, v_local), group, vocab_start=lo, vocab_size=VOCAB,
                                    direction="js")
    out.sum().backward()
    assert out.shape == (0,) and empty.grad.shape == (0, v_local)
    return worst


def _all_tp_sizes(seed: int) -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # Every rank creates every group, in the same order, as torch.distributed requires.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    singles = [dist.new_group([r]) for r in range(4)]
    return {4: _compare(dist.group.WORLD, 4, rank, seed), 2: _compare(pairs[rank // 2], 2, rank % 2, seed),
            1: _compare(singles[rank], 1, 0, seed)}


def test_matches_dense_reference_at_tp_1_2_4():
    results = run_distributed(_all_tp_sizes, 4, 100)
    assert all(set(r) == {1, 2, 4} and max(r.values()) <= 1 for r in results), results


def test_single_process_group_none_matches_reference():
    assert _compare(None, 1, 0, 200) <= 1


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradient_matches_finite_differences_float64(direction):
    logits, anchor, _ = _inputs(7, rows=3, vocab=9, padded=10)

    def fn(x):
        return vocab_parallel_divergence(x, anchor.double(), None, vocab_start=0, vocab_size=9,
                                         direction=direction, tau=0.5, exclude_ids=torch.tensor([2]), chunk_size=2)

    assert fn(logits.double()).dtype == torch.float64
    assert_gradient_matches_finite_differences(fn, logits)


def test_a_second_backward_through_the_same_graph_is_refused():
    logits, anchor, _ = _inputs(2)
    z = logits.requires_grad_(True)
    out = vocab_parallel_divergence(z, anchor, None, vocab_start=0, vocab_size=VOCAB).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        out.backward()


def test_no_gradient_buffer_without_autograd():
    logits, anchor, _ = _inputs(0, rows=64, vocab=V_LOCAL, padded=V_LOCAL)
    z = logits.requires_grad_(True)
    with torch.no_grad(), LiveBytes() as mode:
        vocab_parallel_divergence(z, anchor, None, vocab_start=0, vocab_size=V_LOCAL, chunk_size=MEM_CHUNK)
    assert mode.peak <= 3 * CHUNK_BYTES + PER_ROW_BYTES * 64


def _run(logits, anchor, **kw):
    z = logits.clone().requires_grad_(True)
    out = vocab_parallel_divergence(z, anchor, None, vocab_start=0, vocab_size=VOCAB, **kw)
    out.sum().backward()
    return out.detach(), z.grad


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_chunk_size_does_not_change_results(direction):
    logits, anchor, _ = _inputs(11, rows=7)
    runs = [_run(logits, anchor, direction=direction, tau=0.25, eta=0.5, exclude_ids=SPECIAL, chunk_size=c)
            for c in (1, 3, 100)]
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_bf16_inputs_give_float32_loss_and_bf16_grad():
    logits, anchor, _ = _inputs(5)
    out, grad = _run(logits.bfloat16(), anchor.bfloat16(), direction="forward")
    want = reference(logits.bfloat16(), anchor.bfloat16(), _keep(False), "forward", 1.0, 0.0)
    assert out.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert (out.double() - want).abs().max() < 1e-5


def test_tau_zero_targets_the_uniform_distribution():
    logits, anchor, _ = _inputs(3)
    out, _ = _run(logits, anchor, tau=0.0, exclude_ids=SPECIAL)
    logp = F.log_softmax(logits.double()[:, _keep(True)], -1)
    kept = int(_keep(True).sum())
    want = (logp.exp() * (logp + torch.log(torch.tensor(float(kept), dtype=torch.float64)))).sum(-1)
    assert (out.double() - want).abs().max() < 1e-6


def test_invalid_arguments_raise():
    logits, anchor, _ = _inputs(1)
    with pytest.raises(ValueError, match="tau"):
        vocab_parallel_divergence(logits, anchor, None, vocab_start=0, vocab_size=VOCAB, tau=-0.1)
    with pytest.raises(ValueError, match="'kl'.*forward, reverse, js"):
        vocab_parallel_divergence(logits, anchor, None, vocab_start=0, vocab_size=VOCAB, direction="kl")
    with pytest.raises(ValueError, match="removes all"):
        vocab_parallel_divergence(logits[:, :3], anchor[:, :3], None, vocab_start=0, vocab_size=3,
                                  exclude_ids=torch.tensor([0, 1, 2]))


def test_zero_positions_give_an_empty_result():
    z = torch.zeros(0, 8, requires_grad=True)
    out = vocab_parallel_divergence(z, torch.zeros(0, 8), None, vocab_start=0, vocab_size=8)
    out.sum().backward()
    assert out.shape == (0,) and not torch.isnan(z.grad).any()


def _naive(logits, anchor, group, *, vocab_start, vocab_size, direction, chunk_size):
    """Full-vocabulary log_softmax of both distributions for all rows at once: what the kernel avoids."""
    logp, logq = F.log_softmax(logits, -1), F.log_softmax(anchor.detach(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _peaks(fn, rows: int) -> tuple[int, int, int, int]:
    """(forward peak, bytes kept from forward to backward, backward peak, gradient bytes) of ``fn``."""
    logits, anchor, _ = _inputs(0, rows=rows, vocab=V_LOCAL, padded=V_LOCAL)
    z = logits.requires_grad_(True)
    with LiveBytes() as mode:
        out = fn(z, anchor, None, vocab_start=0, vocab_size=V_LOCAL, direction="forward", chunk_size=MEM_CHUNK)
        forward_peak, kept = mode.peak, mode.live - out.untyped_storage().nbytes()
        mode.reset_peak()
        out.backward(torch.ones_like(out))
        backward_peak = mode.peak
    return forward_peak, kept, backward_peak, z.grad.untyped_storage().nbytes()


V_LOCAL, MEM_CHUNK = 512, 8
CHUNK_BYTES = MEM_CHUNK * V_LOCAL * 4
PER_ROW_BYTES = 64  # output and per-row statistics


def test_memory_is_the_gradient_plus_a_few_chunks():
    """The kernel's only N x V_local tensor is the gradient it must return anyway: formed in the forward, kept
    to the backward, scaled there in place. Everything else is a few chunk-sized buffers, whatever N is."""
    rows = (64, 512)  # 8x more rows; N x V_local is 8 to 64 times one chunk
    measured = {n: _peaks(vocab_parallel_divergence, n) for n in rows}
    for n, (forward_peak, kept, backward_peak, grad_bytes) in measured.items():
        assert grad_bytes == n * V_LOCAL * 4
        assert forward_peak <= grad_bytes + 3 * CHUNK_BYTES + PER_ROW_BYTES * n, (n, forward_peak)
        assert kept <= grad_bytes + PER_ROW_BYTES * n + V_LOCAL, (n, kept)
        assert backward_peak <= grad_bytes + PER_ROW_BYTES * n, (n, backward_peak)
    naive = {n: _peaks(_naive, n) for n in rows}
    for n in rows:  # the naive version holds several N x V_local tensors besides the gradient
        assert naive[n][0] + naive[n][2] >= 4 * naive[n][3]
    assert measured[512][0] - measured[512][3] < 0.25 * (naive[512][0] - naive[512][3])
