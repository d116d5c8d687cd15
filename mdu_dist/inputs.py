"""Check before write: every input of a job is validated before anything exists in its output directory.

``finetune`` / ``unlearn`` (``prepare``): the output directory, the data rows, the initial checkpoint (exists,
architecture, every shape), the tokenizer (given, the init checkpoint's, or trained on the data in memory; no
larger than the vocabulary) and every row encoded with it. ``eval`` (``mdu_dist.eval.run.check_inputs``) uses
the same checks for its checkpoint, tokenizer and output directory. The CLI (and ``mdu-dist launch``) runs them
before any rank starts; the trainer runs them again on its rank before its first write, so a refused run leaves
no directory behind, whoever started it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdu_dist.checkpoint.dist import MANIFEST, check_model_matches, integrity_problems, read_info
from mdu_dist.checkpoint.errors import CheckpointError
from mdu_dist.checkpoint.hf import check_same_model, open_hf_checkpoint
from mdu_dist.checkpoint.lora import LORA_MANIFEST, is_lora_checkpoint, read_adapters, read_lora_info
from mdu_dist.data import ForgetRetainData, SFTData, load_lines, load_pairs, load_tokenizer, train_tokenizer
from mdu_dist.distributed import resolve_layout
from mdu_dist.errors import ConfigError


@dataclass
class JobInputs:
    """What ``prepare`` checked, ready for the trainer."""

    tokenizer: Any
    tokenizer_dir: Path | None  # None: trained on the data here, to be saved with the run
    data: Any  # SFTData | ForgetRetainData


def check_output_dir(path: str, key: str) -> None:
    """``path`` is a directory, or one that can be created: refuse a file in its place or above it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a directory")
    existing = next(a for a in (p.absolute(), *p.absolute().parents) if a.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}={path}: {existing} is a file, so the directory cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: {existing} is not writable")


def check_checkpoint(path: str | Path, model, key: str) -> str:
    """"dist" (an mdu-dist checkpoint), "lora" (LoRA adapters, with the base they name) or "hf" (an HF directory)
    whose weights fit ``model`` (architecture, every shape; the files' sizes), checked without reading a weight;
    CheckpointError naming ``key`` otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{key}={path}: checkpoint directory not found")
    try:
        if is_lora_checkpoint(p):
            info = read_lora_info(p)
            check_same_model(model, info.cfg, p / LORA_MANIFEST)
            read_adapters(info)
            if info.base["init"]:
                check_checkpoint(info.base["init"], model, f"{key} (its LoRA base)")
            return "lora"
        if (p / MANIFEST).is_file():
            info = read_info(p)
            check_model_matches(info, model)
            problems = integrity_problems(info, hashes=False)
            if problems:
                raise CheckpointError("; ".join(problems))
            return "dist"
        with open_hf_checkpoint(p, model, model.arch):
            return "hf"
    except CheckpointError as e:
        raise CheckpointError(f"{key}={path}: {e}") from None


def check_tokenizer_fits(tokenizer, where, vocab_size: int) -> None:
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"tokenizer {where} has {len(tokenizer)} tokens, more than model.vocab_size={vocab_size}")


def read_sources(cfg, job: str) -> dict:
    """The question/answer rows a job trains on, validated (a missing split, a row without its answer and an
    empty file each raise DataError naming the file and row)."""
    d, limit = cfg.data, cfg.data.limit or None

    def pairs(source: str, limit: int | None = limit):
        return load_pairs(source, d.tofu_dir, limit, d.question_key, d.answer_key)

    if job == "finetune":
        return {"train": pairs(d.finetune)}
    rows = {"forget": pairs(d.forget), "retain": pairs(d.retain)}
    if cfg.method.name == "dpo":
        rows["idk"] = load_lines(d.idk_path())
    return rows


def job_tokenizer(cfg) -> tuple[Any, Path | None]:
    """(tokenizer, its directory): ``train.tokenizer``, else the init checkpoint's, else the one a previous run
    in ``train.output_dir`` trained (a resumed run keeps it), else a BPE tokenizer trained on ``data.finetune``
    in memory (directory None; the trainer saves it)."""
    t, d = cfg.train, cfg.data
    if t.tokenizer:
        return load_tokenizer(t.tokenizer), Path(t.tokenizer)
    init = Path(t.init) if t.init else None
    candidates = [init, init / "hf_files", init / "model" / "hf_files"] if init else []
    for candidate in [*candidates, Path(t.output_dir) / "tokenizer"]:
        if (candidate / "tokenizer.json").exists():
            return load_tokenizer(candidate), candidate
    texts = [f"{qa.question} {qa.answer}"
             for qa in load_pairs(d.finetune, d.tofu_dir, None, d.question_key, d.answer_key)]
    return train_tokenizer(texts, cfg.model.vocab_size), None


def prepare(cfg, job: str, dp: int) -> JobInputs:
    """Every input of ``job`` on ``dp`` data-parallel replicas, checked and encoded; writes nothing."""
    if job not in ("finetune", "unlearn"):
        raise ConfigError(f"unknown job {job!r}")
    check_output_dir(cfg.train.output_dir, "train.output_dir")
    pairs = read_sources(cfg, job)
    if cfg.train.init:
        if check_checkpoint(cfg.train.init, cfg.model, "train.init") == "lora":
            raise ConfigError(f"train.init={cfg.train.init} holds LoRA adapters, not a model: start from their "
                              "merged export (`mdu-dist convert lora-to-hf`)")
    tokenizer, tokenizer_dir = job_tokenizer(cfg)
    check_tokenizer_fits(tokenizer, tokenizer_dir or f"trained on data.finetune={cfg.data.finetune!r}",
                         cfg.model.vocab_size)
    max_length = cfg.data.max_length
    data = (SFTData(tokenizer, pairs["train"], max_length) if job == "finetune" else
            ForgetRetainData(tokenizer, pairs["forget"], pairs["retain"], max_length, pairs.get("idk"),
                             seed=cfg.train.seed))
    o = cfg.optim
    steps_per_epoch(len(data), o.micro_batch_size * o.gradient_accumulation_steps, dp)
    return JobInputs(tokenizer, tokenizer_dir, data)


def check_job(cfg, job: str, world_size: int) -> None:
    """Everything a finetune/unlearn ``job`` on ``world_size`` ranks can refuse, checked before any rank starts
    (an eval job: ``mdu_dist.eval.run.check_inputs``)."""
    prepare(cfg, job, resolve_layout(world_size, cfg.parallel, cfg.model).dp)


def steps_per_epoch(n: int, per_step: int, dp: int) -> int:
    if n < per_step * dp:
        raise ConfigError(f"{n} training rows are fewer than one step's {per_step * dp} "
                          f"(micro_batch_size x gradient_accumulation_steps x DP)")
    return n // (per_step * dp)
