"""Backbones: the registry of architectures (weight layout, logit shift)."""

from mdu_dist.models.arch import Arch
from mdu_dist.models.dream import DREAM
from mdu_dist.models.llada import LLADA
from mdu_dist.models.llada2 import LLADA2
from mdu_dist.models.llada_moe import LLADA_MOE

ARCHS: dict[str, Arch] = {a.name: a for a in (LLADA, DREAM, LLADA2, LLADA_MOE)}

__all__ = ["ARCHS", "Arch", "LLADA", "DREAM", "LLADA2", "LLADA_MOE"]
