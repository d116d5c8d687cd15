"""docs/configuration.md documents every config field (and no field that does not exist): the run config's
sections and the demo's keys, read from the dataclasses."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from mdu_dist.config import Config
from mdu_dist.demo import DemoConfig

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
DEMO_HEADING = "\n## The demo's keys\n"


def documented(text: str) -> set[str]:
    """Keys named in the first column of the tables; ```a.b` / `c``` names a.b and a.c."""
    keys = set()
    for cell in re.findall(r"^\| ([^|]+) \|", text, re.M):
        names = re.findall(r"`([^`]+)`", cell)
        if not names:
            continue  # the header row
        section = names[0].rpartition(".")[0]
        keys |= {names[0], *(n if "." in n or not section else f"{section}.{n}" for n in names[1:])}
    return keys


def test_every_run_config_field_is_documented_and_nothing_else():
    run_part, _ = REFERENCE.read_text().split(DEMO_HEADING, 1)
    fields = {f"{name}.{f.name}" for name, section in vars(Config()).items() for f in dataclasses.fields(section)}
    got = documented(run_part)
    assert not fields - got, f"config fields missing from {REFERENCE}: {sorted(fields - got)}"
    assert not got - fields, f"{REFERENCE} documents keys that are no config field: {sorted(got - fields)}"


def test_every_demo_key_is_documented_and_nothing_else():
    _, demo_part = REFERENCE.read_text().split(DEMO_HEADING, 1)
    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    got = documented(demo_part)
    assert not fields - got, f"demo keys missing from {REFERENCE}: {sorted(fields - got)}"
    assert not got - fields, f"{REFERENCE} documents demo keys that do not exist: {sorted(got - fields)}"
