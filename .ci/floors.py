"""Pip constraints that pin each dependency of pyproject.toml to its declared floor (``name>=X`` -> ``name==X``),
so that CI tests the lowest versions the project claims to work with, not only the newest.

torch is the exception: its floor has no build on this CI's disk (and PyPI's torchvision fails beside the CPU
wheel that is there), so it is pinned to the torch/torchvision pair the machine holds; its floor stays untested.

The floors are those of the CI's Python, 3.11: numpy 1.24 and Pillow 10.1 have no wheels for 3.12 and later,
where the lowest versions that install are higher (pip builds no old sdist there).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the project's own dependency
    import tomli as tomllib

#: Versions used instead of the floor, and why: see the module's docstring.
OVERRIDES = {"torch": "2.14.1", "torchvision": "0.29.1"}


def constraints(pyproject: Path) -> list[str]:
    lines = []
    for requirement in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        spec, _, marker = requirement.partition(";")
        if marker.strip() and "python_version < '3.11'" in marker and sys.version_info >= (3, 11):
            continue  # (tomli) not installed here
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)\s*", spec)
        if match is None:
            raise SystemExit(f"{pyproject}: {requirement!r} is not of the form name>=X (a floor alone, which "
                             f"CI installs to test it): give its floor")
        name, floor = match.groups()
        lines.append(f"{name}=={OVERRIDES.get(name.lower(), floor)}")
    lines += [f"{name}=={version}" for name, version in OVERRIDES.items() if not any(l.startswith(f"{name}==") for l in lines)]
    return lines


if __name__ == "__main__":
    print("\n".join(constraints(Path(__file__).resolve().parents[1] / "pyproject.toml")))
