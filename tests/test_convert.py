"""HF <-> dist conversion for LLaDA and Dream.

- each rank's slices, read from HF files, equal the TP/PP adapter (``mcore_layout.shard``) in every layout;
- HF -> dist (TP=2 x PP=2) -> reshard (TP=1 x PP=1) -> HF reproduces every tensor bit for bit (LLaDA from a
  multi-shard HF checkpoint with an index, Dream from a single file), with config.json and tokenizer files;
- the converted checkpoint, loaded at TP=2 x PP=2, gives the logits of the dense reference on the original
  HF files (relative error <= 1e-5).

The vocabulary (305, padded to a multiple of 8 x TP) is padded to 320 at TP=2 and 312 at TP=1, so the
embedding and head change shape on the way.
"""

from __future__ import annotations

import json

import pytest
import torch

from multiproc import run_distributed

TINY = ["model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=305",
        "model.make_vocab_size_divisible_by=8"]
ARCHS = ("llada", "dream")
BATCH, SEQ = 2, 7


def _cfg(arch: str):
    from mdu_dist.config import load_config

    return load_config(f"configs/{arch}_tiny.yaml", TINY).model


def _write_hf(path, arch: str, dtype=torch.float32, max_shard_bytes=None, seed=11):
    from mdu_dist.checkpoint import save_hf_checkpoint
    from mdu_dist.models.dense import init_weights, to_hf

    cfg = _cfg(arch)
    hf = to_hf(cfg, init_weights(cfg, seed=seed, dtype=dtype))
    save_hf_checkpoint(path, cfg, hf, max_shard_bytes=max_shard_bytes)
    (path / "tokenizer.json").write_text('{"model": "tiny"}\n')
    return cfg, hf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streamed_rank_slices_equal_in_memory_ones(tmp_path, dtype):
    """Blocks read from (multi-shard) safetensors files give each rank exactly what the whole tensors give."""
    from mdu_dist.checkpoint.hf import open_hf_checkpoint
    from mdu_dist.models.dense import from_hf
    from mdu_dist.models.mcore_layout import rank_tensor, shard

    for arch in ARCHS:
        cfg, hf = _write_hf(tmp_path / arch, arch, dtype, max_shard_bytes=30_000)
        canonical = from_hf(cfg, hf)
        with open_hf_checkpoint(tmp_path / arch, cfg, arch) as reader:
            for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2), (2, 4)]:
                for pp_rank in range(pp):
                    for tp_rank in range(tp):
                        for name, want in shard(cfg, canonical, tp, tp_rank, pp, pp_rank).items():
                            got = rank_tensor(cfg, name, reader.read, tp, tp_rank, pp, pp_rank)
                            assert got.dtype == dtype and torch.equal(got, want), (arch, tp, pp, name)


def _logits(stage, ids):
    """Full-vocabulary logits on the last stage (gathered over TP), None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from mdu_dist.pipeline import run_microbatches

    seen = []

    def loss_fn(_mb, logits):
        seen.append(logits.detach())
        return logits.sum() * 0.0, {}

    run_microbatches(stage, [ids], lambda model, mb: model(mb), loss_fn, seq_length=ids.shape[1],
                     micro_batch_size=ids.shape[0], forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    parts = [torch.empty_like(seen[0]) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, seen[0].contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _convert_and_check_logits(hf_dirs: dict, dist_dirs: dict) -> dict:
    """On TP=2 x PP=2 ranks: convert each HF checkpoint, reload it into fresh stages, compare logits."""
    from megatron.core import parallel_state as ps

    from mdu_dist import distributed
    from mdu_dist.checkpoint import load_hf_checkpoint
    from mdu_dist.checkpoint.convert import hf_side_files, load_hf_into_stage
    from mdu_dist.checkpoint.dist import load_model_checkpoint, save_model_checkpoint
    from mdu_dist.checkpoint.hf import open_hf_checkpoint
    from mdu_dist.config import ParallelConfig
    from mdu_dist.models.dense import dense_forward, from_hf
    from mdu_dist.models.mcore import build_stage

    distributed.init(ParallelConfig(tensor=2, pipeline=2, backend="gloo"), _cfg("dream"))
    worst = {}
    try:
        for arch in ARCHS:
            cfg = _cfg(arch)
            with open_hf_checkpoint(hf_dirs[arch], cfg, arch) as reader:
                stage = build_stage(cfg)
                load_hf_into_stage(stage, reader)
            save_model_checkpoint(stage, dist_dirs[arch], hf_files=hf_side_files(hf_dirs[arch]))

            fresh = build_stage(cfg)
            info = load_model_checkpoint(fresh, dist_dirs[arch], verify="sha256")
            assert (info.tp, info.pp, info.arch) == (2, 2, arch)
            for (name, a), b in zip(stage.module.state_dict().items(), fresh.module.state_dict().values()):
                assert name.endswith("_extra_state") or torch.equal(a, b), name

            ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
            got = _logits(fresh, ids)
            if got is not None:
                _, hf = load_hf_checkpoint(hf_dirs[arch], cfg, arch)
                want = dense_forward(cfg, from_hf(cfg, hf), ids)
                assert torch.isinf(got[..., cfg.vocab_size:]).all() and got.shape[-1] == 320
                worst[arch] = ((got[..., : cfg.vocab_size] - want).abs().max() / want.abs().max()).item()
        return {"rank": (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()), **worst}
    finally:
        distributed.shutdown()


def _reshard_to_single_rank(srcs: dict, outs: dict) -> None:
    from mdu_dist import distributed
    from mdu_dist.checkpoint.dist import load_model_checkpoint, read_info, save_model_checkpoint
    from mdu_dist.config import ParallelConfig
    from mdu_dist.models.mcore import build_stage

    distributed.init(ParallelConfig(tensor=1, pipeline=1, backend="gloo"))
    try:
        for arch in ARCHS:
            stage = build_stage(_cfg(arch))
            info = load_model_checkpoint(stage, srcs[arch])
            save_model_checkpoint(stage, outs[arch], hf_files=info.hf_files)
    finally:
        distributed.shutdown()


def test_hf_to_tp2pp2_to_tp1pp1_to_hf_is_bit_exact_and_logits_match(tmp_path):
    from mdu_dist.checkpoint import load_hf_checkpoint
    from mdu_dist.checkpoint.convert import dist_to_hf
    from mdu_dist.checkpoint.dist import read_info

    hf_dirs = {arch: tmp_path / f"hf_{arch}" for arch in ARCHS}
    originals = {"llada": _write_hf(hf_dirs["llada"], "llada", max_shard_bytes=40_000)[1],
                 "dream": _write_hf(hf_dirs["dream"], "dream")[1]}
    assert (hf_dirs["llada"] / "model.safetensors.index.json").is_file()
    assert (hf_dirs["dream"] / "model.safetensors").is_file()

    d22 = {arch: tmp_path / f"{arch}_tp2pp2" for arch in ARCHS}
    results = run_distributed(_convert_and_check_logits, 4, hf_dirs, d22)
    last = [r for r in results if "llada" in r]
    assert sorted(r["rank"] for r in last) == [(0, 1), (1, 1)], "both TP ranks of the last stage compare logits"
    for r in last:
        for arch in ARCHS:
            assert r[arch] <= 1e-5, f"{arch} rank {r['rank']}: relative logit error {r[arch]:.2e}"

    d11 = {arch: tmp_path / f"{arch}_tp1pp1" for arch in ARCHS}
    run_distributed(_reshard_to_single_rank, 1, d22, d11)
    for arch in ARCHS:
        info = read_info(d11[arch])
        assert (info.tp, info.pp) == (1, 1)
        assert sorted(p.name for p in d11[arch].iterdir()) == ["hf_files", "mdu_checkpoint.json", "model"]

        out, notes = dist_to_hf(d11[arch], tmp_path / f"{arch}_back", max_shard_bytes=25_000, progress=False)
        assert notes == []
        _, back = load_hf_checkpoint(out, _cfg(arch), arch)
        assert sorted(back) == sorted(originals[arch])
        for name, want in originals[arch].items():
            assert back[name].dtype == want.dtype and torch.equal(back[name], want), f"{arch} {name}"
        assert (json.loads((out / "config.json").read_text())
                == json.loads((hf_dirs[arch] / "config.json").read_text()))
        assert (out / "tokenizer.json").read_text() == '{"model": "tiny"}\n'
        assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(back)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary directories left behind: {leftovers}"
