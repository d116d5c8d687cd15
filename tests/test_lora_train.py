"""LoRA unlearning through the trainer, on CPU processes joined by gloo.

- TP=1, TP=2 and PP=2 LoRA runs of MDU give the same losses, gradient norms and adapters to 1e-5;
- in each layout the adapters-off reference and a separate frozen copy (``lora.reference=copy``) give bitwise the
  same run, and no copy is built for adapters-off;
- ``train.recompute=full`` trains every adapter (each B non-zero after one step) at PP=1 and PP=2: megatron's
  reentrant checkpoint back-propagates only if an input requires grad, which a frozen embedding's output does not;
- the optimizer (ZeRO-1 and ZeRO-2) holds the adapters and nothing else;
- bf16 (the GPU default: a bf16 frozen base, bf16 adapters with DeepSpeed's fp32 masters) trains every adapter
  at PP=1 and PP=2, with losses within bf16's precision of fp32.
"""

from __future__ import annotations

import pytest
import torch

from multiproc import run_distributed
from test_trainer import TINY

# One shared fixture of ten trainer runs (~2 min on two cores): the slow tier. The default tier checks the same
# adapters-off == copy and TP/PP agreement at the loss level in tests/test_lora.py.
pytestmark = pytest.mark.slow

LORA = ["lora.rank=4", "lora.alpha=8", "optim.warmup_steps=0"]


def _lora_steps(output_dir: str, tp: int, pp: int, runs: dict[str, list[str]], steps: int = 2) -> dict:
    """One rank: for each run (name -> overrides) a Trainer's first ``steps`` steps. Returns per run the losses,
    gradient norms, whether a reference copy was built, the parameters the optimizer holds (count and whether all
    are adapters), this stage's adapters in canonical layout after the first step and at the end."""
    from megatron.core import parallel_state as ps

    from mdu_dist import distributed
    from mdu_dist.config import load_config
    from mdu_dist.models.lora import gather_adapters
    from mdu_dist.trainer import Trainer

    layout = [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"]

    def cfg(name):
        return load_config("configs/llada_tiny.yaml", TINY + LORA + layout + [
            f"train.max_steps={steps}", *runs[name], f"train.output_dir={output_dir}/{name}"])

    first = next(iter(runs))
    distributed.init(cfg(first).parallel, cfg(first).model)
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    try:
        out = {}
        for name in runs:
            trainer = Trainer(cfg(name), "unlearn")
            adapters = {id(p) for p in trainer.policy.lora.parameters()}
            held = [p for g in trainer.engine.optimizer.bit16_groups for p in g]
            metrics, after_first = [], None
            for step in range(steps):
                metrics.append(trainer.train_step(step))
                if step == 0:
                    after_first = _numpy(gather_adapters(trainer.policy, group))
            out[name] = {"losses": [(m["forget-loss"], m["retain-loss"]) for m in metrics],
                         "grad_norms": [m["grad-norm"] for m in metrics],
                         "reference_built": trainer.reference is not None,
                         "optimizer_holds_only_adapters": {id(p) for p in held} == adapters,
                         "after_first": after_first, "final": _numpy(gather_adapters(trainer.policy, group))}
        return out
    finally:
        distributed.shutdown()


def _numpy(tensors: dict[str, torch.Tensor]) -> dict:
    # Tensors returned from a rank would travel through shared memory that dies with the rank process.
    return {k: v.numpy() for k, v in tensors.items()}


RUNS = {"adapters-off": [], "copy": ["lora.reference=copy"], "recompute-full": ["train.recompute=full"]}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("lora")
    tp1_runs = {**RUNS, "zero2": ["optim.zero_stage=2"], "bf16": ["optim.dtype=bf16"]}
    return {"tp1": run_distributed(_lora_steps, 1, str(tmp / "tp1"), 1, 1, tp1_runs),
            "tp2": run_distributed(_lora_steps, 2, str(tmp / "tp2"), 2, 1, RUNS),
            "pp2": run_distributed(_lora_steps, 2, str(tmp / "pp2"), 1, 2, {**RUNS, "bf16": ["optim.dtype=bf16"]})}


def _adapters(ranks: list[dict], run: str, when: str) -> dict[str, torch.Tensor]:
    merged = {}
    for r in ranks:
        merged.update({k: torch.from_numpy(v) for k, v in r[run][when].items()})
    return merged


def test_adapters_off_reference_is_bitwise_the_frozen_copy(layouts):
    for layout, ranks in layouts.items():
        for rank, r in enumerate(ranks):
            assert not r["adapters-off"]["reference_built"] and r["copy"]["reference_built"]
            assert r["adapters-off"]["losses"] == r["copy"]["losses"], f"{layout} rank {rank}"
            assert r["adapters-off"]["grad_norms"] == r["copy"]["grad_norms"], f"{layout} rank {rank}"
            for key, value in r["copy"]["final"].items():
                assert (r["adapters-off"]["final"][key] == value).all(), f"{layout} rank {rank}: {key}"


def test_tp_and_pp_lora_runs_agree(layouts):
    want = layouts["tp1"][0]["adapters-off"]
    assert want["losses"][0] != want["losses"][1]  # the run moved
    want_adapters = _adapters(layouts["tp1"], "adapters-off", "final")
    for layout in ("tp2", "pp2"):
        got = layouts[layout][0]["adapters-off"]
        for step, (a, b) in enumerate(zip(want["losses"], got["losses"], strict=True)):
            assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, f"{layout} step {step + 1}: {b} vs {a}"
        for a, b in zip(want["grad_norms"], got["grad_norms"], strict=True):
            assert abs(a - b) <= 1e-5 * max(1.0, a), f"{layout} grad norm {b} vs {a}"
        adapters = _adapters(layouts[layout], "adapters-off", "final")
        assert adapters.keys() == want_adapters.keys()
        for key, value in want_adapters.items():
            assert (adapters[key] - value).abs().max().item() <= 1e-5, f"{layout}: {key}"
    zero2 = layouts["tp1"][0]["zero2"]
    assert max(abs(x - y) for a, b in zip(want["losses"], zero2["losses"]) for x, y in zip(a, b)) <= 1e-6


@pytest.mark.parametrize("layout", ["tp1", "pp2"])
def test_full_recompute_trains_every_adapter(layouts, layout):
    first = _adapters(layouts[layout], "recompute-full", "after_first")
    b = {k: v for k, v in first.items() if k.endswith("lora_B")}
    assert len(b) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    zero = sorted(k for k, v in b.items() if not v.abs().max() > 0)
    assert not zero, f"{layout}: adapters without a gradient after one step with recompute=full: {zero}"
    off = layouts[layout][0]["adapters-off"]["losses"]
    assert max(abs(x - y) for a, c in zip(off, layouts[layout][0]["recompute-full"]["losses"])
               for x, y in zip(a, c)) <= 1e-6


def test_optimizer_holds_only_the_adapters(layouts):
    for layout, ranks in layouts.items():
        for rank, r in enumerate(ranks):
            for run, got in r.items():
                assert got["optimizer_holds_only_adapters"], f"{layout} rank {rank} {run}"


@pytest.mark.parametrize("layout", ["tp1", "pp2"])
def test_bf16_lora_trains_every_adapter_close_to_fp32(layouts, layout):
    fp32, bf16 = layouts[layout][0]["adapters-off"], layouts[layout][0]["bf16"]
    for a, b in zip(fp32["losses"], bf16["losses"], strict=True):
        assert max(abs(x - y) / max(1.0, abs(x)) for x, y in zip(a, b)) <= 2e-2, (a, b)
    b_factors = {k: v for k, v in _adapters(layouts[layout], "bf16", "final").items() if k.endswith("lora_B")}
    assert len(b_factors) == 2 * 7 and all(v.abs().max() > 0 for v in b_factors.values())
