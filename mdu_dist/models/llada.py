"""LLaDA (``modeling_llada.py``): MHA, SwiGLU, RMSNorm, RoPE, no biases, untied head, logits not shifted."""

from mdu_dist.models.arch import Arch

_BLOCK = "model.transformer.blocks.{i}."

LLADA = Arch(
    name="llada",
    shift_logits=False,
    global_names={
        "embed": "model.transformer.wte.weight",
        "final_norm": "model.transformer.ln_f.weight",
        "lm_head": "model.transformer.ff_out.weight",
    },
    layer_names={
        "attn_norm": _BLOCK + "attn_norm.weight",
        "q": _BLOCK + "q_proj.weight",
        "k": _BLOCK + "k_proj.weight",
        "v": _BLOCK + "v_proj.weight",
        "o": _BLOCK + "attn_out.weight",
        "mlp_norm": _BLOCK + "ff_norm.weight",
        "gate": _BLOCK + "ff_proj.weight",
        "up": _BLOCK + "up_proj.weight",
        "down": _BLOCK + "ff_out.weight",
    },
)
