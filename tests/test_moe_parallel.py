"""The mixture-of-experts backbones on megatron-core (MoE layers, allgather dispatcher, SequentialMLP) equal the
dense single-process reference (``models.dense``, whose routed MLP equals transformers' GLM-4-MoE / Qwen3-MoE:
tests/test_moe_reference.py), in gloo processes:

- logits and the gradient of every parameter at PP=1 and PP=2, two micro-batches through megatron's schedule;
- the MDU loss (forget KL to the tau-tempered anchor of a frozen reference with other weights + alpha x the
  retain term) and its gradients at PP=2, float64 reference (tests/test_mdu_parallel.py's); and every method
  (GA, GradDiff, NPO, SimNPO, WGA, DPO too) at PP=2 against its objective on the dense reference's logits;
- DeepSpeed ZeRO-1 over DP=2, and PP=2 x DP=2 (slow): three AdamW steps with clipping give the parameters and
  gradient norms of torch's AdamW on the dense model (tests/test_optim.py's check), so the experts' gradients are
  averaged over DP like every other; the expert-bias buffer is the same, unchanged, after the steps, and stays
  fp32 in a bf16 engine.
- TP > 1 and expert parallelism are refused before any process starts, naming what to use instead.

The expert bias is random and non-zero (``init_weights``), so expert choice depends on it everywhere.
"""

from __future__ import annotations

import pytest
import torch

from multiproc import run_distributed

CONFIGS = {"llada2": "configs/llada2_tiny.yaml", "llada_moe": "configs/llada_moe_tiny.yaml"}
SMALL = ["model.vocab_size=301", "model.make_vocab_size_divisible_by=8"]
BATCH, SEQ = 2, 7


def _cfg(arch: str, pp: int = 1, *extra: str):
    from mdu_dist.config import load_config

    return load_config(CONFIGS[arch], SMALL + [f"parallel.pipeline={pp}", *extra])


def _logits_and_grads(pp: int) -> dict:
    import sys

    from megatron.core import parallel_state as ps

    from mdu_dist import distributed
    from mdu_dist.models.dense import dense_forward, init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard
    from mdu_dist.pipeline import run_microbatches

    distributed.init(_cfg("llada2", pp).parallel)
    results = {}
    try:
        for arch in CONFIGS:
            m = _cfg(arch, pp).model
            weights = {k: v.double() for k, v in init_weights(m, seed=3).items()}
            stage = build_stage(m)
            rank = ps.get_pipeline_model_parallel_rank()
            load_shard(stage.module, shard(m, weights, 1, 0, pp, rank))
            g = torch.Generator().manual_seed(7)
            ids = [torch.randint(0, m.vocab_size, (BATCH, SEQ), generator=g) for _ in range(2)]
            probes = [torch.randn(BATCH, SEQ, m.vocab_size, generator=g, dtype=torch.float64) for _ in ids]
            seen = []

            def loss_fn(mb, logits):
                seen.append(logits.detach())
                return (logits[..., : m.vocab_size] * mb[1].to(logits.dtype)).sum(), {}

            run_microbatches(stage, list(zip(ids, probes)), lambda model, mb: model(mb[0]), loss_fn,
                             seq_length=SEQ, micro_batch_size=BATCH)
            leaves = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
            dense = [dense_forward(m, leaves, x) for x in ids]
            (sum((lg * r).sum() for lg, r in zip(dense, probes)) / len(ids)).backward()
            worst = {}
            if ps.is_pipeline_last_stage():
                worst["logits"] = max((got.double()[..., : m.vocab_size] - want.detach()).abs().max().item()
                                      / want.abs().max().item() for got, want in zip(seen, dense))
            want = shard(m, _grads(leaves), 1, 0, pp, rank)
            for name, param in stage.module.named_parameters():
                worst[name] = _error(param.grad, want[name])
            results[arch] = worst
    finally:
        distributed.shutdown()
    return results


def _grads(leaves: dict) -> dict:
    """Gradients of the dense leaves; an expert no token chose has none: zeros."""
    return {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in leaves.items()}


def _error(got: torch.Tensor | None, want: torch.Tensor) -> float:
    """Largest error relative to the largest reference value; 0 for a parameter both leave without gradient."""
    got = torch.zeros_like(want) if got is None else got.double()
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / scale if scale else got.abs().max().item()


@pytest.mark.parametrize("pp", [1, 2], ids=["pp1", "pp2"])
def test_logits_and_grads_match_dense(pp):
    results = run_distributed(_logits_and_grads, pp, pp)
    for rank, per_arch in enumerate(results):
        assert set(per_arch) == set(CONFIGS)
        for arch, worst in per_arch.items():
            assert any(".mlp.experts." in k for k in worst) and any(".mlp.router." in k for k in worst)
            bad = {k: v for k, v in worst.items() if not v <= 1e-5}
            assert not bad, f"rank {rank} {arch} PP={pp}: relative errors above 1e-5: {bad}"
    assert "logits" in results[-1]["llada2"] and "logits" in results[-1]["llada_moe"]


def _mdu_run(pp: int) -> dict:
    import test_mdu_parallel as t
    from megatron.core import parallel_state as ps

    from mdu_dist import distributed
    from mdu_dist.methods import VocabShard, build_objective, prepare
    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard
    from mdu_dist.models.paired import PolicyAndReference
    from mdu_dist.pipeline import run_microbatches

    distributed.init(_cfg("llada2", pp).parallel)
    results = {}
    try:
        for arch in CONFIGS:
            m = _cfg(arch, pp).model
            policy_w, ref_w = init_weights(m, seed=3), init_weights(m, seed=4)
            rank = ps.get_pipeline_model_parallel_rank()
            objective = build_objective(t._method_cfg(t.TAU), m.mask_token_id)
            policy, ref = build_stage(m), build_stage(m)
            load_shard(policy.module, shard(m, policy_w, 1, 0, pp, rank))
            load_shard(ref.module, shard(m, ref_w, 1, 0, pp, rank))
            bias_before = {n: b.clone() for n, b in policy.module.named_buffers() if n.endswith("expert_bias")}
            batch = t._batch(m.vocab_size, m.pad_token_id)
            mb = prepare(objective, batch, torch.Generator().manual_seed(11))
            vocab = VocabShard(ps.get_tensor_model_parallel_group(), policy.vocab_start, m.vocab_size)
            losses = run_microbatches(
                PolicyAndReference(policy, ref), [mb], lambda stage, x: stage(x.ids, x.n_policy, x.positions),
                lambda x, logits: t._loss(objective, x, logits, vocab),
                seq_length=mb.ids.shape[1], micro_batch_size=mb.ids.shape[0])
            want_loss, want_grads = t._dense_mdu(m, policy_w, ref_w, batch, t.TAU)
            worst = {}
            if ps.is_pipeline_last_stage():
                worst["loss"] = abs(losses[0]["loss"].item() - want_loss) / abs(want_loss)
            expected = shard(m, {k: torch.zeros_like(policy_w[k], dtype=torch.float64) if g is None else g
                                 for k, g in want_grads.items()}, 1, 0, pp, rank)
            for name, param in policy.module.named_parameters():
                worst[name] = _error(param.grad, expected[name])
            assert all(p.grad is None for p in ref.parameters()), "the reference got a gradient"
            for n, b in policy.module.named_buffers():
                if n.endswith("expert_bias"):
                    assert torch.equal(b, bias_before[n]), f"{n} changed in a training step"
            results[arch] = worst
    finally:
        distributed.shutdown()
    return results


def test_mdu_loss_and_grads_at_pp2_match_dense_float64():
    results = run_distributed(_mdu_run, 2, 2)
    for rank, per_arch in enumerate(results):
        for arch, worst in per_arch.items():
            bad = {k: v for k, v in worst.items() if not v <= 1e-5}
            assert not bad, f"rank {rank} {arch}: relative errors above 1e-5: {bad}"
    assert all("loss" in w for w in results[-1].values())


def _methods_run(pp: int) -> dict:
    """Every method's loss and policy gradients on the pipelined MoE model vs the same objective fed the dense
    reference's logits (float64) at the micro-batch's positions: policy rows from the policy's weights,
    reference rows from the frozen reference's."""
    import test_mdu_parallel as t
    from megatron.core import parallel_state as ps

    from mdu_dist import distributed
    from mdu_dist.methods import METHODS, MethodConfig, VocabShard, build_objective, microbatch_loss, prepare
    from mdu_dist.models.dense import dense_forward, init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard
    from mdu_dist.models.paired import PolicyAndReference
    from mdu_dist.pipeline import run_microbatches

    distributed.init(_cfg("llada2", pp).parallel)
    results = {}
    try:
        m = _cfg("llada2", pp).model
        policy_w, ref_w = init_weights(m, seed=3), init_weights(m, seed=4)
        rank = ps.get_pipeline_model_parallel_rank()
        batch = t._batch(m.vocab_size, m.pad_token_id)
        batch["idk"] = batch["retain"]
        for name in METHODS:
            objective = build_objective(MethodConfig(name=name), m.mask_token_id)
            policy, ref = build_stage(m), build_stage(m)
            load_shard(policy.module, shard(m, policy_w, 1, 0, pp, rank))
            load_shard(ref.module, shard(m, ref_w, 1, 0, pp, rank))
            mb = prepare(objective, batch, torch.Generator().manual_seed(11))
            vocab = VocabShard(ps.get_tensor_model_parallel_group(), policy.vocab_start, m.vocab_size)
            losses = run_microbatches(
                PolicyAndReference(policy, ref), [mb], lambda stage, x: stage(x.ids, x.n_policy, x.positions),
                lambda x, logits: t._loss(objective, x, logits, vocab),
                seq_length=mb.ids.shape[1], micro_batch_size=mb.ids.shape[0])
            leaves = {k: v.double().requires_grad_(True) for k, v in policy_w.items()}
            n = mb.n_policy
            logits = dense_forward(m, leaves, mb.ids[:n])[mb.positions[:n]]
            if n < len(mb.ids):
                ref_logits = dense_forward(m, {k: v.double() for k, v in ref_w.items()}, mb.ids[n:])
                logits = torch.cat([logits, ref_logits[mb.positions[n:]]])
            want_loss, _ = microbatch_loss(objective, mb, logits, VocabShard(None, 0, m.vocab_size))
            want_loss.backward()
            worst = {}
            if ps.is_pipeline_last_stage():
                worst["loss"] = abs(losses[0]["loss"].item() - want_loss.item()) / abs(want_loss.item())
            expected = shard(m, _grads(leaves), 1, 0, pp, rank)
            for pname, param in policy.module.named_parameters():
                worst[pname] = _error(param.grad, expected[pname])
            results[name] = worst
    finally:
        distributed.shutdown()
    return results


def test_every_method_on_llada2_at_pp2_matches_dense():
    from mdu_dist.methods import METHODS

    results = run_distributed(_methods_run, 2, 2)
    assert set(results[-1]) == set(METHODS) and all("loss" in w for w in results[-1].values())
    for rank, per_method in enumerate(results):
        for method, worst in per_method.items():
            bad = {k: v for k, v in worst.items() if not v <= 1e-5}
            assert not bad, f"rank {rank} {method}: relative errors above 1e-5: {bad}"


def _zero_run(pp: int) -> dict:
    """test_optim's three ZeRO-1 steps against torch AdamW on the dense model; the expert bias, a buffer (no
    parameter, so no optimizer state), must still hold its initial values."""
    import test_optim as t
    from megatron.core import parallel_state as ps

    from mdu_dist import distributed
    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.mcore_layout import shard

    distributed.init(_cfg("llada2", pp).parallel)
    results = {}
    try:
        for arch in CONFIGS:
            m = _cfg(arch, pp).model
            weights = init_weights(m, seed=3)
            cfg = t._optim(zero_stage=1)
            engine = t._engine(m, weights, cfg)
            batches = t._batches(m.vocab_size, ps.get_data_parallel_world_size() * t.GAS * cfg.micro_batch_size)
            stats = [t._step(engine, batch) for batch in batches]
            ref, ref_norms, ref_lrs = t._reference(m, weights, batches, cfg)
            want = shard(m, ref, 1, 0, pp, ps.get_pipeline_model_parallel_rank())
            got = t._params(engine)
            buffers = dict(engine.module.module.named_buffers())
            biases = [k for k in want if k.endswith("expert_bias")]
            assert (len(biases) > 0) == m.moe_expert_bias and sorted(got.keys() | set(biases)) == sorted(want)
            assert all(torch.equal(buffers[k], want[k]) for k in biases), "the expert bias changed in training"
            results[arch] = {
                "params": max((got[k].float() - want[k]).abs().max().item() for k in got),
                "grad_norm": max(abs(s.grad_norm - r) / r for s, r in zip(stats, ref_norms)),
                "lr": [s.lr for s in stats] == ref_lrs, "applied": all(s.applied for s in stats),
                "dp": ps.get_data_parallel_world_size(),
            }
    finally:
        distributed.shutdown()
    return results


@pytest.mark.parametrize("pp,world", [(1, 2), pytest.param(2, 4, marks=pytest.mark.slow)], ids=["dp2", "pp2xdp2"])
def test_zero1_data_parallel_matches_adamw_on_dense(pp, world):
    import test_optim as t

    results = run_distributed(_zero_run, world, pp)
    assert all(r[a]["dp"] == world // pp for r in results for a in CONFIGS)
    t._check([{a: {k: v for k, v in r[a].items() if k != "dp"} for a in r} for r in results])


def _bf16_run() -> dict:
    """A bf16 LLaDA2 stage in a bf16 DeepSpeed engine after two ZeRO-1 steps: parameters bf16, the expert bias
    still the fp32 values it was given (DeepSpeed casts parameters only, megatron keeps the buffer fp32)."""
    import test_optim as t
    from megatron.core import parallel_state as ps

    from mdu_dist import distributed
    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard
    from mdu_dist.optim import build_engine

    c = _cfg("llada2")
    distributed.init(c.parallel)
    try:
        weights = init_weights(c.model, seed=3)  # fp32, as the trainer loads them into a stage of any dtype
        cfg = t._optim(zero_stage=1, dtype="bf16")
        stage = build_stage(c.model, torch.bfloat16)
        want = shard(c.model, weights, 1, 0, 1, ps.get_pipeline_model_parallel_rank())
        load_shard(stage.module, want)
        engine = build_engine(stage, cfg)
        for batch in t._batches(c.model.vocab_size, t.GAS * cfg.micro_batch_size)[:2]:
            t._step(engine, batch)
        buffers = {k: v for k, v in engine.module.module.named_buffers() if k.endswith("expert_bias")}
        return {"bias_fp32_unchanged": bool(buffers) and all(b.dtype == torch.float32 and torch.equal(b, want[k])
                                                              for k, b in buffers.items()),
                "expert_weights_bf16": all(p.dtype == torch.bfloat16 for n, p in engine.module.module.named_parameters()
                                           if ".experts." in n)}
    finally:
        distributed.shutdown()


def test_bf16_engine_keeps_the_expert_bias_fp32_and_frozen():
    (result,) = run_distributed(_bf16_run, 1)
    assert result == {"bias_fp32_unchanged": True, "expert_weights_bf16": True}


@pytest.mark.parametrize("override,needle", [
    ("parallel.tensor=2", "parallel.tensor=2: the llada2 mixture-of-experts layers run with parallel.tensor=1 only"),
    ("parallel.expert=2", "parallel.expert=2: expert parallelism is not supported with DeepSpeed ZeRO here"),
])
def test_unsupported_layouts_refused_before_start(override, needle):
    from mdu_dist.config import ConfigError

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as e:
        _cfg("llada2", 1, override)
    assert "parallel.pipeline and data parallelism (ZeRO)" in str(e.value)
    assert "\n" not in str(e.value)
