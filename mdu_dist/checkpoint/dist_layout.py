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
``padded_vocab_size(tp)`` of the layout that saved it). ``rank_tensor`` computes one rank's parameter from
row/column slices of the canonical tensors (``mdu_dist.models.mcore_layout.shard`` computes the same from
whole tensors); ``canonical_layer`` inverts the global layout for one layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from mdu_dist.config import ModelConfig, check_layout
from mdu_dist.models.mcore_layout import layer_range

EMBED = "embedding.word_embeddings.weight"
HEAD = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
_L = "decoder.layers."
ATTN_NORM = _L + "self_attention.linear_qkv.layer_norm_weight"
QKV = _L + "self_attention.linear_qkv.weight"
QKV_BIAS = _L + "self_attention.linear_qkv.bias"
PROJ = _L + "self_attention.linear_proj.weight"
MLP_NORM = _L + "mlp.linear_fc1.layer_norm_weight"
FC1 = _L + "mlp.linear_fc1.weight"
FC2 = _L + "mlp.linear_fc2.weight"

# read(canonical name, rows, cols) -> that block of the canonical tensor (a fresh tensor)
Reader = Callable[[str, "slice | None", "slice | None"], Tensor]


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


def _interleave_qkv(q: Tensor, k: Tensor, v: Tensor, groups: int, hd: int) -> Tensor:
    tail = q.shape[1:]
    return torch.cat([q.reshape(groups, -1, *tail), k.reshape(groups, hd, *tail), v.reshape(groups, hd, *tail)],
                     dim=1).reshape(-1, *tail)


def _vocab_rows(cfg: ModelConfig, read: Reader, canonical: str, tp: int, tp_rank: int) -> Tensor:
    per_rank = cfg.padded_vocab_size(tp) // tp
    lo, hi = tp_rank * per_rank, (tp_rank + 1) * per_rank
    real = read(canonical, slice(min(lo, cfg.vocab_size), min(hi, cfg.vocab_size)), None)
    if real.shape[0] == per_rank:
        return real
    return torch.cat([real, real.new_zeros(per_rank - real.shape[0], *real.shape[1:])])


def rank_tensor(cfg: ModelConfig, name: str, read: Reader, tp: int, tp_rank: int, pp: int = 1,
                pp_rank: int = 0) -> Tensor:
    """Parameter ``name`` (a GPTModel state-dict name) of rank (tp_rank, pp_rank), read slice by slice.

    Equal to ``mcore_layout.shard(cfg, canonical, tp, tp_rank, pp, pp_rank)[name]``, but only the rows or
    columns this rank owns are read: a rank never holds more than its own parameters plus one slice.
    """
    check_layout(cfg, tp, pp)
    if name == EMBED and pp_rank == 0:
        return _vocab_rows(cfg, read, "embed", tp, tp_rank)
    if name == HEAD and pp_rank == pp - 1:
        return _vocab_rows(cfg, read, "lm_head", tp, tp_rank)
    if name == FINAL_NORM and pp_rank == pp - 1:
        return read("final_norm", None, None)
    match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
    layers = layer_range(cfg.num_layers, pp, pp_rank)
    if match is None or int(match.group(1)) >= len(layers):
        raise KeyError(f"{name} is not a parameter of pipeline stage {pp_rank} of {pp}")
    c, part = f"layers.{layers[int(match.group(1))]}.", match.group(2)

    def rows(canonical: str, per_rank: int) -> Tensor:
        return read(c + canonical, slice(tp_rank * per_rank, (tp_rank + 1) * per_rank), None)

    def cols(canonical: str, per_rank: int) -> Tensor:
        return read(c + canonical, None, slice(tp_rank * per_rank, (tp_rank + 1) * per_rank))

    hd, groups = cfg.head_dim, cfg.num_query_groups // tp
    q_rows = cfg.num_attention_heads // tp * hd
    if part == "input_layernorm.weight":
        return read(c + "attn_norm", None, None)
    if part == "pre_mlp_layernorm.weight":
        return read(c + "mlp_norm", None, None)
    if part in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        suffix = "_bias" if part.endswith("bias") else ""
        return _interleave_qkv(rows("q" + suffix, q_rows), rows("k" + suffix, groups * hd),
                               rows("v" + suffix, groups * hd), groups, hd)
    if part == "self_attention.linear_proj.weight":
        return cols("o", q_rows)
    if part == "mlp.linear_fc1.weight":
        f = cfg.ffn_hidden_size // tp
        return torch.cat([rows("gate", f), rows("up", f)])
    if part == "mlp.linear_fc2.weight":
        return cols("down", cfg.ffn_hidden_size // tp)
    raise KeyError(f"{name}: not a parameter of a {cfg.arch} stage")


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
