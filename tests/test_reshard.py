"""`mdu-dist reshard` and the collective save/load API the trainer reuses.

- a trainer-style checkpoint (model + an optimizer component + step) saved at TP=1 reshards to TP=2 (the
  vocabulary padding grows from 104 to 112 rows; test_convert reshards TP=2 x PP=2 down to one rank):
  the model weights come through exactly, the optimizer is left out with a clear message, the step is kept;
- loading refuses a checkpoint of another architecture or shape, naming it; loading never unpickles beyond
  weights_only; a save that fails half-way leaves nothing behind;
- a failing worker rank stops the others and its error reaches the caller.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mdu_dist.cli import main
from multiproc import run_distributed

TINY = ["model.num_layers=4", "model.hidden_size=32", "model.ffn_hidden_size=48", "model.vocab_size=97",
        "model.make_vocab_size_divisible_by=8"]


def _cfg(arch: str, *more: str):
    from mdu_dist.config import load_config

    return load_config(f"configs/{arch}_tiny.yaml", TINY + list(more)).model


def _single_rank_checks(tmp: str) -> dict:
    """One rank: save trainer-style checkpoints, then the refusals and the no-pickle property of loading."""
    from pathlib import Path

    from megatron.core.dist_checkpointing import ShardedTensor

    from mdu_dist import distributed
    from mdu_dist.checkpoint.dist import load_component, load_model_checkpoint, save_model_checkpoint
    from mdu_dist.checkpoint.errors import CheckpointError
    from mdu_dist.config import ParallelConfig
    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard

    tmp = Path(tmp)
    distributed.init(ParallelConfig(backend="gloo"))
    out = {}
    try:
        llada, dream = _cfg("llada"), _cfg("dream")
        stage = build_stage(llada)
        load_shard(stage.module, shard(llada, init_weights(llada, seed=2), 1, 0))
        moments = torch.arange(12, dtype=torch.float32)
        optimizer = {"exp_avg": ShardedTensor.from_rank_offsets("optimizer.exp_avg", moments.clone(), replica_id=0)}
        save_model_checkpoint(stage, tmp / "trainer", step=7, components={"optimizer": optimizer})
        dstage = build_stage(dream)
        save_model_checkpoint(dstage, tmp / "dream")

        # The optimizer component reloads (same layout) ...
        target = {"exp_avg": ShardedTensor.from_rank_offsets("optimizer.exp_avg", torch.zeros(12), replica_id=0)}
        out["optimizer_reloaded"] = torch.equal(load_component(tmp / "trainer", "optimizer", target)["exp_avg"],
                                                moments)

        # ... loading uses torch.load with weights_only=True only.
        calls = []
        real_load = torch.load

        def spy(*args, **kwargs):
            calls.append(kwargs.get("weights_only"))
            return real_load(*args, **kwargs)

        torch.load = spy
        try:
            info = load_model_checkpoint(build_stage(llada), tmp / "trainer", verify="sha256")
        finally:
            torch.load = real_load
        out["torch_load_calls"], out["step"] = calls, info.step

        for name, stage_cfg in (("dream_into_llada", llada), ("wider_llada", _cfg("llada", "model.hidden_size=64"))):
            try:
                load_model_checkpoint(build_stage(stage_cfg), tmp / ("dream" if name.startswith("dream") else "trainer"))
                out[name] = "loaded"
            except CheckpointError as e:
                out[name] = str(e)

        # A save that fails after megatron wrote the model leaves neither the output nor a partial directory.
        try:
            save_model_checkpoint(stage, tmp / "failed", components={"optimizer": {"bad": lambda: 0}})
            out["failed_save"] = "saved"
        except Exception as e:  # noqa: BLE001
            out["failed_save"] = type(e).__name__
        out["tmp_listing"] = sorted(p.name for p in tmp.iterdir())
        return out
    finally:
        distributed.shutdown()


def test_trainer_checkpoint_reshards_model_only_and_loading_is_strict(tmp_path, capsys):
    from mdu_dist.checkpoint import load_hf_checkpoint
    from mdu_dist.checkpoint.dist import read_info
    from mdu_dist.models.dense import init_weights, to_hf

    (res,) = run_distributed(_single_rank_checks, 1, str(tmp_path))
    assert res["optimizer_reloaded"]
    assert res["torch_load_calls"] and all(w is True for w in res["torch_load_calls"]), res["torch_load_calls"]
    assert res["step"] == 7
    assert res["dream_into_llada"].endswith("this is a dream checkpoint; it cannot be loaded into a llada model")
    assert "mdu_checkpoint.json" in res["dream_into_llada"]
    assert "the checkpoint has hidden_size=32 but the model config has hidden_size=64" in res["wider_llada"]
    assert res["failed_save"] != "saved"
    assert res["tmp_listing"] == ["dream", "trainer"], "a failed save must leave nothing"

    # The trainer's layout: step-N/{model (an mdu-dist checkpoint), deepspeed, trainer_state.json}.
    step = tmp_path / "checkpoints" / "step-7"
    shutil.copytree(tmp_path / "trainer", step / "model")
    (step / "deepspeed").mkdir()
    (step / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"optimizer state")
    (step / "trainer_state.json").write_text(json.dumps({"step": 7, "job": "unlearn", "total_steps": 9}))
    assert main(["inspect", str(step), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "trainer checkpoint" in out and "beside the model: deepspeed, trainer_state.json" in out

    assert main(["reshard", "--in", str(step), "--out", str(tmp_path / "tp2"), "--tp", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert (f"{step} is a trainer checkpoint: its deepspeed, trainer_state.json (optimizer, scheduler and trainer "
            f"state, saved for TP=1 PP=1) are NOT resharded") in err
    assert "component 'optimizer' (saved for TP=1 PP=1) is NOT resharded" in err
    info = read_info(tmp_path / "tp2")
    assert (info.tp, info.pp, info.step, info.components) == (2, 1, 7, {})
    assert info.manifest["extra"]["resharded_from"]["components_left_out"] == ["optimizer"]
    assert sorted(p.name for p in (tmp_path / "tp2").iterdir()) == ["mdu_checkpoint.json", "model"]

    assert main(["inspect", str(tmp_path / "tp2"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "step: 7" in out and "saved by TP=2 x PP=1 (vocabulary padded to 112)" in out

    # The model weights came through the TP1 -> TP2 reshard exactly (exported from the new layout).
    assert main(["convert", "dist-to-hf", "--in", str(tmp_path / "tp2"), "--out", str(tmp_path / "hf"),
                 "--no-progress"]) == 0
    cfg = _cfg("llada")
    _, back = load_hf_checkpoint(tmp_path / "hf", cfg, "llada")
    for name, want in to_hf(cfg, init_weights(cfg, seed=2)).items():
        assert torch.equal(back[name], want), name
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == "llada" and hf_config["d_model"] == 32

    # Refused before any worker starts: a layout that cannot shard the model, an existing output.
    assert main(["reshard", "--in", str(tmp_path / "dream"), "--out", str(tmp_path / "x"), "--tp", "4",
                 "--no-progress"]) == 1
    assert "parallel.tensor=4 does not divide the KV heads (num_query_groups=2)" in capsys.readouterr().err
    assert main(["reshard", "--in", str(tmp_path / "trainer"), "--out", str(tmp_path / "tp2"),
                 "--no-progress"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _rank1_fails_while_rank0_waits() -> None:
    import torch.distributed as dist

    from mdu_dist.checkpoint.errors import CheckpointError

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise CheckpointError("rank 1: cannot read shard X")
    dist.barrier()  # never completes: the launcher must stop this rank


def test_a_failing_rank_stops_the_others():
    from mdu_dist.checkpoint.errors import CheckpointError
    from mdu_dist.launch.local import run_ranks

    with pytest.raises(CheckpointError, match="rank 1: cannot read shard X"):
        run_ranks(_rank1_fails_while_rank0_waits, 2, timeout=120)
