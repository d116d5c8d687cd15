"""mdu_dist/checkpoint/shared.py on 2 gloo ranks, each given its own path to play a node with its own view of
"the same" run directory (a node-local disk, or a network filesystem listing from a stale cache)."""

from __future__ import annotations

import socket
from pathlib import Path

from multiproc import run_distributed


def _check(cases: list[list[str]]) -> list[str | None]:
    """For each case (one path per rank): None, or the ConfigError this rank raised."""
    import torch.distributed as dist

    from mdu_dist.checkpoint.shared import check_shared_dir
    from mdu_dist.errors import ConfigError

    dist.init_process_group("gloo")
    errors = []
    try:
        for views in cases:
            try:
                check_shared_dir(views[dist.get_rank()], "train.output_dir")
                errors.append(None)
            except ConfigError as e:
                errors.append(str(e))
        return errors
    finally:
        dist.destroy_process_group()


def test_shared_node_local_and_unwritable_directories(tmp_path):
    shared, local = [str(tmp_path / "run")] * 2, [str(tmp_path / "node0"), str(tmp_path / "node1")]
    (tmp_path / "file").write_text("")
    unwritable = [str(tmp_path / "file" / "run")] * 2
    rank0, rank1 = run_distributed(_check, 2, [shared, local, unwritable])
    host = socket.gethostname()

    assert rank0[0] is None and rank1[0] is None  # rank 0 created it; the marker is gone again
    assert (tmp_path / "run").is_dir() and list((tmp_path / "run").iterdir()) == []
    for view, error in zip(local, (rank0[1], rank1[1]), strict=True):  # every rank fails; each names its path
        assert error == (f"train.output_dir={view} is not one directory shared by every node: rank 0 ({host}) "
                         f"wrote a file there that rank(s) 1 ({host}) do not see; put the run on a filesystem "
                         "that every node mounts"), error
    assert rank0[2] == rank1[2] and rank0[2].startswith(f"train.output_dir={unwritable[0]}: cannot write there")


def _latest(cases: list[list[str]]) -> list[int | None]:
    import torch.distributed as dist

    from mdu_dist.checkpoint.shared import agreed_latest_step

    dist.init_process_group("gloo")
    try:
        return [agreed_latest_step(views[dist.get_rank()]) for views in cases]
    finally:
        dist.destroy_process_group()


def _checkpoints(root: Path, complete: list[int], partial: list[int] = ()) -> str:
    for step in complete:
        (root / f"step-{step}").mkdir(parents=True)
        (root / f"step-{step}" / "trainer_state.json").write_text("{}")
    for step in partial:  # no trainer_state.json: being written, or killed mid-save
        (root / f"step-{step}").mkdir(parents=True)
    return str(root)


def test_every_rank_resumes_from_the_checkpoint_rank_0_finds(tmp_path):
    # Rank 1's listing is stale (step 4 not there yet), and has a step 6 still being written.
    stale = [_checkpoints(tmp_path / "rank0", [2, 4], [6]), _checkpoints(tmp_path / "rank1", [2], [6])]
    assert run_distributed(_latest, 2, [stale, [str(tmp_path / "none")] * 2]) == [[4, None], [4, None]]
