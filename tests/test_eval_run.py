"""``mdu-dist eval`` end to end on a tiny randomly initialised model (one fine-tuning step), on CPU.

- eval.json holds every claimed metric key with values in range, per-item numbers for each split, and eval.md
  is a table of them; forget quality against a retain-model eval.json is a p-value (1 against itself).
- Deterministic and independent of the row limit: each row's ELBO draws are seeded by (seed, split, row).
- Bad input (missing checkpoint, PP > 1, missing retain-model file, bad split name) fails with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mdu_dist.eval.metrics import MODEL_UTILITY_KEYS

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=1000",
        "model.num_attention_heads=4", "model.num_query_groups=4", "model.make_vocab_size_divisible_by=8"]
FAST_EVAL = ["eval.limit=3", "eval.num_samples=2", "eval.gen_length=8", "eval.steps=4", "eval.block_length=8",
             "eval.progress=false"]
KEYS = {"forget_Q_A_ROUGE", "forget_Q_A_ROUGE_f1", "forget_Q_A_Prob", "forget_truth_ratio", "forget_quality",
        "retain_Q_A_ROUGE", "retain_Q_A_ROUGE_f1", "retain_Q_A_Prob", "retain_Truth_Ratio",
        "ra_Q_A_ROUGE", "ra_Q_A_ROUGE_f1", "ra_Q_A_Prob", "ra_Q_A_Prob_normalised", "ra_Truth_Ratio",
        "wf_Q_A_ROUGE", "wf_Q_A_ROUGE_f1", "wf_Q_A_Prob", "wf_Q_A_Prob_normalised", "wf_Truth_Ratio",
        "model_utility"}


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                str(Path("build/torch_extensions").absolute()))}
    proc = subprocess.run([sys.executable, "-m", "mdu_dist.cli", *args], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"mdu-dist {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finetune")
    _cli("finetune", "--config", "configs/llada_tiny.yaml", *TINY, "data.finetune=forget10", "data.limit=8",
         "optim.micro_batch_size=4", "optim.lr=1e-3", "train.max_steps=1", f"train.output_dir={run}")
    return run / "checkpoints" / "step-1" / "model"


@pytest.fixture(scope="module")
def single(checkpoint, tmp_path_factory) -> Path:
    """eval.json of the single-process evaluation: the reference of every other layout."""
    out = tmp_path_factory.mktemp("eval") / "single"
    _cli("eval", "--config", "configs/llada_tiny.yaml", *TINY, *FAST_EVAL, f"eval.checkpoint={checkpoint}",
         f"eval.output_dir={out}")
    return out / "eval.json"


def test_eval_writes_claimed_keys_in_range(checkpoint, single, tmp_path):
    out = single.parent
    result = json.loads(single.read_text())
    metrics = result["metrics"]
    assert set(metrics) == KEYS
    assert metrics["forget_quality"] is None  # no retain-model file given
    for key, value in metrics.items():
        if value is not None:
            assert 0.0 <= value <= 1.0, f"{key}={value} out of [0, 1]"
    for split in ("forget", "retain", "real_authors", "world_facts"):
        items = result["items"][split]
        assert len(items["question"]) == len(items["generation"]) == len(items["truth_ratio"]) == 3
        assert all(nll > 0 for nll in items["answer_nll"])
    assert len(result["items"]["forget"]["wrong_nll"][0]) == 5 and len(result["items"]["real_authors"]["wrong_nll"][0]) == 3
    table = (out / "eval.md").read_text()
    assert "| model utility | `model_utility` |" in table and table.count("\n|") >= 14
    assert not list(out.glob(".*.tmp"))  # written by rename

    # Rows are seeded independently of the limit, so the first two rows of a limit=2 run equal the limit=3 run's.
    again = tmp_path / "again"
    _cli("eval", "--config", "configs/llada_tiny.yaml", *TINY, *FAST_EVAL, "eval.limit=2",
         "eval.splits=[forget,retain,real_authors,world_facts]", f"eval.checkpoint={checkpoint.parent.parent.parent}",
         f"eval.output_dir={again}")
    second = json.loads((again / "eval.json").read_text())
    for split in ("forget", "real_authors"):
        for key in ("answer_nll", "correct_nll", "wrong_nll", "generation"):
            assert second["items"][split][key] == result["items"][split][key][:2], (split, key)
    assert set(MODEL_UTILITY_KEYS) <= set(second["metrics"])


def test_data_parallel_equals_single_process_exactly(checkpoint, single, tmp_path):
    # DP=2: the units are divided over two replicas and gathered; every number must be bitwise the same.
    # Forget quality against the single run's own eval.json: identical truth ratios, so the KS p-value is 1.
    out = tmp_path / "dp2"
    _cli("eval", "--nproc", "2", "--config", "configs/llada_tiny.yaml", *TINY, *FAST_EVAL,
         f"eval.checkpoint={checkpoint}", f"eval.retain_model_eval={single}", f"eval.output_dir={out}")
    want, got = json.loads(single.read_text()), json.loads((out / "eval.json").read_text())
    assert got["layout"] == {"tensor": 1, "data": 2} and want["layout"] == {"tensor": 1, "data": 1}
    assert got["items"] == want["items"]
    assert got["metrics"]["forget_quality"] == 1.0
    assert {k: v for k, v in got["metrics"].items() if k != "forget_quality"} == \
        {k: v for k, v in want["metrics"].items() if k != "forget_quality"}
    assert all(len(v) == 2 for v in got["seconds"].values())  # each replica's time per split


def test_packed_answers_equal_one_sample_per_forward(checkpoint, single, tmp_path):
    # The default run packs the samples of several answers into right-padded forwards; eval.batch_size=1 scores
    # every sample sequence alone, unpadded. Same draws, so the same NLLs up to float32 summation order.
    out = tmp_path / "one-per-forward"
    _cli("eval", "--config", "configs/llada_tiny.yaml", *TINY, *FAST_EVAL, "eval.batch_size=1",
         f"eval.checkpoint={checkpoint}", f"eval.output_dir={out}")
    want, got = json.loads(single.read_text())["items"], json.loads((out / "eval.json").read_text())["items"]
    for split in want:
        a = [want[split]["answer_nll"], want[split]["correct_nll"], *zip(*want[split]["wrong_nll"])]
        b = [got[split]["answer_nll"], got[split]["correct_nll"], *zip(*got[split]["wrong_nll"])]
        for x, y in zip((v for col in a for v in col), (v for col in b for v in col), strict=True):
            assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (split, x, y)
        assert got[split]["generation"] == want[split]["generation"]


@pytest.mark.parametrize("args, message", [
    (["eval.checkpoint=/nonexistent/ckpt"], "checkpoint directory not found"),
    (["eval.checkpoint=CKPT", "parallel.pipeline=2"], "parallel.pipeline=2 is not supported"),
    (["eval.splits=[forget,bogus]"], "eval.splits"),
    (["eval.sampler=origin"], "eval.sampler='origin'"),
    (["eval.checkpoint=CKPT", "eval.limit=2", "eval.retain_model_eval=SINGLE"], "another forget set (3 rows)"),
    (["eval.gen_length=8", "eval.block_length=3"], "eval.gen_length=8 is not a multiple of block_length=3"),
    (["eval.checkpoint=CKPT", "eval.retain_model_eval=/nonexistent/eval.json"], "retain-model eval file not found"),
    (["eval.checkpoint=CKPT", "eval.tokens_per_batch=8"], "eval.tokens_per_batch=8 is smaller than one ELBO sequence"),
    (["eval.tokens_per_batch=0"], "eval.tokens_per_batch=0 must be >= 1"),
    (["eval.checkpoint=CKPT", "eval.sampler=block"], "eval.sampler=block decodes blocks of model.block_size, which is 0"),
])
def test_bad_input_one_line(checkpoint, single, tmp_path, args, message, options=()):
    args = [a.replace("CKPT", str(checkpoint)).replace("SINGLE", str(single)) for a in args]
    proc = _cli("eval", *options, "--config", "configs/llada_tiny.yaml", *TINY, *args, f"eval.output_dir={tmp_path}",
                check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mdu-dist: error:") and message in lines[0], proc.stderr
    assert not (tmp_path / "eval.json").exists()


def test_layout_that_does_not_divide_the_world_one_line(checkpoint, single, tmp_path):
    test_bad_input_one_line(checkpoint, single, tmp_path, [f"eval.checkpoint={checkpoint}", "parallel.tensor=2"],
                            "world size 3 is not a multiple of parallel.tensor=2", options=("--nproc", "3"))


def test_dream_sampler_on_request(checkpoint, tmp_path):
    # A Dream sampler on a LLaDA checkpoint: no block layout is needed (block_length=3 does not divide 8).
    out = tmp_path / "entropy"
    _cli("eval", "--config", "configs/llada_tiny.yaml", *TINY, *FAST_EVAL, "eval.limit=2", "eval.splits=[forget]",
         "eval.sampler=entropy", "eval.block_length=3", f"eval.checkpoint={checkpoint}", f"eval.output_dir={out}")
    result = json.loads((out / "eval.json").read_text())
    assert result["config"]["sampler"] == "entropy"
    assert len(result["items"]["forget"]["generation"]) == 2


@pytest.mark.parametrize("sampler", ["block", "block_edit"])
def test_llada2_block_sampler_on_request(checkpoint, tmp_path, sampler):
    # LLaDA2's samplers decode blocks of model.block_size (block-causal attention); eval.json names the sampler.
    out = tmp_path / sampler
    _cli("eval", "--config", "configs/llada_tiny.yaml", *TINY, *FAST_EVAL, "eval.limit=2", "eval.splits=[forget]",
         f"eval.sampler={sampler}", "model.block_size=4", "eval.threshold=0.5", f"eval.checkpoint={checkpoint}",
         f"eval.output_dir={out}")
    result = json.loads((out / "eval.json").read_text())
    assert result["config"]["sampler"] == sampler and result["config"]["model"]["block_size"] == 4
    assert result["config"]["eval"]["threshold"] == 0.5
    assert len(result["items"]["forget"]["generation"]) == 2 and 0 <= result["metrics"]["forget_Q_A_ROUGE"] <= 1


@pytest.mark.slow
def test_tp2_dp2_equals_tp2_and_tp2_is_close_to_tp1(checkpoint, single, tmp_path):
    results = {}
    for nproc in (2, 4):  # TP=2 x DP=1, TP=2 x DP=2 (4 CPU processes)
        out = tmp_path / f"tp2-n{nproc}"
        _cli("eval", "--nproc", str(nproc), "--config", "configs/llada_tiny.yaml", *TINY, *FAST_EVAL,
             "parallel.tensor=2", f"eval.checkpoint={checkpoint}", f"eval.output_dir={out}")
        results[nproc] = json.loads((out / "eval.json").read_text())
    assert results[4]["layout"] == {"tensor": 2, "data": 2}
    assert results[4]["items"] == results[2]["items"] and results[4]["metrics"] == results[2]["metrics"]
    tp1 = json.loads(single.read_text())
    for split, items in tp1["items"].items():
        for a, b in zip(items["answer_nll"], results[2]["items"][split]["answer_nll"], strict=True):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (split, a, b)
