"""Padding through the megatron-core model and the evaluation built on it, on CPU (fp32 model).

- A left- or right-padded row's logits at its real positions equal the dense float64 model's logits of the row
  alone (LLaDA and Dream, SDPA and megatron's local attention), whatever tokens sit in the padding: the padded
  keys are out of attention. RoPE being relative, the logits barely see a shift of all positions, so the rotary
  angles the decoder receives are checked on their own: each row's restart at 0 at its first real token.
- Greedy generation of prompts of different lengths in one left-padded batch equals generating each prompt
  alone, token for token (LLaDA's low-confidence remasking, Dream's entropy and top-k margin; LLaDA at TP=2).
- The ELBO sample scores of several answers packed into shared right-padded forwards equal the scores of each
  answer scored alone in unpadded forwards (``score_masks``, itself checked against exact enumeration).
"""

from __future__ import annotations

import functools

import pytest
import torch

from multiproc import run_distributed

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=101",
        "model.make_vocab_size_divisible_by=8", "model.init_std=0.1"]
ARCH_CONFIGS = {"llada": "configs/llada_tiny.yaml", "dream": "configs/dream_tiny.yaml"}
LENGTHS = (5, 9, 2)  # real tokens per row; the batch is 9 wide
PROMPTS = ([4, 17, 33], [8, 9, 10, 11, 12, 13], [40, 41, 42, 43])
GEN = dict(gen_length=8, steps=8)


def _stage(arch: str, tp: int, attention: str = "sdpa"):
    from megatron.core import parallel_state as ps

    from mdu_dist.config import load_config
    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard

    m = load_config(ARCH_CONFIGS[arch], TINY + [f"parallel.tensor={tp}", f"model.attention={attention}"]).model
    weights = init_weights(m, seed=5)
    stage = build_stage(m).eval()
    load_shard(stage.module, shard(m, weights, tp, ps.get_tensor_model_parallel_rank(), 1, 0))
    return m, stage, {k: v.double() for k, v in weights.items()}


def _padded_forward_errors() -> dict[str, float]:
    """Largest error relative to the largest reference logit, per (arch, attention, padding side, path), and
    the largest error of the decoder's rotary cos against the dense model's at positions 0, 1, ... of each row."""
    from mdu_dist.models.dense import dense_forward, rope_cos_sin

    g = torch.Generator().manual_seed(0)
    worst = {}
    for arch in ARCH_CONFIGS:
        for attention in ("sdpa", "local"):
            m, stage, weights = _stage(arch, 1, attention)
            rows = [torch.randint(4, m.vocab_size, (n,), generator=g) for n in LENGTHS]
            want = [dense_forward(m, weights, r[None])[0] for r in rows]
            width = max(LENGTHS)
            for side in ("left", "right"):
                # Junk tokens in the padding: any leak into the real positions shows.
                ids = torch.randint(4, m.vocab_size, (len(rows), width), generator=g)
                pad = torch.ones(len(rows), width, dtype=torch.bool)
                for j, r in enumerate(rows):
                    cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
                    ids[j, cols], pad[j, cols] = r, False
                seen = []
                hook = stage.module.decoder.register_forward_pre_hook(
                    lambda _, args, kwargs: seen.append(kwargs["rotary_pos_emb"]), with_kwargs=True)
                with torch.no_grad():
                    full = stage(ids, pad=pad).double()[..., :m.vocab_size]
                hook.remove()
                cos, _ = rope_cos_sin(width, m.head_dim, m.rope_theta, torch.float64, torch.device("cpu"))
                angles = seen[0][:, :, 0]  # [S, B, head_dim]
                worst[f"{arch}/{attention}/{side}/rope"] = max(
                    (angles[~pad[j], j].double().cos() - cos[:len(r)]).abs().max().item() for j, r in enumerate(rows))
                with torch.no_grad():
                    positions = ~pad & (torch.rand(ids.shape, generator=g) < 0.6)
                    at = stage(ids, positions, pad).double()[:, :m.vocab_size]
                got = [full[j][~pad[j]] for j in range(len(rows))]
                picked = torch.cat([want[j][positions[j][~pad[j]]] for j in range(len(rows))])
                scale = max(w.abs().max().item() for w in want)
                worst[f"{arch}/{attention}/{side}"] = max((a - b).abs().max().item() for a, b in zip(got, want)) / scale
                worst[f"{arch}/{attention}/{side}/positions"] = (at - picked).abs().max().item() / scale
    return worst


def _generations(arch: str, tp: int, samplers: tuple[str, ...]) -> dict[str, tuple[list, list]]:
    """(batched, one prompt at a time) greedy generations of PROMPTS for each sampler."""
    from megatron.core import parallel_state as ps

    from mdu_dist.eval.sampler import dream_generate, generate, left_pad

    m, stage, _ = _stage(arch, tp)
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    common = dict(mask_token_id=m.mask_token_id, vocab_size=m.vocab_size, vocab_start=stage.vocab_start,
                  group=group, **GEN)

    def run(sampler, logits_fn, prompt):
        if sampler == "low_confidence":
            return generate(logits_fn, prompt, block_length=4, **common)
        return dream_generate(logits_fn, prompt, alg=sampler, **common)

    out = {}
    for sampler in samplers:
        prompt, pad = left_pad(list(PROMPTS), m.pad_token_id, GEN["gen_length"])
        assert pad is not None and pad.sum().item() == 3 + 0 + 2  # rows 0 and 2 are padded
        batched = run(sampler, functools.partial(stage, pad=pad), prompt)
        alone = [run(sampler, stage, torch.tensor([p]))[0] for p in PROMPTS]
        out[sampler] = (batched.tolist(), [a.tolist() for a in alone])
    return out


def _packed_elbo(arch: str, tp: int) -> tuple[list, list, int]:
    """(packed scores, alone scores, forwards that mixed answers and padding) of three answers."""
    from megatron.core import parallel_state as ps

    from mdu_dist.eval.likelihood import sample_masks, score_masks, score_packed

    m, stage, _ = _stage(arch, tp)
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    g = torch.Generator().manual_seed(1)
    triples = []
    for n_prompt, n_answer in ((3, 4), (6, 7), (2, 3)):
        prompt, answer = (torch.randint(4, m.vocab_size, (n,), generator=g) for n in (n_prompt, n_answer))
        triples.append((prompt, answer, sample_masks(n_answer, 5, g)))
    padded = []

    def logits_fn(ids, positions, pad=None):
        if pad is not None:
            padded.append(ids.shape[0])
        return stage(ids, positions, pad)

    common = dict(mask_token_id=m.mask_token_id, vocab_size=m.vocab_size, vocab_start=stage.vocab_start, group=group)
    # Rows of 7, 13 and 5 tokens, 5 of each, in forwards of <= 52 tokens: [7 x5] [13 x4] [13, 5, 5, 5] [5, 5];
    # the third mixes two answers and right-pads the short rows.
    packed = score_packed(logits_fn, triples, tokens_per_batch=52, pad_token_id=m.pad_token_id, **common)
    alone = [score_masks(stage, p, a, mk, **common) for p, a, mk in triples]
    return [x.tolist() for x in packed], [x.tolist() for x in alone], len(padded)


def _single_process() -> dict:
    from mdu_dist import distributed
    from mdu_dist.config import load_config

    distributed.init(load_config(ARCH_CONFIGS["dream"], TINY).parallel)
    try:
        return {"forward": _padded_forward_errors(),
                "generate": {**{f"llada/{k}": v for k, v in _generations("llada", 1, ("low_confidence",)).items()},
                             **{f"dream/{k}": v for k, v in
                                _generations("dream", 1, ("entropy", "topk_margin")).items()}},
                "elbo": {arch: _packed_elbo(arch, 1) for arch in ARCH_CONFIGS}}
    finally:
        distributed.shutdown()


def _tp2() -> dict:
    from mdu_dist import distributed
    from mdu_dist.config import load_config

    distributed.init(load_config(ARCH_CONFIGS["llada"], TINY + ["parallel.tensor=2"]).parallel)
    try:
        return {"generate": _generations("llada", 2, ("low_confidence",)), "elbo": _packed_elbo("llada", 2)}
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def single() -> dict:
    return run_distributed(_single_process, 1)[0]


def test_padded_rows_give_the_unpadded_logits(single):
    worst = single["forward"]
    assert len(worst) == 2 * 2 * 2 * 3
    bad = {k: v for k, v in worst.items() if not v <= 1e-5}
    assert not bad, f"relative errors above 1e-5: {bad}"


def test_padded_batched_generation_equals_one_prompt_at_a_time(single):
    assert set(single["generate"]) == {"llada/low_confidence", "dream/entropy", "dream/topk_margin"}
    for name, (batched, alone) in single["generate"].items():
        assert batched == alone, name
        assert len({tuple(a) for a in alone}) > 1, f"{name}: the prompts must not all generate the same text"


def test_packed_elbo_equals_one_answer_per_forward(single):
    for arch, (packed, alone, padded_forwards) in single["elbo"].items():
        assert padded_forwards == 1, f"{arch}: one forward must mix answers of different lengths"
        for p, a in zip(packed, alone, strict=True):
            assert len(p) == len(a) == 5
            assert max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(p, a)) <= 1e-5, (arch, p, a)


def test_tp2_padded_generation_and_packed_elbo():
    for rank, result in enumerate(run_distributed(_tp2, 2)):
        batched, alone = result["generate"]["low_confidence"]
        assert batched == alone, f"rank {rank}"
        packed, single_answer, padded_forwards = result["elbo"]
        assert padded_forwards == 1
        for p, a in zip(packed, single_answer, strict=True):
            assert max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(p, a)) <= 1e-5, (rank, p, a)
