"""The AsyncAPI 3.0.0 document of the public Kafka contract, generated from the models.

Run ``python -m omni_contracts.asyncapi`` (YAML) or ``... --format json``. Channel teams read
it; a test keeps it in step with the catalogue, so it cannot drift from the code.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from typing import Any

from omni_contracts import EVENT_TYPES, INBOUND, TOPICS, Event, TopicSpec, event_schema

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING_VERSION = "0.5.0"
_SCHEMAS = "#/components/schemas/"
_MESSAGES = "#/components/messages/"
DEAD_LETTER = "dead_letter"

_INFO_DESCRIPTION = """\
The Kafka topics channel teams (web, app, store POS, warehouse, carriers) integrate with.
Generated from the platform's pydantic models, which are the precise source of truth.

* **Envelope:** CloudEvents 1.0 in Kafka binary content mode: the message value is the
  event's `data` as UTF-8 JSON; the envelope travels in `ce_*` headers.
* **Delivery:** at least once; every event has a unique `ce_id`, so deduplicate on it.
  Events of one key are in order.
* **Money** is a decimal string with a currency (`{"amount": "19.90", "currency": "EUR"}`),
  never a float. **Times** are RFC 3339 in UTC. Quantities are integers >= 0 unless a field
  says it is a signed delta.
* **Compatibility:** adding optional fields is allowed, so ignore fields you do not know.
  Renaming or removing a field, or changing a topic's key, means a new `.vN` topic.
* **Dead letters:** a message that cannot be parsed or validated goes to `<topic>.dlq` with
  headers saying why; it never blocks its partition.
"""


def _text(doc: str) -> str:
    # Docstrings use reStructuredText literals; AsyncAPI renders CommonMark.
    return doc.replace("``", "`")


def _summary_and_description(model: type[Event]) -> tuple[str, str]:
    doc = inspect.cleandoc(model.__doc__ or model.__name__)
    first, _, rest = doc.partition("\n\n")
    summary = " ".join(first.split())
    return _text(summary), _text(" ".join(rest.split()) or summary)


def _headers_schema(ce_type: str, key: str) -> dict[str, Any]:
    """The CloudEvents binary-mode headers (and platform extras) of one event type."""
    text = {"type": "string"}
    return {
        "type": "object",
        "required": ["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "content-type"],
        "properties": {
            "ce_specversion": {**text, "const": "1.0"},
            "ce_id": {
                **text,
                "format": "uuid",
                "description": (
                    "Unique per event: the deduplication key. A UUID in its hyphenated"
                    " 8-4-4-4-12 form; any other spelling (braces, `urn:uuid:`, no hyphens)"
                    " and the nil and max UUIDs are dead-lettered as `invalid_envelope`."
                ),
            },
            "ce_type": {**text, "const": ce_type},
            "ce_source": {
                **text,
                "format": "uri-reference",
                "description": "Who produced the event.",
                "examples": ["/services/inventory", "/channels/pos/store-017"],
            },
            "ce_time": {**text, "format": "date-time", "description": "RFC 3339, UTC."},
            "content-type": {**text, "const": "application/json"},
            "ce_subject": {
                **text,
                "description": f"The id of the entity the event is about (usually the `{key}`).",
            },
            "traceparent": {
                **text,
                "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
                "description": "W3C trace context.",
            },
            "tracestate": {**text, "description": "W3C trace context."},
            "correlation_id": {
                **text,
                "description": "One customer journey or order, across all its events.",
            },
            "causation_id": {**text, "description": "The `ce_id` of the event that caused this."},
        },
        "additionalProperties": True,
    }


def _dead_letter_headers() -> dict[str, Any]:
    text = {"type": "string"}
    return {
        "type": "object",
        "required": ["dlq_reason", "dlq_error", "dlq_source_topic", "dlq_service"],
        "properties": {
            "dlq_reason": {**text, "description": "Why the message was set aside."},
            "dlq_error": {**text, "description": "The error, as text."},
            "dlq_source_topic": {**text, "description": "The topic it was read from."},
            "dlq_source_partition": {**text, "description": "Its partition (decimal)."},
            "dlq_source_offset": {**text, "description": "Its offset (decimal)."},
            "dlq_service": {**text, "description": "The service that set it aside."},
        },
        "additionalProperties": True,
        "description": "The original headers (ce_*, traceparent, ...) are kept as well.",
    }


def _rewrite(node: Any, refs: str = _SCHEMAS) -> Any:
    """Point pydantic's local ``#/$defs/X`` refs at ``refs`` + ``X`` (the document's
    components by default) and write descriptions as CommonMark."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                out[key] = refs + value.removeprefix("#/$defs/")
            elif key == "description" and isinstance(value, str):
                out[key] = _text(value)
            else:
                out[key] = _rewrite(value, refs)
        return out
    if isinstance(node, list):
        return [_rewrite(item, refs) for item in node]
    return node


def _add_schema(schemas: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    # A payload's own "$ref: #" would resolve against the whole document, so every shared
    # definition is hoisted into components; two different schemas must not share a name.
    if name in schemas and schemas[name] != schema:
        raise ValueError(f"two different schemas are named {name!r}")
    schemas[name] = schema


def payload_schema(model: type[Event], refs: str = "#/$defs/") -> dict[str, Any]:
    """The published JSON schema of an event's data: pydantic's serialization schema, with
    descriptions in CommonMark and its ``#/$defs/X`` refs pointing at ``refs`` + ``X``.

    The AsyncAPI document and the JSON Schemas (:mod:`omni_contracts.schemas`) both publish
    this one, so the two cannot tell a channel team different things.
    """
    schema: dict[str, Any] = _rewrite(event_schema(model), refs)
    return schema


def _message(model: type[Event], spec: TopicSpec, schemas: dict[str, Any]) -> dict[str, Any]:
    schema = payload_schema(model, _SCHEMAS)
    for name, definition in schema.pop("$defs", {}).items():
        _add_schema(schemas, name, definition)
    _add_schema(schemas, model.__name__, schema)
    summary, description = _summary_and_description(model)
    return {
        "name": model.__name__,
        "title": model.ce_type,
        "summary": summary,
        "description": description,
        "contentType": "application/json",
        "headers": _headers_schema(model.ce_type, spec.key),
        "payload": {"$ref": _SCHEMAS + model.__name__},
        "correlationId": {
            "description": "The customer journey or order this event belongs to.",
            "location": "$message.header#/correlation_id",
        },
        "bindings": {
            "kafka": {
                "key": {"type": "string", "description": f"The event's `{spec.key}`."},
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
    }


def _channel(spec: TopicSpec) -> dict[str, Any]:
    config: dict[str, Any] = {"cleanup.policy": ["compact" if spec.compacted else "delete"]}
    if not spec.compacted:
        config["retention.ms"] = spec.retention_ms
    produced_by = "channels" if spec.direction == INBOUND else "the platform"
    compaction = " Log-compacted: the last event per key is the current state."
    if not spec.compacted:
        compaction = ""
    return {
        "address": spec.name,
        "title": spec.name,
        # The key field, machine-readable: the contract gate refuses a change of it.
        "x-key": spec.key,
        "summary": spec.description,
        "description": (
            f"{spec.description} Produced by {produced_by}; keyed by `{spec.key}`, so all "
            f"events of one `{spec.key}` are in order.{compaction}"
        ),
        "messages": {ce_type: {"$ref": _MESSAGES + ce_type} for ce_type in spec.events},
        "bindings": {
            "kafka": {
                "topic": spec.name,
                "partitions": spec.partitions,
                "topicConfiguration": config,
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
    }


def _dead_letter_channel(spec: TopicSpec) -> dict[str, Any]:
    return {
        "address": spec.dlq,
        "title": spec.dlq,
        "summary": f"Messages of {spec.name} that could not be processed.",
        "description": (
            f"Messages of `{spec.name}` that could not be parsed or validated, or kept failing "
            "after bounded retries, with headers saying why. Watch it if you produce to "
            f"`{spec.name}`."
        ),
        "messages": {DEAD_LETTER: {"$ref": _MESSAGES + DEAD_LETTER}},
        "bindings": {
            "kafka": {"topic": spec.dlq, "bindingVersion": KAFKA_BINDING_VERSION},
        },
    }


def _operation(
    channel_id: str, action: str, summary: str, messages: Sequence[str]
) -> dict[str, Any]:
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel_id}"},
        "summary": summary,
        "messages": [{"$ref": f"#/channels/{channel_id}/messages/{m}"} for m in messages],
    }


def _version() -> str:
    try:
        return metadata.version("omni-contracts")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0.0.0"


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of every public topic and event type.

    Operations are the platform's: it ``receive``s inbound topics and ``send``s outbound ones
    (and dead letters).
    """
    schemas: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for spec in TOPICS.values():
        for ce_type, model in spec.events.items():
            messages[ce_type] = _message(model, spec, schemas)
        channels[spec.name] = _channel(spec)
        inbound = spec.direction == INBOUND
        action = "receive" if inbound else "send"
        verb = "consumes" if inbound else "publishes"
        operations[f"{action}.{spec.name}"] = _operation(
            spec.name, action, f"The platform {verb} {spec.name}.", list(spec.events)
        )
    for spec in TOPICS.values():
        channels[spec.dlq] = _dead_letter_channel(spec)
        operations[f"send.{spec.dlq}"] = _operation(
            spec.dlq, "send", f"The platform sets aside bad messages of {spec.name}.", [DEAD_LETTER]
        )
    messages[DEAD_LETTER] = {
        "name": "DeadLetter",
        "title": DEAD_LETTER,
        "summary": "A message the platform could not process, as it was received.",
        "description": "The value is the original message value, byte for byte.",
        "headers": _dead_letter_headers(),
        "payload": {"description": "The original message value, unchanged."},
    }
    missing = set(EVENT_TYPES) - set(messages)
    if missing:  # an event type on no topic would be undocumented
        raise ValueError(f"event types on no topic: {sorted(missing)}")
    document = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Omnichannel retail platform: public Kafka contract",
            "version": _version(),
            "description": _INFO_DESCRIPTION,
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }
    # Plain JSON data only (no enums, no shared sub-dicts), so it dumps as clean YAML.
    return json.loads(json.dumps(document))


def service_document(
    service: str, *, consumes: Iterable[str], produces: Iterable[str]
) -> dict[str, Any]:
    """The part of the contract one service touches, from that service's point of view.

    It ``receive``s the topics in ``consumes`` and ``send``s those in ``produces`` (its dead
    letters included); only the messages and schemas those topics use are kept.
    """
    full = asyncapi_document()
    receives, sends = set(consumes), set(produces)
    channels = {
        name: channel for name, channel in full["channels"].items() if name in receives | sends
    }
    operations: dict[str, Any] = {}
    for name in sorted(channels):
        action = "receive" if name in receives else "send"
        verb = "consumes" if action == "receive" else "publishes"
        operations[f"{action}.{name}"] = _operation(
            name, action, f"{service} {verb} {name}.", list(channels[name]["messages"])
        )
    messages = {
        ce_type: full["components"]["messages"][ce_type]
        for channel in channels.values()
        for ce_type in channel["messages"]
    }
    schemas = full["components"]["schemas"]
    kept: dict[str, Any] = {}
    pending = [messages[m].get("payload", {}) for m in messages]
    while pending:  # every schema reachable from the kept messages
        node = pending.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(_SCHEMAS):
                name = ref[len(_SCHEMAS) :]
                if name not in kept:
                    kept[name] = schemas[name]
                    pending.append(schemas[name])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    info = dict(full["info"])
    info["title"] = f"{service}: the events it consumes and produces"
    return {
        **full,
        "info": info,
        "channels": channels,
        "operations": operations,
        "components": {"schemas": dict(sorted(kept.items())), "messages": messages},
    }


def to_html(document: dict[str, Any]) -> str:
    """A readable, self-contained HTML page of an AsyncAPI document (no scripts, no CDN)."""
    from html import escape

    schemas = document.get("components", {}).get("schemas", {})
    messages = document.get("components", {}).get("messages", {})
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{escape(document['info']['title'])}</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:auto;padding:1rem;"
        "line-height:1.45}code{background:#f3f3f3;padding:0 .2em}table{border-collapse:"
        "collapse;width:100%;margin:.5rem 0 1.5rem}td,th{border:1px solid #ddd;padding:"
        ".25rem .5rem;text-align:left;vertical-align:top}h2{margin-top:2.5rem}",
        "</style></head><body>",
        f"<h1>{escape(document['info']['title'])}</h1>",
        f"<p>AsyncAPI {escape(document['asyncapi'])}, contract version "
        f"{escape(document['info']['version'])}. The machine-readable document is "
        "<a href='asyncapi.yaml'>asyncapi.yaml</a>.</p>",
        f"<pre style='white-space:pre-wrap'>{escape(document['info']['description'])}</pre>",
    ]
    actions = {
        op["channel"]["$ref"].rsplit("/", 1)[-1]: op["action"]
        for op in document.get("operations", {}).values()
    }
    for name, channel in document.get("channels", {}).items():
        action = actions.get(name, "")
        out.append(f"<h2 id='{escape(name)}'><code>{escape(name)}</code> {escape(action)}</h2>")
        out.append(f"<p>{escape(channel.get('description', ''))}</p>")
        for ce_type in channel.get("messages", {}):
            message = messages.get(ce_type, {})
            out.append(f"<h3><code>{escape(ce_type)}</code></h3>")
            out.append(f"<p>{escape(message.get('description', ''))}</p>")
            payload = message.get("payload", {})
            ref = payload.get("$ref", "")
            schema = schemas.get(ref[len(_SCHEMAS) :], payload) if ref else payload
            props = schema.get("properties", {})
            if not props:
                continue
            required = set(schema.get("required", []))
            out.append("<table><tr><th>field</th><th>type</th><th>required</th></tr>")
            for field_name, prop in props.items():
                kinds = [
                    v.get("$ref", "").rsplit("/", 1)[-1] or str(v.get("type", "any"))
                    for v in prop.get("anyOf", [prop])
                ]
                if prop.get("type") == "array":
                    items = prop.get("items", {})
                    inner = items.get("$ref", "").rsplit("/", 1)[-1] or items.get("type", "any")
                    kinds = [f"array of {inner}"]
                out.append(
                    f"<tr><td><code>{escape(field_name)}</code></td>"
                    f"<td>{escape(' | '.join(kinds))}</td>"
                    f"<td>{'yes' if field_name in required else ''}</td></tr>"
                )
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def to_yaml(document: dict[str, Any]) -> str:
    """``document`` as YAML, keys in document order, multi-line text as ``|`` blocks.

    Needs ``pyyaml`` (the ``omni-contracts[yaml]`` extra); JSON needs nothing more.
    """
    import yaml

    class _Dumper(yaml.SafeDumper):
        """Writes multi-line text as ``|`` blocks, readable in review diffs."""

    def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    _Dumper.add_representer(str, _represent_str)
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the AsyncAPI document (YAML by default)."""
    parser = argparse.ArgumentParser(prog="python -m omni_contracts.asyncapi", description=__doc__)
    parser.add_argument("--format", choices=("yaml", "json"), default="yaml")
    args = parser.parse_args(argv)
    document = asyncapi_document()
    if args.format == "json":
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(to_yaml(document))


if __name__ == "__main__":
    main()
