"""Each baseline's value on numbers worked out by hand, and the direction its gradient pushes."""

from __future__ import annotations

import math

import pytest
import torch

from mdu_dist.losses.baselines import dpo, ga, npo, simnpo, wga
from mdu_dist.losses.cross_entropy import masked_diffusion_nll


def _leaf(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_ga_ascends_the_forget_nll():
    loglik = _leaf(-1.0, -3.0)
    loss = ga(loglik)
    loss.backward()
    assert math.isclose(loss.item(), -2.0)
    assert (loglik.grad > 0).all()  # descending the loss lowers the forget log-likelihood


def test_npo_value_and_vanishing_gradient():
    loglik = _leaf(-2.0)
    loss = npo(loglik, torch.tensor([-1.5], dtype=torch.float64), beta=0.1)
    loss.backward()
    assert math.isclose(loss.item(), -2 / 0.1 * _log_sigmoid(-0.1 * (-2.0 + 1.5)))
    grads = []
    for gap in (0.0, -5.0, -20.0, -60.0):  # the policy falls further below the reference
        x = _leaf(gap)
        npo(x, torch.zeros(1, dtype=torch.float64), beta=0.1).backward()
        assert math.isclose(x.grad.item(), 2 / (1 + math.exp(-0.1 * gap)))  # 2 sigmoid(beta (logp - ref))
        grads.append(x.grad.item())
    assert grads[0] == pytest.approx(1.0) and all(0 < b < a for a, b in zip(grads, grads[1:]))


def test_simnpo_value_and_sign():
    loglik = _leaf(-0.5, -2.0)  # length-normalised ELBO estimates
    loss = simnpo(loglik, beta=2.5, gamma=0.1)
    loss.backward()
    want = sum(-2 / 2.5 * _log_sigmoid(-2.5 * x - 0.1) for x in (-0.5, -2.0)) / 2
    assert math.isclose(loss.item(), want)
    assert (loglik.grad > 0).all()


def test_wga_weights_each_token_by_its_detached_probability():
    nll = _leaf(1.0, 2.0, 7.0)[None]  # position 2 is not masked: its value must not matter
    nll.retain_grad()
    response, masked, t = torch.ones(1, 3, dtype=torch.bool), torch.tensor([[True, True, False]]), torch.tensor([0.5])
    loss = wga(nll, masked, response, t, beta=1.0)
    loss.backward()
    # -(1/t) sum_masked p^beta CE / |y| with p = exp(-CE)
    assert math.isclose(loss.item(), -(math.exp(-1) * 1 + math.exp(-2) * 2) / 0.5 / 3)
    want_grad = [-math.exp(-1) / 0.5 / 3, -math.exp(-2) / 0.5 / 3, 0.0]  # the weight is a constant
    assert torch.allclose(nll.grad, torch.tensor([want_grad], dtype=torch.float64))
    assert math.isclose(wga(nll, masked, response, t, beta=0.0).item(),
                        ga(-masked_diffusion_nll(nll, masked, response, t)).item())


def test_dpo_prefers_idk_over_the_forget_answer():
    idk, forget = _leaf(-1.0), _leaf(-2.0)
    ref_idk, ref_forget = torch.tensor([-1.5], dtype=torch.float64), torch.tensor([-1.8], dtype=torch.float64)
    loss = dpo(idk, forget, ref_idk, ref_forget, beta=0.1)
    loss.backward()
    assert math.isclose(loss.item(), -_log_sigmoid(0.1 * ((-1.0 + 1.5) - (-2.0 + 1.8))))
    assert idk.grad.item() < 0 < forget.grad.item()  # descent raises log p(idk), lowers log p(forget)
