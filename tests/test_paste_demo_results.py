"""tools/paste_demo_results.py: the README's results block is replaced by a results.md, nothing else moves."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "paste_demo_results.py"
spec = importlib.util.spec_from_file_location("paste_demo_results", TOOL)
paste = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paste)


def test_the_block_is_replaced_and_its_title_dropped():
    readme = f"# Title\n\nbefore\n\n{paste.BEGIN}\n\nold table\n\n{paste.END}\n\nafter\n"
    results = "# mdu-dist demo: title\n\nSetup.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    assert paste.pasted(readme, results) == (f"# Title\n\nbefore\n\n{paste.BEGIN}\n\nSetup.\n\n| a | b |\n|---|---|\n"
                                             f"| 1 | 2 |\n\n{paste.END}\n\nafter\n")


def test_a_readme_without_one_block_is_refused():
    with pytest.raises(ValueError, match="must hold one"):
        paste.pasted("no markers here\n", "x")
    with pytest.raises(ValueError, match="must hold one"):
        paste.pasted(f"{paste.END}\n{paste.BEGIN}\n", "x")


def test_the_readme_holds_a_results_block():
    text = (TOOL.parent.parent / "README.md").read_text()
    block = text.split(paste.BEGIN, 1)[1].split(paste.END, 1)[0]
    assert "| model | forget ROUGE |" in block and "## Checks (each replica's seed means)" in block
