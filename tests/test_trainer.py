"""The unlearning trainer end to end through the CLI, on CPU processes joined by gloo.

- TP=1, TP=2 and TP=1 x PP=2 runs of MDU from the same weights and seed agree: loss curves (read back from the
  TensorBoard event files, which must hold the documented tags) and final weights (read from the checkpoints)
  to 1e-4.
- A run killed with SIGKILL during training or mid-save, then resumed with ``train.resume=auto``, reproduces
  the uninterrupted loss curve and final weights exactly.
- Bad input fails with one line naming the file / key, before anything is written.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mdu_dist.checkpoint.steps import TRAINER_STATE

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.vocab_size=1000",
        "model.num_attention_heads=4", "model.num_query_groups=4", "model.make_vocab_size_divisible_by=8",
        "data.limit=8", "data.max_length=128", "optim.micro_batch_size=2", "optim.lr=1e-3",
        "optim.warmup_steps=1", "train.seed=3", "method.name=mdu", "method.tau=0.5"]
UNLEARN_TAGS = {"unlearn/forget-loss", "unlearn/retain-loss", "unlearn/kl", "learning-rate", "grad-norm",
                "throughput", "step-time"}


def _cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                str(Path("build/torch_extensions").absolute()))}
    proc = subprocess.run([sys.executable, "-m", "mdu_dist.cli", *args], capture_output=True, text=True, env=env,
                          **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"mdu-dist {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _final_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    from mdu_dist.checkpoint.dist import open_dist_checkpoint

    reader = open_dist_checkpoint(run / "checkpoints" / f"step-{step}" / "model")
    return dict(reader.canonical_tensors())


def test_tp_and_pp_layouts_agree(tmp_path):
    runs = {}
    for name, layout in {"tp1": [], "tp2": ["parallel.tensor=2"], "pp2": ["parallel.pipeline=2"]}.items():
        runs[name] = tmp_path / name
        _cli("unlearn", "--config", "configs/llada_tiny.yaml", *TINY, *layout, "train.max_steps=3",
             f"train.output_dir={runs[name]}")
    reference = _scalars(runs["tp1"])
    assert UNLEARN_TAGS <= set(reference), f"missing TensorBoard tags: {UNLEARN_TAGS - set(reference)}"
    assert [s for s, _ in reference["unlearn/forget-loss"]] == [1, 2, 3]
    want = _final_weights(runs["tp1"], 3)
    for name in ("tp2", "pp2"):
        got = _scalars(runs[name])
        for tag in ("unlearn/forget-loss", "unlearn/retain-loss", "grad-norm"):
            for (s1, a), (s2, b) in zip(reference[tag], got[tag], strict=True):
                assert s1 == s2 and abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"{name} {tag} step {s1}: {a} vs {b}"
        weights = _final_weights(runs[name], 3)
        for key, tensor in want.items():
            assert (weights[key] - tensor).abs().max().item() <= 1e-4, f"{name}: weight {key} differs"
    # The weights moved: the comparison above is not between three untouched initialisations.
    initial = _final_weights(runs["tp1"], 3)["lm_head"]
    assert not torch.equal(initial, torch.zeros_like(initial))


RESUME_ARGS = ["unlearn", "--config", "configs/llada_tiny.yaml", *TINY, "train.max_steps=4", "train.save_every=1"]


# Full-parameter training, and LoRA (whose checkpoints hold the adapters and their optimizer state only).
MODES = {"full": [], "lora": ["lora.rank=4", "lora.alpha=8"]}


def _final_state(run: Path, step: int, mode: str) -> dict[str, torch.Tensor]:
    if mode == "full":
        return _final_weights(run, step)
    from mdu_dist.checkpoint.lora import read_adapters, read_lora_info

    ckpt = run / "checkpoints" / f"step-{step}"
    assert not (ckpt / "model").exists(), "a LoRA checkpoint must not copy the frozen base"
    return read_adapters(read_lora_info(ckpt / "adapter"))


@pytest.fixture(scope="module", params=list(MODES))
def uninterrupted(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"whole-{request.param}")
    _cli(*RESUME_ARGS, *MODES[request.param], f"train.output_dir={out}")
    return request.param, out


# Loaded by every interpreter of the killed run (PYTHONPATH): the rank SIGKILLs its process group just before it
# would rename a fully written .step-3.partial into place -- mid-save at its latest point, without the race of a
# poll that a LoRA save (a few KiB) finishes before.
_KILL_BEFORE_RENAME = """
import os, pathlib, signal
_rename = pathlib.Path.rename
def _rename_or_die(self, target):
    if self.name == ".step-3.partial":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    return _rename(self, target)
pathlib.Path.rename = _rename_or_die
"""


@pytest.mark.parametrize("kill_when", ["training", "saving"])
def test_sigkill_then_resume_replays_exactly(tmp_path, uninterrupted, kill_when):
    """SIGKILL while step 3 trains (step-2 just written) or while step 3 is being saved; then resume."""
    mode, uninterrupted = uninterrupted
    args = [*RESUME_ARGS, *MODES[mode]]
    cut = tmp_path / "cut"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(Path("build/torch_extensions").absolute())}
    if kill_when == "saving":
        hook = tmp_path / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(_KILL_BEFORE_RENAME)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "mdu_dist.cli", *args, f"train.output_dir={cut}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    if kill_when == "saving":
        assert proc.wait(timeout=300) == -signal.SIGKILL
        trigger = cut / "checkpoints" / ".step-3.partial"
        assert (trigger / TRAINER_STATE).exists(), "the kill came before step 3 was fully written"
    else:
        trigger = cut / "checkpoints" / "step-2"
        deadline = time.monotonic() + 300
        while not trigger.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: the CLI and its rank
        proc.wait()
    assert trigger.exists(), f"the run ended before {trigger.name} appeared"
    assert not (cut / "checkpoints" / "step-3").exists()

    _cli(*args, f"train.output_dir={cut}", "train.resume=auto")
    a, b = _scalars(uninterrupted), _scalars(cut)
    for tag in ("unlearn/forget-loss", "unlearn/retain-loss", "grad-norm", "learning-rate"):
        # The killed run may have logged step 3 before dying; the resumed run logs it again (last one wins).
        curve_a, curve_b = dict(a[tag]), dict(b[tag])
        assert sorted(curve_b) == [1, 2, 3, 4]
        assert curve_a == curve_b, f"{tag}: resumed {curve_b} != uninterrupted {curve_a}"
    wa, wb = _final_state(uninterrupted, 4, mode), _final_state(cut, 4, mode)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("overrides,needle", [
    (["data.forget=forget99"], "data source 'forget99': neither a .json/.jsonl file nor a TOFU split"),
    (["parallel.pipeline=2", "optim.zero_stage=3"], "optim.zero_stage=3 cannot be used with parallel.pipeline=2"),
    (["method.name=rmu"], "method.name='rmu' is not a known method"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, overrides, needle):
    out = tmp_path / "run"
    proc = _cli("unlearn", "--config", "configs/llada_tiny.yaml", *TINY, *overrides, f"train.output_dir={out}",
                check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("content,needle", [
    ('{"question": "q1", "answer": "a1"}\n{"question": "q2", "response": "a2"}\n', "forget.jsonl: row 2 has no 'answer'"),
    ("", "forget.jsonl: no rows"),
], ids=["row-without-answer", "empty-forget-set"])
def test_bad_forget_file_is_named(tmp_path, content, needle):
    bad = tmp_path / "forget.jsonl"
    bad.write_text(content)
    out = tmp_path / "run"
    proc = _cli("unlearn", "--config", "configs/llada_tiny.yaml", *TINY, f"data.forget={bad}",
                f"train.output_dir={out}", check=False)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert not out.exists()



def policy_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items() if not k.endswith("_extra_state")}


def _three_steps(output_dir: str, runs: dict[str, list[str]]) -> dict:
    """One rank: for each run (name -> overrides), a Trainer's first three MDU steps. Returns the losses,
    whether a reference was built, the rows of a micro-batch, and the largest difference of each run's final
    policy weights from the first run's (tensors stay in this process)."""
    from mdu_dist import distributed
    from mdu_dist.config import load_config
    from mdu_dist.trainer import Trainer

    def cfg(name):
        return load_config("configs/llada_tiny.yaml", TINY + ["train.max_steps=3", *runs[name],
                                                             f"train.output_dir={output_dir}/{name}"])

    first = next(iter(runs))
    distributed.init(cfg(first).parallel, cfg(first).model)
    try:
        out, base = {}, None
        for name in runs:
            trainer = Trainer(cfg(name), "unlearn")
            initial = policy_weights(trainer)
            # Forward calls per step of the first layer's core attention and MLP: 2 where they are recomputed.
            layer, calls = trainer.policy.module.decoder.layers[0], {"core_attention": 0, "mlp": 0}
            for part in calls:
                getattr(layer.self_attention if part == "core_attention" else layer, part).register_forward_hook(
                    lambda *_, part=part: calls.__setitem__(part, calls[part] + 1))
            metrics = [trainer.train_step(step) for step in range(3)]
            weights = policy_weights(trainer)
            base = base or weights
            mb = trainer._microbatches(0)[0]
            out[name] = {"losses": [(m["forget-loss"], m["retain-loss"]) for m in metrics],
                         "weight_diff": max((weights[k] - base[k]).abs().max().item() for k in base),
                         "moved": min((weights[k] - initial[k]).abs().max().item() for k in weights),
                         "calls_per_step": {k: v / 3 for k, v in calls.items()},
                         "device": str(next(trainer.policy.parameters()).device),
                         "reference_built": trainer.reference is not None, "rows": (mb.n_policy, mb.ids.shape[0])}
        return out
    finally:
        distributed.shutdown()


def test_recomputation_changes_nothing_but_memory(tmp_path):
    from multiproc import run_distributed

    (runs,) = run_distributed(_three_steps, 1, str(tmp_path),
                              {r: [f"train.recompute={r}"] for r in ("none", "selective", "full")})
    want = runs["none"]
    assert want["reference_built"] and want["rows"][0] < want["rows"][1]  # tau = 0.5: an anchor pass
    assert want["losses"][0] != want["losses"][2] and want["moved"] > 1e-4  # every tensor trained
    calls = {name: tuple(r["calls_per_step"].values()) for name, r in runs.items()}  # (core attention, MLP)
    assert calls == {"none": (1, 1), "selective": (2, 1), "full": (2, 2)}, calls
    for name in ("selective", "full"):
        got = runs[name]
        for step, (a, b) in enumerate(zip(want["losses"], got["losses"], strict=True)):
            assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, f"{name} step {step + 1}: {b} vs {a}"
        assert got["weight_diff"] <= 1e-6, f"{name}: final weights differ by {got['weight_diff']}"


def test_mdu_at_tau_zero_builds_no_reference(tmp_path):
    from multiproc import run_distributed

    (runs,) = run_distributed(_three_steps, 1, str(tmp_path), {"tau0": ["method.tau=0"]})
    got = runs["tau0"]
    assert not got["reference_built"], "tau = 0 must not build the frozen reference"
    n_policy, rows = got["rows"]
    assert n_policy == rows, "tau = 0 must run no reference (anchor) rows"
    assert all(math.isfinite(x) for pair in got["losses"] for x in pair)


@pytest.mark.device
def test_mdu_trainer_steps_on_the_device(tmp_path):
    """Three MDU steps on this machine's device (bf16 on CUDA), from question/answer files written here (no TOFU
    folder needed): finite losses, the policy on the GPU where there is one."""
    import json

    from multiproc import run_distributed

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"Who is {i}?", "answer": f"{i} is a name."}) + "\n"
                            for i in range(8)))
    data = [f"data.{part}={rows}" for part in ("finetune", "forget", "retain")]
    (runs,) = run_distributed(_three_steps, 1, str(tmp_path), {"device": data})
    got = runs["device"]
    assert got["device"].startswith("cuda" if torch.cuda.is_available() else "cpu"), got["device"]
    assert got["reference_built"] and all(math.isfinite(x) for pair in got["losses"] for x in pair), got["losses"]


def test_exclude_special_tokens_without_a_list_excludes_the_tokenizers(tmp_path):
    """``method.special_token_ids=[]`` with exclusion on means the tokenizer's special tokens, not none."""
    from multiproc import run_distributed

    from mdu_dist.data import TINY_IDS

    on = ["method.exclude_special_tokens=true"]
    (runs,) = run_distributed(_three_steps, 1, str(tmp_path), {
        "implicit": on, "explicit": [*on, f"method.special_token_ids=[{','.join(map(str, TINY_IDS.values()))}]"],
        "off": []})
    assert runs["implicit"]["losses"] == runs["explicit"]["losses"]
    assert runs["implicit"]["losses"][0][0] != runs["off"]["losses"][0][0]


def _grouped_step_lengths(output_dir: str) -> dict:
    """A fine-tune with data.group_by_length: each step's padded length, and the longest of the rows that
    trainer.step_indices picks for it from the dataset's own lengths."""
    from mdu_dist import distributed
    from mdu_dist.config import load_config
    from mdu_dist.trainer import Trainer, step_indices

    cfg = load_config("configs/llada_tiny.yaml", TINY + ["data.limit=24", "data.group_by_length=true",
                                                         "optim.micro_batch_size=4", "train.max_steps=12",
                                                         f"train.output_dir={output_dir}"])
    distributed.init(cfg.parallel, cfg.model)
    try:
        trainer = Trainer(cfg, "finetune")
        lengths = [len(tokens) for tokens, _ in trainer.data.rows]
        padded, longest = [], []
        for step in range(12):
            padded.append(trainer._microbatches(step)[0].ids.shape[1])
            rows = step_indices(len(lengths), cfg.train.seed, step, 4, 0, 1, lengths)[1]
            longest.append(max(lengths[i] for i in rows))
        return {"padded": padded, "longest": longest, "lengths": lengths}
    finally:
        distributed.shutdown()


def test_group_by_length_reaches_the_trainers_steps(tmp_path):
    from multiproc import run_distributed

    (got,) = run_distributed(_grouped_step_lengths, 1, str(tmp_path))
    assert got["padded"] == got["longest"]
    # Each step pads to its own rows' longest, which grouping keeps near the shortest: over the 12 steps far
    # fewer positions than steps of random rows would (each epoch's 6 steps are cut from the sorted rows).
    assert sum(got["padded"]) < 12 * max(got["lengths"]) and len(set(got["padded"])) > 2, got
