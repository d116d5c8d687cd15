"""``python tools/wheel_pins.py REQUIREMENTS TARGET_PYTHON``: print ``name==version`` for every package the
requirements need, transitively, at the versions installed in this interpreter's environment, leaving out torch
and everything torch requires (a GPU image brings its own). Markers are evaluated for Linux x86_64 and
CPython TARGET_PYTHON (e.g. 3.12)."""

import re
import sys
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def requirements(path: str) -> list[str]:
    lines = (line.split("#")[0].strip() for line in open(path))
    return [line for line in lines if line]


def closure(roots: list[str], env: dict) -> dict[str, str]:
    """canonical name -> installed version of ``roots`` and their dependencies (no extras)."""
    seen: dict[str, str] = {}
    todo = [canonicalize_name(Requirement(r).name) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{name} is not installed in {sys.prefix}: install the project there first")
        seen[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def main() -> None:
    path, target = sys.argv[1], sys.argv[2]
    if not re.fullmatch(r"3\.\d+", target):
        sys.exit(f"target python {target!r} is not of the form 3.N")
    env = {**default_environment(), "python_version": target, "python_full_version": f"{target}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    wanted = closure(requirements(path), env)
    torch_side = closure(["torch"], env)
    for name, version in sorted(wanted.items()):
        if name not in torch_side:
            print(f"{name}=={version}")


if __name__ == "__main__":
    main()
