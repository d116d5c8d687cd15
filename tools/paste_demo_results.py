#!/usr/bin/env python3
"""Paste a demo's results.md into the README, between its results markers, so the table is never retyped.

    python tools/paste_demo_results.py [runs/demo/results.md] [--check]

``--check`` exits 1 when the README's block differs from the file (nothing is written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results.md of make demo: begin -->", "<!-- results.md of make demo: end -->"


def pasted(readme: str, results: str) -> str:
    """``readme`` with the text between the markers replaced by ``results`` (less its title: the README has one)."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise ValueError(f"README.md must hold one {BEGIN} ... {END} block")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    body = results.strip()
    if body.startswith("# "):
        body = body.split("\n", 1)[1].strip()
    return f"{head}{BEGIN}\n\n{body}\n\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="runs/demo/results.md")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when they differ")
    args = parser.parse_args()
    results, readme = Path(args.results), Path(args.readme)
    if not results.is_file():
        print(f"{results}: not found (run `make demo` first)", file=sys.stderr)
        return 2
    new = pasted(readme.read_text(), results.read_text())
    if args.check:
        same = new == readme.read_text()
        print(f"{readme}: {'holds' if same else 'does not hold'} {results}")
        return 0 if same else 1
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(new)
    tmp.replace(readme)
    print(f"pasted {results} into {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
