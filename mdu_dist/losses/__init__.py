"""Loss kernels: pure functions of tensors and an explicit process group, no megatron state and no model."""

from mdu_dist.losses.cross_entropy import (
    WEIGHTINGS,
    masked_diffusion_loss,
    masked_diffusion_nll,
    token_weights,
    vocab_parallel_cross_entropy,
)
from mdu_dist.losses.divergence import DIRECTIONS, vocab_parallel_divergence

__all__ = ["DIRECTIONS", "WEIGHTINGS", "masked_diffusion_loss", "masked_diffusion_nll", "token_weights",
           "vocab_parallel_cross_entropy", "vocab_parallel_divergence"]
