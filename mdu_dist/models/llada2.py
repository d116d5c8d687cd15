"""LLaDA2.0 / 2.1 (``modeling_llada2_moe.py``, ``LLaDA2MoeModelLM``): GQA with a fused [q; k; v] projection,
per-head q/k RMSNorm, half-dimension RoPE, a dense first layer and then 256 routed experts (sigmoid router with a
selection-only expert bias, group-limited) plus a shared expert; untied head, logits not shifted."""

from mdu_dist.models.arch import Arch

_LAYER = "model.layers.{i}."
_MLP = _LAYER + "mlp."

LLADA2 = Arch(
    name="llada2",
    shift_logits=False,
    moe=True,
    global_names={
        "embed": "model.word_embeddings.weight",
        "final_norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
    },
    layer_names={
        "attn_norm": _LAYER + "input_layernorm.weight",
        # One HF tensor whose rows are [all q; all k; all v] (not interleaved per KV group).
        "q": _LAYER + "attention.query_key_value.weight",
        "k": _LAYER + "attention.query_key_value.weight",
        "v": _LAYER + "attention.query_key_value.weight",
        "q_norm": _LAYER + "attention.query_layernorm.weight",
        "k_norm": _LAYER + "attention.key_layernorm.weight",
        "o": _LAYER + "attention.dense.weight",
        "mlp_norm": _LAYER + "post_attention_layernorm.weight",
        "gate": _MLP + "gate_proj.weight",
        "up": _MLP + "up_proj.weight",
        "down": _MLP + "down_proj.weight",
        "router": _MLP + "gate.weight",
        "expert_bias": _MLP + "gate.expert_bias",
        "experts.{e}.gate": _MLP + "experts.{e}.gate_proj.weight",
        "experts.{e}.up": _MLP + "experts.{e}.up_proj.weight",
        "experts.{e}.down": _MLP + "experts.{e}.down_proj.weight",
        "shared_gate": _MLP + "shared_experts.gate_proj.weight",
        "shared_up": _MLP + "shared_experts.up_proj.weight",
        "shared_down": _MLP + "shared_experts.down_proj.weight",
    },
)
