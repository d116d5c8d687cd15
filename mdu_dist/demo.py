"""``mdu-dist demo``: the whole MDU pipeline on CPU with a tiny LLaDA-shaped model, shaped like the real one.

1. Data (written under ``<output_dir>/data``): the first ``pretrain_rows`` rows of TOFU real_authors and of
   world_facts plus the last ``pretrain_author_rows`` rows of retain90 (other fictitious authors, with long
   answers; the "pre-training corpus": general knowledge that no later stage touches), the first
   ``forget_rows`` rows of forget10 (the forget set) and the first ``retain_rows`` rows of retain90 with
   ``retain_general_rows`` pre-trained real_authors / world_facts rows each that are not evaluated (the retain
   set). One BPE tokenizer is trained on all of it, as a backbone's tokenizer is on its whole corpus.
2. Pre-train the tiny model from random init on the general rows ("pretrained", the stand-in for a backbone
   such as LLaDA-8B), then fine-tune it on forget + retain ("finetuned", TOFU's fine-tuned model) and, from the
   same pre-trained weights with the same recipe, on retain only ("retain-only", the forget-quality reference).
3. For every seed in ``seeds``: unlearn the forget set from the fine-tuned checkpoint with MDU (one run per tau
   in ``taus``) and the baselines in ``methods`` (same steps and learning rate), then evaluate every model
   (``mdu-dist eval``'s code, ``eval.seed`` = the seed) on the first ``eval_rows`` forget / retain rows and the
   first ``general_rows`` real_authors / world_facts rows; forget quality against that seed's twin evaluation.
   A seed changes the unlearning's data order, retain pairing and diffusion masks, and the evaluation's ELBO
   samples.
4. Steps 2-3 ``replicas`` times, each replica with its own seeds (``replica_seeds``): the spread of the table is
   that of the whole pipeline, the shared models' training included.
5. ``results.json`` (every replica and seed, mean and standard deviation; paths relative to ``output_dir``, no
   timings, so two runs give identical bytes), ``results.md`` (the mean ± std table and the checks of what
   the demo must show, each held against every replica), ``run_info.json`` (timings, machine, numerics pins),
   ``loss_curves.png`` and ``forget_vs_utility.png`` (every replica).

Numerics are pinned (``threads``, ``cpu_isa``; see ``mdu_dist.numerics``) so that the same settings give the same
bits on any x86-64 machine with AVX2, not only on the one that ran them. Every stage runs as soon as the stages
it reads are done and one of ``workers`` processes is free (longest first: pre-trainings, fine-tunes, unlearning
runs, then evaluations), each on one thread, so the results do not depend on ``workers``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import multiprocessing as mp
import os
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mdu_dist import distributed
from mdu_dist.checkpoint.steps import latest_checkpoint
from mdu_dist.config import config_from_dict, load_config
from mdu_dist.data import build_tokenizer, read_rows
from mdu_dist.errors import ConfigError
from mdu_dist.eval.metrics import forget_quality
from mdu_dist.eval.report import aggregate, plot_tradeoff, save_png, table
from mdu_dist.eval.run import evaluate, retain_model_truth_ratios, write_atomic, write_eval
from mdu_dist.launch.local import run_ranks
from mdu_dist.methods import METHODS
from mdu_dist.numerics import CPU_ISAS, numerics_env, numerics_info, pin_process
from mdu_dist.trainer import Trainer

DEFAULT_CONFIG = Path(__file__).resolve().parent / "resources" / "demo.yaml"

# A minutes-long smoke run (tests, CI): tiny data, one step per job, tiny evaluation, two replicas of one seed.
QUICK = ["pretrain_rows=4", "pretrain_author_rows=4", "forget_rows=8", "retain_rows=8", "general_rows=3",
         "retain_general_rows=1",
         "eval_rows=3", "batch_size=4", "pretrain_epochs=1", "finetune_epochs=1", "unlearn_epochs=1", "num_samples=2",
         "gen_length=8", "steps=4", "block_length=8", "taus=[0.5]", "replicas=2", "seeds=[0]"]

# Models trained once per replica, shared by its seeds (only their evaluation is per seed).
SHARED = ("pretrained", "finetuned", "retain-only")


@dataclass
class DemoConfig:
    """Settings of ``mdu-dist demo`` (mdu_dist/resources/demo.yaml, package data: found wherever it is installed)."""

    output_dir: str = "runs/demo"
    tofu_dir: str = ""  # "" = the TOFU bundled with the package (mdu_dist.data.BUNDLED_TOFU)
    pretrain_rows: int = 24  # first N rows of real_authors and of world_facts: the pre-training corpus
    # Last N rows of retain90 (authors the fine-tunes never see), pre-trained on too: real_authors / world_facts
    # answers are 1-4 words, and a model pre-trained on those alone puts end-of-text right after the prompt when
    # it generates into a longer canvas than any it was trained on (each batch pads to its longest row).
    pretrain_author_rows: int = 40
    forget_rows: int = 20  # first N rows of forget10: the forget set (20 = the first fictitious author)
    retain_rows: int = 20  # first N rows of retain90: the retain set's authors
    # + this many pre-trained real_authors and world_facts rows each (rows general_rows.., never evaluated): the
    # tiny model's MDU otherwise generalises "forget" to every short answer (generation ROUGE 1.0 -> 0.1) while
    # their likelihoods stay (normalised probability >= 0.98), as retain sets with general data do at scale.
    retain_general_rows: int = 4
    # The fine-tunes also replay the pre-trained real_authors / world_facts rows: the tiny model forgets them
    # entirely in a fine-tune without them (generation ROUGE 1.0 -> 0.0), which a backbone of billions does not.
    replay_facts: bool = True
    general_rows: int = 16  # real_authors / world_facts rows evaluated (first N of the pre-training rows)
    eval_rows: int = 20  # forget / retain rows evaluated (at most forget_rows and retain_rows)
    batch_size: int = 8  # rows per optimizer step (every training stage)
    pretrain_epochs: int = 100
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 175
    finetune_lr: float = 1e-3
    # A tenth of the fine-tune's learning rate over more steps: at 1e-3, Adam's first steps move every weight
    # about as much, and the tiny model loses its short answers along with the forget set.
    unlearn_epochs: int = 50
    unlearn_lr: float = 1e-4
    methods: list[str] = field(default_factory=lambda: ["ga", "graddiff", "npo"])  # baselines besides MDU
    taus: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])  # one MDU run per tau
    # MDU with LoRA adapters on every linear of every layer (the base frozen, the reference = the policy with its
    # adapters off): one more run per seed at this rank (0: none), tau lora_tau, alpha 2 x rank and its own
    # learning rate (the adapters start at B = 0 and hold a few percent of the parameters: a higher rate).
    lora_rank: int = 8
    lora_tau: float = 0.5
    lora_lr: float = 1e-3
    num_samples: int = 8  # ELBO samples per answer (128 in the real benchmark)
    gen_length: int = 64
    steps: int = 32
    block_length: int = 64
    # Whole pipelines, each its own pre-training, fine-tunes and twin: replica r trains them with seed seed + r
    # and unlearns / evaluates with seeds seeds + r. The table's spread is over replicas and seeds.
    replicas: int = 3
    seed: int = 0  # the pre-training and the two fine-tunes (replica 0's)
    seeds: list[int] = field(default_factory=lambda: [0])  # unlearning + evaluation, one pass each per replica
    threads: int = 1  # torch intra-op threads (summation order depends on it); 0 = one per core
    # avx2 | avx2-intel | default (mdu_dist.numerics.CPU_ISAS) | native (each library picks from the host CPU)
    cpu_isa: str = "avx2"
    workers: int = 2  # worker processes running independent stages side by side (one thread each by default)
    base: dict = field(default_factory=dict)  # a Config mapping (model, optim, data, method) every job starts from

    def validate(self, where: str = "demo") -> None:
        for name in ("pretrain_rows", "forget_rows", "retain_rows", "general_rows", "eval_rows", "batch_size",
                     "pretrain_epochs", "finetune_epochs", "unlearn_epochs", "num_samples", "gen_length", "steps",
                     "block_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 1")
        for name in ("forget_rows", "retain_rows"):  # evaluated rows must be rows the model was taught
            if self.eval_rows > getattr(self, name):
                raise ConfigError(f"{where}.eval_rows={self.eval_rows} is more than {name}={getattr(self, name)}: "
                                  "the evaluation would score rows the model never saw")
        if self.pretrain_author_rows < 0:
            raise ConfigError(f"{where}.pretrain_author_rows={self.pretrain_author_rows} must be >= 0")
        retain90 = len(_read(self.tofu_dir, "retain90"))
        if self.retain_rows + self.pretrain_author_rows > retain90:  # the two would share rows
            raise ConfigError(f"{where}.retain_rows={self.retain_rows} + pretrain_author_rows="
                              f"{self.pretrain_author_rows} is more than retain90's {retain90} rows")
        if self.general_rows > self.pretrain_rows:
            raise ConfigError(f"{where}.general_rows={self.general_rows} is more than pretrain_rows="
                              f"{self.pretrain_rows}: the evaluation would score rows the model never saw")
        if self.retain_general_rows < 0 or self.general_rows + self.retain_general_rows > self.pretrain_rows:
            raise ConfigError(f"{where}.retain_general_rows={self.retain_general_rows}: must be >= 0 and, with "
                              f"general_rows={self.general_rows}, at most pretrain_rows={self.pretrain_rows} (the "
                              "retain set takes pre-trained rows that are not evaluated)")
        if self.replicas < 1:
            raise ConfigError(f"{where}.replicas={self.replicas} must be >= 1")
        if self.workers < 1:
            raise ConfigError(f"{where}.workers={self.workers} must be >= 1")
        bad = [m for m in self.methods if m not in METHODS or m == "mdu"]
        if bad:
            raise ConfigError(f"{where}.methods: {bad[0]!r} is not a baseline (known: "
                              f"{', '.join(m for m in METHODS if m != 'mdu')}; MDU runs once per tau)")
        if self.lora_rank < 0 or not self.lora_lr > 0:
            raise ConfigError(f"{where}: lora_rank={self.lora_rank} must be >= 0 (0: no LoRA run) and lora_lr="
                              f"{self.lora_lr} > 0")
        if self.forget_rows < self.batch_size:
            raise ConfigError(f"{where}.forget_rows={self.forget_rows} is fewer than batch_size={self.batch_size}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"{where}.seeds={self.seeds} must be a non-empty list of distinct seeds")
        if self.threads < 0:
            raise ConfigError(f"{where}.threads={self.threads} must be >= 0")
        if self.cpu_isa not in (*CPU_ISAS, "native"):
            raise ConfigError(f"{where}.cpu_isa={self.cpu_isa!r} must be one of {', '.join(CPU_ISAS)}, native")
        self.job_config("finetune", "x")  # the base config validates, with the demo's overrides

    def job_config(self, name: str, out: str, extra: list[str] = (), seed: int | None = None):
        seed = self.seed if seed is None else seed
        base = copy.deepcopy(self.base)
        overrides = [f"data.tofu_dir={self.tofu_dir}", f"optim.micro_batch_size={self.batch_size}",
                     "optim.gradient_accumulation_steps=1", f"train.output_dir={out}", f"train.seed={seed}",
                     f"parallel.seed={seed}", f"eval.num_samples={self.num_samples}",
                     f"eval.gen_length={self.gen_length}", f"eval.steps={self.steps}",
                     f"eval.block_length={self.block_length}", f"eval.seed={seed}",
                     f"eval.limit={self.eval_rows}", f"eval.batch_size={max(self.num_samples, 1)}",
                     "eval.progress=true", "parallel.tensor=1", "parallel.pipeline=1", *extra]
        return config_from_dict(base, overrides, f"demo ({name})")


def load_demo_config(path: str | None, overrides: list[str] = (), quick: bool = False) -> DemoConfig:
    return load_config(path or DEFAULT_CONFIG, [*(QUICK if quick else []), *overrides], DemoConfig)


# ------------------------------------------------------------------------------------------------ data


def _read(tofu_dir: str, name: str) -> list[dict]:
    return read_rows(name, tofu_dir)[1]


def _qa(rows: list[dict]) -> list[dict]:
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def write_data(d: DemoConfig, root: Path) -> dict[str, Path]:
    """The demo's training sets and the real_authors / world_facts evaluation rows cut to the first
    ``general_rows`` (all of them pre-trained on); forget and retain are evaluated on their first ``eval_rows``
    rows, all of them fine-tuned on."""
    root.mkdir(parents=True, exist_ok=True)
    forget = _qa(_read(d.tofu_dir, "forget10")[: d.forget_rows])
    retain90 = _read(d.tofu_dir, "retain90")
    authors = _qa(retain90[: d.retain_rows])
    split_facts = [_qa(_read(d.tofu_dir, name)[: d.pretrain_rows]) for name in ("real_authors", "world_facts")]
    facts = [r for rows in split_facts for r in rows]
    kept = [r for rows in split_facts for r in rows[d.general_rows: d.general_rows + d.retain_general_rows]]
    general = facts + _qa(retain90[len(retain90) - d.pretrain_author_rows:])
    tuned = facts if d.replay_facts else kept  # the general rows the fine-tunes see again
    files = {"pretrain": general, "forget": forget, "retain": authors + kept,
             "finetune_full": forget + authors + tuned, "finetune_retain_only": authors + tuned}
    for split in ("real_authors", "world_facts"):  # with their perturbed answers, for the truth ratio
        files[f"eval_{split}"] = _read(d.tofu_dir, f"{split}_perturbed")[: d.general_rows]
    paths = {}
    for name, rows in files.items():
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(rows, indent=0))
    return paths


def write_tokenizer(d: DemoConfig, data: dict[str, Path], out: Path) -> Path:
    rows = [r for name in ("pretrain", "forget", "retain") for r in json.loads(data[name].read_text())]
    build_tokenizer([f"{r['question']} {r['answer']}" for r in rows], d.base.get("model", {}).get(
        "vocab_size", 1000), out)
    return out


# -------------------------------------------------------------------------------------------- pipeline


def _train(cfg, job: str) -> float:
    start = time.perf_counter()
    trainer = Trainer(cfg, job)
    trainer.run()
    del trainer
    gc.collect()
    return time.perf_counter() - start


def _eval(cfg) -> tuple[dict, float]:
    start = time.perf_counter()
    result = evaluate(cfg)
    write_eval(result, Path(cfg.eval.output_dir))
    return result["metrics"], time.perf_counter() - start


def _say(text: str) -> None:
    # One write per line: workers side by side share the terminal (print writes the newline separately).
    sys.stdout.write(f"[demo {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stdout.flush()


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("=", "")


@dataclass
class Stage:
    """One training or evaluation job of the demo, run in a worker process."""

    key: str  # its name in run_info.json's timings
    name: str  # the model it trains or evaluates (in config errors)
    output_dir: Path  # a training's run directory, an evaluation's eval.json directory
    overrides: list[str]
    seed: int | None = None
    job: str = ""  # finetune | unlearn; "" = an evaluation
    after: tuple[str, ...] = ()  # keys of the stages whose outputs it reads
    init_from: Path | None = None  # a training's start: this run's last checkpoint (known once it has run)


def run_stages(d: DemoConfig, worker: int, tasks, finished) -> dict:
    """One worker process (one gloo rank): the stages ``tasks`` hands it, until None; each one's key and result
    (the metrics of an evaluation, else None; seconds) go to ``finished`` with ``worker``. Returns the worker's
    machine facts."""
    pin_process(d.cpu_isa)
    layout = d.job_config("layout", "x")
    distributed.init(layout.parallel, layout.model)
    try:
        while (s := tasks.get()) is not None:
            _say(f"{s.key}: started")
            extra = [f"train.init={last_model(s.init_from)}"] if s.init_from else []
            cfg = d.job_config(s.name, str(s.output_dir), [*s.overrides, *extra] if s.job else [
                *s.overrides, f"eval.output_dir={s.output_dir}"], s.seed)
            if s.job:
                done = (None, _train(cfg, s.job))
            else:
                metrics, seconds = _eval(cfg)
                if s.name == "retain-only":  # against itself: the KS p-value of identical samples (1)
                    tr = retain_model_truth_ratios(str(s.output_dir / "eval.json"))
                    metrics["forget_quality"] = forget_quality(tr, tr)
                done = (metrics, seconds)
            _say(f"{s.key}: done in {done[1]:.0f} s")
            finished.put((worker, s.key, done))
    finally:
        distributed.shutdown()
    return numerics_info()


def last_model(run_dir: Path) -> Path:
    return latest_checkpoint(run_dir / "checkpoints") / "model"


def next_ready(pending: list[Stage], done) -> Stage | None:
    """The first stage of ``pending`` (in priority order) whose inputs are all ``done``."""
    return next((s for s in pending if all(k in done for k in s.after)), None)


def run_scheduled(d: DemoConfig, stages: list[Stage]) -> tuple[dict, dict]:
    """Every stage, on ``d.workers`` worker processes kept for the whole run: each idle worker gets the first
    stage in ``stages`` (priority order) whose inputs are done, so no worker waits while a stage is ready.
    Returns key -> (metrics or None, seconds), and the first worker's machine facts."""
    with pinned_environment(numerics_env(d.cpu_isa, d.threads)):  # read by the workers as their libraries load
        return _run_scheduled(d, stages)


@contextlib.contextmanager
def pinned_environment(env: dict[str, str]):
    """``env`` in os.environ while the block runs (its spawned processes inherit it), then as it was."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_scheduled(d: DemoConfig, stages: list[Stage]) -> tuple[dict, dict]:
    ctx = mp.get_context("spawn")
    n = min(d.workers, len(stages))
    tasks, finished = [ctx.Queue() for _ in range(n)], ctx.Queue()
    quiet = ["train.progress=false", "eval.progress=false"] if n > 1 else []  # no bars side by side
    threads = d.threads or max(1, (os.cpu_count() or 1) // n)
    pending, idle, done = [replace(s, overrides=[*s.overrides, *quiet]) for s in stages], list(range(n)), {}
    with ThreadPoolExecutor(n) as pool:
        workers = [pool.submit(run_ranks, run_stages, 1, d, w, tasks[w], finished, threads=threads)
                   for w in range(n)]
        try:
            while pending or len(idle) < n:
                while idle and (stage := next_ready(pending, done)) is not None:
                    pending.remove(stage)
                    tasks[idle.pop(0)].put(stage)
                if len(idle) == n:
                    raise ConfigError(f"demo: stages wait on stages that never run: {[s.key for s in pending]}")
                try:
                    w, key, result = finished.get(timeout=1.0)
                except queue.Empty:
                    for f in workers:
                        if f.done():  # a worker that stopped before being told to has failed: its error
                            f.result()
                            raise RuntimeError("a demo worker stopped early")
                    continue
                done[key] = result
                idle.append(w)
        finally:
            for q in tasks:
                q.put(None)
        machine = workers[0].result()[0]
    return done, machine


def replica_seeds(d: DemoConfig, replica: int) -> list[int]:
    """A replica's unlearning / evaluation seeds: ``seeds`` shifted by the replica (its pre-training and
    fine-tunes use ``seed`` + replica), so that no two replicas share their randomness."""
    return [s + replica for s in d.seeds]


def run_pipeline(d: DemoConfig) -> dict:
    """``replicas`` whole pipelines: pre-train, fine-tune and twin, then per seed the unlearning runs and every
    evaluation, each stage as soon as its inputs are ready and a worker is free (``run_scheduled``); returns the
    results (also written to disk). Each stage runs on one thread whatever the worker it lands on, so the results
    do not depend on ``workers``."""
    out = Path(d.output_dir)
    rel = lambda p: str(Path(p).relative_to(out))  # noqa: E731 - results.json must not depend on where it ran
    t0 = time.perf_counter()
    data = write_data(d, out / "data")
    tokenizer = write_tokenizer(d, data, out / "tokenizer")
    replicas = range(d.replicas)
    root = {r: out / f"replica{r}" for r in replicas}

    def train(name: str, r: int, run_dir: Path, job: str, extra: list[str], seed: int | None = None,
              init_from: str = "") -> Stage:
        return Stage(train_key(name, r, seed), name, run_dir, [f"train.tokenizer={tokenizer}", *extra],
                     d.seed + r if seed is None else seed, job, (train_key(init_from, r),) if init_from else (),
                     dirs[init_from, r] if init_from else None)

    def train_key(name: str, r: int, seed: int | None = None) -> str:
        return f"train {name} replica {r}" + ("" if seed is None else f" seed {seed}")

    def eval_key(name: str, r: int, seed: int) -> str:
        return f"eval {name} replica {r} seed {seed}"

    def eval_dir(name: str, r: int, seed: int) -> Path:
        return root[r] / "eval" / f"seed{seed}" / _slug(name)

    def evaluate(name: str, r: int, seed: int, run_dir: Path, trained: str) -> Stage:
        """Every evaluation but the twin's reads the twin's (forget quality)."""
        extra = [f"eval.checkpoint={run_dir}", f"eval.real_authors={data['eval_real_authors']}",
                 f"eval.world_facts={data['eval_world_facts']}"]
        after = (trained,)
        if name != "retain-only":
            extra.append(f"eval.retain_model_eval={eval_dir('retain-only', r, seed) / 'eval.json'}")
            after += (eval_key("retain-only", r, seed),)
        return Stage(eval_key(name, r, seed), name, eval_dir(name, r, seed), extra, seed, after=after)

    dirs = {(name, r): root[r] / sub for r in replicas
            for name, sub in zip(SHARED, ("pretrain", "finetune", "retain_only"))}
    # (name, method, tau, extra overrides, LoRA rank)
    jobs = [(f"mdu tau={tau:g}", "mdu", tau, [], 0) for tau in d.taus] + [(m, m, None, [], 0) for m in d.methods]
    if d.lora_rank:
        jobs.append((f"mdu tau={d.lora_tau:g} lora r={d.lora_rank}", "mdu", d.lora_tau,
                     [f"lora.rank={d.lora_rank}", f"lora.alpha={2 * d.lora_rank}", f"optim.lr={d.lora_lr}"],
                     d.lora_rank))
    # Priority order: the long trainings first (every later stage waits on them), then the unlearning runs,
    # then the evaluations (short: the last stages leave little idle time).
    pretrain = [train("pretrained", r, dirs["pretrained", r], "finetune", [
        f"data.finetune={data['pretrain']}", f"train.epochs={d.pretrain_epochs}", f"optim.lr={d.pretrain_lr}"])
        for r in replicas]
    finetune = [train(name, r, dirs[name, r], "finetune", [
        f"data.finetune={data[split]}", f"train.epochs={d.finetune_epochs}", f"optim.lr={d.finetune_lr}"],
        init_from="pretrained")
        for r in replicas for name, split in (("finetuned", "finetune_full"), ("retain-only", "finetune_retain_only"))]
    twin_evals = [evaluate("retain-only", r, seed, dirs["retain-only", r], train_key("retain-only", r))
                  for r in replicas for seed in replica_seeds(d, r)]
    unlearn, evals = [], []
    for r in replicas:
        for seed in replica_seeds(d, r):
            evals += [evaluate(name, r, seed, dirs[name, r], train_key(name, r))
                      for name in ("pretrained", "finetuned")]
            for name, method, tau, extra, _ in jobs:
                run_dir = dirs[name, r, seed] = root[r] / "unlearn" / f"seed{seed}" / _slug(name)
                unlearn.append(train(name, r, run_dir, "unlearn", [
                    f"data.forget={data['forget']}", f"data.retain={data['retain']}", f"method.name={method}",
                    f"train.epochs={d.unlearn_epochs}", f"optim.lr={d.unlearn_lr}",
                    *([f"method.tau={tau}"] if tau is not None else []), *extra], seed, init_from="finetuned"))
                evals.append(evaluate(name, r, seed, run_dir, train_key(name, r, seed)))
    done, machine = run_scheduled(d, [*pretrain, *finetune, *twin_evals, *unlearn, *evals])

    runs = {name: {"method": name, "tau": None, "seeds": {}} for name in SHARED}
    for name, method, tau, _, rank in jobs:
        runs[name] = {"method": method, "tau": tau, "seeds": {}, **({"lora_rank": rank} if rank else {})}
    for name, run in runs.items():
        for r in replicas:
            for seed in replica_seeds(d, r):
                run_dir = dirs[name, r] if name in SHARED else dirs[name, r, seed]
                # A LoRA run's checkpoint is its adapters (over the fine-tuned model), not a model.
                ckpt = latest_checkpoint(run_dir / "checkpoints") / ("adapter" if "lora_rank" in run else "model")
                run["seeds"][f"replica {r} seed {seed}"] = {
                    "replica": r, "seed": seed, "checkpoint": rel(ckpt), "run_dir": rel(run_dir),
                    "metrics": done[eval_key(name, r, seed)][0],
                    "eval_dir": rel(eval_dir(name, r, seed))}
        run["mean"], run["std"] = aggregate([s["metrics"] for s in run["seeds"].values()])
    # Where it ran and how many workers ran it change no number.
    settings = {k: v for k, v in asdict(d).items() if k not in ("output_dir", "workers")}
    result = {"runs": runs, "settings": settings}
    info = {"total_seconds": time.perf_counter() - t0, "workers": d.workers,
            "seconds": {k: seconds for k, (_, seconds) in done.items()}, "machine": machine}
    write_outputs(result, info, out)
    return result


# --------------------------------------------------------------------------------------------- outputs

# Within this much forget ROUGE of the retain-only twin, a run has forgotten "to the twin's level"; runs are
# compared on model utility only among those (a matched forget level).
MATCH = 0.05
KEEP = 0.1  # retain / general ROUGE within this much of the fine-tuned model's = kept
KEPT_KEYS = (("retain", "retain_Q_A_ROUGE"), ("real authors", "ra_Q_A_ROUGE"), ("world facts", "wf_Q_A_ROUGE"))


def replica_means(run: dict) -> dict[int, dict]:
    """A run's metrics averaged over each replica's seeds, by replica."""
    per: dict[int, list[dict]] = {}
    for entry in run["seeds"].values():
        per.setdefault(entry["replica"], []).append(entry["metrics"])
    return {r: aggregate(metrics)[0] for r, metrics in per.items()}


def claims(means: dict[str, dict], methods: dict[str, str]) -> dict[str, tuple[bool, str]]:
    """What the demo must show, for one replica: claim -> (whether it holds, the numbers behind it), from the
    seed means ``means`` of every model (``methods``: each model's method)."""
    f = {name: m["forget_Q_A_ROUGE"] for name, m in means.items()}
    ft, twin = means["finetuned"], f["retain-only"]
    unlearned = [n for n in means if n not in SHARED]
    matched = [n for n in unlearned if f[n] <= twin + MATCH]
    utility = {n: means[n]["model_utility"] for n in unlearned}
    out = {"fine-tuned forget ROUGE >= 0.9": (f["finetuned"] >= 0.9, f"{f['finetuned']:.3f}")}
    for n in unlearned:
        out[f"{n} reaches the twin's forget level (forget ROUGE <= twin + {MATCH})"] = (
            n in matched, f"{f[n]:.3f}, twin {twin:.3f}")
    mdu = [n for n in matched if methods[n] == "mdu"]
    best = max(mdu, key=lambda n: utility[n]) if mdu else None
    for n in (n for n in unlearned if methods[n] == "mdu"):
        out[f"{n} is the best MDU at that level (highest model utility)"] = (n == best, f"{utility[n]:.3f}")
    for label, key in KEPT_KEYS:
        delta = None if best is None else means[best][key] - ft[key]
        out[f"the best MDU keeps {label} ROUGE within {KEEP} of the fine-tuned model's"] = (
            delta is not None and abs(delta) <= KEEP, "no MDU at that level" if best is None else
            f"{best} {delta:+.3f}")
    rivals = [n for n in matched if methods[n] != "mdu"]
    out["the best MDU's model utility is above every baseline's at that level"] = (
        best is not None and bool(rivals) and all(utility[best] > utility[n] for n in rivals),
        "no MDU at that level" if best is None else f"{best} {utility[best]:.3f} vs "
        + (", ".join(f"{n} {utility[n]:.3f}" for n in rivals) or "no baseline there"))
    return out


def checks(result: dict) -> list[str]:
    """The claims of ``claims``, each tested in every replica (its seed means): those that hold in every
    replica, those that hold in some (which), those that hold in none; each with every replica's numbers."""
    runs = result["runs"]
    per_run = {name: replica_means(run) for name, run in runs.items()}
    replicas = sorted(per_run["finetuned"])
    methods = {name: run["method"] for name, run in runs.items()}
    tested = [claims({name: per_run[name][r] for name in runs}, methods) for r in replicas]
    groups: dict[str, list[str]] = {"every": [], "some": [], "none": []}
    for claim in tested[0]:
        holds = [r for r, c in zip(replicas, tested) if c[claim][0]]
        numbers = "; ".join(f"replica {r}: {c[claim][1]}" for r, c in zip(replicas, tested))
        if len(holds) == len(replicas):
            groups["every"].append(f"- {claim} ({numbers}).")
        elif holds:
            groups["some"].append(f"- {claim}: only in replica{'s' * (len(holds) > 1)} "
                                  f"{', '.join(map(str, holds))} ({numbers}).")
        elif "is the best MDU" not in claim:  # an MDU run that is best nowhere is no finding
            groups["none"].append(f"- {claim}: in no replica ({numbers}).")
    return ["Hold in every replica:", "", *(groups["every"] or ["- none."]), "",
            "Hold in some replicas only (not conclusions):", "", *(groups["some"] or ["- none."]), "",
            "Hold in no replica:", "", *(groups["none"] or ["- none."])]


def results_markdown(result: dict, info: dict) -> str:
    s = result["settings"]
    n = s["replicas"]
    seeds = ("seed " if len(s["seeds"]) == 1 else "seeds ") + ", ".join(f"{x} + r" for x in s["seeds"])
    replay = " + the pre-trained real_authors / world_facts rows again" if s["replay_facts"] else ""
    lines = ["# mdu-dist demo: TOFU unlearning with a tiny LLaDA-shaped model on CPU", "",
             f"Pre-trained on the first {s['pretrain_rows']} rows each of real_authors and world_facts and the "
             f"last {s['pretrain_author_rows']} of retain90 (authors no later stage sees) "
             f"({s['pretrain_epochs']} epochs at lr {s['pretrain_lr']:g}); fine-tuned from there on the first "
             f"{s['forget_rows']} rows of forget10 (the forget set) + the first {s['retain_rows']} of retain90"
             f"{replay}, and a retain-only twin on the same minus the forget rows "
             f"({s['finetune_epochs']} epochs at lr "
             f"{s['finetune_lr']:g}; these three trained once per replica r, seed {s['seed']} + r). Unlearning: "
             f"{s['unlearn_epochs']} epochs at lr {s['unlearn_lr']:g}, batch {s['batch_size']}; retain set: those "
             f"{s['retain_rows']} retain90 rows + {s['retain_general_rows']} pre-trained real_authors and "
             f"world_facts rows each that are not evaluated. Evaluated on the first {s['eval_rows']} forget / "
             f"retain rows and the first {s['general_rows']} real_authors / world_facts rows (never in a retain "
             f"set), {s['num_samples']} ELBO samples per answer, greedy generation of {s['gen_length']} tokens in "
             f"{s['steps']} steps, {seeds} (unlearning and evaluation). {n} replica{'s' * (n > 1)} of the whole "
             f"pipeline: mean ± sample standard deviation over replicas and seeds.", "", *table(result["runs"])]
    m = info["machine"]
    lines += ["", "forget quality: KS-test p-value of the forget truth ratios against the retain-only twin's "
              "(1 for the twin itself; higher = closer to never having seen the forget set). model utility: "
              "harmonic mean of the nine retain / real-authors / world-facts numbers.", "",
              "## Checks (each replica's seed means)", "", *checks(result), "",
              f"Ran in {info['total_seconds'] / 60:.1f} min on {m['cpu']} ({m['cores']} cores; torch {m['torch']}, "
              f"{m['threads']} threads, ATen CPU capability {m['cpu_capability']}); per stage in run_info.json."]
    return "\n".join(lines) + "\n"


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _smooth(values: list[float]) -> list[float]:
    k = max(1, len(values) // 20)  # the masked-diffusion loss is noisy: a moving average over ~5% of the run
    return [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]


def plot_losses(result: dict, out: Path, path: Path) -> None:
    # deferred: matplotlib (~2 s) is for the plots only, and the Agg backend is chosen here, not on import
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    linestyles = ["-", "--", ":", "-."]
    # Each replica's pre-training, then its two fine-tunes from where it ended, on one step axis.
    shared = {name: {e["replica"]: e["run_dir"] for e in result["runs"][name]["seeds"].values()} for name in SHARED}
    for r, pretrain in shared["pretrained"].items():
        steps, values = zip(*_scalars(out / pretrain)["lm loss"])
        axes[0].plot(steps, _smooth(list(values)), color="C0", ls=linestyles[r % 4], label=f"pretrained replica {r}")
        for i, name in enumerate(SHARED[1:], 1):
            tuned = _scalars(out / shared[name][r])["lm loss"]
            axes[0].plot([steps[-1] + s for s, _ in tuned], _smooth([v for _, v in tuned]), color=f"C{i}",
                         ls=linestyles[r % 4], label=f"{name} replica {r}")
    for i, (name, run) in enumerate((n, r) for n, r in result["runs"].items() if n not in SHARED):
        for j, (key, s) in enumerate(run["seeds"].items()):
            scalars = _scalars(out / s["run_dir"])
            for ax, tag in ((axes[1], "unlearn/forget-loss"), (axes[2], "unlearn/retain-loss")):
                if tag in scalars and any(v != 0 for _, v in scalars[tag]):  # GA has no retain term (logged as 0)
                    steps, values = zip(*scalars[tag])
                    ax.plot(steps, values, color=f"C{i % 10}", ls=linestyles[j % 4], alpha=0.8,
                            label=f"{name} {key}")
    for ax, title in zip(axes, ("pre-training, then fine-tuning loss (moving avg.)", "unlearning: forget loss",
                                "unlearning: retain loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=6, ncol=2)
    axes[0].set_yscale("log")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def write_outputs(result: dict, info: dict, out: Path) -> None:
    write_atomic(out / "results.json", json.dumps(result, indent=1))  # runs in pipeline order
    write_atomic(out / "run_info.json", json.dumps(info, indent=1))
    write_atomic(out / "results.md", results_markdown(result, info))
    plot_losses(result, out, out / "loss_curves.png")
    plot_tradeoff(result["runs"], out / "forget_vs_utility.png", stars=SHARED)


def main_demo(path: str | None, overrides: list[str] = (), quick: bool = False) -> int:
    d = load_demo_config(path, overrides, quick)
    start = time.perf_counter()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path("build/torch_extensions").absolute()))
    result = run_pipeline(d)
    out = Path(d.output_dir)
    print((out / "results.md").read_text())
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min")
    print(f"table:        {out / 'results.md'}\nnumbers:      {out / 'results.json'} (timings: "
          f"{out / 'run_info.json'})\nplots:        {out / 'loss_curves.png'}, {out / 'forget_vs_utility.png'}\n"
          f"evaluations:  {out}/replica<R>/eval/seed<N>/<model>/eval.json, eval.md\n"
          f"TensorBoard:  tensorboard --logdir {out}\n"
          f"checkpoints:  {out}/replica<R>/pretrain, finetune, retain_only, unlearn/seed<N>/<method>/checkpoints")
    return 0 if result["runs"] else 1
