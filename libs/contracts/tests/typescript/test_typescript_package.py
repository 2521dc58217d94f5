"""The TypeScript package (``libs/contracts/typescript``, ``@omni/contracts``) in the suite.

Its generated types are the committed JSON Schemas' (the TypeScript side of the contract
gate), and ``npm test`` passes: ``tsc --strict`` over the package, its tests and the round
trip program, then the tests. Skipped without ``node``; the dependencies come from the lock
file through ``make test`` (``npm ci``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "typescript"


@pytest.fixture(scope="module")
def npm() -> str:
    """The ``npm`` to run, once the package's dependencies are installed."""
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        pytest.skip("node and npm are not on this machine: the TypeScript package needs them")
    if not (PACKAGE / "node_modules" / ".package-lock.json").is_file():
        pytest.fail(f"{PACKAGE}/node_modules is missing: run `make test`, or `npm ci` there")
    return npm


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=PACKAGE, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_committed_typescript_is_the_schemas(npm: str) -> None:
    checked = run(npm, "run", "--silent", "check-generated")
    assert checked.returncode == 0, checked.stderr + checked.stdout


def test_npm_test_type_checks_strictly_and_passes(npm: str) -> None:
    tested = run(npm, "test")
    assert tested.returncode == 0, tested.stdout[-6000:] + tested.stderr[-3000:]
    assert "# fail 0" in tested.stdout
