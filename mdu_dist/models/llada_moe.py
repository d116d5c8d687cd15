"""LLaDA-MoE (``modeling_lladamoe.py``, ``LLaDAMoEModelLM``; OLMoE-shaped): MHA with per-head q/k RMSNorm, every
layer 64 routed experts (softmax over all experts, top-8 not renormalised), no shared expert; untied head,
logits not shifted. Its HF code keeps a shared expert (if any) on the layer, beside ``mlp``."""

from mdu_dist.models.arch import Arch

_LAYER = "model.layers.{i}."
_MLP = _LAYER + "mlp."

LLADA_MOE = Arch(
    name="llada_moe",
    shift_logits=False,
    moe=True,
    global_names={
        "embed": "model.embed_tokens.weight",
        "final_norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
    },
    layer_names={
        "attn_norm": _LAYER + "input_layernorm.weight",
        "q": _LAYER + "self_attn.q_proj.weight",
        "k": _LAYER + "self_attn.k_proj.weight",
        "v": _LAYER + "self_attn.v_proj.weight",
        "q_norm": _LAYER + "self_attn.q_norm.weight",
        "k_norm": _LAYER + "self_attn.k_norm.weight",
        "o": _LAYER + "self_attn.o_proj.weight",
        "mlp_norm": _LAYER + "post_attention_layernorm.weight",
        "gate": _MLP + "gate_proj.weight",
        "up": _MLP + "up_proj.weight",
        "down": _MLP + "down_proj.weight",
        "router": _MLP + "gate.weight",
        "experts.{e}.gate": _MLP + "experts.{e}.gate_proj.weight",
        "experts.{e}.up": _MLP + "experts.{e}.up_proj.weight",
        "experts.{e}.down": _MLP + "experts.{e}.down_proj.weight",
        "shared_gate": _LAYER + "shared_expert.gate_proj.weight",
        "shared_up": _LAYER + "shared_expert.up_proj.weight",
        "shared_down": _LAYER + "shared_expert.down_proj.weight",
    },
)
