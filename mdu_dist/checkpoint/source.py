"""What a checkpoint path given to a job names, and the model shape it fixes.

``train.init`` and ``eval.checkpoint`` take an HF directory (config.json) or an mdu-dist checkpoint (its
manifest); ``eval.checkpoint`` also takes a run directory (its latest complete step) and a LoRA run's adapters. The model keys a user
leaves unset are read from that checkpoint, so ``mdu-dist unlearn train.init=LLaDA-8B-Instruct`` needs no config
file. A key the user set that decides what the weights compute (the architecture, the shape, the mask id) must
agree with the checkpoint, else one line names both values; the others (EOS / pad ids, the longest sequence)
may be set to other values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mdu_dist.checkpoint.dist import MANIFEST, read_info
from mdu_dist.checkpoint.errors import CheckpointError
from mdu_dist.checkpoint.hf import CONFIG_FILE, MUST_MATCH, hf_model_keys, read_json
from mdu_dist.checkpoint.lora import adapter_dir, is_lora_checkpoint, read_lora_info
from mdu_dist.checkpoint.steps import latest_step_or_self
from mdu_dist.config import Config, ConfigError, apply_overrides, config_from_dict, read_config_file

# The key each job reads its starting weights from.
CHECKPOINT_KEY = {"finetune": "train.init", "unlearn": "train.init", "eval": "eval.checkpoint",
                  "info": "train.init"}
# Choices of how to run a model, not part of what its weights compute: never taken from a checkpoint.
RUNTIME_KEYS = ("attention",)
# How a block model (model.block_size > 0) of these backbones is trained and sampled, where the config leaves it
# unset: LLaDA2's two-copy fine-tuning layout and its own sampler (docs/block_diffusion.md).
BLOCK_RECIPE = {"llada2": {"data": {"layout": "block"}, "eval": {"sampler": "block"}}}


def resolve_checkpoint(path: str, key: str = "eval.checkpoint") -> tuple[Path, str]:
    """(directory, kind): kind is "dist" (mdu-dist checkpoint), "lora" (a LoRA run's adapters, over the base they
    name) or "hf". A run directory means its latest complete step."""
    if not path:
        raise ConfigError(f"{key} is not set (a …/checkpoints/step-N/model directory, a run dir or an HF dir)")
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{key}={path}: checkpoint directory not found")
    p = latest_step_or_self(p)
    if (p / "model" / MANIFEST).exists() and not (p / MANIFEST).exists():
        p = p / "model"
    p = adapter_dir(p)
    if is_lora_checkpoint(p):
        return p, "lora"
    if (p / MANIFEST).exists():
        return p, "dist"
    if (p / CONFIG_FILE).exists():
        return p, "hf"
    raise CheckpointError(f"{key}={path}: {p} is neither an mdu-dist checkpoint ({MANIFEST}) nor an HF "
                          f"checkpoint ({CONFIG_FILE})")


def checkpoint_model_keys(path: str, key: str) -> dict[str, Any]:
    """The ModelConfig keys the checkpoint at ``path`` fixes; CheckpointError naming ``key`` and the file."""
    directory, kind = resolve_checkpoint(path, key)
    try:
        if kind in ("dist", "lora"):  # a LoRA checkpoint records the shape of the base it adapts
            model = dataclasses.asdict((read_info if kind == "dist" else read_lora_info)(directory).cfg)
            return {k: v for k, v in model.items() if k not in RUNTIME_KEYS}
        where = directory / CONFIG_FILE
        return hf_model_keys(read_json(where), source=str(where))
    except (CheckpointError, ConfigError) as e:
        raise CheckpointError(f"{key}={path}: {e}") from None


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def load_job_config(path: str | None, overrides: list[str], job: str) -> Config:
    """``load_config`` for a job: model keys left unset come from the job's checkpoint (``CHECKPOINT_KEY``), and a
    block model's layout and sampler, left unset, from ``BLOCK_RECIPE``."""
    data, source = read_config_file(path)
    try:
        tree = apply_overrides(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    checkpoint = _get(tree, CHECKPOINT_KEY[job])
    if not checkpoint or not isinstance(checkpoint, str):
        return config_from_dict(tree, source=source)
    fixed = checkpoint_model_keys(checkpoint, CHECKPOINT_KEY[job])
    user = tree.get("model") or {}
    if not isinstance(user, dict):
        raise ConfigError(f"{source}: model must be a mapping, got {user!r}")
    model = {**fixed, **user}
    tree = {**tree, "model": model}
    if model.get("block_size"):
        for section, keys in BLOCK_RECIPE.get(model.get("arch"), {}).items():
            given = tree.get(section) or {}
            if isinstance(given, dict):
                tree[section] = {**keys, **given}
    cfg = config_from_dict(tree, source=source)
    for name in ("arch", *MUST_MATCH):
        if name in user and name in fixed and getattr(cfg.model, name) != fixed[name]:
            raise ConfigError(f"{CHECKPOINT_KEY[job]}={checkpoint}: the checkpoint has {name}={fixed[name]!r} but "
                              f"model.{name}={getattr(cfg.model, name)!r} is set ({source} or an override); "
                              f"leave it unset to take the checkpoint's")
    return cfg
