"""MDU on the megatron-core backbones (TP=2, and PP=2 through the pipeline schedule) equals the same loss and
gradients computed densely, in float64, in one process from the same weights, masks and seed.

The policy and the frozen reference get different weights, so a test that passed would catch an anchor
computed with the policy's weights. At tau = 0 no reference is built at all (a reference row would be refused)
and the forget term must be log|V_kept| - H(p), written out here in float64 with special tokens excluded.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from multiproc import run_distributed

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=301",
        "model.make_vocab_size_divisible_by=8"]
CONFIGS = {"llada": "configs/llada_tiny.yaml", "dream": "configs/dream_tiny.yaml"}
TAU, ALPHA = 0.5, 0.7
SPECIAL = [0, 1, 2]  # excluded from both distributions in the tau = 0 runs: |V_kept| = vocab - 3


def _batch(vocab: int, pad: int):
    """Forget and retain pairs with prompts of different lengths and right padding."""
    from mdu_dist.data import Pairs

    g = torch.Generator().manual_seed(5)

    def pairs(prompt_lens, lengths, seq=12):
        ids = torch.randint(8, vocab, (len(lengths), seq), generator=g)
        response = torch.zeros_like(ids, dtype=torch.bool)
        for row, (p, n) in enumerate(zip(prompt_lens, lengths)):
            ids[row, n:] = pad
            response[row, p:n] = True
        return Pairs(ids, response)

    return {"forget": pairs([3, 5, 2], [12, 9, 7]), "retain": pairs([4, 2, 6], [10, 12, 11])}


def _method_cfg(tau: float):
    from mdu_dist.methods import MethodConfig

    if tau == 0:
        return MethodConfig(name="mdu", tau=0.0, alpha=ALPHA, exclude_special_tokens=True, special_token_ids=SPECIAL)
    return MethodConfig(name="mdu", tau=tau, alpha=ALPHA)


def _dense_mdu(cfg, policy_w, ref_w, batch, tau: float):
    """MDU written out in float64 over the full vocabulary, independently of the vocab-parallel kernels."""
    from mdu_dist.diffusion import anchor_view, mask_response, sample_t
    from mdu_dist.models.dense import dense_forward

    g = torch.Generator().manual_seed(11)
    drawn = {}
    for name in ("forget", "retain"):  # the same draw order as Objective.draw
        p = batch[name]
        t = sample_t(len(p.input_ids), eps=1e-3, generator=g)
        noisy, masked = mask_response(p.input_ids, p.response_mask, t, cfg.mask_token_id, g)
        drawn[name] = (p, t, noisy, masked)
    leaves = {k: v.double().requires_grad_(True) for k, v in policy_w.items()}
    ref = {k: v.double() for k, v in ref_w.items()}

    p, t, noisy, masked = drawn["forget"]
    if tau == 0:  # KL(p || uniform over the kept ids) = log|V_kept| - H(p), p renormalised over the kept ids
        kept = torch.ones(cfg.vocab_size, dtype=torch.bool)
        kept[SPECIAL] = False
        log_p = torch.log_softmax(dense_forward(cfg, leaves, noisy)[masked][:, kept], -1)
        kl = (math.log(int(kept.sum())) + (log_p.exp() * log_p).sum(-1)).mean()
    else:
        log_p = torch.log_softmax(dense_forward(cfg, leaves, noisy)[masked], -1)
        anchor = dense_forward(cfg, ref, anchor_view(noisy, p.response_mask, cfg.mask_token_id))[masked]
        log_q = torch.log_softmax(tau * anchor, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    p, t, noisy, masked = drawn["retain"]
    nll = -torch.log_softmax(dense_forward(cfg, leaves, noisy), -1).gather(-1, p.input_ids[..., None])[..., 0]
    per_seq = (nll * masked / t[:, None]).sum(1) / p.response_mask.sum(1)
    loss = kl + ALPHA * per_seq.mean()
    loss.backward()
    return loss.item(), {k: v.grad for k, v in leaves.items()}


def _run(tp: int, pp: int, taus: tuple[float, ...]) -> dict:
    from megatron.core import parallel_state as ps

    from mdu_dist import distributed
    from mdu_dist.config import load_config
    from mdu_dist.methods import VocabShard, build_objective, prepare
    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard
    from mdu_dist.models.paired import PolicyAndReference
    from mdu_dist.pipeline import run_microbatches

    overrides = TINY + [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"]
    distributed.init(load_config(CONFIGS["dream"], overrides).parallel)
    results = {}
    try:
        for (arch, path), tau in itertools.product(CONFIGS.items(), taus):
            m = load_config(path, overrides).model
            policy_w, ref_w = init_weights(m, seed=3), init_weights(m, seed=4)
            ranks = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
            objective = build_objective(_method_cfg(tau), m.mask_token_id)
            policy = build_stage(m)
            load_shard(policy.module, shard(m, policy_w, tp, ranks[0], pp, ranks[1]))
            ref = None
            if objective.needs_reference:
                ref = build_stage(m)
                load_shard(ref.module, shard(m, ref_w, tp, ranks[0], pp, ranks[1]))
            assert (ref is None) == (tau == 0), "tau = 0 needs no reference; any other tau does"
            model = PolicyAndReference(policy, ref)
            batch = _batch(m.vocab_size, m.pad_token_id)
            mb = prepare(objective, batch, torch.Generator().manual_seed(11))
            vocab = VocabShard(ps.get_tensor_model_parallel_group(), policy.vocab_start, m.vocab_size)
            losses = run_microbatches(
                model, [mb], lambda stage, x: stage(x.ids, x.n_policy, x.positions),
                lambda x, logits: _loss(objective, x, logits, vocab),
                seq_length=mb.ids.shape[1], micro_batch_size=mb.ids.shape[0])
            want_loss, want_grads = _dense_mdu(m, policy_w, ref_w, batch, tau)
            worst = {}
            if ps.is_pipeline_last_stage():
                got = losses[0]["loss"].item()
                worst["loss"] = abs(got - want_loss) / abs(want_loss)
            expected = shard(m, want_grads, tp, ranks[0], pp, ranks[1])
            for name, param in policy.module.named_parameters():
                want = expected[name]
                worst[name] = (param.grad.double() - want).abs().max().item() / want.abs().max().item()
            assert ref is None or all(p.grad is None for p in ref.parameters()), "the reference got a gradient"
            results[f"{arch}/tau={tau:g}"] = worst
    finally:
        distributed.shutdown()
    return results


def _loss(objective, mb, logits, vocab):
    from mdu_dist.methods import microbatch_loss

    loss, _ = microbatch_loss(objective, mb, logits, vocab)
    return loss, {"loss": loss.detach()}


@pytest.mark.parametrize("tp,pp,taus", [(1, 1, (0.0,)), (2, 1, (TAU, 0.0)), (1, 2, (TAU,))],
                         ids=["tp1-tau0", "tp2", "pp2"])
def test_mdu_matches_dense_float64(tp, pp, taus):
    results = run_distributed(_run, tp * pp, tp, pp, taus)
    for rank, per_run in enumerate(results):
        assert len(per_run) == len(CONFIGS) * len(taus)
        for run, worst in per_run.items():
            bad = {k: v for k, v in worst.items() if not v <= 1e-5}
            assert not bad, f"rank {rank} {run} TP={tp} PP={pp}: relative errors above 1e-5: {bad}"
    for run in results[0]:
        assert sum("loss" in r[run] for r in results) == tp  # every last-stage rank compared the loss
