"""The contract gate: the committed AsyncAPI document is the code's, and breaking changes
are refused while additive ones pass (each kind on a real event of the catalogue)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from omni_contracts.asyncapi import asyncapi_document, to_yaml
from omni_contracts.compat import compare

COMMITTED = Path(__file__).resolve().parents[4] / "docs" / "asyncapi.yaml"


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
