"""Where each canonical tensor lives in a megatron-core dist checkpoint, and in one rank's stage.

megatron-core's ``sharded_state_dict`` describes every parameter as a slice of a *global* tensor that does
not depend on the TP/PP layout (that is what lets dist_checkpointing reshard):

    embedding.word_embeddings.weight                             [V_pad, h]   embed, zero rows past V
    decoder.layers.self_attention.linear_qkv.layer_norm_weight   [L, h]       attn_norm
    decoder.layers.self_attention.linear_qkv.weight (.bias)      [L, qkv, h]  [q_g; k_g; v_g] per query group
    decoder.layers.self_attention.linear_proj.weight             [L, h, q]    o
    decoder.layers.mlp.linear_fc1.layer_norm_weight              [L, h]       mlp_norm
    decoder.layers.mlp.linear_fc1.weight                         [L, 2f, h]   [gate; up] (global order)
    decoder.layers.mlp.linear_fc2.weight                         [L, h, f]    down
    decoder.final_layernorm.weight                               [h]          final_norm
    output_layer.weight                                          [V_pad, h]   lm_head, zero rows past V

(layers stacked on a leading axis; the norms take the names of the TE-fused layers they would be part of;
megatron's SwiGLU factory stores the TP-local [gate_r; up_r] halves at their global gate/up rows; V_pad is
``padded_vocab_size(tp)`` of the layout that saved it). ``canonical_layer`` inverts the global layout for
one layer; one rank's parameters come from ``mdu_dist.models.mcore_layout.rank_tensor``.

A mixture-of-experts model's layers differ (dense first layers), so megatron-core stores each layer apart under
its global index, without the layer axis (``decoder.layers.{i}.self_attention.linear_qkv.weight`` [qkv, h], ...;
``stored_key``), and adds per MoE layer:

    decoder.layers.{i}.self_attention.{q,k}_layernorm.weight      [hd]         q_norm, k_norm (also with qk_norm
                                                                               in a dense model, stacked then)
    decoder.layers.{i}.mlp.router.weight                          [E, h]       router
    decoder.layers.{i}.mlp.router.expert_bias                     [E]          expert_bias (fp32 buffer)
    decoder.layers.{i}.mlp.experts.experts.linear_fc1.weight      [E, 2f_e, h] [gate_e; up_e] per expert
    decoder.layers.{i}.mlp.experts.experts.linear_fc2.weight      [E, h, f_e]  down_e
    decoder.layers.{i}.mlp.shared_experts.linear_fc1.weight       [2f_s, h]    [shared_gate; shared_up]
    decoder.layers.{i}.mlp.shared_experts.linear_fc2.weight       [h, f_s]     shared_down
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from mdu_dist.config import ModelConfig
from mdu_dist.models.arch import is_moe_layer
from mdu_dist.models.mcore_layout import EMBED, FINAL_NORM, HEAD

_L = "decoder.layers."
ATTN_NORM = _L + "self_attention.linear_qkv.layer_norm_weight"
QKV = _L + "self_attention.linear_qkv.weight"
QKV_BIAS = _L + "self_attention.linear_qkv.bias"
PROJ = _L + "self_attention.linear_proj.weight"
MLP_NORM = _L + "mlp.linear_fc1.layer_norm_weight"
FC1 = _L + "mlp.linear_fc1.weight"
FC2 = _L + "mlp.linear_fc2.weight"
Q_NORM = _L + "self_attention.q_layernorm.weight"
K_NORM = _L + "self_attention.k_layernorm.weight"
ROUTER = _L + "mlp.router.weight"
EXPERT_BIAS = _L + "mlp.router.expert_bias"
EXPERTS_FC1 = _L + "mlp.experts.experts.linear_fc1.weight"
EXPERTS_FC2 = _L + "mlp.experts.experts.linear_fc2.weight"
SHARED_FC1 = _L + "mlp.shared_experts.linear_fc1.weight"
SHARED_FC2 = _L + "mlp.shared_experts.linear_fc2.weight"


def layer_keys(cfg: ModelConfig, i: int = 0) -> list[str]:
    """The entries of layer ``i``, by their layer-stacked names (``stored_key`` says where each is stored)."""
    keys = [ATTN_NORM, QKV] + ([QKV_BIAS] if cfg.qkv_bias else []) + ([Q_NORM, K_NORM] if cfg.qk_norm else [])
    keys += [PROJ, MLP_NORM]
    if not is_moe_layer(cfg, i):
        return keys + [FC1, FC2]
    keys += [ROUTER] + ([EXPERT_BIAS] if cfg.moe_expert_bias else []) + [EXPERTS_FC1, EXPERTS_FC2]
    return keys + ([SHARED_FC1, SHARED_FC2] if cfg.moe_shared_ffn_hidden_size else [])


def stored_key(cfg: ModelConfig, key: str, i: int) -> tuple[str, int | None]:
    """(global key, index on its leading layer axis, or None) of entry ``key`` of layer ``i``."""
    if cfg.is_moe:  # megatron-core's non-homogeneous layers: one key per layer, named by its global index
        return key.replace(_L, f"{_L}{i}.", 1), None
    return key, i


def global_shapes(cfg: ModelConfig, tp: int) -> dict[str, tuple[int, ...]]:
    """Global key -> global shape in a dist checkpoint saved at tensor-parallel size ``tp``."""
    h, f, hd, n = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim, cfg.num_layers
    q_out = cfg.num_attention_heads * hd
    qkv = q_out + 2 * cfg.num_query_groups * hd
    e, fe, fs = cfg.moe_num_experts, cfg.moe_ffn_hidden_size, cfg.moe_shared_ffn_hidden_size
    per_layer = {ATTN_NORM: (h,), QKV: (qkv, h), QKV_BIAS: (qkv,), Q_NORM: (hd,), K_NORM: (hd,), PROJ: (h, q_out),
                 MLP_NORM: (h,), FC1: (2 * f, h), FC2: (h, f), ROUTER: (e, h), EXPERT_BIAS: (e,),
                 EXPERTS_FC1: (e, 2 * fe, h), EXPERTS_FC2: (e, h, fe), SHARED_FC1: (2 * fs, h), SHARED_FC2: (h, fs)}
    shapes = {EMBED: (cfg.padded_vocab_size(tp), h)}
    if cfg.is_moe:
        shapes.update({stored_key(cfg, k, i)[0]: per_layer[k] for i in range(n) for k in layer_keys(cfg, i)})
    else:
        shapes.update({k: (n, *per_layer[k]) for k in layer_keys(cfg)})
    shapes.update({FINAL_NORM: (h,), HEAD: (cfg.padded_vocab_size(tp), h)})
    return shapes


def canonical_layer(cfg: ModelConfig, i: int, layer: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Canonical tensors of layer ``i`` from its entries (``layer_keys`` names, layer axis dropped)."""
    c, hd, groups = f"layers.{i}.", cfg.head_dim, cfg.num_query_groups
    per_group = cfg.num_attention_heads // groups * hd
    out = {c + "attn_norm": layer[ATTN_NORM]}
    for key, suffix in ((QKV, ""), (QKV_BIAS, "_bias")):
        if key == QKV_BIAS and not cfg.qkv_bias:
            continue
        fused = layer[key].reshape(groups, per_group + 2 * hd, *layer[key].shape[1:])
        for name, part in zip("qkv", fused.split([per_group, hd, hd], dim=1)):
            out[c + name + suffix] = part.reshape(-1, *part.shape[2:])
    if cfg.qk_norm:
        out.update({c + "q_norm": layer[Q_NORM], c + "k_norm": layer[K_NORM]})
    out.update({c + "o": layer[PROJ], c + "mlp_norm": layer[MLP_NORM]})
    if not is_moe_layer(cfg, i):
        gate, up = layer[FC1].chunk(2)
        out.update({c + "gate": gate, c + "up": up, c + "down": layer[FC2]})
        return out
    out[c + "router"] = layer[ROUTER]
    if cfg.moe_expert_bias:
        out[c + "expert_bias"] = layer[EXPERT_BIAS]
    for e in range(cfg.moe_num_experts):
        gate, up = layer[EXPERTS_FC1][e].chunk(2)
        out.update({f"{c}experts.{e}.gate": gate, f"{c}experts.{e}.up": up, f"{c}experts.{e}.down": layer[EXPERTS_FC2][e]})
    if cfg.moe_shared_ffn_hidden_size:
        gate, up = layer[SHARED_FC1].chunk(2)
        out.update({c + "shared_gate": gate, c + "shared_up": up, c + "shared_down": layer[SHARED_FC2]})
    return out
