"""The versions installed against pyproject.toml's: every runtime and test dependency within its range, and
under ``make test-floors`` (which sets LORAKIT_FLOORS to its pin file) every one at its floor exactly, so
that a green floors run cannot have been a run on newer releases."""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    from pip._vendor import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirements() -> list[Requirement]:
    """[project] dependencies and the test extra: what ``make test`` and ``make test-floors`` install."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


@pytest.mark.parametrize("req", requirements(), ids=str)
def test_installed_version_is_in_range(req: Requirement) -> None:
    found = installed(req.name)
    assert found is not None, f"{req.name} is not installed (make test installs every one of them)"
    assert req.specifier.contains(found, prereleases=True), f"{req.name} {found} is outside {req.specifier}"


@pytest.mark.skipif(not os.environ.get("LORAKIT_FLOORS"), reason="only under `make test-floors`")
def test_floors_run_has_every_floor() -> None:
    pins = {}
    for line in Path(os.environ["LORAKIT_FLOORS"]).read_text().splitlines():
        if line.strip():
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = req
    # Every dependency but torch (only one torch build is at hand) is pinned at its pyproject floor ...
    for req in requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        floors = [s.version for s in req.specifier if s.operator in (">=", "==")]
        assert floors, f"{req} states no floor"
        assert name in pins, f"{req.name} is not pinned by the floors run"
        assert [s.version for s in pins[name].specifier if s.operator == "=="] == floors
    # ... and installed as pinned: nothing resolved past it.
    for name, req in pins.items():
        found = installed(name)
        assert found is not None and req.specifier.contains(found, prereleases=True), (name, found, str(req))
