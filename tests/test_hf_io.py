"""HF-layout safetensors checkpoints: bit-exact round trips (single file, sharded, bf16) and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mdu_dist.checkpoint import (CheckpointError, hf_config_to_model_config, load_hf_checkpoint,
                                 model_config_to_hf_config, save_hf_checkpoint)
from mdu_dist.config import ConfigError, load_config
from mdu_dist.models.dense import init_weights, to_hf

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=48", "model.vocab_size=97"]


def _cfg(arch: str, *overrides: str):
    return load_config(f"configs/{arch}_tiny.yaml", TINY + list(overrides)).model


def _hf(cfg, dtype=torch.float32):
    return to_hf(cfg, init_weights(cfg, seed=0, dtype=dtype))


def _assert_identical(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_single_file_round_trip(tmp_path, arch):
    cfg = _cfg(arch)
    hf = _hf(cfg)
    out = save_hf_checkpoint(tmp_path / "ckpt", cfg, hf)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert _siblings(out) == ["ckpt"]  # no temporary directory left behind
    loaded_cfg, loaded = load_hf_checkpoint(out, None, arch)
    assert loaded_cfg == cfg
    _assert_identical(loaded, hf)
    cfg_given, _ = load_hf_checkpoint(out, cfg, arch)
    assert cfg_given is cfg


def test_config_json_in_backbone_style():
    llada = model_config_to_hf_config(load_config("configs/llada_8b.yaml").model, torch.bfloat16)
    assert llada["model_type"] == "llada" and llada["architectures"] == ["LLaDAModelLM"]
    assert (llada["d_model"], llada["n_layers"], llada["n_heads"], llada["n_kv_heads"]) == (4096, 32, 32, 32)
    assert (llada["mlp_hidden_size"], llada["vocab_size"], llada["embedding_size"]) == (12288, 126464, 126464)
    assert (llada["mask_token_id"], llada["eos_token_id"], llada["include_bias"]) == (126336, 126081, False)
    assert llada["torch_dtype"] == "bfloat16"
    dream = model_config_to_hf_config(load_config("configs/dream_7b.yaml").model)
    assert dream["model_type"] == "Dream" and dream["num_key_value_heads"] == 4
    assert (dream["hidden_size"], dream["intermediate_size"], dream["rope_theta"]) == (3584, 18944, 1e6)
    assert dream["mask_token_id"] == 151666 and dream["tie_word_embeddings"] is False
    for arch, hf in (("llada", llada), ("dream", dream)):
        cfg = hf_config_to_model_config(hf, arch)
        assert model_config_to_hf_config(cfg, torch.bfloat16 if arch == "llada" else torch.float32) == hf


def test_sharded_round_trip(tmp_path):
    cfg = _cfg("dream")
    hf = _hf(cfg)
    out = save_hf_checkpoint(tmp_path / "ckpt", cfg, hf, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(hf)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in hf.values())
    assert not (out / "model.safetensors").exists()
    _, loaded = load_hf_checkpoint(out, cfg, "dream")
    _assert_identical(loaded, hf)


def test_bf16_round_trip_keeps_dtype(tmp_path):
    cfg = _cfg("llada")
    hf = _hf(cfg, torch.bfloat16)
    out = save_hf_checkpoint(tmp_path / "ckpt", cfg, hf, max_shard_bytes=10_000)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, loaded = load_hf_checkpoint(out, None, "llada")
    _assert_identical(loaded, hf)


def test_overwrite_replaces_only_when_asked(tmp_path):
    cfg = _cfg("llada")
    out = save_hf_checkpoint(tmp_path / "ckpt", cfg, _hf(cfg))
    with pytest.raises(CheckpointError, match="already exists"):
        save_hf_checkpoint(out, cfg, _hf(cfg))
    newer = to_hf(cfg, init_weights(cfg, seed=9))
    save_hf_checkpoint(out, cfg, newer, overwrite=True)
    assert _siblings(out) == ["ckpt"]
    _assert_identical(load_hf_checkpoint(out, cfg, "llada")[1], newer)


def test_missing_shard_names_the_file(tmp_path):
    cfg = _cfg("dream")
    out = save_hf_checkpoint(tmp_path / "ckpt", cfg, _hf(cfg), max_shard_bytes=20_000)
    victim = out / "model-00002-of-{:05d}.safetensors".format(len(list(out.glob("model-*.safetensors"))))
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_hf_checkpoint(out, cfg, "dream")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0001], ids=["data", "last-byte", "header"])
def test_truncated_file_names_the_file(tmp_path, keep):
    cfg = _cfg("llada")
    out = save_hf_checkpoint(tmp_path / "ckpt", cfg, _hf(cfg))
    path = out / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_checkpoint(out, cfg, "llada")


def test_dream_checkpoint_loaded_as_llada(tmp_path):
    dream = _cfg("dream")
    out = save_hf_checkpoint(tmp_path / "dream", dream, _hf(dream))
    with pytest.raises(CheckpointError, match=r"config\.json.*model_type='Dream'"):
        load_hf_checkpoint(out, None, "llada")
    # Even with a LLaDA config.json in front of them, Dream's tensors are refused by name.
    (out / "config.json").write_text(json.dumps(model_config_to_hf_config(_cfg("llada"))))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.(embed_tokens|layers)"):
        load_hf_checkpoint(out, None, "llada")


def test_config_json_with_another_hidden_size(tmp_path):
    cfg = _cfg("llada")
    out = save_hf_checkpoint(tmp_path / "ckpt", cfg, _hf(cfg))
    config_path = out / "config.json"
    hf_config = json.loads(config_path.read_text())
    hf_config["d_model"] = 64
    config_path.write_text(json.dumps(hf_config))
    # Against the run config: the message names config.json and the field.
    with pytest.raises(CheckpointError, match=r"config\.json.*hidden_size=64.*hidden_size=32"):
        load_hf_checkpoint(out, cfg, "llada")
    # From config.json alone: the tensors do not fit, the message names one and both shapes.
    with pytest.raises(CheckpointError,
                       match=r"model\.transformer\.wte\.weight: expected shape \[97, 64\], got \[97, 32\]"):
        load_hf_checkpoint(out, None, "llada")


def test_bad_config_json_is_a_config_error():
    hf = model_config_to_hf_config(_cfg("dream"))
    del hf["num_key_value_heads"]
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        hf_config_to_model_config(hf, "dream", source="x/config.json")


def test_wrong_tensors_are_refused_before_writing(tmp_path):
    cfg = _cfg("llada")
    hf = _hf(cfg)
    hf["model.transformer.ln_f.weight"] = torch.ones(5)
    with pytest.raises(CheckpointError, match=r"ln_f\.weight: expected shape \[32\], got \[5\]"):
        save_hf_checkpoint(tmp_path / "ckpt", cfg, hf)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_nothing(tmp_path):
    cfg = _cfg("llada")
    hf = _hf(cfg)
    # A meta tensor has the right shape but no data: the first shards are written, then saving fails.
    last = "model.transformer.ff_out.weight"
    hf[last] = torch.empty(hf[last].shape, device="meta")
    with pytest.raises(Exception):
        save_hf_checkpoint(tmp_path / "ckpt", cfg, hf, max_shard_bytes=10_000)
    assert list(tmp_path.iterdir()) == []
