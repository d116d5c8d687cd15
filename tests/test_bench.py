"""The benchmark compares like with like: its naive KL and the vocab-parallel kernel compute the same values
and gradients; and the bench runs end to end in a tiny configuration (slow: it starts trainer processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdu_dist.bench import LLADA_VOCAB, bench_kl, kl_inputs, naive_kl, parallel_kl


def _value_and_grad(fn, logits, anchor):
    z = logits.detach().requires_grad_(True)
    out = fn(z, anchor)
    out.backward(torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype))
    return out.detach().double(), z.grad.double()


def _check(rows: int, vocab: int, tau: float, chunk: int) -> None:
    """Kernel (float32) and naive (float32) against the naive maths in float64: the kernel within 1e-5 of the
    exact values and of the largest gradient entry, and no less accurate than the naive float32 version."""
    logits, anchor = kl_inputs(rows, vocab, seed=vocab + rows)
    exact, exact_grad = _value_and_grad(lambda z, a: naive_kl(z, a, tau), logits.double(), anchor.double())
    got, got_grad = _value_and_grad(lambda z, a: parallel_kl(z, a, tau, chunk), logits, anchor)
    naive, naive_grad = _value_and_grad(lambda z, a: naive_kl(z, a, tau), logits, anchor)
    scale = exact_grad.abs().max().item()
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, exact_grad, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(naive, exact, rtol=1e-4, atol=1e-5)  # the baseline is a faithful KL too
    assert (got_grad - exact_grad).abs().max() <= 2 * (naive_grad - exact_grad).abs().max() + 1e-6 * scale


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk", [1024, 3])
def test_kernel_equals_naive_kl(tau, chunk):
    _check(10, 997, tau, chunk)


def test_kernel_equals_naive_kl_at_lladas_vocabulary():
    _check(3, LLADA_VOCAB, 0.5, 1024)


def test_kl_bench_measures_time_and_memory():
    rows = bench_kl(rows=[64], vocabs=[512], chunks=[1024, 8], tau=0.5, warmup=0, repeats=1)
    assert [(r["rows"], r["chunk"]) for r in rows] == [(64, 1024), (64, 8)]
    for r in rows:
        assert r["naive_s"] > 0 and r["parallel_s"] > 0
        # Both at least hold the [64, 512] float32 gradient.
        assert min(r["naive_peak_bytes"], r["parallel_peak_bytes"]) >= 64 * 512 * 4
    # Chunked by 8 rows, the kernel's working set is a fraction of the naive one's.
    assert rows[1]["memory_ratio"] < 0.5


@pytest.mark.slow
def test_bench_runs_tiny(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                str(Path("build/torch_extensions").absolute()))}
    proc = subprocess.run([sys.executable, "tools/bench.py", "--tiny", "--seq-len", "32", "--micro-batch-size", "2",
                           "--warmup", "0", "--repeats", "1", "--kl-rows", "8", "--kl-vocab", "256", "--kl-repeats",
                           "1", "--attention-seq-lens", "32", "--lora-rank", "2", "--json", str(out),
                           "--markdown", str(tmp_path / "b.md")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["steps"]) == {"sft", "mdu_forget", "mdu_tau0", "sft_2x", "mdu"}
    assert set(result["throughput"]) == {"1", "2"} and len(result["ratios"]) == 3
    assert set(result["attention"]["32"]) == {"sft@sdpa", "sft@local"}
    assert all(v["peak_bytes"] > 0 for v in result["steps"].values())
    assert "(d) SFT step, SDPA vs megatron's local core attention" in (tmp_path / "b.md").read_text()
    assert "MDU(alpha=0) / SFT" in proc.stdout and "| TP | s/step | tokens/s |" in proc.stdout
    lora = result["lora"]["steps"]
    assert set(lora) == {"mdu", "mdu+lora"} and result["lora"]["rank"] == 2
    # Adapters only train (4 layers x (qkv, attn-out, mlp-in, mlp-out) at rank 2 of the tiny 128 x 352 model), and
    # with neither the reference copy nor the base's Adam state less is held between steps.
    h, f = 128, 352
    assert lora["mdu+lora"]["trainable"] == 4 * 2 * ((h + 3 * h) + (h + h) + (h + 2 * f) + (f + h))
    assert lora["mdu+lora"]["resident_bytes"] < lora["mdu"]["resident_bytes"] / 2
    assert "LoRA / full: time" in proc.stdout


def test_model_flops_by_hand():
    from types import SimpleNamespace

    from mdu_dist.bench import forward_flops, peak_flops, step_flops
    from mdu_dist.config import load_config

    m = load_config("configs/llada_tiny.yaml").model  # h 128, f 352, 4 layers, kv = 4 x 32 = 128, V 1000
    # Per token and layer: 2 (2 h^2 + 2 h kv + 3 h f) + 4 s h = 2 (32768 + 32768 + 135168) + 4 * 5 * 128.
    per_token_layer = 401408 + 2560
    assert forward_flops(m, tokens=10, seq_len=5, head_rows=3) == 10 * 4 * per_token_layer + 3 * 2 * 128 * 1000
    # A step: 2 policy rows (fwd + bwd: 3 forwards) and 1 reference row (1 forward), each with its own positions.
    positions = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    mb = SimpleNamespace(ids=torch.zeros(3, 5, dtype=torch.long), positions=positions, n_policy=2)
    policy = 10 * 4 * per_token_layer + 3 * 2 * 128 * 1000
    reference = 5 * 4 * per_token_layer + 3 * 2 * 128 * 1000
    assert step_flops(m, mb) == 3 * policy + reference
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("cpu") is None and peak_flops(None) is None
