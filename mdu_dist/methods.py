"""Unlearning objectives chosen by name: MDU and the baselines adapted to masked diffusion.

An objective says which forward passes one step needs (``passes``: token ids for the policy or for the frozen
reference theta_0, and the positions whose logits it reads) and turns their logits into a loss (``loss``).
The trainer stacks every pass of a micro-batch into one pipeline pass (``models.paired``), so an objective
knows nothing of TP, PP or DeepSpeed; its losses are vocab-parallel through ``VocabShard``.

The likelihood of a response under a masked diffusion model is the ELBO estimate of one random draw
(t, mask): ``loglik_b = -sum_{masked response i} w(t_b) CE_i / |response_b|`` (``losses.cross_entropy``).

In LLaDA2's two-copy layout (``data.layout=block``, ``mdu_dist.layout``) every pass feeds [x_t ; x_0] and reads
logits in x_t only; t ~ U[0.3, 0.8] per row and, as LLaDA2's fine-tuning, no 1/t weight: the SFT and retain
losses are the mean CE over the micro-batch's masked tokens, a row's log-likelihood minus the mean CE over its
own masked tokens. MDU's anchor masks the prompt (and padding) in both copies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mdu_dist.data import Pairs
from mdu_dist.errors import ConfigError
from mdu_dist.diffusion import anchor_view, mask_response, sample_ratio
from mdu_dist.layout import BLOCK_NOISE_RANGE, Layout
from mdu_dist.losses import DIRECTIONS, WEIGHTINGS, baselines
from mdu_dist.losses.cross_entropy import masked_diffusion_nll, vocab_parallel_cross_entropy
from mdu_dist.losses.divergence import vocab_parallel_divergence


@dataclass
class MethodConfig:
    """The unlearning objective. Keys that a method does not use are ignored by it."""

    name: str = "mdu"  # mdu | ga | graddiff | npo | simnpo | wga | dpo
    tau: float = 0.5  # MDU target temperature: q = softmax(tau * anchor logits); 0 = uniform target
    eta: float = 0.0  # MDU anchor extrapolation: target logits = a - eta (c - a), detached
    direction: str = "forward"  # MDU divergence: forward KL(p||q) | reverse | js
    exclude_special_tokens: bool = False  # MDU: drop special tokens from both distributions
    alpha: float = 1.0  # weight of the retain SFT term (all methods but GA)
    beta: float = 0.1  # NPO / SimNPO / DPO inverse temperature; WGA exponent
    gamma: float = 0.0  # SimNPO reward margin
    weighting: str = "inverse_t"  # masked-diffusion loss weight: inverse_t | none | geometric
    eps: float = 1e-3  # t = eps + (1 - eps) U(0, 1)
    special_token_ids: list[int] = field(default_factory=list)  # for exclude_special_tokens; [] = the tokenizer's

    def validate(self, where: str = "method") -> None:
        if self.name not in METHODS:
            raise ConfigError(f"{where}.name={self.name!r} is not a known method (known: {', '.join(METHODS)})")
        if self.tau < 0:
            raise ConfigError(f"{where}.tau={self.tau} must be >= 0")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"{where}.direction={self.direction!r} must be one of {', '.join(DIRECTIONS)}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"{where}.weighting={self.weighting!r} must be one of {', '.join(WEIGHTINGS)}")
        if not 0 < self.eps < 1:
            raise ConfigError(f"{where}.eps={self.eps} must be in (0, 1)")


@dataclass
class VocabShard:
    """This rank's slice [start, start + local) of the padded vocabulary and the group that holds the rest."""

    group: object
    start: int
    size: int  # the true (unpadded) vocabulary size


@dataclass
class Noised:
    """One forward-diffusion draw of a batch of pairs."""

    clean: Tensor  # [B, L] targets
    noisy: Tensor  # [B, L] model input: masked response tokens replaced by the mask token
    masked: Tensor  # [B, L] bool: masked response positions (where the losses are read)
    response: Tensor  # [B, L] bool
    t: Tensor  # [B]


def noise(pairs: Pairs, mask_token_id: int, generator: torch.Generator, eps: float, layout: Layout = Layout()
          ) -> Noised:
    """t ~ U[eps, 1] (the full layout) or U[0.3, 0.8] (LLaDA2's block layout) per row, then each response token
    masked with probability t."""
    low, high = BLOCK_NOISE_RANGE if layout.two_copy else (eps, 1.0)
    t = sample_ratio(len(pairs), low, high, generator)
    noisy, masked = mask_response(pairs.input_ids, pairs.response_mask, t, mask_token_id, generator)
    return Noised(pairs.input_ids, noisy, masked, pairs.response_mask, t)


@dataclass
class Pass:
    name: str
    ids: Tensor  # [B, L]: x_t
    positions: Tensor  # [B, L] bool
    clean: Tensor  # [B, L]: x_0, the second copy of the block layout (unused in the full layout)
    reference: bool = False  # run on the frozen theta_0 under no_grad


def token_nll(logits: Tensor, nz: Noised, vocab: VocabShard) -> Tensor:
    """CE of the clean token at every masked position, [B, L] (0 elsewhere), from logits [N, V_local] read at
    ``nz.masked``."""
    nll = vocab_parallel_cross_entropy(logits, nz.clean[nz.masked], vocab.group, vocab_start=vocab.start,
                                       vocab_size=vocab.size)
    return torch.zeros(nz.masked.shape, dtype=nll.dtype, device=nll.device).masked_scatter(nz.masked, nll)


def sft_loglik(logits: Tensor, nz: Noised, vocab: VocabShard, weighting: str) -> Tensor:
    """Per-sequence ELBO log-likelihood estimate [B]."""
    return -masked_diffusion_nll(token_nll(logits, nz, vocab), nz.masked, nz.response, nz.t, weighting)


class Objective:
    """Base: the retain SFT term every method except GA adds with weight ``alpha``."""

    needs_reference = False
    uses_retain = True
    uses_idk = False
    # What ``loss`` reports, in this order (every rank must know it, also those without logits).
    metric_names: tuple[str, ...] = ("forget-loss", "retain-loss")

    def __init__(self, cfg: MethodConfig, mask_token_id: int, layout: Layout = Layout()):
        self.cfg, self.mask_token_id, self.layout = cfg, mask_token_id, layout

    def draw(self, batch: dict[str, Pairs], generator: torch.Generator) -> dict[str, Noised]:
        names = ["forget"] + (["retain"] if self.uses_retain and self.cfg.alpha else []) + (
            ["idk"] if self.uses_idk else [])
        missing = [n for n in names if n not in batch]
        if missing:
            raise ValueError(f"method {self.cfg.name!r} needs batch parts {missing}")
        return {n: noise(batch[n], self.mask_token_id, generator, self.cfg.eps, self.layout) for n in names}

    def passes(self, drawn: dict[str, Noised]) -> list[Pass]:
        out = [Pass(n, nz.noisy, nz.masked, nz.clean) for n, nz in drawn.items()]
        if self.needs_reference:
            out += [Pass(f"{n}_ref", drawn[n].noisy, drawn[n].masked, drawn[n].clean, reference=True)
                    for n in self.ref_parts]
        return out

    ref_parts: tuple[str, ...] = ()

    def loglik(self, logits: Tensor, nz: Noised, vocab: VocabShard) -> Tensor:
        """Per-row log-likelihood estimate [B]: the ELBO estimate (full layout), or minus the row's mean CE over
        its masked tokens (block layout: LLaDA2's loss has no 1/t weight and averages over masked tokens)."""
        if self.layout.two_copy:
            return -masked_diffusion_nll(token_nll(logits, nz, vocab), nz.masked, nz.masked, nz.t, "none")
        return sft_loglik(logits, nz, vocab, self.cfg.weighting)

    def sft_loss(self, logits: Tensor, nz: Noised, vocab: VocabShard) -> Tensor:
        """The fine-tuning loss of a batch: the mean ELBO loss (full layout), or LLaDA2's plain mean CE over all
        masked tokens of the micro-batch (block layout; 0 when nothing is masked)."""
        if self.layout.two_copy:
            return token_nll(logits, nz, vocab).sum() / max(int(nz.masked.sum()), 1)
        return -sft_loglik(logits, nz, vocab, self.cfg.weighting).mean()

    def retain_term(self, logits: dict[str, Tensor], drawn: dict[str, Noised], vocab: VocabShard) -> Tensor:
        if "retain" not in drawn:
            return torch.zeros(())
        return self.sft_loss(logits["retain"], drawn["retain"], vocab)

    def forget_term(self, logits, drawn, vocab) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def loss(self, logits: dict[str, Tensor], drawn: dict[str, Noised], vocab: VocabShard
             ) -> tuple[Tensor, dict[str, float]]:
        forget, metrics = self.forget_term(logits, drawn, vocab)
        retain = self.retain_term(logits, drawn, vocab)
        metrics = {"forget-loss": forget.item(), "retain-loss": retain.item(), **metrics}
        return forget + self.cfg.alpha * retain, metrics


class MDU(Objective):
    """KL(p_theta(. | x ⊕ y_t) || softmax(tau * p_theta0(. | MASK^|x| ⊕ y_t))) at masked response positions.

    At tau = 0 the target is uniform over the kept vocabulary V whatever the anchor says, so there is no anchor
    pass and no frozen theta_0 at all: the forget term is KL(p || uniform) = log|V| - H(p), from the policy's
    logits alone, and the step costs what an SFT step costs."""

    metric_names = ("forget-loss", "retain-loss", "kl", "masked-positions")

    @property
    def needs_reference(self) -> bool:
        return self.cfg.tau != 0

    def passes(self, drawn):
        if not self.needs_reference:
            return super().passes(drawn)
        f = drawn["forget"]
        # The block layout's anchor masks the prompt in x_0 too: a clean copy would hand the anchor the prompt.
        anchor = [anchor_view(x, f.response, self.mask_token_id) for x in (f.noisy, f.clean)]
        return super().passes(drawn) + [Pass("anchor", anchor[0], f.masked, anchor[1], reference=True)]

    def forget_term(self, logits, drawn, vocab):
        c = self.cfg
        exclude = torch.tensor(c.special_token_ids, dtype=torch.long) if c.exclude_special_tokens else None
        z = logits["forget"]
        # tau = 0 zeroes the target logits anyway; a stride-0 view of one zero stands in for the anchor's.
        anchor = logits["anchor"] if self.needs_reference else z.new_zeros(()).expand(z.shape)
        kl = vocab_parallel_divergence(z, anchor, vocab.group, vocab_start=vocab.start,
                                       vocab_size=vocab.size, direction=c.direction, tau=c.tau, eta=c.eta,
                                       exclude_ids=exclude)
        # A batch with no masked response position contributes a defined zero (not 0/0).
        mean = kl.sum() / max(kl.numel(), 1)
        return mean, {"kl": mean.item(), "masked-positions": float(kl.numel())}


class LoglikBaseline(Objective):
    """A baseline that is a function of per-sequence ELBO log-likelihoods (``losses.baselines``)."""

    metric_names = ("forget-loss", "retain-loss", "forget-loglik")

    def forget_term(self, logits, drawn, vocab):
        ll = {n: self.loglik(logits[n], drawn[n.removesuffix("_ref")], vocab) for n in logits if n != "retain"}
        value = self.combine(ll)
        return value, {"forget-loglik": ll["forget"].mean().item()}

    def combine(self, ll: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


class GA(LoglikBaseline):
    uses_retain = False

    def combine(self, ll):
        return baselines.ga(ll["forget"])


class GradDiff(GA):
    """GA plus alpha x the retain SFT loss (the retain term every objective but GA adds)."""

    uses_retain = True


class NPO(LoglikBaseline):
    needs_reference = True
    ref_parts = ("forget",)

    def combine(self, ll):
        return baselines.npo(ll["forget"], ll["forget_ref"], beta=self.cfg.beta)


class SimNPO(LoglikBaseline):
    def combine(self, ll):
        return baselines.simnpo(ll["forget"], beta=self.cfg.beta, gamma=self.cfg.gamma)


class DPO(LoglikBaseline):
    needs_reference = True
    uses_idk = True
    ref_parts = ("forget", "idk")

    def combine(self, ll):
        return baselines.dpo(ll["idk"], ll["forget"], ll["idk_ref"], ll["forget_ref"], beta=self.cfg.beta)


class WGA(Objective):
    """Gradient ascent on the forget ELBO, each token weighted by its own (detached) probability ** beta."""

    def forget_term(self, logits, drawn, vocab):
        nz = drawn["forget"]
        nll = token_nll(logits["forget"], nz, vocab)
        if self.layout.two_copy:  # as ``loglik``: no 1/t, each row's mean over its masked tokens
            return baselines.wga(nll, nz.masked, nz.masked, nz.t, beta=self.cfg.beta, weighting="none"), {}
        return baselines.wga(nll, nz.masked, nz.response, nz.t, beta=self.cfg.beta, weighting=self.cfg.weighting), {}


class SFT(Objective):
    """Masked-diffusion fine-tuning (``mdu-dist finetune``): minimise the ELBO loss of the ``train`` pairs."""

    uses_retain = False
    metric_names = ("lm loss",)

    def draw(self, batch, generator):
        return {"train": noise(batch["train"], self.mask_token_id, generator, self.cfg.eps, self.layout)}

    def loss(self, logits, drawn, vocab):
        loss = self.sft_loss(logits["train"], drawn["train"], vocab)
        return loss, {"lm loss": loss.item()}


@dataclass
class MicroBatch:
    """Every pass of one micro-batch stacked into one input: policy rows first, then reference rows."""

    drawn: dict[str, Noised]
    passes: list[Pass]  # in row order
    ids: Tensor  # [rows, S]: the model's input (S = L, or 2L for the block layout's [x_t ; x_0])
    positions: Tensor  # [rows, S] bool: where the losses read logits
    n_policy: int
    position_ids: Tensor | None = None  # [rows, S] RoPE positions (block layout); None: 0..S-1
    mask: Tensor | None = None  # [1, 1, S, S] bool attention mask, True = masked out (block layout)

    def to(self, device: torch.device) -> MicroBatch:
        """The same micro-batch with every tensor on ``device`` (the draws are made on the CPU generator)."""
        def move(x):
            return dataclasses.replace(x, **{f.name: getattr(x, f.name).to(device) for f in dataclasses.fields(x)
                                             if isinstance(getattr(x, f.name), Tensor)})

        def maybe(x):
            return None if x is None else x.to(device)

        return MicroBatch({n: move(nz) for n, nz in self.drawn.items()}, [move(p) for p in self.passes],
                          self.ids.to(device), self.positions.to(device), self.n_policy, maybe(self.position_ids),
                          maybe(self.mask))

    def forward(self, model) -> Tensor:
        """This micro-batch through ``model`` (a ``models.paired.PolicyAndReference`` stage)."""
        return model(self.ids, self.n_policy, self.positions, self.position_ids, self.mask)


def prepare(objective: Objective, batch: dict[str, Pairs], generator: torch.Generator) -> MicroBatch:
    drawn = objective.draw(batch, generator)
    passes = objective.passes(drawn)
    ordered = [p for p in passes if not p.reference] + [p for p in passes if p.reference]
    n_policy = sum(p.ids.shape[0] for p in ordered if not p.reference)
    layout = objective.layout
    ids = torch.cat([layout.sequence(p.ids, p.clean) for p in ordered])
    length = ordered[0].ids.shape[1]
    return MicroBatch(drawn, ordered, ids, torch.cat([layout.read(p.positions) for p in ordered]), n_policy,
                      layout.position_ids(ids.shape[0], length), layout.mask(length))


def microbatch_loss(objective: Objective, mb: MicroBatch, logits: Tensor, vocab: VocabShard
                    ) -> tuple[Tensor, dict[str, float]]:
    """The objective's loss from the logits at ``mb.positions`` ([N, V_local], row-major, as
    ``PolicyAndReference`` returns them), split back into the passes."""
    counts = [int(p.positions.sum()) for p in mb.passes]
    selected = dict(zip((p.name for p in mb.passes), logits.split(counts)))
    return objective.loss(selected, mb.drawn, vocab)


METHODS: dict[str, type[Objective]] = {"mdu": MDU, "ga": GA, "graddiff": GradDiff, "npo": NPO,
                                       "simnpo": SimNPO, "wga": WGA, "dpo": DPO}


def build_objective(cfg: MethodConfig, mask_token_id: int, layout: Layout = Layout()) -> Objective:
    cfg.validate()
    return METHODS[cfg.name](cfg, mask_token_id, layout)


def job_objective(job: str, cfg: MethodConfig, mask_token_id: int, layout: Layout = Layout()) -> Objective:
    """What a job trains: ``finetune`` the SFT loss, ``unlearn`` the configured method."""
    return SFT(cfg, mask_token_id, layout) if job == "finetune" else build_objective(cfg, mask_token_id, layout)
