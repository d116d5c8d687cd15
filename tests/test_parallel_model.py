"""LLaDA and Dream on megatron-core, with SDPA and with megatron's local core attention, under TP=1, TP, PP and
TP x PP (gloo processes) equal the dense reference.

Every rank builds its stage from the same canonical weights, runs two micro-batches through megatron-core's
pipeline schedule with loss = mean_mb sum(logits * R_mb), and checks its logits (last stage, gathered over TP)
and the gradient of every parameter it holds against the dense single-process model in the same process.
The second micro-batch is the first with its last token changed, and the logits at position 0 must see it
(bidirectional attention). The same check runs on CUDA (``gpu``-marked): fp32 to 1e-5, bf16 within BF16_TOL.
"""

from __future__ import annotations

import pytest
import torch

from multiproc import run_distributed

TINY = ["model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=301",
        "model.make_vocab_size_divisible_by=8"]
ARCH_CONFIGS = {"llada": "configs/llada_tiny.yaml", "dream": "configs/dream_tiny.yaml"}
ATTENTIONS = ("sdpa", "local")
BATCH, SEQ, MICROBATCHES = 2, 7, 2
# bf16 on CUDA against the float64 dense model on the same (bf16-rounded) weights: largest error relative to
# the largest reference value, for the logits and for each gradient. fp32 is held to 1e-5 everywhere.
BF16_TOL = 3e-2


def _tiny(arch: str, tp: int, pp: int, attention: str = "sdpa"):
    from mdu_dist.config import load_config

    return load_config(ARCH_CONFIGS[arch], TINY + [f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
                                                   f"model.attention={attention}"])


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(7)
    first = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    changed = first.clone()
    changed[:, -1] = (changed[:, -1] + 1) % vocab
    probes = [torch.randn(BATCH, SEQ, vocab, generator=g, dtype=torch.float64) for _ in range(MICROBATCHES)]
    return [first, changed], probes


def _dense(cfg, weights, ids, probes):
    from mdu_dist.models.dense import dense_forward

    leaves = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    logits = [dense_forward(cfg, leaves, x) for x in ids]
    loss = sum((lg * r.to(lg.dtype)).sum() for lg, r in zip(logits, probes)) / len(ids)
    loss.backward()
    return [lg.detach() for lg in logits], {k: v.grad for k, v in leaves.items()}


def _check_layout(arch: str, tp: int, pp: int, attention: str, dtype: torch.dtype = torch.float32) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard
    from mdu_dist.pipeline import run_microbatches

    from mdu_dist.distributed import device

    m = _tiny(arch, tp, pp, attention).model
    # The reference runs in float64 on the weights the model holds (rounded to bf16 for a bf16 model).
    weights = {k: v.to(dtype).double() for k, v in init_weights(m, seed=3).items()}
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    stage = build_stage(m, dtype)
    load_shard(stage.module, shard(m, weights, tp, tp_rank, pp, pp_rank))
    stage.to(device())
    ids, probes = _inputs(m.vocab_size)
    mbs = [(x.to(device()), r.to(device())) for x, r in zip(ids, probes)]
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
        full_logits = []
        for got, want in zip(seen_logits, dense_logits):
            parts = [torch.empty_like(got) for _ in range(tp)]
            dist.all_gather(parts, got.contiguous(), group=group)
            full = torch.cat(parts, dim=-1).cpu().double()
            assert torch.isinf(full[..., m.vocab_size:]).all(), "padded vocab columns must be -inf"
            full_logits.append(full[..., : m.vocab_size])
            err = (full_logits[-1] - want).abs().max().item() / want.abs().max().item()
            worst["logits"] = max(worst.get("logits", 0.0), err)
        # Position 0 sees the last token (for Dream the shift makes position 0 the unshifted position 0).
        assert (full_logits[0][:, 0] - full_logits[1][:, 0]).abs().max() > 1e-6, "attention is not bidirectional"
    want_grads = shard(m, dense_grads, tp, tp_rank, pp, pp_rank)
    for name, param in stage.module.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        want = want_grads[name]
        worst[name] = (param.grad.cpu().double() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    return worst


def _check_all(tp: int, pp: int, attentions: tuple[str, ...] = ATTENTIONS, dtype: torch.dtype = torch.float32
               ) -> dict:
    from mdu_dist import distributed

    cfg = _tiny("dream", tp, pp)  # GQA: the stricter TP constraint
    distributed.init(cfg.parallel, cfg.model)
    try:
        return {f"{arch}/{attention}": _check_layout(arch, tp, pp, attention, dtype)
                for arch in ARCH_CONFIGS for attention in attentions}
    finally:
        distributed.shutdown()


def _assert_within(results: list[dict], tp: int, pp: int, tol: float, compared: int) -> None:
    for rank, per_run in enumerate(results):
        for run, worst in per_run.items():
            assert worst, f"rank {rank} {run}: nothing was compared"
            bad = {k: v for k, v in worst.items() if not v <= tol}
            assert not bad, f"rank {rank} {run} TP={tp} PP={pp}: relative errors above {tol:g}: {bad}"
    last_stage = [r for r in results if all("logits" in w for w in r.values())]
    assert len(last_stage) == tp, "every TP rank of the last stage must have compared logits"
    assert all(len(r) == compared for r in results)


LAYOUTS = pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)], ids=["tp1", "tp2", "pp2", "tp2xpp2"])


@LAYOUTS
def test_parallel_logits_and_grads_match_dense(tp, pp):
    # megatron's local attention (the comparison baseline) once, under both kinds of parallelism at once.
    attentions = ATTENTIONS if (tp, pp) == (2, 2) else ("sdpa",)
    results = run_distributed(_check_all, tp * pp, tp, pp, attentions)
    _assert_within(results, tp, pp, 1e-5, compared=len(ARCH_CONFIGS) * len(attentions))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOL)], ids=["fp32", "bf16"])
def test_sdpa_on_cuda_matches_dense(dtype, tol):
    results = run_distributed(_check_all, 1, 1, 1, ("sdpa",), dtype)
    _assert_within(results, 1, 1, tol, compared=len(ARCH_CONFIGS))


@pytest.mark.gpu
def test_tp2_over_nccl_matches_dense():
    if torch.cuda.device_count() < 2:
        pytest.skip("TP=2 over NCCL needs 2 GPUs")
    results = run_distributed(_check_all, 2, 2, 1, ("sdpa",))
    _assert_within(results, 2, 1, 1e-5, compared=len(ARCH_CONFIGS))
