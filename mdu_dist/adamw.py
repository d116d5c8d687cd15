"""AdamW whose every operation is correctly rounded, so that a CPU run gives the same bits on any x86-64 processor.

torch's float32 ``sqrt`` on CPU is MKL's vector-maths ``vsSqrt``, which is not correctly rounded: about 17 % of
its results are one unit in the last place off, and which ones depends on the processor MKL dispatches for
(``MKL_CBWR=COMPATIBLE`` fixes its GEMM, not its vector maths). torch's AdamW takes that root of the second
moment at every step, so two processors' runs drift apart from the first update (measured with
``tools/cpu_portability.py``). Every other operation of the update is an IEEE-754 add, multiply or divide,
exact to the rounding on any processor.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


def correctly_rounded_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` of a float32 tensor rounded to nearest float32, whatever kernel computes torch's root; a
    float64 tensor gets torch's root (no optimizer state of a CPU run is float64).

    torch's root r is corrected to the nearer neighbour while x lies beyond a rounding boundary: with r+ and r-
    r's neighbours, r moves up while x > ((r + r+) / 2)^2 and down while x < ((r + r-) / 2)^2. Each boundary
    has at most 25 significant bits, so its square is exact in float64 and every comparison is exact; x is
    never on a boundary (the square of a 25-bit number is not a 24-bit one). One round suffices for a root off
    by an ulp (vsSqrt's bound); rounds repeat until nothing moves. No gradient (an optimizer's state)."""
    if x.dtype == torch.float64:
        return x.sqrt()
    if x.dtype != torch.float32:
        raise TypeError(f"correctly_rounded_sqrt: float32 or float64, not {x.dtype}")
    exact = x.double()
    root = x.sqrt()
    while True:
        up, down = torch.nextafter(root, root.new_tensor(math.inf)), torch.nextafter(root, root.new_tensor(0.0))
        r = root.double()
        above, below = (r + up.double()) * 0.5, (r + down.double()) * 0.5
        too_low, too_high = exact > above * above, exact < below * below
        if not (too_low.any() or too_high.any()):
            return root
        root = torch.where(too_low, up, torch.where(too_high, down, root))


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
