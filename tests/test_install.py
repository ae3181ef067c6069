"""The install respects the user's environment: pyproject.toml declares ranges, constraints.txt pins what CI runs."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _declared() -> list[Requirement]:
    """Every requirement pyproject.toml declares: the dependencies and every extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [Requirement(line) for line in lines]


def _pinned() -> dict[str, Version]:
    """constraints.txt as {name: version}: one `name==version` a line, comments skipped."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pins


def test_pyproject_declares_ranges_not_exact_pins():
    pinned = [str(r) for r in _declared() if any(s.operator in ("==", "===") for s in r.specifier)]
    assert pinned == [], f"pyproject.toml pins {pinned}: declare a range, pin the exact version in constraints.txt"


def test_constraints_pin_torch():
    assert "torch" in _pinned()


def test_every_constrained_version_satisfies_the_declared_ranges():
    pins = _pinned()
    outside = [
        f"{r.name}: constraints.txt has {pins[canonicalize_name(r.name)]}, pyproject.toml declares {r.specifier}"
        for r in _declared()
        if canonicalize_name(r.name) in pins and not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)
    ]
    assert outside == []


def test_every_dev_install_dependency_is_constrained():
    # The README's install is `.[dev]` with -c constraints.txt: every package it names must have a pin there.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {canonicalize_name(Requirement(line).name) for line in [*project["dependencies"], *project["optional-dependencies"]["dev"]]}
    assert sorted(names - set(_pinned())) == []
