"""CPU kernels that follow the processor, replaced by ones that do not: the matrix products through numpy's
OpenBLAS at one pinned core type (the same bits on any x86-64 processor with AVX2 and FMA, at the speed of MKL's
AVX2 branch), and the square root through numpy's (correctly rounded; torch's is MKL's, which is not).

MKL's one processor-independent branch (``MKL_CBWR=COMPATIBLE``, SSE2) runs the demo's products about 2.6x
slower than its AVX2 branch, and that branch holds on Intel processors only. OpenBLAS (the BLAS numpy's wheel
carries) picks kernels by core type; ``OPENBLAS_CORETYPE=Haswell`` fixes its AVX2 + FMA kernels and with them the
blocking (for that core P, Q and R are build constants, not read from the host's caches), so on one thread a
product's summation order is the same on every such processor.

``route_cpu_kernels`` registers CPU kernels for ``aten::mm``, ``addmm``, ``bmm`` and ``baddbmm`` that compute
float32 / float64 products with ``numpy.matmul`` (OpenBLAS's ?gemm; a transposed view goes to BLAS as a
transpose flag, not a copy):

    mm(A, B)                       = A B
    bmm(A, B)[i]                   = A[i] B[i]
    addmm(C, A, B, beta, alpha)    = beta C + alpha (A B)        (C broadcast; beta = 0 ignores C, NaN included)
    baddbmm(C, A, B, beta, alpha)  = beta C + alpha (A[i] B[i])

with A B rounded once to the dtype before the scaling and the sum (ATen's elementwise kernels, pinned
elsewhere). Gradients are autograd's formulas for these ops (dA = dY B^T, dB = A^T dY, dC = beta dY summed
over broadcast dimensions), which call the same routed kernels.

It also registers ``aten::sqrt`` and ``aten::pow(Tensor, Scalar)`` at exponent 0.5 (which ATen computes with
its sqrt kernel; DeepSpeed takes its gradient norm so): torch's float32 / float64 CPU root is MKL's vector
maths, an ulp off in ~17 % of float32 elements and differently on another processor, so clipping by that norm
scaled every gradient differently. Here it is ``correctly_rounded_sqrt`` (gradient: autograd's, dx = dy / (2
sqrt(x)), through the same routed root). Other dtypes and exponents keep torch's kernels (through the ops'
``out=`` overloads, which the route does not replace).
"""

from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path

import numpy as np
import torch

OPENBLAS_CORE = "Haswell"  # AVX2 + FMA: what ATEN_CPU_CAPABILITY=avx2 also assumes of the host
_ROUTED = (torch.float32, torch.float64)
_library = None  # the registration: kept alive for the process, as the route's lifetime


def correctly_rounded_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` rounded to nearest in ``x``'s dtype (float32 or float64), on every x86-64 processor.

    On CPU it is numpy's ``sqrt`` ufunc on ``x``'s memory: its loops (baseline, AVX2 or AVX-512) are the hardware
    square-root instructions, which IEEE 754 requires to round correctly. CUDA's root is correctly rounded
    already. No gradient of its own (autograd's sqrt formula applies where the route calls it)."""
    if x.device.type != "cpu":
        return x.sqrt()
    if x.dtype not in _ROUTED:
        raise TypeError(f"correctly_rounded_sqrt: float32 or float64, not {x.dtype}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    np.sqrt(x.detach().numpy(), out=out.numpy())  # out=: a 0-dim root stays an array, not a numpy scalar
    return out


def openblas() -> dict:
    """The OpenBLAS that numpy loaded (not another package's, e.g. scipy's): its build configuration and the
    core type it runs ({} if numpy has none)."""
    np.matmul(np.ones((2, 2)), np.ones((2, 2)))  # OpenBLAS initialises (and reads OPENBLAS_CORETYPE) on load
    wheel_libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"  # where numpy's wheel keeps it
    mapped = {Path(line.split()[-1]) for line in Path("/proc/self/maps").read_text().splitlines()
              if "openblas" in line.rsplit("/", 1)[-1].lower()}
    ours = [p for p in mapped if p.parent == wheel_libs] or (list(mapped) if len(mapped) == 1 else [])
    if not ours:
        return {}
    lib = ctypes.CDLL(str(ours[0]))
    for prefix in ("scipy_openblas_", "openblas_"):
        for suffix in ("64_", ""):
            if hasattr(lib, f"{prefix}get_corename{suffix}"):
                info = {}
                for key in ("config", "corename"):
                    fn = getattr(lib, f"{prefix}get_{key}{suffix}")
                    fn.restype = ctypes.c_char_p
                    info[f"openblas_{key}"] = fn().decode().strip()
                return info
    return {}


def _routed(*tensors: torch.Tensor) -> bool:
    return tensors[0].dtype in _ROUTED and all(t.dtype == tensors[0].dtype for t in tensors)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = a.new_empty(*a.shape[:-1], b.shape[-1])
    np.matmul(a.detach().numpy(), b.detach().numpy(), out=out.numpy())
    return out


def _scaled_sum(product: torch.Tensor, c: torch.Tensor, beta, alpha) -> torch.Tensor:
    if alpha != 1:
        product.mul_(alpha)
    if beta == 0:
        return product
    return product.add_(c if beta == 1 else c * beta)


def mm(a, b):
    if not _routed(a, b):
        return torch.ops.aten.mm.out(a, b, out=a.new_empty(a.shape[0], b.shape[1]))
    return _matmul(a, b)


def bmm(a, b):
    if not _routed(a, b):
        return torch.ops.aten.bmm.out(a, b, out=a.new_empty(a.shape[0], a.shape[1], b.shape[2]))
    return _matmul(a, b)


def addmm(c, a, b, *, beta=1, alpha=1):
    if not _routed(c, a, b):
        return torch.ops.aten.addmm.out(c, a, b, beta=beta, alpha=alpha, out=a.new_empty(a.shape[0], b.shape[1]))
    return _scaled_sum(_matmul(a, b), c, beta, alpha)


def baddbmm(c, a, b, *, beta=1, alpha=1):
    if not _routed(c, a, b):
        return torch.ops.aten.baddbmm.out(c, a, b, beta=beta, alpha=alpha,
                                          out=a.new_empty(a.shape[0], a.shape[1], b.shape[2]))
    return _scaled_sum(_matmul(a, b), c, beta, alpha)


def sqrt(x):
    if not _routed(x):
        return torch.ops.aten.sqrt.out(x, out=torch.empty_like(x, dtype=torch.result_type(x, 1.0)))
    return correctly_rounded_sqrt(x)


def pow_scalar(x, exponent):
    if exponent == 0.5 and _routed(x) and not isinstance(exponent, complex):
        return correctly_rounded_sqrt(x)
    return torch.ops.aten.pow.Tensor_Scalar_out(x, exponent, out=torch.empty_like(
        x, dtype=torch.result_type(x, exponent)))


def kernels_routed() -> bool:
    return _library is not None


def route_cpu_kernels() -> dict:
    """Send this process's CPU matrix products to numpy's OpenBLAS and its square roots to numpy's (idempotent).
    The environment must have set ``OPENBLAS_CORETYPE`` before numpy loaded (``numerics.numerics_env``); refuses
    when OpenBLAS runs another core (a processor without AVX2 and FMA: use ``cpu_isa: default``). Returns
    ``openblas()``."""
    global _library
    info = openblas()
    if info.get("openblas_corename", "").lower() != OPENBLAS_CORE.lower():
        raise RuntimeError(f"the portable GEMM needs numpy's OpenBLAS on its {OPENBLAS_CORE} kernels "
                           f"(OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')!r} set before numpy loaded, "
                           f"a processor with AVX2 and FMA); numpy's OpenBLAS: {info or 'not found'}")
    if _library is None:
        library = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():  # "Overriding a previously registered kernel": the point of the route
            warnings.simplefilter("ignore", UserWarning)
            for name, kernel in (("mm", mm), ("bmm", bmm), ("addmm", addmm), ("baddbmm", baddbmm), ("sqrt", sqrt),
                                 ("pow.Tensor_Scalar", pow_scalar)):
                library.impl(name, kernel, "CPU")
        _library = library
    return info
