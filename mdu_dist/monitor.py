"""Training metrics: TensorBoard scalars and a tqdm progress bar, written by one rank.

The writing rank is the first TP rank of the first DP replica on the last pipeline stage: the only stage that
sees the loss. Tags are stable (see the README's table):

- ``unlearn/forget-loss``, ``unlearn/retain-loss``, ``unlearn/kl`` (MDU) or ``lm loss`` (finetune)
- ``learning-rate``, ``grad-norm``, ``throughput`` (tokens/s), ``step-time`` (s)
- ``mem-max-allocated-bytes`` (GPU only)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the message names the step and the batch."""


def check_finite(metrics: dict[str, float], step: int, batch_desc: str) -> None:
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise NonFiniteLoss(f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step} "
                            f"({batch_desc}); stopping")


class Monitor:
    def __init__(self, log_dir: str | Path | None, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 desc: str = "train", progress: bool = True):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return

        if log_dir is not None:
            self.writer = SummaryWriter(str(log_dir))
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True,
                        disable=not progress)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if torch.cuda.is_available():
            scalars = {**scalars, "mem-max-allocated-bytes": float(torch.cuda.max_memory_allocated())}
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in scalars.items() if k != "mem-max-allocated-bytes"}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
