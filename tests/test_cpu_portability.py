"""The demo's pinned CPU kernels on another processor, emulated (tools/cpu_portability.py ops: qemu-x86_64 -cpu
EPYC-Rome, an AMD CPUID without AVX-512): every op gives the host's bits, the square roots included since
mdu_dist/cpu_kernels.py routes them (MKL's vector-maths root followed the host: docs/reproducibility.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from debian import ensure_packages

ROOT = Path(__file__).resolve().parent.parent


def test_pinned_kernels_under_an_emulated_amd_processor():
    ensure_packages({"qemu-user": ("qemu-x86_64",)})
    proc = subprocess.run([sys.executable, "tools/cpu_portability.py", "ops", "--cpus", "EPYC-Rome", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    moved = json.loads(proc.stdout.splitlines()[-1])
    assert len(moved) >= 26 and {"matmul (attention-sized)", "linear with bias (addmm)", "sqrt",
                                 "gradient norm (DeepSpeed's)", "AdamW step (PortableAdamW)"} <= set(moved), moved
    differ = sorted(op for op, cpus in moved.items() if cpus)
    assert not differ, f"ops whose bits differ under qemu -cpu EPYC-Rome: {differ}"
    assert proc.returncode == 0, proc.stdout  # the tool says so too
