"""tools/bench_eval.py's projection counts the full TOFU evaluation's work from the bundled files: rows per split,
one ELBO forward per sample of every answer, paraphrase and perturbed answer, ``steps`` forwards per generation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from mdu_dist.data import BUNDLED_TOFU

ROOT = Path(__file__).resolve().parent.parent


def test_full_work_counts_every_answer_of_the_bundled_files():
    spec = importlib.util.spec_from_file_location("bench_eval", ROOT / "tools" / "bench_eval.py")
    bench_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_eval)
    work = bench_eval.full_work(num_samples=128, gen_length=128, steps=256, chars_per_token=4.0, template_tokens=16)
    files = {"forget": "forget10_perturbed", "retain": "retain_perturbed", "real_authors": "real_authors_perturbed",
             "world_facts": "world_facts_perturbed"}
    for split, name in files.items():
        rows = [json.loads(line) for line in (BUNDLED_TOFU / f"{name}.json").read_text().splitlines() if line.strip()]
        answers = 0
        for r in rows:
            wrong = r["perturbed_answer"]
            answers += 1 + len([wrong] if isinstance(wrong, str) else wrong)
            if split in ("forget", "retain") and r["paraphrased_answer"] != r["answer"]:
                answers += 1
        assert work[split]["rows"] == len(rows)
        assert work[split]["elbo_forwards"] == 128 * answers
        assert work[split]["gen_forwards"] == 256 * len(rows)
    assert [work[s]["rows"] for s in files] == [400, 400, 100, 117]  # TOFU's evaluation splits
    # The estimate: roughly 800k likelihood forwards and 260k generation forwards (256 steps).
    assert 780_000 < sum(w["elbo_forwards"] for w in work.values()) < 880_000
    assert sum(w["gen_forwards"] for w in work.values()) == 260_352
