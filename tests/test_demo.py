"""``mdu-dist demo --quick``: the whole pipeline (pre-train, fine-tune, retain-only twin, MDU + GA/GradDiff/NPO per
seed, eval, table, plots; two replicas of it) on CPU with tiny sizes, producing every output file with the claimed
shape; the same bits again from a second run, and the golden file's on any processor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mdu_dist.demo import load_demo_config
from mdu_dist.errors import ConfigError
from mdu_dist.numerics import cpu_model, numerics_env

# The quick demo's results.json, byte for byte, as any x86-64 processor must write it (the pins of
# mdu_dist/numerics.py). After a change that moves the numbers on purpose: mdu-dist demo --quick
# output_dir=/tmp/q && cp /tmp/q/results.json tests/golden/demo_quick_results.json (say why in the commit).
GOLDEN = Path(__file__).parent / "golden" / "demo_quick_results.json"

MODELS = ["pretrained", "finetuned", "retain-only", "mdu tau=0.5", "ga", "graddiff", "npo", "mdu tau=0.5 lora r=8"]
KEYS = ["replica 0 seed 0", "replica 1 seed 1"]  # --quick: two replicas of seed 0 (+ the replica)


def _quick(out: Path, *overrides: str, **env) -> subprocess.CompletedProcess:
    """Started from an empty directory next to ``out`` (``cd $(mktemp -d) && mdu-dist demo --quick``): the demo
    finds its TOFU rows in the package, not relative to the working directory."""
    cwd = out.parent / f"cwd_{out.name}"
    cwd.mkdir()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                str(Path("build/torch_extensions").absolute())),
           **env}
    proc = subprocess.run([sys.executable, "-m", "mdu_dist.cli", "demo", "--quick", f"output_dir={out}", *overrides],
                          capture_output=True, text=True, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "a"
    return out, _quick(out)


def test_quick_demo_end_to_end(quick_demo):
    out, proc = quick_demo
    for name in ("results.md", "results.json", "run_info.json", "loss_curves.png", "forget_vs_utility.png"):
        assert (out / name).exists(), name
        assert str(out / name) in proc.stdout  # it says where everything is
    result = json.loads((out / "results.json").read_text())
    assert list(result["runs"]) == MODELS
    for name, run in result["runs"].items():
        assert list(run["seeds"]) == KEYS, name
        for key in ("forget_Q_A_ROUGE", "forget_Q_A_Prob", "forget_truth_ratio", "forget_quality", "model_utility",
                    "retain_Q_A_ROUGE", "ra_Q_A_Prob_normalised", "wf_Q_A_Prob_normalised"):
            values = [s["metrics"][key] for s in run["seeds"].values()]
            assert all(0.0 <= v <= 1.0 for v in values), (name, key, values)
            assert run["mean"][key] == pytest.approx(sum(values) / 2)
            assert run["std"][key] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)  # n - 1 = 1
        for s in run["seeds"].values():
            eval_dir = out / s["eval_dir"]
            assert (eval_dir / "eval.json").exists() and (eval_dir / "eval.md").exists()
            # The evaluation of seed N used eval.seed N.
            assert json.loads((eval_dir / "eval.json").read_text())["config"]["eval"]["seed"] == int(
                eval_dir.parent.name.removeprefix("seed"))
        for t in run["seeds"].values():
            assert list((out / t["run_dir"] / "tensorboard").glob("events.out.tfevents.*")), name
            assert (out / t["checkpoint"]).is_dir()
            # Each replica trained everything itself, with its own seed (+ the replica).
            assert t["run_dir"].startswith(f"replica{t['replica']}/") and t["seed"] == t["replica"]
            state = json.loads((out / t["checkpoint"]).parent.joinpath("trainer_state.json").read_text())
            assert state["seed"] == t["replica"], (name, t)
    assert all(s["metrics"]["forget_quality"] == 1.0 for s in result["runs"]["retain-only"]["seeds"].values())
    # MDU with LoRA: its checkpoints are adapters (with the fine-tuned model named as their base), and they moved.
    lora = result["runs"]["mdu tau=0.5 lora r=8"]
    assert lora["method"] == "mdu" and lora["tau"] == 0.5 and lora["lora_rank"] == 8
    from mdu_dist.checkpoint.lora import read_adapters, read_lora_info

    for s in lora["seeds"].values():
        info = read_lora_info(out / s["checkpoint"])
        assert info.lora.rank == 8 and f"/replica{s['replica']}/finetune/checkpoints/step-" in info.base["init"]
        assert any(v.abs().max() > 0 for k, v in read_adapters(info).items() if k.endswith("lora_B"))
    # Each replica fine-tuned its own models: the unlearned runs start from their replica's.
    assert len({s["run_dir"] for s in result["runs"]["finetuned"]["seeds"].values()}) == 2
    table = [ln for ln in (out / "results.md").read_text().splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + len(MODELS) and all(ln.count("|") == table[0].count("|") for ln in table)
    assert "±" in table[1]
    assert "{" not in (out / "results.md").read_text()  # every placeholder of the text filled in
    for png in ("loss_curves.png", "forget_vs_utility.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # The forget set was in the fine-tuning data and not in the twin's, nor in the pre-training corpus; the
    # general rows evaluated were pre-trained on.
    data = {p.stem: json.loads(p.read_text()) for p in (out / "data").glob("*.json")}
    forget = {r["question"] for r in data["forget"]}
    assert forget <= {r["question"] for r in data["finetune_full"]}
    assert not forget & {r["question"] for r in data["finetune_retain_only"] + data["pretrain"]}
    pretrain = {r["question"] for r in data["pretrain"]}
    evaluated = {r["question"] for r in data["eval_real_authors"] + data["eval_world_facts"]}
    assert evaluated <= pretrain
    # The retain set's general rows (one of each split in --quick) are pre-trained rows that are not evaluated.
    general = {r["question"] for r in data["retain"]} - {r["question"] for r in data["finetune_retain_only"][:8]}
    assert len(general) == 2 and general <= pretrain and not general & evaluated
    info = json.loads((out / "run_info.json").read_text())
    assert info["machine"]["threads"] == 1 and info["machine"]["cpu_capability"] == "AVX2"
    # The pins in force, as the worker's libraries report them (MKL's branch: AUTO where it ignored MKL_CBWR).
    assert info["machine"]["mkl_cbwr_branch"] == "COMPATIBLE" and info["machine"]["mkldnn_enabled"] is False
    assert not any(f.startswith("AVX512") or f == "X86_V4" for f in info["machine"]["numpy_dispatch"])


def test_quick_demo_is_bit_reproducible(quick_demo, tmp_path):
    """A second run, started as if on another machine (another thread default, MKL told the CPU has no
    AVX-512) and with every stage in one worker process instead of two side by side, writes the same
    results.json byte for byte: the demo pins threads and kernels itself, and no stage depends on its worker."""
    first, _ = quick_demo
    _quick(tmp_path / "b", "workers=1", OMP_NUM_THREADS="1", MKL_ENABLE_INSTRUCTIONS="AVX2",
           ATEN_CPU_CAPABILITY="default")
    assert (tmp_path / "b" / "results.json").read_bytes() == (first / "results.json").read_bytes()


def first_difference(got, want, path: str = "") -> str | None:
    """The first field (a JSON path) where ``got`` and ``want`` differ, with both values; None if equal."""
    if isinstance(got, dict) and isinstance(want, dict):
        for key in dict.fromkeys([*want, *got]):
            if key not in got or key not in want:
                return f"{path}/{key}: {'missing here' if key not in got else 'not in the golden file'}"
            if (found := first_difference(got[key], want[key], f"{path}/{key}")) is not None:
                return found
        return None if list(got) == list(want) else f"{path}: the keys in another order"
    if isinstance(got, list) and isinstance(want, list):
        for i, (g, w) in enumerate(zip(got, want)):
            if (found := first_difference(g, w, f"{path}/{i}")) is not None:
                return found
        return None if len(got) == len(want) else f"{path}: {len(got)} items here, {len(want)} in the golden file"
    return None if (type(got), got) == (type(want), want) else f"{path}: {got!r} here, {want!r} in the golden file"


def test_first_difference_names_the_field():
    want = {"runs": {"ga": {"mean": {"a": 0.5, "b": [1, 2]}}}, "settings": {"seed": 0}}
    assert first_difference(want, want) is None
    assert first_difference({"runs": {"ga": {"mean": {"a": 0.5000000000000001, "b": [1, 2]}}}, "settings": {
        "seed": 0}}, want) == "/runs/ga/mean/a: 0.5000000000000001 here, 0.5 in the golden file"
    assert first_difference({"runs": {"ga": {"mean": {"a": 0.5, "b": [1, 3]}}}, "settings": {"seed": 0}},
                            want) == "/runs/ga/mean/b/1: 3 here, 2 in the golden file"
    assert first_difference({"runs": want["runs"]}, want) == "/settings: missing here"
    assert first_difference({"settings": {"seed": 0}, "runs": want["runs"]}, want) == ": the keys in another order"


def test_quick_demo_matches_the_golden_file(quick_demo):
    """The same bytes on any x86-64 processor (issue 27: an AMD EPYC moved every number under the earlier pins,
    MKL's AVX2 branch being Intel-only). A failure names the processor, the pins in force and the first field."""
    out, _ = quick_demo
    got = (out / "results.json").read_bytes()
    if got != GOLDEN.read_bytes():
        info = json.loads((out / "run_info.json").read_text())["machine"]
        where = first_difference(json.loads(got), json.loads(GOLDEN.read_text())) or "(formatting only)"
        pytest.fail(f"the quick demo's results.json differs from {GOLDEN.name} on this processor, {cpu_model()!r} "
                    f"(torch {info['torch']}, numpy {info['numpy']}, MKL branch {info.get('mkl_cbwr_branch')}, "
                    f"ATen {info['cpu_capability']}, {info.get('openblas_config')} running its "
                    f"{info.get('openblas_corename')} kernels); first difference at {where}")


def test_numerics_env_pins_every_library():
    assert numerics_env("avx2", 2) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "MKL_DYNAMIC": "FALSE",
                                       "OPENBLAS_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2",
                                       "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                       "NPY_DISABLE_CPU_FEATURES": numerics_env("avx2", 0)["NPY_DISABLE_CPU_FEATURES"],
                                       "OPENBLAS_CORETYPE": "Haswell"}
    assert numerics_env("avx2-intel", 0)["MKL_CBWR"] == "AVX2"
    assert "OPENBLAS_CORETYPE" not in numerics_env("avx2-intel", 0)  # MKL's AVX2 branch does the products
    assert numerics_env("native", 0) == {}


def test_numpy_pin_leaves_no_loop_above_avx2():
    """numpy's float64 exp / log differ between its AVX-512 and AVX2 loops (~5 % of elements on this VM): the pin
    must leave only AVX2-level targets, in the names this numpy knows (a misspelt one is an ImportWarning)."""
    code = ("from mdu_dist.numerics import _numpy_dispatch; from numpy._core._multiarray_umath import "
            "__cpu_features__ as f; print(' '.join(x for x in _numpy_dispatch() if f[x]))")
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": numerics_env("avx2", 0)["NPY_DISABLE_CPU_FEATURES"]}
    proc = subprocess.run([sys.executable, "-W", "error::ImportWarning", "-c", code], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(proc.stdout.split()) <= {"X86_V2", "X86_V3", "AVX", "F16C", "FMA3", "AVX2", "SSE41", "SSE42"}


@pytest.mark.parametrize("override, needle", [
    ("eval_rows=30", "demo.eval_rows=30 is more than forget_rows=20"),
    ("general_rows=0", "demo.general_rows=0 must be >= 1"),
    ("general_rows=99", "demo.general_rows=99 is more than pretrain_rows=24"),
    ("pretrain_author_rows=-1", "demo.pretrain_author_rows=-1 must be >= 0"),
    ("pretrain_author_rows=3590", "demo.retain_rows=20 + pretrain_author_rows=3590 is more than retain90's 3600"),
    ("methods=[mdu]", "'mdu' is not a baseline"),
    ("batch_size=32", "forget_rows=20 is fewer than batch_size=32"),
    ("seeds=[1,1]", "demo.seeds=[1, 1] must be a non-empty list of distinct seeds"),
    ("cpu_isa=avx9", "demo.cpu_isa='avx9' must be one of avx2, avx2-intel, default, native"),
    ("replicas=0", "demo.replicas=0 must be >= 1"),
    ("retain_general_rows=9", "demo.retain_general_rows=9: must be >= 0 and, with general_rows=16, at most "
                              "pretrain_rows=24"),
    ("workers=0", "demo.workers=0 must be >= 1"),
    ("lora_rank=-1", "demo: lora_rank=-1 must be >= 0"),
])
def test_bad_demo_settings_are_named(override, needle):
    with pytest.raises(ConfigError) as e:
        load_demo_config(None, [override])
    assert needle in str(e.value)


def test_the_next_stage_is_the_first_whose_inputs_are_done():
    from mdu_dist.demo import Stage, next_ready

    def stage(key, *after):
        return Stage(key, key, Path(key), [], after=after)

    pending = [stage("pre0"), stage("pre1"), stage("ft0", "pre0"), stage("ev0", "ft0", "tw0"), stage("tw0", "pre0")]
    assert next_ready(pending, {}).key == "pre0"
    assert next_ready(pending[2:], {"pre0"}).key == "ft0"
    assert next_ready(pending[3:], {"pre0"}).key == "tw0"  # ev0 waits on ft0: the later, ready one goes first
    assert next_ready(pending[3:4], {"pre0", "tw0"}) is None
    assert next_ready(pending[3:4], {"ft0", "tw0"}).key == "ev0"


def test_a_failing_stage_stops_the_run_with_its_error(tmp_path):
    """The stage after it never runs; the error names what failed."""
    from mdu_dist.demo import Stage, run_scheduled

    d = load_demo_config(None, [f"output_dir={tmp_path}", "workers=2"], quick=True)
    missing = tmp_path / "no-such-checkpoint"
    bad = Stage("eval broken", "broken", tmp_path / "e", [f"eval.checkpoint={missing}"], seed=0)
    after = Stage("eval after", "after", tmp_path / "f", [f"eval.checkpoint={missing}"], seed=0, after=("eval broken",))
    with pytest.raises(Exception, match="no-such-checkpoint"):
        run_scheduled(d, [bad, after])
    assert not (tmp_path / "f").exists()


def _result(per_replica: dict[int, dict[str, list[dict]]]) -> dict:
    """A results.json-shaped dict: per replica, per model, one metrics dict per seed (method from the name)."""
    runs: dict = {}
    for r, models in per_replica.items():
        for name, seeds in models.items():
            run = runs.setdefault(name, {"method": name.split()[0], "seeds": {}})
            for i, metrics in enumerate(seeds):
                run["seeds"][f"replica {r} seed {r + i}"] = {"replica": r, "seed": r + i, "metrics": metrics}
    return {"runs": runs}


def _m(forget=0.0, utility=0.5, retain=0.9, ra=1.0, wf=1.0):
    return {"forget_Q_A_ROUGE": forget, "model_utility": utility, "retain_Q_A_ROUGE": retain, "ra_Q_A_ROUGE": ra,
            "wf_Q_A_ROUGE": wf}


def test_replica_means_average_each_replicas_seeds():
    from mdu_dist.demo import replica_means

    run = _result({0: {"ga": [_m(utility=1.0)]}, 1: {"ga": [_m(utility=2.0), _m(utility=4.0)]}})["runs"]["ga"]
    assert {r: m["model_utility"] for r, m in replica_means(run).items()} == {0: 1.0, 1: 3.0}


def test_checks_conclude_only_what_every_replica_shows():
    """Replica 0 (one seed) and replica 1 (two seeds, averaged) disagree on the fine-tuned model's memorisation,
    on whether MDU tau=0.5 reaches the twin, and so on the best MDU and its retain ROUGE; the numbers below are
    worked out by hand from the seed values."""
    from mdu_dist.demo import checks

    result = _result({
        0: {"pretrained": [_m()], "finetuned": [_m(forget=0.95)], "retain-only": [_m(forget=0.05)],
            "mdu tau=0.5": [_m(forget=0.02, utility=0.55, retain=0.85, ra=0.95, wf=0.8)],
            "mdu tau=1": [_m(forget=0.0, utility=0.4, retain=0.5)], "ga": [_m(forget=0.0, utility=0.1)]},
        1: {"pretrained": [_m(), _m()], "finetuned": [_m(forget=0.92), _m(forget=0.86)],
            "retain-only": [_m(forget=0.04), _m(forget=0.06)],
            "mdu tau=0.5": [_m(forget=0.2, utility=0.6), _m(forget=0.12, utility=0.6)],
            "mdu tau=1": [_m(forget=0.0, utility=0.5, retain=0.7, ra=0.95, wf=0.7),
                          _m(forget=0.02, utility=0.3, retain=0.8, ra=0.95, wf=0.7)],
            "ga": [_m(forget=0.0, utility=0.2), _m(forget=0.0, utility=0.0)]}})
    assert checks(result) == [
        "Hold in every replica:", "",
        "- mdu tau=1 reaches the twin's forget level (forget ROUGE <= twin + 0.05) (replica 0: 0.000, twin 0.050; "
        "replica 1: 0.010, twin 0.050).",
        "- ga reaches the twin's forget level (forget ROUGE <= twin + 0.05) (replica 0: 0.000, twin 0.050; "
        "replica 1: 0.000, twin 0.050).",
        "- the best MDU keeps real authors ROUGE within 0.1 of the fine-tuned model's (replica 0: mdu tau=0.5 "
        "-0.050; replica 1: mdu tau=1 -0.050).",
        "- the best MDU's model utility is above every baseline's at that level (replica 0: mdu tau=0.5 0.550 vs "
        "ga 0.100; replica 1: mdu tau=1 0.400 vs ga 0.100).", "",
        "Hold in some replicas only (not conclusions):", "",
        "- fine-tuned forget ROUGE >= 0.9: only in replica 0 (replica 0: 0.950; replica 1: 0.890).",
        "- mdu tau=0.5 reaches the twin's forget level (forget ROUGE <= twin + 0.05): only in replica 0 "
        "(replica 0: 0.020, twin 0.050; replica 1: 0.160, twin 0.050).",
        "- mdu tau=0.5 is the best MDU at that level (highest model utility): only in replica 0 (replica 0: "
        "0.550; replica 1: 0.600).",
        "- mdu tau=1 is the best MDU at that level (highest model utility): only in replica 1 (replica 0: 0.400; "
        "replica 1: 0.400).",
        "- the best MDU keeps retain ROUGE within 0.1 of the fine-tuned model's: only in replica 0 (replica 0: "
        "mdu tau=0.5 -0.050; replica 1: mdu tau=1 -0.150).", "",
        "Hold in no replica:", "",
        "- the best MDU keeps world facts ROUGE within 0.1 of the fine-tuned model's: in no replica (replica 0: "
        "mdu tau=0.5 -0.200; replica 1: mdu tau=1 -0.300)."]
