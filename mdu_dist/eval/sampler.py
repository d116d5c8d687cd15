"""Low-confidence remasking generation (LLaDA's ``generate``), vocab-parallel, for LLaDA and Dream.

Start from x = prompt ⊕ [MASK]^G. The G positions are cut into G / block_length semi-autoregressive blocks,
decoded left to right, each in steps / (G / block_length) steps. At every step of block b:

    tokens_i     = argmax_v ( z_iv + T g_iv )             z = logits, g ~ Gumbel(0, 1), T = temperature
    confidence_i = softmax(z_i)[tokens_i]                  the clean (T = 1) probability of the chosen token
    transfer the k_s most confident still-masked positions of block b to their tokens,

with k_s from ``num_transfer_tokens`` (the block's masks spread evenly over its steps, the remainder on the
first steps). T = 0 is greedy; for T > 0, argmax(z + T g) is a draw from softmax(z / T): LLaDA writes the same
rule as argmax(exp(z) / (-log u)^T), u ~ U(0, 1). The mask token and the padded vocabulary are never candidates
(their logits are set to -inf, so the confidence is the softmax over the real tokens).

Dream's logits are already shifted inside the model (position i predicts token i), so one sampler serves both.

Prompts of different lengths share a batch left padded (``left_pad``): every row's canvas is P_max prompt
columns then the G generated ones, so the generated columns line up. The padding is prompt, never a generated
column, so it is never a candidate, never transferred and never ranked; ``logits_fn`` must keep it out of
attention and number positions from each row's first real token (``DiffusionLM``'s ``pad``), which makes a
padded row's logits those of the row alone.

Vocab-parallel: ``logits_fn`` returns this rank's slice [vocab_start, vocab_start + V_local) of the vocabulary.
The argmax needs an all-reduce MAX of each row's local best score and an all-reduce MIN of the global indices
that reach it (the lowest index wins a tie, as torch.argmax does); the confidence needs the chosen token's
logit (SUM, from the rank that owns it) and the row's logsumexp (MAX, then SUM of exp). Only per-row scalars
cross ranks; every rank ends with the same tokens. For T > 0 every rank draws the same full-vocabulary Gumbel
noise for the block (same generator seed) and keeps its slice, so the result equals the single-process one.
Pipeline parallelism is the caller's: ``logits_fn`` must return the logits on every rank that runs the sampler.

Dream's samplers (``dream_generate``, its ``diffusion_generate`` with ``alg`` = maskgit_plus | topk_margin |
entropy and alg_temp = 0) decode the whole canvas at once, no blocks, over timesteps t_i = linspace(1, eps, steps + 1):
at step i every still-masked position draws tokens_i = argmax_v(z_iv / T + g_iv) (greedy at T = 0) and scores it

    maskgit_plus   confidence_i = p_i(tokens_i)                    p = softmax(z / T), softmax(z) at T = 0
    topk_margin    confidence_i = p_i(top1) - p_i(top2)
    entropy        confidence_i = sum_v p_iv log p_iv              (minus the entropy: the sharpest goes first)

and the k = floor(M (1 - t_{i+1} / t_i)) most confident of the M masked positions are transferred (all that are
left at the last step). Dream counts M over the whole batch; here it is per row, which is the same for one row
and makes a row's tokens independent of its batch. Vocab-parallel, the margin needs each row's two largest
logits (MAX all-reduces, ties across ranks counted by a SUM) and the entropy the SUM of exp(z - max) z.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

LogitsFn = Callable[[Tensor], Tensor]


def num_transfer_tokens(mask_count: Tensor, steps: int) -> Tensor:
    """[B, steps] tokens to unmask per step: mask_count // steps each, plus one on the first mask_count % steps."""
    base, remainder = mask_count // steps, mask_count % steps
    return base[:, None] + (torch.arange(steps, device=mask_count.device) < remainder[:, None]).long()


def _all_reduce(t: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> Tensor:
    # group=None is a single process: the local slice is the whole vocabulary.
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def candidate_logits(logits: Tensor, *, mask_token_id: int, vocab_start: int, vocab_size: int) -> Tensor:
    """fp64 copy of [N, V_local] logits with the mask token and the padded columns (id >= vocab_size) at -inf."""
    ids = torch.arange(vocab_start, vocab_start + logits.shape[-1], device=logits.device)
    return logits.double().masked_fill((ids >= vocab_size) | (ids == mask_token_id), float("-inf"))


def choose_tokens(logits: Tensor, noise: Tensor | None, *, vocab_start: int,
                  group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
    """Per row of [N, V_local] candidate logits z: (token = argmax_v(z + noise), confidence = softmax(z)[token]).

    ``noise`` is T * Gumbel for sampling, None for greedy. Returns global token ids [N] (int64) and
    confidences [N] (fp64), identical on every rank of ``group``.
    """
    scores = logits if noise is None else logits + noise
    local_best, local_index = scores.max(dim=-1)
    best = _all_reduce(local_best.clone(), dist.ReduceOp.MAX, group)
    sentinel = torch.iinfo(torch.int64).max
    token = torch.where(local_best == best, local_index + vocab_start, sentinel)
    token = _all_reduce(token, dist.ReduceOp.MIN, group)

    local = token - vocab_start
    owned = (local >= 0) & (local < logits.shape[-1])
    chosen = logits.gather(-1, local.clamp(0, logits.shape[-1] - 1)[:, None]).squeeze(-1)
    chosen = _all_reduce(torch.where(owned, chosen, torch.zeros_like(chosen)), dist.ReduceOp.SUM, group)
    row_max = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, group)
    sum_exp = _all_reduce((logits - row_max[:, None]).exp().sum(dim=-1), dist.ReduceOp.SUM, group)
    return token, torch.exp(chosen - row_max - sum_exp.log())


def gumbel_noise(shape: tuple[int, ...], temperature: float, *, vocab_start: int, vocab_local: int,
                 vocab_size: int, generator: torch.Generator) -> Tensor:
    """T * g for this rank's vocab slice, g = -log(-log u) drawn over the WHOLE vocabulary [*shape, vocab_size].

    Drawing the whole vocabulary on every rank (CPU generator, same seed) makes the vocab-parallel draw equal
    the single-process one; padded columns get 0 (their logits are -inf anyway).
    """
    u = torch.rand(*shape, vocab_size, generator=generator, dtype=torch.float64)
    g = temperature * -torch.log(-torch.log(u))
    local = g[..., vocab_start:min(vocab_start + vocab_local, vocab_size)]
    return torch.nn.functional.pad(local, (0, vocab_local - local.shape[-1]))


def check_temperature(temperature: float, generator: torch.Generator | None) -> None:
    if temperature < 0 or (temperature > 0 and generator is None):
        raise ValueError(f"temperature={temperature}: must be >= 0, and > 0 needs a generator")


@torch.no_grad()
def generate(logits_fn: LogitsFn, prompt: Tensor, *, gen_length: int, steps: int, block_length: int,
             mask_token_id: int, vocab_size: int, temperature: float = 0.0,
             generator: torch.Generator | None = None, vocab_start: int = 0,
             group: dist.ProcessGroup | None = None) -> Tensor:
    """Generate ``gen_length`` tokens after ``prompt`` [B, P] by low-confidence remasking; returns [B, gen_length].

    Rows of a batch share the prompt length P (left padded by ``left_pad`` when their prompts differ; the pad
    mask is ``logits_fn``'s). Steps that unmask no token in any row (steps per block > block_length) are
    skipped: they cannot change x.
    """
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} is not a multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} is not a multiple of the number of blocks ({num_blocks})")
    check_temperature(temperature, generator)
    steps_per_block = steps // num_blocks
    batch, n_prompt = prompt.shape
    x = torch.cat([prompt, prompt.new_full((batch, gen_length), mask_token_id)], dim=1)
    for block in range(num_blocks):
        lo, hi = n_prompt + block * block_length, n_prompt + (block + 1) * block_length
        schedule = num_transfer_tokens((x[:, lo:hi] == mask_token_id).sum(dim=1), steps_per_block)
        for step in range(steps_per_block):
            k = schedule[:, step]
            if int(k.max()) == 0:
                continue
            logits = logits_fn(x)[:, lo:hi]  # [B, block_length, V_local]
            vocab_local = logits.shape[-1]
            z = candidate_logits(logits.reshape(-1, vocab_local), mask_token_id=mask_token_id,
                                 vocab_start=vocab_start, vocab_size=vocab_size)
            noise = None
            if temperature > 0:
                noise = gumbel_noise((batch * block_length,), temperature, vocab_start=vocab_start,
                                     vocab_local=vocab_local, vocab_size=vocab_size,
                                     generator=generator).to(z.device)
            tokens, confidence = choose_tokens(z, noise, vocab_start=vocab_start, group=group)
            x[:, lo:hi] = transfer_most_confident(x[:, lo:hi], tokens.view(batch, block_length),
                                                  confidence.view(batch, block_length), k, mask_token_id)
    return x[:, n_prompt:]


def left_pad(prompts: list[list[int]], pad_token_id: int, gen_length: int) -> tuple[Tensor, Tensor | None]:
    """Prompts of any lengths as one [B, P_max] batch, left padded with ``pad_token_id``, and the canvas's pad
    mask [B, P_max + gen_length] (True at the padding; None when no row is padded)."""
    if not prompts or not all(prompts):
        raise ValueError("left_pad needs at least one prompt, each of at least one token")
    longest = max(len(p) for p in prompts)
    batch = torch.tensor([[pad_token_id] * (longest - len(p)) + list(p) for p in prompts], dtype=torch.long)
    if all(len(p) == longest for p in prompts):
        return batch, None
    pad = torch.zeros(len(prompts), longest + gen_length, dtype=torch.bool)
    for row, p in enumerate(prompts):
        pad[row, :longest - len(p)] = True
    return batch, pad


def transfer_most_confident(x: Tensor, tokens: Tensor, confidence: Tensor, k: Tensor, mask_token_id: int) -> Tensor:
    """x [B, L] with its k[b] most confident still-masked positions set to their tokens (the leftmost wins a tie)."""
    still_masked = x == mask_token_id
    confidence = confidence.masked_fill(~still_masked, float("-inf"))
    rank = confidence.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    transfer = rank < k[:, None].to(rank.device)
    return torch.where(transfer, tokens.to(x.device), x)


DREAM_ALGS = ("maskgit_plus", "topk_margin", "entropy")


def top2_margin(logits: Tensor, *, group: dist.ProcessGroup | None = None) -> Tensor:
    """p(top1) - p(top2) per row of [N, V_local] logits, p the softmax over the whole (vocab-parallel) row."""
    local = logits.topk(min(2, logits.shape[-1]), dim=-1).values
    first_local = local[:, 0]
    second_local = local[:, 1] if local.shape[-1] > 1 else torch.full_like(first_local, float("-inf"))
    first = _all_reduce(first_local.clone(), dist.ReduceOp.MAX, group)
    holds_first = first_local == first
    # The runner-up is the best value besides one copy of the maximum; a maximum held on two ranks is its own.
    second = _all_reduce(torch.where(holds_first, second_local, first_local), dist.ReduceOp.MAX, group)
    copies = _all_reduce(holds_first.to(logits.dtype), dist.ReduceOp.SUM, group)
    second = torch.where(copies > 1, first, second)
    sum_exp = _all_reduce((logits - first[:, None]).exp().sum(dim=-1), dist.ReduceOp.SUM, group)
    return (1 - (second - first).exp()) / sum_exp


def negative_entropy(logits: Tensor, *, group: dist.ProcessGroup | None = None) -> Tensor:
    """sum_v p_v log p_v per row of [N, V_local] logits (-inf columns contribute 0), vocab-parallel."""
    row_max = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, group)
    shifted = logits - row_max[:, None]
    weights = shifted.exp()
    sum_exp = _all_reduce(weights.sum(dim=-1), dist.ReduceOp.SUM, group)
    weighted = _all_reduce(torch.where(weights > 0, weights * shifted, 0.0).sum(dim=-1), dist.ReduceOp.SUM, group)
    return weighted / sum_exp - sum_exp.log()


@torch.no_grad()
def dream_generate(logits_fn: LogitsFn, prompt: Tensor, *, gen_length: int, steps: int, alg: str,
                   mask_token_id: int, vocab_size: int, temperature: float = 0.0, eps: float = 1e-3,
                   generator: torch.Generator | None = None, vocab_start: int = 0,
                   group: dist.ProcessGroup | None = None) -> Tensor:
    """Generate ``gen_length`` tokens after ``prompt`` [B, P] with Dream's ``alg`` (module docstring)."""
    if alg not in DREAM_ALGS:
        raise ValueError(f"alg={alg!r}: must be one of {', '.join(DREAM_ALGS)}")
    check_temperature(temperature, generator)
    if not 0 < eps < 1:
        raise ValueError(f"eps={eps}: must be in (0, 1)")
    batch, n_prompt = prompt.shape
    x = torch.cat([prompt, prompt.new_full((batch, gen_length), mask_token_id)], dim=1)
    timesteps = torch.linspace(1, eps, steps + 1, dtype=torch.float64)
    for step in range(steps):
        masked = (x[:, n_prompt:] == mask_token_id).sum(dim=1)
        if step < steps - 1:
            k = (masked.double() * (1 - timesteps[step + 1] / timesteps[step])).floor().long()
        else:
            k = masked
        if int(k.max()) == 0:
            continue  # Dream's loop still runs the forward here, but a step that unmasks nothing leaves x as it is.
        logits = logits_fn(x)[:, n_prompt:]
        vocab_local = logits.shape[-1]
        z = candidate_logits(logits.reshape(-1, vocab_local), mask_token_id=mask_token_id,
                             vocab_start=vocab_start, vocab_size=vocab_size)
        noise = None
        if temperature > 0:
            z = z / temperature
            noise = gumbel_noise((batch * gen_length,), 1.0, vocab_start=vocab_start, vocab_local=vocab_local,
                                 vocab_size=vocab_size, generator=generator).to(z.device)
        tokens, confidence = choose_tokens(z, noise, vocab_start=vocab_start, group=group)
        if alg == "topk_margin":
            confidence = top2_margin(z, group=group)
        elif alg == "entropy":
            confidence = negative_entropy(z, group=group)
        x[:, n_prompt:] = transfer_most_confident(x[:, n_prompt:], tokens.view(batch, gen_length),
                                                  confidence.view(batch, gen_length), k, mask_token_id)
    return x[:, n_prompt:]
