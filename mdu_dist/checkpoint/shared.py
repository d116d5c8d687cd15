"""A run directory that ranks on several nodes write together.

Every rank writes its shards of each checkpoint into the run directory, so it must be one directory for all of
them: a node-local path (``/tmp``, a local scratch disk) gives each node a directory of its own, where the
first symptom would be a missing file deep inside the first save. ``check_shared_dir`` turns that into one
line naming the nodes, before anything is written. And a network filesystem may list a directory from a
node's cache, so after a requeue two nodes can disagree on the newest checkpoint: ``agreed_latest_step`` makes
rank 0's choice everyone's (what Megatron-LM does with its latest-iteration file).
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import torch.distributed as dist

from mdu_dist.checkpoint.steps import latest_checkpoint
from mdu_dist.errors import ConfigError

MARKER = ".shared-by-every-rank-"


def check_shared_dir(directory: str | Path, key: str) -> None:
    """Collective: rank 0 creates ``directory`` and a marker file in it; every rank raises one ConfigError
    (naming ``key``, the directory and the hosts that cannot see the marker) unless all of them see it."""
    directory = Path(directory).absolute()
    sent: list[tuple[str, str | None]] = [("", None)]  # (marker name, rank 0's error)
    if dist.get_rank() == 0:
        name = f"{MARKER}{secrets.token_hex(8)}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(socket.gethostname())
            sent = [(name, None)]
        except OSError as e:
            sent = [("", f"{key}={directory}: cannot write there: {e}")]
    dist.broadcast_object_list(sent, src=0)
    name, error = sent[0]
    if error:
        raise ConfigError(error)
    marker = directory / name
    views: list[tuple[str, bool] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(views, (socket.gethostname(), marker.exists()))
    if dist.get_rank() == 0:
        marker.unlink(missing_ok=True)
    blind = [r for r, (_, seen) in enumerate(views) if not seen]
    if blind:
        ranks, hosts = ", ".join(map(str, blind)), ", ".join(sorted({views[r][0] for r in blind}))
        raise ConfigError(f"{key}={directory} is not one directory shared by every node: rank 0 ({views[0][0]}) "
                          f"wrote a file there that rank(s) {ranks} ({hosts}) do not see; put the run on a "
                          "filesystem that every node mounts")


def agreed_latest_step(root: str | Path) -> int | None:
    """Collective: the step of the newest complete checkpoint under ``root`` as rank 0 sees it, on every rank
    (None: there is none)."""
    latest = latest_checkpoint(Path(root)) if dist.get_rank() == 0 else None
    step = [None if latest is None else int(latest.name.split("-")[1])]
    dist.broadcast_object_list(step, src=0)
    return step[0]
