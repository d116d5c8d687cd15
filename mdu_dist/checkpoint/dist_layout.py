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
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from mdu_dist.config import ModelConfig
from mdu_dist.models.mcore_layout import EMBED, FINAL_NORM, HEAD

_L = "decoder.layers."
ATTN_NORM = _L + "self_attention.linear_qkv.layer_norm_weight"
QKV = _L + "self_attention.linear_qkv.weight"
QKV_BIAS = _L + "self_attention.linear_qkv.bias"
PROJ = _L + "self_attention.linear_proj.weight"
MLP_NORM = _L + "mlp.linear_fc1.layer_norm_weight"
FC1 = _L + "mlp.linear_fc1.weight"
FC2 = _L + "mlp.linear_fc2.weight"



def layer_keys(cfg: ModelConfig) -> list[str]:
    keys = [ATTN_NORM, QKV] + ([QKV_BIAS] if cfg.qkv_bias else []) + [PROJ, MLP_NORM, FC1, FC2]
    return keys


def global_shapes(cfg: ModelConfig, tp: int) -> dict[str, tuple[int, ...]]:
    """Global key -> global shape in a dist checkpoint saved at tensor-parallel size ``tp``."""
    h, f, hd, n = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim, cfg.num_layers
    q_out = cfg.num_attention_heads * hd
    qkv = q_out + 2 * cfg.num_query_groups * hd
    per_layer = {ATTN_NORM: (h,), QKV: (qkv, h), QKV_BIAS: (qkv,), PROJ: (h, q_out), MLP_NORM: (h,),
                 FC1: (2 * f, h), FC2: (h, f)}
    shapes = {EMBED: (cfg.padded_vocab_size(tp), h)}
    shapes.update({k: (n, *per_layer[k]) for k in layer_keys(cfg)})
    shapes.update({FINAL_NORM: (h,), HEAD: (cfg.padded_vocab_size(tp), h)})
    return shapes


def canonical_layer(cfg: ModelConfig, i: int, layer: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Canonical tensors of layer ``i`` from its slices (leading layer axis dropped) of the global keys."""
    c, hd, groups = f"layers.{i}.", cfg.head_dim, cfg.num_query_groups
    per_group = cfg.num_attention_heads // groups * hd
    out = {c + "attn_norm": layer[ATTN_NORM]}
    for key, suffix in ((QKV, ""), (QKV_BIAS, "_bias")):
        if key == QKV_BIAS and not cfg.qkv_bias:
            continue
        fused = layer[key].reshape(groups, per_group + 2 * hd, *layer[key].shape[1:])
        for name, part in zip("qkv", fused.split([per_group, hd, hd], dim=1)):
            out[c + name + suffix] = part.reshape(-1, *part.shape[2:])
    gate, up = layer[FC1].chunk(2)
    out.update({c + "o": layer[PROJ], c + "mlp_norm": layer[MLP_NORM], c + "gate": gate, c + "up": up,
                c + "down": layer[FC2]})
    return out
