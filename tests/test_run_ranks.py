"""The local launcher the CLI, the demo and the tests share: its workers never outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PARENT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_run_ranks import record_and_sleep
from mdu_dist.launch.local import run_ranks
run_ranks(record_and_sleep, 2, {out!r})
"""


def record_and_sleep(out: str) -> None:
    Path(out, f"{os.getpid()}.pid").write_text("")
    time.sleep(600)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_when_the_parent_is_killed(tmp_path):
    code = PARENT.format(tests=str(Path(__file__).parent), out=str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("*.pid"))) < 2:
        assert parent.poll() is None and time.monotonic() < deadline, "workers did not start"
        time.sleep(0.2)
    workers = [int(p.stem) for p in tmp_path.glob("*.pid")]
    assert all(_alive(pid) for pid in workers)
    parent.send_signal(signal.SIGKILL)  # no finally, no atexit: only the kernel can reap the workers
    parent.wait()
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), workers
