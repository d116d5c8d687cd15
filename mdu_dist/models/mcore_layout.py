"""The state-dict adapter between canonical (dense, HF-shaped) tensors and megatron-core TP/PP shards.

Three transforms make the megatron layout differ from a per-tensor slice of the HF one:
- QKV is one column-parallel weight, interleaved per query group: [q(heads/groups) k v | q k v | ...], so a TP
  rank owns whole query groups (biases likewise);
- SwiGLU's fc1 is [gate_r; up_r] per TP rank, not [gate; up] globally;
- embedding and head rows are padded to ``cfg.padded_vocab_size(tp)`` (zeros) before the vocab split.
Pipeline stage ``r`` holds layers ``layer_range(...)`` renumbered from 0, the embedding on the first stage and
final norm + head on the last. Works on any tensors, meta ones included (shape planning).
"""

from __future__ import annotations

import torch

from mdu_dist.config import ModelConfig, check_layout


def layer_range(num_layers: int, pp: int, pp_rank: int) -> range:
    per_stage = num_layers // pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def _rows(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return t.chunk(tp, dim=0)[rank]


def _cols(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return t.chunk(tp, dim=1)[rank]


def _pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])


def _qkv(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    groups, hd = cfg.num_query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups * hd
    tail = q.shape[1:]
    fused = torch.cat([q.reshape(groups, per_group, *tail), k.reshape(groups, hd, *tail),
                       v.reshape(groups, hd, *tail)], dim=1)
    return _rows(fused, tp, rank).reshape(-1, *tail)


def _split_qkv(cfg: ModelConfig, fused_shards: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    groups, hd = cfg.num_query_groups, cfg.head_dim
    per_group = cfg.num_attention_heads // groups * hd
    fused = torch.cat(fused_shards).reshape(groups, per_group + 2 * hd, *fused_shards[0].shape[1:])
    q, k, v = fused.split([per_group, hd, hd], dim=1)
    return tuple(x.reshape(-1, *x.shape[2:]) for x in (q, k, v))


def shard(cfg: ModelConfig, canonical: dict[str, torch.Tensor], tp: int, tp_rank: int,
          pp: int = 1, pp_rank: int = 0) -> dict[str, torch.Tensor]:
    """This rank's megatron-core GPTModel state dict (names relative to the GPTModel) from canonical tensors."""
    check_layout(cfg, tp, pp)
    out: dict[str, torch.Tensor] = {}
    padded = cfg.padded_vocab_size(tp)
    if pp_rank == 0:
        out["embedding.word_embeddings.weight"] = _rows(_pad_vocab(canonical["embed"], padded), tp, tp_rank)
    for local, i in enumerate(layer_range(cfg.num_layers, pp, pp_rank)):
        c, m = f"layers.{i}.", f"decoder.layers.{local}."
        out[m + "input_layernorm.weight"] = canonical[c + "attn_norm"]
        out[m + "self_attention.linear_qkv.weight"] = _qkv(
            cfg, canonical[c + "q"], canonical[c + "k"], canonical[c + "v"], tp, tp_rank)
        if cfg.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = _qkv(
                cfg, canonical[c + "q_bias"], canonical[c + "k_bias"], canonical[c + "v_bias"], tp, tp_rank)
        out[m + "self_attention.linear_proj.weight"] = _cols(canonical[c + "o"], tp, tp_rank)
        out[m + "pre_mlp_layernorm.weight"] = canonical[c + "mlp_norm"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat(
            [_rows(canonical[c + "gate"], tp, tp_rank), _rows(canonical[c + "up"], tp, tp_rank)])
        out[m + "mlp.linear_fc2.weight"] = _cols(canonical[c + "down"], tp, tp_rank)
    if pp_rank == pp - 1:
        out["decoder.final_layernorm.weight"] = canonical["final_norm"]
        out["output_layer.weight"] = _rows(_pad_vocab(canonical["lm_head"], padded), tp, tp_rank)
    return out


def merge(cfg: ModelConfig, shards: dict[tuple[int, int], dict[str, torch.Tensor]], tp: int,
          pp: int = 1) -> dict[str, torch.Tensor]:
    """Inverse of ``shard``: canonical tensors from every rank's state dict, keyed by (pp_rank, tp_rank)."""
    missing = [(p, t) for p in range(pp) for t in range(tp) if (p, t) not in shards]
    if missing:
        raise ValueError(f"missing shards for (pp_rank, tp_rank) {missing}")

    def gather(pp_rank: int, name: str) -> list[torch.Tensor]:
        return [shards[(pp_rank, t)][name] for t in range(tp)]

    out: dict[str, torch.Tensor] = {}
    out["embed"] = torch.cat(gather(0, "embedding.word_embeddings.weight"))[: cfg.vocab_size]
    for p in range(pp):
        for local, i in enumerate(layer_range(cfg.num_layers, pp, p)):
            c, m = f"layers.{i}.", f"decoder.layers.{local}."
            out[c + "attn_norm"] = shards[(p, 0)][m + "input_layernorm.weight"]
            out[c + "q"], out[c + "k"], out[c + "v"] = _split_qkv(cfg, gather(p, m + "self_attention.linear_qkv.weight"))
            if cfg.qkv_bias:
                out[c + "q_bias"], out[c + "k_bias"], out[c + "v_bias"] = _split_qkv(
                    cfg, gather(p, m + "self_attention.linear_qkv.bias"))
            out[c + "o"] = torch.cat(gather(p, m + "self_attention.linear_proj.weight"), dim=1)
            out[c + "mlp_norm"] = shards[(p, 0)][m + "pre_mlp_layernorm.weight"]
            gate_up = [t.chunk(2) for t in gather(p, m + "mlp.linear_fc1.weight")]
            out[c + "gate"] = torch.cat([g for g, _ in gate_up])
            out[c + "up"] = torch.cat([u for _, u in gate_up])
            out[c + "down"] = torch.cat(gather(p, m + "mlp.linear_fc2.weight"), dim=1)
    out["final_norm"] = shards[(pp - 1, 0)]["decoder.final_layernorm.weight"]
    out["lm_head"] = torch.cat(gather(pp - 1, "output_layer.weight"))[: cfg.vocab_size]
    return out


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
