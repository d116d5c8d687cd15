"""``mdu-dist report``: hand-made eval.json files (written here) -> the table's numbers are the files' values, mean
and sample std over seeds as numpy computes them; the plot is a PNG; bad input is one line naming the file, with
nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mdu_dist.cli import main
from mdu_dist.eval.report import COLUMNS, split_seed

ROWS = {"forget": ["q1", "q2", "q3"], "retain": ["r1", "r2"]}


def write_eval(path: Path, metrics: dict, rows: dict = ROWS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    items = {split: {"question": q, "truth_ratio": [0.5] * len(q)} for split, q in rows.items()}
    path.write_text(json.dumps({"checkpoint": "x", "metrics": metrics, "items": items}))


def random_metrics(rng: np.random.Generator) -> dict:
    return {key: float(rng.uniform(0.01, 1.0)) for _, key in COLUMNS} | {"forget_Q_A_ROUGE_f1": 0.5}


def parse_table(text: str) -> dict[str, dict[str, tuple[float | None, float | None]]]:
    """model -> {column label: (mean, std)} from the Markdown table (std None for a single value)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        values = {}
        for label, cell in zip(header[1:], cells[1:], strict=True):
            mean, _, std = cell.partition(" ± ")
            values[label] = (None if mean == "–" else float(mean), float(std) if std else None)
        table[cells[0]] = values
    return table


@pytest.fixture
def sweep(tmp_path):
    """A tree as the pipeline and the demo write: one model, one with two sweep seeds, one with three seeds."""
    rng = np.random.default_rng(0)
    root = tmp_path / "runs"
    files = {"finetune": [root / "finetune" / "eval" / "eval.json"],
             "mdu/tau=0.5": [root / "mdu" / f"tau=0.5_seed={s}" / "eval" / "eval.json" for s in (0, 1)],
             "ga": [root / f"seed{s}" / "ga" / "eval.json" for s in (0, 1, 2)]}
    metrics = {name: [random_metrics(rng) for _ in paths] for name, paths in files.items()}
    metrics["ga"][1]["forget_quality"] = None  # no retain-model reference for one seed
    for name, paths in files.items():
        for path, m in zip(paths, metrics[name], strict=True):
            write_eval(path, m)
    return root, metrics


def test_table_and_json_are_the_files_numbers_mean_and_std_over_seeds(sweep, tmp_path, capsys):
    root, metrics = sweep
    out = tmp_path / "report"
    assert main(["report", str(root), "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    table = parse_table(stdout)
    assert parse_table((out / "report.md").read_text()) == table  # stdout is the file
    assert sorted(table) == ["finetune", "ga", "mdu/tau=0.5"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["rows"] == ROWS
    for name, per_seed in metrics.items():
        assert len(saved["runs"][name]["seeds"]) == len(per_seed)
        for label, key in COLUMNS:
            values = [m[key] for m in per_seed]
            mean, std = table[name][label]
            if any(v is None for v in values):
                assert (mean, std) == (None, None)
                assert saved["runs"][name]["mean"][key] is None
                continue
            assert mean == pytest.approx(np.mean(values), abs=5e-5)  # printed to 4 decimals
            assert saved["runs"][name]["mean"][key] == pytest.approx(np.mean(values), rel=1e-12)
            if len(values) == 1:
                assert std is None and saved["runs"][name]["std"][key] == 0.0
            else:
                assert std == pytest.approx(np.std(values, ddof=1), abs=5e-5)
                assert saved["runs"][name]["std"][key] == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    assert saved["runs"]["ga"]["seeds"]["2"]["eval_json"] == str(root / "seed2" / "ga" / "eval.json")
    png = (out / "forget_vs_utility.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp file left


def test_labels_name_each_path_and_make_its_files_seeds(sweep, capsys):
    root, metrics = sweep
    assert main(["report", str(root / "finetune" / "eval" / "eval.json"), str(root / "mdu"),
                 "--label", "FT", "--label", "MDU"]) == 0
    table = parse_table(capsys.readouterr().out)
    assert sorted(table) == ["FT", "MDU"]
    values = [m["model_utility"] for m in metrics["mdu/tau=0.5"]]
    assert table["MDU"]["model utility"] == (pytest.approx(np.mean(values), abs=5e-5),
                                             pytest.approx(np.std(values, ddof=1), abs=5e-5))
    # Without --label a directory holding eval.json is named after its run (its `eval` component dropped).
    assert main(["report", str(root / "finetune" / "eval")]) == 0
    assert list(parse_table(capsys.readouterr().out)) == ["finetune"]
    # An eval sweep over seeds of one run (launch writes <run>/eval/seed=<N>): seeds of that run.
    for seed, utility in ((0, 0.25), (1, 0.5)):
        write_eval(root / "other" / "eval" / f"seed={seed}" / "eval.json", {"model_utility": utility})
    assert main(["report", str(root / "other")]) == 0
    assert parse_table(capsys.readouterr().out)["other"]["model utility"] == (0.375, pytest.approx(0.1768,
                                                                                                   abs=1e-4))


@pytest.mark.parametrize("label, expected", [
    ("seed1/ga", ("ga", "1")), ("mdu/tau=0.5_seed=2", ("mdu/tau=0.5", "2")), ("retain_only", ("retain_only", None)),
    ("seeds/x", ("seeds/x", None)), ("name=ga_seed=3_lr=1e-5", ("name=ga_lr=1e-5", "3")),
])
def test_seed_part_of_a_label(label, expected):
    assert split_seed(label) == expected


def _fails(args: list[str], capsys) -> str:
    assert main(["report", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_bad_input_is_one_line_naming_the_file_and_nothing_is_written(sweep, tmp_path, capsys):
    root, _ = sweep
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}: no eval.json there or below it" in _fails([str(root), str(empty), "--output", str(out)],
                                                                  capsys)
    assert f"{tmp_path / 'nope'}: not found" in _fails([str(tmp_path / "nope")], capsys)
    corrupt = tmp_path / "corrupt" / "eval.json"
    corrupt.parent.mkdir()
    corrupt.write_text('{"metrics": {"forget_Q_A_ROUGE": 0.')
    assert f"{corrupt}: not a readable eval.json" in _fails([str(root), str(corrupt), "--output", str(out)], capsys)
    other = tmp_path / "other" / "eval.json"
    write_eval(other, random_metrics(np.random.default_rng(1)), {"forget": ["q1", "q2"], "retain": ["r1", "r2"]})
    err = _fails([str(root), str(other), "--output", str(out)], capsys)
    assert err.startswith(f"mdu-dist: error: {other}: scored other rows (forget 2 rows, retain 2 rows) than ")
    assert "(forget 3 rows, retain 2 rows)" in err
    assert "--label given 1 times for 2 paths" in _fails([str(root), str(other), "--label", "x"], capsys)
    assert not out.exists()
