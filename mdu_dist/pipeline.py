"""Run micro-batches through this rank's pipeline stage with megatron-core's schedules.

With PP=1 this is a plain forward/backward per micro-batch; with PP>1 it is 1F1B across the stages, the
activations travelling between stages as [seq, micro_batch, hidden] tensors.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

ForwardFn = Callable[[torch.nn.Module, Any], torch.Tensor]
LossFn = Callable[[Any, torch.Tensor], tuple[torch.Tensor, dict]]


def run_microbatches(model: torch.nn.Module, microbatches: list[Any], forward_fn: ForwardFn, loss_fn: LossFn, *,
                     seq_length: int, micro_batch_size: int, forward_only: bool = False) -> list[dict]:
    """Forward (and unless ``forward_only`` backward) every micro-batch; returns the loss dicts (last stage only).

    ``forward_fn(model, mb)`` runs the stage (every stage receives the same ``mb``: the first reads its
    token ids, the last whatever its loss needs); ``loss_fn(mb, output)`` returns ``(loss, metrics)`` on the
    last stage. The schedule divides each loss by the number of micro-batches before its backward, so gradients
    are those of the mean loss.
    """
    # deferred: megatron-core costs seconds of start-up; config imports this module (through optim)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, stage):
        mb = next(data_iterator)
        return forward_fn(stage, mb), functools.partial(loss_fn, mb)

    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(microbatches), model=model,
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
