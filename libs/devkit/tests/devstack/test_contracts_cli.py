"""``omni contracts check --against REF``: a file or a git ref, breaking changes refused."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from omni_contracts.asyncapi import asyncapi_document, to_yaml


def check(against: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omni_devkit.cli", "contracts", "check", "--against", against],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def _older_with_fewer_fields() -> dict[str, Any]:
    """A past contract that lacked an optional field the code has now (additive)."""
    doc = copy.deepcopy(asyncapi_document())
    doc["components"]["schemas"]["SaleRecorded"]["properties"].pop("terminal_id")
    return doc


def _older_with_more_fields() -> dict[str, Any]:
    """A past contract with a field the code no longer has (a removal: breaking)."""
    doc = copy.deepcopy(asyncapi_document())
    doc["components"]["schemas"]["SaleRecorded"]["properties"]["till_id"] = {"type": "string"}
    doc["channels"]["store.sales.v1"]["x-key"] = "sale_id"
    return doc


def test_against_a_file(tmp_path: Path) -> None:
    additive = tmp_path / "old.yaml"
    additive.write_text(to_yaml(_older_with_fewer_fields()))
    ok = check(str(additive), tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "ok: store.sale.recorded.terminal_id: optional field added" in ok.stdout
    assert "compatible with" in ok.stdout

    breaking = tmp_path / "older.yaml"
    breaking.write_text(to_yaml(_older_with_more_fields()))
    refused = check(str(breaking), tmp_path)
    assert refused.returncode == 1
    assert "breaking: store.sale.recorded.till_id: field removed (or renamed)" in refused.stderr
    assert "key changed from 'sale_id' to 'location_id'" in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: 2 breaking change(s)")


def test_against_a_git_ref(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/asyncapi.yaml").write_text(to_yaml(_older_with_more_fields()))
    git("add", ".")
    git("-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "commit", "-qm", "v1")
    git("tag", "v1")
    refused = check("v1", tmp_path)
    assert refused.returncode == 1 and "till_id: field removed" in refused.stderr
    missing = check("no-such-ref", tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: 'no-such-ref' is neither a file nor a git ref")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_the_committed_document_loads() -> None:
    committed = Path(__file__).resolve().parents[4] / "docs" / "asyncapi.yaml"
    assert yaml.safe_load(committed.read_text())["asyncapi"] == "3.0.0"
