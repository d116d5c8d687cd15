"""The ``eval`` section of a run config (``EvalConfig``), apart from the evaluation code so that
mdu_dist.config can compose it without importing what evaluation imports (checkpoints, models, the trainer's
callers)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mdu_dist.errors import ConfigError

SPLITS = ("forget", "retain", "real_authors", "world_facts")
# How each backbone's authors evaluate it: LLaDA's low-confidence remasking, Dream's diffusion_generate(alg="entropy").
# LLaDA-MoE: full bidirectional attention, so LLaDA's block-wise low-confidence one. LLaDA2 too when "" (its own,
# ``block``, needs model.block_size > 0: configs/llada2*.yaml name it).
DEFAULT_SAMPLER = {"llada": "low_confidence", "dream": "entropy", "llada2": "low_confidence", "llada_moe": "low_confidence"}
BLOCK_SAMPLERS = ("block", "block_edit")  # LLaDA2.0's / LLaDA2.1's generate (mdu_dist.eval.block_sampler)
SAMPLERS = ("low_confidence", "entropy", "maskgit_plus", "topk_margin", *BLOCK_SAMPLERS)


@dataclass
class EvalConfig:
    """``mdu-dist eval``: what to evaluate and how hard."""

    checkpoint: str = ""  # an mdu-dist checkpoint (…/step-N/model), a run dir (its latest step), or an HF dir
    tokenizer: str = ""  # "" = the checkpoint's hf_files/ (or the HF dir itself)
    splits: list[str] = field(default_factory=lambda: list(SPLITS))  # any of forget, retain, real_authors, world_facts
    forget: str = "forget10_perturbed"  # sources (TOFU split name or JSON/JSONL file) with the perturbed fields
    retain: str = "retain_perturbed"
    real_authors: str = "real_authors_perturbed"
    world_facts: str = "world_facts_perturbed"
    limit: int = 0  # first N rows of each split (0 = all); small numbers for CPU runs
    num_samples: int = 128  # ELBO Monte-Carlo samples per answer (128 for the real benchmark)
    batch_size: int = 128  # ELBO sample sequences per forward, at most (tokens_per_batch binds above 64 tokens)
    tokens_per_batch: int = 8192  # ELBO tokens per forward (rows x longest row), answers packed together
    gen_length: int = 128  # generated tokens for ROUGE
    steps: int = 128  # sampler steps over the whole generation (not block / block_edit: block_steps)
    block_length: int = 32  # semi-autoregressive block length (low_confidence only; Dream's samplers use none)
    sampler: str = ""  # low_confidence (LLaDA) | entropy | maskgit_plus | topk_margin (Dream) | block | block_edit
    #                    (LLaDA2.0 / 2.1, blocks of model.block_size); "" = the backbone's
    block_steps: int = 32  # block: denoising steps per block (LLaDA2's steps)
    threshold: float = 0.95  # block / block_edit: unmask every masked token whose probability exceeds this
    editing_threshold: float = 0.9  # block_edit: re-place a placed token whose new prediction exceeds this
    max_post_steps: int = 16  # block_edit: editing forwards per block after its last mask
    gen_batch_size: int = 16  # generations per forward (prompts of any length, left padded)
    retain_model_eval: str = ""  # eval.json of a retain-only model: its forget truth ratios give forget quality
    output_dir: str = "runs/eval"
    seed: int = 0
    progress: bool = True  # tqdm bars

    def validate(self, where: str = "eval") -> None:
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ConfigError(f"{where}.splits={self.splits}: each must be one of {', '.join(SPLITS)}")
        for name in ("num_samples", "batch_size", "tokens_per_batch", "gen_length", "steps", "block_length",
                     "gen_batch_size", "block_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 1")
        for name in ("threshold", "editing_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be in [0, 1]")
        if self.max_post_steps < 0:
            raise ConfigError(f"{where}.max_post_steps={self.max_post_steps} must be >= 0")
        if self.limit < 0:
            raise ConfigError(f"{where}.limit={self.limit} must be >= 0")
        if self.sampler and self.sampler not in SAMPLERS:
            raise ConfigError(f"{where}.sampler={self.sampler!r}: must be one of {', '.join(SAMPLERS)} "
                              f"(or empty for the backbone's own)")

    def sampler_for(self, arch: str) -> str:
        return self.sampler or DEFAULT_SAMPLER[arch]

    def check_block_size(self, arch: str, block_size: int, where: str = "eval") -> None:
        """LLaDA2's samplers decode blocks of the model's block-causal attention: refused without one. Checked by
        ``mdu-dist eval`` only, so a config naming them loads for training whatever its model.block_size."""
        if self.sampler_for(arch) in BLOCK_SAMPLERS and block_size < 1:
            raise ConfigError(f"{where}.sampler={self.sampler_for(arch)} decodes blocks of model.block_size, which "
                              f"is {block_size}: set model.block_size (LLaDA2: 32) or another {where}.sampler")

    def check_sampler(self, arch: str, where: str = "eval") -> None:
        """The block layout only constrains LLaDA's semi-autoregressive sampler."""
        if self.sampler_for(arch) != "low_confidence":
            return
        if self.gen_length % self.block_length:
            raise ConfigError(f"{where}.gen_length={self.gen_length} is not a multiple of "
                              f"block_length={self.block_length}")
        if self.steps % (self.gen_length // self.block_length):
            raise ConfigError(f"{where}.steps={self.steps} is not a multiple of the number of blocks "
                              f"({self.gen_length // self.block_length})")
