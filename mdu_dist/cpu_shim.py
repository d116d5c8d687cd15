"""Run megatron-core on a machine without a GPU.

megatron-core assumes CUDA in a handful of places that our CPU/gloo runs reach (tests, the CPU demo):
device factories call ``torch.cuda.current_device()``, the pipeline p2p code calls ``torch.cuda.synchronize()``,
the model-parallel RNG tracker stores CUDA generator states, and the pipeline schedules allocate a token counter
with ``device="cuda"``. ``activate()`` redirects exactly those calls to the CPU, and does nothing at all when
CUDA is available, so GPU runs execute megatron-core unmodified. It is called from one place,
``mdu_dist.distributed.init``, before any megatron module is built.

On CPU the global CPU generator stands in for "the current device's" generator, so megatron's RNG tracker
forks and restores it exactly as it would the CUDA generator.
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

_ACTIVE: list[str] = []


@dataclass(frozen=True)
class Redirect:
    owner: str  # dotted module path
    attribute: str
    replacement: Callable[[], Any]  # builds the replacement value (lazily: the module may import late)
    why: str

    @property
    def name(self) -> str:
        return f"{self.owner}.{self.attribute}"


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _as_cpu(device: Any) -> Any:
    if device is not None and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _CudaFactoriesOnCpu(types.ModuleType):
    """``torch`` as seen by one megatron module, with ``device="cuda"`` in tensor factories mapped to CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device=_as_cpu(device), **kwargs)

    @staticmethod
    def empty(*args, device=None, **kwargs):
        return torch.empty(*args, device=_as_cpu(device), **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device=_as_cpu(device), **kwargs)


def _get_rng_state(*_args, clone: bool = False, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(state)


REDIRECTS: tuple[Redirect, ...] = (
    Redirect("torch.cuda", "current_device", lambda: _cpu_device,
             "megatron-core places new tensors on torch.cuda.current_device()"),
    Redirect("torch.cuda", "synchronize", lambda: (lambda *a, **k: None),
             "pipeline p2p communication synchronises the device after batched isend/irecv"),
    Redirect("torch.cuda", "get_rng_state", lambda: _get_rng_state,
             "the RNG tracker snapshots the device generator when adding a named state"),
    Redirect("torch.cuda", "manual_seed", lambda: torch.manual_seed,
             "model_parallel_cuda_manual_seed seeds the device generator"),
    Redirect("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", lambda: _get_rng_state,
             "the RNG tracker's fork() saves the device generator state"),
    Redirect("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", lambda: _set_rng_state,
             "the RNG tracker's fork() restores the device generator state"),
    Redirect("megatron.core.pipeline_parallel.schedules", "torch", _CudaFactoriesOnCpu,
             'the schedules count tokens in torch.zeros([], device="cuda")'),
)


def activate() -> list[str]:
    """Apply every redirect if (and only if) CUDA is unavailable; returns the names redirected."""
    if torch.cuda.is_available() or _ACTIVE:
        return list(_ACTIVE)

    for r in REDIRECTS:
        setattr(importlib.import_module(r.owner), r.attribute, r.replacement())
        _ACTIVE.append(r.name)
    return list(_ACTIVE)
