"""How a noisy row meets the model: ``full`` (one sequence, masked diffusion as LLaDA trains) or ``block``
(LLaDA2's two-copy layout, as its official fine-tuning in inclusionAI's dFactory feeds it).

``block`` feeds [x_t ; x_0]: the noisy row and the clean row side by side, 2L tokens, both copies at positions
0..L-1, under ``two_copy_mask``. Within one forward, x_t's block b is predicted from its own noisy block and
the clean blocks before it -- what LLaDA2's block sampler shows the model when it decodes block b -- for every
block at once. Losses read logits at x_t's masked positions only; x_0 is context. The masking ratio is drawn
per row from U[``BLOCK_NOISE_RANGE``] and the loss is a plain mean of the cross entropy over the masked tokens
(``methods``); ``eval.likelihood`` draws its ELBO masks block by block in the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LAYOUTS = ("full", "block")
# dFactory's noise_range_low / noise_range_high (configs/sft/llada2_*_bd_sft.yaml).
BLOCK_NOISE_RANGE = (0.3, 0.8)


def two_copy_mask(length: int, block_size: int, device: torch.device | str | None = None) -> Tensor:
    """The attention mask over [x_t ; x_0] (2 * ``length`` columns), bool [1, 1, 2L, 2L], True = masked out
    (megatron-core's convention, as ``models.masks``). With c(k) the copy of column k (0: x_t, 1: x_0) and b(k)
    its block, (k mod L) // ``block_size``, query i may attend key j iff

        c(i) = c(j) = 0 and b(j) = b(i)      x_t: bidirectional inside its own noisy block
        c(i) = 0, c(j) = 1 and b(j) < b(i)   x_t: the clean x_0 of every earlier block
        c(i) = c(j) = 1 and b(j) <= b(i)     x_0: block-causal on itself

    so x_t's block b sees what a block-causal forward of [x_0 blocks < b ; x_t block b] sees, and x_0 never sees
    x_t. Every query keeps at least its own column."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1 for the two-copy layout")
    column = torch.arange(2 * length, device=device)
    clean, block = column >= length, (column % length) // block_size
    q_clean, k_clean, q_block, k_block = clean[:, None], clean[None, :], block[:, None], block[None, :]
    allowed = ((~q_clean & ~k_clean & (k_block == q_block)) | (~q_clean & k_clean & (k_block < q_block))
               | (q_clean & k_clean & (k_block <= q_block)))
    return ~allowed[None, None]


@dataclass(frozen=True)
class Layout:
    """``data.layout`` with the ``model.block_size`` that ``block`` needs."""

    name: str = "full"
    block_size: int = 0

    def __post_init__(self):
        if self.name not in LAYOUTS:
            raise ValueError(f"layout {self.name!r} must be one of {', '.join(LAYOUTS)}")
        if self.name == "block" and self.block_size < 1:
            raise ValueError(f"the block layout needs block_size >= 1, got {self.block_size}")

    @property
    def two_copy(self) -> bool:
        return self.name == "block"

    @property
    def copies(self) -> int:
        """Sequences of one row in the model's input: [x_t ; x_0] in ``block``."""
        return 2 if self.two_copy else 1

    def sequence(self, noisy: Tensor, clean: Tensor) -> Tensor:
        """The model's input for rows ``noisy`` (x_t) with clean copies ``clean`` (x_0), both [B, L]."""
        return torch.cat([noisy, clean], dim=1) if self.two_copy else noisy

    def read(self, positions: Tensor) -> Tensor:
        """Where the losses read logits, bool [B, L] over x_t -> over the model's input (never in x_0)."""
        return torch.cat([positions, torch.zeros_like(positions)], dim=1) if self.two_copy else positions

    def position_ids(self, rows: int, length: int, device: torch.device | str | None = None) -> Tensor | None:
        """RoPE positions [rows, 2L] of the two copies (0..L-1 each); None in ``full``: the model's own 0..L-1."""
        if not self.two_copy:
            return None
        return torch.arange(length, device=device).repeat(2).expand(rows, -1)

    def mask(self, length: int, device: torch.device | str | None = None) -> Tensor | None:
        """``two_copy_mask`` for rows of L tokens; None in ``full`` (``model.block_size`` applies as it is)."""
        return two_copy_mask(length, self.block_size, device) if self.two_copy else None
