"""DeepSpeed optimisation (mdu_dist.optim) against plain torch AdamW on the dense reference model.

Every rank builds its shard of the same tiny LLaDA, trains it for three optimizer steps (two micro-batches
each, cross entropy over every token, clipping active) through ``build_engine``/``forward_backward``/
``optimizer_step``, and compares its parameters, the reported gradient norms and learning rates with torch's
AdamW + clip_grad_norm_ + the same schedule run on the full batch by the dense model in the same process.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from multiproc import run_distributed

# DeepSpeed JIT-builds its CPU comm and CPU Adam ops on first use (a minute or more each on a small machine);
# keep them in the repository's ignored build folder, as the Makefile does, so every later run reuses them.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / "build" / "torch_extensions"))

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=301",
        "model.make_vocab_size_divisible_by=8"]
SEQ, STEPS, GAS = 8, 3, 2
TOL = 1e-5


def _optim(**overrides):
    from mdu_dist.optim import OptimConfig

    # grad_clip is well below the gradient norm (~2.7) so that every step clips; warm-up starts at lr 0.
    base = dict(lr=1e-3, weight_decay=0.1, total_steps=5, warmup_steps=1, min_lr=1e-4, grad_clip=0.5,
                gradient_accumulation_steps=GAS, micro_batch_size=1)
    return OptimConfig(**{**base, **overrides})


def _model_cfg(tp: int = 1, pp: int = 1):
    from mdu_dist.config import load_config

    return load_config("configs/llada_tiny.yaml", TINY + [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"])


def _batches(vocab: int, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(token ids, targets) of the global batch of every step."""
    g = torch.Generator().manual_seed(11)
    return [(torch.randint(0, vocab, (rows, SEQ), generator=g), torch.randint(0, vocab, (rows, SEQ), generator=g))
            for _ in range(STEPS)]


def _reference(m, weights, batches, cfg):
    """Dense model, whole batch, torch AdamW with the same decay groups, clip and schedule."""
    import torch.nn.functional as F

    from mdu_dist.models.dense import dense_forward
    from mdu_dist.optim import schedule

    leaves = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    groups = [{"params": [p for p in leaves.values() if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in leaves.values() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg))
    norms, lrs = [], []
    for ids, targets in batches:
        logits = dense_forward(m, leaves, ids)
        opt.zero_grad()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
        for p in leaves.values():  # an expert no token chose: gradient zero, as in DeepSpeed's flat buffers
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norms.append(torch.nn.utils.clip_grad_norm_(list(leaves.values()), cfg.grad_clip).item())
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return {k: v.detach() for k, v in leaves.items()}, norms, lrs


def _loss(mb, logits):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits.float(), mb[1]).mean(), {}


def _forward(model, mb):
    return model(mb[0])


def _paired_forward(model, mb):
    return model(mb[0], len(mb[0]))  # policy rows only


def _my_microbatches(ids, targets, mbs: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from megatron.core import parallel_state as ps

    lo = ps.get_data_parallel_rank() * GAS * mbs
    return [(ids[r:r + mbs], targets[r:r + mbs]) for r in range(lo, lo + GAS * mbs, mbs)]


def _params(engine) -> dict[str, torch.Tensor]:
    """This rank's GPTModel parameters (ZeRO-3 gathers its partitions for the read)."""
    import deepspeed

    gpt = engine.module.module
    with deepspeed.zero.GatheredParameters(list(gpt.parameters()), enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone() for n, p in gpt.named_parameters()}


def _engine(m, weights, cfg):
    """This rank's stage of ``weights`` in a fresh engine."""
    from megatron.core import parallel_state as ps

    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard
    from mdu_dist.optim import build_engine, resolve_dtype

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    dtype = resolve_dtype(cfg)
    stage = build_stage(m, dtype)
    own = shard(m, weights, tp, ps.get_tensor_model_parallel_rank(), pp, ps.get_pipeline_model_parallel_rank())
    load_shard(stage.module, {k: v.to(dtype) for k, v in own.items()})
    return build_engine(stage, cfg)


def _step(engine, batch, drive: str = "forward_backward"):
    from mdu_dist.models.paired import PolicyAndReference
    from mdu_dist.optim import forward_backward, optimizer_step
    from mdu_dist.pipeline import run_microbatches

    mbs = _my_microbatches(*batch, engine.train_micro_batch_size_per_gpu())
    if drive == "forward_backward":  # as the trainer drives it: the policy inside PolicyAndReference
        forward_backward(engine, mbs, _paired_forward, _loss, seq_length=SEQ, micro_batch_size=len(mbs[0][0]),
                         wrap=lambda policy: PolicyAndReference(policy, None))
    else:  # gradients from megatron-core's schedule, whatever the PP size
        run_microbatches(engine.module, mbs, _forward, _loss, seq_length=SEQ, micro_batch_size=len(mbs[0][0]))
    return optimizer_step(engine)


def _train_and_compare(m, weights, cfg, drive: str = "forward_backward") -> dict:
    """Three steps on this rank's shard; worst errors against the dense reference."""
    from megatron.core import parallel_state as ps

    from mdu_dist.models.mcore_layout import shard

    engine = _engine(m, weights, cfg)
    batches = _batches(m.vocab_size, ps.get_data_parallel_world_size() * GAS * cfg.micro_batch_size)
    stats = [_step(engine, batch, drive) for batch in batches]
    ref, ref_norms, ref_lrs = _reference(m, weights, batches, cfg)
    want = shard(m, ref, ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
                 ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank())
    got = _params(engine)
    assert got.keys() == want.keys(), f"parameter names differ: {sorted(got.keys() ^ want.keys())}"
    return {
        "params": max((got[k].float() - want[k]).abs().max().item() for k in want),
        "grad_norm": max(abs(s.grad_norm - r) / r for s, r in zip(stats, ref_norms)),
        "lr": [s.lr for s in stats] == ref_lrs,
        "applied": all(s.applied for s in stats),
    }


def _zero_runs(runs: list[tuple[int, str, str]]) -> dict:
    """DP=2: one engine per (stage, offload, drive), each from the same weights."""
    from mdu_dist import distributed
    from mdu_dist.models.dense import init_weights

    c = _model_cfg()
    distributed.init(c.parallel, c.model)
    try:
        weights = init_weights(c.model, seed=3)
        return {f"zero{stage}-{offload}-{drive}": _train_and_compare(
                    c.model, weights, _optim(zero_stage=stage, offload_optimizer=offload), drive)
                for stage, offload, drive in runs}
    finally:
        distributed.shutdown()


def _check(results: list[dict], params_tol: float = TOL, norm_tol: float = TOL) -> None:
    """Parameters (absolute) and gradient norms (relative). Adam is nearly invariant to a scale of the gradient,
    so a wrongly computed clipping norm barely moves the parameters: the norm check is what catches it."""
    for rank, per_run in enumerate(results):
        for name, r in per_run.items():
            assert r["params"] <= params_tol, f"rank {rank} {name}: parameters differ from AdamW by {r['params']:.2e}"
            assert r["grad_norm"] <= norm_tol, f"rank {rank} {name}: grad norm off by {r['grad_norm']:.2e} (relative)"
            assert r["lr"], f"rank {rank} {name}: learning rates differ from the schedule"
            assert r["applied"], f"rank {rank} {name}: DeepSpeed skipped a step"


def test_zero_stages_with_cpu_offload_agree_with_adamw():
    """DP=2: ZeRO-1/2/3 with the optimizer on the CPU (DeepSpeedCPUAdam), and ZeRO-1 fed by megatron's schedule."""
    runs = [(1, "cpu", "forward_backward"), (2, "cpu", "forward_backward"), (3, "cpu", "forward_backward"),
            (1, "none", "schedule")]
    _check(run_distributed(_zero_runs, 2, runs))


def _resume_runs(runs: list[tuple[int, str]], directory: str) -> dict:
    """Per (stage, offload): do parameters and step stats after a save/load in a fresh engine equal the
    uninterrupted run's, bit for bit?"""
    from mdu_dist import distributed
    from mdu_dist.models.dense import init_weights

    c = _model_cfg()
    distributed.init(c.parallel, c.model)
    try:
        weights = init_weights(c.model, seed=3)
        batches = _batches(c.model.vocab_size, 2 * GAS)
        out = {}
        for stage, offload in runs:
            cfg = _optim(zero_stage=stage, offload_optimizer=offload, warmup_steps=2)
            first = _engine(c.model, weights, cfg)
            for batch in batches:
                _step(first, batch)
            first.save_checkpoint(directory, tag=f"zero{stage}-{offload}")
            tail = [_step(first, batch) for batch in batches]
            resumed = _engine(c.model, weights, cfg)
            resumed.load_checkpoint(directory, tag=f"zero{stage}-{offload}")
            resumed_tail = [_step(resumed, batch) for batch in batches]
            want, got = _params(first), _params(resumed)
            out[f"zero{stage}-{offload}"] = tail == resumed_tail and all(torch.equal(got[k], want[k]) for k in want)
        return out
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_engine_checkpoint_resumes_exactly(tmp_path):
    """DeepSpeed's own save/load (optimizer partitions, CPU-Adam state, the LambdaLR schedule): three more steps
    after a reload equal three more steps without one, bit for bit."""
    for rank, per_run in enumerate(run_distributed(_resume_runs, 2, [(1, "cpu"), (3, "none")], str(tmp_path))):
        assert all(per_run.values()), f"rank {rank}: resumed runs differ: {per_run}"


@pytest.mark.slow
def test_zero_stages_without_offload_agree_with_adamw():
    runs = [(1, "none", "forward_backward"), (2, "none", "forward_backward"), (3, "none", "forward_backward")]
    _check(run_distributed(_zero_runs, 2, runs))


def _layout_run(tp: int, pp: int, dtype: str = "fp32") -> dict:
    from mdu_dist import distributed
    from mdu_dist.config import ConfigError
    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.optim import MegatronMPU, build_engine

    c = _model_cfg(tp, pp)
    distributed.init(c.parallel, c.model)
    try:
        mpu = MegatronMPU()
        world = torch.distributed.get_world_size()
        assert mpu.get_model_parallel_world_size() == tp * pp
        assert mpu.get_data_parallel_world_size() == world // (tp * pp)
        assert mpu.get_tensor_model_parallel_world_size() == tp
        assert mpu.get_pipeline_model_parallel_world_size() == pp
        if pp > 1:
            for stage in (2, 3):
                with pytest.raises(ConfigError, match="only ZeRO stage 1 with pipeline parallelism"):
                    build_engine(build_stage(c.model), _optim(zero_stage=stage))
        cfg = _optim(zero_stage=1, dtype=dtype)
        return {f"tp{tp}-pp{pp}-{dtype}": _train_and_compare(c.model, init_weights(c.model, seed=3), cfg)}
    finally:
        distributed.shutdown()


@pytest.mark.parametrize("tp,pp,world", [
    (2, 1, 2),
    (1, 2, 2),
    pytest.param(2, 1, 4, marks=pytest.mark.slow),
    pytest.param(1, 2, 4, marks=pytest.mark.slow),
], ids=["tp2", "pp2", "tp2xdp2", "pp2xdp2"])
def test_zero1_model_parallel_agrees_with_dense(tp, pp, world):
    """ZeRO-1 through the mpu adapter: norms summed over TP x PP, replicated parameters counted once, DP averaged.

    PP=2 runs megatron's 1F1B schedule (external backward) and also checks that ZeRO-2/3 are refused there.
    """
    _check(run_distributed(_layout_run, world, tp, pp))


def test_schedule_warmup_then_cosine_to_min_lr():
    from mdu_dist.optim import schedule

    cfg = _optim(lr=1.0, min_lr=0.1, total_steps=6, warmup_steps=2)
    # warm-up k/2, then 0.1 + 0.9 * (1 + cos(pi * (k - 2) / 4)) / 2, then the floor.
    want = [0.0, 0.5, 1.0, 0.1 + 0.45 * (1 + math.sqrt(0.5)), 0.55, 0.1 + 0.45 * (1 - math.sqrt(0.5)), 0.1, 0.1,
            0.1]
    got = [schedule(cfg)(k) for k in range(9)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert _optim(total_steps=10, warmup_ratio=0.25, warmup_steps=None).num_warmup_steps() == 3  # rounded up
    assert _optim(total_steps=10, warmup_ratio=0.25, warmup_steps=0).num_warmup_steps() == 0
    assert schedule(_optim(lr=2.0, min_lr=0.5, total_steps=4, warmup_steps=0))(0) == 1.0


def test_schedule_matches_transformers_and_resumes_exactly():
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from mdu_dist.optim import schedule

    cfg = _optim(lr=3e-4, min_lr=3e-5, total_steps=20, warmup_ratio=0.1, warmup_steps=None)

    def lrs(sched, n):
        out = []
        for _ in range(n):
            out.append(sched.optimizer.param_groups[0]["lr"])
            sched.optimizer.step()
            sched.step()
        return out

    def ours():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        return torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg))

    hf_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    hf = get_cosine_with_min_lr_schedule_with_warmup(hf_opt, cfg.num_warmup_steps(), cfg.total_steps,
                                                     min_lr=cfg.min_lr)
    full = lrs(ours(), cfg.total_steps)
    assert full == lrs(hf, cfg.total_steps)
    first = ours()
    head = lrs(first, 7)
    resumed = ours()  # a new process: both states come back from the checkpoint
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    resumed.load_state_dict(first.state_dict())
    assert head + lrs(resumed, cfg.total_steps - 7) == full


@pytest.mark.parametrize("override,message", [
    ({"zero_stage": 0}, r"optim.zero_stage=0 must be one of \[1, 2, 3\]"),
    ({"zero_stage": 4}, r"optim.zero_stage=4 must be one of \[1, 2, 3\]"),
    ({"offload_optimizer": "nvme"}, r"optim.offload_optimizer='nvme' must be one of \['none', 'cpu'\]"),
    ({"dtype": "fp16"}, r"optim.dtype='fp16' must be one of"),
    ({"min_lr": 1.0}, r"optim.min_lr=1.0 is above lr"),
    ({"warmup_steps": 9}, r"optim.warmup_steps=9 must be in \[0, total_steps=5\]"),
    ({"gradient_accumulation_steps": 0}, r"optim.gradient_accumulation_steps=0 must be >= 1"),
])
def test_bad_values_are_refused_by_name(override, message):
    from mdu_dist.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        _optim(**override).validate()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero2_and_zero3_refused_with_pipeline_parallelism(stage):
    from mdu_dist.config import ConfigError
    from mdu_dist.optim import check_pipeline

    with pytest.raises(ConfigError, match=f"optim.zero_stage={stage} cannot be used with parallel.pipeline=2"):
        check_pipeline(_optim(zero_stage=stage), 2)
    check_pipeline(_optim(zero_stage=stage), 1)
    check_pipeline(_optim(zero_stage=1), 4)


def test_deepspeed_config():
    from mdu_dist.optim import ds_config, portable_optimizer, resolve_dtype

    assert resolve_dtype(_optim()) == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert resolve_dtype(_optim(dtype="bf16")) == torch.bfloat16

    plain = ds_config(_optim(zero_stage=2), torch.float32)
    assert plain["zero_optimization"] == {"stage": 2}
    if torch.cuda.is_available():
        assert plain["optimizer"]["params"]["torch_adam"] is True
    else:  # build_engine hands DeepSpeed a PortableAdamW
        assert portable_optimizer(_optim(zero_stage=2))
        assert "optimizer" not in plain and plain["zero_allow_untested_optimizer"] is True
    assert plain["bf16"] == {"enabled": False}
    assert plain["gradient_clipping"] == 0.5 and plain["gradient_accumulation_steps"] == GAS
    offloaded = ds_config(_optim(zero_stage=3, offload_optimizer="cpu"), torch.bfloat16)
    assert not portable_optimizer(_optim(zero_stage=3, offload_optimizer="cpu"))
    assert offloaded["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offloaded["optimizer"]["params"]["torch_adam"] is False  # DeepSpeedCPUAdam
    assert offloaded["bf16"] == {"enabled": True}


@pytest.mark.slow
def test_bf16_pipeline_zero1_stays_within_bf16_of_adamw():
    """bf16 (the GPU default) through megatron's PP=2 schedule: DeepSpeed keeps fp32 master weights and moments,
    so only the bf16 copy of the parameters (one bf16 ulp of the norm weights ~ 8e-3) and the bf16 gradients
    differ from fp32 AdamW."""
    _check(run_distributed(_layout_run, 2, 1, 2, "bf16"), params_tol=1e-2, norm_tol=5e-3)
