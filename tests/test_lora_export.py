"""LoRA checkpoints leave mdu-dist in PEFT's layout and as merged HF checkpoints, checked with peft itself over
transformers' Llama (LLaDA's maths) and Qwen2 (Dream's) in float64:

- adapters saved at TP=2 and loaded at TP=1 give mdu-dist logits that the exported PEFT adapter, loaded with
  ``peft.PeftModel.from_pretrained``, reproduces to 1e-5; ``disable_adapter()`` gives the base's logits;
  ``merge_and_unload()`` equals ``mdu-dist convert lora-to-hf``;
- the PEFT target regex claims every adapted block module and not LLaDA's head ``model.transformer.ff_out``;
- ``eval`` accepts a LoRA checkpoint (the adapters applied), and resuming onto another base is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from multiproc import run_distributed
from test_dense_reference import _hf_logits, _hf_model, _llama_name, _shift

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=301",
        "model.make_vocab_size_divisible_by=8", "model.num_query_groups=2"]
LORA = ["lora.rank=4", "lora.alpha=8", "lora.seed=2"]
BASE_SEED = 7


def _cfg(arch: str, *extra: str):
    from mdu_dist.config import load_config

    return load_config(f"configs/{arch}_tiny.yaml", TINY + LORA + list(extra))


def _save_random_adapters(arch: str, out: str) -> None:
    """TP=2 ranks: a LoRA stage on a random base (seed BASE_SEED) with random non-zero adapters, saved."""
    from megatron.core import parallel_state as ps

    from mdu_dist import distributed
    from mdu_dist.checkpoint.convert import load_initial_weights
    from mdu_dist.checkpoint.lora import base_of, save_adapters
    from mdu_dist.models.lora import initial_adapters, load_adapters
    from mdu_dist.models.mcore import build_stage

    cfg = _cfg(arch, "parallel.tensor=2")
    distributed.init(cfg.parallel, cfg.model)
    try:
        m = cfg.model
        stage = build_stage(m, lora=cfg.lora)
        load_initial_weights([stage], "", BASE_SEED)
        g = torch.Generator().manual_seed(4)
        adapters = {k: (0.1 * torch.randn(v.shape, generator=g) if k.endswith("lora_B") else v)
                    for k, v in initial_adapters(m, cfg.lora, range(m.num_layers)).items()}
        load_adapters(stage, adapters, 2, ps.get_tensor_model_parallel_rank(), 1, 0)
        save_adapters(stage, Path(out), cfg.lora, base_of("", BASE_SEED), step=3)
    finally:
        distributed.shutdown()


def _mdu_dist_logits(arch: str, ckpt: str, ids: np.ndarray) -> dict:
    """One rank: the LoRA checkpoint loaded (base rebuilt from its seed); logits with adapters on and off."""
    from mdu_dist import distributed
    from mdu_dist.checkpoint.lora import load_lora_checkpoint, read_lora_info
    from mdu_dist.models.lora import adapters_disabled
    from mdu_dist.models.mcore import build_stage

    info = read_lora_info(ckpt)
    cfg = _cfg(arch)
    distributed.init(cfg.parallel, cfg.model)
    try:
        stage = build_stage(info.cfg, lora=info.lora).eval()
        load_lora_checkpoint(stage, info)
        x = torch.from_numpy(ids)
        with torch.no_grad():
            on = stage(x)[..., : info.cfg.vocab_size]
            with adapters_disabled(stage):
                off = stage(x)[..., : info.cfg.vocab_size]
        return {"on": on.numpy(), "off": off.numpy()}
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module", params=["llada", "dream"])
def exported(request, tmp_path_factory):
    from mdu_dist.checkpoint.lora import export_merged, export_peft

    arch, tmp = request.param, tmp_path_factory.mktemp(f"lora-{request.param}")
    run_distributed(_save_random_adapters, 2, arch, str(tmp / "adapter"))
    export_peft(tmp / "adapter", tmp / "peft")
    export_merged(tmp / "adapter", tmp / "merged")
    ids = torch.randint(0, 301, (2, 9), generator=torch.Generator().manual_seed(0)).numpy()
    (ours,) = run_distributed(_mdu_dist_logits, 1, arch, str(tmp / "adapter"), ids)
    return arch, tmp, torch.from_numpy(ids), {k: torch.from_numpy(v).double() for k, v in ours.items()}


def _peft_model(arch: str, tmp):
    """transformers' stand-in of the base (float64) with the exported adapter loaded by peft. LLaDA's HF names
    are renamed to Llama's (``test_dense_reference``'s independent map), target_modules with them."""
    import safetensors.torch
    from peft import PeftModel

    from mdu_dist.models.dense import init_weights

    cfg = _cfg(arch).model
    model = _hf_model(cfg, init_weights(cfg, seed=BASE_SEED, dtype=torch.float64))
    peft_dir = tmp / "peft"
    if arch == "llada":
        renamed = tmp / "peft-llama"
        renamed.mkdir(exist_ok=True)
        config = json.loads((peft_dir / "adapter_config.json").read_text())
        config["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        (renamed / "adapter_config.json").write_text(json.dumps(config))
        tensors = safetensors.torch.load_file(str(peft_dir / "adapter_model.safetensors"))
        out = {}
        for key, value in tensors.items():
            module, factor = key.removeprefix("base_model.model.").split(".lora_")
            out[f"base_model.model.{_llama_name(module + '.weight').removesuffix('.weight')}.lora_{factor}"] = value
        safetensors.torch.save_file(out, str(renamed / "adapter_model.safetensors"))
        peft_dir = renamed
    return PeftModel.from_pretrained(model, str(peft_dir)).to(torch.float64)


def test_peft_reproduces_mdu_dist_logits_and_merge(exported):
    import safetensors.torch

    arch, tmp, ids, ours = exported
    model = _peft_model(arch, tmp)
    shift = _shift if arch == "dream" else (lambda x: x)
    on = shift(_hf_logits(model, ids))
    with model.disable_adapter():
        off = shift(_hf_logits(model, ids))
    assert (on - off).abs().max() > 1e-2, "the adapters change nothing: the comparison below would be vacuous"
    assert (ours["on"] - on).abs().max().item() <= 1e-5
    assert (ours["off"] - off).abs().max().item() <= 1e-5

    merged = model.merge_and_unload().state_dict()
    export = safetensors.torch.load_file(str(tmp / "merged" / "model.safetensors"))
    for name, tensor in export.items():
        key = _llama_name(name) if arch == "llada" else name
        assert (merged[key] - tensor.double()).abs().max().item() <= 1e-6, name
    assert json.loads((tmp / "merged" / "config.json").read_text())["model_type"] == ("llada" if arch == "llada"
                                                                                       else "Dream")


def test_peft_target_regex_leaves_lladas_head_alone():
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from mdu_dist.models.lora import peft_target_regex

    config = LoraConfig(target_modules=peft_target_regex("llada", ["qkv", "attn-out", "mlp-in", "mlp-out"]))
    blocks = [f"model.transformer.blocks.{i}.{m}" for i in (0, 11)
              for m in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")]
    assert all(check_target_module_exists(config, name) for name in blocks)
    for name in ("model.transformer.ff_out", "model.transformer.wte", "model.transformer.blocks.0.attn_norm"):
        assert not check_target_module_exists(config, name), name
    only_out = LoraConfig(target_modules=peft_target_regex("llada", ["mlp-out"]))
    assert not check_target_module_exists(only_out, "model.transformer.ff_out")
    assert not check_target_module_exists(only_out, "model.transformer.blocks.3.q_proj")


def _cli(*args: str, check: bool = True):
    from test_eval_run import _cli as cli

    return cli(*args, check=check)


@pytest.mark.slow
def test_eval_accepts_a_lora_checkpoint_like_its_merged_export(tmp_path):
    from test_eval_run import FAST_EVAL
    from test_trainer import TINY as TRAIN_TINY

    run = tmp_path / "run"
    train = ["unlearn", "--config", "configs/llada_tiny.yaml", *TRAIN_TINY, *LORA, "optim.lr=1e-2",
             "optim.warmup_steps=0", "train.max_steps=2"]
    _cli(*train, f"train.output_dir={run}")
    _cli("convert", "lora-to-hf", "--in", str(run / "checkpoints" / "step-2"), "--out", str(tmp_path / "merged"))
    shape = [a for a in TRAIN_TINY if a.startswith("model.")]
    results = {}
    for name, ckpt in (("lora", run), ("merged", tmp_path / "merged")):
        _cli("eval", "--config", "configs/llada_tiny.yaml", *shape, *FAST_EVAL, f"eval.checkpoint={ckpt}",
             f"eval.output_dir={tmp_path / name}")
        results[name] = json.loads((tmp_path / name / "eval.json").read_text())
    for key, value in results["merged"]["metrics"].items():
        if value is not None:
            assert abs(results["lora"]["metrics"][key] - value) <= 1e-4 * max(1.0, abs(value)), key
    for split, items in results["merged"]["items"].items():
        assert items["generation"] == results["lora"]["items"][split]["generation"], split
        for a, b in zip(items["answer_nll"], results["lora"]["items"][split]["answer_nll"], strict=True):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), split
    # Not vacuous: the merged export is not the base.
    import safetensors.torch

    from mdu_dist.config import load_config
    from mdu_dist.models.dense import init_weights, to_hf

    m = load_config("configs/llada_tiny.yaml", shape).model
    base = to_hf(m, init_weights(m, seed=3))
    merged = safetensors.torch.load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert max((merged[k] - base[k]).abs().max().item() for k in base) > 1e-3

    # Resuming these adapters over another base (another random seed here) is refused, naming both.
    proc = _cli(*train, "train.max_steps=3", "train.seed=4", "train.resume=auto", f"train.output_dir={run}",
                check=False)
    assert proc.returncode != 0 and "the adapters were trained on base" in proc.stderr, proc.stderr[-2000:]
    # ... and with another alpha (it would silently rescale them).
    proc = _cli(*train, "train.max_steps=3", "lora.alpha=4", "train.resume=auto", f"train.output_dir={run}",
                check=False)
    assert proc.returncode != 0 and "the adapters have lora.alpha=8.0, the run lora.alpha=4.0" in proc.stderr


def test_inspect_reads_a_lora_checkpoint_and_names_a_missing_base(exported, tmp_path, capsys):
    import shutil

    from mdu_dist.cli import main

    arch, tmp, _, _ = exported
    assert main(["inspect", str(tmp / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "mdu-dist LoRA checkpoint" in out and f"random initialisation, seed {BASE_SEED}" in out
    assert "rank 4, alpha 8" in out and "integrity: every adapter tensor read, the base checked: OK" in out
    moved = tmp_path / "adapter"
    shutil.copytree(tmp / "adapter", moved)
    manifest = json.loads((moved / "lora.json").read_text())
    manifest["base"] = {"init": str(tmp_path / "no-such-base")}
    (moved / "lora.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(moved)]) == 1
    assert "no-such-base" in capsys.readouterr().err
