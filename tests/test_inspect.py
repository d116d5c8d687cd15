"""`mdu-dist inspect`: what a checkpoint is, and every corrupted, truncated, missing or stray file named.
Corruption also stops dist-to-hf and reshard before they write anything; a hostile torch_dist index is refused
without being executed."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from mdu_dist.cli import main

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=48", "model.vocab_size=97",
        "model.make_vocab_size_divisible_by=8"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    from mdu_dist.checkpoint import save_hf_checkpoint
    from mdu_dist.config import load_config
    from mdu_dist.models.dense import init_weights, to_hf

    root = tmp_path_factory.mktemp("inspect")
    cfg = load_config("configs/dream_tiny.yaml", TINY).model
    save_hf_checkpoint(root / "hf", cfg, to_hf(cfg, init_weights(cfg, seed=1, dtype=torch.bfloat16)))
    assert main(["convert", "hf-to-dist", "--model", "dream", "--hf-dir", str(root / "hf"), "--out",
                 str(root / "dist"), "--pp", "2", "--no-progress", "model.make_vocab_size_divisible_by=8"]) == 0
    return root


@pytest.fixture
def ckpt(pristine, tmp_path):
    return shutil.copytree(pristine / "dist", tmp_path / "dist")


def _inspect(path, *flags):
    return main(["inspect", str(path), "--no-progress", *flags])


def test_report(ckpt, pristine, capsys):
    assert _inspect(ckpt) == 0
    out = capsys.readouterr().out
    for line in ("mdu-dist dist checkpoint (megatron-core torch_dist)",
                 "architecture: dream, 2 layers x 32, 4 heads / 2 KV heads, ffn 48, vocab 97, q/k/v biases",
                 "layout: saved by TP=1 x PP=2 (vocabulary padded to 104)", "dtype: bfloat16",
                 "step: - (not a training checkpoint)", "HF side files: config.json",
                 "integrity: sha256 and size of every file checked: OK"):
        assert line in out, line
    assert _inspect(pristine / "hf") == 0
    out = capsys.readouterr().out
    assert "HF-layout dream checkpoint" in out and "dtype: bfloat16" in out


def test_flipped_byte_is_found_by_sha256_only(ckpt, capsys):
    victim = sorted((ckpt / "model").glob("*.distcp"))[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert _inspect(ckpt) == 1
    err = capsys.readouterr().err
    assert f"CORRUPT: {victim}: sha256 differs from the manifest (corrupted)" in err
    assert _inspect(ckpt, "--quick") == 0  # same size: only the hash can tell

    # Nothing is converted from a corrupted checkpoint, and nothing is left half-written.
    assert main(["convert", "dist-to-hf", "--in", str(ckpt), "--out", str(ckpt.parent / "hf"), "--no-progress"]) == 1
    assert victim.name in capsys.readouterr().err
    assert main(["reshard", "--in", str(ckpt), "--out", str(ckpt.parent / "r"), "--no-progress"]) == 1
    assert victim.name in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["dist"]


def test_truncated_missing_and_stray_files(ckpt, capsys):
    truncated = sorted((ckpt / "model").glob("*.distcp"))[0]
    truncated.write_bytes(truncated.read_bytes()[:100])
    missing = ckpt / "model" / "common.pt"
    missing.unlink()
    (ckpt / "model" / "stray.bin").write_bytes(b"x")
    assert _inspect(ckpt, "--quick") == 1
    err = capsys.readouterr().err
    assert f"{truncated}: size 100 bytes, the manifest says" in err
    assert f"{missing}: missing" in err
    assert f"{ckpt / 'model' / 'stray.bin'}: not listed in mdu_checkpoint.json" in err


def test_broken_manifest_and_not_a_checkpoint(ckpt, tmp_path, capsys):
    (ckpt / "mdu_checkpoint.json").write_text("{not json")
    assert _inspect(ckpt) == 1
    assert "mdu_checkpoint.json: cannot be read as JSON" in capsys.readouterr().err
    assert _inspect(tmp_path) == 1
    assert "is not an mdu-dist dist checkpoint" in capsys.readouterr().err


class _Hostile:
    def __reduce__(self):
        import os

        return os.system, ("echo pwned > pwned.txt",)


def test_hostile_index_is_refused_unexecuted(ckpt, tmp_path, monkeypatch, capsys):
    from mdu_dist.checkpoint.dist import hash_files, read_dcp_metadata
    from mdu_dist.checkpoint.errors import CheckpointError

    monkeypatch.chdir(tmp_path)
    (ckpt / "model" / ".metadata").write_bytes(pickle.dumps(_Hostile()))
    with pytest.raises(CheckpointError, match=r"\.metadata: not a torch_dist index: .*refusing global"):
        read_dcp_metadata(ckpt / "model")
    # Even with a manifest rewritten to match it, the index is refused by the allow-list, not executed.
    manifest = json.loads((ckpt / "mdu_checkpoint.json").read_text())
    manifest["files"].update(hash_files(ckpt, ["model/.metadata"]))
    (ckpt / "mdu_checkpoint.json").write_text(json.dumps(manifest))
    assert main(["convert", "dist-to-hf", "--in", str(ckpt), "--out", str(tmp_path / "hf"), "--no-progress"]) == 1
    assert "refusing global" in capsys.readouterr().err
    assert not (tmp_path / "pwned.txt").exists() and not (tmp_path / "hf").exists()
