"""A float64 finite-difference check of a kernel's gradient that back-propagates once per forward.

torch.autograd.gradcheck back-propagates several times through one graph, which the vocab-parallel kernels
refuse (they scale the gradient they formed in the forward in place), so the check is done by hand: for random
directions u and output weights w, the central difference of w . f(x + h u) against the analytic <grad, u>.
"""

from __future__ import annotations

import torch


def assert_gradient_matches_finite_differences(fn, x: torch.Tensor, seed: int = 0, directions: int = 4,
                                               h: float = 1e-6, tol: float = 1e-6) -> None:
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    out = fn(x)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for _ in range(directions):
        u = torch.randn(x.shape, generator=g, dtype=torch.float64)
        leaf = x.clone().requires_grad_(True)
        (fn(leaf) * w).sum().backward()
        analytic = (leaf.grad * u).sum()
        with torch.no_grad():
            numeric = ((fn(x + h * u) - fn(x - h * u)) * w).sum() / (2 * h)
        assert abs(float(analytic - numeric)) <= tol * max(1.0, abs(float(numeric))), (float(analytic), float(numeric))
