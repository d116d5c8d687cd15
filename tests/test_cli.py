"""`mdu-dist info`: exact parameter counts of the real backbones (built on the meta device), per-rank shapes,
and one-line errors for bad layouts."""

import subprocess
import sys
from pathlib import Path

from mdu_dist.cli import main

LLADA_8B = 2 * 126464 * 4096 + 32 * (4 * 4096 * 4096 + 3 * 4096 * 12288 + 2 * 4096) + 4096
DREAM_7B = (2 * 152064 * 3584 + 28 * (2 * 3584 * 3584 + 2 * 512 * 3584 + 3584 + 2 * 512 + 3 * 3584 * 18944
                                       + 2 * 3584) + 3584)


def test_llada_8b_info_tp8(capsys):
    assert main(["info", "--config", "configs/llada_8b.yaml"]) == 0
    out = capsys.readouterr().out
    assert LLADA_8B == 8_015_581_184
    assert f"parameters: {LLADA_8B:,}" in out
    assert "TP=8 x PP=1 x DP=1" in out and "padded to 126976" in out
    assert "embedding.word_embeddings.weight" in out and "(15872, 4096)" in out  # 126976 / 8 rows
    assert "(1536, 4096)" in out  # fused QKV: 3 * 4096 / 8
    assert "(3072, 4096)" in out  # [gate_r; up_r]: 2 * 12288 / 8
    assert "(4096, 512)" in out and "(4096, 1536)" in out  # row-parallel attn_out and ff_out


def test_dream_7b_info_and_tp8_refused(capsys):
    assert main(["info", "--config", "configs/dream_7b.yaml"]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {DREAM_7B:,}" in out
    assert "linear_qkv.bias" in out and "(1152,)" in out  # (28 + 2 * 4) * 128 / 4
    assert main(["info", "--config", "configs/dream_7b.yaml", "parallel.tensor=8"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("mdu-dist: error: configs/dream_7b.yaml: parallel.tensor=8 does not divide "
                           "num_attention_heads=28")


def test_world_size_and_unknown_key_errors(capsys):
    assert main(["info", "--config", "configs/llada_8b.yaml", "--world-size", "12"]) == 2
    assert "world size 12 is not a multiple of parallel.tensor=8" in capsys.readouterr().err
    assert main(["info", "--config", "configs/llada_8b.yaml", "model.hidden=1"]) == 2
    assert "unknown key model.hidden" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "mdu_dist.cli", "info", "--config", "configs/llada_tiny.yaml"],
                         capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "megatron.core" in out and "TP=1 x PP=1 x DP=1" in out


def test_training_under_torchrun_takes_the_launchers_world_size(tmp_path):
    """torchrun starts 2 processes with TP=1: ``unlearn`` with no --nproc runs DP=2 (it used to assume TP x PP = 1
    and refuse)."""
    out, bin_dir = tmp_path / "run", Path(sys.executable).parent
    proc = subprocess.run(
        [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python", str(bin_dir / "mdu-dist"),
         "unlearn", "--config", "configs/llada_tiny.yaml", "data.limit=8", "optim.micro_batch_size=2", "train.max_steps=1", "train.progress=false", "data.max_length=96", f"train.output_dir={out}"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # ZeRO shards the optimizer state over the data-parallel ranks: one file per DP rank
    shards = sorted(p.name for p in (out / "checkpoints" / "step-1" / "deepspeed" / "state").glob("zero_pp_rank_*"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
