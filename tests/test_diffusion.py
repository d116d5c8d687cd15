"""Forward diffusion of (prompt, response) pairs: only response tokens are masked, at rate t."""

from __future__ import annotations

import math

import torch

from mdu_dist.diffusion import anchor_view, mask_response, sample_t

MASK = 99


def _batch(rows: int, length: int, prompt: int, response: int):
    ids = torch.randint(0, 50, (rows, length), generator=torch.Generator().manual_seed(0))
    response_mask = torch.zeros(rows, length, dtype=torch.bool)
    response_mask[:, prompt:prompt + response] = True  # the rest of the row is padding
    return ids, response_mask


def test_prompt_and_padding_are_never_masked():
    ids, response = _batch(8, 12, prompt=3, response=6)
    noisy, masked = mask_response(ids, response, torch.ones(8), MASK, torch.Generator().manual_seed(1))
    assert masked.equal(response)  # t = 1 masks the whole response and nothing else
    assert (noisy[masked] == MASK).all() and noisy[~masked].equal(ids[~masked])
    noisy, masked = mask_response(ids, response, torch.full((8,), 0.5), MASK, torch.Generator().manual_seed(2))
    assert not masked[~response].any() and noisy[~response].equal(ids[~response])


def test_mask_rate_follows_t():
    t = torch.tensor([0.05, 0.3, 0.7, 0.95])
    ids, response = _batch(4, 20_000, prompt=500, response=19_000)
    _, masked = mask_response(ids, response, t, MASK, torch.Generator().manual_seed(3))
    rate = masked.sum(-1) / response.sum(-1)
    sigma = torch.sqrt(t * (1 - t) / 19_000)
    assert ((rate - t).abs() <= 5 * sigma).all(), (rate, t)


def test_sample_t_lies_in_eps_one():
    t = sample_t(20_000, eps=0.1, generator=torch.Generator().manual_seed(4))
    assert t.min() >= 0.1 and t.max() <= 1.0
    assert math.isclose(t.mean().item(), 0.55, abs_tol=5 * 0.9 / math.sqrt(12 * 20_000))


def test_anchor_view_masks_prompt_and_padding_and_keeps_y_t():
    ids, response = _batch(3, 10, prompt=2, response=5)
    noisy, _ = mask_response(ids, response, torch.full((3,), 0.5), MASK, torch.Generator().manual_seed(5))
    anchor = anchor_view(noisy, response, MASK)
    assert (anchor[~response] == MASK).all() and anchor[response].equal(noisy[response])


def test_deterministic_given_the_generator():
    ids, response = _batch(4, 16, prompt=4, response=10)

    def draw(seed: int):
        g = torch.Generator().manual_seed(seed)
        t = sample_t(4, generator=g)
        return (t, *mask_response(ids, response, t, MASK, g))

    first, again, other = draw(6), draw(6), draw(7)
    assert all(a.equal(b) for a, b in zip(first, again))
    assert not first[0].equal(other[0])
