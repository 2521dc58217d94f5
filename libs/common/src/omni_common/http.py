"""The HTTP side of every service: probes, authentication, request metrics, and the
Prometheus metrics on a port of their own (``METRICS_PORT``, :func:`serve_metrics`).

:func:`create_http_app` gives every service the same guards by construction: request
bodies capped before they are read (413), database data errors answered 422, a request
that lost a race in the database run again (503 if it keeps losing, never 500), ``/docs``
and ``/openapi.json`` off unless ``HTTP_DOCS_ENABLED``, and shopper-token verification
for the route dependencies of :mod:`omni_common.auth` (``require``, ``require_shopper``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from omni_contracts.asyncapi import service_document, to_html, to_yaml
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omni_common.auth import ShopperTokens, api_key_of
from omni_common.dispatch import UNSTORABLE
from omni_common.faults import Backoff, is_contention
from omni_common.service import ServiceRuntime
from omni_common.settings import Misconfigured

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="A channel's API key")


def authenticated_channel(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The channel whose API key authenticates this request; 401 without a valid key.

    Any valid key passes: routes declare what they need with :func:`omni_common.auth.require`
    instead (this stays for probes of who is calling).
    """
    return api_key_of(request, credentials).channel


Channel = Annotated[str, Depends(authenticated_channel)]
"""Route parameter type for the calling channel (any valid key; prefer ``require``)."""


class BodyLimit:
    """ASGI middleware refusing request bodies above ``max_bytes`` (413) before the app
    parses them: by ``Content-Length`` up front, else by reading at most ``max_bytes`` of
    the stream (a chunked body) before handing it on."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on whole, or answer 413 without passing it on."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(send)
                    return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client left: let the app see the disconnect as it would have.
                await self.app(scope, _replay([message], receive), send)
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        first: Message = {"type": "http.request", "body": bytes(body), "more_body": False}
        await self.app(scope, _replay([first], receive), send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body larger than {self.max_bytes} bytes"}, status_code=413
        )
        await response({"type": "http"}, _no_receive, send)


class ContentionRetry:
    """ASGI middleware running again a request that lost a race in the database.

    A deadlock, a serialization failure or a lock timeout (:func:`omni_common.faults.
    is_contention`) says nothing about the request: the losing transaction rolled back
    whole, and trying again usually wins. So the request runs again, up to ``attempts``
    times with a short backoff, on the same body; if it keeps losing, it is answered 503 with
    ``Retry-After``, never 500. Only before the response has started (a stream that
    already sent its head is not run again) and only for a lost race: any other failure
    passes on at once. Every service's mutating routes are written to be repeated: each
    transaction rolls back whole, and what spans several (idempotency keys, ``PUT``)
    finds the state a first attempt left and goes on from it.
    """

    def __init__(
        self, app: ASGIApp, attempts: int = 4, backoff_s: float = 0.02, max_backoff_s: float = 0.2
    ) -> None:
        self.app = app
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, again while it loses races; 503 when it never wins."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received: list[Message] = []

        async def recording() -> Message:
            message = await receive()
            received.append(message)
            return message

        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        backoff = Backoff(self.backoff_s, self.max_backoff_s)
        for attempt in range(1, self.attempts + 1):
            try:
                # A later attempt reads the body the first one read, then what follows.
                await self.app(scope, _replay(list(received), recording), sending)
                return
            except Exception as exc:
                if started or not is_contention(exc):
                    raise
                log.info(
                    "%s %s lost a race in the database (attempt %d of %d): %s",
                    scope.get("method"),
                    scope.get("path"),
                    attempt,
                    self.attempts,
                    type(exc).__name__,
                )
                if attempt < self.attempts:
                    await backoff.sleep()
        response = JSONResponse(
            {
                "detail": {
                    "reason": "contention",
                    "message": "the request kept losing a race for the same data; retry it",
                }
            },
            status_code=503,
            headers={"Retry-After": "1"},
        )
        await response(scope, _no_receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replaying() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replaying


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _data_error(_: Request, exc: Exception) -> JSONResponse:
    # What the database could never store (a number out of its column's range, a NUL in
    # text, an over-long string) is the caller's error: 422 with the database's reason
    # class, never the statement or the value.
    reason = type(exc).__name__.removesuffix("Error") or "DataError"
    return JSONResponse(
        {"detail": {"reason": "invalid_value", "message": f"a value cannot be stored ({reason})"}},
        status_code=422,
    )


def create_http_app(
    runtime: ServiceRuntime,
    *,
    title: str,
    description: str = "",
    routers: list[APIRouter] | None = None,
) -> FastAPI:
    """A FastAPI app that starts and stops ``runtime`` with it and serves the probes."""

    settings = runtime.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for warning in settings.startup_warnings():
            log.warning("%s", warning)
        if refusals := settings.startup_refusals():
            # Before anything binds or migrates: a misconfigured instance never takes work.
            raise Misconfigured(f"{settings.service_name} refuses to start: {'; '.join(refusals)}")
        # Bound first: a port already taken stops the start before anything migrates. Open
        # until the runtime has stopped, so the drain can still be watched.
        async with serve_metrics(
            runtime.metrics.registry, settings.http_host, settings.metrics_port
        ) as address:
            app.state.metrics_address = address
            log.info("metrics on http://%s:%d/metrics", *address)
            await runtime.start()
            try:
                yield
            finally:
                await runtime.stop()

    docs = settings.http_docs_enabled
    app = FastAPI(
        title=title,
        description=description,
        lifespan=lifespan,
        version="1.0.0",
        # The schema stays available to code (app.openapi()) for tests and the fuzzer.
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.runtime = runtime
    app.state.shopper_tokens = ShopperTokens.from_settings(settings)
    metrics = runtime.metrics
    # Inside the body limit: the body it replays to a second attempt is bounded.
    app.add_middleware(ContentionRetry)
    app.add_middleware(BodyLimit, max_bytes=settings.http_max_body_bytes)
    # Server-side data errors (SQLSTATE class 22) and asyncpg's own refusal to encode an
    # argument (e.g. an int beyond int32) both mean "this value does not fit".
    for unstorable in UNSTORABLE:
        app.add_exception_handler(unstorable, _data_error)

    @app.middleware("http")
    async def red_metrics(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            if path not in ("/healthz", "/readyz"):
                metrics.http_requests.labels(
                    metrics.service, request.method, path, str(status)
                ).inc()
                metrics.http_duration.labels(metrics.service, request.method, path).observe(
                    time.perf_counter() - started
                )

    @app.get("/healthz", tags=["probes"], include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"], include_in_schema=False)
    async def readyz() -> JSONResponse:
        """Readiness: database reachable, broker connected, consumers running."""
        problem = await runtime.check_ready()
        if problem:
            return JSONResponse({"status": "not ready", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ready"})

    # Public, like the contract itself; not in the OpenAPI document of the service's API.
    @app.get("/asyncapi.yaml", response_class=PlainTextResponse, include_in_schema=False)
    async def asyncapi_yaml() -> PlainTextResponse:
        """The AsyncAPI 3 document of the events this service consumes and produces."""
        return PlainTextResponse(to_yaml(_service_contract(runtime)), media_type="application/yaml")

    @app.get("/asyncapi", response_class=HTMLResponse, include_in_schema=False)
    async def asyncapi_page() -> HTMLResponse:
        """The same document as a readable page, for channel teams."""
        return HTMLResponse(to_html(_service_contract(runtime)))

    for router in routers or []:
        app.include_router(router)
    return app


# A scrape's request head is short: one far longer is not Prometheus.
_METRICS_HEAD_LIMIT = 8192


@asynccontextmanager
async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, *, timeout_s: float = 10.0
) -> AsyncIterator[tuple[str, int]]:
    """Serve ``GET /metrics`` (Prometheus text format) of ``registry`` on ``host:port``
    while open; yields the address bound (port 0: one the kernel picked).

    Its own port, apart from the API's: Prometheus scrapes it from inside the cluster, and
    the Service and Ingress that expose the API never route to it, so no key is needed and
    none is asked. A listener on the service's event loop (no thread and no timer of its
    own: an idle service does not wake up for it); every connection answers one request and
    closes, within ``timeout_s``.
    """

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].split(b" ")
                if line[0] == b"GET" and len(line) == 3 and line[1].split(b"?")[0] == b"/metrics":
                    status, kind = b"200 OK", CONTENT_TYPE_LATEST.encode()
                    body = generate_latest(registry)
                else:
                    status, kind, body = b"404 Not Found", b"text/plain", b"not found\n"
                writer.write(
                    b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n%s" % (status, kind, len(body), body)
                )
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # a client that left, stalled or sent no HTTP: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(answer, host, port, limit=_METRICS_HEAD_LIMIT)
    try:
        bound = server.sockets[0].getsockname()
        yield str(bound[0]), int(bound[1])
    finally:
        server.close()
        await server.wait_closed()


def _service_contract(runtime: ServiceRuntime) -> dict[str, object]:
    kafka = runtime.kafka
    return service_document(
        runtime.settings.service_name, consumes=kafka.consumes, produces=kafka.produces
    )


def request_runtime(request: Request) -> ServiceRuntime:
    """The runtime of the app serving ``request`` (a FastAPI dependency)."""
    runtime: ServiceRuntime = request.app.state.runtime
    return runtime


Runtime = Annotated[ServiceRuntime, Depends(request_runtime)]
"""Route parameter type giving the service runtime."""
