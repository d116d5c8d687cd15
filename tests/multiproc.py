"""Run a function in N CPU processes joined by gloo, with the launcher the CLI itself uses.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes with RANK/WORLD_SIZE/MASTER_* set,
calls ``fn(*args)`` in each (``fn`` must be importable: defined at module level in a test file) and returns
the list of per-rank return values. A failing rank fails the test with its error (and traceback). Each ``fn``
does its own ``torch.distributed`` set-up (usually ``mdu_dist.distributed.init``).
"""

from __future__ import annotations

from mdu_dist.launch.local import run_ranks


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0):
    return run_ranks(fn, world_size, *args, timeout=timeout)
