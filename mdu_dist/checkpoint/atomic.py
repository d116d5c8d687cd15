"""All-or-nothing output directories: written as a hidden sibling, renamed into place when complete.

A failure (an exception, a killed process) leaves at most a hidden ``.NAME.tmp-*`` / ``.NAME.partial``
sibling, never a half-written ``NAME``; the next write to ``NAME`` removes a stale ``.NAME.partial``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mdu_dist.checkpoint.errors import CheckpointError


def check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")


def partial_path(out_dir: Path) -> Path:
    """The fixed temporary sibling used by collective (multi-process) writers of ``out_dir``."""
    return out_dir.with_name(f".{out_dir.name}.partial")


def fresh_dir(path: Path) -> Path:
    """Create ``path`` empty (removing a stale one), with the usual umask permissions (mkdtemp's are 0700)."""
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(path)
    return path


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``out_dir``, replacing an existing ``out_dir`` only once ``tmp`` is whole."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}")
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old)


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out_dir``; it becomes ``out_dir`` if the block succeeds and is
    removed if it raises."""
    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)
    tmp = fresh_dir(out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"))
    try:
        yield tmp
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
