"""The unlearning baselines MDU is compared with, adapted to masked diffusion.

A masked-diffusion LM has no left-to-right likelihood: every ``*_loglik`` below is the per-sequence ELBO
estimate -masked_diffusion_nll(...) ([B], already divided by the response length, as LLaDA's estimator is),
computed by the caller from one masked forward pass of the policy (or of the frozen reference theta_0 for
``ref_*``, without gradient). Each function returns the scalar forget-side loss to minimise; open-unlearning
adds alpha * retain NLL to NPO, SimNPO, WGA and DPO as well, which the trainer does for every method alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mdu_dist.losses.cross_entropy import masked_diffusion_loss


def ga(forget_loglik: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget NLL: loss = -mean_b NLL_b = mean_b loglik_b (Jang et al. 2023)."""
    return forget_loglik.mean()


def npo(forget_loglik: torch.Tensor, ref_forget_loglik: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """Negative preference optimisation (Zhang et al. 2024), reference = theta_0:
    loss = mean_b -2/beta log sigmoid(-beta (loglik_b - ref_loglik_b)).

    The gradient is GA's scaled by sigmoid(beta (loglik - ref)), which vanishes once the policy has fallen
    below the reference. With length-normalised ELBO logliks beta acts per token, not per sequence.
    """
    return (-2.0 / beta * F.logsigmoid(-beta * (forget_loglik - ref_forget_loglik))).mean()


def simnpo(forget_loglik: torch.Tensor, *, beta: float = 1.0, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024), reference-free and length-normalised:
    loss = mean_b -2/beta log sigmoid(-beta loglik_b / |y_b| - gamma).

    The ELBO loglik is already divided by the response length |y_b|, so it is used as it is. open-unlearning
    writes the margin as delta = gamma / beta.
    """
    return (-2.0 / beta * F.logsigmoid(-beta * forget_loglik - gamma)).mean()


def wga(token_nll: torch.Tensor, masked: torch.Tensor, response_mask: torch.Tensor, t: torch.Tensor, *,
        beta: float = 1.0, weighting: str = "inverse_t") -> torch.Tensor:
    """Weighted gradient ascent (Wang et al. 2025, "Rethinking LLM unlearning objectives"): GA where each
    masked token's CE is weighted by the model's own probability of it, p_i^beta = exp(-beta CE_i), detached:
    loss = -mean_b sum_{i masked} p_i^beta w(t) CE_i / |y_b|, i.e. minus the masked-diffusion loss with
    weighted token CEs; beta = 0 is ``ga``. Confidently known tokens are pushed hardest, tokens already
    forgotten (p -> 0) stop contributing. Takes token values [B, L], not ``*_loglik``, because the weight is
    per token.
    """
    confidence = torch.where(masked & response_mask, torch.exp(-beta * token_nll.detach()), 0.0)
    return -masked_diffusion_loss(confidence * token_nll, masked, response_mask, t, weighting)


def dpo(idk_loglik: torch.Tensor, forget_loglik: torch.Tensor, ref_idk_loglik: torch.Tensor,
        ref_forget_loglik: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """DPO (Rafailov et al. 2023) with the "I don't know" answer preferred and the forget answer rejected:
    loss = mean_b -log sigmoid(beta ((loglik_idk - ref_idk) - (loglik_forget - ref_forget)))."""
    margin = (idk_loglik - ref_idk_loglik) - (forget_loglik - ref_forget_loglik)
    return (-F.logsigmoid(beta * margin)).mean()
