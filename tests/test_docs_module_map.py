"""The module map (docs/design.md) matches the tree: every path it names exists, and every top-level entry and
every module of the package is covered by a row."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout_paths() -> list[Path]:
    """The paths of the first column; ``a/b.py``, ``c.py`` names ``a/b.py`` and ``a/c.py``."""
    section = (ROOT / "docs" / "design.md").read_text().split("\n## Module map\n", 1)[1].split("\n## ", 1)[0]
    paths = []
    for cell in re.findall(r"^\| ([^|]+) \|", section, re.M)[2:]:  # past the header and its rule
        names = re.findall(r"`([^`]+)`", cell)
        first = Path(names[0].rstrip("/"))
        paths += [first] + [first.parent / n for n in names[1:]]
    return paths


def tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [Path(line) for line in out.splitlines() if (ROOT / line).exists()]


def test_every_path_in_the_layout_table_exists():
    missing = [str(p) for p in layout_paths() if not (ROOT / p).exists()]
    assert not missing, f"the module map (docs/design.md) names paths that do not exist: {missing}"


def test_every_top_level_entry_and_package_module_has_a_row():
    rows = layout_paths()

    def covered(path: Path) -> bool:  # a row for it, for a directory above it or (top level) for a file in it
        return any(path == r or r in path.parents or (len(path.parts) == 1 and path in r.parents) for r in rows)

    files = tracked()
    top = sorted({Path(f.parts[0]) for f in files if not f.parts[0].startswith(".")} - {Path("README.md")})
    modules = [f for f in files if f.parts[0] == "mdu_dist" and f.suffix == ".py"]
    uncovered = [str(p) for p in [*top, *modules] if not covered(p)]
    assert not uncovered, f"not in the module map (docs/design.md): {uncovered}"
