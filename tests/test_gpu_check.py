"""``tools/gpu_check.sh --dry`` end to end on CPU: a fresh venv that sees only a torch (standing in for a GPU
image's own), the wheels installed offline from a wheel folder built for this Python, the tests and the bench,
with every result file where the GPU run writes it.

Slow (about 3 minutes): it installs 40-odd wheels and runs trainer processes. The wheel folder for this Python
is built once into build/wheelhouse-py3.N by tools/build_wheels.sh (that needs PyPI through pip) and reused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _torch_only_site(path: Path) -> Path:
    """A directory holding (symlinks to) torch and what torch requires, and nothing else of this env."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from wheel_pins import closure
    finally:
        sys.path.pop(0)
    from packaging.markers import default_environment

    path.mkdir()
    for name in closure(["torch"], default_environment()):
        dist = metadata.distribution(name)
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (path / top).exists() and top != "__pycache__":
                (path / top).symlink_to(source)
    return path


@pytest.mark.slow
def test_gpu_check_dry_runs_every_step_on_cpu(tmp_path):
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels = ROOT / "build" / f"wheelhouse-py{version}"
    env = {**os.environ, "PYTHON": sys.executable}
    if not any(wheels.glob("megatron_core-*.whl")):
        subprocess.run(["tools/build_wheels.sh"], cwd=ROOT, check=True, timeout=900,
                       env={**env, "WHEEL_PYTHON_VERSION": version, "WHEELHOUSE": str(wheels)})
    out = tmp_path / "check"
    base_python = getattr(sys, "_base_executable", sys.executable)  # a Python without this env's packages
    proc = subprocess.run(["tools/gpu_check.sh", "--dry"], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**env, "PYTHON": base_python, "GPU_CHECK_OUT": str(out), "MDU_WHEELS": str(wheels),
                               "MDU_EXTRA_SITE": str(_torch_only_site(tmp_path / "torch_site")),
                               "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = (out / "summary.txt").read_text()
    assert "tests passed" in summary and "done:" in summary, summary
    # megatron-core came from the wheel folder into the fresh venv, not from this environment.
    where = subprocess.run([str(out / "venv" / "bin" / "python"), "-c",
                            "import megatron.core, deepspeed; print(megatron.core.__file__, deepspeed.__file__)"],
                           capture_output=True, text=True, check=True).stdout.splitlines()[-1].split()
    assert all(p.startswith(str(out / "venv")) for p in where), where
    tests = (out / "tests.log").read_text()
    assert "skipped" in tests and " passed" in tests and "failed" not in tests
    result = json.loads((out / "bench.json").read_text())
    assert {"sft", "mdu_tau0", "mdu"} <= set(result["steps"]) and result["attention"]
    assert "| step | policy tokens |" in (out / "bench.md").read_text()
