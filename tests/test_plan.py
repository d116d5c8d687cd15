"""``mdu-dist plan`` against parameter and byte counts written out by hand from the model shapes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from mdu_dist.config import load_config
from mdu_dist.plan import GIB, Workload, activation_bytes, layouts, memory_row, stage_parameters, workload

LLADA_8B = load_config("configs/llada_8b.yaml").model
DREAM_7B = load_config("configs/dream_7b.yaml").model


def test_llada_8b_tp2_parameters_per_rank():
    h, f, v = 4096, 12288, 126464  # 126464 = 494 x 256: no padding at TP=2
    layer = (2 * h  # attn_norm, mlp_norm (replicated)
             + 3 * (h // 2) * h  # q, k, v rows of 16 of the 32 heads (MHA)
             + h * (h // 2)  # linear_proj columns
             + 2 * (f // 2) * h  # [gate_r; up_r]
             + h * (f // 2))  # fc2 columns
    total = 32 * layer + 2 * (v // 2) * h + h  # embedding and head halves, final norm
    assert stage_parameters(LLADA_8B, 2, 1) == [total] == [4_007_923_712]


def test_llada_8b_pp2_stages_hold_embedding_and_head_apart():
    h, f, v = 4096, 12288, 126464
    layer = 2 * h + 4 * h * h + 3 * f * h
    assert stage_parameters(LLADA_8B, 1, 2) == [v * h + 16 * layer, 16 * layer + h + v * h]


def test_dream_7b_tp4_gqa_biases():
    h, f, hd, v = 3584, 18944, 128, 152064  # 152064 = 297 x 512: no padding at TP=4
    qkv_rows = (28 // 4) * hd + 2 * (4 // 4) * hd  # 7 query heads and 1 KV group per rank
    layer = 2 * h + qkv_rows * h + qkv_rows + h * (7 * hd) + 2 * (f // 4) * h + h * (f // 4)
    assert stage_parameters(DREAM_7B, 4, 1) == [28 * layer + 2 * (v // 4) * h + h]


def test_vocabulary_padding_is_counted():
    # 126464 is not a multiple of 128 x 8 = 1024: TP=8 pads it to 126976 rows (124 x 1024).
    cfg = load_config("configs/llada_70b.yaml").model
    h, f, kv = 8192, 28672, 8 * 128
    layer = 2 * h + (h // 8 + 2 * kv // 8) * h + h * (h // 8) + 3 * (f // 8) * h
    assert stage_parameters(cfg, 8, 4) == [126976 // 8 * h + 20 * layer, 20 * layer, 20 * layer,
                                           20 * layer + h + 126976 // 8 * h]


# Per token and layer at TP=2, in bf16 elements: 4h + (2h + 2kv + 4f + S) / 2 with 4h = 16384 and
# 2h + 2kv + 4f = 8192 + 8192 + 49152; S = a s = 32 x 1024 (local), 2a = 64 (sdpa), 0 (recomputed).
PER_TOKEN = {"local": 16384 + (65536 + 32768) // 2, "sdpa": 16384 + (65536 + 64) // 2, "selective": 16384 + 65536 // 2}


@pytest.mark.parametrize("attention,recompute", [("local", "none"), ("sdpa", "none"), ("local", "selective"),
                                                 ("sdpa", "selective"), ("sdpa", "full"), ("local", "full")])
def test_activation_formula_by_hand(attention, recompute):
    cfg = dataclasses.replace(LLADA_8B, attention=attention)
    w = Workload(micro_batch_size=1, seq_len=1024, masked_fraction=0.5, policy_passes=2, reference_passes=1,
                 recompute=recompute)
    layer = 2 * 2048 * PER_TOKEN[attention]  # bf16 bytes of one layer over two policy passes of 1024 tokens
    if recompute == "selective":
        layers = 32 * 2 * 2048 * PER_TOKEN["selective"]
    elif recompute == "full":  # every layer's input [2048 tokens, h], and one layer being recomputed
        layers = 32 * 2 * 2048 * 4096 + layer
    else:
        layers = 32 * layer  # all 32 layers (PP=1)
    anchor = 1024 * 2 * PER_TOKEN[attention]  # one layer's transient of the no-grad pass (never recomputed)
    n, v_local = 512, 63232
    chunk = 132  # rows of 63232 fp32 values in 32 MiB: 2**25 // (4 * 63232)
    logits = 3 * n * v_local * 2 + 2 * n * v_local * 2 + 3 * chunk * v_local * 4
    assert activation_bytes(cfg, 2, 1, 0, w) == layers + anchor + logits


def test_block_layout_doubles_the_positions_not_the_logits():
    from mdu_dist.plan import logits_bytes

    cfg = dataclasses.replace(LLADA_8B, attention="local")
    w = Workload(micro_batch_size=1, seq_len=1024, masked_fraction=0.5, policy_passes=2, reference_passes=1,
                 copies=2)
    # [x_t ; x_0]: 2048 positions per row, local attention's probabilities a x 2048 per position.
    per_position = PER_TOKEN["local"] + 32 * 1024 // 2  # PER_TOKEN's a s / t term for s = 2048 instead of 1024
    layers = 32 * 2 * 2 * 2048 * per_position
    anchor = 2 * 2048 * per_position
    assert logits_bytes(cfg, 2, w) == logits_bytes(cfg, 2, dataclasses.replace(w, copies=1))
    assert activation_bytes(cfg, 2, 1, 0, w) == layers + anchor + logits_bytes(cfg, 2, w)


def test_plan_of_a_block_layout_config_counts_two_copies(capsys):
    from mdu_dist.cli import main

    assert main(["plan", "--config", "configs/llada2_mini.yaml", "--gpus", "8"]) == 0
    assert "(block layout: 256 positions per row, [x_t ; x_0])" in capsys.readouterr().out


def test_recomputation_shrinks_the_activation_term():
    def act(attention, recompute):
        cfg = dataclasses.replace(LLADA_8B, attention=attention)
        return activation_bytes(cfg, 2, 1, 0, Workload(1, 2048, 0.5, 2, 1, recompute))

    for attention in ("local", "sdpa"):
        assert act(attention, "full") < act(attention, "selective") < act(attention, "none")
    assert act("sdpa", "none") < 0.7 * act("local", "none")  # the [s, s] probabilities dominate at 2048 tokens
    cfg = load_config("configs/llada_8b.yaml", ["train.recompute=full"])
    assert workload(cfg, "unlearn", 1, 512, 0.5).recompute == "full"


def test_zero_stages_and_offload_by_hand():
    w = Workload(1, 1024, 0.5, 2, 1)
    p = 4_007_923_712
    act = activation_bytes(LLADA_8B, 2, 1, 0, w)
    z1 = memory_row(LLADA_8B, 2, 1, 4, 1, "none", w, 80)
    assert (z1.params, z1.grads, z1.optimizer, z1.reference) == (2 * p, 2 * p, 12 * p // 4, 2 * p)
    z2 = memory_row(LLADA_8B, 2, 1, 4, 2, "none", w, 80)
    assert (z2.params, z2.grads) == (2 * p, 2 * p // 4)
    z3 = memory_row(LLADA_8B, 2, 1, 4, 3, "cpu", w, 80)
    assert (z3.params, z3.grads, z3.optimizer, z3.host_optimizer) == (2 * p // 4, 2 * p // 4, 0, 12 * p // 4)
    assert z3.total == 2 * p // 4 + 2 * p // 4 + 2 * p + act
    # The same layout fits in 80 GiB with room to spare, not in 20 GiB without offload.
    assert z1.fits and not memory_row(LLADA_8B, 2, 1, 4, 1, "none", w, 20).fits
    assert z1.total / GIB == pytest.approx((6 * p + 3 * p + act) / GIB)


def test_layouts_respect_heads_kv_heads_and_layers():
    got = layouts(DREAM_7B, 8)
    assert {tp for tp, _, _ in got} == {1, 2, 4}  # 4 KV heads: no TP=8
    assert all(28 % pp == 0 and tp * pp * dp == 8 for tp, pp, dp in got)


def test_workload_counts_passes_from_the_objective():
    cfg = load_config("configs/llada_8b.yaml")
    mdu = workload(cfg, "unlearn", 1, 512, 0.5)
    assert (mdu.policy_passes, mdu.reference_passes) == (2, 1)  # forget + retain, anchor
    uniform = workload(load_config("configs/llada_8b.yaml", ["method.tau=0"]), "unlearn", 1, 512, 0.5)
    assert (uniform.policy_passes, uniform.reference_passes) == (2, 0)  # tau = 0: no anchor, no theta_0
    assert memory_row(LLADA_8B, 2, 1, 4, 1, "none", uniform, 80).reference == 0
    assert (workload(cfg, "finetune", 1, 512, 0.5).policy_passes, workload(cfg, "finetune", 1, 512, 0.5)
            .reference_passes) == (1, 0)


def test_cli_prints_a_table_for_the_70b_config(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mdu_dist.cli", "plan", "--config", "configs/llada_70b.yaml",
                          "--gpus", "16", "--gpu-mem", "80", "--seq-len", "1024", "--json", str(tmp_path / "p.json")],
                         capture_output=True, text=True, check=True).stdout
    assert "| TP | PP | DP | ZeRO |" in out and "layouts fit in 80 GiB" in out
    assert (tmp_path / "p.json").exists()


def test_lora_counts_adapters_and_their_adam_state_only():
    """LLaDA-8B at TP=2, rank 16 on all four targets; the adapter count written out from the shapes."""
    h, f, r = 4096, 12288, 16
    per_layer = (r * (h + 3 * h // 2)  # qkv: A [r, h] replicated, B rows of 16 of 32 heads (q, k, v)
                 + r * (h // 2 + h)  # attn-out: A columns split, B [h, r] replicated
                 + r * (h + 2 * f // 2)  # mlp-in: A replicated, B [gate_r; up_r] rows
                 + r * (f // 2 + h))  # mlp-out: A columns split, B replicated
    lora = load_config("configs/llada_8b.yaml", ["lora.rank=16"]).lora
    w = Workload(1, 128, 0.5, 2, 1)
    p = stage_parameters(LLADA_8B, 2, 1)[0]
    row = memory_row(LLADA_8B, 2, 1, 4, 2, "none", w, 80, lora=lora)
    assert (row.params, row.grads, row.optimizer, row.reference) == (
        2 * (p + 32 * per_layer), 2 * 32 * per_layer // 4, 12 * 32 * per_layer // 4, 0)
    copy = dataclasses.replace(lora, reference="copy")
    assert memory_row(LLADA_8B, 2, 1, 4, 2, "none", w, 80, lora=copy).reference == 2 * p
    full = memory_row(LLADA_8B, 2, 1, 4, 2, "none", w, 80)
    assert row.activations == full.activations and row.total < full.total / 2


def test_plan_with_lora_offers_no_zero_3():
    from mdu_dist.plan import plan

    cfg = load_config("configs/llada_8b.yaml", ["lora.rank=16"])
    assert {r.zero for r in plan(cfg, 1, 40, Workload(1, 128, 0.5, 2, 1))} == {1, 2}
