"""Run a function in N CPU processes joined by a gloo group, the way torchrun would start them.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes with RANK/WORLD_SIZE/MASTER_* set,
calls ``fn(*args)`` in each (``fn`` must be importable: defined at module level in a test file) and returns
the list of per-rank return values. An exception in any rank fails the test with that rank's traceback.
Each ``fn`` is responsible for its own ``torch.distributed`` set-up (usually ``mdu_dist.distributed.init``).
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    import warnings

    import torch

    # megatron-core announces its apex/TE fallbacks once per process; the parent's pytest filters do not
    # reach spawned ranks.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|async grad allreduce)")
    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size and not errors:
            try:
                rank, status, value = queue.get(timeout=1.0)
                (results if status == "ok" else errors)[rank] = value
            except queue_module.Empty:
                # A rank that died before reporting (killed, crashed in C++, failed to unpickle ``fn``).
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    errors[dead[0]] = f"process exited with code {procs[dead[0]].exitcode} without reporting"
                elif time.monotonic() > deadline:
                    errors[-1] = f"timed out after {timeout:.0f} s waiting for ranks"
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        rank, tb = sorted(errors.items())[0]
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{tb}")
    return [results[r] for r in range(world_size)]
