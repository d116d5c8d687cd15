"""The CPU shim redirects exactly the listed CUDA calls when no GPU is present, and nothing when one is."""

import pytest
import torch

from multiproc import run_distributed

EXPECTED = [
    "torch.cuda.current_device",
    "torch.cuda.synchronize",
    "torch.cuda.get_rng_state",
    "torch.cuda.manual_seed",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
    "megatron.core.pipeline_parallel.schedules.torch",
]


def _activate_and_probe():
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    from mdu_dist import cpu_shim

    names = cpu_shim.activate()
    assert cpu_shim.activate() == names, "activate() must be idempotent"
    torch.cuda.synchronize()
    # The tracker forks the CPU generator the way it would fork the CUDA one: same seed, same numbers,
    # and the outer stream is restored afterwards.
    mrandom.initialize_rng_tracker(force_reset=True)
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.add("probe", 11)
    torch.manual_seed(0)
    with tracker.fork("probe"):
        inside = torch.rand(3)
    outside = torch.rand(3)
    torch.manual_seed(11)
    expected_inside = torch.rand(3)
    torch.manual_seed(0)
    expected_outside = torch.rand(3)
    return {
        "names": names,
        "device": str(torch.cuda.current_device()),
        "counter_device": str(schedules.torch.zeros([], dtype=torch.int, device="cuda").device),
        "fork_uses_seed": torch.equal(inside, expected_inside),
        "fork_restores": torch.equal(outside, expected_outside),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="the redirects apply only without CUDA")
def test_each_redirect_is_listed_and_works_on_cpu():
    from mdu_dist.cpu_shim import REDIRECTS

    assert [r.name for r in REDIRECTS] == EXPECTED
    assert all(r.why for r in REDIRECTS)
    (probe,) = run_distributed(_activate_and_probe, 1)
    assert probe["names"] == EXPECTED
    assert probe["device"] == "cpu"
    assert probe["counter_device"] == "cpu"
    assert probe["fork_uses_seed"] and probe["fork_restores"]


@pytest.mark.gpu
def test_inert_when_cuda_is_available():
    from megatron.core.pipeline_parallel import schedules

    from mdu_dist import cpu_shim

    before = (torch.cuda.current_device, torch.cuda.synchronize, schedules.torch)
    assert cpu_shim.activate() == []
    assert (torch.cuda.current_device, torch.cuda.synchronize, schedules.torch) == before
