"""The routed CPU kernels (mdu_dist/cpu_kernels.py): matrix products against float64 maths written out element
by element (numpy.einsum without BLAS), square roots against float64 roots rounded once to float32 (correctly
rounded: 53 >= 2 x 24 + 2 bits), gradients against their formulas, and the route's refusals. Each check runs in
a fresh process: the route is process-wide and OpenBLAS reads its core type when numpy loads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from mdu_dist.numerics import numerics_env


def run_pinned(code: str, cpu_isa: str = "avx2", **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    full.update(numerics_env(cpu_isa, 1), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full,
                          timeout=300)


PRODUCTS = """
    import numpy as np, torch
    from mdu_dist.cpu_kernels import kernels_routed
    from mdu_dist.numerics import pin_process

    def ref(a, b):  # float64, summed by einsum's own loop (optimize=False: no BLAS)
        return np.einsum("...ik,...kj->...ij", a.detach().double().numpy(), b.detach().double().numpy(),
                         optimize=False)

    def close(got, want, dtype):
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        err = np.abs(got.double().numpy() - want).max() / max(1.0, np.abs(want).max())
        assert got.dtype == dtype and err < tol, (got.dtype, err)

    g = torch.Generator().manual_seed(0)
    r = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    bf16 = (r(17, 33).bfloat16(), r(33, 9).bfloat16())
    before = torch.mm(*bf16)  # torch's own kernel
    pin_process("avx2")
    assert kernels_routed()
    for dtype in (torch.float32, torch.float64):
        a, b = r(37, 70, dtype=dtype), r(70, 45, dtype=dtype)
        close(torch.mm(a, b), ref(a, b), dtype)
        close(torch.mm(b.t(), a.t()), ref(b.t(), a.t()), dtype)  # transposed views
        close(torch.mm(a[::2, 3:], b[3:, ::3]), ref(a[::2, 3:], b[3:, ::3]), dtype)  # strided views
        bias = r(45, dtype=dtype)
        close(torch.addmm(bias, a, b), ref(a, b) + bias.double().numpy(), dtype)
        close(torch.addmm(bias, a, b, beta=0.5, alpha=-2.0), -2 * ref(a, b) + 0.5 * bias.double().numpy(), dtype)
        nan = torch.full((37, 45), float("nan"), dtype=dtype)
        close(torch.addmm(nan, a, b, beta=0), ref(a, b), dtype)  # beta = 0 ignores C, NaN included
        x, y, c = r(3, 11, 70, dtype=dtype), r(3, 70, 13, dtype=dtype), r(3, 11, 13, dtype=dtype)
        close(torch.bmm(x, y), ref(x, y), dtype)
        close(torch.bmm(y.transpose(1, 2), x.transpose(1, 2)), ref(y.transpose(1, 2), x.transpose(1, 2)), dtype)
        close(torch.baddbmm(c, x, y, beta=2.0, alpha=0.25), 0.25 * ref(x, y) + 2 * c.double().numpy(), dtype)
        close(torch.mm(r(4, 0, dtype=dtype), r(0, 5, dtype=dtype)), np.zeros((4, 5)), dtype)  # empty sum: zeros
        close(x @ y[0], ref(x, y[0]), dtype)  # matmul's broadcast: a folded mm
        # gradients: Y = X W^T + b, L = sum(Y * G) -> dX = G W, dW = G^T X, db = sum_rows G
        xs, w, bb = (t.clone().requires_grad_() for t in (r(2, 5, 70, dtype=dtype), r(45, 70, dtype=dtype),
                                                          r(45, dtype=dtype)))
        gy = r(2, 5, 45, dtype=dtype)
        (torch.nn.functional.linear(xs, w, bb) * gy).sum().backward()
        close(xs.grad, ref(gy, w), dtype)
        close(w.grad, ref(gy.reshape(-1, 45).t(), xs.reshape(-1, 70)), dtype)
        close(bb.grad, gy.double().sum((0, 1)).numpy(), dtype)
    after = torch.mm(*bf16)  # not routed: torch's kernel, the same bits
    assert torch.equal(before, after) and after.dtype == torch.bfloat16
    print("ok")
"""


def test_routed_products_match_float64_maths_and_leave_other_dtypes_to_torch():
    proc = run_pinned(PRODUCTS)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


ROOTS = """
    import numpy as np, torch
    from mdu_dist.numerics import pin_process

    pin_process("avx2")
    g = torch.Generator().manual_seed(0)
    # every float32 exponent's range, and the boundary cases
    x = torch.exp2(torch.rand(200_000, generator=g, dtype=torch.float64) * 250 - 125).float()
    x = torch.cat([x, torch.tensor([0.0, 1.0, 4.0, float("inf"), 1e-45, 3.4e38])])
    want = torch.from_numpy(np.sqrt(x.double().numpy()).astype(np.float32))
    for got in (torch.sqrt(x), torch.pow(x, 0.5), x.pow(0.5), x ** 0.5):
        assert torch.equal(got, want), int((got != want).sum())
    xd = x.double()
    assert torch.equal(torch.sqrt(xd), torch.from_numpy(np.sqrt(xd.numpy())))
    assert torch.isnan(torch.sqrt(torch.tensor([-1.0]))).all()
    norm = torch.tensor(17.5, dtype=torch.float32)  # 0-dim, as DeepSpeed's gradient norm
    assert norm.pow(0.5).shape == () and norm.pow(0.5).item() == np.float32(np.sqrt(17.5))
    # autograd's formula through the routed root: d sqrt(x) / dx = 1 / (2 sqrt(x))
    v = torch.tensor([0.25, 2.0, 9.0], dtype=torch.float64, requires_grad=True)
    torch.sqrt(v).sum().backward()
    assert torch.allclose(v.grad, 0.5 / torch.tensor([0.5, 2.0 ** 0.5, 3.0], dtype=torch.float64), rtol=1e-15)
    # not routed: other exponents, integer and bfloat16 roots keep torch's kernels and result dtypes
    assert torch.equal(torch.pow(x[:100], 2.0), x[:100] * x[:100])
    assert torch.sqrt(torch.tensor([4, 9])).tolist() == [2.0, 3.0]
    assert torch.pow(torch.tensor([3]), 2).dtype == torch.int64
    assert torch.sqrt(torch.tensor([4.0], dtype=torch.bfloat16)).dtype == torch.bfloat16
    print("ok")
"""


def test_routed_square_roots_are_correctly_rounded():
    """torch's own CPU root (MKL's vector maths) is an ulp off in ~17 % of float32 elements, by processor; DeepSpeed
    takes its gradient norm with pow(0.5), and clipping scales every gradient by it."""
    proc = run_pinned(ROOTS)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_route_refuses_another_openblas_core():
    """Pinned to another core, OpenBLAS would sum in another order: the route must refuse, naming the pin."""
    proc = run_pinned("from mdu_dist.numerics import pin_process; pin_process('avx2')", OPENBLAS_CORETYPE="Nehalem")
    assert proc.returncode != 0
    assert "the portable GEMM needs numpy's OpenBLAS on its Haswell kernels" in proc.stderr, proc.stderr[-2000:]
    assert "Nehalem" in proc.stderr


def test_intel_branch_and_unpinned_runs_keep_torchs_products():
    code = ("from mdu_dist.numerics import pin_process, numerics_info; pin_process('avx2-intel'); "
            "i = numerics_info(); print(i['cpu_kernels_routed'], i['OPENBLAS_CORETYPE'], i['mkl_cbwr_branch'])")
    proc = run_pinned(code, "avx2-intel")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-3:] == ["False", "None", "AVX2"]
