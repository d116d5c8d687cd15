"""Several evaluations in one table and one forget-vs-utility plot: ``mdu-dist report`` and the demo's results.

``runs`` (the structure both share) maps a model's label to ``{"seeds": {seed: {"metrics": {...}, ...}}, "mean":
{...}, "std": {...}}``: one entry per evaluation of that model (a seed), and the mean and sample standard
deviation over them (``aggregate``).

``mdu-dist report PATH...`` finds its eval.json files so: a file is itself; a directory holding ``eval.json`` is
that file; any other directory means every ``eval.json`` below it. A file's label is the path of its directory
relative to the directory argument it was found under, without its ``eval`` components (``<run>/eval/``,
``<run>/eval/step-N/``: what ``mdu-dist launch`` writes); the argument's own name (its parent's if it is
``eval``) when that leaves nothing or the file was given directly. ``--label`` names each argument's files
instead. Files of one label are seeds of one model, and a ``seed<N>`` / ``seed=<N>`` part of a label (a path
component, or a ``_``-joined sweep part as in ``tau=0.5_seed=1``) is dropped from it, so ``seed0/ga`` and
``seed1/ga`` are two seeds of ``ga``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path

from mdu_dist.data import DataError
from mdu_dist.eval.run import fmt, write_atomic

COLUMNS = (("forget ROUGE", "forget_Q_A_ROUGE"), ("forget prob", "forget_Q_A_Prob"),
           ("forget TR", "forget_truth_ratio"), ("forget quality", "forget_quality"),
           ("retain ROUGE", "retain_Q_A_ROUGE"), ("retain prob", "retain_Q_A_Prob"),
           ("retain TR", "retain_Truth_Ratio"), ("real authors ROUGE", "ra_Q_A_ROUGE"),
           ("real authors prob (norm.)", "ra_Q_A_Prob_normalised"), ("world facts ROUGE", "wf_Q_A_ROUGE"),
           ("world facts prob (norm.)", "wf_Q_A_Prob_normalised"), ("model utility", "model_utility"))
SEED = re.compile(r"seed=?(\d+)")
TITLE = "forgetting vs utility per method and tau (small: each seed; large: mean)"


def aggregate(per_seed: list[dict]) -> tuple[dict, dict]:
    """Mean and sample standard deviation (n - 1; 0 for one seed) of every metric over the seeds."""
    mean, std = {}, {}
    for key in per_seed[0]:
        values = [m.get(key) for m in per_seed]
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
            mean[key] = std[key] = None
            continue
        mean[key] = statistics.fmean(values)
        std[key] = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _pm(run: dict, key: str) -> str:
    mean, std = run["mean"].get(key), run["std"].get(key)
    return fmt(mean) if mean is None or len(run["seeds"]) == 1 else f"{fmt(mean)} ± {fmt(std)}"


def table(runs: dict) -> list[str]:
    """The Markdown table: one row per model, mean ± std over its seeds (the mean alone for one seed)."""
    lines = ["| model | " + " | ".join(c for c, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    return lines + [f"| {name} | " + " | ".join(_pm(run, k) for _, k in COLUMNS) + " |" for name, run in runs.items()]


def save_png(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, written to a temporary name and renamed (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(path)


def plot_tradeoff(runs: dict, path: Path, stars: tuple[str, ...] = (), title: str = TITLE) -> None:
    """Model utility against forget ROUGE and against forget quality: each seed a small point, the mean a large
    one; the models in ``stars`` (references such as the fine-tuned model) drawn as stars."""
    # deferred: matplotlib costs ~2 s, and the CLI imports this module for --help
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    markers = "oDs^v<>Ph"
    for i, (name, run) in enumerate(runs.items()):
        # Runs often coincide, hence a legend rather than labels at the points.
        marker = "*" if name in stars else markers[i % len(markers)]
        for ax, key in ((axes[0], "forget_Q_A_ROUGE"), (axes[1], "forget_quality")):
            points = [(s["metrics"][key], s["metrics"]["model_utility"]) for s in run["seeds"].values()
                      if s["metrics"].get(key) is not None and s["metrics"].get("model_utility") is not None]
            if not points:
                continue
            ax.scatter(*zip(*points), marker=marker, s=25, alpha=0.5, color=f"C{i % 10}")
            ax.scatter(statistics.fmean(p[0] for p in points), statistics.fmean(p[1] for p in points),
                       marker=marker, s=140, alpha=0.8, color=f"C{i % 10}", edgecolors="k", label=name)
    axes[0].set_xlabel("forget ROUGE-L recall (lower = more forgotten)")
    axes[1].set_xlabel("forget quality (KS p-value vs retain-only twin; higher = better)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("model utility")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------- mdu-dist report


def find_eval_files(path: Path) -> list[tuple[Path, str]]:
    """(eval.json, label before seed grouping) for one argument of ``mdu-dist report``."""
    if path.is_file():
        return [(path, _name(path.parent))]
    if (path / "eval.json").is_file():
        return [(path / "eval.json", _name(path))]
    found = sorted(path.rglob("eval.json")) if path.is_dir() else []
    if not found:
        raise DataError(f"{path}: no eval.json there or below it" if path.is_dir() else f"{path}: not found")
    return [(f, _label(f.parent.relative_to(path).parts) or _name(path)) for f in found]


def _name(directory: Path) -> str:
    directory = directory.absolute()
    return directory.parent.name if directory.name == "eval" else directory.name


def _label(parts: tuple[str, ...]) -> str:
    return "/".join(p for p in parts if p != "eval")


def split_seed(label: str) -> tuple[str, str | None]:
    """``"seed1/ga"`` -> ``("ga", "1")``, ``"mdu/tau=0.5_seed=2"`` -> ``("mdu/tau=0.5", "2")``; no seed part ->
    ``(label, None)``."""
    seed, components = None, []
    for component in label.split("/"):
        pieces = []
        for piece in component.split("_"):
            m = SEED.fullmatch(piece)
            if m and seed is None:
                seed = m.group(1)
            else:
                pieces.append(piece)
        if pieces:
            components.append("_".join(pieces))
    return "/".join(components), seed


def read_eval(path: Path) -> dict:
    """An eval.json's metrics and the rows of each split it scored; DataError naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
        metrics, items = data["metrics"], data["items"]
        rows = {split: list(v["question"]) for split, v in items.items()}
        if not isinstance(metrics, dict) or not rows:
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise DataError(f"{path}: not a readable eval.json (needs metrics and items.<split>.question)") from None
    return {"metrics": metrics, "rows": rows}


def gather(paths: list[str], labels: list[str] | None = None) -> tuple[dict, dict]:
    """(runs, the rows of each split every file scored) from the arguments of ``mdu-dist report``."""
    if labels and len(labels) != len(paths):
        raise DataError(f"--label given {len(labels)} times for {len(paths)} paths: give one per path or none")
    runs: dict[str, dict] = {}
    reference: tuple[Path, dict] | None = None
    for i, arg in enumerate(paths):
        for file, label in find_eval_files(Path(arg)):
            ev = read_eval(file)
            if reference is None:
                reference = (file, ev["rows"])
            elif ev["rows"] != reference[1]:
                raise DataError(f"{file}: scored other rows ({_rows(ev['rows'])}) than {reference[0]} "
                                f"({_rows(reference[1])}): a table compares models on the same rows")
            name, seed = split_seed(label)
            if labels:
                name = labels[i]
            name = name or Path(arg).absolute().name
            seeds = runs.setdefault(name, {"seeds": {}})["seeds"]
            key = seed if seed is not None else str(file)
            if key in seeds:
                raise DataError(f"{file}: a second evaluation of {name!r} seed {key} (the first: "
                                f"{seeds[key]['eval_json']})")
            seeds[key] = {"eval_json": str(file), "metrics": ev["metrics"]}
    for run in runs.values():
        run["mean"], run["std"] = aggregate([s["metrics"] for s in run["seeds"].values()])
    return runs, reference[1]


def _rows(rows: dict) -> str:
    return ", ".join(f"{split} {len(q)} rows" for split, q in rows.items())


def report_markdown(runs: dict, rows: dict) -> str:
    lines = ["# mdu-dist report", "", f"Rows scored: {_rows(rows)}. Mean ± sample standard deviation over the "
             "seeds of each model (the value alone for one).", "", *table(runs), "", "Sources:", ""]
    lines += [f"- {name}: " + ", ".join(f"{s['eval_json']}" + (f" (seed {k})" if k != s["eval_json"] else "")
                                      for k, s in run["seeds"].items()) for name, run in runs.items()]
    return "\n".join(lines) + "\n"


def cmd_report(args: argparse.Namespace) -> int:
    runs, rows = gather(args.paths, args.label)
    text = report_markdown(runs, rows)
    print(text, end="")
    if args.output:
        out = Path(args.output)
        if out.exists() and not out.is_dir():
            raise DataError(f"--output {out} is a file, not a directory")
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "report.json", json.dumps({"runs": runs, "rows": rows}, indent=1))
        write_atomic(out / "report.md", text)
        plot_tradeoff(runs, out / "forget_vs_utility.png", title="forgetting vs utility (small: each seed; "
                                                                 "large: mean)")
        print(f"report: {out / 'report.md'}, {out / 'report.json'}, {out / 'forget_vs_utility.png'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="several eval.json files in one table (mean ± std over seeds) and a "
                                      "forget-vs-utility plot",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_EVAL_JSON",
                   help="an eval.json, a directory holding one, or a directory to search below")
    p.add_argument("--label", action="append", help="the model's name for each path, in order (all of a path's "
                                                    "files are then seeds of that model)")
    p.add_argument("--output", metavar="DIR", help="also write DIR/report.md, report.json, forget_vs_utility.png")
    p.set_defaults(func=cmd_report)
