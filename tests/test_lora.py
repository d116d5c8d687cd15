"""LoRA on the megatron-core backbones (``models.lora``), checked against independent references:

- MDU with adapters at TP=2 and PP=2 equals the same loss, and adapter gradients, computed densely in float64 in
  one process on the merged weights W + (alpha/r) B A (the anchor on the base weights W); the fused QKV and gate/up
  adapters and the replicated factors are thereby checked against per-HF-module adapters;
- the adapters-off reference gives bitwise the logits and gradients of a separate frozen copy (fp32, CPU);
- a finite-difference check of the adapter gradients of one MDU loss (float64);
- the ``lora`` config section refuses bad values, naming the key.
"""

from __future__ import annotations

import pytest
import torch

from multiproc import run_distributed
from test_mdu_parallel import CONFIGS, TAU, TINY, _batch, _dense_mdu, _loss, _method_cfg

LORA = ["lora.rank=4", "lora.alpha=8", "lora.seed=5"]


def _random_adapters(m, lora, seed: int = 9) -> dict[str, torch.Tensor]:
    """Canonical adapters with non-zero B (initialised B is zero, which would hide a wrong B layout)."""
    from mdu_dist.models.lora import initial_adapters

    g = torch.Generator().manual_seed(seed)
    out = initial_adapters(m, lora, range(m.num_layers))
    return {k: (0.05 * torch.randn(v.shape, generator=g) if k.endswith("lora_B") else v) for k, v in out.items()}


def _dense_lora_mdu(m, lora, base, adapters, batch):
    """Loss and canonical adapter gradients of MDU in float64 on merged weights, the anchor on ``base``."""
    from mdu_dist.models.lora import TARGETS

    leaves, merged = {}, dict(base)
    for i in range(m.num_layers):
        for name in lora.targets:
            parts = TARGETS[name].parts
            a = adapters[f"layers.{i}.{parts[0]}.lora_A"].double().requires_grad_(True)
            for p in parts:
                b = adapters[f"layers.{i}.{p}.lora_B"].double().requires_grad_(True)
                leaves[f"layers.{i}.{p}.lora_A"], leaves[f"layers.{i}.{p}.lora_B"] = a, b
                merged[f"layers.{i}.{p}"] = base[f"layers.{i}.{p}"].double() + lora.alpha / lora.rank * (b @ a)
    loss, _ = _dense_mdu(m, merged, base, batch, TAU)
    return loss, {k: v.grad for k, v in leaves.items()}


def _lora_vs_dense(tp: int, pp: int) -> dict:
    from megatron.core import parallel_state as ps

    from mdu_dist import distributed
    from mdu_dist.config import load_config
    from mdu_dist.methods import VocabShard, build_objective, prepare
    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.lora import adapter_parameters, gather_adapters, load_adapters
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard
    from mdu_dist.models.paired import PolicyAndReference
    from mdu_dist.pipeline import run_microbatches

    overrides = TINY + LORA + ["model.num_query_groups=2", f"parallel.tensor={tp}", f"parallel.pipeline={pp}"]
    distributed.init(load_config(CONFIGS["dream"], overrides).parallel)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    results = {}
    try:
        for arch, path in CONFIGS.items():
            cfg = load_config(path, overrides)
            m, lora = cfg.model, cfg.lora
            base, adapters = init_weights(m, seed=3), _random_adapters(m, cfg.lora)
            policy = build_stage(m, lora=lora)
            load_shard(policy.module, shard(m, base, tp, tp_rank, pp, pp_rank))
            load_adapters(policy, adapters, tp, tp_rank, pp, pp_rank)
            copy = build_stage(m)
            load_shard(copy.module, shard(m, base, tp, tp_rank, pp, pp_rank))
            objective = build_objective(_method_cfg(TAU), m.mask_token_id)
            batch = _batch(m.vocab_size, m.pad_token_id)
            mb = prepare(objective, batch, torch.Generator().manual_seed(11))
            vocab = VocabShard(ps.get_tensor_model_parallel_group(), policy.vocab_start, m.vocab_size)
            seen, grads = {}, {}
            for name, model in (("adapters-off", PolicyAndReference(policy, None, adapters_off=True)),
                                ("copy", PolicyAndReference(policy, copy))):
                def loss_fn(x, logits, name=name):
                    seen[name] = logits.detach().clone()
                    return _loss(objective, x, logits, vocab)

                policy.zero_grad(set_to_none=True)
                losses = run_microbatches(model, [mb], lambda stage, x: stage(x.ids, x.n_policy, x.positions),
                                          loss_fn, seq_length=mb.ids.shape[1], micro_batch_size=mb.ids.shape[0])
                seen[name + "/loss"] = losses[0]["loss"].item() if losses else None
                grads[name] = {k: p.grad.clone() for k, p in policy.lora.named_parameters()}
            assert all(p.grad is None for p in policy.module.parameters()), "a frozen base weight got a gradient"
            assert all(p.grad is None for p in copy.parameters()), "the reference copy got a gradient"
            bitwise = all(torch.equal(grads["copy"][k], g) for k, g in grads["adapters-off"].items())
            if ps.is_pipeline_last_stage():
                bitwise &= torch.equal(seen["copy"], seen["adapters-off"])
                bitwise &= seen["copy/loss"] == seen["adapters-off/loss"]
            want_loss, want = _dense_lora_mdu(m, lora, base, adapters, batch)
            worst = {}
            if ps.is_pipeline_last_stage():
                worst["loss"] = abs(seen["copy/loss"] - want_loss) / abs(want_loss)
            with torch.no_grad():
                for p in policy.lora.parameters():
                    p.copy_(p.grad)
            for key, got in gather_adapters(policy, group).items():
                worst[key] = (got.double() - want[key]).abs().max().item() / want[key].abs().max().item()
            count = sum(p.numel() for p in policy.lora.parameters())
            results[arch] = {"worst": worst, "bitwise": bitwise,
                             "count": (count, adapter_parameters(m, lora, tp, m.num_layers // pp))}
    finally:
        distributed.shutdown()
    return results


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_lora_mdu_matches_dense_float64_and_adapters_off_equals_a_copy(tp, pp):
    results = run_distributed(_lora_vs_dense, tp * pp, tp, pp)
    layers = set()
    for rank, per_arch in enumerate(results):
        for arch, r in per_arch.items():
            assert r["bitwise"], f"rank {rank} {arch}: adapters-off reference differs from the frozen copy"
            assert r["count"][0] == r["count"][1], f"rank {rank} {arch}: plan's adapter count {r['count']}"
            bad = {k: v for k, v in r["worst"].items() if not v <= 1e-5}
            assert not bad, f"rank {rank} {arch} TP={tp} PP={pp}: relative errors above 1e-5: {bad}"
            layers |= {k.split(".")[1] for k in r["worst"] if k.startswith("layers.")}
    assert layers == {"0", "1"}  # every layer's adapters were compared, on whichever stage holds it
    assert sum("loss" in r["dream"]["worst"] for r in results) == tp


def _finite_differences() -> None:
    from finite_difference import assert_gradient_matches_finite_differences
    from megatron.core import parallel_state as ps

    from mdu_dist import distributed
    from mdu_dist.config import load_config
    from mdu_dist.methods import VocabShard, build_objective, microbatch_loss, prepare
    from mdu_dist.models.dense import init_weights
    from mdu_dist.models.lora import load_adapters
    from mdu_dist.models.mcore import build_stage
    from mdu_dist.models.mcore_layout import load_shard, shard
    from mdu_dist.models.paired import PolicyAndReference

    cfg = load_config(CONFIGS["llada"], TINY + LORA + ["lora.targets=[qkv,mlp-out]"])
    m = cfg.model
    distributed.init(cfg.parallel, m)
    try:
        policy = build_stage(m, torch.float64, lora=cfg.lora)
        load_shard(policy.module, shard(m, init_weights(m, seed=3, dtype=torch.float64), 1, 0))
        load_adapters(policy, _random_adapters(m, cfg.lora), 1, 0, 1, 0)
        model = PolicyAndReference(policy, None, adapters_off=True)
        objective = build_objective(_method_cfg(TAU), m.mask_token_id)
        vocab = VocabShard(ps.get_tensor_model_parallel_group(), 0, m.vocab_size)
        names = [f"module.lora.{k}" for k, _ in policy.lora.named_parameters()]
        shapes = [p.shape for p in policy.lora.parameters()]
        x = torch.cat([p.detach().flatten() for p in policy.lora.parameters()])

        def loss(flat: torch.Tensor) -> torch.Tensor:
            params = dict(zip(names, (t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
            mb = prepare(objective, _batch(m.vocab_size, m.pad_token_id), torch.Generator().manual_seed(11))
            logits = torch.func.functional_call(model, params, (mb.ids, mb.n_policy, mb.positions))
            return microbatch_loss(objective, mb, logits, vocab)[0]

        assert_gradient_matches_finite_differences(loss, x, tol=1e-6)
    finally:
        distributed.shutdown()


def test_adapter_gradients_match_finite_differences_float64():
    run_distributed(_finite_differences, 1)


@pytest.mark.parametrize("override,needle", [
    ("lora.rank=-1", "lora.rank=-1 must be >= 0"),
    ("lora.alpha=0", "lora.alpha=0.0 must be > 0"),
    ("lora.dropout=1.0", "lora.dropout=1.0 must be in [0, 1)"),
    ("lora.targets=[qkv,lm-head]", "lora.targets: 'lm-head' is not one of qkv, attn-out, mlp-in, mlp-out"),
    ("lora.targets=[]", "lora.targets is empty"),
    ("lora.targets=[qkv,qkv]", "names a target twice"),
    ("lora.reference=theta0", "lora.reference='theta0' must be one of adapters-off, copy"),
])
def test_bad_lora_config_names_the_key(override, needle):
    from mdu_dist.config import load_config
    from mdu_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(CONFIGS["llada"], [override])


def test_lora_refuses_zero_stage_3():
    from mdu_dist.config import load_config
    from mdu_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="lora.rank=8 needs optim.zero_stage 1 or 2"):
        load_config(CONFIGS["llada"], ["lora.rank=8", "optim.zero_stage=3"])
    assert not load_config(CONFIGS["llada"], ["optim.zero_stage=3"]).lora.enabled  # rank 0 (default): off
