"""Block-causal attention (``model.block_size``, LLaDA2's block diffusion) and general [b or 1, 1, s, s] masks.

Masks here are written out independently of ``models.masks``: position i may attend j iff
j // block_size <= i // block_size, with positions counted from a row's first real token.

- ``models.masks.attention_mask`` equals that definition element by element, with left and right padding.
- The megatron-core model (SDPA at TP=1, TP=2 and PP=2, megatron's local attention at TP=2; dense LLaDA, and
  LLaDA2 at PP=2) gives the dense float64 reference's logits to 1e-5 relative for: a block-causal batch; a
  left- and right-padded block-causal batch (each row equal to the row alone, whatever the padding holds); a
  random general mask given whole. The micro-batches run through megatron-core's pipeline schedule.
- The dense reference of a tiny LLaDA2 with a block-causal mask equals transformers' Glm4MoeForCausalLM (LLaDA2's
  maths, tests/test_moe_reference.py) given the same 4-D additive mask.
- block_size=0 is today's model: the mask is exactly what it was (None, or the [b, 1, 1, s] padding mask), so the
  logits are bitwise those of the GPTModel called as before; one block as long as the sequence gives the same
  logits.
- The mask matters: changing a later block's tokens leaves every earlier position's logits bitwise unchanged and
  changes every later one (megatron SDPA and local, and the dense reference); at block_size=0 it changes all.
"""

from __future__ import annotations

import pytest
import torch

from multiproc import run_distributed

VOCAB = 301
TINY = ["model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=96", f"model.vocab_size={VOCAB}",
        "model.make_vocab_size_divisible_by=8"]
CONFIGS = {"llada": "configs/llada_tiny.yaml", "llada2": "configs/llada2_tiny.yaml"}
BLOCK, BATCH, SEQ = 3, 2, 10
PADDING = ((4, "left"), (3, "right"))  # (padded tokens, side) of the padded micro-batch's two rows


def _cfg(arch: str, *overrides: str):
    from mdu_dist.config import load_config

    tiny = TINY if arch == "llada" else TINY[-2:]
    return load_config(CONFIGS[arch], [*tiny, f"model.block_size={BLOCK}", *overrides])


def block_causal(length: int, block: int) -> torch.Tensor:
    """bool [length, length], True where query i may NOT attend key j: key j's block is after query i's."""
    return torch.tensor([[j // block > i // block for j in range(length)] for i in range(length)])


def _mask_definition(pad: torch.Tensor, block: int) -> torch.Tensor:
    b, s = pad.shape
    out = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for r in range(b):
        real = [k for k in range(s) if not pad[r, k]]
        position = {k: n for n, k in enumerate(real)}
        for i in range(s):
            # A padded query sits at the position of the nearest real token before it (the first one if none).
            p_i = position.get(i, max([position[k] for k in real if k < i], default=0))
            for j in range(s):
                out[r, 0, i, j] = bool(pad[r, j]) or (block > 0 and position[j] // block > p_i // block)
    return out


def test_attention_mask_matches_its_definition():
    from mdu_dist.models.masks import attention_mask

    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[0, :3] = True  # left
    pad[1, 6:] = True  # right
    for block in (1, 2, 4, 9, 20):
        assert torch.equal(attention_mask(9, block)[0, 0], block_causal(9, block))
        assert torch.equal(attention_mask(9, block, pad), _mask_definition(pad, block)), block
    assert torch.equal(attention_mask(9, 0, pad).expand(3, 1, 9, 9), _mask_definition(pad, 0))
    given = torch.rand(1, 1, 9, 9, generator=torch.Generator().manual_seed(0)) < 0.3
    assert torch.equal(attention_mask(9, 2, pad, given), given | pad[:, None, None, :])
    with pytest.raises(ValueError, match=r"mask must be a bool \[b or 1, 1, 9, 9\]"):
        attention_mask(9, 0, None, given[0])


def test_block_size_is_validated():
    from mdu_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.block_size=-1 must be >= 0"):
        _cfg("llada", "model.block_size=-1")
    with pytest.raises(ConfigError, match=r"model\.block_size=3 needs an attention mask.*model\.attention=te"):
        _cfg("llada", "model.attention=te")
    assert _cfg("llada", "model.block_size=0").model.block_size == 0


# ----------------------------------------------------------------------------------------- megatron vs dense


def _microbatches(vocab: int, pad_id: int) -> list[dict]:
    """Block-causal; padded block-causal (junk in the padding); a general mask given whole (each row's own)."""
    g = torch.Generator().manual_seed(7)

    def ids():
        return torch.randint(4, vocab, (BATCH, SEQ), generator=g)

    pad = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    for r, (n, side) in enumerate(PADDING):
        pad[r, :n] = side == "left"
        pad[r, SEQ - n:] = side == "right"
    general = torch.rand(BATCH, 1, SEQ, SEQ, generator=g) < 0.5
    general &= ~torch.eye(SEQ, dtype=torch.bool)  # every query keeps at least itself
    return [{"ids": ids(), "pad": None, "mask": None}, {"ids": ids(), "pad": pad, "mask": None},
            {"ids": ids(), "pad": None, "mask": general}]


def _dense_want(m, weights, mb) -> list[torch.Tensor]:
    """Per row, the dense reference's logits at its real positions, from the row alone under the test's mask."""
    from mdu_dist.models.dense import dense_forward

    out = []
    for r in range(BATCH):
        if mb["mask"] is not None:
            out.append(dense_forward(m, weights, mb["ids"][r:r + 1], mb["mask"][r:r + 1])[0])
            continue
        real = mb["ids"][r] if mb["pad"] is None else mb["ids"][r][~mb["pad"][r]]
        out.append(dense_forward(m, weights, real[None], block_causal(len(real), BLOCK)[None, None])[0])
    return out


def _megatron_vs_dense(tp: int, pp: int, archs: tuple[str, ...], attentions: tuple[str, ...]) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mdu_dist import distributed
    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard
    from mdu_dist.pipeline import run_microbatches

    layout = [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"]
    distributed.init(_cfg(archs[0], *layout).parallel)
    worst = {}
    try:
        for arch in archs:
            for attention in attentions:
                m = _cfg(arch, *layout, f"model.attention={attention}").model
                weights = {k: v.double() for k, v in init_weights(m, seed=3).items()}
                tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
                stage = build_stage(m).eval()
                load_shard(stage.module, shard(m, weights, tp, tp_rank, pp, pp_rank))
                mbs = _microbatches(m.vocab_size, m.pad_token_id)
                seen = []

                def loss_fn(mb, logits):
                    seen.append(logits.detach())
                    return logits.sum() * 0, {}

                with torch.no_grad():
                    run_microbatches(stage, mbs, lambda model, mb: model(mb["ids"], pad=mb["pad"], mask=mb["mask"]),
                                     loss_fn, seq_length=SEQ, micro_batch_size=BATCH, forward_only=True)
                if not ps.is_pipeline_last_stage():
                    continue
                for name, mb, got in zip(("block", "padded", "general"), mbs, seen, strict=True):
                    parts = [torch.empty_like(got) for _ in range(tp)]
                    dist.all_gather(parts, got.contiguous(), group=ps.get_tensor_model_parallel_group())
                    full = torch.cat(parts, dim=-1).double()[..., :m.vocab_size]
                    want = _dense_want(m, weights, mb)
                    rows = [full[r] if mb["pad"] is None else full[r][~mb["pad"][r]] for r in range(BATCH)]
                    worst[f"{arch}/{attention}/{name}"] = max(
                        (a - w).abs().max().item() / w.abs().max().item() for a, w in zip(rows, want, strict=True))
    finally:
        distributed.shutdown()
    return worst


@pytest.mark.parametrize("tp,pp,archs,attentions", [
    (1, 1, ("llada",), ("sdpa",)),
    (2, 1, ("llada",), ("sdpa", "local")),
    (1, 2, ("llada", "llada2"), ("sdpa",)),
], ids=["tp1", "tp2", "pp2"])
def test_megatron_block_causal_and_general_masks_match_dense(tp, pp, archs, attentions):
    results = run_distributed(_megatron_vs_dense, tp * pp, tp, pp, archs, attentions)
    last = results[-1]
    expected = {f"{a}/{n}/{k}" for a in archs for n in attentions for k in ("block", "padded", "general")}
    assert set(last) == expected
    for rank, worst in enumerate(results):
        bad = {k: v for k, v in worst.items() if not v <= 1e-5}
        assert not bad, f"rank {rank} TP={tp} PP={pp}: relative errors above 1e-5: {bad}"


# ----------------------------------------------------------------------------------------- transformers


def test_llada2_dense_block_causal_equals_transformers_glm4_moe():
    from test_moe_reference import _hf_model

    from mdu_dist.models.dense import dense_forward, init_weights

    m = _cfg("llada2", "model.block_size=4").model
    weights = init_weights(m, seed=1)
    model = _hf_model(m, weights)
    s = 11
    ids = torch.randint(0, m.vocab_size, (BATCH, s), generator=torch.Generator().manual_seed(0))
    masked = block_causal(s, 4)
    additive = torch.zeros(BATCH, 1, s, s).masked_fill(masked, float("-inf"))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=additive).logits
        full = model(input_ids=ids, attention_mask=torch.zeros(BATCH, 1, s, s)).logits
    assert (want - full)[:, :4].abs().max() > 1e-4, "the 4-D mask must change transformers' logits"
    for got in (dense_forward(m, weights, ids), dense_forward(m, {k: v.double() for k, v in weights.items()}, ids)):
        assert (got - want).abs().max().item() / want.abs().max().item() < 1e-5


# ----------------------------------------------------------------------------------------- single process


def _single_process() -> dict:
    from mdu_dist import distributed
    from mdu_dist.models.dense import dense_forward, init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard

    distributed.init(_cfg("llada").parallel)
    out = {}
    try:
        s, block = 12, 4
        ids = torch.randint(4, VOCAB, (BATCH, s), generator=torch.Generator().manual_seed(1))
        pad = torch.zeros(BATCH, s, dtype=torch.bool)
        pad[0, :5] = True
        # A middle block's tokens changed: positions before it unchanged, bitwise; it and after, changed.
        changed = ids.clone()
        changed[:, block:2 * block] = (changed[:, block:2 * block] + 1 - 4) % (VOCAB - 4) + 4
        weights = init_weights(_cfg("llada").model, seed=5)
        for attention in ("sdpa", "local"):
            stages = {}
            for bs in (0, block, s):
                m = _cfg("llada", f"model.attention={attention}", f"model.block_size={bs}").model
                stages[bs] = build_stage(m).eval()
                load_shard(stages[bs].module, shard(m, weights, 1, 0, 1, 0))
            with torch.no_grad():
                # Today's call of the GPTModel: no mask and no position ids, or the [b, 1, 1, s] padding mask.
                before = stages[0].module(ids, None, attention_mask=None)
                positions = ((~pad).cumsum(1) - 1).clamp(min=0)
                before_pad = stages[0].module(ids, positions, attention_mask=pad[:, None, None, :])
                out[f"{attention}/zero is today"] = torch.equal(stages[0](ids)[..., :VOCAB], before[..., :VOCAB])
                out[f"{attention}/zero is today, padded"] = torch.equal(stages[0](ids, pad=pad)[..., :VOCAB],
                                                                        before_pad[..., :VOCAB])
                out[f"{attention}/one block"] = (stages[s](ids) - stages[0](ids))[..., :VOCAB].abs().max().item()
                for bs in (0, block):
                    a, b = stages[bs](ids)[..., :VOCAB], stages[bs](changed)[..., :VOCAB]
                    out[f"{attention}/{bs}/earlier equal"] = torch.equal(a[:, :block], b[:, :block])
                    out[f"{attention}/{bs}/changed per position"] = (a - b).abs().amax(dim=(0, 2)).tolist()
        dense = {k: v.double() for k, v in weights.items()}
        m = _cfg("llada", f"model.block_size={block}").model
        a, b = dense_forward(m, dense, ids), dense_forward(m, dense, changed)
        out["dense/earlier equal"] = torch.equal(a[:, :block], b[:, :block])
        out["dense/changed per position"] = (a - b).abs().amax(dim=(0, 2)).tolist()
    finally:
        distributed.shutdown()
    return out


@pytest.fixture(scope="module")
def single() -> dict:
    return run_distributed(_single_process, 1)[0]


def test_block_size_zero_is_todays_model(single):
    for attention in ("sdpa", "local"):
        assert single[f"{attention}/zero is today"] and single[f"{attention}/zero is today, padded"], attention
        assert single[f"{attention}/one block"] < 1e-5, attention


def test_a_later_block_cannot_change_earlier_logits(single):
    block = 4
    for name in ("sdpa/4", "local/4", "dense"):
        assert single[f"{name}/earlier equal"], f"{name}: positions before the changed block moved"
        changed = single[f"{name}/changed per position"]
        assert min(changed[block:]) > 1e-6, f"{name}: the changed block and later ones must see it: {changed}"
    for attention in ("sdpa", "local"):
        assert not single[f"{attention}/0/earlier equal"]
        assert min(single[f"{attention}/0/changed per position"]) > 1e-6, "full attention sees every token"
