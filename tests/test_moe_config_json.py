"""The released config.json files of the MoE backbones pick the right backbone and the values of their configs.

LLaDA2.0 / 2.1-mini: the file as published (LLaDA2.1-mini's on its HF page; vllm-project/dllm-plugin keeps a
copy of it, without model_type and auto_map, in tests/fixtures/llada2_mini/config.json) gives
``configs/llada2_mini.yaml`` field for field.

LLaDA-MoE-7B-A1B: a config.json written the way its HF repository's is picks ``llada_moe`` and the values of
``configs/llada_moe_7b.yaml``.

The released config.json could not be read here (docs/moe.md says what was searched), so this one is rebuilt:
its keys are every attribute the repository's config class (``configuration_lladamoe.LLaDAConfig``, model_type
"llada") stores, serialised as ``save_pretrained`` does (sorted keys, two-space indent); its values are the
published architecture (16 layers x 2048, 16 heads, 64 experts top-8 of width 1024, dense width 8192, RoPE base
50000, 8k positions) and the LLaDA2 tokenizer's ids. Written out it is 64 lines and 1,427 bytes: the Instruct
repository's first commit adds a 64-line config.json and the Base repository lists a 1.42 kB one.

What the HF code reads differently from a plain equality is tested too: ``qk_layernorm`` and
``moe_router_enable_expert_bias`` are read as truth values (null / absent = false), ``moe_router_score_function``
and ``norm_topk_prob`` are never read (always a softmax, never renormalised), and ``partial_rotary_factor`` has
no usable default (-1: no dimension rotated), so a config.json without it is refused.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

RELEASED_STYLE = {
    "architectures": ["LLaDAMoEModelLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAConfig",
                 "AutoModel": "modeling_lladamoe.LLaDAMoEModel",
                 "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
    "clip_qkv": None,
    "dense_intermediate_size": 8192,
    "eos_token_id": 156892,
    "expert_intermediate_size": 1024,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "max_position_embeddings": 8192,
    "model_type": "llada",
    "moe_layer_freq": [1] * 16,
    "moe_router_enable_expert_bias": False,
    "moe_router_score_function": "softmax",
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 16,
    "num_key_value_heads": 16,
    "output_router_logits": False,
    "pad_token_id": 156892,
    "partial_rotary_factor": 1.0,
    "qk_layernorm": True,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 50000,
    "routed_scaling_factor": 1,
    "router_aux_loss_coef": 0.01,
    "router_num_group": None,
    "router_topk_group": None,
    "shared_expert_intermediate_size": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.52.4",
    "use_cache": False,
    "vocab_size": 157184,
}
DROP = object()  # a key left out of config.json

LLADA2_MINI = {
    "architectures": ["LLaDA2MoeModelLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                 "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                 "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
    "dtype": "bfloat16", "embedding_dropout": 0.0, "first_k_dense_replace": 1, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5120, "max_position_embeddings": 32768,
    "max_window_layers": 28, "model_type": "llada2_moe", "moe_intermediate_size": 512,
    "moe_router_enable_expert_bias": True, "n_group": 8, "norm_head": False, "norm_softmax": False,
    "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 256, "num_experts_per_tok": 8,
    "num_hidden_layers": 20, "num_key_value_heads": 4, "num_shared_experts": 1, "output_dropout": 0.0,
    "output_router_logits": False, "pad_token_id": 156892, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 600000, "rotary_dim": 64, "routed_scaling_factor": 2.5, "router_dtype": "fp32",
    "score_function": "sigmoid", "sliding_window": 4096, "tie_word_embeddings": False, "topk_group": 4,
    "transformers_version": "4.57.1", "use_bias": False, "use_cache": False, "use_qkv_bias": False,
    "use_rmsnorm": True, "use_sliding_window": False, "using_split_qkv_in_self_attention": False,
    "vocab_size": 157184,
}


def _write(tmp_path, **changes):
    hf = {**RELEASED_STYLE, **changes}
    hf = {k: v for k, v in hf.items() if v is not DROP}
    (tmp_path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return tmp_path


def _yaml_model(name="llada_moe_7b"):
    from mdu_dist.config import load_config

    return load_config(f"configs/{name}.yaml").model


def test_the_released_llada2_mini_config_gives_the_mini_config(tmp_path):
    from mdu_dist.checkpoint.hf import arch_of_hf_config
    from mdu_dist.checkpoint.source import load_job_config

    (tmp_path / "config.json").write_text(json.dumps(LLADA2_MINI, indent=2) + "\n")
    assert arch_of_hf_config(LLADA2_MINI) == "llada2"
    cfg = load_job_config(None, [f"train.init={tmp_path}"], "unlearn")
    # Its mask and EOS ids are not in config.json: the tokenizer's <|mask|> 156895 and <|endoftext|> 156892; nor
    # is its block size (32), nor how it is trained and sampled (the two-copy layout, the block sampler).
    assert dataclasses.asdict(cfg.model) == dataclasses.asdict(_yaml_model("llada2_mini"))
    assert (cfg.data.layout, cfg.eval.sampler) == ("block", "block")


@pytest.mark.parametrize("overrides,want", [
    (["data.layout=full"], ("full", "block")),
    (["eval.sampler=low_confidence"], ("block", "low_confidence")),
    (["model.block_size=0"], ("full", "")),
])
def test_a_llada2_config_json_leaves_the_block_recipe_to_the_user(tmp_path, overrides, want):
    from mdu_dist.checkpoint.source import load_job_config

    (tmp_path / "config.json").write_text(json.dumps(LLADA2_MINI, indent=2) + "\n")
    cfg = load_job_config(None, [f"train.init={tmp_path}", *overrides], "unlearn")
    assert (cfg.data.layout, cfg.eval.sampler) == want


def test_the_rebuilt_file_has_the_released_size(tmp_path):
    text = (_write(tmp_path) / "config.json").read_text()
    assert (len(text.splitlines()), len(text.encode())) == (64, 1427)


def test_it_picks_llada_moe_and_the_values_of_the_7b_config(tmp_path):
    from mdu_dist.checkpoint.hf import MUST_MATCH, arch_of_hf_config, hf_model_keys

    assert arch_of_hf_config(RELEASED_STYLE) == "llada_moe"  # model_type "llada" is the dense LLaDA's too
    keys = hf_model_keys(RELEASED_STYLE)
    want = _yaml_model()
    for name in ("arch", *MUST_MATCH, "eos_token_id", "pad_token_id", "max_position_embeddings"):
        assert keys[name] == getattr(want, name), name
    assert (keys["rotary_percent"], keys["moe_renormalize"], keys["moe_score"], keys["moe_expert_bias"],
            keys["moe_dense_layers"], keys["moe_shared_ffn_hidden_size"]) == (1.0, False, "softmax", False, 0, 0)


def test_load_job_config_takes_the_model_from_that_file(tmp_path):
    from mdu_dist.checkpoint.source import load_job_config

    cfg = load_job_config(None, [f"train.init={_write(tmp_path)}"], "unlearn")
    # The padding rule and the initialisation scale are not in config.json: the 7b config keeps the defaults.
    assert dataclasses.asdict(cfg.model) == dataclasses.asdict(_yaml_model())


@pytest.mark.parametrize("changes", [
    {"moe_router_enable_expert_bias": None}, {"moe_router_enable_expert_bias": DROP},
    {"moe_router_score_function": None}, {"moe_router_score_function": DROP}, {"norm_topk_prob": None},
    {"partial_rotary_factor": 1}, {"rope_theta": 50000.0}, {"eos_token_id": DROP},
], ids=lambda c: "-".join(f"{k}={'absent' if v is DROP else v}" for k, v in c.items()))
def test_what_the_hf_code_reads_the_same_imports_the_same(tmp_path, changes):
    from mdu_dist.checkpoint.hf import hf_model_keys

    assert hf_model_keys({k: v for k, v in {**RELEASED_STYLE, **changes}.items() if v is not DROP}) == \
        hf_model_keys(RELEASED_STYLE)


@pytest.mark.parametrize("changes, named", [
    ({"qk_layernorm": DROP}, "qk_layernorm=None"),  # LLaDAConfig's default: no q/k norm at all
    ({"qk_layernorm": None}, "qk_layernorm=None"),
    ({"qk_layernorm": False}, "qk_layernorm=False"),
    ({"partial_rotary_factor": DROP}, "missing key 'partial_rotary_factor'"),
    ({"moe_router_enable_expert_bias": True}, "moe_router_enable_expert_bias=True"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=True"),
    ({"moe_layer_freq": [1] * 15}, "moe_layer_freq"),
])
def test_another_model_is_refused_in_one_line_naming_the_key(tmp_path, changes, named):
    from mdu_dist.checkpoint.source import load_job_config
    from mdu_dist.checkpoint.errors import CheckpointError

    with pytest.raises(CheckpointError) as e:
        load_job_config(None, [f"train.init={_write(tmp_path, **changes)}"], "unlearn")
    message = str(e.value)
    assert named in message and "config.json" in message and "\n" not in message
