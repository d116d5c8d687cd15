"""What distinguishes one backbone from another: its HF weight names and whether its logits are shifted.

Every tensor has a canonical name used inside mdu-dist (``embed``, ``final_norm``, ``lm_head`` and, per layer
``i``, ``layers.{i}.{attn_norm,q,k,v,q_bias,k_bias,v_bias,o,mlp_norm,gate,up,down}``); an ``Arch`` maps
canonical names to the backbone's HF names. Adding a backbone = one such map + one config.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYER_TENSORS = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")
QKV_BIASES = ("q_bias", "k_bias", "v_bias")


@dataclass(frozen=True)
class Arch:
    name: str
    # Dream predicts token i from output position i-1: logits = cat([logits[:, :1], logits[:, :-1]], 1).
    shift_logits: bool
    global_names: dict[str, str]  # canonical -> HF for the non-layer tensors
    layer_names: dict[str, str]  # canonical layer tensor -> HF template with {i}

    def canonical_names(self, num_layers: int, qkv_bias: bool) -> list[str]:
        per_layer = LAYER_TENSORS + (QKV_BIASES if qkv_bias else ())
        names = ["embed"]
        names += [f"layers.{i}.{t}" for i in range(num_layers) for t in per_layer]
        return names + ["final_norm", "lm_head"]

    def hf_name(self, canonical: str) -> str:
        if canonical in self.global_names:
            return self.global_names[canonical]
        _, i, tensor = canonical.split(".")
        return self.layer_names[tensor].format(i=i)

    def hf_names(self, num_layers: int, qkv_bias: bool) -> dict[str, str]:
        """canonical -> HF name for every tensor of a model of this shape, in a stable order."""
        return {c: self.hf_name(c) for c in self.canonical_names(num_layers, qkv_bias)}
