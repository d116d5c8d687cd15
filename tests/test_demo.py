"""``mdu-dist demo --quick``: the whole pipeline (fine-tune, retain-only twin, MDU + GA/GradDiff/NPO, eval,
table, plots) on CPU with tiny sizes, producing every output file with the claimed shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mdu_dist.demo import load_demo_config
from mdu_dist.errors import ConfigError

MODELS = ["finetuned", "retain-only", "mdu tau=0.5", "ga", "graddiff", "npo"]


def test_quick_demo_end_to_end(tmp_path):
    """Started from an empty temporary directory (``cd $(mktemp -d) && mdu-dist demo --quick``): the demo finds
    its TOFU rows in the package, not relative to the working directory."""
    out = tmp_path / "demo"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                str(Path("build/torch_extensions").absolute()))}
    proc = subprocess.run([sys.executable, "-m", "mdu_dist.cli", "demo", "--quick", f"output_dir={out}"],
                          capture_output=True, text=True, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("results.md", "results.json", "loss_curves.png", "forget_vs_utility.png"):
        assert (out / name).exists(), name
        assert str(out / name) in proc.stdout  # it says where everything is
    result = json.loads((out / "results.json").read_text())
    assert list(result["runs"]) == MODELS
    for name, run in result["runs"].items():
        m = run["metrics"]
        for key in ("forget_Q_A_ROUGE", "forget_Q_A_Prob", "forget_truth_ratio", "forget_quality", "model_utility",
                    "retain_Q_A_ROUGE", "ra_Q_A_Prob_normalised", "wf_Q_A_Prob_normalised"):
            assert 0.0 <= m[key] <= 1.0, (name, key, m[key])
        assert (Path(run["eval_dir"]) / "eval.json").exists() and (Path(run["eval_dir"]) / "eval.md").exists()
        assert list((Path(run["run_dir"]) / "tensorboard").glob("events.out.tfevents.*")), name
        assert Path(run["checkpoint"]).is_dir()
    assert result["runs"]["retain-only"]["metrics"]["forget_quality"] == 1.0
    table = [ln for ln in (out / "results.md").read_text().splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + len(MODELS) and all(ln.count("|") == table[0].count("|") for ln in table)
    for png in ("loss_curves.png", "forget_vs_utility.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # The forget set was in the fine-tuning data and not in the twin's.
    data = {p.stem: json.loads(p.read_text()) for p in (out / "data").glob("*.json")}
    forget = {r["question"] for r in data["forget"]}
    assert forget <= {r["question"] for r in data["finetune_full"]}
    assert not forget & {r["question"] for r in data["finetune_retain_only"]}


@pytest.mark.parametrize("override, needle", [
    ("eval_rows=30", "demo.eval_rows=30 is more than forget_rows=20"),
    ("general_rows=0", "demo.general_rows=0 must be >= 1"),
    ("methods=[mdu]", "'mdu' is not a baseline"),
    ("batch_size=32", "forget_rows=20 is fewer than batch_size=32"),
])
def test_bad_demo_settings_are_named(override, needle):
    with pytest.raises(ConfigError) as e:
        load_demo_config(None, [override])
    assert needle in str(e.value)
