"""What distinguishes one backbone from another: its HF weight names and whether its logits are shifted.

Every tensor has a canonical name used inside mdu-dist (``embed``, ``final_norm``, ``lm_head`` and, per layer
``i``, ``layers.{i}.{attn_norm,q,k,v,q_bias,k_bias,v_bias,q_norm,k_norm,o,mlp_norm}`` followed by either a dense
SwiGLU ``{gate,up,down}`` or, in a mixture-of-experts layer, ``router``, ``expert_bias``,
``experts.{e}.{gate,up,down}`` and ``shared_{gate,up,down}``); an ``Arch`` maps canonical names to the backbone's
HF names. Several canonical tensors may share one HF tensor, stacked along its rows in canonical order (LLaDA2's
fused ``query_key_value`` = [q; k; v]). Adding a backbone = one such map + one config. ``cfg`` below is a
``mdu_dist.config.ModelConfig`` (not imported: config imports this registry).
"""

from __future__ import annotations

from dataclasses import dataclass

QKV_BIASES = ("q_bias", "k_bias", "v_bias")
SWIGLU = ("gate", "up", "down")


def is_moe_layer(cfg, i: int) -> bool:
    """Layer ``i`` has routed experts: every layer from ``moe_dense_layers`` on, in an MoE model."""
    return cfg.moe_num_experts > 0 and i >= cfg.moe_dense_layers


def layer_tensors(cfg, i: int) -> list[str]:
    """The canonical tensors of layer ``i`` (without the ``layers.{i}.`` prefix), in HF file order."""
    names = ["attn_norm", "q", "k", "v"] + (list(QKV_BIASES) if cfg.qkv_bias else [])
    names += (["q_norm", "k_norm"] if cfg.qk_norm else []) + ["o", "mlp_norm"]
    if not is_moe_layer(cfg, i):
        return names + list(SWIGLU)
    names += ["router"] + (["expert_bias"] if cfg.moe_expert_bias else [])
    names += [f"experts.{e}.{p}" for e in range(cfg.moe_num_experts) for p in SWIGLU]
    return names + ([f"shared_{p}" for p in SWIGLU] if cfg.moe_shared_ffn_hidden_size else [])


@dataclass(frozen=True)
class Arch:
    name: str
    # Dream predicts token i from output position i-1: logits = cat([logits[:, :1], logits[:, :-1]], 1).
    shift_logits: bool
    global_names: dict[str, str]  # canonical -> HF for the non-layer tensors
    # canonical layer tensor -> HF template with {i} (and {e} for ``experts.{e}.*``)
    layer_names: dict[str, str]
    moe: bool = False  # the backbone has routed experts (ModelConfig.moe_num_experts > 0)

    def canonical_names(self, cfg) -> list[str]:
        names = ["embed"]
        names += [f"layers.{i}.{t}" for i in range(cfg.num_layers) for t in layer_tensors(cfg, i)]
        return names + ["final_norm", "lm_head"]

    def hf_name(self, canonical: str) -> str:
        if canonical in self.global_names:
            return self.global_names[canonical]
        _, i, tensor = canonical.split(".", 2)
        if tensor.startswith("experts."):
            _, e, part = tensor.split(".")
            return self.layer_names["experts.{e}." + part].format(i=i, e=e)
        return self.layer_names[tensor].format(i=i)

    def hf_names(self, cfg) -> dict[str, str]:
        """canonical -> HF name for every tensor of a model of shape ``cfg``, in a stable order."""
        return {c: self.hf_name(c) for c in self.canonical_names(cfg)}
