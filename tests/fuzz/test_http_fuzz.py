"""Schemathesis against every installed service's OpenAPI, on the real app and database.

Each service (entry point group ``omni.services``) runs in this process on the real broker
and PostgreSQL and serves real HTTP on a loopback port (uvicorn); schemathesis generates
requests from the service's own OpenAPI document, valid ones (positive) and invalid ones
(negative), with an administrator's key so every route is reached, and checks each answer:
no 5xx, and every documented response matches its schema. ``OMNI_FUZZ_EXAMPLES`` sets the
examples per operation and mode (default 15; the suite stays fast).
"""

from __future__ import annotations

import asyncio
import os
import socket
import traceback
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
import schemathesis.specs.openapi.schemas  # imported in the main thread: see below
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from hypothesis import HealthCheck, Phase
from omni_common.service import service_factories
from omni_devkit.testing.plugin import TEST_API_KEY, OmniTestEnv
from omni_devkit.testing.services import running
from pydantic import BaseModel
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance

# schemathesis is a pytest plugin, so pytest rewrites its modules as they are imported; one
# imported lazily from the worker thread below once failed in CPython 3.11's AST bookkeeping
# ("AST constructor recursion depth mismatch"). Importing it above, in the main thread at
# collection, keeps that out of the threads.

pytestmark = [
    pytest.mark.integration,
    # schemathesis' own strategies trip this hypothesis deprecation; not ours to fix.
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
]

EXAMPLES = int(os.environ.get("OMNI_FUZZ_EXAMPLES", "15"))
SERVICES = sorted(service_factories())


@dataclass
class FuzzReport:
    """What one service's fuzzing ran and found."""

    service: str
    operations: int = 0
    cases: int = 0
    failures: list[str] = field(default_factory=list)


def _fuzz(raw_schema: dict[str, Any], base_url: str, service: str) -> FuzzReport:
    """Run schemathesis on every operation of ``raw_schema`` (in a worker thread)."""
    report = FuzzReport(service)
    schema = schemathesis.openapi.from_dict(raw_schema)
    session = requests.Session()
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    checks = [not_a_server_error, response_schema_conformance]
    for result in schema.get_all_operations():
        operation = result.ok()
        responses = operation.definition.raw.get("responses", {})
        if any("text/event-stream" in (r.get("content") or {}) for r in responses.values()):
            continue  # an endless event stream: its own tests cover it
        report.operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)

            @hypothesis.settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,  # the same cases every run: a failure reproduces
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @hypothesis.given(case=strategy)
            def run(case: schemathesis.Case) -> None:
                report.cases += 1
                response = case.call(base_url=base_url, session=session, headers=headers)
                case.validate_response(response, checks=checks)

            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                # No invalid request exists for this operation (e.g. a free-form path string).
                if mode is GenerationMode.POSITIVE:
                    report.failures.append(f"{operation.label}: no valid request can be made")
            # schemathesis reports through a BaseExceptionGroup; one report per operation + mode.
            except (Exception, BaseExceptionGroup) as exc:
                lines = traceback.format_exception_only(exc)
                report.failures.append(f"{operation.label} [{mode.value}]: {''.join(lines)}")
    return report


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _serve_and_fuzz(app: Any, service: str) -> FuzzReport:
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_config=None)
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to await)
            await asyncio.sleep(0.05)
        # The fuzzer's HTTP client is blocking: it runs in a thread, the app in this loop.
        return await asyncio.to_thread(_fuzz, app.openapi(), f"http://127.0.0.1:{port}", service)
    finally:
        server.should_exit = True
        await serving


async def test_the_fuzzer_finds_a_crash_and_a_lying_schema() -> None:
    """The harness itself: a route that overflows and one that breaks its schema are caught."""
    probe = FastAPI()

    class Count(BaseModel):
        n: int

    @probe.get("/overflow", response_model=Count)
    async def overflow(n: int) -> Count:
        if n > 2**31 - 1:
            raise RuntimeError("integer out of range")  # a 500, as the database would cause
        return Count(n=n)

    @probe.get("/liar", response_model=Count)
    async def liar(n: int) -> JSONResponse:
        return JSONResponse({"n": "not a number"})

    report = await _serve_and_fuzz(probe, "probe")
    failed = "\n".join(report.failures)
    assert len(report.failures) >= 2, failed
    assert "/overflow" in failed and "/liar" in failed


@pytest.mark.parametrize("service", SERVICES)
async def test_no_request_crashes_a_service_or_breaks_its_schema(
    service: str, omni_env: OmniTestEnv
) -> None:
    app = service_factories()[service].load()(omni_env.settings(service))
    async with running(app):
        report = await _serve_and_fuzz(app, service)
    print(
        f"\nschemathesis {service}: {report.operations} operations, {report.cases} cases, "
        f"{len(report.failures)} failures"
    )
    assert report.failures == [], "\n".join(report.failures)
