"""LLaDA2's two-copy training layout (``data.layout=block``): [x_t ; x_0] under the block-diffusion mask.

Every reference here is written out independently of ``mdu_dist.layout`` and ``mdu_dist.methods``:

- the mask equals the issue's words (x_t bidirectional in its own block and to x_0's earlier blocks, x_0
  block-causal on itself) element by element;
- logits of the two-copy forward are compared with what the block sampler shows the model: for x_t's block b,
  a plain block-causal forward (``model.block_size``, the dense float64 reference, itself checked against
  transformers in tests/test_block_attention.py) of [x_0 blocks < b ; x_t block b] -- no two copies, no
  position ids -- one forward per block;
- the SFT loss is dFactory's recipe (inclusionAI/dFactory tasks/train_llada2_bd.py and
  tasks/dataset/data_transform.py, read, not copied): ratio U[0.3, 0.8] per row, each response token masked
  with that probability, the prompt never, CE summed over masked tokens / their number; its draw is transcribed
  here from the same seed;
- MDU: the KL of the policy's x_t logits to softmax(tau x the frozen reference's logits on the anchor input:
  prompt and padding masked in BOTH copies) at x_t's masked response positions, plus alpha x the retain term.
  At TP=1, TP=2 and PP=2 (through megatron-core's pipeline schedule), loss and every gradient to 1e-5;
- GA, GradDiff, NPO, SimNPO, WGA, DPO: a row's log-likelihood is minus its mean CE over masked tokens (the
  ``losses.baselines`` kernels, tested in tests/test_baselines.py, combine them), loss and gradients to 1e-5;
- with LoRA, the adapters-off reference equals a frozen copy bitwise;
- the ELBO of the block layout: each sample's X = sum_b (L_b / l_b) sum_{masked i in b} CE_i from the two-copy
  forward equals the blockwise reference, with packed rows of different lengths (padding).
"""

from __future__ import annotations

import pytest
import torch

from multiproc import run_distributed

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=301",
        "model.make_vocab_size_divisible_by=8"]
CONFIGS = {"llada": "configs/llada_tiny.yaml", "llada2": "configs/llada2_tiny.yaml"}
BLOCK, SEQ, TAU, ALPHA = 4, 14, 0.5, 0.7


def _cfg(arch: str, *overrides: str):
    from mdu_dist.config import load_config

    tiny = TINY if arch == "llada" else TINY[-2:]
    return load_config(CONFIGS[arch], [*tiny, f"model.block_size={BLOCK}", "data.layout=block", *overrides])


def two_copy_definition(length: int, block: int) -> torch.Tensor:
    """bool [2L, 2L], True where query i may NOT attend key j, from the issue's words."""
    out = torch.ones(2 * length, 2 * length, dtype=torch.bool)
    for i in range(2 * length):
        qi_clean, qb = i >= length, (i % length) // block
        for j in range(2 * length):
            kj_clean, kb = j >= length, (j % length) // block
            if not qi_clean:  # x_t: its own noisy block, and the clean copy of earlier blocks
                allowed = (not kj_clean and kb == qb) or (kj_clean and kb < qb)
            else:  # x_0: block-causal on the clean copy only
                allowed = kj_clean and kb <= qb
            out[i, j] = not allowed
    return out


@pytest.mark.parametrize("length,block", [(8, 4), (10, 3), (5, 1), (7, 32)])
def test_two_copy_mask_matches_definition(length, block):
    from mdu_dist.layout import Layout, two_copy_mask

    want = two_copy_definition(length, block)
    assert torch.equal(two_copy_mask(length, block)[0, 0], want)
    layout = Layout("block", block)
    assert torch.equal(layout.mask(length)[0, 0], want)
    assert layout.position_ids(2, length).tolist() == [list(range(length)) * 2] * 2


def test_block_layout_needs_block_size_and_an_unshifted_model():
    from mdu_dist.config import load_config
    from mdu_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.layout=block needs model.block_size > 0 \(got 0\)"):
        load_config("configs/llada_tiny.yaml", ["data.layout=block"])
    with pytest.raises(ConfigError, match=r"data.layout='blocks' must be one of full, block"):
        load_config("configs/llada_tiny.yaml", ["data.layout=blocks"])
    with pytest.raises(ConfigError, match=r"data.layout=block: model.arch=dream shifts its logits"):
        load_config("configs/dream_tiny.yaml", ["data.layout=block", "model.block_size=4"])
    for name in ("tiny", "mini", "flash"):  # LLaDA2's configs default to its own layout and 32-token blocks
        cfg = load_config(f"configs/llada2_{name}.yaml")
        assert (cfg.data.layout, cfg.model.block_size) == ("block", 32)
    assert load_config("configs/llada_tiny.yaml").data.layout == "full"


def _batch(vocab: int, pad: int, seed: int = 5):
    """Forget and retain pairs with prompts of different lengths (some ending mid-block) and right padding."""
    from mdu_dist.data import Pairs

    g = torch.Generator().manual_seed(seed)

    def pairs(prompt_lens, lengths):
        ids = torch.randint(8, vocab, (len(lengths), SEQ), generator=g)
        response = torch.zeros_like(ids, dtype=torch.bool)
        for row, (p, n) in enumerate(zip(prompt_lens, lengths)):
            ids[row, n:] = pad
            response[row, p:n] = True
        return Pairs(ids, response)

    return {"forget": pairs([3, 5, 2], [14, 11, 9]), "retain": pairs([6, 2, 4], [12, 14, 13]),
            "train": pairs([5, 3, 7], [13, 14, 10])}


def test_mdu_anchor_masks_the_prompt_in_both_copies():
    """The anchor rows of an MDU micro-batch: prompt and padding masked in x_t and in x_0, the response as the
    conditional pass has it (x_t noisy, x_0 clean); logits read at x_t's masked response positions only."""
    from mdu_dist.layout import Layout
    from mdu_dist.methods import MethodConfig, build_objective, prepare

    mask_id, pad = 3, 2
    batch = _batch(301, pad)
    objective = build_objective(MethodConfig(name="mdu", tau=TAU, alpha=ALPHA), mask_id, Layout("block", BLOCK))
    mb = prepare(objective, batch, torch.Generator().manual_seed(11))
    names = [p.name for p in mb.passes]
    assert names == ["forget", "retain", "anchor"] and mb.n_policy == 6
    f = batch["forget"]
    response, clean = f.response_mask, f.input_ids
    forget, anchor = mb.ids[:3], mb.ids[6:]
    assert mb.ids.shape == (9, 2 * SEQ)
    # the conditional pass: [x_t ; x_0], x_0 the clean rows, x_t masked inside the response only
    assert torch.equal(forget[:, SEQ:], clean)
    masked = forget[:, :SEQ] != clean
    assert masked.any() and not (masked & ~response).any() and (forget[:, :SEQ][masked] == mask_id).all()
    # the anchor: both copies' prompt and padding are the mask token, both copies' response untouched
    for copy, want_response in ((anchor[:, :SEQ], forget[:, :SEQ]), (anchor[:, SEQ:], clean)):
        assert (copy[~response] == mask_id).all()
        assert torch.equal(copy[response], want_response[response])
    assert torch.equal(mb.positions[6:, :SEQ], masked) and not mb.positions[:, SEQ:].any()
    assert torch.equal(mb.positions[:3], mb.positions[6:])
    assert torch.equal(mb.mask[0, 0], two_copy_definition(SEQ, BLOCK))
    assert mb.position_ids.tolist() == [list(range(SEQ)) * 2] * 9


def official_draw(pairs, g: torch.Generator, mask_id: int):
    """dFactory's noise transition, transcribed: sigma = 0.3 + 0.5 u per row, each maskable token masked iff
    its own uniform < sigma; maskable = the response (the prompt never, nor padding here). Drawn in the order
    ``methods.noise`` consumes the generator (the rows' ratios first, then one uniform per token).
    (masked bool [B, L], x_t)."""
    sigma = 0.3 + (0.8 - 0.3) * torch.rand(len(pairs.input_ids), generator=g)
    masked = (torch.rand(pairs.input_ids.shape, generator=g) < sigma[:, None]) & pairs.response_mask
    return masked, pairs.input_ids.masked_fill(masked, mask_id)


def blockwise_logits(cfg, weights, noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """[B, L, V] float64: x_t's block b from a block-causal forward of [clean blocks < b ; noisy block b]."""
    from mdu_dist.models.dense import dense_forward

    b, length = noisy.shape
    out = []
    for start in range(0, length, BLOCK):
        end = min(start + BLOCK, length)
        ids = torch.cat([clean[:, :start], noisy[:, start:end]], dim=1)
        out.append(dense_forward(cfg, weights, ids)[:, start:end])
    return torch.cat(out, dim=1)


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]


def _reference(m, policy_w, ref_w, batch, job: str, seed: int = 11):
    """(loss, gradients) in float64: LLaDA2's SFT recipe (``train``), or MDU + alpha x that recipe's retain term."""
    leaves = {k: v.double().requires_grad_(True) for k, v in policy_w.items()}
    ref = {k: v.double() for k, v in ref_w.items()}
    g = torch.Generator().manual_seed(seed)  # one generator feeds the parts in order, as the objective draws them
    draws = {name: (batch[name], *official_draw(batch[name], g, m.mask_token_id))
             for name in (["train"] if job == "sft" else ["forget", "retain"])}

    def sft(name):
        p, masked, noisy = draws[name]
        ce = _ce(blockwise_logits(m, leaves, noisy, p.input_ids), p.input_ids)
        return ce[masked].sum() / masked.sum()

    if job == "sft":
        loss = sft("train")
    else:
        p, masked, noisy = draws["forget"]
        log_p = torch.log_softmax(blockwise_logits(m, leaves, noisy, p.input_ids)[masked], -1)
        prompt_masked = [torch.where(p.response_mask, x, m.mask_token_id) for x in (noisy, p.input_ids)]
        anchor = blockwise_logits(m, ref, *prompt_masked)[masked]
        log_q = torch.log_softmax(TAU * anchor, -1)
        loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean() + ALPHA * sft("retain")
    loss.backward()
    return loss.item(), {k: v.grad for k, v in leaves.items()}, {n: d[1] for n, d in draws.items()}


def _run(tp: int, pp: int, runs: tuple[tuple[str, str], ...]) -> dict:
    from megatron.core import parallel_state as ps

    from mdu_dist import distributed
    from mdu_dist.layout import Layout
    from mdu_dist.methods import SFT, MethodConfig, VocabShard, build_objective, microbatch_loss, prepare
    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard
    from mdu_dist.models.paired import PolicyAndReference
    from mdu_dist.pipeline import run_microbatches

    overrides = [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"]
    distributed.init(_cfg("llada", *overrides).parallel)
    results = {}
    try:
        for arch, job in runs:
            m = _cfg(arch, *overrides).model
            layout = Layout("block", m.block_size)
            policy_w, ref_w = init_weights(m, seed=3), init_weights(m, seed=4)
            ranks = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
            method = MethodConfig(name="mdu", tau=TAU, alpha=ALPHA)
            objective = SFT(method, m.mask_token_id, layout) if job == "sft" else build_objective(
                method, m.mask_token_id, layout)
            policy = build_stage(m)
            load_shard(policy.module, shard(m, policy_w, tp, ranks[0], pp, ranks[1]))
            ref = None
            if objective.needs_reference:
                ref = build_stage(m)
                load_shard(ref.module, shard(m, ref_w, tp, ranks[0], pp, ranks[1]))
            batch = _batch(m.vocab_size, m.pad_token_id)
            mb = prepare(objective, batch, torch.Generator().manual_seed(11))
            vocab = VocabShard(ps.get_tensor_model_parallel_group(), policy.vocab_start, m.vocab_size)

            def loss_fn(x, logits):
                loss, _ = microbatch_loss(objective, x, logits, vocab)
                return loss, {"loss": loss.detach()}

            losses = run_microbatches(PolicyAndReference(policy, ref), [mb], lambda stage, x: x.forward(stage),
                                      loss_fn, seq_length=mb.ids.shape[1], micro_batch_size=mb.ids.shape[0])
            want_loss, want_grads, want_masks = _reference(m, policy_w, ref_w, batch, job)
            worst = {}
            for name, want in want_masks.items():  # the same masks as the recipe's draw, the prompt never masked
                assert torch.equal(mb.drawn[name].masked, want), f"{name}: the draw is not the recipe's"
                assert 0.3 <= float(mb.drawn[name].t.min()) and float(mb.drawn[name].t.max()) <= 0.8
            if ps.is_pipeline_last_stage():
                worst["loss"] = abs(losses[0]["loss"].item() - want_loss) / abs(want_loss)
            # An expert no token chose (and the expert bias, a buffer) has no gradient on either side.
            expected = shard(m, {k: torch.zeros_like(policy_w[k], dtype=torch.float64) if g is None else g
                                 for k, g in want_grads.items()}, tp, ranks[0], pp, ranks[1])
            for name, param in policy.module.named_parameters():
                got, want = param.grad, expected[name]
                got = torch.zeros_like(want) if got is None else got.double()
                scale = want.abs().max().item()
                worst[name] = (got - want).abs().max().item() / scale if scale else got.abs().max().item()
            assert ref is None or all(p.grad is None for p in ref.parameters()), "the reference got a gradient"
            results[f"{arch}/{job}"] = worst
    finally:
        distributed.shutdown()
    return results


@pytest.mark.parametrize("tp,pp,runs", [
    (1, 1, (("llada", "sft"), ("llada", "mdu"))),
    (2, 1, (("llada", "mdu"),)),
    (1, 2, (("llada", "mdu"),)),
    (1, 2, (("llada2", "sft"), ("llada2", "mdu"))),
], ids=["tp1", "tp2", "pp2", "llada2-pp2"])
def test_block_layout_matches_the_recipe_in_float64(tp, pp, runs):
    results = run_distributed(_run, tp * pp, tp, pp, runs)
    for rank, per_run in enumerate(results):
        assert len(per_run) == len(runs)
        for run, worst in per_run.items():
            bad = {k: v for k, v in worst.items() if not v <= 1e-5}
            assert not bad, f"rank {rank} {run} TP={tp} PP={pp}: relative errors above 1e-5: {bad}"
    for run in results[0]:
        assert sum("loss" in r[run] for r in results) == tp  # every last-stage rank compared the loss


def test_block_masks_are_drawn_per_block():
    from mdu_dist.eval.likelihood import answer_blocks, sample_block_masks, sample_masks

    prompt, length = 5, 11  # answer blocks (block 4): positions 5..7 | 8..11 | 12..15
    blocks = answer_blocks(prompt, length, BLOCK)
    assert blocks.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    masks = sample_block_masks(prompt, length, BLOCK, 400, torch.Generator().manual_seed(0))
    for b, size in enumerate((3, 4, 4)):
        counts = masks[:, blocks == b].sum(1)
        assert set(counts.tolist()) == set(range(1, size + 1))  # l_b ~ U{1..L_b}: every count, never 0
    # one block covering the answer draws exactly LLaDA's masks
    one = sample_block_masks(prompt, length, 64, 7, torch.Generator().manual_seed(1))
    assert torch.equal(one, sample_masks(length, 7, torch.Generator().manual_seed(1)))


def _elbo_run() -> dict:
    from mdu_dist import distributed
    from mdu_dist.eval.likelihood import sample_block_masks, score_packed
    from mdu_dist.layout import Layout
    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard

    cfg = _cfg("llada")
    distributed.init(cfg.parallel)
    try:
        m = cfg.model
        weights = init_weights(m, seed=3)
        stage = build_stage(m).eval()
        load_shard(stage.module, shard(m, weights, 1, 0, 1, 0))
        g = torch.Generator().manual_seed(7)
        answers = []
        for n_prompt, n_answer in ((3, 9), (6, 4), (2, 11)):
            prompt, answer = torch.randint(8, m.vocab_size, (n_prompt,), generator=g), torch.randint(
                8, m.vocab_size, (n_answer,), generator=g)
            answers.append((prompt, answer, sample_block_masks(n_prompt, n_answer, BLOCK, 3, g)))

        def logits_fn(ids, positions, pad=None, position_ids=None, mask=None):
            with torch.no_grad():
                return stage(ids, positions, pad, mask, position_ids).double()

        got = score_packed(logits_fn, answers, mask_token_id=m.mask_token_id, vocab_size=m.vocab_size,
                           batch_size=4, pad_token_id=m.pad_token_id, layout=Layout("block", BLOCK))
        worst = 0.0
        w64 = {k: v.double() for k, v in weights.items()}
        for (prompt, answer, masks), x in zip(answers, got):
            clean = torch.cat([prompt, answer])
            for mask, value in zip(masks, x):
                full_mask = torch.cat([torch.zeros(prompt.numel(), dtype=torch.bool), mask])
                noisy = clean.masked_fill(full_mask, m.mask_token_id)
                ce = _ce(blockwise_logits(m, w64, noisy[None], clean[None])[0], clean)
                block = torch.arange(clean.numel()) // BLOCK
                in_answer = torch.arange(clean.numel()) >= prompt.numel()
                want = sum(ce[full_mask & (block == b)].sum() * (in_answer & (block == b)).sum()
                           / (full_mask & (block == b)).sum() for b in block[full_mask].unique())
                worst = max(worst, abs(value.item() - want.item()) / abs(want.item()))
        return {"worst": worst, "n": sum(len(x) for x in got)}
    finally:
        distributed.shutdown()


def test_block_elbo_matches_the_blockwise_reference():
    (result,) = run_distributed(_elbo_run, 1)
    assert result["n"] == 9
    assert result["worst"] <= 1e-5, result


def _methods_run() -> dict:
    """Every method's loss and gradients in the block layout (one process) against a float64 reference: a row's
    log-likelihood = minus the mean CE over its masked tokens of the blockwise logits (the frozen reference's
    rows from the reference's weights), fed to the ``losses.baselines`` kernels (tests/test_baselines.py), plus
    alpha x dFactory's SFT loss on the retain rows."""
    from mdu_dist import distributed
    from mdu_dist.layout import Layout
    from mdu_dist.losses import baselines
    from mdu_dist.methods import METHODS, MethodConfig, VocabShard, build_objective, microbatch_loss, prepare
    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard
    from mdu_dist.models.paired import PolicyAndReference
    from mdu_dist.pipeline import run_microbatches

    cfg = _cfg("llada")
    distributed.init(cfg.parallel)
    results = {}
    try:
        m = cfg.model
        policy_w, ref_w = init_weights(m, seed=3), init_weights(m, seed=4)
        batch = _batch(m.vocab_size, m.pad_token_id)
        batch["idk"] = batch["train"]
        for name in (n for n in METHODS if n != "mdu"):  # MDU: test_block_layout_matches_the_recipe_in_float64
            method = MethodConfig(name=name, alpha=ALPHA, beta=0.3, gamma=0.2)
            objective = build_objective(method, m.mask_token_id, Layout("block", BLOCK))
            policy = build_stage(m)
            load_shard(policy.module, shard(m, policy_w, 1, 0, 1, 0))
            ref = None
            if objective.needs_reference:
                ref = build_stage(m)
                load_shard(ref.module, shard(m, ref_w, 1, 0, 1, 0))
            mb = prepare(objective, batch, torch.Generator().manual_seed(11))
            vocab = VocabShard(None, policy.vocab_start, m.vocab_size)

            def loss_fn(x, logits):
                loss, _ = microbatch_loss(objective, x, logits, vocab)
                return loss, {"loss": loss.detach()}

            losses = run_microbatches(PolicyAndReference(policy, ref), [mb], lambda stage, x: x.forward(stage),
                                      loss_fn, seq_length=mb.ids.shape[1], micro_batch_size=mb.ids.shape[0])

            leaves = {k: v.double().requires_grad_(True) for k, v in policy_w.items()}
            frozen = {k: v.double() for k, v in ref_w.items()}
            g = torch.Generator().manual_seed(11)
            parts = ["forget"] + (["retain"] if name != "ga" else []) + (["idk"] if name == "dpo" else [])
            draws = {part: official_draw(batch[part], g, m.mask_token_id) for part in parts}

            def ce(part, weights):
                masked, noisy = draws[part]
                return _ce(blockwise_logits(m, weights, noisy, batch[part].input_ids), batch[part].input_ids), masked

            def loglik(part, weights):  # a row with nothing masked (the recipe can draw none) scores 0
                nll, masked = ce(part, weights)
                return -(nll * masked).sum(1) / masked.sum(1).clamp(min=1)

            ll = {"forget": loglik("forget", leaves)}
            if name == "ga" or name == "graddiff":
                forget = baselines.ga(ll["forget"])
            elif name == "npo":
                forget = baselines.npo(ll["forget"], loglik("forget", frozen), beta=0.3)
            elif name == "simnpo":
                forget = baselines.simnpo(ll["forget"], beta=0.3, gamma=0.2)
            elif name == "dpo":
                forget = baselines.dpo(loglik("idk", leaves), ll["forget"], loglik("idk", frozen),
                                       loglik("forget", frozen), beta=0.3)
            else:  # wga: each masked token's CE weighted by its detached probability ** beta, per-row means
                nll, masked = ce("forget", leaves)
                forget = -((torch.exp(-0.3 * nll.detach()) * nll * masked).sum(1) / masked.sum(1).clamp(min=1)).mean()
            want = forget
            if name != "ga":
                nll, masked = ce("retain", leaves)
                want = want + ALPHA * nll[masked].sum() / masked.sum()
            want.backward()
            worst = {"loss": abs(losses[0]["loss"].item() - want.item()) / abs(want.item())}
            expected = shard(m, {k: v.grad for k, v in leaves.items()}, 1, 0, 1, 0)
            for pname, param in policy.module.named_parameters():
                w = expected[pname]
                worst[pname] = (param.grad.double() - w).abs().max().item() / w.abs().max().item()
            results[name] = worst
    finally:
        distributed.shutdown()
    return results


def test_every_baseline_in_the_block_layout_matches_float64():
    from mdu_dist.methods import METHODS

    (results,) = run_distributed(_methods_run, 1)
    assert set(results) == set(METHODS) - {"mdu"}
    for method, worst in results.items():
        bad = {k: v for k, v in worst.items() if not v <= 1e-5}
        assert not bad, f"{method}: relative errors above 1e-5: {bad}"


def _lora_run() -> dict:
    """MDU in the block layout with LoRA: the reference as the policy with its adapters off gives, bitwise, the
    logits, loss and adapter gradients of a frozen copy of the base (the anchor's mask and position ids reach
    both paths of ``PolicyAndReference``)."""
    import test_lora as t

    from mdu_dist import distributed
    from mdu_dist.layout import Layout
    from mdu_dist.methods import MethodConfig, VocabShard, build_objective, microbatch_loss, prepare
    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.lora import load_adapters
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard
    from mdu_dist.models.paired import PolicyAndReference
    from mdu_dist.pipeline import run_microbatches

    cfg = _cfg("llada", *t.LORA)
    distributed.init(cfg.parallel)
    try:
        m = cfg.model
        base = init_weights(m, seed=3)
        policy = build_stage(m, lora=cfg.lora)
        load_shard(policy.module, shard(m, base, 1, 0, 1, 0))
        load_adapters(policy, t._random_adapters(m, cfg.lora), 1, 0, 1, 0)
        copy = build_stage(m)
        load_shard(copy.module, shard(m, base, 1, 0, 1, 0))
        objective = build_objective(MethodConfig(name="mdu", tau=TAU, alpha=ALPHA), m.mask_token_id,
                                    Layout("block", BLOCK))
        mb = prepare(objective, _batch(m.vocab_size, m.pad_token_id), torch.Generator().manual_seed(11))
        vocab = VocabShard(None, policy.vocab_start, m.vocab_size)
        seen = {}
        for name, model in (("adapters-off", PolicyAndReference(policy, None, adapters_off=True)),
                            ("copy", PolicyAndReference(policy, copy))):
            def loss_fn(x, logits, name=name):
                seen[name] = logits.detach().clone()
                loss, _ = microbatch_loss(objective, x, logits, vocab)
                return loss, {"loss": loss.detach()}

            policy.zero_grad(set_to_none=True)
            losses = run_microbatches(model, [mb], lambda stage, x: x.forward(stage), loss_fn,
                                      seq_length=mb.ids.shape[1], micro_batch_size=mb.ids.shape[0])
            seen[name + "/loss"] = losses[0]["loss"].item()
            seen[name + "/grads"] = [p.grad.clone() for p in policy.lora.parameters()]
        anchor_rows = int(mb.positions[mb.n_policy:].sum())
        return {"logits": torch.equal(seen["copy"], seen["adapters-off"]),
                "loss": seen["copy/loss"] == seen["adapters-off/loss"],
                "grads": all(torch.equal(a, b) for a, b in zip(seen["copy/grads"], seen["adapters-off/grads"])),
                "anchor differs from policy": not torch.equal(seen["copy"][-anchor_rows:],
                                                              seen["copy"][:anchor_rows])}
    finally:
        distributed.shutdown()


def test_lora_adapters_off_reference_equals_a_copy_in_the_block_layout():
    (result,) = run_distributed(_lora_run, 1)
    assert all(result.values()), result
