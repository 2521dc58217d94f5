"""The arrows between our packages point one way (read from the source, no imports run).

- ``omni_contracts`` imports nothing of ours (channel teams install it alone);
- ``omni_common`` (the runtime in the image) never imports ``omni_devkit``;
- no service imports another service;
- services never import ``omni_devkit``, not one module: the developer kit is not in the
  image, so a service module that used it could not be imported there (the benchmarks live
  in the devkit and drive the services from outside).
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES = {p.parents[1].name: p for p in (REPO / "services").glob("*/src/*_service")}
OURS = {"omni_contracts", "omni_common", "omni_devkit", *SERVICES}


def _imports(package: Path) -> Iterator[tuple[Path, str]]:
    """(file, top-level package) for every absolute import in ``package``."""
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield path, node.module.split(".")[0]


def _ours(package: Path) -> set[tuple[str, str]]:
    return {(str(path.relative_to(REPO)), top) for path, top in _imports(package) if top in OURS}


def test_the_services_are_found() -> None:
    assert {"inventory", "order", "customer-profile", "notification", "loyalty"} <= set(SERVICES)


def test_contracts_import_nothing_of_ours() -> None:
    found = _ours(REPO / "libs/contracts/src/omni_contracts")
    assert {(f, t) for f, t in found if t != "omni_contracts"} == set()


def test_the_runtime_never_imports_the_devkit() -> None:
    found = _ours(REPO / "libs/common/src/omni_common")
    assert {(f, t) for f, t in found if t not in ("omni_common", "omni_contracts")} == set()


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_no_service_imports_another(service: str) -> None:
    package = SERVICES[service]
    own = package.name
    arrows = _ours(package)
    assert {(f, t) for f, t in arrows if t.endswith("_service") and t != own} == set()
    devkit = {f for f, t in arrows if t == "omni_devkit"}
    assert devkit == set(), "a service imports the developer kit, which the image lacks"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_benchmarks_are_registered_by_the_devkit_alone(service: str) -> None:
    """A service's package registers no ``omni bench`` command (it would name a module the
    image carries but cannot import); the devkit's ``omni.bench`` entry points do."""
    project = tomllib.loads((REPO / "services" / service / "pyproject.toml").read_text())
    assert "omni.bench" not in project["project"].get("entry-points", {})
    devkit = tomllib.loads((REPO / "libs/devkit/pyproject.toml").read_text())
    assert all(
        module.startswith("omni_devkit.")
        for module in devkit["project"]["entry-points"]["omni.bench"].values()
    )


def test_the_check_sees_an_arrow(tmp_path: Path) -> None:
    """The scanner is not blind: a planted import is found."""
    (tmp_path / "bad.py").write_text("from omni_devkit.cli import app\nimport omni_common.db\n")
    assert {t for _, t in _imports(tmp_path)} == {"omni_devkit", "omni_common"}
