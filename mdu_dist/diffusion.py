"""Forward diffusion for (prompt, response) pairs, as LLaDA's SFT and the MDU code do it.

A sequence draws one noise level t; each response token is masked independently with probability t.
Prompt and padding positions are never masked, so the model is always conditioned on the whole prompt.
"""

from __future__ import annotations

import torch


def sample_t(batch: int, eps: float = 1e-3, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
    """t = eps + (1 - eps) U(0, 1) per sequence, float32 [batch]; eps keeps 1/t weights finite."""
    return sample_ratio(batch, eps, 1.0, generator, device)


def sample_ratio(batch: int, low: float, high: float, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """t = low + (high - low) U(0, 1) per sequence, float32 [batch] (LLaDA2's fine-tuning: U[0.3, 0.8])."""
    u = torch.rand(batch, generator=generator, device=device)
    return low + (high - low) * u


def mask_response(input_ids: torch.Tensor, response_mask: torch.Tensor, t: torch.Tensor, mask_token_id: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each response token of row b with probability t[b]: returns (noisy ids, masked bool), both [B, L].

    ``masked`` is True only at response positions that were replaced by ``mask_token_id``.
    """
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    masked = (u < t.to(u.device)[:, None]) & response_mask
    return input_ids.masked_fill(masked, mask_token_id), masked


def anchor_view(noisy_ids: torch.Tensor, response_mask: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """MDU's anchor input: every non-response position (prompt and padding) becomes the mask token, the noisy
    response y_t is kept as it is, so the anchor predicts y from y_t alone."""
    return noisy_ids.masked_fill(~response_mask, mask_token_id)
