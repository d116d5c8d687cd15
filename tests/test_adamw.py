"""mdu_dist.adamw against independent references: the square root against exact rational arithmetic (a float32
result is the correctly rounded root iff x lies between the squares of its two rounding boundaries), the
optimizer against the AdamW update written out in float64 numpy."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from mdu_dist.adamw import PortableAdamW
from mdu_dist.cpu_kernels import correctly_rounded_sqrt


def _boundaries(r: np.float32) -> tuple[Fraction, Fraction]:
    """The rounding boundaries either side of float32 ``r``: half-way to its neighbours."""
    lo, hi = np.nextafter(r, np.float32(0)), np.nextafter(r, np.float32(np.inf))
    return (Fraction(float(lo)) + Fraction(float(r))) / 2, (Fraction(float(r)) + Fraction(float(hi))) / 2


def test_sqrt_is_correctly_rounded():
    g = np.random.default_rng(0)
    # Every float32 exponent, normal range (subnormals are flushed in the demo's workers), random significands.
    bits = g.integers(0x00800000, 0x7F800000, size=20_000, dtype=np.uint32)
    x = np.concatenate([bits.view(np.float32), np.float32([1.0, 2.0, 4.0, 0.25, 1e-38, 3.4e38])])
    roots = correctly_rounded_sqrt(torch.from_numpy(x)).numpy()
    assert roots.dtype == np.float32
    for xi, r in zip(x, roots):
        lo, hi = _boundaries(r)
        assert lo * lo <= Fraction(float(xi)) <= hi * hi, (float(xi), float(r))
    # A million more against numpy's float32 root (the SSE / AVX sqrt instruction: IEEE, correctly rounded).
    many = g.integers(0x00800000, 0x7F800000, size=1_000_000, dtype=np.uint32).view(np.float32)
    assert np.array_equal(correctly_rounded_sqrt(torch.from_numpy(many)).numpy(), np.sqrt(many))
    with np.errstate(invalid="ignore"):
        special = correctly_rounded_sqrt(torch.tensor([0.0, -0.0, float("inf"), -1.0, float("nan")]))
    assert special[:3].tolist() == [0.0, 0.0, float("inf")] and str(special[1].item()) == "-0.0"
    assert special[3:].isnan().all()


def test_sqrt_dtypes():
    x = torch.tensor([2.0], dtype=torch.float64)
    assert correctly_rounded_sqrt(x).item() == 2.0 ** 0.5  # Python's float root: correctly rounded
    with pytest.raises(TypeError, match="bfloat16"):
        correctly_rounded_sqrt(x.bfloat16())


def _reference(p0, grads, lr, betas, eps, wd):
    """AdamW (decoupled decay, bias-corrected moments), float64 numpy."""
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_adamw_matches_the_update(dtype, tol):
    g = np.random.default_rng(1)
    p0 = g.standard_normal((7, 5))
    grads = [g.standard_normal((7, 5)) * 10.0 ** g.integers(-6, 1) for _ in range(12)]
    lr, betas, eps, wd = 3e-3, (0.9, 0.95), 1e-8, 0.1
    p = torch.nn.Parameter(torch.tensor(p0, dtype=dtype))
    opt = PortableAdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for grad in grads:
        p.grad = torch.tensor(grad, dtype=dtype)
        opt.step()
    want = _reference(p0, grads, lr, betas, eps, wd)
    np.testing.assert_allclose(p.detach().double().numpy(), want, rtol=tol, atol=tol)


def test_adamw_resumes_torch_state_and_groups():
    """A torch AdamW state_dict (a checkpoint written before) continues under PortableAdamW as under torch's,
    per-group weight decay included."""
    torch.manual_seed(0)
    a, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    grads = [(torch.randn(6, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)) for _ in range(6)]

    def run(make, resume_at=None):
        params = [torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())]
        groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=1e-2)
        for i, gs in enumerate(grads):
            if i == resume_at:
                state = opt.state_dict()
                opt = make(groups)
                opt.load_state_dict(state)
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params]

    want = run(None)
    got = run(lambda groups: PortableAdamW(groups, lr=1e-2), resume_at=3)
    for w, x in zip(want, got):
        torch.testing.assert_close(x, w, rtol=1e-13, atol=1e-13)


def test_adamw_refuses_bad_hyperparameters():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="betas"):
        PortableAdamW([p], betas=(0.9, 1.0))
