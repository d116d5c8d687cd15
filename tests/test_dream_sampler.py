"""Dream's samplers (maskgit_plus, topk_margin, entropy): a plain transcription of Dream's ``diffusion_generate``
step rule on a tiny Dream model with fixed weights, determinism at T = 0, and TP=2 (gloo) = single process."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from multiproc import run_distributed
from mdu_dist.config import ModelConfig
from mdu_dist.eval.sampler import DREAM_ALGS, dream_generate, negative_entropy, top2_margin
from mdu_dist.models.dense import dense_forward, init_weights

MASK = 12
CFG = ModelConfig(arch="dream", num_layers=1, hidden_size=16, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=32, vocab_size=13, mask_token_id=MASK, eos_token_id=1, pad_token_id=1,
                  qkv_bias=True, init_std=0.5)
WEIGHTS = init_weights(CFG, seed=7, dtype=torch.float64)
PROMPTS = torch.tensor([[2, 3, 4], [5, 1, 7]])


def dream_logits(ids: torch.Tensor) -> torch.Tensor:
    return dense_forward(CFG, WEIGHTS, ids)


def unshifted_logits(ids: torch.Tensor) -> torch.Tensor:
    """The HF model's raw output: Dream's own code does the shift (dense_forward's Dream logits are pre-shifted)."""
    return dense_forward(dataclasses.replace(CFG, arch="llada"), WEIGHTS, ids)


def dream_sample_tokens(logits, margin_confidence=False, neg_entropy=False):
    """Dream's ``sample_tokens`` at temperature 0, no top-p / top-k."""
    probs = torch.softmax(logits, dim=-1)
    confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def dream_reference(prompt: torch.Tensor, gen_length: int, steps: int, alg: str, eps: float = 1e-3):
    """Dream's ``_sample`` loop (alg_temp = 0) for one row, transcribed; the one departure: the mask token is never
    a candidate (its logit is -inf before the softmax), as everywhere in mdu-dist."""
    x = F.pad(prompt, (0, gen_length), value=MASK)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == MASK
        logits = unshifted_logits(x)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        logits[..., MASK] = -math.inf
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        confidence, x0 = dream_sample_tokens(mask_logits, margin_confidence=alg == "topk_margin",
                                             neg_entropy=alg == "entropy")
        num_mask_token = mask_index.sum()
        number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 else num_mask_token
        if number_transfer_tokens > 0:
            _, transfer_index = torch.topk(confidence, number_transfer_tokens)
            x0_ = torch.zeros_like(x0) + MASK
            x0_[transfer_index] = x0[transfer_index].clone()
            x[mask_index] = x0_
    return x[:, prompt.shape[1]:]


@pytest.mark.parametrize("alg", DREAM_ALGS)
@pytest.mark.parametrize("steps,gen_length", [(8, 8), (4, 8), (3, 6)])
def test_equals_transcription_of_dream_step_rule(alg, steps, gen_length):
    out = dream_generate(dream_logits, PROMPTS, gen_length=gen_length, steps=steps, alg=alg, mask_token_id=MASK,
                         vocab_size=CFG.vocab_size)
    assert out.shape == (2, gen_length) and not (out == MASK).any()
    for row in range(PROMPTS.shape[0]):
        want = dream_reference(PROMPTS[row:row + 1], gen_length, steps, alg)
        assert torch.equal(out[row:row + 1], want), (alg, row, out[row], want)
    again = dream_generate(dream_logits, PROMPTS, gen_length=gen_length, steps=steps, alg=alg, mask_token_id=MASK,
                           vocab_size=CFG.vocab_size)
    assert torch.equal(out, again)  # deterministic at T = 0


def test_the_three_orders_differ():
    # Otherwise the transcription test could pass with the confidence ignored.
    outs = {alg: dream_generate(dream_logits, PROMPTS, gen_length=8, steps=8, alg=alg, mask_token_id=MASK,
                                vocab_size=CFG.vocab_size) for alg in DREAM_ALGS}
    assert len({tuple(o.flatten().tolist()) for o in outs.values()}) > 1


def test_margin_and_entropy_against_float64_formulas():
    z = torch.randn(5, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z[0, 4] = -math.inf
    z[1, [2, 6]] = 3.0  # a tied maximum: the margin is 0
    p = torch.softmax(z, dim=-1)
    top = p.sort(dim=-1, descending=True).values
    assert torch.allclose(top2_margin(z), top[:, 0] - top[:, 1], rtol=0, atol=1e-14)
    assert top2_margin(z)[1] == 0
    plogp = torch.where(p > 0, p * p.log(), 0.0).sum(dim=-1)
    assert torch.allclose(negative_entropy(z), plogp, rtol=0, atol=1e-13)


TIE = torch.randn(6, 13, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
TIE[0, [1, 10]] = 6.0  # the maximum on both ranks: margin 0
TIE[1, [3, 4]] = 6.0  # the maximum twice on rank 0
TIE[2, 11] = 6.0  # top1 and top2 on rank 1


def _tp_rank() -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    vocab_local = 7  # 13 padded to 14
    start = dist.get_rank() * vocab_local

    def sliced(full_logits):
        full = F.pad(full_logits, (0, 2 * vocab_local - CFG.vocab_size), value=-math.inf)
        return full[..., start:start + vocab_local]

    out = {"margin": top2_margin(sliced(TIE), group=dist.group.WORLD).tolist(),
           "entropy": negative_entropy(sliced(TIE), group=dist.group.WORLD).tolist()}
    for alg in DREAM_ALGS:
        for t in (0.0, 1.5):
            out[f"{alg}/{t}"] = dream_generate(
                lambda ids: sliced(dream_logits(ids)), PROMPTS, gen_length=8, steps=4, alg=alg, mask_token_id=MASK,
                vocab_size=CFG.vocab_size, temperature=t, generator=torch.Generator().manual_seed(3),
                vocab_start=start, group=dist.group.WORLD).tolist()
    return out


def test_vocab_parallel_equals_single_process():
    ranks = run_distributed(_tp_rank, 2)
    for per_rank in ranks:
        assert torch.allclose(torch.tensor(per_rank["margin"], dtype=torch.float64), top2_margin(TIE), atol=1e-14)
        assert torch.allclose(torch.tensor(per_rank["entropy"], dtype=torch.float64), negative_entropy(TIE),
                              atol=1e-13)
        for alg in DREAM_ALGS:
            for t in (0.0, 1.5):
                single = dream_generate(dream_logits, PROMPTS, gen_length=8, steps=4, alg=alg, mask_token_id=MASK,
                                        vocab_size=CFG.vocab_size, temperature=t,
                                        generator=torch.Generator().manual_seed(3))
                assert torch.equal(torch.tensor(per_rank[f"{alg}/{t}"]), single), (alg, t)
    assert top2_margin(TIE)[0] == 0 and top2_margin(TIE)[1] == 0


def test_rejects_bad_arguments():
    kwargs = dict(gen_length=4, steps=4, mask_token_id=MASK, vocab_size=CFG.vocab_size)
    with pytest.raises(ValueError, match="alg='origin'"):
        dream_generate(dream_logits, PROMPTS, alg="origin", **kwargs)
    with pytest.raises(ValueError, match="generator"):
        dream_generate(dream_logits, PROMPTS, alg="entropy", temperature=0.5, **kwargs)
