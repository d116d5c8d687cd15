"""The dense single-process reference model: the oracle every distributed implementation is tested against.

Plain PyTorch over a dict of canonical tensors (see ``mdu_dist.models.arch``), the maths of the HF
Llama/Qwen2 code with BIDIRECTIONAL attention (LLaDA and Dream are masked-diffusion models: no causal mask).
For ``x = embed[input_ids]`` and every layer ``l``::

    h      = rmsnorm(x, attn_norm)                    rmsnorm(x, w) = w * x * rsqrt(mean(x^2) + eps)
    q,k,v  = h q^T (+q_bias), h k^T (+k_bias), h v^T (+v_bias)        split into heads of size hd
    q,k    = rope(q), rope(k)                          rotate-half, inv_freq = theta^(-arange(0, hd, 2) / hd)
    x      = x + o(softmax(q k^T / sqrt(hd)) v)       k,v repeated heads/groups times (GQA), no mask
    x      = x + down(silu(gate h') * up h')          h' = rmsnorm(x, mlp_norm)

then ``logits = rmsnorm(x, final_norm) lm_head^T``. Dream predicts token i from position i-1, so its logits
are shifted right by one: ``cat([logits[:, :1], logits[:, :-1]], dim=1)``.

Precision follows HF: the norm is computed in fp32 and cast back, RoPE cos/sin are computed in fp32 and cast
to the working dtype. Softmax runs in at least fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mdu_dist.config import ModelConfig
from mdu_dist.models import ARCHS


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """canonical name -> shape, in canonical order, for a model of shape ``cfg``."""
    hd, h, f = cfg.head_dim, cfg.hidden_size, cfg.ffn_hidden_size
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_query_groups * hd
    per_layer = {
        "attn_norm": (h,), "q": (q_out, h), "k": (kv_out, h), "v": (kv_out, h),
        "q_bias": (q_out,), "k_bias": (kv_out,), "v_bias": (kv_out,), "o": (h, q_out),
        "mlp_norm": (h,), "gate": (f, h), "up": (f, h), "down": (h, f),
    }
    shapes = {}
    for name in ARCHS[cfg.arch].canonical_names(cfg.num_layers, cfg.qkv_bias):
        if name in ("embed", "lm_head"):
            shapes[name] = (cfg.vocab_size, h)
        elif name == "final_norm":
            shapes[name] = (h,)
        else:
            shapes[name] = per_layer[name.rsplit(".", 1)[1]]
    return shapes


def init_weights(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Random canonical weights, deterministic in ``seed`` whatever ``dtype``/``device``.

    Norms are 1 + 0.1 N(0, 1) and biases 0.1 N(0, 1) rather than ones/zeros so tests exercise them.
    ``device="meta"`` allocates nothing (parameter counting of 8B models).
    """
    shapes = canonical_shapes(cfg)
    if torch.device(device).type == "meta":
        return {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in shapes.items()}
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        # Drawn in fp32 on CPU so the same seed gives the same model (up to rounding) in every dtype/device.
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith("norm"):
            noise = 1.0 + 0.1 * noise
        elif name.endswith("bias"):
            noise = 0.1 * noise
        else:
            noise = cfg.init_std * noise
        weights[name] = noise.to(dtype=dtype, device=device)
    return weights


def count_parameters(cfg: ModelConfig) -> int:
    return sum(t.numel() for t in init_weights(cfg, device="meta").values())


def to_hf(cfg: ModelConfig, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """canonical -> HF names of ``cfg.arch`` (same tensors, no copy)."""
    names = ARCHS[cfg.arch].hf_names(cfg.num_layers, cfg.qkv_bias)
    return {hf: weights[canonical] for canonical, hf in names.items()}


def layout_errors(cfg: ModelConfig, hf_shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """What is wrong with a set of HF tensors (name -> shape) for a model of shape ``cfg``; [] if nothing."""
    expected = {ARCHS[cfg.arch].hf_name(c): s for c, s in canonical_shapes(cfg).items()}
    errors = []
    missing = [n for n in expected if n not in hf_shapes]
    unexpected = [n for n in hf_shapes if n not in expected]
    if missing:
        errors.append(f"missing {len(missing)} tensor(s) for arch {cfg.arch!r}: {_some(missing)}")
    if unexpected:
        errors.append(f"{len(unexpected)} unexpected tensor(s) for arch {cfg.arch!r}: {_some(unexpected)}")
    for name, shape in expected.items():
        if name in hf_shapes and tuple(hf_shapes[name]) != shape:
            errors.append(f"tensor {name}: expected shape {list(shape)}, got {list(hf_shapes[name])}")
    return errors


def _some(names: list[str], limit: int = 5) -> str:
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def from_hf(cfg: ModelConfig, hf: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF names of ``cfg.arch`` -> canonical; ValueError naming every missing/unexpected/misshapen tensor."""
    errors = layout_errors(cfg, {name: t.shape for name, t in hf.items()})
    if errors:
        raise ValueError("weights do not match the model config: " + "; ".join(errors))
    names = ARCHS[cfg.arch].hf_names(cfg.num_layers, cfg.qkv_bias)
    return {canonical: hf[name] for canonical, name in names.items()}


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, dtype: torch.dtype,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [seq_len, head_dim] for positions 0..seq_len-1 (HF rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _attention(cfg: ModelConfig, w: Mapping[str, Tensor], p: str, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    b, s, _ = x.shape
    hd = cfg.head_dim

    def heads(name: str, n: int) -> Tensor:
        return F.linear(x, w[p + name], w.get(p + name + "_bias")).view(b, s, n, hd).transpose(1, 2)

    q = heads("q", cfg.num_attention_heads)
    k = heads("k", cfg.num_query_groups)
    v = heads("v", cfg.num_query_groups)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    # Query head j attends with KV group j // (heads / groups), as HF's repeat_kv and Megatron's GQA.
    rep = cfg.num_attention_heads // cfg.num_query_groups
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    probs = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    out = (probs @ v).transpose(1, 2).reshape(b, s, cfg.num_attention_heads * hd)
    return F.linear(out, w[p + "o"])


def _mlp(w: Mapping[str, Tensor], p: str, x: Tensor) -> Tensor:
    return F.linear(F.silu(F.linear(x, w[p + "gate"])) * F.linear(x, w[p + "up"]), w[p + "down"])


def dense_forward(cfg: ModelConfig, weights: Mapping[str, Tensor], input_ids: Tensor) -> Tensor:
    """Logits [B, S, vocab_size] of ``input_ids`` [B, S] (shifted for Dream), differentiable in ``weights``."""
    x = F.embedding(input_ids, weights["embed"])
    cos, sin = rope_cos_sin(input_ids.shape[1], cfg.head_dim, cfg.rope_theta, x.dtype, x.device)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        x = x + _attention(cfg, weights, p, rms_norm(x, weights[p + "attn_norm"], cfg.norm_eps), cos, sin)
        x = x + _mlp(weights, p, rms_norm(x, weights[p + "mlp_norm"], cfg.norm_eps))
    logits = F.linear(rms_norm(x, weights["final_norm"], cfg.norm_eps), weights["lm_head"])
    if ARCHS[cfg.arch].shift_logits:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits
