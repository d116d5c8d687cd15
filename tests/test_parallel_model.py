"""LLaDA and Dream on megatron-core under TP, PP and TP x PP (gloo processes) equal the dense reference.

Every rank builds its stage from the same canonical weights, runs two micro-batches through megatron-core's
pipeline schedule with loss = mean_mb sum(logits * R_mb), and checks its logits (last stage, gathered over TP)
and the gradient of every parameter it holds against the dense single-process model in the same process.
"""

from __future__ import annotations

import pytest
import torch

from multiproc import run_distributed

TINY = ["model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=301",
        "model.make_vocab_size_divisible_by=8"]
ARCH_CONFIGS = {"llada": "configs/llada_tiny.yaml", "dream": "configs/dream_tiny.yaml"}
BATCH, SEQ, MICROBATCHES = 2, 7, 2


def _tiny(arch: str, tp: int, pp: int):
    from mdu_dist.config import load_config

    return load_config(ARCH_CONFIGS[arch], TINY + [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"])


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(7)
    ids = [torch.randint(0, vocab, (BATCH, SEQ), generator=g) for _ in range(MICROBATCHES)]
    probes = [torch.randn(BATCH, SEQ, vocab, generator=g, dtype=torch.float64) for _ in range(MICROBATCHES)]
    return ids, probes


def _dense(cfg, weights, ids, probes):
    from mdu_dist.models.dense import dense_forward

    leaves = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    logits = [dense_forward(cfg, leaves, x) for x in ids]
    loss = sum((lg * r.to(lg.dtype)).sum() for lg, r in zip(logits, probes)) / len(ids)
    loss.backward()
    return [lg.detach() for lg in logits], {k: v.grad for k, v in leaves.items()}


def _check_layout(arch: str, tp: int, pp: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard
    from mdu_dist.pipeline import run_microbatches

    m = _tiny(arch, tp, pp).model
    weights = init_weights(m, seed=3)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    stage = build_stage(m)
    load_shard(stage.module, shard(m, weights, tp, tp_rank, pp, pp_rank))
    ids, probes = _inputs(m.vocab_size)
    mbs = list(zip(ids, probes))
    lo, hi = stage.vocab_start, min(stage.vocab_start + stage.vocab_local, m.vocab_size)
    seen_logits = []

    def forward(model, mb):
        return model(mb[0])

    def loss_fn(mb, logits):
        seen_logits.append(logits.detach())
        local = logits[..., : hi - lo]
        return (local * mb[1][..., lo:hi].to(local.dtype)).sum(), {}

    run_microbatches(stage, mbs, forward, loss_fn, seq_length=SEQ, micro_batch_size=BATCH)
    dense_logits, dense_grads = _dense(m, weights, ids, probes)

    worst = {}
    if ps.is_pipeline_last_stage():
        group = ps.get_tensor_model_parallel_group()
        for got, want in zip(seen_logits, dense_logits):
            parts = [torch.empty_like(got) for _ in range(tp)]
            dist.all_gather(parts, got.contiguous(), group=group)
            full = torch.cat(parts, dim=-1)
            assert torch.isinf(full[..., m.vocab_size:]).all(), "padded vocab columns must be -inf"
            err = (full[..., : m.vocab_size] - want).abs().max().item() / want.abs().max().item()
            worst["logits"] = max(worst.get("logits", 0.0), err)
    want_grads = shard(m, dense_grads, tp, tp_rank, pp, pp_rank)
    for name, param in stage.module.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        want = want_grads[name]
        worst[name] = (param.grad - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    return worst


def _check_both(tp: int, pp: int) -> dict:
    from mdu_dist import distributed

    cfg = _tiny("dream", tp, pp)  # GQA: the stricter TP constraint
    distributed.init(cfg.parallel, cfg.model)
    try:
        return {arch: _check_layout(arch, tp, pp) for arch in ARCH_CONFIGS}
    finally:
        distributed.shutdown()


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_parallel_logits_and_grads_match_dense(tp, pp):
    results = run_distributed(_check_both, tp * pp, tp, pp)
    for rank, per_arch in enumerate(results):
        for arch, worst in per_arch.items():
            assert worst, f"rank {rank} {arch}: nothing was compared"
            bad = {k: v for k, v in worst.items() if not v <= 1e-5}
            assert not bad, f"rank {rank} {arch} TP={tp} PP={pp}: relative errors above 1e-5: {bad}"
    last_stage = [r for r in results if "logits" in r["llada"]]
    assert len(last_stage) == tp, "every TP rank of the last stage must have compared logits"
