"""The README's "Unlearn your own checkpoint" commands, run as written on a tiny LLaDA checkpoint in HF layout.

The block between the walk-through markers is read from the README; its variables are set to a tiny model, one
process, and each command gets the few overrides that make it a seconds-long run (fewer rows and steps).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from mdu_dist.checkpoint import save_hf_checkpoint
from mdu_dist.config import load_config
from mdu_dist.data import build_tokenizer, load_pairs
from mdu_dist.models.dense import init_weights, to_hf

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- walkthrough: begin -->", "<!-- walkthrough: end -->"
# What makes each command a seconds-long run on the tiny model; appended to the README's own command line.
SMALL = {
    "plan": [],
    "unlearn": ["data.limit=8", "data.max_length=96", "optim.micro_batch_size=2", "train.max_steps=2",
                "train.progress=false"],
    "eval": ["eval.limit=2", "eval.num_samples=2", "eval.gen_length=8", "eval.steps=4", "eval.block_length=8",
             "eval.progress=false"],
    "convert": ["--no-progress"],
}


def walkthrough_commands() -> tuple[list[str], list[str]]:
    """(the variable names the block assigns, its mdu-dist command lines with continuations joined)."""
    text = (ROOT / "README.md").read_text()
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    code = block.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    lines = [line.strip() for line in code.splitlines() if line.strip() and not line.strip().startswith("#")]
    names = re.findall(r"(\w+)=\S+", lines[0])
    return names, [line for line in lines[1:] if line.startswith("mdu-dist ")]


def test_the_readme_walkthrough_runs_on_a_tiny_llada(tmp_path):
    names, commands = walkthrough_commands()
    assert names == ["MODEL", "RUN", "GPUS"]
    assert [c.split()[1] for c in commands] == ["plan", "unlearn", "eval", "convert"]

    model_dir = tmp_path / "LLaDA-tiny-Instruct"
    cfg = load_config("configs/llada_tiny.yaml").model
    save_hf_checkpoint(model_dir, cfg, to_hf(cfg, init_weights(cfg, seed=3)))
    rows = load_pairs("forget10", "", 40) + load_pairs("retain90", "", 40)
    build_tokenizer([f"{r.question} {r.answer}" for r in rows], cfg.vocab_size, model_dir)

    run = tmp_path / "runs" / "tiny-forget10"
    env = {**os.environ, "MODEL": str(model_dir), "RUN": str(run), "GPUS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        line = " ".join([command, *SMALL[command.split()[1]]])
        proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        if command.split()[1] == "plan":
            assert "layouts fit" in proc.stdout and f"{cfg.num_layers} x {cfg.hidden_size}" in proc.stdout

    manifest = json.loads((run / "checkpoints" / "step-2" / "model" / "mdu_checkpoint.json").read_text())
    assert manifest["arch"] == "llada" and manifest["model"]["hidden_size"] == cfg.hidden_size
    metrics = json.loads((run / "eval" / "eval.json").read_text())["metrics"]
    assert 0.0 <= metrics["forget_Q_A_ROUGE"] <= 1.0
    exported = json.loads((run / "hf" / "config.json").read_text())
    assert exported["model_type"] == "llada" and exported["n_layers"] == cfg.num_layers
    assert (run / "hf" / "tokenizer.json").is_file()
