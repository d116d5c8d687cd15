"""``mdu-dist finetune --help`` / ``unlearn --help`` list the most used keys, one line each, with the defaults the
configuration reference (docs/configuration.md) gives, and point to that reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mdu_dist.cli import main

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
COMMON = ["train.init", "train.output_dir", "train.resume", "parallel.tensor", "parallel.pipeline",
          "optim.zero_stage", "optim.offload_optimizer"]
UNLEARN = ["method.name", "method.tau"]


def readme_defaults() -> dict[str, str]:
    """`key` -> default of each single-key row of the configuration reference's tables."""
    section = REFERENCE.read_text()
    rows = re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| ([^|]+) \|", section, re.M)
    return {key: default.strip().strip("`") for key, default in rows}


def help_text(job: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([job, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("job, keys", [("finetune", COMMON), ("unlearn", COMMON + UNLEARN)])
def test_help_lists_the_most_used_keys_with_the_documented_defaults(job, keys, capsys):
    text = help_text(job, capsys)
    assert "docs/configuration.md" in text
    documented = readme_defaults()
    listed = {}
    for line in text.splitlines():
        match = re.match(r"  ([a-z_]+\.[a-z_]+) +('[^']*'|\S+) +\S", line)
        if match:
            listed[match[1]] = match[2].strip("'") or '""'
    assert list(listed) == keys  # one line each, nothing else (finetune has no method keys)
    for key in keys:
        assert listed[key] == documented[key], key
