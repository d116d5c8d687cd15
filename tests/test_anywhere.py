"""The installed package runs from any directory: the CLI started in a temporary directory outside the
repository (no configs/, no shared/data/tofu above it; nothing copied) fine-tunes on a TOFU split given by name, from
the copy of TOFU inside the package, and ``mdu-dist inspect`` reads the checkpoint back. (``mdu-dist demo
--quick`` from a temporary directory: tests/test_demo.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mdu_dist

# The built-in defaults plus a tiny model whose special ids are those of the trained tokenizer: no config file.
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=1000",
        "model.num_attention_heads=4", "model.num_query_groups=4", "model.make_vocab_size_divisible_by=8",
        "model.mask_token_id=3", "model.eos_token_id=2", "model.pad_token_id=2", "model.max_position_embeddings=256"]


def _mdu_dist() -> list[str]:
    """The console script installed next to this interpreter (what a user runs), else the module."""
    script = Path(sys.executable).parent / "mdu-dist"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mdu_dist.cli"]


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                str(Path("build/torch_extensions").absolute()))}
    proc = subprocess.run([*_mdu_dist(), *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"mdu-dist {' '.join(args)} in {cwd}:\n{proc.stderr[-4000:]}"
    return proc


def test_finetune_and_inspect_from_a_directory_outside_the_repository(tmp_path):
    repo = Path(mdu_dist.__file__).resolve().parents[1]
    assert repo not in tmp_path.resolve().parents
    assert not any((d / "shared" / "data" / "tofu").exists() for d in (tmp_path, *tmp_path.parents))
    _run(tmp_path, "finetune", *TINY, "data.finetune=forget01", "data.limit=8", "optim.micro_batch_size=4",
         "train.max_steps=1", "train.output_dir=run")  # relative: to the working directory
    ckpt = tmp_path / "run" / "checkpoints" / "step-1" / "model"
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").exists()
    proc = _run(tmp_path, "inspect", "run/checkpoints/step-1/model", "--no-progress")
    report = proc.stdout.splitlines()
    assert "architecture: llada, 2 layers x 64, 4 heads / 4 KV heads, ffn 96, vocab 1000" in report, proc.stdout
    assert "step: 1" in report and "CORRUPT" not in proc.stderr, proc.stdout
    assert (ckpt / "hf_files" / "tokenizer.json").exists()
    shutil.rmtree(tmp_path / "run")
