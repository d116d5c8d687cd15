"""The state-dict adapter between canonical (dense, HF-shaped) tensors and megatron-core TP/PP shards.

Three transforms make the megatron layout differ from a per-tensor slice of the HF one:
- QKV is one column-parallel weight, interleaved per query group: [q(heads/groups) k v | q k v | ...], so a TP
  rank owns whole query groups (biases likewise);
- SwiGLU's fc1 is [gate_r; up_r] per TP rank, not [gate; up] globally;
- embedding and head rows are padded to ``cfg.padded_vocab_size(tp)`` (zeros) before the vocab split.
Pipeline stage ``r`` holds layers ``layer_range(...)`` renumbered from 0, the embedding on the first stage and
final norm + head on the last.

A mixture-of-experts layer (``models.arch.is_moe_layer``; TP = 1 only, ``config.check_layout``) replaces the MLP's
fc1/fc2 by ``mlp.router.weight`` (+ the ``mlp.router.expert_bias`` buffer), ``mlp.experts.local_experts.{e}.``
fc1 = [gate_e; up_e] and fc2 = down_e for each expert (megatron-core's SequentialMLP), and
``mlp.shared_experts.linear_fc{1,2}`` likewise for the shared expert; ``qk_norm`` adds
``self_attention.{q,k}_layernorm.weight`` (one per-head RMSNorm weight shared by all heads).

``rank_tensor`` builds one parameter of one rank from row/column blocks of the canonical tensors, so a reader
that streams blocks from disk never holds more than that rank's share; ``shard`` applies it to tensors in
memory (meta tensors included: shape planning).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from mdu_dist.config import ModelConfig, check_layout
from mdu_dist.models.arch import is_moe_layer

EMBED = "embedding.word_embeddings.weight"
HEAD = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"

# read(canonical name, rows, cols) -> that block of the canonical tensor
Reader = Callable[[str, "slice | None", "slice | None"], Tensor]


def layer_range(num_layers: int, pp: int, pp_rank: int) -> range:
    per_stage = num_layers // pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def _layer_parameters(cfg: ModelConfig, i: int) -> list[str]:
    names = ["input_layernorm.weight", "self_attention.linear_qkv.weight"]
    names += ["self_attention.linear_qkv.bias"] if cfg.qkv_bias else []
    names += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"] if cfg.qk_norm else []
    names += ["self_attention.linear_proj.weight", "pre_mlp_layernorm.weight"]
    if not is_moe_layer(cfg, i):
        return names + ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    names += ["mlp.router.weight"] + (["mlp.router.expert_bias"] if cfg.moe_expert_bias else [])
    names += [f"mlp.experts.local_experts.{e}.linear_fc{k}.weight" for e in range(cfg.moe_num_experts) for k in (1, 2)]
    shared = cfg.moe_shared_ffn_hidden_size
    return names + ([f"mlp.shared_experts.linear_fc{k}.weight" for k in (1, 2)] if shared else [])


def stage_parameter_names(cfg: ModelConfig, pp: int = 1, pp_rank: int = 0) -> list[str]:
    """The GPTModel state-dict names of pipeline stage ``pp_rank`` (without megatron's ``_extra_state``)."""
    names = [EMBED] if pp_rank == 0 else []
    names += [f"decoder.layers.{j}.{p}" for j, i in enumerate(layer_range(cfg.num_layers, pp, pp_rank))
              for p in _layer_parameters(cfg, i)]
    return names + ([FINAL_NORM, HEAD] if pp_rank == pp - 1 else [])


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
    """Parameter ``name`` (a GPTModel state-dict name) of rank (tp_rank, pp_rank), read block by block."""
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
    whole = {"self_attention.q_layernorm.weight": "q_norm", "self_attention.k_layernorm.weight": "k_norm",
             "mlp.router.weight": "router", "mlp.router.expert_bias": "expert_bias",
             "mlp.shared_experts.linear_fc2.weight": "shared_down"}
    if part in whole:
        return read(c + whole[part], None, None)
    if part == "mlp.shared_experts.linear_fc1.weight":
        return torch.cat([read(c + "shared_gate", None, None), read(c + "shared_up", None, None)])
    expert = re.fullmatch(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight", part)
    if expert is not None:
        e = f"{c}experts.{expert.group(1)}."
        if expert.group(2) == "2":
            return read(e + "down", None, None)
        return torch.cat([read(e + "gate", None, None), read(e + "up", None, None)])
    raise KeyError(f"{name}: not a parameter of a {cfg.arch} stage")


def shard(cfg: ModelConfig, canonical: dict[str, Tensor], tp: int, tp_rank: int,
          pp: int = 1, pp_rank: int = 0) -> dict[str, Tensor]:
    """This rank's megatron-core GPTModel state dict (names relative to the GPTModel) from canonical tensors."""

    def read(name: str, rows: slice | None, cols: slice | None) -> Tensor:
        t = canonical[name]
        t = t if rows is None else t[rows]
        return t if cols is None else t[:, cols]

    return {n: rank_tensor(cfg, n, read, tp, tp_rank, pp, pp_rank) for n in stage_parameter_names(cfg, pp, pp_rank)}


def load_shard(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into a GPTModel, refusing any missing or unexpected tensor and any shape mismatch."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"megatron state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: expected shape {tuple(own[name].shape)}, got {tuple(tensor.shape)}")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(state[name])
