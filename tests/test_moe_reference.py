"""The dense reference of the mixture-of-experts backbones equals transformers' own models of the same maths.

LLaDA2 (``configs/llada2_tiny.yaml``) is transformers' GLM-4-MoE and LLaDA-MoE (``configs/llada_moe_tiny.yaml``)
its Qwen3-MoE, loaded with the same weights and run bidirectionally (an all-zero 4-D additive mask, as the dense
reference tests do with Llama / Qwen2). The expert bias is random and non-zero, so the choice of experts depends
on it. Every difference between the layouts is undone here, written out independently of mdu_dist's key maps:

- GLM-4-MoE keeps q, k, v apart (``q_proj``/``k_proj``/``v_proj``) where LLaDA2 fuses them into
  ``attention.query_key_value`` with rows [all q; all k; all v]; ``o_proj`` is LLaDA2's ``attention.dense``,
  ``q_norm``/``k_norm`` its ``attention.{query,key}_layernorm``, ``mlp.gate.e_score_correction_bias`` its
  ``mlp.gate.expert_bias``.
- Both transformers models store the routed experts stacked: ``mlp.experts.gate_up_proj`` [E, 2f, h] with each
  expert's gate rows first, and ``mlp.experts.down_proj`` [E, h, f]; LLaDA2 / LLaDA-MoE one tensor per expert.
- GLM-4-MoE's shared expert is ``n_shared_experts`` x ``moe_intermediate_size`` wide (1 x 32 here, as
  ``moe_shared_ffn_hidden_size``); its group score is always the sum of a group's top-2 experts (mdu-dist
  requires moe_topk = 2 x moe_group_topk so that megatron-core's top-(topk/group_topk) agrees); its RoPE fraction
  is ``rope_parameters["partial_rotary_factor"]``; its first ``first_k_dense_replace`` layers are dense.
- Qwen3-MoE: ``norm_topk_prob=False`` (LLaDA-MoE's top-k is not renormalised), ``decoder_sparse_step=1`` and no
  ``mlp_only_layers`` (every layer routed).
- Both are causal language models: the zero 4-D mask makes them bidirectional (checked below).
"""

from __future__ import annotations

import pytest
import torch

from mdu_dist.config import load_config
from mdu_dist.models.dense import dense_forward, init_weights, route, to_hf

BATCH, SEQ = 2, 11


def _cfg(name: str, *overrides: str):
    return load_config(f"configs/{name}_tiny.yaml", list(overrides)).model


def _glm4_state(cfg, hf: dict) -> dict:
    """LLaDA2 HF tensors -> GLM-4-MoE's names and layout."""
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim
    out = {"model.embed_tokens.weight": hf["model.word_embeddings.weight"], "model.norm.weight": hf["model.norm.weight"],
           "lm_head.weight": hf["lm_head.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        q, k, v = hf[src + "attention.query_key_value.weight"].split([q_rows, kv_rows, kv_rows])
        out.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                    dst + "self_attn.v_proj.weight": v,
                    dst + "self_attn.o_proj.weight": hf[src + "attention.dense.weight"],
                    dst + "self_attn.q_norm.weight": hf[src + "attention.query_layernorm.weight"],
                    dst + "self_attn.k_norm.weight": hf[src + "attention.key_layernorm.weight"],
                    dst + "input_layernorm.weight": hf[src + "input_layernorm.weight"],
                    dst + "post_attention_layernorm.weight": hf[src + "post_attention_layernorm.weight"]})
        if i < cfg.moe_dense_layers:
            out.update({dst + f"mlp.{p}_proj.weight": hf[src + f"mlp.{p}_proj.weight"] for p in ("gate", "up", "down")})
            continue
        out[dst + "mlp.gate.weight"] = hf[src + "mlp.gate.weight"]
        out[dst + "mlp.gate.e_score_correction_bias"] = hf[src + "mlp.gate.expert_bias"]
        out.update(_stacked_experts(cfg, hf, src, dst))
        out.update({dst + f"mlp.shared_experts.{p}_proj.weight": hf[src + f"mlp.shared_experts.{p}_proj.weight"]
                    for p in ("gate", "up", "down")})
    return out


def _stacked_experts(cfg, hf: dict, src: str, dst: str) -> dict:
    e = range(cfg.moe_num_experts)
    gate_up = [torch.cat([hf[src + f"mlp.experts.{j}.gate_proj.weight"], hf[src + f"mlp.experts.{j}.up_proj.weight"]])
               for j in e]
    return {dst + "mlp.experts.gate_up_proj": torch.stack(gate_up),
            dst + "mlp.experts.down_proj": torch.stack([hf[src + f"mlp.experts.{j}.down_proj.weight"] for j in e])}


def _qwen3_state(cfg, hf: dict) -> dict:
    """LLaDA-MoE HF tensors -> Qwen3-MoE's (the same names, experts stacked)."""
    out = {k: v for k, v in hf.items() if ".mlp.experts." not in k}
    for i in range(cfg.num_layers):
        out.update(_stacked_experts(cfg, hf, f"model.layers.{i}.", f"model.layers.{i}."))
    return out


def _hf_model(cfg, weights):
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    shape = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                 num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                 num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                 tie_word_embeddings=False, max_position_embeddings=cfg.max_position_embeddings,
                 attention_bias=False, moe_intermediate_size=cfg.moe_ffn_hidden_size,
                 num_experts_per_tok=cfg.moe_topk, attn_implementation="sdpa")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rotary_percent}
    hf = to_hf(cfg, weights)
    if cfg.arch == "llada2":
        assert cfg.moe_shared_ffn_hidden_size == cfg.moe_ffn_hidden_size and cfg.moe_topk == 2 * cfg.moe_group_topk
        model = Glm4MoeForCausalLM(Glm4MoeConfig(
            n_routed_experts=cfg.moe_num_experts, n_shared_experts=1, routed_scaling_factor=cfg.moe_topk_scaling,
            n_group=cfg.moe_num_groups, topk_group=cfg.moe_group_topk, first_k_dense_replace=cfg.moe_dense_layers,
            norm_topk_prob=True, use_qk_norm=True, rope_parameters=rope, **shape))
        state = _glm4_state(cfg, hf)
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            num_experts=cfg.moe_num_experts, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
            use_sliding_window=False, rope_parameters=rope, **shape))
        state = _qwen3_state(cfg, hf)
    model = model.eval()
    model.load_state_dict(state, strict=True)
    return model


def _hf_logits(model, ids):
    b, s = ids.shape
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.zeros(b, 1, s, s)).logits


def _ids(cfg, seed=0):
    return torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["llada2", "llada_moe"])
def setup(request):
    cfg = _cfg(request.param)
    weights = init_weights(cfg, seed=1)
    return cfg, weights, _hf_model(cfg, weights)


def test_dense_reference_equals_transformers(setup):
    cfg, weights, model = setup
    ids = _ids(cfg)
    want = _hf_logits(model, ids)
    got = dense_forward(cfg, weights, ids)
    assert got.shape == want.shape == (BATCH, SEQ, cfg.vocab_size)
    assert (got - want).abs().max().item() / want.abs().max().item() < 1e-5
    # float64 maths in the reference gives the same logits (the routing does not flip).
    got64 = dense_forward(cfg, {k: v.double() for k, v in weights.items()}, ids)
    assert (got64 - want).abs().max().item() / want.abs().max().item() < 1e-5


def test_attention_is_bidirectional(setup):
    cfg, weights, model = setup
    ids = _ids(cfg)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % cfg.vocab_size
    assert (_hf_logits(model, ids)[:, 0] - _hf_logits(model, changed)[:, 0]).abs().max() > 1e-6
    assert (dense_forward(cfg, weights, ids)[:, 0] - dense_forward(cfg, weights, changed)[:, 0]).abs().max() > 1e-6


def test_expert_bias_changes_the_choice_only():
    """The expert bias moves the choice of experts, never the weight of a chosen one: weights are the unbiased
    sigmoid scores of the chosen experts, renormalised and x2.5 (written out here)."""
    cfg = _cfg("llada2")
    w = init_weights(cfg, seed=1)
    router, bias = w["layers.1.router"], w["layers.1.expert_bias"]
    assert bias.abs().min() > 0
    x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    chosen, weights = route(cfg, router, bias, x)
    plain, _ = route(cfg, router, None, x)
    assert not torch.equal(chosen.sort(-1).values, plain.sort(-1).values), "the bias should change some choices"
    scores = torch.sigmoid(x @ router.T).gather(1, chosen)
    assert torch.allclose(weights, 2.5 * scores / scores.sum(-1, keepdim=True), rtol=1e-6, atol=0)
    # Only experts of the moe_group_topk best groups (group score: the sum of its top-2 biased scores) are chosen.
    biased = (torch.sigmoid(x @ router.T) + bias).view(64, cfg.moe_num_groups, -1)
    best = biased.topk(2, -1).values.sum(-1).topk(cfg.moe_group_topk, -1).indices
    group = chosen // (cfg.moe_num_experts // cfg.moe_num_groups)
    assert all(set(group[t].tolist()) <= set(best[t].tolist()) for t in range(64))
