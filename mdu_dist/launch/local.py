"""The local launcher: run a function on N ranks, in this process when a launcher (torchrun, srun) already
started that many, else as local processes joined by gloo. The CLI (finetune / unlearn / eval without a
launcher), the checkpoint conversions, the demo, the benchmark and the tests use it; it imports only the error
types, so every layer may.

With ``cpu_only`` the local workers see no GPU (``CUDA_VISIBLE_DEVICES=""``; the checkpoint conversions use
it: they move bytes and need no accelerator); otherwise rank r sees every GPU and picks ``LOCAL_RANK`` r (as
``mdu_dist.distributed.init`` does). The first failing rank stops the others; its error (a CheckpointError or
ConfigError keeps its one-line message) is raised in the caller.
"""

from __future__ import annotations

import ctypes
import os
import queue as queue_module
import signal
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mdu_dist.checkpoint.errors import CheckpointError
from mdu_dist.data import DataError
from mdu_dist.errors import ConfigError

_LAUNCHED = ("RANK", "WORLD_SIZE")
_ONE_LINE_ERRORS = (CheckpointError, ConfigError, DataError)


def launched_world_size() -> int | None:
    """The world size a launcher started this process in (torchrun's or Slurm's variables), else None."""
    if all(k in os.environ for k in _LAUNCHED):
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        return int(os.environ["SLURM_NTASKS"])
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel kill this worker when its parent dies, so that a killed run (Ctrl-C, SIGTERM from
    a scheduler, SIGKILL) leaves no rank behind burning cores or GPU memory."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's finally still reaps its workers on normal exits
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _entry(rank: int, world_size: int, port: int, threads: int, cpu_only: bool, fn: Callable, args: tuple,
           results, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    # MKL_DYNAMIC off: by default MKL may use fewer threads than asked when the machine is busy, which changes
    # the summation order, so a resumed run would not replay the uninterrupted one bit for bit.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS=str(threads), MKL_DYNAMIC="FALSE")
    if cpu_only:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    # Library chatter that says nothing about the conversion (fallbacks, deprecations inside megatron/DCP).
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed")
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    warnings.filterwarnings("ignore", category=FutureWarning,
                            module=r"(torch\.distributed\.checkpoint|megatron\.core\.dist_checkpointing)")
    torch.set_num_threads(threads)
    try:
        results.put((rank, None, fn(*args)))
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent
        # Errors with a one-line message naming the bad value reach the caller as themselves (the class
        # travels by reference); anything else is a crash and keeps its traceback.
        kind = type(e) if isinstance(e, _ONE_LINE_ERRORS) else "crash"
        results.put((rank, (kind, str(e), traceback.format_exc()), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float | None = None,
              cpu_only: bool = False, threads: int | None = None) -> list[Any]:
    """``fn(*args)`` on ``world_size`` ranks; returns the per-rank results (only this rank's when launched).
    Local workers get ``threads`` torch threads each (default: the cores shared out)."""
    launched = launched_world_size()
    if launched is not None:
        if launched != world_size:
            raise CheckpointError(f"started by a launcher with {launched} processes, but this job was asked to "
                                  f"run on {world_size} (--nproc): launch {world_size} or leave --nproc out")
        return [fn(*args)]

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port, threads = _free_port(), threads or max(1, (os.cpu_count() or 1) // world_size)
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, threads, cpu_only, fn, args, results,
                                               os.getpid()))
             for r in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    failure: tuple[int, tuple[str, str, str]] | None = None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while len(done) < world_size and failure is None:
            try:
                rank, error, value = results.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in done]
                if dead:
                    failure = (dead[0], ("crash", f"exit code {procs[dead[0]].exitcode}", "(no traceback)"))
                elif deadline is not None and time.monotonic() > deadline:
                    failure = (-1, ("crash", f"timed out after {timeout:.0f} s", ""))
                continue
            if error is None:
                done[rank] = value
            else:
                failure = (rank, error)
    finally:
        for p in procs:
            p.join(timeout=5 if failure else 120)
            if p.is_alive():
                p.kill()
                p.join()
    if failure is not None:
        rank, (kind, message, tb) = failure
        if kind != "crash":
            raise kind(message)
        raise RuntimeError(f"rank {rank} of {world_size} failed: {message}\n{tb}")
    return [done[r] for r in range(world_size)]
