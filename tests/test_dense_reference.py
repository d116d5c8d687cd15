"""The dense reference model equals transformers' own Llama (LLaDA maths) and Qwen2 (Dream maths) in float64.

The transformers models are run bidirectionally by passing a 4D additive float mask of zeros [B, 1, S, S]
(transformers returns a prepared 4D mask as-is, and SDPA is then called with is_causal=False); the tests check
that this really is non-causal.
"""

from __future__ import annotations

import pytest
import torch

from mdu_dist.config import load_config
from mdu_dist.models.dense import count_parameters, dense_forward, from_hf, init_weights, to_hf

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=301"]
BATCH, SEQ = 2, 9

# LLaDA HF name -> the same tensor in transformers' Llama: the map is written out here, independently of
# mdu_dist.models.llada, so a wrong name there fails this test.
LLADA_TO_LLAMA = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight",
    "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight",
    "attn_out.weight": "self_attn.o_proj.weight",
    "ff_norm.weight": "post_attention_layernorm.weight",
    "ff_proj.weight": "mlp.gate_proj.weight",
    "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}


def _cfg(arch: str, *overrides: str):
    return load_config(f"configs/{arch}_tiny.yaml", TINY + list(overrides)).model


def _llama_name(llada_name: str) -> str:
    prefix = "model.transformer.blocks."
    if not llada_name.startswith(prefix):
        return LLADA_TO_LLAMA[llada_name]
    i, tensor = llada_name[len(prefix):].split(".", 1)
    return f"model.layers.{i}.{LLADA_TO_LLAMA[tensor]}"


def _hf_model(cfg, weights):
    """transformers' Llama (LLaDA) or Qwen2 (Dream) in float64 holding ``weights``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                 num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                 num_key_value_heads=cfg.num_query_groups, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                 max_position_embeddings=cfg.max_position_embeddings, attn_implementation="sdpa")
    if cfg.arch == "llada":
        model = LlamaForCausalLM(LlamaConfig(attention_bias=False, **shape))
        state = {_llama_name(k): v for k, v in to_hf(cfg, weights).items()}
    else:
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=False, **shape))
        state = to_hf(cfg, weights)  # Dream's HF names are Qwen2's
    model = model.to(torch.float64).eval()
    model.load_state_dict(state, strict=True)
    return model


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    b, s = ids.shape
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.zeros(b, 1, s, s, dtype=torch.float64)).logits


def _shift(logits: torch.Tensor) -> torch.Tensor:
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def _ids(cfg, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _with_last_token_changed(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % vocab
    return changed


@pytest.fixture(scope="module", params=["llada", "dream"])
def setup(request):
    cfg = _cfg(request.param)
    weights = init_weights(cfg, seed=1, dtype=torch.float64)
    return cfg, weights, _hf_model(cfg, weights)


def test_dense_equals_transformers_float64(setup):
    cfg, weights, model = setup
    ids = _ids(cfg)
    want = _hf_logits(model, ids)
    if cfg.arch == "dream":
        want = _shift(want)
    got = dense_forward(cfg, weights, ids)
    assert got.shape == (BATCH, SEQ, cfg.vocab_size) and got.dtype == torch.float64
    assert (got - want).abs().max().item() < 1e-10


def test_attention_is_bidirectional(setup):
    cfg, weights, model = setup
    ids = _ids(cfg)
    changed = _with_last_token_changed(ids, cfg.vocab_size)
    # The oracle itself: is the transformers run really non-causal?
    hf_delta = (_hf_logits(model, ids)[:, 0] - _hf_logits(model, changed)[:, 0]).abs().max().item()
    assert hf_delta > 1e-6
    # Dense position 0 is unshifted position 0 for both backbones.
    delta = (dense_forward(cfg, weights, ids)[:, 0] - dense_forward(cfg, weights, changed)[:, 0]).abs().max()
    assert delta.item() > 1e-6


def test_dream_logits_are_shifted_right_by_one():
    cfg = _cfg("dream")
    weights = init_weights(cfg, seed=2, dtype=torch.float64)
    ids = _ids(cfg, seed=3)
    shifted = dense_forward(cfg, weights, ids)
    unshifted = _hf_logits(_hf_model(cfg, weights), ids)  # Qwen2 = Dream's maths before the shift
    assert torch.allclose(shifted[:, 0], unshifted[:, 0], rtol=0, atol=1e-10)
    assert torch.allclose(shifted[:, 1:], unshifted[:, :-1], rtol=0, atol=1e-10)


def test_gradients_reach_every_weight():
    for arch in ("llada", "dream"):
        cfg = _cfg(arch)
        leaves = {k: v.requires_grad_(True) for k, v in init_weights(cfg, seed=4).items()}
        dense_forward(cfg, leaves, _ids(cfg)).square().sum().backward()
        missing = [k for k, v in leaves.items() if v.grad is None or not v.grad.abs().sum() > 0]
        assert not missing, f"{arch}: no gradient for {missing}"


def test_init_weights_deterministic_per_seed():
    cfg = _cfg("dream")
    a, b, c = init_weights(cfg, seed=5), init_weights(cfg, seed=5), init_weights(cfg, seed=6)
    assert list(a) == list(b) == list(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)
    norm, bias = a["layers.0.attn_norm"], a["layers.0.q_bias"]
    assert not torch.equal(norm, torch.ones_like(norm)) and bias.abs().sum() > 0
    # The same seed gives the same model in any dtype, up to rounding.
    assert torch.equal(init_weights(cfg, seed=5, dtype=torch.float64)["embed"], a["embed"].double())


def test_hf_names_round_trip_and_errors():
    cfg = _cfg("dream")
    weights = init_weights(cfg)
    hf = to_hf(cfg, weights)
    assert "model.layers.1.self_attn.k_proj.bias" in hf and "lm_head.weight" in hf
    back = from_hf(cfg, hf)
    assert list(back) == list(weights) and all(back[k] is weights[k] for k in weights)

    bad = dict(hf)
    del bad["model.norm.weight"]
    bad["extra.weight"] = torch.zeros(1)
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 4)
    with pytest.raises(ValueError) as e:
        from_hf(cfg, bad)
    msg = str(e.value)
    assert "model.norm.weight" in msg and "extra.weight" in msg
    assert "model.layers.0.self_attn.q_proj.weight: expected shape [64, 64], got [3, 4]" in msg


def test_parameter_count_llada_8b():
    cfg = load_config("configs/llada_8b.yaml").model
    v, h, f, n = 126464, 4096, 12288, 32
    per_layer = 4 * h * h + 3 * h * f + 2 * h  # q, k, v, o (MHA); gate, up, down; two norms
    expected = 2 * v * h + n * per_layer + h  # untied embedding and head; final norm
    assert expected == 8_015_581_184
    assert count_parameters(cfg) == expected


def test_parameter_count_dream_7b():
    cfg = load_config("configs/dream_7b.yaml").model
    v, h, f, n, heads, groups = 152064, 3584, 18944, 28, 28, 4
    hd = h // heads
    attn = h * heads * hd + 2 * h * groups * hd + heads * hd * h + (heads + 2 * groups) * hd  # q, k, v, o, biases
    expected = 2 * v * h + n * (attn + 3 * h * f + 2 * h) + h
    assert expected == 7_615_616_512
    assert count_parameters(cfg) == expected
