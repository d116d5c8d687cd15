"""MDU unlearning of the tiny LLaDA2 through the CLI at the widest layout that runs here (PP=2 x DP=2: four gloo
processes; TP and expert parallelism are refused for MoE), killed with SIGKILL after its step-2 checkpoint and
resumed with ``train.resume=auto``: the same loss curves and final weights as the uninterrupted run, and the
expert bias of every checkpoint equal to the starting one (frozen: never trained, never updated)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_trainer import _cli, _final_weights, _scalars

ARGS = ["unlearn", "--nproc", "4", "--config", "configs/llada2_tiny.yaml", "model.make_vocab_size_divisible_by=8",
        "data.limit=8", "data.max_length=128", "optim.micro_batch_size=2", "optim.lr=1e-3", "optim.warmup_steps=1",
        "train.seed=3", "method.name=mdu", "method.tau=0.5", "parallel.pipeline=2", "train.max_steps=4",
        "train.save_every=1", "train.progress=false"]


@pytest.mark.slow
def test_llada2_pp2_dp2_sigkill_then_resume_replays_exactly(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _cli(*ARGS, f"train.output_dir={whole}")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(Path("build/torch_extensions").absolute())}
    proc = subprocess.Popen([sys.executable, "-m", "mdu_dist.cli", *ARGS, f"train.output_dir={cut}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    trigger = cut / "checkpoints" / "step-2"
    deadline = time.monotonic() + 300
    while not trigger.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its four ranks
    proc.wait()
    assert trigger.exists() and not (cut / "checkpoints" / "step-4").exists()

    _cli(*ARGS, f"train.output_dir={cut}", "train.resume=auto")
    a, b = _scalars(whole), _scalars(cut)
    for tag in ("unlearn/forget-loss", "unlearn/retain-loss", "unlearn/kl", "grad-norm", "learning-rate"):
        curve_a, curve_b = dict(a[tag]), dict(b[tag])
        assert sorted(curve_a) == sorted(curve_b) == [1, 2, 3, 4]
        assert curve_a == curve_b, f"{tag}: resumed {curve_b} != uninterrupted {curve_a}"
    wa, wb = _final_weights(whole, 4), _final_weights(cut, 4)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    first = _final_weights(whole, 1)
    biases = [k for k in wa if k.endswith("expert_bias")]
    assert len(biases) == 3 and all(first[k].abs().min() > 0 for k in biases)
    assert all(torch.equal(first[k], wa[k]) for k in biases), "the expert bias moved during unlearning"
    moved = [k for k in wa if ".experts." in k and not torch.equal(first[k], wa[k])]
    assert moved, "no expert weight was trained"
