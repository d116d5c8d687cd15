"""Core attention for the megatron-core layer spec: ``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the [b, heads, s, s] scores in the model dtype and
runs an unfused softmax. ``SDPAttention`` takes its place in the spec (same constructor and forward
signature, megatron's [s, b, heads, head_dim] layouts in, [s, b, heads x head_dim] out) and lets PyTorch pick
the kernel: flash / memory-efficient on CUDA, the fused CPU kernel or the math path on CPU. It holds no
parameters, so checkpoints and the HF key maps are those of the local spec.

    out = softmax(q k^T * scale + M) v,   scale = 1 / sqrt(head_dim),
    M[b, i, j] = -inf where query i of row b may not attend key j, else 0

with each KV head shared by heads / groups query heads (GQA: SDPA's ``enable_gqa``, no expanded copies of k
and v) and no dropout. Gradients are SDPA's own (zero through the masked keys).

The mask is megatron's convention (``models.masks``): a bool ``attention_mask`` of shape [b or 1, 1, s or 1, s]
that is True where attention is NOT allowed (padded keys, later blocks of a block-causal mask); None means
every query attends every key (no causal mask: masked diffusion attends both ways). ``DiffusionLM`` builds it
(``models.masks.attention_mask``). A query must keep at least one key, or its softmax is 0/0. megatron's local
``DotProductAttention`` reads the same mask (its unfused softmax fills -10000 instead of -inf: exp underflows
to exactly 0 all the same).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide
from torch import Tensor


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if (attn_mask_type != AttnMaskType.no_mask or dropout or config.context_parallel_size != 1
                or config.apply_query_key_layer_scaling):
            raise ValueError(f"SDPAttention is bidirectional, without dropout, context parallelism or query-key "
                             f"layer scaling; got attn_mask_type={attn_mask_type}, attention_dropout={dropout}, "
                             f"context_parallel_size={config.context_parallel_size}")
        tp = (pg_collection.tp.size() if pg_collection is not None
              else parallel_state.get_tensor_model_parallel_world_size())
        self.gqa = divide(config.num_query_groups, tp) < divide(config.num_attention_heads, tp)
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params=None) -> Tensor:
        """[s, b, heads, d] queries, [s, b, groups, d] keys and values -> [s, b, heads x d]."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention takes no attention bias or packed sequences")
        s, b = query.shape[:2]
        keep = None
        if attention_mask is not None:
            m = attention_mask
            if (m.dtype != torch.bool or m.dim() != 4 or m.shape[0] not in (1, b) or m.shape[1] != 1
                    or m.shape[2] not in (1, s) or m.shape[3] != key.shape[0]):
                raise ValueError(f"SDPAttention's attention_mask is a bool [b or 1, 1, s or 1, s] = [{b} or 1, 1, "
                                 f"{s} or 1, {key.shape[0]}] mask (True = masked out); got {m.dtype} "
                                 f"{tuple(m.shape)}")
            keep = ~m  # the one inversion of the mask convention: SDPA's bool mask is True where attention is allowed
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # SDPA's [b, n, s, d], as strided views
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=0.0, is_causal=False,
                                             scale=self.scale, enable_gqa=self.gqa)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def core_attention(name: str) -> type:
    """The core-attention class of ``model.attention``: ``sdpa``, ``local`` (megatron's unfused
    DotProductAttention, kept for comparison) or ``te`` (Transformer Engine's fused one, where installed)."""
    if name == "sdpa":
        return SDPAttention
    if name == "local":
        return DotProductAttention
    if name == "te":
        # deferred: Transformer Engine is optional; only model.attention=te imports it
        try:
            import transformer_engine  # noqa: F401  megatron's TE wrappers import even without it
        except ImportError as e:
            raise RuntimeError(f"model.attention=te needs Transformer Engine, which does not import here ({e}); "
                               f"use model.attention=sdpa") from None
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    raise ValueError(f"model.attention={name!r} is not one of sdpa, local, te")
