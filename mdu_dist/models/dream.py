"""Dream (Qwen2 shape, ``modeling_dream.py``): GQA, q/k/v biases, untied head, logits shifted right by one."""

from mdu_dist.models.arch import Arch

_LAYER = "model.layers.{i}."

DREAM = Arch(
    name="dream",
    shift_logits=True,
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
        "q_bias": _LAYER + "self_attn.q_proj.bias",
        "k_bias": _LAYER + "self_attn.k_proj.bias",
        "v_bias": _LAYER + "self_attn.v_proj.bias",
        "o": _LAYER + "self_attn.o_proj.weight",
        "mlp_norm": _LAYER + "post_attention_layernorm.weight",
        "gate": _LAYER + "mlp.gate_proj.weight",
        "up": _LAYER + "mlp.up_proj.weight",
        "down": _LAYER + "mlp.down_proj.weight",
    },
)
