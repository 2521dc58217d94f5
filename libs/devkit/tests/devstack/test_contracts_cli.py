"""``omni contracts check --against REF``: a file, a directory of JSON Schemas or a git ref
(both published forms), breaking changes refused."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from omni_contracts.asyncapi import asyncapi_document, to_yaml
from omni_contracts.schemas import json_schemas, render


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


def _schemas_with_a_till_id(directory: Path) -> None:
    """JSON Schemas of a past contract whose store sale had a ``till_id`` (now removed)."""
    directory.mkdir(parents=True)
    for name, document in json_schemas().items():
        if name == "store.sale.recorded.json":
            document["properties"]["till_id"] = {"type": "string"}
        (directory / name).write_text(render(document))


def test_against_a_git_ref_the_json_schemas_are_judged_too(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/asyncapi.yaml").write_text(to_yaml(asyncapi_document()))
    _schemas_with_a_till_id(tmp_path / "docs/schemas")
    git("add", ".")
    git("-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "commit", "-qm", "v1")
    # The AsyncAPI document at v1 is the code's: only the schemas know of till_id.
    refused = check("HEAD", tmp_path)
    assert refused.returncode == 1
    assert "breaking: store.sale.recorded.till_id: field removed (or renamed)" in refused.stderr

    (tmp_path / "docs/asyncapi.yaml").write_text(to_yaml(_older_with_more_fields()))
    git("commit", "-qam", "v2")
    twice = check("HEAD", tmp_path)
    assert twice.stderr.count("till_id: field removed") == 1, "one line for both forms"


def test_against_a_directory_of_schemas(tmp_path: Path) -> None:
    _schemas_with_a_till_id(tmp_path / "old")
    refused = check(str(tmp_path / "old"), tmp_path)
    assert refused.returncode == 1 and "till_id: field removed" in refused.stderr
    (tmp_path / "current").mkdir()
    for name, document in json_schemas().items():
        (tmp_path / "current" / name).write_text(render(document))
    ok = check(str(tmp_path / "current"), tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "judged docs/schemas/" in ok.stdout
    empty = check(str(tmp_path / "docs-elsewhere"), tmp_path)
    assert empty.returncode == 1
    (tmp_path / "nothing").mkdir()
    none = check(str(tmp_path / "nothing"), tmp_path)
    assert none.returncode == 1 and "has no index.json" in none.stderr
