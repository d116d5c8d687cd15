"""TOFU evaluation for masked diffusion models.

``likelihood``: LLaDA's Monte-Carlo ELBO of an answer (vocab-parallel). ``sampler``: low-confidence remasking
generation and Dream's samplers (vocab-parallel). ``block_sampler``: LLaDA2's block decoding. ``metrics``:
open-unlearning's TOFU metrics from per-token NLLs and generations.
``config``: the ``eval`` section of a run config. ``run``: ``mdu-dist eval``.
"""
