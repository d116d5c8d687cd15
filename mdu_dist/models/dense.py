"""The dense single-process reference model: the oracle every distributed implementation is tested against.

Plain PyTorch over a dict of canonical tensors (see ``mdu_dist.models.arch``), the maths of the HF
Llama/Qwen2 code with BIDIRECTIONAL attention (LLaDA and Dream are masked-diffusion models: no causal mask)
unless a mask is given.
For ``x = embed[input_ids]`` and every layer ``l``::

    h      = rmsnorm(x, attn_norm)                    rmsnorm(x, w) = w * x * rsqrt(mean(x^2) + eps)
    q,k,v  = h q^T (+q_bias), h k^T (+k_bias), h v^T (+v_bias)        split into heads of size hd
    q,k    = rope(q), rope(k)                          rotate-half, inv_freq = theta^(-arange(0, hd, 2) / hd)
    x      = x + o(softmax(q k^T / sqrt(hd) + M) v)   k,v repeated heads/groups times (GQA)
    x      = x + down(silu(gate h') * up h')          h' = rmsnorm(x, mlp_norm)

with M = -inf where the bool ``mask`` (``models.masks``' convention, [b or 1, 1, s, s], True = masked out) is True,
else 0; by default ``model.block_size``'s block-causal mask (none at 0). Then
``logits = rmsnorm(x, final_norm) lm_head^T``. Dream predicts token i from position i-1, so its logits
are shifted right by one: ``cat([logits[:, :1], logits[:, :-1]], dim=1)``.

The mixture-of-experts backbones (``model.moe_num_experts > 0``: LLaDA2, LLaDA-MoE) add, per head, an RMSNorm of
q and k before RoPE (``model.qk_norm``), rotate only the first ``rotary_percent`` of each head's dimensions, and
replace the MLP of every layer from ``moe_dense_layers`` on by a routed one (``_routed_mlp``): for a token h'

    s      = score(router h')                 score = sigmoid | softmax over all experts, in at least fp32
    c      = s + expert_bias                  (selection only; groups: all but the best moe_group_topk groups,
                                               a group scored by the sum of its top-2 c, are excluded)
    E      = top-k experts of c,  w_e = s_e (/ sum_{E} s if moe_renormalize) x moe_topk_scaling
    mlp(h') = sum_{e in E} w_e SwiGLU_e(h') + SwiGLU_shared(h')

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
from mdu_dist.models.arch import is_moe_layer
from mdu_dist.models.masks import attention_mask


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """canonical name -> shape, in canonical order, for a model of shape ``cfg``."""
    hd, h, f = cfg.head_dim, cfg.hidden_size, cfg.ffn_hidden_size
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_query_groups * hd
    fe, fs = cfg.moe_ffn_hidden_size, cfg.moe_shared_ffn_hidden_size
    per_layer = {
        "attn_norm": (h,), "q": (q_out, h), "k": (kv_out, h), "v": (kv_out, h),
        "q_bias": (q_out,), "k_bias": (kv_out,), "v_bias": (kv_out,), "q_norm": (hd,), "k_norm": (hd,),
        "o": (h, q_out), "mlp_norm": (h,), "gate": (f, h), "up": (f, h), "down": (h, f),
        "router": (cfg.moe_num_experts, h), "expert_bias": (cfg.moe_num_experts,),
        "expert.gate": (fe, h), "expert.up": (fe, h), "expert.down": (h, fe),
        "shared_gate": (fs, h), "shared_up": (fs, h), "shared_down": (h, fs),
    }
    shapes = {}
    for name in ARCHS[cfg.arch].canonical_names(cfg):
        if name in ("embed", "lm_head"):
            shapes[name] = (cfg.vocab_size, h)
        elif name == "final_norm":
            shapes[name] = (h,)
        elif ".experts." in name:
            shapes[name] = per_layer["expert." + name.rsplit(".", 1)[1]]
        else:
            shapes[name] = per_layer[name.rsplit(".", 1)[1]]
    return shapes


def hf_parts(cfg: ModelConfig) -> dict[str, list[str]]:
    """HF name -> the canonical tensors stacked along its rows, in HF file order (one each, except LLaDA2's fused
    [q; k; v])."""
    parts: dict[str, list[str]] = {}
    for canonical, hf in ARCHS[cfg.arch].hf_names(cfg).items():
        parts.setdefault(hf, []).append(canonical)
    return parts


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape, in HF file order."""
    shapes = canonical_shapes(cfg)
    return {hf: (sum(shapes[c][0] for c in cs), *shapes[cs[0]][1:]) for hf, cs in hf_parts(cfg).items()}


def hf_rows(cfg: ModelConfig) -> dict[str, tuple[str, int]]:
    """canonical name -> (HF name, first row of it in that HF tensor)."""
    shapes, where = canonical_shapes(cfg), {}
    for hf, cs in hf_parts(cfg).items():
        row = 0
        for c in cs:
            where[c] = (hf, row)
            row += shapes[c][0]
    return where


def stored_dtype(canonical: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype tensor ``canonical`` is kept in, in a model of ``dtype``: the expert bias stays fp32, as the HF
    checkpoints and megatron-core keep it (it decides ties between experts' scores)."""
    return torch.float32 if canonical.endswith("expert_bias") else dtype


def init_weights(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Random canonical weights, deterministic in ``seed`` whatever ``dtype``/``device``.

    Norms are 1 + 0.1 N(0, 1) and biases 0.1 N(0, 1) rather than ones/zeros so tests exercise them.
    ``device="meta"`` allocates nothing (parameter counting of 8B models).
    """
    shapes = canonical_shapes(cfg)
    if torch.device(device).type == "meta":
        return {name: torch.empty(shape, dtype=stored_dtype(name, dtype), device="meta") for name, shape in shapes.items()}
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        # Drawn in fp32 on CPU so the same seed gives the same model (up to rounding) in every dtype/device.
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith("norm"):
            noise = 1.0 + 0.1 * noise
        elif name.endswith("bias"):  # q/k/v biases and the expert bias: non-zero so tests exercise them
            noise = 0.1 * noise
        else:
            noise = cfg.init_std * noise
        weights[name] = noise.to(dtype=stored_dtype(name, dtype), device=device)
    return weights


def count_parameters(cfg: ModelConfig) -> int:
    return sum(t.numel() for t in init_weights(cfg, device="meta").values())


def count_active_parameters(cfg: ModelConfig) -> int:
    """Parameters one token passes through: all but the routed experts it is not sent to (moe_num_experts -
    moe_topk per MoE layer); the expert-bias buffer counts as a parameter in both."""
    shapes = canonical_shapes(cfg)
    idle = sum(math.prod(shapes[f"layers.{i}.experts.0.{p}"]) for i in range(cfg.num_layers)
               if is_moe_layer(cfg, i) for p in ("gate", "up", "down"))
    return count_parameters(cfg) - idle * (cfg.moe_num_experts - cfg.moe_topk)


def to_hf(cfg: ModelConfig, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """canonical -> HF names of ``cfg.arch`` (the same tensors, no copy, except fused ones, concatenated)."""
    return {hf: weights[cs[0]] if len(cs) == 1 else torch.cat([weights[c] for c in cs])
            for hf, cs in hf_parts(cfg).items()}


def layout_errors(cfg: ModelConfig, found: Mapping[str, Sequence[int]]) -> list[str]:
    """What is wrong with a set of HF tensors (name -> shape) for a model of shape ``cfg``; [] if nothing."""
    expected = hf_shapes(cfg)
    errors = []
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    if missing:
        errors.append(f"missing {len(missing)} tensor(s) for arch {cfg.arch!r}: {_some(missing)}")
    if unexpected:
        errors.append(f"{len(unexpected)} unexpected tensor(s) for arch {cfg.arch!r}: {_some(unexpected)}")
    for name, shape in expected.items():
        if name in found and tuple(found[name]) != shape:
            errors.append(f"tensor {name}: expected shape {list(shape)}, got {list(found[name])}")
    return errors


def _some(names: list[str], limit: int = 5) -> str:
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def from_hf(cfg: ModelConfig, hf: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF names of ``cfg.arch`` -> canonical; ValueError naming every missing/unexpected/misshapen tensor."""
    errors = layout_errors(cfg, {name: t.shape for name, t in hf.items()})
    if errors:
        raise ValueError("weights do not match the model config: " + "; ".join(errors))
    shapes = canonical_shapes(cfg)
    return {c: hf[name][row:row + shapes[c][0]] if len(hf[name]) != shapes[c][0] else hf[name]
            for c, (name, row) in hf_rows(cfg).items()}


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, dtype: torch.dtype,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [seq_len, head_dim] for positions 0..seq_len-1 (HF rotate-half layout); ``head_dim`` is
    the number of rotated dimensions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on the first cos.shape[-1] dimensions of each head; the rest pass unrotated."""
    r = cos.shape[-1]
    rotated = x[..., :r] * cos + _rotate_half(x[..., :r]) * sin
    return torch.cat([rotated, x[..., r:]], dim=-1) if r < x.shape[-1] else rotated


def _attention(cfg: ModelConfig, w: Mapping[str, Tensor], p: str, x: Tensor, cos: Tensor, sin: Tensor,
               mask: Tensor | None) -> Tensor:
    b, s, _ = x.shape
    hd = cfg.head_dim

    def heads(name: str, n: int) -> Tensor:
        return F.linear(x, w[p + name], w.get(p + name + "_bias")).view(b, s, n, hd).transpose(1, 2)

    q = heads("q", cfg.num_attention_heads)
    k = heads("k", cfg.num_query_groups)
    v = heads("v", cfg.num_query_groups)
    if cfg.qk_norm:
        q, k = rms_norm(q, w[p + "q_norm"], cfg.norm_eps), rms_norm(k, w[p + "k_norm"], cfg.norm_eps)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    # Query head j attends with KV group j // (heads / groups), as HF's repeat_kv and Megatron's GQA.
    rep = cfg.num_attention_heads // cfg.num_query_groups
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    probs = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    out = (probs @ v).transpose(1, 2).reshape(b, s, cfg.num_attention_heads * hd)
    return F.linear(out, w[p + "o"])


def _mlp(w: Mapping[str, Tensor], p: str, x: Tensor) -> Tensor:
    return F.linear(F.silu(F.linear(x, w[p + "gate"])) * F.linear(x, w[p + "up"]), w[p + "down"])


def route(cfg: ModelConfig, router: Tensor, expert_bias: Tensor | None, x: Tensor) -> tuple[Tensor, Tensor]:
    """(chosen experts [T, k], their weights [T, k] in at least fp32) for tokens ``x`` [T, h]."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    logits = F.linear(x.to(dtype), router.to(dtype))
    scores = logits.sigmoid() if cfg.moe_score == "sigmoid" else logits.softmax(-1)
    choice = scores if expert_bias is None else scores + expert_bias.to(dtype)
    if cfg.moe_num_groups:
        t, g = choice.shape[0], cfg.moe_num_groups
        group_score = choice.view(t, g, cfg.moe_num_experts // g).topk(2, dim=-1).values.sum(-1)
        kept = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, group_score.topk(cfg.moe_group_topk).indices, True)
        choice = choice.masked_fill(~kept.repeat_interleave(cfg.moe_num_experts // g, dim=1), float("-inf"))
    chosen = choice.topk(cfg.moe_topk, dim=-1).indices
    weights = scores.gather(1, chosen)
    if cfg.moe_renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return chosen, weights * cfg.moe_topk_scaling


def _routed_mlp(cfg: ModelConfig, w: Mapping[str, Tensor], p: str, x: Tensor) -> Tensor:
    tokens = x.reshape(-1, x.shape[-1])
    chosen, weights = route(cfg, w[p + "router"], w.get(p + "expert_bias"), tokens)
    out = torch.zeros_like(tokens)
    for e in range(cfg.moe_num_experts):
        rows, slot = (chosen == e).nonzero(as_tuple=True)
        if len(rows):
            y = _mlp(w, f"{p}experts.{e}.", tokens[rows]) * weights[rows, slot, None].to(x.dtype)
            out = out.index_add(0, rows, y)
    if cfg.moe_shared_ffn_hidden_size:
        out = out + F.linear(F.silu(F.linear(tokens, w[p + "shared_gate"])) * F.linear(tokens, w[p + "shared_up"]),
                             w[p + "shared_down"])
    return out.view_as(x)


def dense_forward(cfg: ModelConfig, weights: Mapping[str, Tensor], input_ids: Tensor, mask: Tensor | None = None
                  ) -> Tensor:
    """Logits [B, S, vocab_size] of ``input_ids`` [B, S] (shifted for Dream), differentiable in ``weights``;
    attention as ``mask`` allows (bool [B or 1, 1, S, S], True = masked out), by default as ``cfg.block_size``."""
    if mask is None:
        mask = attention_mask(input_ids.shape[1], cfg.block_size, device=input_ids.device)
    x = F.embedding(input_ids, weights["embed"])
    rotary = int(cfg.head_dim * cfg.rotary_percent)
    cos, sin = rope_cos_sin(input_ids.shape[1], rotary, cfg.rope_theta, x.dtype, x.device)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        x = x + _attention(cfg, weights, p, rms_norm(x, weights[p + "attn_norm"], cfg.norm_eps), cos, sin, mask)
        h = rms_norm(x, weights[p + "mlp_norm"], cfg.norm_eps)
        x = x + (_routed_mlp(cfg, weights, p, h) if is_moe_layer(cfg, i) else _mlp(weights, p, h))
    logits = F.linear(rms_norm(x, weights["final_norm"], cfg.norm_eps), weights["lm_head"])
    if ARCHS[cfg.arch].shift_logits:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits
