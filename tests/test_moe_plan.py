"""`mdu-dist info` and `mdu-dist plan` on the mixture-of-experts backbones.

The parameter counts of the real configs are worked out here from their config.json values (LLaDA2.0-mini /
-flash: inclusionAI's config.json; LLaDA-MoE-7B-A1B: its modeling code and published config values), not from
mdu_dist's own shape tables. The plan's MoE activation term is checked by hand for one layer.
"""

from __future__ import annotations

import re

import pytest

from mdu_dist.cli import main


def _count(v, h, layers, heads, kv, hd, dense_f, dense_layers, experts, topk, fe, shared):
    """(total, active) parameters: untied embedding and head, final norm; per layer q/k/v/o, per-head q/k norm
    weights and two RMSNorms; a dense SwiGLU or a router (+ fp32 expert bias with a sigmoid router), the routed
    experts and the shared expert."""
    attention = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 2 * hd + 2 * h
    bias = experts if shared else 0  # LLaDA2 (the one with a shared expert here) has the expert-bias buffer
    moe = experts * h + bias + experts * 3 * h * fe + 3 * h * shared
    total = 2 * v * h + h + layers * attention + dense_layers * 3 * h * dense_f + (layers - dense_layers) * moe
    idle = (layers - dense_layers) * (experts - topk) * 3 * h * fe
    return total, total - idle


REAL = {
    # config.json: num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, head_dim,
    # intermediate_size, first_k_dense_replace, num_experts, num_experts_per_tok, moe_intermediate_size,
    # num_shared_experts x moe_intermediate_size; vocab_size 157184.
    "llada2_mini": _count(157184, 2048, 20, 16, 4, 128, 5120, 1, 256, 8, 512, 512),
    "llada2_flash": _count(157184, 4096, 32, 32, 4, 128, 9216, 1, 256, 8, 1024, 1024),
    # 16 x 2048, 16 heads (MHA) of 128, 64 experts top-8 of 1024, no dense layer, no shared expert.
    "llada_moe_7b": _count(157184, 2048, 16, 16, 16, 128, 8192, 0, 64, 8, 1024, 0),
}


@pytest.mark.parametrize("name", list(REAL))
def test_info_prints_total_and_active_parameters_of_the_real_configs(name, capsys):
    total, active = REAL[name]
    assert main(["info", "--config", f"configs/{name}.yaml"]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {total:,} " in out
    assert f"active parameters per token: {active:,} " in out
    expected = {"llada2_mini": (16.26, 1.43), "llada2_flash": (102.89, 6.15), "llada_moe_7b": (7.36, 1.72)}[name]
    assert (round(total / 1e9, 2), round(active / 1e9, 2)) == expected  # the sizes the model cards state, roughly


def test_llada_moe_counts_against_its_published_sizes(capsys):
    """LLaDA-MoE-7B-A1B's model card says 7B parameters, 1.4B active; its Base repository lists three bf16
    shards of 5 GB, 5 GB and 4.72 GB (shown to two decimals; a shard is at most 5e9 bytes, save_pretrained's
    default). The count above matches them (an untied head and 157184 rows; a tied one would be 14.07 GB), and "1.4B active" is the active count without the
    input embedding, a row lookup: 1.398e9 (1.720e9 with it; 1.076e9, the "A1B", without the head either)."""
    total, active = REAL["llada_moe_7b"]
    lookup = 157184 * 2048
    shown = (2 * 4.995e9 + 4.715e9, 2 * 5e9 + 4.725e9 + 1e6)  # + the three safetensors headers, under 1 MB
    assert shown[0] <= 2 * total <= shown[1]
    assert not shown[0] <= 2 * (total - lookup) <= shown[1]
    assert (round((active - lookup) / 1e9, 1), round((total - lookup) / 1e9), round((active - 2 * lookup) / 1e9)) \
        == (1.4, 7, 1)
    assert main(["info", "--config", "configs/llada_moe_7b.yaml"]) == 0
    assert (f"without the input embedding (157184 x 2048): {total - lookup:,} ({(total - lookup) / 1e9:.3f}e9) in "
            f"all, {active - lookup:,} (1.398e9) active") in capsys.readouterr().out


def test_moe_activation_term_by_hand():
    from mdu_dist.config import load_config
    from mdu_dist.plan import layer_activation_bytes

    m = load_config("configs/llada2_mini.yaml").model
    # Dense layer 0 as for LLaDA; MoE layer: bf16 x n x [4h + 2h + 2kv + 2a + k (4 f_e + h) + 4 f_s] + 8 n E.
    per_token = 4 * 2048 + 2 * 2048 + 2 * 512 + 2 * 16 + 8 * (4 * 512 + 2048) + 4 * 512
    assert layer_activation_bytes(m, 1, 1000, 512, layer=1) == 2 * 1000 * per_token + 8 * 1000 * 256
    dense = 4 * 2048 + 2 * 2048 + 2 * 512 + 4 * 5120 + 2 * 16
    assert layer_activation_bytes(m, 1, 1000, 512, layer=0) == 2 * 1000 * dense


def test_plan_covers_moe_with_experts_share_and_nodes(capsys):
    assert main(["plan", "--config", "configs/llada2_mini.yaml", "--gpus", "8", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if re.match(r"\| \d", l)]
    assert rows and all(l.startswith("| 1 |") for l in rows), "MoE layouts must all be TP=1"
    assert {l.split(" | ")[1] for l in rows} == {"1", "2", "4"}  # PP divides 20 layers and 8 GPUs
    share = 3 * 2048 * 512 * 256 * 19 / REAL["llada2_mini"][0]
    assert f"routed experts: 15.30e9 of 16.26e9 parameters ({share:.1%})" in out
    assert re.search(r"optimizer offload none: 1 node\(s\) of 8 x 80 GiB", out)


def test_nodes_needed_is_the_fewest():
    from mdu_dist.config import load_config
    from mdu_dist.plan import Workload, layouts, memory_row, nodes_needed

    cfg = load_config("configs/llada2_flash.yaml")
    w = Workload(micro_batch_size=1, seq_len=256, masked_fraction=0.5, policy_passes=2, reference_passes=1)
    found = {offload: nodes_needed(cfg, w, 8, 80.0, offload) for offload in ("none", "cpu")}
    assert found["cpu"][0] <= found["none"][0]
    for offload, (nodes, row) in found.items():
        assert row.fits and row.tp * row.pp * row.dp == 8 * nodes
        if nodes > 1:  # nothing fits on one node fewer
            assert not any(memory_row(cfg.model, tp, pp, dp, zero, offload, w, 80.0).fits
                           for tp, pp, dp in layouts(cfg.model, 8 * (nodes - 1)) for zero in ((1, 2, 3) if pp == 1 else (1,)))
