"""Backbones: the registry of architectures (weight layout, logit shift)."""

from mdu_dist.models.arch import Arch
from mdu_dist.models.dream import DREAM
from mdu_dist.models.llada import LLADA

ARCHS: dict[str, Arch] = {a.name: a for a in (LLADA, DREAM)}

__all__ = ["ARCHS", "Arch", "LLADA", "DREAM"]
