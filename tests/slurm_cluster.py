"""A real Slurm for tests: munged, slurmctld and one or more slurmd, started and stopped here.

One node runs on loopback. Several nodes each get a network namespace of their own (``ip netns``), with a
veth pair to a bridge that holds the controller's address, an address in a private 10.213.X.0/24 that no
interface of this machine uses yet, and a host name of their own (``unshare --uts``) that resolves only
inside the cluster: each slurmd runs in a mount namespace of its own where the cluster's hosts file is
bind-mounted over /etc/hosts (what ``ip netns exec`` does with /etc/netns/NAME, but ``ip netns exec`` also
remounts /sys, hiding the cgroup mounts slurmd wants even with task/none), and a tmpfs over ``node_local``.
Node names are ``mdunode01``, ``mdunode02``..., so a job's SLURM_JOB_NODELIST is compressed
(``mdunode[01-02]``). The namespaces still share the filesystem (the munge socket, the runs' directories)
and the PID namespace.

Installs Debian's slurm-wlm and munge with apt-get when they are missing (skipping, visibly, only where
apt-get itself is not available; a multi-node cluster also skips, naming the error, where ``ip netns add``
fails). Everything lives in one temporary directory (config, hosts, munge key and socket, state, spool,
logs) plus, for several nodes, the namespaces, their veths and bridge, all removed afterwards; no system
service or file is touched and clients find the cluster through SLURM_CONF.

``python tests/slurm_cluster.py --nodes 2`` starts one by hand and keeps it until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from debian import ensure_packages

DAEMONS = ("munged", "slurmctld", "slurmd")
SUBNET = "10.213"  # the cluster takes one free 10.213.X.0/24


@dataclass(frozen=True)
class SlurmCluster:
    root: Path
    nodes: tuple[str, ...]
    partition: str
    cpus: int  # per node
    addresses: tuple[str, ...]  # of the nodes, in the order of ``nodes``

    @property
    def node(self) -> str:
        return self.nodes[0]

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def node_local(self) -> Path:
        """A path that is a directory of its own on each node of a multi-node cluster (a tmpfs each slurmd
        mounts in its mount namespace), like /tmp or a local scratch disk on a real cluster."""
        return self.root / "node-local"


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _ensure_installed(*tools: str) -> None:
    ensure_packages({"slurm-wlm": (*DAEMONS, "sbatch", "srun", "sinfo", "scontrol"), "munge": ("munged",),
                     "iproute2": tools, "util-linux": ("unshare", "nsenter") if tools else ()})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_subnet() -> str:
    """A 10.213.X prefix that no address or route of this machine mentions (another cluster's, say)."""
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for x in random.sample(range(1, 255), 254):
        if f"{SUBNET}.{x}." not in used:
            return f"{SUBNET}.{x}"
    raise RuntimeError(f"no free {SUBNET}.X.0/24 on this machine")


def _network(stack: contextlib.ExitStack, tag: str, nodes: list[str], hosts: Path) -> tuple[str, list[str], list[str]]:
    """Bridge + one namespace per node; returns (controller address, node addresses, namespace names).

    Traffic stays on the bridge: the namespaces have no route but the subnet's, and the bridge no uplink.
    """
    prefix = _free_subnet()
    ctl, bridge = f"{prefix}.1", f"mdubr{tag}"
    addrs = [f"{prefix}.{11 + i}" for i in range(len(nodes))]
    namespaces = [f"mdu-{tag}-{node}" for node in nodes]
    try:
        _run("ip", "netns", "add", namespaces[0])
    except RuntimeError as err:
        pytest.skip(f"a multi-node Slurm needs network namespaces: {err}")
    stack.callback(_run, "ip", "netns", "del", namespaces[0])
    _run("ip", "link", "add", bridge, "type", "bridge")
    stack.callback(_run, "ip", "link", "del", bridge)
    _run("ip", "addr", "add", f"{ctl}/24", "dev", bridge)
    _run("ip", "link", "set", bridge, "up")
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(addrs, nodes)))
    for i, (ns, addr, node) in enumerate(zip(namespaces, addrs, nodes)):
        if i:
            _run("ip", "netns", "add", ns)
            stack.callback(_run, "ip", "netns", "del", ns)
        veth = f"mdu{tag}v{i}"  # its peer, inside the namespace, is eth0 (deleted with the namespace)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", veth, "master", bridge)
        _run("ip", "link", "set", veth, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
    return ctl, addrs, namespaces


def _slurm_conf(root: Path, controller: str, ctl_addr: str, nodes: dict[str, str], partition: str,
                cpus: int) -> str:
    # The configuration seen working on these machines (DESIGN.md section 4): root runs everything, no
    # cgroups (proctrack/linuxproc, task/none), no accounting database. %n: one spool/pid/log per slurmd.
    node_lines = "".join(f"NodeName={n} NodeAddr={a} CPUs={cpus} State=UNKNOWN\n" for n, a in nodes.items())
    return f"""\
ClusterName=mdutest
SlurmctldHost={controller}({ctl_addr})
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
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
{node_lines}PartitionName={partition} Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""


def _wait_idle(nodes: tuple[str, ...], procs: dict[str, subprocess.Popen], root: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                log = root / f"{name}.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{tail}")
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True).stdout
        states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
        if all(states.get(n) == "idle" for n in nodes):
            return
        time.sleep(0.5)
    raise AssertionError(f"nodes {nodes} not all idle after {timeout:.0f} s (states {states})")


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    for name in reversed(list(procs)):
        procs[name].terminate()
        try:
            procs[name].wait(timeout=15)
        except subprocess.TimeoutExpired:
            procs[name].kill()
            procs[name].wait()


def _cancel_all_jobs() -> None:
    # Bounded: with slurmctld gone (the daemons killed along with this process), scancel retries for minutes.
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True, timeout=10)


def _kill_leftovers(namespaces: list[str]) -> None:
    """Job processes a stopped slurmd left behind in its namespace (they would keep the namespace alive)."""
    for ns in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


@contextlib.contextmanager
def running_cluster(nodes: int = 1, cpus: int = 0) -> Iterator[SlurmCluster]:
    """A cluster of ``nodes`` nodes of ``cpus`` CPUs each (0: this machine's count), SLURM_CONF set meanwhile."""
    _ensure_installed(*(("ip",) if nodes > 1 else ()))
    cpus = cpus or os.cpu_count() or 2
    # Not under pytest's basetemp: a concurrent pytest session may prune that while the daemons run. mkdtemp
    # also gives mode 0700, which munged wants for its socket directory.
    root = Path(tempfile.mkdtemp(prefix="mdu-slurm-"))
    controller, partition = socket.gethostname().split(".")[0], "debug"
    procs: dict[str, subprocess.Popen] = {}
    old_conf = os.environ.get("SLURM_CONF")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        if nodes == 1:
            names, ctl_addr, addrs, namespaces = [controller], "127.0.0.1", ["127.0.0.1"], []
        else:
            names = [f"mdunode{i + 1:02d}" for i in range(nodes)]
            ctl_addr, addrs, namespaces = _network(stack, root.name.rsplit("-", 1)[-1][:4], names, root / "hosts")
        for sub in ("state", "node-local", *(f"spool/{name}" for name in names)):
            (root / sub).mkdir(parents=True)
        key = root / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        conf = root / "slurm.conf"
        conf.write_text(_slurm_conf(root, controller, ctl_addr, dict(zip(names, addrs)), partition, cpus))
        os.environ["SLURM_CONF"] = str(conf)  # for sbatch/srun/sinfo/scontrol here and in the tests' subprocesses
        stack.callback(_restore_env, "SLURM_CONF", old_conf)
        stack.callback(_kill_leftovers, namespaces)
        stack.callback(_stop, procs)
        stack.callback(_cancel_all_jobs)
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs["munged"] = subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
             f"--log-file={root}/munged.log", f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed"],
            **quiet)
        deadline = time.monotonic() + 20
        while not (root / "munge.socket").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        procs["slurmctld"] = subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], **quiet)
        for name, ns in zip(names, namespaces or [None]):
            slurmd = ["slurmd", "-D", "-N", name, "-f", str(conf)]
            if ns:  # the node's own network, host name, /etc/hosts and local disk; the munge socket is a file
                slurmd = ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--mount", "--uts", "sh", "-c",
                          f"mount --bind {root}/hosts /etc/hosts && mount -t tmpfs tmpfs {root}/node-local && "
                          f"hostname {name} && exec {' '.join(slurmd)}"]
            procs[f"slurmd-{name}"] = subprocess.Popen(slurmd, **quiet)
        _wait_idle(tuple(names), procs, root)
        yield SlurmCluster(root, tuple(names), partition, cpus, tuple(addrs))


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    with running_cluster(1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def slurm_cluster_2nodes() -> Iterator[SlurmCluster]:
    # Module scope: SLURM_CONF names this cluster only while its module runs.
    with running_cluster(2) as cluster:
        yield cluster


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Start a throwaway Slurm cluster on this machine (as root).")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=0, help="CPUs per node (default: this machine's count)")
    args = parser.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM):  # `kill` tears down like Ctrl-C, even when started with &
        signal.signal(sig, signal.default_int_handler)
    with running_cluster(args.nodes, args.cpus) as c:
        print(f"export SLURM_CONF={c.conf}\n# nodes: {', '.join(f'{n}={a}' for n, a in zip(c.nodes, c.addresses))}"
              f"\n# logs: {c.root}; Ctrl-C stops the cluster and removes everything", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
