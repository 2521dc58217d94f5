"""JSON Schema 2020-12 of every event type, generated from the models (``docs/schemas/``).

One file per ``ce_type`` (``<ce_type>.json``) for teams whose language has a JSON Schema
validator or type generator but no AsyncAPI tooling (TypeScript, Java, Go), plus
``index.json``: topic -> key -> event types -> schema file. Each schema is the payload schema
the AsyncAPI document publishes (:func:`omni_contracts.asyncapi.payload_schema`), made
self-contained (its sub-models in ``$defs``) and labelled with ``$id``
(``urn:omni:event:<ce_type>``), ``title``, the event's docstring as ``description`` and the
keywords ``x-ce-type``, ``x-topic`` and ``x-key``.

Run ``python -m omni_contracts.schemas --output docs/schemas`` to write them, ``--check
docs/schemas`` to say which committed files differ from the code (the contract gate).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omni_contracts.asyncapi import payload_schema
from omni_contracts.base import Event
from omni_contracts.catalogue import TOPICS

DIALECT = "https://json-schema.org/draft/2020-12/schema"
INDEX = "index.json"
"""The file that maps topics to their key, event types and schema files."""
GENERATED = "Generated from the omni_contracts models by `make contracts`: do not edit."


def schema_file(ce_type: str) -> str:
    """The file name of the schema of ``ce_type``."""
    return f"{ce_type}.json"


def schema_id(ce_type: str) -> str:
    """The ``$id`` of the schema of ``ce_type``.

    An absolute URI, as validators that load a schema from a stream need (Java's networknt
    refuses a relative one), and a name rather than an address: the schemas are files in
    the repository and in the packages made from it, served from no fixed place.
    """
    return f"urn:omni:event:{ce_type}"


def event_json_schema(model: type[Event]) -> dict[str, Any]:
    """The self-contained JSON Schema 2020-12 document of one event type's data: it has no
    reference outside its own ``$defs``."""
    spec = TOPICS[model.topic]
    schema = payload_schema(model)
    return {
        **schema,
        "$schema": DIALECT,
        "$id": schema_id(model.ce_type),
        "title": model.__name__,
        # pydantic's description is the docstring; a model without one still says what it is.
        "description": schema.get("description", model.__name__),
        "x-ce-type": model.ce_type,
        "x-topic": spec.name,
        "x-key": spec.key,
    }


def schema_index() -> dict[str, Any]:
    """``index.json``: every topic with its key, direction and event types' schema files."""
    return {
        "$comment": GENERATED,
        "topics": {
            spec.name: {
                "compacted": spec.compacted,
                "description": spec.description,
                "direction": spec.direction,
                "dlq": spec.dlq,
                "events": {ce_type: schema_file(ce_type) for ce_type in spec.events},
                "key": spec.key,
                "partitions": spec.partitions,
            }
            for spec in TOPICS.values()
        },
    }


def json_schemas() -> dict[str, dict[str, Any]]:
    """Every file of ``docs/schemas/`` by name: one schema per event type, and the index."""
    files = {
        schema_file(ce_type): event_json_schema(model)
        for spec in TOPICS.values()
        for ce_type, model in spec.events.items()
    }
    files[INDEX] = schema_index()
    return files


def _canonical(node: Any, field_map: bool = False) -> Any:
    # Keys sorted so the files are stable, except a schema's "properties": their order is
    # the model's field order, which readers and generated types follow.
    if isinstance(node, dict):
        keys = list(node) if field_map else sorted(node)
        return {
            key: _canonical(node[key], field_map=not field_map and key == "properties")
            for key in keys
        }
    if isinstance(node, list):
        return [_canonical(item) for item in node]
    return node


def render(document: dict[str, Any]) -> str:
    """The committed text of one file: canonical key order, two-space indent, final newline."""
    return json.dumps(_canonical(document), indent=2, ensure_ascii=False) + "\n"


def write_schemas(directory: Path) -> list[str]:
    """Write every file into ``directory`` and delete the ``*.json`` the code no longer has
    (an event type removed). Returns the names of the files written or deleted."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = []
    files = {name: render(document) for name, document in json_schemas().items()}
    for name, text in files.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(name)
    for path in sorted(directory.glob("*.json")):
        if path.name not in files:
            path.unlink()
            changed.append(path.name)
    return changed


def stale_files(directory: Path) -> list[str]:
    """What in ``directory`` differs from the code, one line a file (empty: in step)."""
    files = {name: render(document) for name, document in json_schemas().items()}
    found = {path.name for path in directory.glob("*.json")} if directory.is_dir() else set()
    problems = []
    for name, text in files.items():
        if name not in found:
            problems.append(f"{name}: missing")
        elif (directory / name).read_text(encoding="utf-8") != text:
            problems.append(f"{name}: differs from the code")
    problems += [f"{name}: no such event type in the code" for name in sorted(found - set(files))]
    return problems


def read_schemas(read: Callable[[str], str | None]) -> list[dict[str, Any]] | None:
    """The event schemas a committed ``docs/schemas/`` holds, ``read(name)`` giving the text
    of one of its files (None: absent). None when there is no ``index.json``.

    Raises ``ValueError`` when the index names a file that is absent or not a schema.
    """
    text = read(INDEX)
    if text is None:
        return None
    index = json.loads(text)
    schemas = []
    for topic in index.get("topics", {}).values():
        for name in topic.get("events", {}).values():
            schema_text = read(name)
            if schema_text is None:
                raise ValueError(f"{INDEX} names {name}, which is absent")
            schema = json.loads(schema_text)
            if not isinstance(schema, dict) or "x-ce-type" not in schema:
                raise ValueError(f"{name} is not an event schema (no x-ce-type)")
            schemas.append(schema)
    return schemas


def main(argv: Sequence[str] | None = None) -> None:
    """Write the schemas (``--output DIR``) or check committed ones (``--check DIR``)."""
    parser = argparse.ArgumentParser(prog="python -m omni_contracts.schemas", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--output", type=Path, help="write every file into this directory")
    group.add_argument("--check", type=Path, help="exit 1 if this directory differs")
    args = parser.parse_args(argv)
    if args.output is not None:
        changed = write_schemas(args.output)
        print(f"{args.output}: {len(changed)} file(s) written or removed")
        return
    problems = stale_files(args.check)
    for line in problems:
        print(f"{args.check}/{line}", file=sys.stderr)
    if problems:
        sys.exit(f"{len(problems)} file(s) out of step with the code: run `make contracts`")


if __name__ == "__main__":
    main()
