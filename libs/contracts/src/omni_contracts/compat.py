"""Is a new version of the contract compatible with an old one? (the contract gate)

Compares two AsyncAPI documents as :func:`omni_contracts.asyncapi.asyncapi_document` writes
them and lists what would break a channel team that integrated with the old one:

- a topic removed, or its key changed;
- an event type removed, or moved to another topic;
- a field removed (a rename is a removal plus an addition), or its type changed;
- a field made required, or a new field that is required;
- a value removed from a closed vocabulary (an enum).

Additions (optional fields, event types, topics, enum values) are compatible and reported
as such. Constraints such as lengths are not compared: tightening one only refuses what the
platform could never store.

The JSON Schemas of ``docs/schemas/`` are judged by the same rules through
:func:`schemas_document`.

Pure functions on plain dicts, so a channel team can run the same gate in its own CI.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

_SCHEMAS = "#/components/schemas/"


@dataclass
class Comparison:
    """What changed between two contract versions."""

    breaking: list[str] = field(default_factory=list)
    additive: list[str] = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        """True when nothing breaks."""
        return not self.breaking


def compare(old: dict[str, Any], new: dict[str, Any]) -> Comparison:
    """Compare contract ``old`` (what channel teams integrated with) to ``new``."""
    result = Comparison()
    old_channels, new_channels = _topics(old), _topics(new)
    for name, channel in old_channels.items():
        if name not in new_channels:
            result.breaking.append(f"topic {name} removed")
            continue
        old_key, new_key = _key(channel), _key(new_channels[name])
        if old_key != new_key:
            result.breaking.append(f"topic {name}: key changed from {old_key!r} to {new_key!r}")
    result.additive += [f"topic {name} added" for name in new_channels.keys() - old_channels]

    old_types, new_types = _event_types(old), _event_types(new)
    for ce_type, (topic, schema) in old_types.items():
        if ce_type not in new_types:
            result.breaking.append(f"event type {ce_type} removed from {topic}")
            continue
        new_topic, new_schema = new_types[ce_type]
        if new_topic != topic:
            result.breaking.append(f"event type {ce_type} moved from {topic} to {new_topic}")
        _compare_object(ce_type, schema, old, new_schema, new, result, seen=set())
    result.additive += [
        f"event type {ce_type} added to {new_types[ce_type][0]}"
        for ce_type in sorted(new_types.keys() - old_types)
    ]
    return result


def schemas_document(schemas: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON Schemas of ``docs/schemas/`` (one per event type) in the shape
    :func:`compare` reads, so the same rules judge them: ``compare(schemas_document(old),
    schemas_document(new))``.

    Each schema names its topic and key (``x-topic``, ``x-key``); its ``$defs`` are kept
    under its own ``ce_type``, since every file carries its own copy of the shared models.
    """
    channels: dict[str, dict[str, Any]] = {}
    messages: dict[str, Any] = {}
    components: dict[str, Any] = {}
    for schema in schemas:
        ce_type, topic = str(schema["x-ce-type"]), str(schema["x-topic"])
        channel = channels.setdefault(
            topic, {"address": topic, "x-key": schema.get("x-key"), "messages": {}}
        )
        channel["messages"][ce_type] = {"$ref": f"#/components/messages/{ce_type}"}
        messages[ce_type] = {"payload": {"$ref": _SCHEMAS + ce_type}}
        refs = f"{_SCHEMAS}{ce_type}/"
        body = {key: value for key, value in schema.items() if key != "$defs"}
        components[ce_type] = _point_refs(body, refs)
        for name, definition in schema.get("$defs", {}).items():
            components[f"{ce_type}/{name}"] = _point_refs(definition, refs)
    return {"channels": channels, "components": {"schemas": components, "messages": messages}}


def _point_refs(node: Any, refs: str) -> Any:
    """``node`` with its local ``#/$defs/X`` refs pointing at ``refs`` + ``X``."""
    if isinstance(node, dict):
        return {
            key: refs + value.removeprefix("#/$defs/")
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/")
            else _point_refs(value, refs)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_point_refs(item, refs) for item in node]
    return node


def _topics(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    # Dead-letter channels follow their topic; compare the public topics only.
    return {
        channel.get("address", name): channel
        for name, channel in document.get("channels", {}).items()
        if not str(channel.get("address", name)).endswith(".dlq")
    }


def _key(channel: dict[str, Any]) -> str | None:
    key = channel.get("x-key")
    return str(key) if key is not None else None


def _event_types(document: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """``ce_type -> (topic, payload schema)`` of every event type on a public topic."""
    messages = document.get("components", {}).get("messages", {})
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for topic, channel in _topics(document).items():
        for ce_type in channel.get("messages", {}):
            message = messages.get(ce_type, {})
            found[ce_type] = (topic, message.get("payload", {}))
    return found


def _resolve(schema: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith(_SCHEMAS):
        target: dict[str, Any] = document.get("components", {}).get("schemas", {})
        return target.get(ref[len(_SCHEMAS) :], {})
    return schema


def _variants(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The alternatives of a schema (``anyOf``/``oneOf``), or the schema itself."""
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema:
            return list(schema[combinator])
    return [schema]


def _shape(schema: dict[str, Any], document: dict[str, Any]) -> frozenset[str]:
    """A comparable description of a schema's type: ``string``, ``null``, ``ref:Money``..."""
    kinds: set[str] = set()
    for variant in _variants(schema):
        ref = variant.get("$ref")
        if isinstance(ref, str):
            target = _resolve(variant, document)
            # A named enum or object: compare by its own type, not by its name.
            kinds |= _shape(target, document) if "$ref" not in target else {ref}
            continue
        kind = variant.get("type")
        if kind is None and "const" in variant:
            kind = type(variant["const"]).__name__
        if isinstance(kind, list):
            kinds.update(str(k) for k in kind)
        elif kind is not None:
            kinds.add(str(kind))
        if variant.get("format"):
            kinds.add(f"format:{variant['format']}")
    return frozenset(kinds)


def _enum_values(schema: dict[str, Any], document: dict[str, Any]) -> set[Any]:
    values: set[Any] = set()
    for variant in _variants(schema):
        target = _resolve(variant, document)
        values.update(target.get("enum", []))
    return values


def _objects(schema: dict[str, Any], document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The object schemas a property can hold (directly, as a ref, or as array items)."""
    for variant in _variants(schema):
        target = _resolve(variant, document)
        if target.get("type") == "array" and isinstance(target.get("items"), dict):
            target = _resolve(target["items"], document)
        if "properties" in target:
            yield target


def _compare_object(
    where: str,
    old_schema: dict[str, Any],
    old_doc: dict[str, Any],
    new_schema: dict[str, Any],
    new_doc: dict[str, Any],
    result: Comparison,
    seen: set[tuple[str, str]],
) -> None:
    old_obj, new_obj = _resolve(old_schema, old_doc), _resolve(new_schema, new_doc)
    old_props: dict[str, Any] = old_obj.get("properties", {})
    new_props: dict[str, Any] = new_obj.get("properties", {})
    old_required = set(old_obj.get("required", []))
    new_required = set(new_obj.get("required", []))
    for name, old_prop in old_props.items():
        path = f"{where}.{name}"
        if name not in new_props:
            result.breaking.append(f"{path}: field removed (or renamed)")
            continue
        new_prop = new_props[name]
        old_shape, new_shape = _shape(old_prop, old_doc), _shape(new_prop, new_doc)
        if old_shape != new_shape:
            result.breaking.append(
                f"{path}: type changed from {_show(old_shape)} to {_show(new_shape)}"
            )
        if name in new_required and name not in old_required:
            result.breaking.append(f"{path}: field made required")
        removed = _enum_values(old_prop, old_doc) - _enum_values(new_prop, new_doc)
        if removed and _enum_values(new_prop, new_doc):
            result.breaking.append(f"{path}: values removed: {sorted(map(str, removed))}")
        # Nested objects (Money, Line, ...) follow the same rules; each pair once.
        for old_inner, new_inner in zip(
            _objects(old_prop, old_doc), _objects(new_prop, new_doc), strict=False
        ):
            marker = (path, str(sorted(old_inner.get("properties", {}))))
            if marker not in seen:
                seen.add(marker)
                _compare_object(path, old_inner, old_doc, new_inner, new_doc, result, seen)
    for name in new_props.keys() - old_props.keys():
        path = f"{where}.{name}"
        if name in new_required:
            result.breaking.append(f"{path}: new field is required")
        else:
            result.additive.append(f"{path}: optional field added")


def _show(shape: frozenset[str]) -> str:
    return "|".join(sorted(shape)) or "any"
