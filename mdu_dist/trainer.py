"""The step loop of ``mdu-dist finetune`` and ``mdu-dist unlearn``, on one process or many, CPU or GPU.

One optimizer step = ``optim.gradient_accumulation_steps`` micro-batches per data-parallel replica, each run
through megatron-core's pipeline schedule (policy and frozen-reference rows together, ``models.paired``),
then one DeepSpeed step. Every random draw (data order, retain partners, diffusion masks) is a function of
(seed, step, micro-batch, DP rank) only, so TP/PP layouts see identical batches and a resumed run replays
the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mdu_dist import distributed
from mdu_dist.checkpoint.atomic import atomic_dir
from mdu_dist.checkpoint.convert import load_initial_weights
from mdu_dist.checkpoint.dist import load_model_checkpoint, save_model_checkpoint
from mdu_dist.checkpoint.lora import ADAPTER_DIR, base_of, check_base, load_adapters_into, read_lora_info, save_adapters
from mdu_dist.checkpoint.shared import agreed_latest_step, check_shared_dir
from mdu_dist.checkpoint.steps import TRAINER_STATE, checkpoints_dir, partial_dir, step_dir
from mdu_dist.data import collate_parts, longest
from mdu_dist.errors import ConfigError
from mdu_dist.inputs import prepare as prepare_inputs, steps_per_epoch
from mdu_dist.layout import Layout
from mdu_dist.methods import VocabShard, job_objective, microbatch_loss, prepare
from mdu_dist.models.mcore import build_stage
from mdu_dist.models.paired import PolicyAndReference
from mdu_dist.monitor import Monitor, check_finite
from mdu_dist.optim import build_engine, forward_backward, optimizer_step, resolve_dtype


def step_generator(seed: int, step: int, microbatch: int, dp_rank: int) -> torch.Generator:
    """The random stream of one micro-batch: identical on every TP/PP rank of a replica."""
    return torch.Generator().manual_seed(hash((seed, step, microbatch, dp_rank)) % (2**63))


def epoch_order(n: int, seed: int, epoch: int, group: int = 1, lengths: list[int] | None = None) -> list[int]:
    """The rows of one epoch in order: a random permutation; with ``lengths``, each run of ``group`` rows (one
    optimizer step over every DP rank) holds rows of similar length. Then the rows the epoch drops (the last
    ``n % group``) are still the permutation's last, and the epoch's groups are its kept rows sorted by length
    (stable: equal lengths stay in random order), cut into groups and shuffled. A batch pads to its longest row,
    so this trains on fewer padding positions (HF's ``group_by_length``)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return order
    used = n - n % group
    kept = sorted(order[:used], key=lambda i: lengths[i])
    groups = [kept[i: i + group] for i in range(0, used, group)]
    return [i for k in torch.randperm(len(groups), generator=g).tolist() for i in groups[k]] + order[used:]


def step_indices(n: int, seed: int, step: int, per_step: int, dp_rank: int, dp: int,
                 lengths: list[int] | None = None) -> tuple[int, list[int]]:
    """(epoch, the dataset rows this DP rank uses at optimizer step ``step``); the last partial batch of an
    epoch is dropped so every step has the same shapes. ``lengths``: group rows by length (``epoch_order``)."""
    steps_per_epoch = n // (per_step * dp)
    epoch, within = divmod(step, steps_per_epoch)
    order = epoch_order(n, seed, epoch, per_step * dp, lengths)
    start = within * per_step * dp + dp_rank * per_step
    return epoch, order[start: start + per_step]


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()




class Trainer:
    """One job (``finetune`` or ``unlearn``) on this rank, inside an initialised process group."""

    def __init__(self, cfg, job: str):
        # deferred: megatron-core warns at import (no Apex/TE); ranks unpickle run_job before _entry filters that
        from megatron.core import parallel_state as ps

        self.cfg, self.job, self.ps = cfg, job, ps
        self.out = Path(cfg.train.output_dir)
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.writer_rank = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                            and self.dp_rank == 0)
        m = cfg.model
        inputs = prepare_inputs(cfg, job, self.dp)  # every input checked on this rank before its first write
        self.data = inputs.data
        if cfg.method.exclude_special_tokens and not cfg.method.special_token_ids:
            # An empty list would exclude nothing: it means the tokenizer's special tokens
            # (every added token marked special: the chat template's too, which all_special_ids may omit).
            added = [i for i, t in inputs.tokenizer.added_tokens_decoder.items() if t.special]
            cfg.method.special_token_ids = sorted({*added, *inputs.tokenizer.all_special_ids, m.mask_token_id,
                                                   m.eos_token_id, m.pad_token_id})
        self.objective = job_objective(job, cfg.method, m.mask_token_id, Layout(cfg.data.layout, m.block_size))
        dtype = resolve_dtype(cfg.optim)
        lora = cfg.lora if cfg.lora.enabled else None
        self.policy = build_stage(m, dtype, cfg.train.recompute, lora)
        # MDU at tau = 0 (uniform target) needs no theta_0: none is built. With LoRA the reference is the policy
        # with its adapters off unless lora.reference=copy.
        self.adapters_off = self.objective.needs_reference and lora is not None and lora.reference == "adapters-off"
        self.reference = (build_stage(m, dtype) if self.objective.needs_reference and not self.adapters_off
                          else None)
        self._load_initial_weights()
        if lora is not None:
            self._check_only_adapters_train()
        per_step = cfg.optim.micro_batch_size * cfg.optim.gradient_accumulation_steps
        self.steps_per_epoch = steps_per_epoch(len(self.data), per_step, self.dp)
        self.lengths = self.data.lengths() if cfg.data.group_by_length else None  # step_indices groups by them
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        cfg.optim.total_steps = self.total_steps  # the schedule spans exactly this run
        self.engine = build_engine(self.policy, cfg.optim)  # moves the policy to this rank's device
        if self.reference is not None:
            self.reference.to(distributed.device())
        self.vocab = VocabShard(ps.get_tensor_model_parallel_group(), self.policy.vocab_start, m.vocab_size)
        check_shared_dir(self.out, "train.output_dir")  # inputs checked; before the first write there
        self.tokenizer_dir = self._keep_tokenizer(inputs)
        self.step = 0

    # ------------------------------------------------------------------------------------------- set-up

    def _keep_tokenizer(self, inputs) -> Path:
        """The tokenizer's directory; one trained on the data (a tiny model from scratch) is saved with the run,
        by rank 0, in one rename."""
        if inputs.tokenizer_dir is not None:
            return inputs.tokenizer_dir
        path = self.out / "tokenizer"
        if dist.get_rank() == 0:
            with atomic_dir(path, overwrite=True) as tmp:
                inputs.tokenizer.save_pretrained(str(tmp))
        barrier()
        return path

    def _load_initial_weights(self) -> None:
        """theta_0 for both the policy and the frozen reference: an HF or mdu-dist checkpoint, or random."""
        load_initial_weights([s for s in (self.policy, self.reference) if s is not None], self.cfg.train.init,
                             self.cfg.train.seed)

    def _check_only_adapters_train(self) -> None:
        """With LoRA nothing but the adapters may train: the adapters-off reference is theta_0 only then, and the
        optimizer must hold no base parameter."""
        trainable = {id(p) for p in self.policy.parameters() if p.requires_grad}
        adapters = {id(p) for p in self.policy.lora.parameters()}
        if trainable != adapters:
            raise AssertionError(f"LoRA run: {len(trainable - adapters)} non-adapter parameter(s) would train")

    # --------------------------------------------------------------------------------------------- step

    def _microbatches(self, step: int) -> list:
        o = self.cfg.optim
        epoch, rows = step_indices(len(self.data), self.cfg.train.seed, step,
                                   o.micro_batch_size * o.gradient_accumulation_steps, self.dp_rank, self.dp,
                                   self.lengths)
        chunks = [rows[i: i + o.micro_batch_size] for i in range(0, len(rows), o.micro_batch_size)]
        parts = [self.data.parts(c, epoch) for c in chunks]
        # One length for the whole step: the pipeline moves fixed-shape activations.
        length = max(longest(p) for p in parts)
        pad, pad_in_response = self.cfg.model.pad_token_id, self.job == "finetune" and self.cfg.data.pad_in_response
        return [prepare(self.objective, collate_parts(p, pad, length, pad_in_response),
                        step_generator(self.cfg.train.seed, step, i, self.dp_rank)).to(distributed.device())
                for i, p in enumerate(parts)]

    def train_step(self, step: int) -> dict[str, float]:
        mbs = self._microbatches(step)
        reference, adapters_off = self.reference, self.adapters_off

        def forward(model, mb):
            return mb.forward(model)

        def loss_fn(mb, logits):
            return microbatch_loss(self.objective, mb, logits, self.vocab)

        start = time.perf_counter()
        reported = forward_backward(self.engine, mbs, forward, loss_fn, seq_length=mbs[0].ids.shape[1],
                                    micro_batch_size=mbs[0].ids.shape[0],
                                    wrap=lambda policy: PolicyAndReference(policy, reference, adapters_off))
        stats = optimizer_step(self.engine)
        elapsed = time.perf_counter() - start
        metrics = self._reduce_metrics(reported)
        # Tokens of the rows being trained (the frozen reference's rows are extra work, not throughput).
        tokens = sum(mb.n_policy * mb.ids.shape[1] for mb in mbs) * self.dp
        metrics.update({"learning-rate": stats.lr, "grad-norm": stats.grad_norm, "step-time": elapsed,
                        "throughput": tokens / elapsed})
        return metrics

    def _reduce_metrics(self, reported: list[dict]) -> dict[str, float]:
        """Mean over micro-batches and data-parallel replicas, known on every rank (so that every rank stops
        together on a non-finite loss). Only the last pipeline stage computes losses; it broadcasts them."""
        ps, names = self.ps, self.objective.metric_names
        values = torch.zeros(len(names), dtype=torch.float64)
        if reported:
            values += torch.tensor([[float(r[n]) for n in names] for r in reported], dtype=torch.float64).mean(0)
        dist.all_reduce(values, group=ps.get_data_parallel_group())
        values /= self.dp
        dist.broadcast(values, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        return dict(zip(names, values.tolist()))

    # ------------------------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_root(self) -> Path:
        return checkpoints_dir(self.out)

    def save(self, step: int) -> Path:
        """Collective. ``step-N`` appears (rank 0 renames it into place) only once the model, the DeepSpeed
        optimizer/scheduler state and ``trainer_state.json`` are all written: a run killed mid-save leaves only
        a ``.step-N.partial`` directory, and the previous checkpoint stays the latest complete one."""
        final, tmp = step_dir(self.checkpoint_root, step), partial_dir(self.checkpoint_root, step)
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        tokenizer_files = sorted(p for p in self.tokenizer_dir.iterdir() if p.is_file())
        lora = self.cfg.lora
        if lora.enabled:
            # The frozen base is named, not copied; DeepSpeed keeps the adapters and their optimizer state only.
            save_adapters(self.policy, tmp / ADAPTER_DIR, lora, base_of(self.cfg.train.init, self.cfg.train.seed),
                          step, tokenizer_files)
        else:
            save_model_checkpoint(self.policy, tmp / "model", step=step, hf_files=tokenizer_files)
        self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=lora.enabled)
        barrier()
        if dist.get_rank() == 0:
            write_json_atomic(tmp / TRAINER_STATE, {"step": step, "job": self.job, "total_steps": self.total_steps,
                                                    "seed": self.cfg.train.seed})
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        barrier()
        return final

    def resume(self, path: Path) -> int:
        """Collective: restore weights, optimizer, scheduler and the step counter from checkpoint ``path``."""
        state = json.loads((path / TRAINER_STATE).read_text())
        if state["job"] != self.job:
            raise ConfigError(f"{path}: a {state['job']} checkpoint cannot resume a {self.job} run")
        if self.cfg.lora.enabled:
            info = read_lora_info(path / ADAPTER_DIR)
            check_base(info, self.cfg.train.init, self.cfg.train.seed, self.cfg.model, self.cfg.lora)
            load_adapters_into(self.policy, info)
        else:
            load_model_checkpoint(self.policy, path / "model")
        self.engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=True)
        return int(state["step"])

    # ------------------------------------------------------------------------------------------- loop

    def run(self) -> dict[str, float]:
        t = self.cfg.train
        start = 0
        if t.resume == "auto":
            latest = agreed_latest_step(self.checkpoint_root)
            if latest is not None:
                start = self.resume(step_dir(self.checkpoint_root, latest))
        prefix = "unlearn/" if self.job == "unlearn" else ""
        monitor = Monitor(self.out / "tensorboard", self.total_steps, start, enabled=self.writer_rank,
                          desc=f"{self.job} ({self.cfg.method.name})" if self.job == "unlearn" else self.job,
                          progress=self.cfg.train.progress)
        metrics: dict[str, float] = {}
        try:
            for step in range(start, self.total_steps):
                metrics = self.train_step(step)
                check_finite(metrics, step, f"rows of step {step} on DP rank {self.dp_rank}")
                if (step + 1) % t.log_every == 0 or step + 1 == self.total_steps:
                    monitor.log(step + 1, {(prefix + k if k in self.objective.metric_names else k): v
                                           for k, v in metrics.items()})
                if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < self.total_steps:
                    self.save(step + 1)
            if start < self.total_steps:
                self.save(self.total_steps)
        finally:
            monitor.close()
        return metrics


def run_job(cfg, job: str) -> dict[str, float]:
    """Entry point of one rank: process groups, the trainer, clean shutdown."""
    if job not in ("finetune", "unlearn"):
        raise ConfigError(f"unknown job {job!r}")
    distributed.init(cfg.parallel, cfg.model)
    try:
        return Trainer(cfg, job).run()
    finally:
        distributed.shutdown()
