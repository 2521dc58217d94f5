"""The contract gate: the committed AsyncAPI document and JSON Schemas are the code's, and
breaking changes are refused while additive ones pass (each kind on a real event of the
catalogue)."""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from omni_contracts import EVENT_TYPES, TOPICS
from omni_contracts.asyncapi import asyncapi_document, to_yaml
from omni_contracts.compat import compare, schemas_document
from omni_contracts.schemas import (
    INDEX,
    json_schemas,
    read_schemas,
    render,
    schema_file,
    stale_files,
    write_schemas,
)

DOCS = Path(__file__).resolve().parents[4] / "docs"
COMMITTED = DOCS / "asyncapi.yaml"
COMMITTED_SCHEMAS = DOCS / "schemas"


@pytest.fixture(scope="module")
def contract() -> dict[str, Any]:
    return asyncapi_document()


def test_the_committed_contract_is_the_codes(contract: dict[str, Any]) -> None:
    committed = COMMITTED.read_text() if COMMITTED.is_file() else ""
    assert committed == to_yaml(contract), (
        "docs/asyncapi.yaml differs from the contract in the code: run `make contracts` "
        "(omni docs asyncapi --output docs/asyncapi.yaml) and commit it, after "
        "`omni contracts check --against main` says the change is compatible"
    )


def test_the_code_is_compatible_with_the_committed_contract(contract: dict[str, Any]) -> None:
    result = compare(yaml.safe_load(COMMITTED.read_text()), contract)
    assert result.breaking == []


def _schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = doc["components"]["schemas"][name]
    return schema


def _changed(contract: dict[str, Any], edit: Any) -> dict[str, Any]:
    new = copy.deepcopy(contract)
    edit(new)
    return new


def test_unchanged_is_compatible(contract: dict[str, Any]) -> None:
    result = compare(contract, copy.deepcopy(contract))
    assert result.compatible and result.additive == []


@pytest.mark.parametrize(
    ("kind", "edit", "expected"),
    [
        (
            "field removed",
            lambda d: _schema(d, "SaleRecorded")["properties"].pop("terminal_id"),
            "store.sale.recorded.terminal_id: field removed",
        ),
        (
            "field renamed",
            lambda d: _schema(d, "SaleRecorded")["properties"].__setitem__(
                "till_id", _schema(d, "SaleRecorded")["properties"].pop("terminal_id")
            ),
            "store.sale.recorded.terminal_id: field removed",
        ),
        (
            "type changed",
            lambda d: _schema(d, "Line")["properties"].__setitem__("qty", {"type": "string"}),
            "store.sale.recorded.lines.qty: type changed from integer to string",
        ),
        (
            "field made required",
            lambda d: _schema(d, "SaleRecorded")["required"].append("customer_id"),
            "store.sale.recorded.customer_id: field made required",
        ),
        (
            "new required field",
            lambda d: (
                _schema(d, "AvailabilityChanged")["properties"].__setitem__(
                    "warehouse_zone", {"type": "string"}
                ),
                _schema(d, "AvailabilityChanged")["required"].append("warehouse_zone"),
            ),
            "inventory.availability.changed.warehouse_zone: new field is required",
        ),
        (
            "event type removed",
            lambda d: d["channels"]["order.lifecycle.v1"]["messages"].pop("order.delayed"),
            "event type order.delayed removed from order.lifecycle.v1",
        ),
        (
            "topic key changed",
            lambda d: d["channels"]["store.sales.v1"].__setitem__("x-key", "sale_id"),
            "topic store.sales.v1: key changed from 'location_id' to 'sale_id'",
        ),
        (
            "enum value removed",
            lambda d: _schema(d, "AvailabilityStatus")["enum"].remove("low_stock"),
            "values removed: ['low_stock']",
        ),
        (
            "topic removed",
            lambda d: d["channels"].pop("cart.abandoned.v1"),
            "topic cart.abandoned.v1 removed",
        ),
    ],
)
def test_breaking_changes_are_refused(
    contract: dict[str, Any], kind: str, edit: Any, expected: str
) -> None:
    result = compare(contract, _changed(contract, edit))
    assert not result.compatible, kind
    assert any(expected in change for change in result.breaking), result.breaking


@pytest.mark.parametrize(
    ("kind", "edit", "expected"),
    [
        (
            "optional field added",
            lambda d: _schema(d, "SaleRecorded")["properties"].__setitem__(
                "basket_id", {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}
            ),
            "store.sale.recorded.basket_id: optional field added",
        ),
        (
            "event type added",
            lambda d: (
                d["channels"]["order.lifecycle.v1"]["messages"].__setitem__(
                    "order.gift_wrapped", {"$ref": "#/components/messages/order.gift_wrapped"}
                )
                or d["components"]["messages"].__setitem__(
                    "order.gift_wrapped", d["components"]["messages"]["order.delivered"]
                )
            ),
            "event type order.gift_wrapped added to order.lifecycle.v1",
        ),
        (
            "enum value added",
            lambda d: _schema(d, "AvailabilityStatus")["enum"].append("discontinued"),
            None,
        ),
    ],
)
def test_additive_changes_pass(
    contract: dict[str, Any], kind: str, edit: Any, expected: str | None
) -> None:
    # Compare the smaller (older) document to the larger (newer) one.
    result = compare(contract, _changed(contract, edit))
    assert result.compatible, (kind, result.breaking)
    if expected:
        assert expected in result.additive


def test_every_topic_says_its_key(contract: dict[str, Any]) -> None:
    for name, channel in contract["channels"].items():
        if not name.endswith(".dlq"):
            assert channel["x-key"], name


# -- the JSON Schemas (docs/schemas/) --------------------------------------------------------


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict[str, Any]]:
    return json_schemas()


def _event_schemas(files: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [document for name, document in files.items() if name != INDEX]


def test_the_committed_json_schemas_are_the_codes() -> None:
    problems = stale_files(COMMITTED_SCHEMAS)
    assert problems == [], (
        "docs/schemas/ differs from the contract in the code: run `make contracts` "
        "(python -m omni_contracts.schemas --output docs/schemas) and commit it:\n"
        + "\n".join(problems)
    )


def test_the_schemas_say_what_the_asyncapi_document_says(
    contract: dict[str, Any], schemas: dict[str, dict[str, Any]]
) -> None:
    # Both come from one payload schema: the gate finds no change either way.
    as_document = schemas_document(_event_schemas(schemas))
    for old, new in ((contract, as_document), (as_document, contract)):
        result = compare(old, new)
        assert (result.breaking, result.additive) == ([], [])


def test_one_labelled_2020_12_schema_per_event_type(schemas: dict[str, dict[str, Any]]) -> None:
    assert set(schemas) == {schema_file(ce_type) for ce_type in EVENT_TYPES} | {INDEX}
    for ce_type, model in EVENT_TYPES.items():
        schema = schemas[schema_file(ce_type)]
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"] == f"urn:omni:event:{ce_type}"
        assert schema["title"] == model.__name__
        docstring = inspect.cleandoc(model.__doc__ or "").replace("``", "`")
        assert schema["description"] == docstring
        assert (schema["x-ce-type"], schema["x-topic"], schema["x-key"]) == (
            ce_type,
            model.topic,
            model.key_field,
        )
        assert list(schema["properties"]) == list(model.model_fields), "model field order"


def test_the_index_maps_topics_to_keys_event_types_and_files(
    schemas: dict[str, dict[str, Any]],
) -> None:
    index = json.loads(render(schemas[INDEX]))["topics"]
    assert list(index) == sorted(TOPICS)
    for name, spec in TOPICS.items():
        assert index[name]["key"] == spec.key
        assert index[name]["direction"] == spec.direction
        assert index[name]["events"] == {t: f"{t}.json" for t in spec.events}
        assert list(index[name]["events"]) == sorted(spec.events)


def test_files_are_canonical(schemas: dict[str, dict[str, Any]]) -> None:
    for document in schemas.values():
        text = render(document)
        assert text.endswith("}\n") and render(json.loads(text)) == text
    schema = json.loads(render(schemas["store.sale.recorded.json"]))
    assert list(schema)[:3] == ["$defs", "$id", "$schema"], "keywords sorted"
    assert list(schema["properties"])[:2] == ["sale_id", "location_id"], "fields in model order"


def test_stale_missing_and_leftover_files_are_named(tmp_path: Path) -> None:
    assert write_schemas(tmp_path)  # a fresh directory: everything written
    assert stale_files(tmp_path) == [] and write_schemas(tmp_path) == []
    (tmp_path / "order.placed.json").write_text("{}\n")
    (tmp_path / "order.gift_wrapped.json").write_text("{}\n")
    (tmp_path / "cart.viewed.json").unlink()
    assert stale_files(tmp_path) == [
        "cart.viewed.json: missing",
        "order.placed.json: differs from the code",
        "order.gift_wrapped.json: no such event type in the code",
    ]
    assert sorted(write_schemas(tmp_path)) == [
        "cart.viewed.json",
        "order.gift_wrapped.json",
        "order.placed.json",
    ]
    assert stale_files(tmp_path) == []


def test_read_schemas_reads_what_the_index_names(tmp_path: Path) -> None:
    def read(name: str) -> str | None:
        path = tmp_path / name
        return path.read_text() if path.is_file() else None

    assert read_schemas(read) is None  # no index.json: no schemas
    write_schemas(tmp_path)
    found = read_schemas(read)
    assert found is not None
    assert sorted(s["x-ce-type"] for s in found) == sorted(EVENT_TYPES)
    (tmp_path / "cart.viewed.json").unlink()
    with pytest.raises(ValueError, match=r"cart\.viewed\.json"):
        read_schemas(read)


def test_breaking_changes_to_a_schema_are_refused(schemas: dict[str, dict[str, Any]]) -> None:
    old = copy.deepcopy(_event_schemas(schemas))
    for schema in old:
        if schema["x-ce-type"] == "store.sale.recorded":
            schema["properties"]["till_id"] = {"type": "string"}
        if schema["x-ce-type"] == "order.placed":
            schema["$defs"]["Line"]["properties"]["qty"] = {"type": "string"}
        if schema["x-ce-type"] == "inventory.availability.changed":
            schema["x-key"] = "location_id"
    result = compare(schemas_document(old), schemas_document(_event_schemas(schemas)))
    assert sorted(result.breaking) == [
        "order.placed.lines.qty: type changed from string to integer",
        "store.sale.recorded.till_id: field removed (or renamed)",
        "topic inventory.availability.v1: key changed from 'location_id' to 'sku'",
    ]
