"""LLaDA2's block sampler (``block``: LLaDA2.0's ``generate``; ``block_edit``: LLaDA2.1's, with editing) against a
plain transcription of the official step rules on a tiny float64 model at T = 0, prompts of several lengths in one
left-padded batch equal to each alone, TP=2 (gloo) equal to one process, and the config keys refused in one line.

The transcriptions follow ``LLaDA2MoeModelLM.generate`` of LLaDA2.0 and LLaDA2.1 (the HF modeling code, as mirrored
in the dllm repository: dllm/pipelines/llada2/models/modeling_llada2_moe.py and
dllm/pipelines/llada21/models/modeling_llada21_moe.py): one prompt, the canvas padded with masks to whole blocks,
the block-diffusion mask built as they build it (tril over blocks, repeated block by block), the window cut at the
current block. The one departure, as in every sampler test here: the mask token is never a candidate.
"""

from __future__ import annotations

import math

import pytest
import torch

from multiproc import run_distributed
from mdu_dist.config import ModelConfig, load_config
from mdu_dist.errors import ConfigError
from mdu_dist.eval.block_sampler import block_canvas, block_generate
from mdu_dist.models.dense import dense_forward, init_weights

MASK, EOS, PAD = 10, 5, 1
BLOCK = 4
CFG = ModelConfig(arch="llada", num_layers=1, hidden_size=16, num_attention_heads=2, num_query_groups=2,
                  ffn_hidden_size=32, vocab_size=11, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD,
                  init_std=0.5, block_size=BLOCK)
WEIGHTS = init_weights(CFG, seed=4, dtype=torch.float64)
# Prompt lengths 3, 4, 6, 9: the prompt's tail fills 3, 0, 2 and 1 positions of the first decoded block.
PROMPTS = [[2, 3, 4], [5, 1, 7, 8], [6, 2, 2, 5, 3, 7], [4, 4, 8, 1, 2, 6, 5, 3, 2]]


def official_logits(window: torch.Tensor) -> torch.Tensor:
    """[1, S] -> [S, V] under LLaDA2's block-diffusion mask, built as its generate builds it."""
    blocks = -(-window.shape[1] // BLOCK)
    allowed = torch.tril(torch.ones(blocks, blocks)).repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    allowed = allowed[:window.shape[1], :window.shape[1]].bool()
    logits = dense_forward(CFG, WEIGHTS, window, mask=~allowed[None, None])[0]
    logits[:, MASK] = -math.inf
    return logits


def sample_greedy(logits):
    probs = torch.softmax(logits, dim=-1)
    x0 = probs.argmax(dim=-1)
    return x0, probs.gather(-1, x0[:, None]).squeeze(-1)


def llada20_reference(prompt: list[int], gen_length: int, steps: int, threshold: float, stats: dict) -> list[int]:
    """LLaDA2.0's generate (T = 0, minimal_topk = 1, eos_early_stop off) for one prompt, transcribed."""
    steps = min(steps, gen_length)
    n_prompt = len(prompt)
    num_blocks = (n_prompt + gen_length + BLOCK - 1) // BLOCK
    x = torch.full((num_blocks * BLOCK,), MASK, dtype=torch.long)
    x[:n_prompt] = torch.tensor(prompt)
    schedule = torch.full((steps,), BLOCK // steps, dtype=torch.long)
    schedule[:BLOCK % steps] += 1
    for num_block in range(n_prompt // BLOCK, num_blocks):
        end = (num_block + 1) * BLOCK
        for step in range(steps):
            active = x[end - BLOCK:end] == MASK
            if active.sum() == 0:
                break
            x0, x0_p = sample_greedy(official_logits(x[None, :end])[-BLOCK:])
            k = int(schedule[step])
            confidence = torch.where(active, x0_p, -torch.inf)
            high = confidence > threshold
            transfer = torch.zeros(BLOCK, dtype=torch.bool)
            if high.sum() >= k:
                transfer = high
                stats["threshold"] += int(high.sum() > k)  # more than the schedule's k: the threshold decided
            else:
                _, idx = torch.topk(confidence, k=min(k, int(active.sum())))
                transfer[idx] = True
                stats["top_k"] += 1
            x[end - BLOCK:end][transfer] = x0[transfer]
        if (x[n_prompt:end] == EOS).any():
            stats["eos"] += 1
            break
    generated = x[n_prompt:n_prompt + gen_length].tolist()
    return generated[:generated.index(EOS) + 1] if EOS in generated else generated


def llada21_reference(prompt: list[int], gen_length: int, threshold: float, editing_threshold: float,
                      max_post_steps: int, stats: dict) -> list[int]:
    """LLaDA2.1's generate (T = 0, num_to_transfer = 1, eos_early_stop off) for one prompt, transcribed."""
    n_prompt = len(prompt)
    num_blocks = (n_prompt + gen_length + BLOCK - 1) // BLOCK
    x = torch.full((num_blocks * BLOCK,), MASK, dtype=torch.long)
    x[:n_prompt] = torch.tensor(prompt)
    for num_block in range(n_prompt // BLOCK, num_blocks):
        end, start = (num_block + 1) * BLOCK, num_block * BLOCK
        post_steps = 0
        while True:
            old = x[start:end].clone()
            active = old == MASK
            if not active.any():
                post_steps += 1
            if post_steps > max_post_steps:
                break
            prompt_in_block = torch.zeros(BLOCK, dtype=torch.bool)
            if start < n_prompt:
                prompt_in_block[:min(n_prompt - start, BLOCK)] = True
            x0, x0_p = sample_greedy(official_logits(x[None, :end])[-BLOCK:])
            transfer = torch.zeros(BLOCK, dtype=torch.bool)
            if active.sum() > 0:
                confidence = torch.where(active, x0_p, -torch.inf)
                high = (confidence > threshold) & active
                if high.sum() >= 1:
                    transfer = high
                    stats["threshold"] += int(high.sum() > 1)
                else:
                    _, idx = torch.topk(confidence, k=1)
                    transfer[idx] = True
                    stats["top_k"] += 1
            editable = ~active & ~prompt_in_block
            edit = (torch.where(editable, x0_p, -torch.inf) > editing_threshold) & editable & (x0 != old)
            stats["edits"] += int(edit.sum())
            x[start:end][transfer | edit] = x0[transfer | edit]
            if active.sum() == 0 and not edit.any():
                break
    generated = x[n_prompt:n_prompt + gen_length].tolist()
    return generated[:generated.index(EOS) + 1] if EOS in generated else generated


def rows_alone(ids: torch.Tensor, positions: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """The sampler's logits_fn: each row's real tokens through the dense model alone (block mask from
    ``CFG.block_size``, positions from 0), the padding's logits 0."""
    full = torch.zeros(*ids.shape, CFG.vocab_size, dtype=torch.float64)
    for r in range(ids.shape[0]):
        real = torch.ones(ids.shape[1], dtype=torch.bool) if pad is None else ~pad[r]
        full[r, real] = dense_forward(CFG, WEIGHTS, ids[r, real][None])[0]
    return full[positions]


def cut(tokens: list[int]) -> list[int]:
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def _common(gen_length):
    return dict(gen_length=gen_length, block_size=BLOCK, mask_token_id=MASK, pad_token_id=PAD, eos_token_id=EOS,
                vocab_size=CFG.vocab_size)


def test_canvas_aligns_every_rows_blocks():
    c = block_canvas(PROMPTS, gen_length=6, block_size=BLOCK, mask_token_id=MASK, pad_token_id=PAD)
    assert c.start == 8 and c.blocks.tolist() == [3, 2, 2, 2] and c.x.shape == (4, 20)
    for r, p in enumerate(PROMPTS):
        a = c.start - BLOCK * (len(p) // BLOCK)
        assert c.x[r, a:a + len(p)].tolist() == p and c.first[r] == a + len(p)
        assert (c.x[r, a + len(p):c.start + BLOCK * c.blocks[r]] == MASK).all()
        assert c.pad[r].tolist() == [k < a or k >= c.start + BLOCK * c.blocks[r] for k in range(20)]


@pytest.mark.parametrize("steps,gen_length,threshold", [(4, 8, 0.5), (2, 8, 0.3), (3, 6, 0.6), (8, 12, 0.95)])
def test_block_equals_transcription_of_llada20(steps, gen_length, threshold):
    stats = {"threshold": 0, "top_k": 0, "eos": 0}
    want = [llada20_reference(p, gen_length, steps, threshold, stats) for p in PROMPTS]
    out = block_generate(rows_alone, PROMPTS, steps=steps, threshold=threshold, **_common(gen_length))
    assert out.shape == (len(PROMPTS), gen_length)
    assert [cut(row) for row in out.tolist()] == want
    assert not any(MASK in w for w in want)
    # Row 1 stops after its first block (an EOS in it; the EOS in its prompt does not count), leaving masks.
    assert stats["eos"] > 0 and (out[1] == MASK).any()
    if threshold < 0.95:
        assert stats["threshold"] > 0 and stats["top_k"] > 0, stats  # both transfer rules decided somewhere


@pytest.mark.parametrize("gen_length,threshold,editing_threshold,max_post_steps",
                         [(8, 0.5, 0.3, 6), (6, 0.4, 0.5, 2), (8, 0.95, 0.9, 0), (12, 0.6, 0.2, 3)])
def test_block_edit_equals_transcription_of_llada21(gen_length, threshold, editing_threshold, max_post_steps):
    stats = {"threshold": 0, "top_k": 0, "edits": 0}
    want = [llada21_reference(p, gen_length, threshold, editing_threshold, max_post_steps, stats) for p in PROMPTS]
    out = block_generate(rows_alone, PROMPTS, steps=1, threshold=threshold, editing_threshold=editing_threshold,
                         max_post_steps=max_post_steps, **_common(gen_length))
    assert [cut(row) for row in out.tolist()] == want
    assert not (out == MASK).any()  # LLaDA2.1 decodes every block
    if editing_threshold < 0.9:
        assert min(stats.values()) > 0, stats  # threshold, top-1 and editing all happened


def test_editing_changes_the_output():
    # Otherwise the editing test could pass with editing ignored.
    common = dict(steps=1, threshold=0.5, max_post_steps=4, **_common(8))
    edited = block_generate(rows_alone, PROMPTS, editing_threshold=0.3, **common)
    unedited = block_generate(rows_alone, PROMPTS, editing_threshold=1.0, **common)
    assert not torch.equal(edited, unedited)


SLICE = 6  # 11 tokens padded to 12: two vocab slices of 6


def _sliced(logits: torch.Tensor, start: int) -> torch.Tensor:
    full = torch.nn.functional.pad(logits, (0, 2 * SLICE - CFG.vocab_size), value=-math.inf)
    return full[..., start:start + SLICE]


def _runs(start: int = 0, group=None) -> dict:
    """Generations with rank ``start // SLICE``'s vocab slice of the logits (the whole vocabulary without ``group``)."""
    def logits_fn(ids, positions, pad):
        logits = rows_alone(ids, positions, pad)
        return logits if group is None else _sliced(logits, start)

    out = {}
    for name, extra in (("block", {}), ("block_edit", dict(editing_threshold=0.3))):
        for t in (0.0, 1.5):
            out[f"{name}/{t}"] = block_generate(
                logits_fn, PROMPTS, steps=4, threshold=0.5, temperature=t, generator=torch.Generator().manual_seed(3),
                vocab_start=start, group=group, **extra, **_common(8)).tolist()
    return out


def _tp_rank() -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return _runs(dist.get_rank() * SLICE, dist.group.WORLD)


def test_vocab_parallel_equals_single_process():
    single = _runs()
    assert single["block/0.0"] != single["block/1.5"]  # the noise path differs from greedy
    for per_rank in run_distributed(_tp_rank, 2):
        assert per_rank == single


TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=101",
        "model.make_vocab_size_divisible_by=8", "model.init_std=0.1", f"model.block_size={BLOCK}"]


def _stage_generations(tp: int) -> dict:
    """Batched (left padded) and one-prompt-at-a-time generations through the megatron-core model at TP=``tp``."""
    from megatron.core import parallel_state as ps

    from mdu_dist import distributed
    from mdu_dist.models.dense import init_weights as init
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard

    cfg = load_config("configs/llada_tiny.yaml", TINY + [f"parallel.tensor={tp}"])
    distributed.init(cfg.parallel)
    try:
        m = cfg.model
        stage = build_stage(m).eval()
        load_shard(stage.module, shard(m, init(m, seed=5), tp, ps.get_tensor_model_parallel_rank(), 1, 0))
        group = ps.get_tensor_model_parallel_group() if tp > 1 else None
        prompts = [[40 + t for t in p] for p in PROMPTS]
        out = {}
        # This model's confidences lie around 0.03 - 0.08: both transfer rules and editing happen.
        for name, extra in (("block", {}), ("block_edit", dict(editing_threshold=0.04))):
            common = dict(gen_length=10, block_size=BLOCK, steps=4, threshold=0.05, mask_token_id=m.mask_token_id,
                          pad_token_id=m.pad_token_id, eos_token_id=m.eos_token_id, vocab_size=m.vocab_size,
                          vocab_start=stage.vocab_start, group=group, **extra)
            batched = block_generate(stage, prompts, **common).tolist()
            alone = [block_generate(stage, [p], **common)[0].tolist() for p in prompts]
            out[name] = (batched, alone)
        return out
    finally:
        distributed.shutdown()


def test_padded_batch_equals_each_prompt_alone_through_the_parallel_model():
    for rank, result in enumerate(run_distributed(_stage_generations, 2, 2)):
        for name, (batched, alone) in result.items():
            assert batched == alone, (rank, name)
            assert len({tuple(a) for a in alone}) > 1, f"{name}: the prompts must not all generate the same text"


@pytest.mark.parametrize("override,message", [
    ("eval.sampler=blocks", "eval.sampler='blocks': must be one of"),
    ("eval.threshold=1.5", "eval.threshold=1.5 must be in [0, 1]"),
    ("eval.editing_threshold=-0.1", "eval.editing_threshold=-0.1 must be in [0, 1]"),
    ("eval.max_post_steps=-1", "eval.max_post_steps=-1 must be >= 0"),
    ("eval.block_steps=0", "eval.block_steps=0 must be >= 1"),
])
def test_bad_keys_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/llada_tiny.yaml", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_block_sampler_needs_a_block_size():
    cfg = load_config("configs/llada2_tiny.yaml", ["eval.sampler=block_edit"])  # loads: training ignores it
    with pytest.raises(ConfigError) as e:
        cfg.eval.check_block_size(cfg.model.arch, 0)
    assert "eval.sampler=block_edit decodes blocks of model.block_size, which is 0" in str(e.value)
    assert "\n" not in str(e.value)
    cfg.eval.check_block_size(cfg.model.arch, 32)
