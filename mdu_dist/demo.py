"""``mdu-dist demo``: the whole MDU pipeline on CPU with a tiny LLaDA-shaped model, in one command.

1. Data (written under ``<output_dir>/data``): the first ``forget_rows`` rows of TOFU forget10 (the forget set),
   the first ``retain_rows`` rows of retain90 (the retain set) and the first ``general_rows`` rows of real_authors
   and of world_facts as question/answer pairs. A tiny model has no pre-training, so the general rows stand in
   for the world knowledge an 8B model brings: they are taught in both fine-tunes and never unlearned, and the
   real_authors / world_facts metrics then measure whether unlearning damaged them.
2. Fine-tune the tiny model (random init) on forget + retain + general rows ("finetuned"), and a retain-only
   twin on retain + general rows with the same recipe and tokenizer ("retain-only", the forget-quality reference).
3. Unlearn the forget set from the fine-tuned checkpoint with MDU (one run per tau in ``taus``) and the baselines
   in ``methods`` (GA, GradDiff, NPO by default), same steps and learning rate.
4. Evaluate every model (``mdu-dist eval``'s code) on the first ``eval_rows`` forget and retain rows and on the
   ``general_rows`` real_authors / world_facts rows it was taught; forget quality against the retain-only twin.
5. ``results.json``, ``results.md`` (the table), ``loss_curves.png`` (forget/retain loss per unlearning run, from
   the TensorBoard events), ``forget_vs_utility.png`` (per method and tau); TensorBoard logs under each run.

Everything runs in one process (one gloo rank): the libraries load once.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mdu_dist.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"

# A minutes-long smoke run (tests, CI): tiny data, one step per job, tiny evaluation.
QUICK = ["forget_rows=8", "retain_rows=8", "general_rows=4", "eval_rows=3", "batch_size=4", "finetune_epochs=1",
         "unlearn_epochs=1", "num_samples=2", "gen_length=8", "steps=4", "block_length=8", "taus=[0.5]"]


@dataclass
class DemoConfig:
    """Settings of ``mdu-dist demo`` (configs/demo.yaml)."""

    output_dir: str = "runs/demo"
    tofu_dir: str = ""  # "" = the TOFU bundled with the package (mdu_dist.data.BUNDLED_TOFU)
    forget_rows: int = 20  # first N rows of forget10: the forget set (20 = the first fictitious author)
    retain_rows: int = 20  # first N rows of retain90: the retain set
    general_rows: int = 8  # first N rows of real_authors and of world_facts: taught in both fine-tunes, evaluated
    eval_rows: int = 20  # forget / retain rows evaluated (at most forget_rows and retain_rows)
    batch_size: int = 8  # rows per optimizer step (fine-tune and unlearn)
    finetune_epochs: int = 500
    finetune_lr: float = 1e-3
    unlearn_epochs: int = 10
    unlearn_lr: float = 1e-3
    methods: list[str] = field(default_factory=lambda: ["ga", "graddiff", "npo"])  # baselines besides MDU
    taus: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])  # one MDU run per tau
    num_samples: int = 8  # ELBO samples per answer (128 in the real benchmark)
    gen_length: int = 64
    steps: int = 32
    block_length: int = 64
    seed: int = 0
    base: dict = field(default_factory=dict)  # a Config mapping (model, optim, data, method) every job starts from

    def validate(self, where: str = "demo") -> None:
        from mdu_dist.methods import METHODS

        for name in ("forget_rows", "retain_rows", "general_rows", "eval_rows", "batch_size", "finetune_epochs",
                     "unlearn_epochs", "num_samples", "gen_length", "steps", "block_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be >= 1")
        for name in ("forget_rows", "retain_rows"):  # evaluated rows must be rows the model was taught
            if self.eval_rows > getattr(self, name):
                raise ConfigError(f"{where}.eval_rows={self.eval_rows} is more than {name}={getattr(self, name)}: "
                                  "the evaluation would score rows the model never saw")
        bad = [m for m in self.methods if m not in METHODS or m == "mdu"]
        if bad:
            raise ConfigError(f"{where}.methods: {bad[0]!r} is not a baseline (known: "
                              f"{', '.join(m for m in METHODS if m != 'mdu')}; MDU runs once per tau)")
        if self.forget_rows < self.batch_size:
            raise ConfigError(f"{where}.forget_rows={self.forget_rows} is fewer than batch_size={self.batch_size}")
        self.job_config("finetune", "x")  # the base config validates, with the demo's overrides


    def job_config(self, name: str, out: str, extra: list[str] = ()):
        from mdu_dist.config import config_from_dict

        base = copy.deepcopy(self.base)
        overrides = [f"data.tofu_dir={self.tofu_dir}", f"optim.micro_batch_size={self.batch_size}",
                     "optim.gradient_accumulation_steps=1", f"train.output_dir={out}", f"train.seed={self.seed}",
                     f"parallel.seed={self.seed}", f"eval.num_samples={self.num_samples}",
                     f"eval.gen_length={self.gen_length}", f"eval.steps={self.steps}",
                     f"eval.block_length={self.block_length}", f"eval.seed={self.seed}",
                     f"eval.limit={self.eval_rows}", f"eval.batch_size={max(self.num_samples, 1)}",
                     "eval.progress=true", "parallel.tensor=1", "parallel.pipeline=1", *extra]
        return config_from_dict(base, overrides, f"demo ({name})")


def load_demo_config(path: str | None, overrides: list[str] = (), quick: bool = False) -> DemoConfig:
    from mdu_dist.config import config_from_dict, load_config

    if path is None and DEFAULT_CONFIG.exists():
        path = str(DEFAULT_CONFIG)
    overrides = [*(QUICK if quick else []), *overrides]
    if path is None:
        return config_from_dict({}, overrides, "<demo defaults>", DemoConfig)
    return load_config(path, overrides, DemoConfig)


# ------------------------------------------------------------------------------------------------ data


def _read(tofu_dir: str, name: str) -> list[dict]:
    from mdu_dist.data import _rows, resolve_source

    return _rows(resolve_source(name, tofu_dir))


def _qa(rows: list[dict]) -> list[dict]:
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def write_data(d: DemoConfig, root: Path) -> dict[str, Path]:
    """The demo's training sets, and the real_authors / world_facts evaluation rows cut to the ones taught
    (the tiny model knows nothing else; forget and retain are evaluated on their first ``eval_rows`` rows, all
    of them taught as long as eval_rows <= forget_rows, retain_rows)."""
    root.mkdir(parents=True, exist_ok=True)
    forget = _qa(_read(d.tofu_dir, "forget10")[: d.forget_rows])
    retain = _qa(_read(d.tofu_dir, "retain90")[: d.retain_rows])
    general = (_qa(_read(d.tofu_dir, "real_authors")[: d.general_rows])
               + _qa(_read(d.tofu_dir, "world_facts")[: d.general_rows]))
    files = {"forget": forget, "retain": retain, "finetune_full": forget + retain + general,
             "finetune_retain_only": retain + general}
    for split in ("real_authors", "world_facts"):  # with their perturbed answers, for the truth ratio
        files[f"eval_{split}"] = _read(d.tofu_dir, f"{split}_perturbed")[: d.general_rows]
    paths = {}
    for name, rows in files.items():
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(rows, indent=0))
    return paths


# -------------------------------------------------------------------------------------------- pipeline


def _train(cfg, job: str) -> tuple[dict, float]:
    import gc

    from mdu_dist.trainer import Trainer

    start = time.perf_counter()
    trainer = Trainer(cfg, job)
    metrics = trainer.run()
    del trainer
    gc.collect()
    return metrics, time.perf_counter() - start


def _eval(cfg) -> tuple[dict, float]:
    from mdu_dist.eval.run import evaluate, markdown, write_atomic

    start = time.perf_counter()
    result = evaluate(cfg)
    out = Path(cfg.eval.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "eval.json", json.dumps(result, indent=1, sort_keys=True))
    write_atomic(out / "eval.md", markdown(result))
    return result["metrics"], time.perf_counter() - start


def _say(text: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run_pipeline(d: DemoConfig) -> dict:
    """One rank: fine-tune, twin, unlearn runs, evaluations; returns the results (also written to disk)."""
    from mdu_dist import distributed
    from mdu_dist.checkpoint.steps import latest_checkpoint

    out = Path(d.output_dir)
    t0 = time.perf_counter()
    data = write_data(d, out / "data")
    first = d.job_config("finetune", str(out / "finetune"))
    distributed.init(first.parallel, first.model)
    runs: dict[str, dict] = {}
    try:
        ft_extra = [f"data.finetune={data['finetune_full']}", f"train.epochs={d.finetune_epochs}",
                    f"optim.lr={d.finetune_lr}"]
        _say(f"fine-tuning on {data['finetune_full']} (forget + retain + general rows)")
        cfg = d.job_config("finetune", str(out / "finetune"), ft_extra)
        _, seconds = _train(cfg, "finetune")
        finetuned = latest_checkpoint(out / "finetune" / "checkpoints") / "model"
        tokenizer = out / "finetune" / "tokenizer"
        runs["finetuned"] = {"method": "finetuned", "tau": None, "checkpoint": str(finetuned),
                             "train_seconds": seconds, "run_dir": str(out / "finetune")}

        _say("fine-tuning the retain-only twin (same recipe and tokenizer, no forget rows)")
        cfg = d.job_config("finetune", str(out / "retain_only"),
                           [*ft_extra, f"data.finetune={data['finetune_retain_only']}", f"train.tokenizer={tokenizer}"])
        _, seconds = _train(cfg, "finetune")
        runs["retain-only"] = {"method": "retain-only", "tau": None, "train_seconds": seconds,
                               "checkpoint": str(latest_checkpoint(out / "retain_only" / "checkpoints") / "model"),
                               "run_dir": str(out / "retain_only")}

        jobs = [(f"mdu tau={tau:g}", "mdu", tau) for tau in d.taus] + [(m, m, None) for m in d.methods]
        for name, method, tau in jobs:
            run_dir = out / "unlearn" / name.replace(" ", "_").replace("=", "")
            _say(f"unlearning with {name}")
            cfg = d.job_config(name, str(run_dir), [
                f"train.init={finetuned}", f"data.forget={data['forget']}", f"data.retain={data['retain']}",
                f"method.name={method}", f"train.epochs={d.unlearn_epochs}", f"optim.lr={d.unlearn_lr}",
                *([f"method.tau={tau}"] if tau is not None else [])])
            _, seconds = _train(cfg, "unlearn")
            runs[name] = {"method": method, "tau": tau, "train_seconds": seconds, "run_dir": str(run_dir),
                          "checkpoint": str(latest_checkpoint(run_dir / "checkpoints") / "model")}

        retain_eval = out / "eval" / "retain-only" / "eval.json"
        for name in ["retain-only", *[n for n in runs if n != "retain-only"]]:
            _say(f"evaluating {name}")
            extra = [f"eval.checkpoint={runs[name]['checkpoint']}", f"eval.output_dir={out / 'eval' / _slug(name)}",
                     f"eval.real_authors={data['eval_real_authors']}", f"eval.world_facts={data['eval_world_facts']}"]
            if name != "retain-only":
                extra.append(f"eval.retain_model_eval={retain_eval}")
            metrics, seconds = _eval(d.job_config(name, str(out), extra))
            if name == "retain-only":  # against itself: the KS p-value of identical samples (1)
                from mdu_dist.eval.metrics import forget_quality
                from mdu_dist.eval.run import retain_model_truth_ratios

                tr = retain_model_truth_ratios(str(retain_eval))
                metrics["forget_quality"] = forget_quality(tr, tr)
            runs[name].update(metrics=metrics, eval_seconds=seconds, eval_dir=str(out / "eval" / _slug(name)))
    finally:
        distributed.shutdown()
    result = {"runs": runs, "settings": asdict(d), "total_seconds": time.perf_counter() - t0}
    write_outputs(result, out)
    return result


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("=", "")


# --------------------------------------------------------------------------------------------- outputs

COLUMNS = (("forget ROUGE", "forget_Q_A_ROUGE"), ("forget prob", "forget_Q_A_Prob"),
           ("forget TR", "forget_truth_ratio"), ("forget quality", "forget_quality"),
           ("retain ROUGE", "retain_Q_A_ROUGE"), ("retain prob", "retain_Q_A_Prob"),
           ("retain TR", "retain_Truth_Ratio"), ("real authors ROUGE", "ra_Q_A_ROUGE"),
           ("real authors prob (norm.)", "ra_Q_A_Prob_normalised"), ("world facts ROUGE", "wf_Q_A_ROUGE"),
           ("world facts prob (norm.)", "wf_Q_A_Prob_normalised"), ("model utility", "model_utility"))


def results_markdown(result: dict) -> str:
    from mdu_dist.eval.run import fmt

    s = result["settings"]
    lines = ["# mdu-dist demo: TOFU unlearning with a tiny LLaDA-shaped model on CPU", "",
             f"Forget set: first {s['forget_rows']} rows of forget10; retain set: first {s['retain_rows']} rows of "
             f"retain90; {s['general_rows']} rows each of real_authors and world_facts taught in both fine-tunes. "
             f"Evaluated on the first {s['eval_rows']} rows per split, {s['num_samples']} ELBO samples per answer, "
             f"greedy generation of {s['gen_length']} tokens in {s['steps']} steps. "
             f"Fine-tune: {s['finetune_epochs']} epochs at lr {s['finetune_lr']:g}; unlearning: "
             f"{s['unlearn_epochs']} epochs at lr {s['unlearn_lr']:g}; batch {s['batch_size']}. "
             f"Total time {result['total_seconds'] / 60:.1f} min.", "",
             "| model | " + " | ".join(c for c, _ in COLUMNS) + " | train s |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for name, run in result["runs"].items():
        m = run.get("metrics", {})
        lines.append(f"| {name} | " + " | ".join(fmt(m.get(k)) for _, k in COLUMNS)
                     + f" | {run['train_seconds']:.0f} |")
    lines += ["", "forget quality: KS-test p-value of the forget truth ratios against the retain-only twin's "
              "(1 for the twin itself; higher = closer to never having seen the forget set). model utility: "
              "harmonic mean of the nine retain / real-authors / world-facts numbers."]
    return "\n".join(lines) + "\n"


def _scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def plot_losses(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, run in result["runs"].items():
        scalars = _scalars(run["run_dir"])
        if "lm loss" in scalars:
            steps, values = zip(*scalars["lm loss"])
            line, = axes[0].plot(steps, values, alpha=0.25)
            k = max(1, len(values) // 20)  # the masked-diffusion loss is noisy: a moving average over ~5% of the run
            smooth = [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1])
                      for i in range(len(values))]
            axes[0].plot(steps, smooth, color=line.get_color(), label=f"{name} (moving avg.)")
        for ax, tag in ((axes[1], "unlearn/forget-loss"), (axes[2], "unlearn/retain-loss")):
            if tag in scalars and any(v != 0 for _, v in scalars[tag]):  # GA has no retain term (logged as 0)
                steps, values = zip(*scalars[tag])
                ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
    for ax, title in zip(axes, ("fine-tuning loss", "unlearning: forget loss", "unlearning: retain loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_tradeoff(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    markers = "oDs^v<>Ph"
    for i, (name, run) in enumerate(result["runs"].items()):
        m = run.get("metrics", {})
        u = m.get("model_utility")
        if u is None:
            continue
        # Runs often coincide (several methods at ROUGE 0, utility 0): a legend, not labels on the points.
        style = dict(marker="*" if run["method"] in ("finetuned", "retain-only") else markers[i % len(markers)],
                     s=120, alpha=0.8, color=f"C{i % 10}", label=name)
        for ax, key in ((axes[0], "forget_Q_A_ROUGE"), (axes[1], "forget_quality")):
            if m.get(key) is not None:
                ax.scatter(m[key], u, **style)
    axes[0].set_xlabel("forget ROUGE-L recall (lower = more forgotten)")
    axes[1].set_xlabel("forget quality (KS p-value vs retain-only twin; higher = better)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("model utility")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("forgetting vs utility per method and tau")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    from mdu_dist.eval.run import write_atomic

    write_atomic(out / "results.json", json.dumps(result, indent=1))  # runs in pipeline order
    write_atomic(out / "results.md", results_markdown(result))
    plot_losses(result, out / "loss_curves.png")
    plot_tradeoff(result, out / "forget_vs_utility.png")


def main_demo(path: str | None, overrides: list[str] = (), quick: bool = False) -> int:
    from mdu_dist.launch.local import run_ranks

    d = load_demo_config(path, overrides, quick)
    start = time.perf_counter()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path("build/torch_extensions").absolute()))
    result = run_ranks(run_pipeline, 1, d)[0]
    out = Path(d.output_dir)
    print((out / "results.md").read_text())
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min")
    print(f"table:        {out / 'results.md'}\nnumbers:      {out / 'results.json'}\n"
          f"plots:        {out / 'loss_curves.png'}, {out / 'forget_vs_utility.png'}\n"
          f"evaluations:  {out / 'eval'}/<model>/eval.json, eval.md\n"
          f"TensorBoard:  tensorboard --logdir {out}\n"
          f"checkpoints:  {out}/finetune, {out}/retain_only, {out}/unlearn/<method>/checkpoints")
    return 0 if result["runs"] else 1
