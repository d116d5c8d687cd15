"""AdamW whose every operation is correctly rounded, so that a CPU run gives the same bits on any x86-64 processor.

torch's float32 ``sqrt`` on CPU is MKL's vector-maths ``vsSqrt``, which is not correctly rounded: about 17 % of
its results are one unit in the last place off, and which ones depends on the processor MKL dispatches for
(``MKL_CBWR=COMPATIBLE`` fixes its GEMM, not its vector maths). torch's AdamW takes that root of the second
moment at every step, so two processors' runs drift apart from the first update (measured with
``tools/cpu_portability.py``). Every other operation of the update is ATen's elementwise arithmetic (adds,
multiplies, divides, in the kernel of the pinned CPU capability), the same bits on any processor.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from mdu_dist.cpu_kernels import correctly_rounded_sqrt


class PortableAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter; torch's ``AdamW`` update, decoupled decay, no amsgrad) with a correctly
    rounded square root. With g the gradient and t the step (from 1)::

        p   <- p * (1 - lr * wd)
        m   <- m + (g - m) * (1 - beta1)              (torch's lerp)
        v   <- v * beta2 + (1 - beta2) * g * g
        p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    The state (``step``, ``exp_avg``, ``exp_avg_sq``) is named as torch's, so checkpoints of either resume with
    the other."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = int(state["step"])
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                if wd:
                    p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (correctly_rounded_sqrt(v) / math.sqrt(1 - beta2**step)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
        return loss
