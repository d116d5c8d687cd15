"""Low-confidence remasking: the schedule, determinism, a copying model, a plain transcription of LLaDA's
``generate`` as reference, the sampling law at T > 0, the excluded tokens, and TP=2 (gloo) = single process."""

from __future__ import annotations

import math

import pytest
import torch

from multiproc import run_distributed
from mdu_dist.config import ModelConfig
from mdu_dist.eval.sampler import generate, num_transfer_tokens
from mdu_dist.models.dense import dense_forward, init_weights

MASK = 10
CFG = ModelConfig(arch="llada", num_layers=1, hidden_size=16, num_attention_heads=2, num_query_groups=2,
                  ffn_hidden_size=32, vocab_size=11, mask_token_id=MASK, eos_token_id=1, pad_token_id=1,
                  init_std=0.5)
WEIGHTS = init_weights(CFG, seed=4, dtype=torch.float64)
PROMPTS = torch.tensor([[2, 3, 4], [5, 1, 7]])


def dense_logits(ids: torch.Tensor) -> torch.Tensor:
    return dense_forward(CFG, WEIGHTS, ids)


def llada_generate_reference(prompt, steps, gen_length, block_length):
    """LLaDA's published greedy ``generate`` (low_confidence remasking), transcribed over the full vocabulary."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), MASK, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for b in range(num_blocks):
        start, end = prompt.shape[1] + b * block_length, prompt.shape[1] + (b + 1) * block_length
        mask_num = (x[:, start:end] == MASK).sum(dim=1, keepdim=True)
        k = torch.zeros(x.shape[0], steps, dtype=torch.long) + mask_num // steps
        for j in range(x.shape[0]):
            k[j, :int(mask_num[j] % steps)] += 1
        for i in range(steps):
            mask_index = x == MASK
            logits = dense_logits(x)
            logits[..., MASK] = -math.inf  # the one departure: the mask token is never a candidate
            x0 = logits.argmax(dim=-1)
            p = torch.softmax(logits, dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            p[:, end:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, p, -math.inf)
            for j in range(x.shape[0]):
                _, select = torch.topk(confidence[j], k=int(k[j, i]))
                x[j, select] = x0[j, select]
    return x[:, prompt.shape[1]:]


def test_schedule_spreads_the_masks_evenly_remainder_first():
    got = num_transfer_tokens(torch.tensor([10, 4, 0, 3]), 4)
    assert got.tolist() == [[3, 3, 2, 2], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]]


@pytest.mark.parametrize("steps,gen_length,block_length", [(8, 8, 4), (4, 8, 4), (12, 6, 2), (3, 6, 6)])
def test_greedy_equals_llada_reference_and_fills_every_mask(steps, gen_length, block_length):
    kwargs = dict(gen_length=gen_length, steps=steps, block_length=block_length, mask_token_id=MASK,
                  vocab_size=CFG.vocab_size)
    out = generate(dense_logits, PROMPTS, **kwargs)
    assert out.shape == (2, gen_length)
    assert not (out == MASK).any() and ((out >= 0) & (out < CFG.vocab_size)).all()
    assert torch.equal(out, llada_generate_reference(PROMPTS, steps, gen_length, block_length))
    assert torch.equal(out, generate(dense_logits, PROMPTS, **kwargs))  # deterministic at T = 0


def test_model_that_copies_a_known_answer_is_reproduced_exactly():
    answer = torch.tensor([[7, 0, 3, 3, 9, 1, 4, 2], [1, 2, 3, 4, 5, 6, 7, 8]])
    n_prompt = PROMPTS.shape[1]
    noise = torch.randn(2, n_prompt + 8, CFG.vocab_size, generator=torch.Generator().manual_seed(0))

    def copier(ids):
        # Small random logits everywhere, and a large one on answer[i] at generated position i.
        logits = noise.clone()
        logits[:, n_prompt:].scatter_(-1, answer[..., None], 30.0)
        return logits

    out = generate(copier, PROMPTS, gen_length=8, steps=4, block_length=4, mask_token_id=MASK,
                   vocab_size=CFG.vocab_size)
    assert torch.equal(out, answer)


def test_mask_token_and_padded_vocab_are_never_generated():
    def adversarial(ids):
        # 14 columns for an 11-token vocabulary: the mask token and the 3 padding columns carry the largest logits.
        logits = torch.zeros(*ids.shape, 14)
        logits[..., MASK] = 50.0
        logits[..., 11:] = 60.0
        logits[..., 3] = 5.0
        return logits

    out = generate(adversarial, PROMPTS, gen_length=4, steps=4, block_length=4, mask_token_id=MASK,
                   vocab_size=CFG.vocab_size)
    assert (out == 3).all()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_temperature_samples_from_softmax_of_logits_over_temperature(temperature):
    fixed = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0, -0.5, 0.2, 1.5, -2.0, 0.1, 0.0], dtype=torch.float64)
    n = 20000
    out = generate(lambda ids: fixed.expand(*ids.shape, -1), torch.zeros(n, 1, dtype=torch.long), gen_length=1,
                   steps=1, block_length=1, mask_token_id=MASK, vocab_size=CFG.vocab_size,
                   temperature=temperature, generator=torch.Generator().manual_seed(3))
    expected = torch.softmax(fixed[:MASK] / temperature, dim=0)
    freq = torch.bincount(out[:, 0], minlength=CFG.vocab_size).double() / n
    assert freq[MASK] == 0
    sigma = torch.sqrt(expected * (1 - expected) / n)
    assert ((freq[:MASK] - expected).abs() < 5 * sigma).all(), (freq, expected)


TIE_LOGITS = torch.randn(64, 11, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
TIE_LOGITS[0, [2, 8]] = 9.0  # a tie across the two ranks' slices: the lower id must win, as torch.argmax does


def _tp_generate() -> dict:
    """One rank of TP=2: logits of its vocab slice (11 padded to 12, 6 columns each, the padding at -inf)."""
    import torch.distributed as dist

    from mdu_dist.eval.sampler import candidate_logits, choose_tokens

    dist.init_process_group("gloo")
    vocab_local = 6
    start = dist.get_rank() * vocab_local

    def sliced(full_logits):
        full = torch.nn.functional.pad(full_logits, (0, 2 * vocab_local - CFG.vocab_size), value=-math.inf)
        return full[..., start:start + vocab_local]

    z = candidate_logits(sliced(TIE_LOGITS), mask_token_id=MASK, vocab_start=start, vocab_size=CFG.vocab_size)
    token, confidence = choose_tokens(z, None, vocab_start=start, group=dist.group.WORLD)
    out = {"token": token.tolist(), "confidence": confidence.tolist()}
    for t in (0.0, 2.0):
        out[t] = generate(lambda ids: sliced(dense_logits(ids)), PROMPTS, gen_length=8, steps=4, block_length=8,
                          mask_token_id=MASK, vocab_size=CFG.vocab_size, temperature=t,
                          generator=torch.Generator().manual_seed(9), vocab_start=start,
                          group=dist.group.WORLD).tolist()
    return out


def _single(temperature: float) -> torch.Tensor:
    return generate(dense_logits, PROMPTS, gen_length=8, steps=4, block_length=8, mask_token_id=MASK,
                    vocab_size=CFG.vocab_size, temperature=temperature, generator=torch.Generator().manual_seed(9))


def test_vocab_parallel_equals_single_process():
    real = TIE_LOGITS.clone()
    real[:, MASK] = -math.inf
    expected_token = real.argmax(dim=-1)
    expected_confidence = torch.softmax(real, dim=-1).gather(-1, expected_token[:, None]).squeeze(-1)
    assert expected_token[0] == 2
    for per_rank in run_distributed(_tp_generate, 2):
        assert per_rank["token"] == expected_token.tolist()
        assert torch.allclose(torch.tensor(per_rank["confidence"], dtype=torch.float64), expected_confidence,
                              rtol=1e-12)
        for temperature in (0.0, 2.0):
            assert torch.equal(torch.tensor(per_rank[temperature]), _single(temperature)), temperature
    # At T = 2 the draw differs from the greedy answer, so the noise path was exercised too.
    assert not torch.equal(_single(2.0), _single(0.0))


def test_rejects_inconsistent_lengths():
    with pytest.raises(ValueError, match="block_length"):
        generate(dense_logits, PROMPTS, gen_length=6, steps=6, block_length=4, mask_token_id=MASK, vocab_size=11)
    with pytest.raises(ValueError, match="steps"):
        generate(dense_logits, PROMPTS, gen_length=6, steps=5, block_length=3, mask_token_id=MASK, vocab_size=11)
    with pytest.raises(ValueError, match="generator"):
        generate(dense_logits, PROMPTS, gen_length=6, steps=6, block_length=3, mask_token_id=MASK, vocab_size=11,
                 temperature=1.0)
