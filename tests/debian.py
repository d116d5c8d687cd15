"""Debian packages a test needs, installed with apt-get where they are missing (CI starts from a bare machine)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable

import pytest


def ensure_packages(wanted: dict[str, Iterable[str]]) -> None:
    """Install each package of ``wanted`` (package -> the commands it provides) one of whose commands is not on
    PATH; skips, naming them, only where apt-get itself is not available."""
    missing = [pkg for pkg, cmds in wanted.items() if not all(shutil.which(c) for c in cmds)]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"{', '.join(missing)} not installed and apt-get is not available to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"
