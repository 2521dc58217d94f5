"""The console's backend: a small ASGI app that proxies the services' read APIs.

The page never sees an API key: the console reads ``dev.env`` (service URLs, the operator's
key, ``MAILDIR``) and calls the services itself. A service that is not part of the stack is
reported as ``{"skipped": "the X service is not running"}`` rather than as an error, so the
page shows what runs today and more as services are added.

Routes: ``/`` (the page), ``/api/overview`` (stores x SKUs), ``/api/stream`` (the
availability stream, passed through), ``/api/health`` (lag, DLQ, outbox, the
stock-to-availability histogram, from the services' metrics ports), ``/api/shoppers`` and
``/api/shoppers/{id}`` (profile, orders, points, messages), ``POST /api/stories/{n}`` (play a
demo story), ``/healthz`` and ``/readyz``.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client.parser import text_string_to_metric_families

from omni_devkit.devstack.stack import metrics_env_var_name, read_kv_file

STATIC = Path(str(resources.files("omni_devkit.console") / "static"))
SERVICES = ("inventory", "order", "customer-profile", "loyalty", "notification")


def _url_key(service: str) -> str:
    return service.upper().replace("-", "_") + "_URL"


class StackView:
    """The running stack as ``dev.env`` describes it (read again when it changes)."""

    def __init__(self, env_file: Path) -> None:
        self.env_file = env_file
        self._values: dict[str, str] = {}
        self._mtime = -1.0

    def values(self) -> dict[str, str]:
        """``dev.env``'s keys (empty when the stack is not up)."""
        try:
            mtime = self.env_file.stat().st_mtime
        except FileNotFoundError:
            return {}
        if mtime != self._mtime:
            self._values, self._mtime = read_kv_file(self.env_file), mtime
        return self._values

    def url(self, service: str) -> str | None:
        """Where ``service`` answers, or None when it is not part of the stack."""
        return self.values().get(_url_key(service))

    def metrics_url(self, service: str) -> str | None:
        """Where ``service`` serves its metrics (its own port), or None."""
        return self.values().get(metrics_env_var_name(service))

    @property
    def api_key(self) -> str:
        """The operator's key (never sent to the page)."""
        return self.values().get("API_KEY", "")


def skipped(service: str) -> dict[str, str]:
    """What the page shows for a service that does not run."""
    return {"skipped": f"the {service} service is not running"}


async def _get(
    http: httpx.AsyncClient, stack: StackView, service: str, path: str, **params: Any
) -> Any:
    url = stack.url(service)
    if url is None:
        return skipped(service)
    try:
        response = await http.get(
            url + path,
            params=params or None,
            headers={"Authorization": f"Bearer {stack.api_key}"},
        )
    except httpx.HTTPError:
        return skipped(service)
    if response.status_code == 404:
        if response.headers.get("content-type", "").startswith("application/json") and (
            response.json() == {"detail": "Not Found"}
        ):
            # FastAPI's answer for a route it does not have: the service is still to come.
            api = path.split("/")[1]
            return {"skipped": f"the {service} service is not running (no {api} API)"}
        return {"missing": f"{service} has nothing at {path}"}
    if response.status_code >= 400:
        return {"error": f"{service} answered {response.status_code}"}
    return response.json()


# -- the shopper's messages ----------------------------------------------------------------------


def read_maildir(maildir: Path, recipient: str | None, limit: int = 20) -> list[dict[str, str]]:
    """The newest e-mails in ``maildir`` (to ``recipient`` when given): subject, date, text."""
    messages: list[tuple[float, dict[str, str]]] = []
    for folder in ("new", "cur"):
        directory = maildir / folder
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            try:
                message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            except OSError:
                continue
            to = str(message.get("To", ""))
            if recipient and recipient.lower() not in to.lower():
                continue
            body = message.get_body(preferencelist=("plain", "html"))
            text = body.get_content() if body is not None else ""
            messages.append(
                (
                    path.stat().st_mtime,
                    {
                        "channel": "email",
                        "subject": str(message.get("Subject", "")),
                        "date": str(message.get("Date", "")),
                        "text": str(text)[:2000],
                    },
                )
            )
    messages.sort(key=lambda item: item[0], reverse=True)
    return [m for _, m in messages[:limit]]


# -- health from /metrics ------------------------------------------------------------------------


def summarise_metrics(text: str) -> dict[str, Any]:
    """Lag, DLQ entries by reason, outbox backlog and the propagation histogram of one service."""
    lag = 0.0
    backlog = 0.0
    dlq: dict[str, float] = {}
    buckets: dict[str, float] = {}
    count = 0.0
    stream_clients = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "omni_consumer_lag":
                lag += value
            elif name == "omni_outbox_backlog":
                backlog += value
            elif name == "omni_dlq_messages_total" and value:
                key = f"{labels.get('topic', '?')}: {labels.get('reason', '?')}"
                dlq[key] = dlq.get(key, 0) + value
            elif name == "omni_inventory_stock_to_availability_seconds_bucket":
                buckets[labels["le"]] = buckets.get(labels["le"], 0) + value
            elif name == "omni_inventory_stock_to_availability_seconds_count":
                count += value
            elif name == "omni_inventory_stream_clients":
                stream_clients += value
    return {
        "consumer_lag": lag,
        "outbox_backlog": backlog,
        "dlq": dlq,
        "stock_to_availability": {"buckets": buckets, "count": count} if buckets else None,
        "stream_clients": stream_clients,
    }


async def dead_letters(
    bootstrap: str, prefix: str = "", per_topic: int = 5
) -> list[dict[str, Any]]:
    """The newest entries of every ``<topic>.dlq``: where from, why, and the error."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from omni_contracts.catalogue import TOPICS

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    entries: list[dict[str, Any]] = []
    try:
        # Assigned, not subscribed: the client's metadata would not cover these topics.
        cluster = await consumer._client.fetch_all_metadata()
        partitions = [
            TopicPartition(f"{prefix}{name}.dlq", p)
            for name in TOPICS
            for p in sorted(cluster.partitions_for_topic(f"{prefix}{name}.dlq") or ())
        ]
        if not partitions:
            return entries
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        waiting = {tp for tp, end in ends.items() if end > 0}
        for tp in waiting:
            consumer.seek(tp, max(0, ends[tp] - per_topic))
        deadline = time.monotonic() + 2
        while waiting and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    headers = {k: v.decode(errors="replace") for k, v in record.headers or ()}
                    entries.append(
                        {
                            "topic": headers.get("dlq_source_topic", tp.topic),
                            "reason": headers.get("dlq_reason", "?"),
                            "error": headers.get("dlq_error", "")[:300],
                            "service": headers.get("dlq_service", "?"),
                            "ce_type": headers.get("ce_type"),
                            "at": record.timestamp,
                        }
                    )
                    if record.offset + 1 >= ends[tp]:
                        waiting.discard(tp)
    finally:
        await consumer.stop()
    entries.sort(key=lambda e: e["at"], reverse=True)
    return entries[: per_topic * 4]


def create_console_app(env_file: Path, stories: Any = None) -> FastAPI:
    """The console, reading the stack from ``env_file`` (``.omni/dev.env``).

    ``stories`` plays a demo story (``async (number, say) -> None``); the default is
    :func:`omni_devkit.demo.play_story`.
    """
    stack = StackView(env_file)
    app = FastAPI(title="Omni console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.stack = stack
    client = httpx.AsyncClient(timeout=5)
    runs: dict[int, dict[str, Any]] = {}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/api/overview")
    async def overview() -> Any:
        """Stores x SKUs with availability, and what web and app may sell per SKU."""
        locations = await _get(client, stack, "inventory", "/locations")
        if not isinstance(locations, list):
            return {"error": locations}
        levels = await asyncio.gather(
            *(
                _get(client, stack, "inventory", f"/locations/{loc['location_id']}/availability")
                for loc in locations
            )
        )
        cells: dict[str, dict[str, Any]] = {}
        for page in levels:
            for item in page.get("items", []) if isinstance(page, dict) else []:
                cells.setdefault(item["sku"], {})[item["location_id"]] = {
                    "available": item["available"],
                    "status": item["status"],
                }
        skus = sorted(cells)
        per_sku = await asyncio.gather(
            *(_get(client, stack, "inventory", f"/availability/{sku}") for sku in skus)
        )
        online = {
            sku: data.get("online_available", 0) for sku, data in zip(skus, per_sku, strict=True)
        }
        return {
            "locations": [
                {k: loc[k] for k in ("location_id", "name", "kind", "ships_online")}
                for loc in locations
            ],
            "skus": skus,
            "cells": cells,
            "online": online,
        }

    @app.get("/api/stream")
    async def stream(request: Request) -> StreamingResponse:
        """Inventory's availability stream, passed through (same origin for the page)."""
        url = stack.url("inventory")
        if url is None:
            raise HTTPException(503, "the inventory service is not running")
        headers = {}
        if last := request.headers.get("last-event-id"):
            headers["Last-Event-ID"] = last
        upstream_client = httpx.AsyncClient(timeout=httpx.Timeout(10, read=None))
        upstream = await upstream_client.send(
            upstream_client.build_request(
                "GET", f"{url}/availability/stream", headers=headers, params=request.query_params
            ),
            stream=True,
        )
        if upstream.status_code != 200:
            body = await upstream.aread()
            await upstream.aclose()
            await upstream_client.aclose()
            raise HTTPException(upstream.status_code, body.decode(errors="replace")[:200])

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()
                await upstream_client.aclose()

        return StreamingResponse(
            relay(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/api/health")
    async def health() -> Any:
        """Per service: up, consumer lag, outbox backlog, DLQ entries by reason; the latency."""
        out: dict[str, Any] = {}

        async def one(service: str) -> None:
            url = stack.metrics_url(service)
            if url is None:
                out[service] = skipped(service)
                return
            try:
                response = await client.get(f"{url}/metrics")
                response.raise_for_status()
            except httpx.HTTPError:
                out[service] = {"up": False}
                return
            out[service] = {"up": True, **summarise_metrics(response.text)}

        await asyncio.gather(*(one(s) for s in SERVICES))
        return {"services": {s: out[s] for s in SERVICES}, "at": time.time()}

    @app.get("/api/dlq")
    async def dlq() -> Any:
        """The newest dead-lettered messages, with their reasons (payloads stay in Kafka)."""
        bootstrap = stack.values().get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            return {"skipped": "no running stack"}
        try:
            return await asyncio.wait_for(
                dead_letters(bootstrap, stack.values().get("TOPIC_PREFIX", "")), 5
            )
        except Exception as exc:  # the broker is away: say so, keep serving the page
            return {"error": f"could not read the DLQs: {type(exc).__name__}"}

    @app.get("/api/shoppers")
    async def shoppers() -> Any:
        from omni_devkit.demo import SHOPPERS

        return [{"customer_id": s.customer_id, "name": s.name} for s in SHOPPERS]

    @app.get("/api/shoppers/{customer_id}")
    async def shopper(customer_id: str) -> Any:
        """Everything the platform knows of one demo shopper, service by service."""
        from omni_devkit.demo import SHOPPERS

        known = {s.customer_id: s for s in SHOPPERS}
        if customer_id not in known:
            raise HTTPException(404, "not a demo shopper")
        demo = known[customer_id]
        profile, history, orders, points, notices = await asyncio.gather(
            _get(client, stack, "customer-profile", f"/customers/{customer_id}"),
            _get(client, stack, "customer-profile", f"/customers/{customer_id}/history"),
            _get(client, stack, "order", f"/customers/{customer_id}/orders"),
            _get(client, stack, "loyalty", f"/accounts/{customer_id}"),
            _get(client, stack, "notification", f"/customers/{customer_id}/notifications"),
        )
        maildir = stack.values().get("MAILDIR")
        emails: Any = (
            read_maildir(Path(maildir), demo.email)
            if maildir
            else {"skipped": "the dev SMTP server is not running (no MAILDIR in dev.env)"}
        )
        return {
            "customer_id": customer_id,
            "name": demo.name,
            "profile": profile,
            "history": history,
            "orders": orders,
            "points": points,
            "notifications": notices,
            "emails": emails,
        }

    @app.post("/api/stories/{number}")
    async def play(number: int) -> Any:
        """Start a demo story; poll ``GET /api/stories/{number}`` for its narration."""
        from omni_devkit.demo import STORIES, play_story

        if number not in STORIES:
            raise HTTPException(404, f"no story {number}")
        if runs.get(number, {}).get("state") == "running":
            return JSONResponse(runs[number], status_code=409)
        run: dict[str, Any] = {"story": number, "state": "running", "lines": []}
        runs[number] = run
        player = stories or play_story

        async def go() -> None:
            try:
                outcome = await player(number, run["lines"].append, stack.values())
                run["state"] = outcome
            except Exception as exc:  # the page shows why; the console keeps running
                run["lines"].append(f"failed: {exc}")
                run["state"] = "failed"

        run["task"] = asyncio.create_task(go())
        return {k: v for k, v in run.items() if k != "task"}

    @app.get("/api/stories/{number}")
    async def story_state(number: int) -> Any:
        if number not in runs:
            raise HTTPException(404, f"story {number} has not been played")
        return {k: v for k, v in runs[number].items() if k != "task"}

    return app
