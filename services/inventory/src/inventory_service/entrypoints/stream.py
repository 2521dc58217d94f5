"""``GET /availability/stream``: availability changes as Server-Sent Events, for the web
site's and the app's front ends (browsers and apps do not read Kafka).

Public, with no key or token, on purpose: availability is what every shop page shows to
anyone, it is neither personal nor a state change, and a browser's ``EventSource`` cannot
send an ``Authorization`` header, so a key would end up in the page or the URL (and in every
proxy log) anyway. What stays behind the API key is left out of the events (``on_hand``,
``reserved``, safety stock). Abuse is bounded instead: a cap on connected clients (503 past
it), a bounded queue per client, at most 200 SKUs and 200 locations per stream. The check
lives in one dependency, :func:`stream_access`, so it can become a scope or a short-lived
read token without touching the route.

Each event's ``id`` is the stream position (``partition:offset`` of the topic, see
:mod:`inventory_service.adapters.availability_feed`); a client that reconnects with
``Last-Event-ID`` (browsers do it by themselves) gets every change it missed, in order, from
any instance. When the history kept no longer reaches back that far the stream sends
``event: reset``: reload the current state from ``GET /availability/{sku}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, status
from fastapi.responses import StreamingResponse
from omni_common.auth import public

from inventory_service.adapters.availability_feed import (
    AvailabilityFeed,
    BadEventId,
    Filter,
    Position,
    decode_position,
    encode_position,
)

MAX_FILTER = 200


def stream_access() -> str:
    """Who may read the availability stream: anyone (see the module's docstring)."""
    return "public"


StreamAccess = Annotated[str, Depends(stream_access)]


def _event(name: str, data: str, position: Position) -> bytes:
    return f"id: {encode_position(position)}\nevent: {name}\ndata: {data}\n\n".encode()


async def _events(
    feed: AvailabilityFeed,
    flt: Filter,
    resume: Position | None,
    heartbeat_s: float,
) -> AsyncIterator[bytes]:
    # Registered here, not in the route: only a generator that started runs its ``finally``.
    # Registering and reading the backlog with no await in between: no change falls
    # between the two.
    client = feed.open(flt)
    if client is None:
        yield b"retry: 5000\n\n"
        return
    try:
        head = feed.head()
        if resume is None:
            position, backlog, gap = head, [], False
        else:
            backlog, gap = feed.backlog(flt, resume)
            position = {**{p: -1 for p in head}, **resume}
            if gap:
                position, backlog = {**position, **head}, []
        # Browsers wait this long before reconnecting after the stream ends.
        yield b"retry: 1000\n\n"
        if gap:
            yield _event("reset", '{"reason":"history no longer reaches Last-Event-ID"}', position)
        elif resume is None:
            yield _event("ready", "{}", position)
        for change in backlog:
            position[change.partition] = change.offset
            yield _event("availability", change.data, position)
        while True:
            try:
                # asyncio.timeout, not wait_for: no task per event per client.
                async with asyncio.timeout(heartbeat_s):
                    first = await client.queue.get()
            except TimeoutError:
                yield b": keep-alive\n\n"  # a comment: keeps proxies from closing the line
                continue
            # What queued meanwhile goes out in the same write: one send, not one per event.
            changes = [first]
            while not client.queue.empty():
                changes.append(client.queue.get_nowait())
            chunk = bytearray()
            for change in changes:
                if change is None:
                    break  # dropped as too slow: the client reconnects with its Last-Event-ID
                if change.offset <= position.get(change.partition, -1):
                    continue  # the client came from an instance that was further ahead
                position[change.partition] = change.offset
                chunk += _event("availability", change.data, position)
            if chunk:
                yield bytes(chunk)
            if None in changes:
                return
    finally:
        feed.close(client)


def build_stream_router(feed: AvailabilityFeed, heartbeat_s: float) -> APIRouter:
    """The stream route, bound to the service's feed (include it before ``/availability/{sku}``)."""
    router = APIRouter(tags=["availability stream"])

    @router.get(
        "/availability/stream",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "The event stream"},
            400: {"description": "A Last-Event-ID this stream did not send"},
            503: {"description": "Too many clients connected, or the feed is starting"},
        },
        dependencies=[Depends(public("what every shop page shows; EventSource sends no key"))],
    )
    async def availability_stream(
        _access: StreamAccess,
        sku: Annotated[list[str] | None, Query(description="SKUs (none: all)")] = None,
        location_id: Annotated[list[str] | None, Query(description="Locations (none: all)")] = None,
        last_event_id: Annotated[str | None, Header(max_length=100_000)] = None,
        since: Annotated[
            str | None, Query(max_length=100_000, description="Last-Event-ID, without headers")
        ] = None,
    ) -> StreamingResponse:
        """Availability changes as Server-Sent Events (``event: availability``).

        Public (no key): availability is neither personal nor a state change. Filter with
        ``sku`` and ``location_id`` (repeatable). Without ``Last-Event-ID`` the stream starts
        now with an ``event: ready`` carrying the position: load the state from
        ``GET /availability/{sku}`` after it, then apply the changes. With it, the stream
        first replays what was missed (or sends ``event: reset`` when it cannot).
        """
        if not feed.ready.is_set():
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                "the stream is catching up; retry in a second",
                headers={"Retry-After": "1"},
            )
        resume = last_event_id if last_event_id is not None else since
        try:
            position = decode_position(resume) if resume is not None else None
        except BadEventId as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
        skus = frozenset(s for s in sku or () if s)
        locations = frozenset(loc for loc in location_id or () if loc)
        if len(skus) > MAX_FILTER or len(locations) > MAX_FILTER:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                f"at most {MAX_FILTER} sku and {MAX_FILTER} location_id per stream",
            )
        flt = Filter(skus, locations)
        if feed.client_count >= feed.max_clients:
            feed.metrics.dropped.labels(feed.metrics.service, "full").inc()
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                "too many stream clients; retry later",
                headers={"Retry-After": "5"},
            )
        return StreamingResponse(
            _events(feed, flt, position, heartbeat_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router
