"""``omni bench notify`` end to end, at a tiny scale, on the suite's broker and database."""

from __future__ import annotations

import uuid

import pytest
from notification_service.entrypoints.bench import measure
from omni_devkit.devstack.postgres import create_database

pytestmark = pytest.mark.integration


async def test_the_notify_bench_delivers_every_message_and_measures_raw_smtp(omni_env) -> None:
    database = await create_database(omni_env.server_url, f"bench_notify_{uuid.uuid4().hex[:8]}")
    lines: list[str] = []
    figures = await measure(omni_env.bootstrap, database, messages=10, say=lines.append)
    assert figures["messages"] == 10
    assert figures["notify_msgs_per_s"] > 0 and figures["raw_smtp_msgs_per_s"] > 0
    assert figures["push_rejected"] == 0
    assert any("10 shoppers known" in line for line in lines), lines
