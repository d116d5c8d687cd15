"""LLaDA and Dream as megatron-core GPTModels: the local (no Transformer Engine, no apex) layer spec with
bidirectional attention (core attention chosen by ``model.attention``, ``models.attention``; block-causal by
``model.block_size`` or any mask given, ``models.masks``), RMSNorm, SwiGLU, RoPE and an untied head. The mixture-of-experts backbones (LLaDA2, LLaDA-MoE) use megatron-core's MoE layers
(``moe_config``) in the same spec, with per-head q/k RMSNorm and partial RoPE.

A ``DiffusionLM`` is one pipeline stage. The last stage returns this rank's slice of the padded vocabulary
with the padding columns at -inf, and (Dream) the logits shifted right by one along the sequence.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from mdu_dist.config import LoRAConfig, ModelConfig
from mdu_dist.models import ARCHS, masks
from mdu_dist.models.lora import add_adapters


# train.recompute -> megatron-core's activation recomputation. selective: the core attention is recomputed in
# the backward (what the unfused attention stores, its [b, heads, s, s] probabilities, is never kept); full:
# every layer keeps only its input and is recomputed whole in the backward (uniform chunks of one layer).
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def moe_config(cfg: ModelConfig) -> dict:
    """megatron-core's TransformerConfig fields for ``cfg``'s routed experts ({} for a dense model).

    The router computes its logits and scores in fp32, chooses with the expert bias (sigmoid scores only) but
    never updates it (bias update rate 0; megatron would update it only in its own finalize_model_grads, which
    mdu-dist does not call), and adds no auxiliary loss. Tokens travel by the allgather dispatcher to a
    SequentialMLP of experts: the alltoall dispatcher creates a CUDA stream when built and grouped GEMM needs
    Transformer Engine or the grouped_gemm package, so neither runs on CPU. No capacity: no token is dropped.
    """
    if not cfg.is_moe:
        return {}
    return dict(
        num_moe_experts=cfg.moe_num_experts,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_router_topk=cfg.moe_topk,
        moe_layer_freq=[0] * cfg.moe_dense_layers + [1] * (cfg.num_layers - cfg.moe_dense_layers),
        moe_shared_expert_intermediate_size=cfg.moe_shared_ffn_hidden_size or None,
        moe_router_score_function=cfg.moe_score,
        # softmax: True = softmax over all experts, then top-k, not renormalised (LLaDA-MoE); False = softmax
        # over the top-k logits, i.e. renormalised. Sigmoid scores are always renormalised.
        moe_router_pre_softmax=cfg.moe_score == "softmax" and not cfg.moe_renormalize,
        moe_router_num_groups=cfg.moe_num_groups or None,
        moe_router_group_topk=cfg.moe_group_topk or None,
        moe_router_topk_scaling_factor=cfg.moe_topk_scaling if cfg.moe_topk_scaling != 1.0 else None,
        moe_router_enable_expert_bias=cfg.moe_expert_bias,
        moe_router_bias_update_rate=0.0,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
    )


def transformer_config(cfg: ModelConfig, tp: int, pp: int, dtype: torch.dtype = torch.float32,
                       recompute: str = "none"):
    # deferred: megatron-core costs seconds of start-up; the CLI imports this module (via eval.run)
    from megatron.core.transformer import TransformerConfig

    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r} must be one of {', '.join(RECOMPUTE)}")
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        init_method_std=cfg.init_std,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        # The fused kernels need CUDA/apex; the unfused paths are exact and run everywhere.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        # The layer spec below declares no mask; this keeps megatron from building a causal one anywhere.
        variable_seq_lengths=False,
        qk_layernorm=cfg.qk_norm,
        **moe_config(cfg),
        **RECOMPUTE[recompute],
    )


def layer_spec(attention: str = "sdpa", config=None):
    """megatron-core's local GPT layer spec with the causal mask removed (masked diffusion attends both ways)
    and its core attention replaced by ``attention`` (``models.attention.core_attention``). Given the
    TransformerConfig of a mixture-of-experts model, the spec of this pipeline stage's block: its dense and MoE
    layers, each so changed."""
    # deferred: megatron-core costs seconds of start-up (attention too); the CLI imports this module
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    from mdu_dist.models.attention import core_attention

    if config is None or not config.num_moe_experts:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        specs = [spec]
    else:
        _define_te_general_gemm()
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
        specs = spec.layer_specs
    for layer in specs:
        attn = layer.submodules.self_attention
        attn.params["attn_mask_type"] = AttnMaskType.no_mask
        attn.submodules.core_attention = core_attention(attention)
    return spec


def _define_te_general_gemm() -> None:
    """megatron-core 0.16.1's router gating (``moe_utils.RouterGatingLinearFunction``) tests
    ``te_general_gemm is not None`` but defines that name only when Transformer Engine imports: without it, define
    it as None so its plain torch.mm path runs (on GPUs without Transformer Engine as on CPU)."""
    # deferred: megatron-core costs seconds of start-up; the CLI imports this module (via eval.run)
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


@functools.cache
def _row_position_gpt_model() -> type:
    """megatron-core's GPTModel with rotary embeddings that follow ``position_ids`` row by row.

    GPTModel builds its RoPE table for positions 0..S-1 from the sequence length alone and ignores
    ``position_ids``; a left-padded row needs its real tokens at positions 0, 1, ... as in the unpadded row.
    The table row of each (row, token) position id is gathered: [S, 1, 1, d] -> [S, B, 1, d], which megatron's
    RoPE broadcasts over the heads as before. Without ``position_ids`` it is GPTModel unchanged.
    """
    # deferred: megatron-core costs seconds of start-up; the CLI imports this module (via eval.run)
    from megatron.core.models.gpt import GPTModel

    class RowPositionGPTModel(GPTModel):
        def _preprocess(self, input_ids, position_ids, **kwargs):
            out = super()._preprocess(input_ids=input_ids, position_ids=position_ids, **kwargs)
            table = out[1]
            if table is None or position_ids is None:
                return out
            return (out[0], table[:, 0, 0][position_ids.t()].unsqueeze(2), *out[2:])

    return RowPositionGPTModel


class DiffusionLM(nn.Module):
    """One pipeline stage of a masked-diffusion backbone on megatron-core.

    ``forward(input_ids)`` returns logits [B, S, V_local] on the last stage (hidden states on the others, which
    the pipeline schedule forwards); later stages receive their input through the GPTModel's
    ``set_input_tensor``. ``recompute`` (``RECOMPUTE``) applies in training mode only, as megatron-core does.
    """

    def __init__(self, cfg: ModelConfig, tp: int, pp: int, pre_process: bool, post_process: bool,
                 tp_rank: int = 0, dtype: torch.dtype = torch.float32, recompute: str = "none"):
        super().__init__()
        self.cfg = cfg
        self.shift_logits = ARCHS[cfg.arch].shift_logits
        self.padded_vocab = cfg.padded_vocab_size(tp)
        self.vocab_local = self.padded_vocab // tp
        self.vocab_start = tp_rank * self.vocab_local
        self.post_process = post_process
        # Named ``module`` so megatron-core's get_attr_wrapped_model finds config, model_type and
        # set_input_tensor on the GPTModel, as it does through DDP wrappers.
        config = transformer_config(cfg, tp, pp, dtype, recompute)
        self.module = _row_position_gpt_model()(
            config, layer_spec(cfg.attention, config), vocab_size=self.padded_vocab,
            max_sequence_length=cfg.max_position_embeddings, pre_process=pre_process, post_process=post_process,
            share_embeddings_and_output_weights=False, position_embedding_type="rope",
            rotary_percent=cfg.rotary_percent,
            rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                pad: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, V_local] on the last stage, or, given ``positions`` (bool [B, S]), only the logits at
        those positions, [N, V_local] in row-major order: the output layer (the largest matmul of a step at
        LLaDA's vocabulary) then runs on the N positions a loss reads, not on the whole sequence.

        ``pad`` (bool [B, S], True at padding; left or right) drops the padded keys from every attention and
        numbers each row's positions from 0 at its first real token, so a padded row's real positions get the
        logits of the unpadded row. Attention is ``model.block_size``'s (full, or block-causal by position), or
        ``mask``'s where given (bool [B or 1, 1, S, S], True = masked out), padding folded in either way
        (``models.masks.attention_mask``). ``position_ids`` (long [B, S]) number the tokens for RoPE in place of
        the count from each row's first real token (LLaDA2's two-copy layout gives both copies 0..L-1). Every
        stage must get the same ``pad``, ``mask`` and ``position_ids``.
        """
        b, s = input_ids.shape
        if pad is not None and (pad.shape != (b, s) or pad.dtype != torch.bool):
            raise ValueError(f"pad must be a bool [B, S] = [{b}, {s}] mask; got {pad.dtype} {tuple(pad.shape)}")
        # No position ids without padding: with RoPE, GPTModel numbers every row 0..S-1 itself, and the per-row
        # rotary gather below is only paid by padded (evaluation) batches and the two-copy layout, not by training
        # steps of the full layout.
        if position_ids is not None and position_ids.shape != (b, s):
            raise ValueError(f"position_ids must be [B, S] = [{b}, {s}]; got {tuple(position_ids.shape)}")
        if position_ids is None and pad is not None:
            position_ids = masks.row_positions(pad)
        attention_mask = masks.attention_mask(s, self.cfg.block_size, pad, mask, input_ids.device)
        if attention_mask is not None and self.cfg.attention == "te":
            raise ValueError("model.attention=te takes no attention mask here; use model.attention=sdpa or local")
        if not self.post_process:
            return self.module(input_ids, position_ids, attention_mask=attention_mask)
        source = self._predicting_column(pad, b, s, input_ids.device)
        if positions is None:
            out = self.module(input_ids, position_ids, attention_mask=attention_mask)
            if source is not None:
                out = out.gather(1, source[..., None].expand(-1, -1, out.shape[-1]))
            return self._mask_padding(out)
        hidden = self._final_hidden_states(input_ids, position_ids, attention_mask)  # [S, B, h]
        rows, cols = positions.nonzero(as_tuple=True)
        if source is not None:
            cols = source[rows, cols]
        logits, _ = self.module.output_layer(hidden[cols, rows].unsqueeze(1))
        return self._mask_padding(logits.squeeze(1))

    def _predicting_column(self, pad: torch.Tensor | None, b: int, s: int, device) -> torch.Tensor | None:
        """[B, S] output column that predicts token i (None: column i, no shift). Dream predicts token i from
        column i - 1, and a row's first token from itself; with left padding that first token is the first real
        one, whose left neighbour is padding."""
        if not self.shift_logits:
            return None
        column = torch.arange(s, device=device).expand(b, s)
        previous = (column - 1).clamp(min=0)
        return previous if pad is None else torch.where(pad.gather(1, previous), column, previous)

    def _final_hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                             attention_mask: torch.Tensor | None) -> torch.Tensor:
        # GPTModel returns its decoder's (final-normed) hidden states instead of logits when post_process is off;
        # that flag is read only there during forward.
        self.module.post_process = False
        try:
            return self.module(input_ids, position_ids, attention_mask=attention_mask)
        finally:
            self.module.post_process = True

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        columns = torch.arange(self.vocab_start, self.vocab_start + self.vocab_local, device=logits.device)
        return logits.masked_fill(columns >= self.cfg.vocab_size, float("-inf"))


def build_stage(cfg: ModelConfig, dtype: torch.dtype = torch.float32, recompute: str = "none",
                lora: LoRAConfig | None = None) -> DiffusionLM:
    """Build this rank's stage of the model from megatron-core's (already initialised) parallel state; with
    ``lora`` enabled, its base frozen and LoRA adapters added (``models.lora.add_adapters``)."""
    # deferred: megatron-core costs seconds of start-up; the CLI imports this module (via eval.run)
    from megatron.core import parallel_state as ps

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    stage = DiffusionLM(cfg, tp, pp, pre_process=ps.is_pipeline_first_stage(),
                        post_process=ps.is_pipeline_last_stage(), tp_rank=tp_rank, dtype=dtype, recompute=recompute)
    if lora is not None and lora.enabled:
        group = ps.get_tensor_model_parallel_group() if tp > 1 else None
        add_adapters(stage, lora, tp, tp_rank, pp, pp_rank, group, input_requires_grad=recompute == "full")
    return stage
