"""Checkpoint I/O: HF-layout safetensors (``hf``), megatron-core dist checkpoints (``dist``) and the tools
between them (``convert``: hf-to-dist, dist-to-hf, reshard, inspect)."""

from mdu_dist.checkpoint.dist import (CheckpointInfo, load_component, load_model_checkpoint, open_dist_checkpoint,
                                      read_info, save_model_checkpoint)
from mdu_dist.checkpoint.errors import CheckpointError
from mdu_dist.checkpoint.hf import (
    HFCheckpointReader,
    hf_config_to_model_config,
    load_hf_checkpoint,
    model_config_to_hf_config,
    open_hf_checkpoint,
    save_hf_checkpoint,
    write_hf_checkpoint,
)

__all__ = ["CheckpointError", "CheckpointInfo", "HFCheckpointReader", "hf_config_to_model_config",
           "load_component", "load_hf_checkpoint", "load_model_checkpoint", "model_config_to_hf_config",
           "open_dist_checkpoint", "open_hf_checkpoint", "read_info", "save_hf_checkpoint", "save_model_checkpoint",
           "write_hf_checkpoint"]
