"""A real single-node Slurm for tests: munged, slurmctld and slurmd on loopback, started and stopped here.

Installs Debian's slurm-wlm and munge with apt-get when they are missing (skipping, visibly, only where
apt-get itself is not available). Everything lives in one temporary directory (config, munge key and socket,
state, spool, logs), so it touches no system service; clients find it through SLURM_CONF.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")


@dataclass(frozen=True)
class SlurmCluster:
    root: Path
    node: str
    partition: str
    cpus: int


def _ensure_installed() -> None:
    if all(shutil.which(d) for d in (*DAEMONS, "sbatch", "srun", "sinfo", "scontrol")):
        return
    if shutil.which("apt-get") is None:
        pytest.skip("slurm-wlm/munge are not installed and apt-get is not available to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(root: Path, node: str, partition: str, cpus: int) -> str:
    # The configuration seen working on these machines (DESIGN.md section 4): root runs everything, no
    # cgroups (proctrack/linuxproc, task/none), no accounting database.
    return f"""\
ClusterName=mdutest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _wait_idle(node: str, procs: dict[str, subprocess.Popen], root: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                log = root / f"{name}.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{tail}")
        out = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True)
        state = out.stdout.strip()
        if state == "idle":
            return
        time.sleep(0.5)
    raise AssertionError(f"node {node} not idle after {timeout:.0f} s (state {state!r})")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    _ensure_installed()
    # Not under pytest's basetemp: a concurrent pytest session may prune that while the daemons run. mkdtemp
    # also gives mode 0700, which munged wants for its socket directory.
    root = Path(tempfile.mkdtemp(prefix="mdu-slurm-"))
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    key = root / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o600)
    node, partition, cpus = socket.gethostname().split(".")[0], "debug", os.cpu_count() or 2
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, node, partition, cpus))

    procs: dict[str, subprocess.Popen] = {}
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)  # for sbatch/srun/sinfo/scontrol here and in the tests' subprocesses
    try:
        procs["munged"] = subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
             f"--log-file={root}/munged.log", f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not (root / "munge.socket").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        procs["slurmctld"] = subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs["slurmd"] = subprocess.Popen(["slurmd", "-D", "-N", node, "-f", str(conf)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_idle(node, procs, root)
        yield SlurmCluster(root, node, partition, cpus)
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True)
        for name in reversed(list(procs)):
            procs[name].terminate()
            try:
                procs[name].wait(timeout=15)
            except subprocess.TimeoutExpired:
                procs[name].kill()
                procs[name].wait()
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        shutil.rmtree(root, ignore_errors=True)
