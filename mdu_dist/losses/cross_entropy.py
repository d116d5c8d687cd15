"""Token cross entropy over a vocab-parallel slice, and LLaDA's masked-diffusion (ELBO) loss built on it."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from mdu_dist.losses.divergence import all_reduce_, chunk_rows, excluded_columns, scale_gradient_

WEIGHTINGS = ("inverse_t", "none", "geometric")


def _chunk(z: torch.Tensor, local: torch.Tensor, owned: torch.Tensor, group: dist.ProcessGroup | None,
           grad: torch.Tensor | None) -> torch.Tensor:
    """NLL of a chunk of rows from its logits z (a float copy, excluded columns at -inf, overwritten); writes
    softmax - onehot into ``grad`` unless it is None. A function of its own so that the chunk's buffer dies with
    it, before the next chunk's is made."""
    peak = all_reduce_(z.amax(-1), dist.ReduceOp.MAX, group)
    z.sub_(peak[:, None])
    picked = z.gather(1, local[:, None]).squeeze(1).masked_fill_(~owned, 0.0)
    sums = all_reduce_(torch.stack((z.exp_().sum(-1), picked)), dist.ReduceOp.SUM, group)
    if grad is not None:
        z.div_(sums[0, :, None])
        z[torch.arange(z.shape[0], device=z.device), local] -= owned.to(z.dtype)
        grad.copy_(z)
    return sums[0].log() - sums[1]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, vocab_size, chunk_size, with_grad):
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        n, v_local = logits.shape
        excluded = excluded_columns(v_local, vocab_start, vocab_size, None, logits.device)
        local = target - vocab_start
        owned = (local >= 0) & (local < v_local)  # the rank whose slice holds the target contributes its logit
        local = local.clamp(0, v_local - 1)
        nll = torch.empty(n, dtype=dtype, device=logits.device)
        # As in Megatron's vocab-parallel cross entropy, the gradient softmax - onehot is formed in the forward
        # and only scaled in the backward: the logits need not outlive the forward, nothing is recomputed.
        grad = torch.empty_like(logits) if with_grad else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            nll[s:e] = _chunk(logits[s:e].to(dtype, copy=True).masked_fill_(excluded, -math.inf), local[s:e],
                              owned[s:e], group, None if grad is None else grad[s:e])
        ctx.save_for_backward(grad)
        ctx.consumed = False
        return nll

    @staticmethod
    def backward(ctx, grad_out):
        return scale_gradient_(ctx, grad_out), *([None] * 6)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: dist.ProcessGroup | None, *,
                                 vocab_start: int, vocab_size: int, chunk_size: int | None = None) -> torch.Tensor:
    """nll[N] = -log softmax(z)[target] over the whole vocabulary, z = ``logits`` [N, V_local] being this rank's
    slice [vocab_start, vocab_start + V_local) of the padded vocabulary (``group=None``: one process).

    Padding columns (id >= ``vocab_size``) are excluded whatever they hold; targets must be real ids. Gradient:
    softmax(z) - onehot(target), formed in the forward per chunk of ``chunk_size`` rows into one [N, V_local]
    buffer of the logits' dtype (when ``logits`` requires a gradient), which the backward scales in place (so
    the backward runs once per forward). Communication per chunk: one MAX all-reduce, one SUM all-reduce of
    [exp-sum; target logit]. Result in float32 (float64 for float64 logits); ``N`` must be equal on all ranks
    of ``group``.
    """
    chunk_size = chunk_rows(logits.shape[-1]) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, V_local] and target [N]; got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    if target.numel() and not (0 <= int(target.min()) and int(target.max()) < vocab_size):
        raise ValueError(f"target ids must lie in [0, {vocab_size}); got [{int(target.min())}, {int(target.max())}]")
    return _VocabParallelCrossEntropy.apply(logits, target, group, vocab_start, vocab_size, chunk_size,
                                            logits.requires_grad and torch.is_grad_enabled())


def token_weights(masked: torch.Tensor, t: torch.Tensor, weighting: str = "inverse_t",
                  geo_p: float = 0.3) -> torch.Tensor:
    """Float [B, L] weight w of each token's cross entropy in the masked-diffusion loss (used only where masked).

    - "inverse_t": w = 1 / t_b, LLaDA's ELBO weight (the default for both backbones).
    - "none": w = 1.
    - "geometric": Dream's context-adaptive reweighting (CART; DESIGN.md section 1 infers it from the MDU code's
      "CART, geo_p = 0.3"; the formula is Dream's ``context_adaptive_reweight``): with r = 1 - geo_p,
          w_i = sum_{j != i, j not masked} 1/2 geo_p r^(|i - j| - 1),
      the chance that a two-sided geometric jump from i (distance ~ Geometric(geo_p) on {1, 2, ...}, either
      side with probability 1/2) lands on a clean token: prompt, unmasked response or padding, all of which
      the bidirectional model sees. So w lies in [0, 1], near 1 for a mask next to clean context and decaying
      with the distance to it; t does not enter.
    """
    if weighting == "inverse_t":
        return (1.0 / t)[:, None].expand(masked.shape)
    if weighting == "none":
        return torch.ones(masked.shape, device=masked.device)
    if weighting == "geometric":
        if not 0 < geo_p <= 1:
            raise ValueError(f"geo_p must lie in (0, 1], got {geo_p}")
        pos = torch.arange(masked.shape[1], device=masked.device)
        distance = (pos[:, None] - pos[None, :]).abs()
        kernel = 0.5 * geo_p * (1.0 - geo_p) ** (distance - 1).clamp(min=0).float()
        kernel = kernel.masked_fill_(distance == 0, 0.0)
        return (~masked).float() @ kernel  # the kernel is symmetric: no transpose needed
    raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")


def masked_diffusion_nll(token_nll: torch.Tensor, masked: torch.Tensor, response_mask: torch.Tensor,
                         t: torch.Tensor, weighting: str = "inverse_t", geo_p: float = 0.3) -> torch.Tensor:
    """Per-sequence ELBO estimate of the response NLL per token, [B]:

        nll_b = sum_{i masked, in response} w_i CE_i / (number of response tokens of b)

    with w from ``token_weights``; ``-nll_b`` is the log-likelihood estimate the baselines take. ``token_nll``
    may hold anything finite outside masked response positions. A row without masked tokens gives 0, and one
    without response tokens divides by 1 instead of 0, so neither turns into NaN.
    """
    selected = masked & response_mask
    # 1/t in the loss's own precision: float64 references see no float32 rounding of the weight.
    w = token_weights(selected, t.to(token_nll.dtype), weighting, geo_p).to(token_nll.dtype)
    total = torch.where(selected, w * token_nll, torch.zeros((), dtype=token_nll.dtype, device=token_nll.device))
    return total.sum(-1) / response_mask.sum(-1).clamp(min=1).to(token_nll.dtype)


def masked_diffusion_loss(token_nll: torch.Tensor, masked: torch.Tensor, response_mask: torch.Tensor,
                          t: torch.Tensor, weighting: str = "inverse_t", geo_p: float = 0.3) -> torch.Tensor:
    """LLaDA's SFT loss: the batch mean of ``masked_diffusion_nll`` (0, not NaN, when nothing is masked or the
    batch is empty)."""
    nll = masked_diffusion_nll(token_nll, masked, response_mask, t, weighting, geo_p)
    return nll.sum() / max(nll.numel(), 1)
