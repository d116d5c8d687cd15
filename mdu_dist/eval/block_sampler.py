"""LLaDA2's block sampler: the ``generate`` of LLaDA2.0's HF code (``block``) and of LLaDA2.1's (``block_edit``,
with its editing of placed tokens), vocab-parallel, for prompts of any lengths in one batch.

The canvas is prompt ⊕ [MASK]^G, cut into blocks of B = ``block_size`` positions counted from 0 at the prompt's
first token, and padded with masks to a whole number of blocks. The blocks from floor(P / B) on (the first holds
the prompt's last P mod B tokens, the rest of it masks) are decoded in order, block n seeing positions 0 .. (n+1)B
only (the window), under the block-causal mask (``model.block_size`` = B, ``models.masks``): a block attends
bidirectionally to itself and to every earlier block. Each forward predicts, at every position of block n,

    tokens_i = argmax_v ( z_iv / T + g_iv )        confidence_i = softmax(z_i / T)[tokens_i]   (T = 0: softmax(z_i))

over the real tokens (the mask token and the padded vocabulary at -inf, as every sampler here), and transfers:

``block`` (LLaDA2.0), at most S = min(``steps``, G) forwards per block, step s with k_s tokens due (B spread over
the S steps, the remainder on the first ones, as ``sampler.num_transfer_tokens``): every still-masked position with
confidence > ``threshold`` if there are at least k_s of them, else the min(k_s, masks left) most confident masked
positions; the block ends when it holds no mask. After a block, a row whose generated tokens so far hold EOS stops:
its later positions stay the mask token (the caller cuts at the first EOS anyway).

``block_edit`` (LLaDA2.1), forwards until the block is settled, one transfer rule per forward: the masked positions
with confidence > ``threshold`` if there is at least one, else the single most confident masked position; and in
the same forward every already placed, non-prompt position of the block whose prediction changed and has
confidence > ``editing_threshold`` takes the new token (positions placed in this forward are not edited in it).
Once the block holds no mask, the forwards go on while they edit, at most ``max_post_steps`` of them. No EOS stop
(LLaDA2.1's default ``eos_early_stop=False``): every block is decoded.

Batches: row r's prompt of P_r tokens starts at column a_r = L - B * floor(P_r / B), L = B * max_r floor(P_r / B),
so every row's n-th decoded block lies at the same columns [L + nB, L + (n+1)B) and the window is one slice. The
columns before a_r, and a row's columns past its last block, are padding (``pad``): ``logits_fn`` keeps them out of
attention and numbers positions from each row's first real token (``DiffusionLM``), so a row's tokens are those of
the row alone. Every per-step decision is per row; a finished row transfers nothing.

Vocab-parallel as ``sampler``: ``choose_tokens`` all-reduces per-row scalars, so every rank of ``group`` holds the
same tokens and confidences and takes the same decisions. Pipeline parallelism is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from mdu_dist.eval.sampler import (candidate_logits, check_temperature, choose_tokens, gumbel_noise,
                                   num_transfer_tokens, transfer_most_confident)

# (ids [B, W], positions bool [B, W], pad bool [B, W] or None) -> [N, V_local] logits at the True positions,
# row-major: ``Evaluator.logits``, the output layer at the current block only.
BlockLogitsFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
Predict = Callable[[], tuple[Tensor, Tensor]]  # the current block's (tokens, confidence), each [B, block_size]


@dataclass(frozen=True)
class Canvas:
    """Prompts laid out for block decoding (module docstring): ``x`` [B, W] with ``pad`` [B, W] (None when no row
    is padded), ``start`` the column of every row's first decoded block, ``blocks`` [B] the blocks each row decodes,
    ``first`` [B] the column of each row's first generated token."""

    x: Tensor
    pad: Tensor | None
    start: int
    blocks: Tensor
    first: Tensor


def block_canvas(prompts: list[list[int]], *, gen_length: int, block_size: int, mask_token_id: int,
                 pad_token_id: int) -> Canvas:
    if not prompts or not all(prompts):
        raise ValueError("block_canvas needs at least one prompt, each of at least one token")
    if block_size < 1 or gen_length < 1:
        raise ValueError(f"block_size={block_size} and gen_length={gen_length} must be >= 1")
    start = block_size * max(len(p) // block_size for p in prompts)
    blocks = [-(-(len(p) % block_size + gen_length) // block_size) for p in prompts]
    width = start + block_size * max(blocks)
    x = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    pad = torch.ones(len(prompts), width, dtype=torch.bool)
    first = []
    for row, (p, n) in enumerate(zip(prompts, blocks)):
        a = start - block_size * (len(p) // block_size)
        end = start + block_size * n
        x[row, a:a + len(p)] = torch.tensor(p)
        x[row, a + len(p):end] = mask_token_id
        pad[row, a:end] = False
        first.append(a + len(p))
    return Canvas(x, pad if pad.any() else None, start, torch.tensor(blocks), torch.tensor(first))


@torch.no_grad()
def block_generate(logits_fn: BlockLogitsFn, prompts: list[list[int]], *, gen_length: int, block_size: int,
                   steps: int, mask_token_id: int, pad_token_id: int, eos_token_id: int, vocab_size: int,
                   threshold: float = 0.95, editing_threshold: float | None = None, max_post_steps: int = 16,
                   temperature: float = 0.0, generator: torch.Generator | None = None, vocab_start: int = 0,
                   group: dist.ProcessGroup | None = None) -> Tensor:
    """``gen_length`` tokens after each of ``prompts`` (any lengths), [B, gen_length]: LLaDA2.0's rule, or with
    ``editing_threshold`` LLaDA2.1's (module docstring; ``steps`` is 2.0's, ``max_post_steps`` 2.1's)."""
    check_temperature(temperature, generator)
    if steps < 1 or max_post_steps < 0:
        raise ValueError(f"steps={steps} must be >= 1 and max_post_steps={max_post_steps} >= 0")
    canvas = block_canvas(prompts, gen_length=gen_length, block_size=block_size, mask_token_id=mask_token_id,
                          pad_token_id=pad_token_id)
    x, pad = canvas.x.clone(), canvas.pad
    live = torch.ones(x.shape[0], dtype=torch.bool)  # rows not stopped at EOS

    def predict(hi: int) -> tuple[Tensor, Tensor]:
        """(tokens, confidence), each [B, block_size], of the current block, from the window's forward."""
        at = torch.zeros(x.shape[0], hi, dtype=torch.bool)
        at[:, hi - block_size:] = True
        logits = logits_fn(x[:, :hi], at, None if pad is None else pad[:, :hi])
        z = candidate_logits(logits, mask_token_id=mask_token_id, vocab_start=vocab_start, vocab_size=vocab_size)
        noise = None
        if temperature > 0:
            z = z / temperature
            noise = gumbel_noise((z.shape[0],), 1.0, vocab_start=vocab_start, vocab_local=z.shape[-1],
                                 vocab_size=vocab_size, generator=generator).to(z.device)
        tokens, confidence = choose_tokens(z, noise, vocab_start=vocab_start, group=group)
        return tokens.view(x.shape[0], block_size).cpu(), confidence.view(x.shape[0], block_size).cpu()

    schedule = num_transfer_tokens(torch.tensor([block_size]), min(steps, gen_length))[0]
    for n in range(int(canvas.blocks.max())):
        active = live & (n < canvas.blocks)
        if not active.any():
            break
        lo, hi = canvas.start + n * block_size, canvas.start + (n + 1) * block_size
        if editing_threshold is None:
            _decode_block(lambda: predict(hi), x[:, lo:hi], active, schedule, mask_token_id, threshold)
            generated = torch.arange(hi)[None] >= canvas.first[:, None]
            live &= ~((x[:, :hi] == eos_token_id) & generated).any(dim=1)
        else:
            _edit_block(lambda: predict(hi), x[:, lo:hi], active, mask_token_id, threshold, editing_threshold,
                        max_post_steps)
    columns = canvas.first[:, None] + torch.arange(gen_length)[None]
    return x.gather(1, columns)


def _transfer(block: Tensor, tokens: Tensor, confidence: Tensor, rows: Tensor, k: int, threshold: float,
              mask_token_id: int) -> Tensor:
    """``block`` [B, B_s] of the deciding ``rows`` with every masked position of confidence > ``threshold``
    transferred when there are at least k of them, else the min(k, masks) most confident masked positions."""
    masked = (block == mask_token_id) & rows[:, None]
    due = torch.where(rows, torch.clamp(masked.sum(dim=1), max=k), 0)
    high = masked & (confidence > threshold)
    top_k = transfer_most_confident(block, tokens, confidence, due, mask_token_id)
    return torch.where((high.sum(dim=1) >= due)[:, None], torch.where(high, tokens, block), top_k)


def _decode_block(predict: Predict, block: Tensor, active: Tensor, schedule: Tensor, mask_token_id: int,
                  threshold: float) -> None:
    """LLaDA2.0, in place on ``block`` (a view of the canvas, which ``predict`` reads): the block's masks
    transferred by threshold or top-k_s, k_s = ``schedule[s]``, one forward a step, until none is left."""
    for k in schedule.tolist():
        if not ((block == mask_token_id) & active[:, None]).any():
            break
        tokens, confidence = predict()
        block.copy_(_transfer(block, tokens, confidence, active, k, threshold, mask_token_id))


def _edit_block(predict: Predict, block: Tensor, active: Tensor, mask_token_id: int, threshold: float,
                editing_threshold: float, max_post_steps: int) -> None:
    """LLaDA2.1, in place on ``block`` as ``_decode_block``: threshold-or-one transfer plus editing, until no mask
    is left and a forward edits nothing (at most ``max_post_steps`` forwards after the last mask)."""
    prompt = block != mask_token_id  # the prompt's tail in the first block: never edited
    post = torch.zeros(block.shape[0], dtype=torch.long)
    done = ~active
    while True:
        masked = block == mask_token_id
        post += (~masked.any(dim=1) & ~done).long()
        done = done | (post > max_post_steps)
        if done.all():
            return
        tokens, confidence = predict()
        placed = _transfer(block, tokens, confidence, ~done, 1, threshold, mask_token_id)
        edit = ~done[:, None] & ~masked & ~prompt & (confidence > editing_threshold) & (tokens != block)
        block.copy_(torch.where(edit, tokens, placed))
        done = done | (~masked.any(dim=1) & ~edit.any(dim=1))
