"""`mdu-dist convert` from the command line: a bf16 round trip through TP=2 worker processes, and bad inputs
refused before anything is written, with the file or tensor named."""

from __future__ import annotations

import json

import pytest
import torch

from mdu_dist.cli import main

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=48", "model.vocab_size=97",
        "model.make_vocab_size_divisible_by=8"]


def _cfg(arch: str):
    from mdu_dist.config import load_config

    return load_config(f"configs/{arch}_tiny.yaml", TINY).model


def _write_hf(path, arch: str, dtype=torch.float32, max_shard_bytes=None):
    from mdu_dist.checkpoint import save_hf_checkpoint
    from mdu_dist.models.dense import init_weights, to_hf

    cfg = _cfg(arch)
    hf = to_hf(cfg, init_weights(cfg, seed=4, dtype=dtype))
    save_hf_checkpoint(path, cfg, hf, max_shard_bytes=max_shard_bytes)
    return hf


def _nothing_written(tmp_path, out_name: str) -> None:
    names = [p.name for p in tmp_path.iterdir()]
    assert out_name not in names, f"{out_name} was created"
    assert not [n for n in names if n.startswith(f".{out_name}")], f"temporary siblings left: {names}"


def _h2d(arch, hf_dir, out, *extra):
    return main(["convert", "hf-to-dist", "--model", arch, "--hf-dir", str(hf_dir), "--out", str(out),
                 "--no-progress", *extra])


def test_bf16_multishard_round_trip_through_the_cli(tmp_path, capsys):
    from mdu_dist.checkpoint import load_hf_checkpoint

    hf = _write_hf(tmp_path / "hf", "llada", torch.bfloat16, max_shard_bytes=8_000)
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    # HF code and extra config keys survive the trip (the backbone's own code must load the result).
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_llada.LLaDAModelLM"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hf" / "modeling_llada.py").write_text("# the backbone's HF code\n")

    assert _h2d("llada", tmp_path / "hf", tmp_path / "dist", "--tp", "2", "model.make_vocab_size_divisible_by=8") == 0
    assert main(["inspect", str(tmp_path / "dist"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for line in ("architecture: llada, 2 layers x 32", "saved by TP=2 x PP=1 (vocabulary padded to 112)",
                 f"parameters: {sum(t.numel() for t in hf.values()):,}", "dtype: bfloat16",
                 "integrity: sha256 and size of every file checked: OK"):
        assert line in out

    assert main(["convert", "dist-to-hf", "--in", str(tmp_path / "dist"), "--out", str(tmp_path / "back"),
                 "--model", "llada", "--max-shard-size", "10KB", "--no-progress"]) == 0
    cfg, back = load_hf_checkpoint(tmp_path / "back", None, "llada")
    assert sorted(back) == sorted(hf)
    for name, want in hf.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], want), name
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == config
    assert (tmp_path / "back" / "modeling_llada.py").is_file() and (tmp_path / "back" / "tokenizer_config.json").is_file()
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()

    # A dist checkpoint exported as the wrong backbone, or over an existing directory, is refused.
    assert main(["convert", "dist-to-hf", "--in", str(tmp_path / "dist"), "--out", str(tmp_path / "x"),
                 "--model", "dream", "--no-progress"]) == 1
    assert "this is a llada checkpoint, not dream" in capsys.readouterr().err
    assert main(["convert", "dist-to-hf", "--in", str(tmp_path / "dist"), "--out", str(tmp_path / "back"),
                 "--no-progress"]) == 1
    assert "already exists" in capsys.readouterr().err
    _nothing_written(tmp_path, "x")


@pytest.fixture
def sharded_dream(tmp_path):
    _write_hf(tmp_path / "hf", "dream", max_shard_bytes=6_000)
    return tmp_path / "hf"


def test_missing_shard(tmp_path, sharded_dream, capsys):
    victim = sorted(sharded_dream.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert _h2d("dream", sharded_dream, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert victim.name in err and "missing" in err
    _nothing_written(tmp_path, "out")


def test_truncated_safetensors(tmp_path, sharded_dream, capsys):
    victim = sorted(sharded_dream.glob("model-*.safetensors"))[2]
    victim.write_bytes(victim.read_bytes()[:-100])
    assert _h2d("dream", sharded_dream, tmp_path / "out", "--tp", "2") == 1
    err = capsys.readouterr().err
    assert victim.name in err and "truncated or corrupt" in err
    _nothing_written(tmp_path, "out")


def test_dream_checkpoint_passed_as_llada(tmp_path, sharded_dream, capsys):
    assert _h2d("llada", sharded_dream, tmp_path / "out") == 1
    assert "config.json: model_type='Dream' but a llada checkpoint has model_type='llada'" in capsys.readouterr().err
    _nothing_written(tmp_path, "out")


def test_config_json_with_other_shapes(tmp_path, sharded_dream, capsys):
    config = json.loads((sharded_dream / "config.json").read_text())
    config["intermediate_size"] = 64
    (sharded_dream / "config.json").write_text(json.dumps(config))
    assert _h2d("dream", sharded_dream, tmp_path / "out") == 1
    assert "tensor model.layers.0.mlp.gate_proj.weight: expected shape [64, 32], got [48, 32]" in capsys.readouterr().err
    # Against a run config, the disagreeing field is named.
    assert _h2d("dream", sharded_dream, tmp_path / "out", "--config", "configs/dream_tiny.yaml", *TINY) == 1
    assert "the checkpoint has ffn_hidden_size=64 but the model config has ffn_hidden_size=48" in \
        capsys.readouterr().err
    _nothing_written(tmp_path, "out")


def test_layouts_and_dtypes_refused_up_front(tmp_path, sharded_dream, capsys):
    assert _h2d("dream", sharded_dream, tmp_path / "out", "--tp", "4") == 1  # 2 KV heads
    assert "parallel.tensor=4 does not divide the KV heads (num_query_groups=2)" in capsys.readouterr().err
    assert _h2d("dream", sharded_dream, tmp_path / "out", "--pp", "3") == 1
    assert "parallel.pipeline=3 does not divide num_layers=2" in capsys.readouterr().err
    assert _h2d("dream", sharded_dream, tmp_path / "out", "model.vocab_multiple=8") == 2  # a config error
    assert "unknown key model.vocab_multiple" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    assert _h2d("dream", sharded_dream, tmp_path / "out") == 1
    assert "already exists" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []

    mixed = _write_hf(tmp_path / "mixed", "llada", max_shard_bytes=6_000)
    from mdu_dist.checkpoint import save_hf_checkpoint

    mixed["model.transformer.ln_f.weight"] = mixed["model.transformer.ln_f.weight"].to(torch.bfloat16)
    save_hf_checkpoint(tmp_path / "mixed", _cfg("llada"), mixed, overwrite=True)
    assert _h2d("llada", tmp_path / "mixed", tmp_path / "out2") == 1
    err = capsys.readouterr().err
    assert "mixed dtypes" in err and "model.transformer.ln_f.weight is torch.bfloat16" in err and "--dtype" in err
    _nothing_written(tmp_path, "out2")


def test_worker_failure_leaves_no_output(tmp_path, sharded_dream, monkeypatch):
    """Whatever fails once the workers run (here: after they wrote part of the output), nothing is left."""
    from mdu_dist.checkpoint import convert
    from mdu_dist.checkpoint.atomic import partial_path
    from mdu_dist.checkpoint.errors import CheckpointError

    def failing_workers(fn, world_size, *args, **kwargs):
        out = partial_path(tmp_path / "out")
        (out / "model").mkdir(parents=True)
        (out / "model" / "__0_0.distcp").write_bytes(b"half")
        raise CheckpointError("rank 1 died")

    monkeypatch.setattr(convert, "run_ranks", failing_workers)
    with pytest.raises(CheckpointError, match="rank 1 died"):
        convert.hf_to_dist(sharded_dream, tmp_path / "out", "dream", 1, 1, progress=False)
    _nothing_written(tmp_path, "out")
