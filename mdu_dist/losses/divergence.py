"""Vocab-parallel divergence between a prediction and a detached target: MDU's forget term.

Each tensor-parallel rank holds a contiguous slice of the (padded) vocabulary; only per-row scalars travel
between ranks, never a vocabulary-sized tensor.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

DIRECTIONS = ("forward", "reverse", "js")


# 32 MiB of float32 per buffer: 66 rows at LLaDA's vocabulary (TP=1), enough to keep a GPU's memory bus busy.
CHUNK_BYTES = 32 * 2**20


def chunk_rows(v_local: int) -> int:
    """Rows per chunk so that one float32 [rows, V_local] buffer stays within CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * max(v_local, 1)))


def all_reduce_(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    """In-place all-reduce over ``group``; ``None`` is a single process that holds the whole vocabulary."""
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def excluded_columns(v_local: int, vocab_start: int, vocab_size: int, exclude_ids: torch.Tensor | None,
                     device: torch.device) -> torch.Tensor:
    """Bool [v_local]: this rank's columns that take no part, vocabulary padding and ``exclude_ids``."""
    ids = torch.arange(vocab_start, vocab_start + v_local, device=device)
    out = ids >= vocab_size
    if exclude_ids is not None:
        out |= torch.isin(ids, exclude_ids.to(device))
    return out


def scale_gradient_(ctx, grad_out: torch.Tensor) -> torch.Tensor:
    """The backward of a kernel that formed its [N, V_local] gradient in the forward: that buffer times the
    incoming per-row gradient, in place. Refuses a second backward through the same graph (retain_graph=True),
    which would see the buffer already scaled."""
    if ctx.consumed:
        raise RuntimeError("this vocab-parallel loss scales its saved gradient in place, so its backward runs once; "
                           "recompute the loss instead of back-propagating twice through it (retain_graph=True)")
    ctx.consumed = True
    grad, = ctx.saved_tensors
    return grad.mul_(grad_out[:, None].to(grad.dtype))


def _raw_logits(logits: torch.Tensor, anchor: torch.Tensor, excluded: torch.Tensor, tau: float, eta: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh ``dtype`` copies of the prediction logits z and the target logits tau * (anchor - eta (z - anchor)),
    excluded columns at -inf (whatever garbage the inputs hold there)."""
    z = logits.to(dtype, copy=True).masked_fill_(excluded, -math.inf)
    a = anchor.to(dtype, copy=True)
    if eta:
        a.mul_(1.0 + eta).sub_(z, alpha=eta)
    a.mul_(tau).masked_fill_(excluded, -math.inf)
    return z, a


def _log_mixture(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    # logaddexp stays finite where both p and q underflow, so 0 * (log p - log m) never becomes 0 * inf.
    return torch.logaddexp(logp, logq).sub_(math.log(2.0))


def _chunk(z: torch.Tensor, a: torch.Tensor, excluded: torch.Tensor, direction: str,
           group: dist.ProcessGroup | None, grad: torch.Tensor | None) -> torch.Tensor:
    """The divergence of a chunk of rows from its raw logits z, a (overwritten in place); writes dD/dz into
    ``grad`` unless it is None. At most three [n, V_local] float buffers are alive at once (four for reverse, five
    for js), and the function's own frame lets them die before the next chunk's are made."""
    peak = all_reduce_(torch.stack((z.amax(-1), a.amax(-1))), dist.ReduceOp.MAX, group)
    z.sub_(peak[0, :, None])
    a.sub_(peak[1, :, None])
    log_sums = all_reduce_(torch.stack([x.exp().sum(-1) for x in (z, a)]), dist.ReduceOp.SUM, group).log_()
    z.sub_(log_sums[0, :, None])  # log p (-inf on excluded columns)
    a.sub_(log_sums[1, :, None])  # log q
    # Each direction turns one buffer into w * (log ratio) in place, w being the distribution the first KL is an
    # expectation over; its row sums are the KL, and w * (log ratio - KL) is the forward and js gradient (up to
    # 1/2). Excluded columns: the log ratio is set to 0 there (it is -inf - -inf), and w is 0.
    if direction == "forward":  # KL(p||q) = sum p (log p - log q); dD/dz = p (log p - log q - KL)
        w = z.exp()
        weighted = z.masked_fill_(excluded, 0.0).sub_(a.masked_fill_(excluded, 0.0)).mul_(w)
        part = weighted.sum(-1)[None]
    elif direction == "reverse":  # KL(q||p) = sum q (log q - log p); dD/dz = p - q
        w = a.exp()
        part = a.masked_fill_(excluded, 0.0).sub_(z.masked_fill(excluded, 0.0)).mul_(w).sum(-1)[None]
    else:  # js: 1/2 KL(p||m) + 1/2 KL(q||m); dD/dz = 1/2 p (log p - log m - KL(p||m))
        logm = _log_mixture(z, a)
        w, q = z.exp(), a.exp()
        weighted = z.sub_(logm).masked_fill_(excluded, 0.0).mul_(w)
        part = torch.stack((weighted.sum(-1), a.sub_(logm).masked_fill_(excluded, 0.0).mul_(q).sum(-1)))
    part = all_reduce_(part, dist.ReduceOp.SUM, group)
    if grad is not None:
        if direction == "reverse":
            grad.copy_(z.exp_().sub_(w))  # z still holds log p (-inf on excluded columns: p = 0 there)
        else:
            g = weighted.addcmul_(w, part[0, :, None], value=-1.0)
            grad.copy_(g.mul_(0.5) if direction == "js" else g)
    return part[0] if direction != "js" else 0.5 * (part[0] + part[1])


class _VocabParallelDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, anchor, group, vocab_start, vocab_size, direction, tau, eta, exclude_ids,
                chunk_size, with_grad):
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        n = logits.shape[0]
        excluded = excluded_columns(logits.shape[1], vocab_start, vocab_size, exclude_ids, logits.device)
        out = torch.empty(n, dtype=dtype, device=logits.device)
        # The gradient is formed here, per chunk, while log p and log q are at hand, and the backward only scales
        # it: no recomputation of either log-softmax, and neither input's logits need outlive the forward.
        grad = torch.empty_like(logits) if with_grad else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            out[s:e] = _chunk(*_raw_logits(logits[s:e], anchor[s:e], excluded, tau, eta, dtype), excluded,
                              direction, group, None if grad is None else grad[s:e])
        ctx.save_for_backward(grad)
        ctx.consumed = False
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return scale_gradient_(ctx, grad_out), *([None] * 10)


def vocab_parallel_divergence(logits: torch.Tensor, anchor_logits: torch.Tensor,
                              group: dist.ProcessGroup | None, *, vocab_start: int, vocab_size: int,
                              direction: str = "forward", tau: float = 1.0, eta: float = 0.0,
                              exclude_ids: torch.Tensor | None = None, chunk_size: int | None = None
                              ) -> torch.Tensor:
    """Per-row divergence between p = softmax(logits) and a detached target q, over a vocab-parallel slice.

    Rows are positions (the caller selects the masked response positions); columns are this rank's slice
    [vocab_start, vocab_start + V_local) of the padded vocabulary, the other slices live on the other ranks of
    ``group`` (``None``: one process holding it all). Columns with id >= ``vocab_size`` (padding) or in
    ``exclude_ids`` (global ids, e.g. special tokens) are removed from both distributions, whatever values they
    hold; every other column must be finite.

        p = softmax(z),  z = logits
        a = anchor - eta (z - anchor)            (treated as a constant: no gradient flows through a)
        q = softmax(tau a)                       (tau = 0: uniform over the kept vocabulary; tau < 0 refused)
        forward:  D = KL(p || q) = sum_v p_v (log p_v - log q_v)
        reverse:  D = KL(q || p) = sum_v q_v (log q_v - log p_v)
        js:       D = 1/2 KL(p || m) + 1/2 KL(q || m),  m = (p + q) / 2

    Gradient with respect to z (times the incoming gradient of each row; zero on removed columns, none to
    ``anchor_logits``, and with eta != 0 the analytic gradient of D at fixed q, not the total derivative):

        forward:  dD/dz_v = p_v (log p_v - log q_v - KL(p || q))
        reverse:  dD/dz_v = p_v - q_v
        js:       dD/dz_v = 1/2 p_v (log(p_v / m_v) - KL(p || m))

    Communication per chunk of rows: one MAX and one SUM all-reduce of the [2, rows] max / exp-sum of both
    distributions, one SUM all-reduce of the partial divergence ([2, rows] for js); the backward needs none.
    Memory: rows are processed ``chunk_size`` at a time (default ``chunk_rows(V_local)``: 32 MiB of float32 per
    buffer, 66 rows at LLaDA's vocabulary), so the float32 working set is three chunk_size x V_local buffers
    (four for reverse, five for js).
    When ``logits`` requires a gradient the forward also writes it, chunk by chunk, into one [N, V_local] buffer
    of the logits' dtype, which is the only thing kept for the backward (it scales the buffer in place by the
    incoming per-row gradient and returns it): no recomputation, and the inputs' logits can be freed after the
    forward. Arithmetic is float32 (float64 for float64 inputs), which is also the dtype of the result [N].
    ``N`` must be equal on all ranks of ``group`` (it sets the number of collectives); N = 0 gives an empty result.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown divergence direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0 (0 = uniform target, 1 = raw anchor), got {tau}")
    chunk_size = chunk_rows(logits.shape[-1]) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.dim() != 2 or anchor_logits.shape != logits.shape:
        raise ValueError(f"logits and anchor_logits must both be [N, V_local]; got {tuple(logits.shape)} and "
                         f"{tuple(anchor_logits.shape)}")
    if exclude_ids is not None:
        exclude_ids = torch.as_tensor(exclude_ids, dtype=torch.long)
        kept = vocab_size - torch.unique(exclude_ids[(exclude_ids >= 0) & (exclude_ids < vocab_size)]).numel()
        if kept < 1:
            raise ValueError(f"exclude_ids removes all {vocab_size} vocabulary entries")
    return _VocabParallelDivergence.apply(logits, anchor_logits.detach(), group, vocab_start, vocab_size,
                                          direction, float(tau), float(eta), exclude_ids, chunk_size,
                                          logits.requires_grad and torch.is_grad_enabled())
