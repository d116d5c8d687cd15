"""CPU numerics pinned so that a run gives the same bits on any x86-64 processor, and a record of what was in
force (the demo's ``run_info.json``).

Every CPU library picks its kernels from the host, and each choice changes float summation order: ATen's
vectorised kernels by CPU capability; MKL's GEMM by its own CPUID dispatch and cache sizes; numpy's ufunc loops
by CPU feature (its float64 exp / log on an AVX-512 host differ from the AVX2 host's in ~5 % of elements);
oneDNN by ISA and cache sizes; reductions by thread count. The environment (``numerics_env``) fixes them before
the worker's libraries load, ``pin_process`` the rest inside the worker.

MKL's conditional numerical reproducibility (CNR) branches other than ``COMPATIBLE`` (SSE2 without the
approximate rcpps / rsqrtps) are documented for Intel processors only: on any other processor ``MKL_CBWR=AVX2``
silently falls back to ``AUTO`` (the host's dispatch). So the portable pins take ``COMPATIBLE``, and send the
matrix products, most of a step's time, to numpy's OpenBLAS at a pinned core type instead (``mdu_dist.cpu_kernels``:
as fast as MKL's AVX2 branch, which ``COMPATIBLE`` is 2.6x slower than); ``avx2-intel`` keeps MKL's AVX2 branch
for everything (the same bits only among Intel processors).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# cpu_isa -> (ATEN_CPU_CAPABILITY, MKL_CBWR, ONEDNN_MAX_CPU_ISA, highest numpy dispatch level kept,
#             OPENBLAS_CORETYPE of the routed matrix products or None: torch's own, through MKL)
CPU_ISAS = {"avx2": ("avx2", "COMPATIBLE", "AVX2", "avx2", "Haswell"),
            "avx2-intel": ("avx2", "AVX2", "AVX2", "avx2", None),
            "default": ("default", "COMPATIBLE", "SSE41", "baseline", None)}
# numpy's dispatch targets up to AVX2 (numpy 1.x names each feature, 2.x also the x86-64-v2/v3 levels).
_NUMPY_UP_TO_AVX2 = {"SSE", "SSE2", "SSE3", "SSSE3", "SSE41", "POPCNT", "SSE42", "AVX", "F16C", "FMA3", "AVX2",
                     "X86_V2", "X86_V3"}
# mkl_cbwr_get(MKL_CBWR_BRANCH) codes (mkl_cbwr.h); AUTO is also what MKL runs for a branch it ignores.
MKL_BRANCHES = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
                9: "AVX", 10: "AVX2", 12: "AVX512", 14: "AVX512_E1"}
PINNED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_DYNAMIC", "OPENBLAS_NUM_THREADS", "ATEN_CPU_CAPABILITY",
              "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE")


def _numpy_dispatch() -> list[str]:
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__
    return list(__cpu_dispatch__)


def numpy_disabled(level: str) -> str:
    """NPY_DISABLE_CPU_FEATURES for numpy's loops at most at ``level`` (avx2 | baseline): the dispatch targets
    above it, named as this numpy names them (an unknown name is only an ImportWarning, but a misspelt pin)."""
    return " ".join(f for f in _numpy_dispatch() if level == "baseline" or f not in _NUMPY_UP_TO_AVX2)


def numerics_env(cpu_isa: str, threads: int) -> dict[str, str]:
    """Environment that pins the CPU numerics of worker processes (read when their libraries load): ``threads``
    threads (0: left to the libraries), and for a ``cpu_isa`` of ``CPU_ISAS`` one instruction set for ATen,
    MKL, oneDNN, numpy and OpenBLAS (``native``: each library picks from the host)."""
    env = {}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MKL_DYNAMIC="FALSE",
                   OPENBLAS_NUM_THREADS=str(threads))
    if cpu_isa in CPU_ISAS:
        aten, mkl, onednn, numpy_level, openblas_core = CPU_ISAS[cpu_isa]
        env.update(ATEN_CPU_CAPABILITY=aten, MKL_CBWR=mkl, ONEDNN_MAX_CPU_ISA=onednn,
                   NPY_DISABLE_CPU_FEATURES=numpy_disabled(numpy_level))
        if openblas_core:
            env["OPENBLAS_CORETYPE"] = openblas_core
    return env


def pin_process(cpu_isa: str) -> None:
    """The pins that are not environment variables, for this process's torch (its environment from
    ``numerics_env(cpu_isa, ...)``)."""
    import torch

    # Refuse any op without a deterministic CPU kernel; but do not NaN-fill every torch.empty (the check's
    # default), which made a training step ~13x slower and changes no result.
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    # A memorising model drives gradients and optimizer updates into the subnormal range, where x86 arithmetic
    # runs tens of times slower; flushing them to zero (FTZ/DAZ) is itself deterministic.
    torch.set_flush_denormal(True)
    # oneDNN blocks its kernels by the host's cache sizes, and no CNR mode fixes them. The demo creates no
    # oneDNN primitive (ONEDNN_VERBOSE=1 lists none); off, none can be chosen by a later torch either.
    torch.backends.mkldnn.enabled = False
    if CPU_ISAS.get(cpu_isa, (None,) * 5)[4]:
        from mdu_dist.cpu_kernels import route_cpu_kernels

        route_cpu_kernels()


def _mkl():
    import torch

    try:  # MKL is linked into libtorch_cpu; its service functions are exported there
        return ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    except OSError:
        return None


def mkl_state() -> dict:
    """MKL's version and the CNR branch in effect (``AUTO`` where it ignored ``MKL_CBWR``), or {} without MKL."""
    lib = _mkl()
    if lib is None or not hasattr(lib, "mkl_serv_cbwr_get"):
        return {}
    buf = ctypes.create_string_buffer(256)
    lib.MKL_Get_Version_String(buf, len(buf))
    branch = lib.mkl_serv_cbwr_get(1)  # 1 = MKL_CBWR_BRANCH
    return {"mkl": buf.value.decode(), "mkl_cbwr_branch": MKL_BRANCHES.get(branch, str(branch))}


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), else what ``platform`` knows."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def numerics_info() -> dict:
    """What pinned this process's numerics, and the host: for run_info.json (no number depends on it when the
    pins hold)."""
    import numpy
    import torch

    from mdu_dist.cpu_kernels import kernels_routed, openblas

    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    dispatched = [f for f in _numpy_dispatch() if __cpu_features__.get(f)]
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "numpy": numpy.__version__,
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **mkl_state(), **openblas(), "cpu_kernels_routed": kernels_routed(), "numpy_dispatch": dispatched,
            "mkldnn_enabled": torch.backends.mkldnn.enabled,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            **{k: os.environ.get(k) for k in PINNED_ENV}}
