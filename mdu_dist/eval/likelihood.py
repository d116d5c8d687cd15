"""Monte-Carlo ELBO of an answer under a masked diffusion model: LLaDA's likelihood estimator, vocab-parallel.

A masked diffusion model has no tractable log p(answer | prompt). LLaDA (Nie et al. 2025, Eq. 6 and its
``get_log_likelihood.py``) scores an answer r = (r_1..r_L) after a prompt p by the negative ELBO

    B(r | p) = E_{l ~ U{1..L}} E_{S ~ U{S ⊆ [L] : |S| = l}} [ (L / l) Σ_{i ∈ S} -log p_θ(r_i | p, r_S̄) ]

where r_S̄ is r with the positions in S replaced by the mask token (the prompt is never masked) and
p_θ(r_i | ·) is the model's softmax at position i. Equivalently, since (L/l) · (1/L) = 1/l and a uniform
position of a uniform l-subset is what a uniformly random unmasking order predicts when l tokens are left,

    B(r | p) = E_{σ uniform permutation of [L]} Σ_{k=1..L} -log p_θ(r_σ(k) | p, r_σ(<k) visible, the rest masked),

the expected negative log-likelihood of decoding the answer one token at a time in a uniformly random order.
By Jensen it upper-bounds -log E_σ p_θ^σ(r | p), the NLL of that random-order decoding process (the bound the
LLaDA paper states). Units: nats for the whole answer.

One sample draws l and S as above and returns X = (L / l) Σ_{i∈S} CE_i, so E[X] = B exactly (the test checks it
by enumerating every (l, S) and every permutation). With n samples:

    per-token NLL  ν̂ = mean(X) / L       an unbiased estimate of B / L
    probability    exp(-ν̂)               a consistent (not unbiased: Jensen) estimate of exp(-B / L), the
                                          length-normalised answer probability TOFU's metrics use.

l is drawn i.i.d. uniform per sample. (LLaDA's release spreads l evenly over a batch with rounding, which is
not exactly uniform when L does not divide evenly; i.i.d. draws keep the estimator exactly unbiased.)

``logits_fn(ids, positions)`` returns the logits at the masked positions only ([N, V_local], positions row-major),
so the output layer -- at LLaDA's 126k vocabulary the largest matmul of a forward, and [B, S, V] fp32 logits
the largest buffer -- runs on the l scored tokens of each sample, not on the prompt and the visible answer.

LLaDA2's block layout (``data.layout=block``, ``mdu_dist.layout``): the model decodes the answer block by block
(blocks of ``model.block_size`` positions counted from the prompt's start), each block conditioned on the clean
blocks before it, so log p(r | p) = Σ_b log p(r_b | p, r_<b) and each term has LLaDA's bound. The estimated
quantity is their sum,

    B_block(r | p) = Σ_b E_{l_b ~ U{1..L_b}} E_{S_b, |S_b| = l_b} [ (L_b / l_b) Σ_{i ∈ S_b} -log p_θ(r_i | ·) ]

    · = p, r_<b and r_b with the positions in S_b masked

with r_b the L_b answer tokens of block b. One sample draws (l_b, S_b) independently in every block
(``sample_block_masks``) and scores them all in one forward of [x_t ; x_0] under the two-copy mask (x_t's block
b sees its own noisy block and x_0's earlier, clean blocks): X = Σ_b (L_b / l_b) Σ_{i ∈ S_b} CE_i, E[X] =
B_block exactly; ν̂ and exp(-ν̂) as above. With one block covering the whole answer it is LLaDA's estimator.

Vocab-parallel: ``logits_fn`` returns this rank's vocab slice [vocab_start, vocab_start + V_local) and the
cross entropy is reduced over ``group`` (megatron-core's three all-reduces); the full vocabulary is never
gathered. Every rank of the group must pass a generator with the same seed so that all draw the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from mdu_dist.layout import Layout
from mdu_dist.losses.cross_entropy import vocab_parallel_cross_entropy

# (ids [B, S], positions bool [B, S][, pad bool [B, S]]) -> logits [N, V_local] at the N true positions, in
# row-major order; ``pad`` is passed for right-padded forwards only (``score_packed``); the block layout passes
# (ids, positions, pad or None, position_ids=[B, S], mask=[1, 1, S, S]) as ``DiffusionLM.forward`` takes them.
MaskedLogitsFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ElboEstimate:
    """Samples of LLaDA's estimator for one answer. ``scores[j]`` is an unbiased estimate of B (nats, whole answer)."""

    scores: Tensor  # [num_samples] float64
    length: int  # L, the number of answer tokens

    @property
    def nll(self) -> float:
        """Per-token negative ELBO estimate ν̂ = mean(scores) / L (TOFU's "avg_loss")."""
        return self.scores.mean().item() / self.length

    @property
    def stderr(self) -> float:
        """Standard error of ``nll`` (sample standard deviation of scores / L / sqrt(n))."""
        n = self.scores.numel()
        return self.scores.std().item() / self.length / math.sqrt(n) if n > 1 else math.inf

    @property
    def probability(self) -> float:
        """Length-normalised answer probability exp(-ν̂)."""
        return math.exp(-self.nll)


def sample_masks(length: int, num_samples: int, generator: torch.Generator) -> Tensor:
    """[num_samples, length] bool: per row, l ~ U{1..length}, then exactly l positions masked, uniformly.

    A uniformly random permutation assigns each position a rank; the positions ranked below l form a uniform
    l-subset. Drawn on the CPU so every device and every rank sees the same masks for the same seed.
    """
    if length < 1:
        raise ValueError(f"an answer needs at least one token to be scored (got length {length})")
    l = torch.randint(1, length + 1, (num_samples,), generator=generator)
    ranks = torch.stack([torch.randperm(length, generator=generator) for _ in range(num_samples)])
    return ranks < l[:, None]


def answer_blocks(prompt_length: int, length: int, block_size: int) -> Tensor:
    """[length] block of each answer token, (prompt_length + i) // block_size, numbered from 0."""
    block = (prompt_length + torch.arange(length)) // block_size
    return block - block[0]


def sample_block_masks(prompt_length: int, length: int, block_size: int, num_samples: int,
                       generator: torch.Generator) -> Tensor:
    """[num_samples, length] bool: ``sample_masks`` drawn independently inside every block of the answer (blocks
    of ``answer_blocks``), so each block has l_b ~ U{1..L_b} masked tokens, a uniform l_b-subset."""
    blocks = answer_blocks(prompt_length, length, block_size)
    return torch.cat([sample_masks(int((blocks == b).sum()), num_samples, generator)
                      for b in range(int(blocks[-1]) + 1)], dim=1)


def block_weights(blocks: Tensor, mask: Tensor) -> Tensor:
    """L_b / l_b for each masked answer token (in order), from its block's answer tokens L_b and masked l_b."""
    size = torch.bincount(blocks).double()
    masked = torch.bincount(blocks[mask], minlength=size.numel()).double()
    return (size / masked)[blocks[mask]]


@torch.no_grad()
def score_masks(logits_fn: MaskedLogitsFn, prompt: Tensor, answer: Tensor, masks: Tensor, *, mask_token_id: int,
                vocab_size: int, vocab_start: int = 0, group: dist.ProcessGroup | None = None,
                batch_size: int = 32) -> Tensor:
    """X = (L / l) Σ_{i∈S} -log p_θ(r_i | p, r_S̄) for each row S of ``masks``; [N] float64.

    ``prompt`` [P] and ``answer`` [L] are token ids, ``masks`` [N, L] bool (l = masks.sum(1) >= 1). The rows are
    scored ``batch_size`` at a time, each chunk as one forward of [chunk, P + L] ids.
    """
    return score_packed(logits_fn, [(prompt, answer, masks)], mask_token_id=mask_token_id, vocab_size=vocab_size,
                        vocab_start=vocab_start, group=group, batch_size=batch_size)[0]


@torch.no_grad()
def score_packed(logits_fn: MaskedLogitsFn, answers: list[tuple[Tensor, Tensor, Tensor]], *, mask_token_id: int,
                 vocab_size: int, vocab_start: int = 0, group: dist.ProcessGroup | None = None,
                 batch_size: int = 32, tokens_per_batch: int | None = None, pad_token_id: int = 0,
                 layout: Layout = Layout()) -> list[Tensor]:
    """``score_masks`` of several (prompt, answer, masks) triples at once; one [N_i] float64 tensor per triple.

    Every mask row is one sequence prompt ⊕ noisy answer. The rows of all triples, in order, fill forwards of at
    most ``batch_size`` rows and at most ``tokens_per_batch`` tokens (rows x the longest row; None = no token
    limit). A forward whose rows differ in length right-pads them with ``pad_token_id`` and calls
    ``logits_fn(ids, positions, pad)`` with ``pad`` True at the padding, which the model must keep out of
    attention (``models.mcore.DiffusionLM``); a forward of equal lengths calls ``logits_fn(ids, positions)``.
    Each row's X depends on its own sequence only, so it is the same however the rows are packed (up to
    floating-point summation order inside the forward).

    ``layout`` ``block``: each row is fed as [x_t ; x_0] (both right-padded to the forward's longest row, both
    at positions 0..longest-1) under ``layout.mask``, and scored X = Σ_b (L_b / l_b) Σ_{i ∈ S_b} CE_i over its
    blocks (the module docstring); a mask row must then mask at least one token of every block.
    """
    copies = layout.copies
    rows = []  # (triple index, sequence ids, scored positions, target ids, block weights or None)
    for t, (prompt, answer, masks) in enumerate(answers):
        n_answer, n_prompt = answer.numel(), prompt.numel()
        masks = masks.to(answer.device)
        if masks.shape[1] != n_answer or not bool(masks.any(dim=1).all()):
            raise ValueError("every mask row must cover the answer and mask at least one answer token")
        if tokens_per_batch is not None and copies * (n_prompt + n_answer) > tokens_per_batch:
            raise ValueError(f"tokens_per_batch={tokens_per_batch} is smaller than one sequence "
                             f"({n_prompt} prompt + {n_answer} answer tokens{', two copies' if copies > 1 else ''})")
        blocks = answer_blocks(n_prompt, n_answer, layout.block_size).to(answer.device) if layout.two_copy else None
        if blocks is not None and not all(bool(torch.isin(blocks, blocks[m]).all()) for m in masks):
            raise ValueError("in the block layout every mask row must mask at least one answer token per block")
        no_prompt = masks.new_zeros(n_prompt)
        for m in masks:
            rows.append((t, torch.cat([prompt, answer.masked_fill(m, mask_token_id)]), torch.cat([no_prompt, m]),
                         torch.cat([prompt, answer]), None if blocks is None else block_weights(blocks, m)))
    scores: list[list[Tensor]] = [[] for _ in answers]
    for chunk in _forwards([copies * r[1].numel() for r in rows], batch_size, tokens_per_batch):
        batch = [rows[i] for i in chunk]
        longest = max(r[1].numel() for r in batch)
        ids = torch.full((len(batch), longest), pad_token_id, dtype=batch[0][1].dtype, device=batch[0][1].device)
        positions = torch.zeros(len(batch), longest, dtype=torch.bool, device=ids.device)
        targets = torch.zeros_like(ids)
        pad = torch.ones_like(positions)
        for j, (_, seq, scored, target, _) in enumerate(batch):
            ids[j, :seq.numel()], positions[j, :seq.numel()] = seq, scored
            targets[j, :seq.numel()], pad[j, :seq.numel()] = target, False
        if layout.two_copy:
            logits = logits_fn(layout.sequence(ids, targets), layout.read(positions),
                               torch.cat([pad, pad], dim=1) if pad.any() else None,
                               position_ids=layout.position_ids(len(batch), longest, ids.device),
                               mask=layout.mask(longest, ids.device))
        else:
            logits = logits_fn(ids, positions, pad) if pad.any() else logits_fn(ids, positions)  # [positions.sum(), V]
        # fp32 cross entropy (fp64 for fp64 logits), reduced over the vocab-parallel group.
        nll = vocab_parallel_cross_entropy(logits, targets[positions], group, vocab_start=vocab_start,
                                           vocab_size=vocab_size)
        row_of = positions.nonzero()[:, 0]
        if layout.two_copy:
            weights = torch.cat([r[4] for r in batch]).to(nll.device)
            x = torch.zeros(len(batch), dtype=torch.float64, device=nll.device).index_add_(
                0, row_of, nll.double() * weights).cpu()
        else:
            total = torch.zeros(len(batch), dtype=torch.float64, device=nll.device).index_add_(0, row_of,
                                                                                                nll.double())
            n_answer = torch.tensor([answers[r[0]][1].numel() for r in batch], dtype=torch.float64,
                                    device=nll.device)
            x = (total * n_answer / positions.sum(dim=1).to(torch.float64)).cpu()
        for j, (t, *_) in enumerate(batch):
            scores[t].append(x[j:j + 1])
    return [torch.cat(s) if s else torch.zeros(0, dtype=torch.float64) for s in scores]


def _forwards(lengths: list[int], batch_size: int, tokens_per_batch: int | None) -> list[list[int]]:
    """Consecutive runs of row indices, each as long as fits: <= batch_size rows, rows x longest <= tokens."""
    chunks: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        if chunks and len(chunks[-1]) < batch_size and (
                tokens_per_batch is None or (len(chunks[-1]) + 1) * max(longest, n) <= tokens_per_batch):
            chunks[-1].append(i)
            longest = max(longest, n)
        else:
            chunks.append([i])
            longest = n
    return chunks


def answer_elbo(logits_fn: MaskedLogitsFn, prompt: Tensor, answer: Tensor, *, mask_token_id: int, vocab_size: int,
                generator: torch.Generator, num_samples: int = 128, batch_size: int = 32, vocab_start: int = 0,
                group: dist.ProcessGroup | None = None) -> ElboEstimate:
    """LLaDA's Monte-Carlo estimate of the answer's negative ELBO, from ``num_samples`` (l, S) draws.

    Deterministic given the generator's state. All masks are drawn before any forward, so ``batch_size``
    changes memory and speed, never which masks are scored.
    """
    masks = sample_masks(answer.numel(), num_samples, generator)
    scores = score_masks(logits_fn, prompt, answer, masks, mask_token_id=mask_token_id, vocab_size=vocab_size,
                         vocab_start=vocab_start, group=group, batch_size=batch_size)
    return ElboEstimate(scores=scores, length=answer.numel())
