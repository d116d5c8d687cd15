"""Check before write: finetune, unlearn and eval refuse bad inputs (a missing init path, a checkpoint of another
architecture, a tokenizer larger than the vocabulary, an output directory that is a file, a prompt too long for
the trained tokenizer) with one line naming the value, and leave no output directory behind.

The CLI is driven in this process (a refusal happens before any rank starts); one case goes through a rank, as
a launcher or the demo runs the trainer, to show the trainer checks before its own first write too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mdu_dist import cli

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=1000",
        "model.num_attention_heads=4", "model.num_query_groups=4", "model.make_vocab_size_divisible_by=8",
        "data.limit=8", "data.max_length=128", "optim.micro_batch_size=2", "train.max_steps=1"]
JOBS = {"finetune": ["finetune", "--config", "configs/llada_tiny.yaml"],
        "unlearn": ["unlearn", "--config", "configs/llada_tiny.yaml"]}


def _model(arch: str, *overrides: str):
    from mdu_dist.config import load_config

    return load_config(f"configs/{arch}_tiny.yaml", [*TINY, *overrides]).model


def _hf_checkpoint(path: Path, cfg) -> Path:
    from mdu_dist.checkpoint.hf import save_hf_checkpoint
    from mdu_dist.models.dense import init_weights, to_hf

    return save_hf_checkpoint(path, cfg, to_hf(cfg, init_weights(cfg, seed=0)))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from mdu_dist.data import build_tokenizer, load_pairs

    root = tmp_path_factory.mktemp("inputs")
    texts = [f"{qa.question} {qa.answer}" for qa in load_pairs("forget01", "")]
    build_tokenizer(texts, 600, root / "tok600")
    return {"dream": _hf_checkpoint(root / "dream", _model("dream")),
            "llada300": _hf_checkpoint(root / "llada300", _model("llada", "model.vocab_size=300")),
            "tok600": root / "tok600"}


def _refused(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mdu-dist: error: "), err
    return lines[0]


CASES = {  # name -> (overrides, what the one line must say); FILES[...] and OUT are filled in
    "missing-init": (["train.init=/nonexistent/ckpt"], "train.init=/nonexistent/ckpt: checkpoint directory not found"),
    "dream-init-for-llada": (["train.init={dream}"],
                             "train.init={dream}: the checkpoint has arch='dream' but model.arch='llada' is set"),
    "tokenizer-larger-than-vocab": (["train.tokenizer={tok600}", "model.vocab_size=300"],
                                    "tokenizer {tok600} has 600 tokens, more than model.vocab_size=300"),
    "prompt-too-long-for-trained-tokenizer": (["data.max_length=8"], "does not fit data.max_length=8"),
}


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("case", CASES)
def test_train_jobs_refuse_before_writing(files, tmp_path, capsys, job, case):
    overrides, needle = CASES[case]
    out = tmp_path / "run"
    line = _refused(capsys, [*JOBS[job], *TINY, *[o.format(**files) for o in overrides],
                             f"train.output_dir={out}"])
    assert needle.format(**files) in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("job", JOBS)
def test_output_dir_that_is_a_file(tmp_path, capsys, job):
    out = tmp_path / "run"
    out.write_text("mine")
    line = _refused(capsys, [*JOBS[job], *TINY, f"train.output_dir={out}"])
    assert f"train.output_dir={out} is a file, not a directory" in line
    below = _refused(capsys, [*JOBS[job], *TINY, f"train.output_dir={out}/sub"])
    assert f"train.output_dir={out}/sub: {out} is a file, so the directory cannot be created" in below
    assert out.read_text() == "mine" and sorted(tmp_path.iterdir()) == [out]


EVAL_CASES = {
    "dream-checkpoint-for-llada": (["eval.checkpoint={dream}"],
                                   "eval.checkpoint={dream}: the checkpoint has arch='dream' but model.arch='llada'"),
    "tokenizer-larger-than-vocab": (["eval.checkpoint={llada300}", "eval.tokenizer={tok600}", "model.vocab_size=300"],
                                    "tokenizer {tok600} has 600 tokens, more than model.vocab_size=300"),
    "missing-tokenizer": (["eval.checkpoint={llada300}", "model.vocab_size=300"],
                          "{llada300}: no tokenizer in the checkpoint; set eval.tokenizer"),
}


@pytest.mark.parametrize("case", EVAL_CASES)
def test_eval_refuses_before_writing(files, tmp_path, capsys, case):
    overrides, needle = EVAL_CASES[case]
    out = tmp_path / "eval"
    line = _refused(capsys, ["eval", "--config", "configs/llada_tiny.yaml", *TINY,
                             *[o.format(**files) for o in overrides], f"eval.output_dir={out}"])
    assert needle.format(**files) in line
    assert not out.exists()


def test_eval_output_dir_that_is_a_file(files, tmp_path, capsys):
    out = tmp_path / "eval"
    out.write_text("mine")
    line = _refused(capsys, ["eval", "--config", "configs/llada_tiny.yaml", *TINY, "model.vocab_size=300",
                             f"eval.checkpoint={files['llada300']}", f"eval.tokenizer={files['tok600']}",
                             f"eval.output_dir={out}"])
    assert f"eval.output_dir={out} is a file, not a directory" in line
    assert out.read_text() == "mine"


def test_the_trainer_itself_checks_before_its_first_write(tmp_path):
    """The issue's case: the init path used to be refused only after ``<output_dir>/tokenizer`` was written."""
    from mdu_dist.checkpoint.errors import CheckpointError
    from mdu_dist.launch.local import run_ranks
    from mdu_dist.config import load_config
    from mdu_dist.trainer import run_job

    out = tmp_path / "run"
    cfg = load_config("configs/llada_tiny.yaml", [*TINY, "train.init=/nonexistent/ckpt", f"train.output_dir={out}"])
    with pytest.raises(CheckpointError, match="train.init=/nonexistent/ckpt: checkpoint directory not found"):
        run_ranks(run_job, 1, cfg, "unlearn")
    assert not out.exists()
