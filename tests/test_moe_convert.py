"""HF <-> dist conversion of the mixture-of-experts backbones (tiny LLaDA2 and LLaDA-MoE).

- every rank's parameters read block by block from the HF files (LLaDA2's fused [q; k; v] rows included) equal
  the TP/PP adapter on the whole tensors;
- HF (bf16 weights, the fp32 expert-bias buffer, several shards with an index) -> dist at PP=2 -> reshard to
  PP=1 -> HF gives back every tensor bit for bit, in its dtype, with the same file plan and config.json;
- the exported LLaDA2 checkpoint, loaded into transformers' GLM-4-MoE (tests/test_moe_reference.py's layout
  map), gives the dense reference's logits of the original weights;
- a foreign checkpoint (GLM-4-MoE tensor names under a llada2 config.json), a truncated shard and a checkpoint
  of the other MoE backbone are refused in one line naming the file, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

MODELS = {"llada2": "configs/llada2_tiny.yaml", "llada_moe": "configs/llada_moe_tiny.yaml"}
SMALL = ["model.vocab_size=301", "model.make_vocab_size_divisible_by=8"]


def _cfg(arch: str):
    from mdu_dist.config import load_config

    return load_config(MODELS[arch], SMALL).model


def _write_hf(path, arch: str, dtype=torch.bfloat16, max_shard_bytes=40_000):
    from mdu_dist.checkpoint import save_hf_checkpoint
    from mdu_dist.models.dense import init_weights, to_hf

    cfg = _cfg(arch)
    hf = to_hf(cfg, init_weights(cfg, seed=11, dtype=dtype))
    save_hf_checkpoint(path, cfg, hf, max_shard_bytes=max_shard_bytes)
    (path / "tokenizer.json").write_text('{"model": "tiny"}\n')
    return cfg, hf


def test_config_json_round_trip_and_fields():
    from mdu_dist.checkpoint.hf import arch_of_hf_config, hf_config_to_model_config, model_config_to_hf_config

    for arch in MODELS:
        cfg = _cfg(arch)
        hf = model_config_to_hf_config(cfg, torch.bfloat16)
        assert arch_of_hf_config(hf) == arch
        # make_vocab_size_divisible_by is megatron's padding rule, block_size how a run attends (LLaDA2's
        # config.json has no such field): neither is a property of the checkpoint.
        assert dataclasses.replace(hf_config_to_model_config(hf, arch), make_vocab_size_divisible_by=8,
                                   block_size=cfg.block_size) == cfg
        assert "block_size" not in hf
    hf = model_config_to_hf_config(_cfg("llada2"))
    # LLaDA2MoeConfig's own names for what the issue lists (read from its config.json).
    assert (hf["model_type"], hf["num_experts"], hf["num_experts_per_tok"], hf["n_group"], hf["topk_group"],
            hf["routed_scaling_factor"], hf["partial_rotary_factor"], hf["num_shared_experts"],
            hf["first_k_dense_replace"], hf["score_function"]) == ("llada2_moe", 16, 4, 4, 2, 2.5, 0.5, 1, 1, "sigmoid")
    hf = model_config_to_hf_config(_cfg("llada_moe"))
    assert hf["moe_layer_freq"] == [1, 1, 1, 1] and hf["moe_router_score_function"] == "softmax"
    assert hf["architectures"] == ["LLaDAMoEModelLM"] and hf["expert_intermediate_size"] == 32


@pytest.mark.parametrize("arch", list(MODELS))
def test_streamed_rank_slices_equal_in_memory_ones(tmp_path, arch):
    from mdu_dist.checkpoint.hf import open_hf_checkpoint
    from mdu_dist.models.dense import from_hf
    from mdu_dist.models.mcore_layout import rank_tensor, shard

    cfg, hf = _write_hf(tmp_path / "hf", arch)
    canonical = from_hf(cfg, hf)
    if arch == "llada2":
        q, k, v = (canonical[f"layers.1.{n}"] for n in "qkv")
        assert torch.equal(hf["model.layers.1.attention.query_key_value.weight"], torch.cat([q, k, v]))
    with open_hf_checkpoint(tmp_path / "hf", cfg, arch) as reader:
        assert reader.dtype == torch.bfloat16  # the fp32 expert bias does not make the checkpoint "mixed"
        for pp in (1, 2, 4):
            for pp_rank in range(pp):
                for name, want in shard(cfg, canonical, 1, 0, pp, pp_rank).items():
                    got = rank_tensor(cfg, name, reader.read, 1, 0, pp, pp_rank)
                    assert got.dtype == want.dtype and torch.equal(got, want), f"{name} pp {pp_rank}/{pp}"


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("arch", list(MODELS))
def test_hf_to_dist_pp2_reshard_to_hf_bit_exact(tmp_path, arch):
    from mdu_dist.checkpoint.convert import dist_to_hf, hf_to_dist, inspect_checkpoint, reshard
    from mdu_dist.checkpoint.hf import load_hf_checkpoint

    cfg, hf = _write_hf(tmp_path / "hf", arch)
    hf_to_dist(tmp_path / "hf", tmp_path / "pp2", arch, 1, 2, progress=False)
    lines, problems = inspect_checkpoint(tmp_path / "pp2", progress=False)
    assert not problems and any(l.startswith("experts: ") for l in lines), lines
    reshard(tmp_path / "pp2", tmp_path / "pp1", 1, 1, progress=False)
    for src in ("pp2", "pp1"):
        out = tmp_path / f"back-{src}"
        dist_to_hf(tmp_path / src, out, max_shard_bytes=40_000, progress=False)
        _, back = load_hf_checkpoint(out, cfg, arch)
        assert list(back) == list(hf)
        for name, tensor in hf.items():
            assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), f"{src}: {name}"
        original, exported = _files(tmp_path / "hf"), _files(out)
        assert set(original) == set(exported)  # the same shard plan, index, config.json and tokenizer
        assert json.loads(exported["config.json"]) == json.loads(original["config.json"])
        assert exported["model.safetensors.index.json"] == original["model.safetensors.index.json"]
    bias = [n for n in hf if n.endswith("expert_bias")]
    assert (len(bias) > 0) == (arch == "llada2") and all(hf[n].dtype == torch.float32 for n in bias)


def test_exported_llada2_runs_in_transformers_glm4_moe(tmp_path):
    import test_moe_reference as ref

    from mdu_dist.checkpoint.convert import dist_to_hf, hf_to_dist
    from mdu_dist.checkpoint.hf import load_hf_checkpoint
    from mdu_dist.models.dense import dense_forward, from_hf

    cfg, hf = _write_hf(tmp_path / "hf", "llada2", dtype=torch.float32)
    hf_to_dist(tmp_path / "hf", tmp_path / "dist", "llada2", 1, 2, progress=False)
    dist_to_hf(tmp_path / "dist", tmp_path / "out", progress=False)
    _, exported = load_hf_checkpoint(tmp_path / "out", None, "llada2")
    model = ref._hf_model(cfg, from_hf(cfg, exported))
    ids = ref._ids(cfg)
    want = dense_forward(cfg, from_hf(cfg, hf), ids)
    got = ref._hf_logits(model, ids)
    assert (got - want).abs().max().item() / want.abs().max().item() < 1e-5


def _one_line(fn, *args, **kwargs) -> str:
    from mdu_dist.checkpoint.errors import CheckpointError

    with pytest.raises(CheckpointError) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_foreign_and_truncated_checkpoints_refused_in_one_line(tmp_path):
    import test_moe_reference as ref

    from mdu_dist.checkpoint.convert import hf_to_dist
    from mdu_dist.checkpoint.hf import model_config_to_hf_config

    cfg, hf = _write_hf(tmp_path / "hf", "llada2", dtype=torch.float32, max_shard_bytes=None)
    # GLM-4-MoE's tensor names (stacked experts, q/k/v apart) under LLaDA2's config.json.
    import safetensors.torch

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps(model_config_to_hf_config(cfg)))
    safetensors.torch.save_file({k: v.contiguous() for k, v in ref._glm4_state(cfg, hf).items()},
                                str(foreign / "model.safetensors"))
    message = _one_line(hf_to_dist, foreign, tmp_path / "out1", "llada2", 1, 2, progress=False)
    assert "missing 164 tensor(s)" in message and "model.word_embeddings.weight" in message
    assert "unexpected tensor(s)" in message and "model.embed_tokens.weight" in message
    # A truncated shard.
    data = (tmp_path / "hf" / "model.safetensors").read_bytes()
    (tmp_path / "hf" / "model.safetensors").write_bytes(data[: len(data) // 2])
    message = _one_line(hf_to_dist, tmp_path / "hf", tmp_path / "out2", "llada2", 1, 2, progress=False)
    assert "model.safetensors" in message and "truncated" in message
    # A LLaDA2 checkpoint converted as LLaDA-MoE.
    _write_hf(tmp_path / "hf2", "llada2")
    message = _one_line(hf_to_dist, tmp_path / "hf2", tmp_path / "out3", "llada_moe", 1, 2, progress=False)
    assert "config.json" in message and "architectures" in message
    assert not any((tmp_path / f"out{i}").exists() for i in (1, 2, 3))
