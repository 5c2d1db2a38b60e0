"""Pip constraints that pin each dependency of pyproject.toml to its declared floor (``name>=X`` -> ``name==X``),
so that CI tests the lowest versions the project claims to work with, not only the newest.

torch is the exception: its floor has no build on this CI's disk (and PyPI's torchvision fails beside the CPU
wheel that is there), so it is pinned to the torch/torchvision pair the machine holds; its floor stays untested.

The floors are those of the CI's Python, 3.11: numpy 1.24 and Pillow 10.1 have no wheels for 3.12 and later,
where the lowest versions that install are higher (pip builds no old sdist there).
"""

from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement  # pytest's own dependency: in the venv that runs this

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the project's own dependency
    import tomli as tomllib

#: Versions used instead of the floor, and why: see the module's docstring.
OVERRIDES = {"torch": "2.14.1", "torchvision": "0.29.1"}


def constraints(pyproject: Path) -> list[str]:
    lines, names = [], set()
    for text in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue  # not installed on this Python (tomli from 3.11 on)
        floors = [s.version for s in requirement.specifier if s.operator == ">="]
        if len(floors) != 1 or len(requirement.specifier) != 1:
            raise SystemExit(f"{pyproject}: {text!r} is not of the form name>=X (a floor alone, which CI installs "
                             f"to test it): give its floor")
        name = requirement.name.lower()
        names.add(name)
        lines.append(f"{requirement.name}=={OVERRIDES.get(name, floors[0])}")
    return lines + [f"{name}=={version}" for name, version in OVERRIDES.items() if name not in names]


if __name__ == "__main__":
    print("\n".join(constraints(Path(__file__).resolve().parents[1] / "pyproject.toml")))
