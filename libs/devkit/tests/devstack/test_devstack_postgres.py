"""EmbeddedPostgres: starts on a free TCP port, serves asyncpg, reuses its data dir."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from omni_devkit.devstack.postgres import EmbeddedPostgres
from omni_devkit.devstack.process import DevStackError, PortInUseError, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def root() -> Iterator[Path]:
    # Not tmp_path: the server runs as another user when we are root, and the wheel's helper
    # opens every parent directory for traversal; keep that away from pytest's private dirs.
    path = Path(tempfile.mkdtemp(prefix="omni-pg-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_starts_on_a_free_port_and_accepts_asyncpg(root: Path) -> None:
    server = EmbeddedPostgres(root / "data", free_port(), fast=True)
    started = time.monotonic()
    server.start()
    first_start = time.monotonic() - started
    try:
        conn = await asyncpg.connect(server.url())
        try:
            assert await conn.fetchval("SELECT 1") == 1
            assert await conn.fetchval("SHOW max_connections") == "300"
            assert await conn.fetchval("SHOW fsync") == "off"
        finally:
            await conn.close()
        url = await server.create_database("shop")
        assert url == server.url("shop")
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT current_database()") == "shop"
        await conn.close()
        await server.drop_database("shop")
        await server.drop_database("shop")  # absent: no error
    finally:
        server.stop()
    assert server.pid is None
    assert first_start < 15, f"initdb + start took {first_start:.1f}s"


async def test_restart_reuses_the_data_dir(root: Path) -> None:
    server = EmbeddedPostgres(root / "data", free_port(), fast=True)
    with server:
        await server.create_database("kept")
    started = time.monotonic()
    with server:
        restart = time.monotonic() - started
        conn = await asyncpg.connect(server.url("kept"))
        await conn.close()
    assert restart < 5, f"restart took {restart:.1f}s"


def test_a_taken_port_is_a_one_line_error(root: Path) -> None:
    with EmbeddedPostgres(root / "a", free_port(), fast=True) as first:
        second = EmbeddedPostgres(root / "b", first.port, fast=True)
        with pytest.raises(PortInUseError, match=f"port {first.port} .* already in use"):
            second.start()
        # The same data dir cannot be served twice either.
        third = EmbeddedPostgres(root / "a", free_port(), fast=True)
        with pytest.raises(DevStackError, match="already runs"):
            third.start()
