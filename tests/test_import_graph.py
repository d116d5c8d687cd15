"""The package's import graph, read from the source with ``ast``: no module imports itself through others, and
each layer imports only its own layer or those below it.

Every import statement counts, the ones inside functions too: a lazy import is still a dependency, and
deferring it only hides a circle until someone moves the import to the top. Relative imports are resolved;
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. Importing a submodule
runs its package's ``__init__`` first, but that is the interpreter's doing, not an edge of the importing code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mdu_dist

PACKAGE = Path(mdu_dist.__file__).parent

# Low to high. A module may import modules of its own layer or of a lower one. "pkg.*" places every submodule
# of pkg not named elsewhere. The run-config sections that live with their code (data, methods, optim,
# launch.config, eval.config) sit below config, which composes them; so do the kernels they import.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("mdu_dist", "mdu_dist.errors", "mdu_dist.checkpoint.errors", "mdu_dist.cpu_shim", "mdu_dist.numerics",
                "mdu_dist.cpu_kernels",
                "mdu_dist.launch", "mdu_dist.eval")),
    ("sections and kernels", ("mdu_dist.data", "mdu_dist.diffusion", "mdu_dist.layout", "mdu_dist.pipeline",
                              "mdu_dist.monitor", "mdu_dist.losses", "mdu_dist.losses.*", "mdu_dist.methods",
                              "mdu_dist.optim", "mdu_dist.adamw", "mdu_dist.launch.config", "mdu_dist.eval.config",
                              "mdu_dist.eval.likelihood", "mdu_dist.eval.sampler", "mdu_dist.eval.block_sampler",
                              "mdu_dist.eval.metrics", "mdu_dist.models", "mdu_dist.models.arch",
                              "mdu_dist.models.llada", "mdu_dist.models.dream", "mdu_dist.models.llada2",
                              "mdu_dist.models.llada_moe",
                              "mdu_dist.checkpoint.steps")),
    ("config", ("mdu_dist.config",)),
    ("models and processes", ("mdu_dist.models.*", "mdu_dist.distributed", "mdu_dist.launch.local")),
    ("checkpoint", ("mdu_dist.checkpoint", "mdu_dist.checkpoint.*")),
    ("job inputs", ("mdu_dist.inputs",)),
    ("trainer and eval", ("mdu_dist.trainer", "mdu_dist.eval.run", "mdu_dist.eval.report")),
    ("launch", ("mdu_dist.launch.*",)),
    ("cli", ("mdu_dist.cli", "mdu_dist.demo", "mdu_dist.bench", "mdu_dist.plan")),
]


def modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package ``__init__``) for every ``.py`` file under package directory ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module of the same package: line of the first import}."""
    mods = modules(root)
    top = root.name
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_package) in mods.items():
        package = name if is_package else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in mods else source for a in node.names]
            else:
                continue
            for target in targets:
                # ``import a.b.c`` binds a and runs a.b.c: the deepest name that is a module is the dependency.
                while target not in mods and "." in target:
                    target = target.rpartition(".")[0]
                if target in mods and target != name and (target == top or target.startswith(top + ".")):
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle [a, b, ..., a], or None (depth-first search for a back edge)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, int]], root: Path) -> str:
    mods = modules(root)
    return " -> ".join(cycle) + "\n" + "\n".join(
        f"  {a} imports {b} at {mods[a][0].relative_to(root.parent)}:{graph[a][b]}" for a, b in zip(cycle, cycle[1:]))


def layer_of(name: str) -> int:
    for depth, (_, names) in enumerate(LAYERS):
        if name in names:
            return depth
    best = None
    for depth, (_, names) in enumerate(LAYERS):
        for pattern in names:
            if pattern.endswith(".*") and name.startswith(pattern[:-1]):
                if best is None or len(pattern) > len(best[1]):
                    best = (depth, pattern)
    if best is None:
        raise KeyError(name)
    return best[0]


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "mdu_dist.launch.local" in graph["mdu_dist.cli"]  # the graph sees imports inside functions
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + describe(cycle, graph, PACKAGE)


def test_each_layer_imports_only_its_own_or_lower_layers():
    graph = import_graph(PACKAGE)
    unplaced = sorted(m for m in graph if _unplaced(m))
    assert not unplaced, f"modules without a layer in tests/test_import_graph.py LAYERS: {unplaced}"
    mods = modules(PACKAGE)
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]}) at "
              f"{mods[a][0].relative_to(PACKAGE.parent)}:{line}"
              for a, edges in sorted(graph.items()) for b, line in sorted(edges.items())
              if layer_of(b) > layer_of(a)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def _unplaced(name: str) -> bool:
    try:
        layer_of(name)
    except KeyError:
        return True
    return False


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checker_finds_a_circle_closed_by_a_lazy_relative_import(tmp_path):
    root = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nfrom pkg.sub import b\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "from pkg.sub.c import thing\n",
        "pkg/sub/c.py": "def f():\n    from .. import a\n    return a\n",
        "pkg/d.py": "import pkg.a\n",
    })
    graph = import_graph(root)
    assert graph == {"pkg": {}, "pkg.a": {"pkg.sub.b": 2}, "pkg.d": {"pkg.a": 1}, "pkg.sub": {},
                     "pkg.sub.b": {"pkg.sub.c": 1}, "pkg.sub.c": {"pkg.a": 2}}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]
    assert describe(find_cycle(graph), graph, root).splitlines()[3] == "  pkg.sub.c imports pkg.a at pkg/sub/c.py:2"


def test_the_checker_passes_a_diamond(tmp_path):
    root = _write(tmp_path, {
        "pkg/__init__.py": "from pkg.b import x\n",
        "pkg/a.py": "from pkg import b, c\n",
        "pkg/b.py": "from . import d\nx = 1\n",
        "pkg/c.py": "from .d import y\n",
        "pkg/d.py": "y = 2\n",
    })
    graph = import_graph(root)
    assert graph["pkg"] == {"pkg.b": 1} and graph["pkg.a"] == {"pkg.b": 1, "pkg.c": 1}
    assert find_cycle(graph) is None


@pytest.mark.parametrize("name, layer", [("mdu_dist.models.mcore", "models and processes"),
                                         ("mdu_dist.models.arch", "sections and kernels"),
                                         ("mdu_dist.launch.local", "models and processes"),
                                         ("mdu_dist.launch.task", "launch")])
def test_layer_lookup_prefers_the_exact_name_then_the_longest_pattern(name, layer):
    assert LAYERS[layer_of(name)][0] == layer


def test_no_module_imports_another_modules_private_names():
    """What two modules share is public in the module that owns it (docs/design.md, Imports)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.module}.{n}" for n in private]
    assert not found, "private names imported from other modules:\n" + "\n".join(found)
