"""The attention mask every layer applies: padding, LLaDA2's block-causal attention (``model.block_size``), or a
mask given whole.

One convention throughout, megatron-core's: a bool tensor of shape [b or 1, 1, s or 1, s] that is True where
query i may NOT attend key j. megatron's local ``DotProductAttention`` and the dense reference read it as is;
``models.attention.SDPAttention`` is the one place that inverts it (SDPA's bool mask is True where attention is
allowed). For row r with positions p_r(k) (``row_positions``: counted from the row's first real token)::

    masked[r, 0, i, j] = pad[r, j]  or  block(p_r(j)) > block(p_r(i))     block(k) = k // block_size

the second term only when ``block_size`` > 0 (0: every key is attended, masked diffusion's full bidirectional
attention), or, given a ``mask``, ``pad[r, j] or mask[r or 0, 0, i, j]`` in its place. Numbering blocks by
position rather than by column keeps a left-padded row's mask that of the row alone. Every query must keep at
least one key (its softmax is 0/0 otherwise): a row with a real token and a block-causal mask always does.
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_positions(pad: Tensor) -> Tensor:
    """[B, S] position of every token, 0 at its row's first real token (padding before it also 0, after the last
    real token the last one's), for ``pad`` bool [B, S] True at padding."""
    return ((~pad).cumsum(dim=1) - 1).clamp(min=0)


def attention_mask(seq_len: int, block_size: int = 0, pad: Tensor | None = None, mask: Tensor | None = None,
                   device: torch.device | str | None = None) -> Tensor | None:
    """The bool mask of the module docstring, True = masked out: [b, 1, 1, s] for padding alone, [1, 1, s, s]
    for an unpadded block-causal mask, [b, 1, s, s] for both or for ``mask`` [b or 1, 1, s, s] with padding;
    None when nothing is masked. ``pad`` bool [b, s] True at padding."""
    if block_size < 0:
        raise ValueError(f"block_size={block_size} must be >= 0")
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != (seq_len, seq_len):
            raise ValueError(f"mask must be a bool [b or 1, 1, {seq_len}, {seq_len}] tensor (True = masked out); "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        return mask if pad is None else mask | pad[:, None, None, :]
    if block_size == 0:
        return None if pad is None else pad[:, None, None, :]
    positions = torch.arange(seq_len, device=device)[None] if pad is None else row_positions(pad)
    block = positions // block_size
    later = block[:, None, :] > block[:, :, None]  # [b or 1, s (query), s (key)]
    if pad is not None:
        later = later | pad[:, None, :]
    return later[:, None]
