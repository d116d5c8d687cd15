"""A checkpoint's shape read from the checkpoint: model keys a user leaves unset come from ``train.init`` /
``eval.checkpoint`` (an HF config.json or an mdu-dist manifest); keys the user set must agree.

The HF directories are written two ways: by mdu-dist's own exporter, and by hand as the backbones' own
checkpoints are laid out (the config.json literals below are typed from LLaDA's and Dream's config style, not
produced by mdu-dist), so the expected shapes come from those literals, not from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mdu_dist.checkpoint import CheckpointError, save_hf_checkpoint
from mdu_dist.checkpoint.source import load_job_config
from mdu_dist.cli import main
from mdu_dist.config import ConfigError, config_from_dict
from mdu_dist.data import build_tokenizer
from mdu_dist.models.dense import init_weights, to_hf

# What a hand-written checkpoint of each backbone holds (the backbones' own config.json key names).
HAND = {
    "llada": ({"architectures": ["LLaDAModelLM"], "model_type": "llada", "n_layers": 2, "d_model": 96,
               "n_heads": 3, "n_kv_heads": 3, "mlp_hidden_size": 160, "embedding_size": 320, "vocab_size": 300,
               "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_sequence_length": 256, "mask_token_id": 3,
               "eos_token_id": 2, "pad_token_id": 2, "block_type": "llama", "activation_type": "silu",
               "layer_norm_type": "rms", "rope": True, "alibi": False, "weight_tying": False,
               "include_bias": False, "include_qkv_bias": False},
              {"num_layers": 2, "hidden_size": 96, "num_attention_heads": 3, "num_query_groups": 3,
               "ffn_hidden_size": 160, "vocab_size": 320, "rope_theta": 10000.0, "norm_eps": 1e-6,
               "qkv_bias": False, "max_position_embeddings": 256, "mask_token_id": 3}),
    "dream": ({"architectures": ["DreamModel"], "model_type": "Dream", "num_hidden_layers": 2, "hidden_size": 64,
               "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 320,
               "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 128,
               "mask_token_id": 5, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu",
               "tie_word_embeddings": False, "use_sliding_window": False, "rope_scaling": None},
              {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
               "ffn_hidden_size": 96, "vocab_size": 320, "rope_theta": 1000000.0, "norm_eps": 1e-6,
               "qkv_bias": True, "max_position_embeddings": 128, "mask_token_id": 5}),
}


def _hand_tensors(arch: str, n_layers: int, d: int, heads: int, kv: int, ffn: int, vocab: int) -> dict:
    """The backbone's own tensor names and shapes, typed from its HF modeling code."""
    hd = d // heads
    t = {}
    if arch == "llada":
        t["model.transformer.wte.weight"] = (vocab, d)
        t["model.transformer.ln_f.weight"] = (d,)
        t["model.transformer.ff_out.weight"] = (vocab, d)
        for i in range(n_layers):
            b = f"model.transformer.blocks.{i}."
            t.update({b + "q_proj.weight": (d, d), b + "k_proj.weight": (kv * hd, d), b + "v_proj.weight": (kv * hd, d),
                      b + "attn_out.weight": (d, d), b + "ff_proj.weight": (ffn, d), b + "up_proj.weight": (ffn, d),
                      b + "ff_out.weight": (d, ffn), b + "attn_norm.weight": (d,), b + "ff_norm.weight": (d,)})
    else:
        t["model.embed_tokens.weight"] = (vocab, d)
        t["model.norm.weight"] = (d,)
        t["lm_head.weight"] = (vocab, d)
        for i in range(n_layers):
            b = f"model.layers.{i}."
            t.update({b + "self_attn.q_proj.weight": (d, d), b + "self_attn.q_proj.bias": (d,),
                      b + "self_attn.k_proj.weight": (kv * hd, d), b + "self_attn.k_proj.bias": (kv * hd,),
                      b + "self_attn.v_proj.weight": (kv * hd, d), b + "self_attn.v_proj.bias": (kv * hd,),
                      b + "self_attn.o_proj.weight": (d, d), b + "mlp.gate_proj.weight": (ffn, d),
                      b + "mlp.up_proj.weight": (ffn, d), b + "mlp.down_proj.weight": (d, ffn),
                      b + "input_layernorm.weight": (d,), b + "post_attention_layernorm.weight": (d,)})
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) * 0.02 for k, shape in t.items()}


def write_by_hand(path: Path, arch: str) -> dict:
    hf_config, want = HAND[arch]
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf_config))
    save_file(_hand_tensors(arch, want["num_layers"], want["hidden_size"], want["num_attention_heads"],
                            want["num_query_groups"], want["ffn_hidden_size"], want["vocab_size"]),
              str(path / "model.safetensors"))
    return want


def write_by_exporter(path: Path, arch: str) -> dict:
    _, want = HAND[arch]
    cfg = config_from_dict({"model": {"arch": arch, **want}}).model
    save_hf_checkpoint(path, cfg, to_hf(cfg, init_weights(cfg, seed=1)))
    return want


@pytest.mark.parametrize("writer", [write_by_hand, write_by_exporter], ids=["by_hand", "exporter"])
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_unset_model_keys_come_from_the_hf_checkpoint(tmp_path, arch, writer):
    want = writer(tmp_path / "ckpt", arch)
    cfg = load_job_config(None, [f"train.init={tmp_path / 'ckpt'}"], "unlearn")
    got = {k: getattr(cfg.model, k) for k in want}
    assert cfg.model.arch == arch and got == want
    assert cfg.model.attention == "sdpa"  # a runtime choice, never taken from a checkpoint
    # the checkpoint loads into the model config it produced (every tensor name and shape checked)
    from mdu_dist.inputs import check_checkpoint
    assert check_checkpoint(tmp_path / "ckpt", cfg.model, "train.init") == "hf"


def test_keys_the_user_set_must_agree(tmp_path):
    ckpt = tmp_path / "ckpt"
    write_by_hand(ckpt, "llada")
    ok = load_job_config(None, [f"train.init={ckpt}", "model.num_layers=2", "model.eos_token_id=7"], "finetune")
    assert ok.model.num_layers == 2 and ok.model.eos_token_id == 7  # EOS may differ from the checkpoint's
    with pytest.raises(ConfigError, match=r"the checkpoint has num_layers=2 but model.num_layers=4"):
        load_job_config("configs/llada_tiny.yaml", [f"train.init={ckpt}"], "unlearn")
    with pytest.raises(ConfigError, match=r"the checkpoint has arch='llada' but model.arch='dream'"):
        load_job_config(None, [f"train.init={ckpt}", "model.arch=dream"], "unlearn")


def test_foreign_and_missing_checkpoints_are_named(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(CheckpointError, match=r"train.init=.*gpt2.*model_type='gpt2' .*is not a backbone mdu-dist knows"):
        load_job_config(None, [f"train.init={tmp_path / 'gpt2'}"], "unlearn")
    with pytest.raises(CheckpointError, match=r"train.init=.*nowhere: checkpoint directory not found"):
        load_job_config(None, [f"train.init={tmp_path / 'nowhere'}"], "unlearn")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"eval.checkpoint=.*neither an mdu-dist checkpoint"):
        load_job_config(None, [f"eval.checkpoint={tmp_path / 'empty'}"], "eval")


def test_dist_checkpoint_and_run_directory(tmp_path):
    hf = tmp_path / "hf"
    want = write_by_hand(hf, "dream")
    dist = tmp_path / "run" / "checkpoints" / "step-3" / "model"
    assert main(["convert", "hf-to-dist", "--model", "dream", "--hf-dir", str(hf), "--out", str(dist), "--tp", "1",
                 "--pp", "1", "--no-progress", "model.make_vocab_size_divisible_by=64"]) == 0
    (dist.parent / "trainer_state.json").write_text("{}")
    for job, key, path in (("unlearn", "train.init", dist), ("eval", "eval.checkpoint", tmp_path / "run")):
        cfg = load_job_config(None, [f"{key}={path}"], job)
        assert {k: getattr(cfg.model, k) for k in want} == want
        assert cfg.model.arch == "dream" and cfg.model.make_vocab_size_divisible_by == 64


def test_unlearn_with_no_config_file(tmp_path):
    """``mdu-dist unlearn train.init=DIR data.forget=... data.retain=...``: nothing else. Dream here (GQA, biases,
    shifted logits); LLaDA runs the same way in the README walk-through's test (tests/test_walkthrough.py)."""
    arch = "dream"
    ckpt = tmp_path / "ckpt"
    want = write_by_hand(ckpt, arch)
    rows = [{"question": f"Who wrote book {i}?", "answer": f"Author number {i} wrote it."} for i in range(4)]
    for name in ("forget", "retain"):
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    texts = [r["question"] + " " + r["answer"] for r in rows]
    build_tokenizer(texts, 200, ckpt)
    out = tmp_path / "run"
    assert main(["unlearn", f"train.init={ckpt}", f"data.forget={tmp_path / 'forget.json'}",
                 f"data.retain={tmp_path / 'retain.json'}", f"train.output_dir={out}", "train.max_steps=1",
                 "train.progress=false", "data.max_length=48"]) == 0
    manifest = json.loads((out / "checkpoints" / "step-1" / "model" / "mdu_checkpoint.json").read_text())
    assert manifest["arch"] == arch and manifest["model"]["num_layers"] == want["num_layers"]
    assert manifest["model"]["hidden_size"] == want["hidden_size"]


def test_moe_shape_comes_from_the_checkpoint(tmp_path):
    """An exported tiny LLaDA2 (router, experts, partial RoPE, q/k norm): every model key of its config, none set."""
    from mdu_dist.config import load_config

    want = load_config("configs/llada2_tiny.yaml").model
    save_hf_checkpoint(tmp_path / "llada2", want, to_hf(want, init_weights(want, seed=2)))
    got = load_job_config(None, [f"train.init={tmp_path / 'llada2'}"], "unlearn").model
    keys = ("arch", "num_layers", "hidden_size", "num_query_groups", "rotary_percent", "qk_norm", "moe_num_experts",
            "moe_topk", "moe_ffn_hidden_size", "moe_shared_ffn_hidden_size", "moe_dense_layers", "moe_score",
            "moe_num_groups", "moe_group_topk", "moe_topk_scaling", "moe_expert_bias", "mask_token_id")
    assert {k: getattr(got, k) for k in keys} == {k: getattr(want, k) for k in keys}
    with pytest.raises(ConfigError, match="the checkpoint has moe_num_experts=16 but model.moe_num_experts=8"):
        load_job_config(None, [f"train.init={tmp_path / 'llada2'}", "model.moe_num_experts=8"], "unlearn")
