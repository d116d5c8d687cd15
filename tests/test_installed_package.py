"""The package as a user installs it (not editable, no repository around it): ``mdu-dist demo`` finds its
default settings and the bundled TOFU inside the package, run from an empty directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_from_a_non_editable_install_in_an_empty_directory(tmp_path):
    target, empty = tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert (target / "mdu_dist" / "resources" / "demo.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}

    where = subprocess.run([sys.executable, "-c", "import mdu_dist; print(mdu_dist.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(target), f"imported {where}, not the installed copy"

    # The quick demo, cut to one replica, one MDU run and no baselines: the default config is all it needs.
    demo = subprocess.run([sys.executable, "-m", "mdu_dist.cli", "demo", "--quick", "replicas=1", "taus=[0.5]",
                           "methods=[]", "workers=1"], cwd=empty, env=env, capture_output=True, text=True,
                          timeout=900)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]
    results = json.loads((empty / "runs" / "demo" / "results.json").read_text())
    assert "mdu tau=0.5" in json.dumps(results)
