"""The checkpoints of a finetune / unlearn run: ``{train.output_dir}/checkpoints/step-N/`` holds ``model/`` (a
dist checkpoint; a LoRA run has ``adapter/`` instead, ``checkpoint.lora``), ``deepspeed/`` (optimizer and schedule
state) and ``trainer_state.json``, which is written
last; a step being written is ``.step-N.partial`` until the trainer renames it. The trainer writes this layout,
resume, evaluation and the demo read it.
"""

from __future__ import annotations

from pathlib import Path

TRAINER_STATE = "trainer_state.json"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def partial_dir(root: Path, step: int) -> Path:
    return root / f".step-{step}.partial"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``step-N`` with its ``trainer_state.json``)."""
    done = [p for p in root.glob("step-*") if (p / TRAINER_STATE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def latest_step_or_self(path: Path) -> Path:
    """The latest complete ``step-N`` below ``path`` when it is a run directory (its ``checkpoints/``) or a
    checkpoints directory; else ``path`` itself."""
    for root in (path, checkpoints_dir(path)):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    return path
