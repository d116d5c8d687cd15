"""Checkpoint I/O: HF-layout safetensors (``hf``)."""

from mdu_dist.checkpoint.hf import (
    CheckpointError,
    hf_config_to_model_config,
    load_hf_checkpoint,
    model_config_to_hf_config,
    save_hf_checkpoint,
)

__all__ = ["CheckpointError", "hf_config_to_model_config", "load_hf_checkpoint", "model_config_to_hf_config",
           "save_hf_checkpoint"]
