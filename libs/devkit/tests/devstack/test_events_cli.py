"""``omni events publish|tail`` against the real broker, as a channel team uses them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from omni_common.topics import create_topics
from omni_contracts import STORE_SALES

pytestmark = pytest.mark.integration

SALE = {
    "sale_id": "S-1",
    "location_id": "store-017",
    "lines": [{"sku": "SKU-1", "qty": 1, "unit_price": {"amount": "9.90", "currency": "EUR"}}],
    "occurred_at": "2026-12-01T10:00:00Z",
}


def omni(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omni_devkit.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture
async def env(kafka_bootstrap: str, tmp_path: Path) -> dict[str, str]:
    prefix = f"ev{uuid.uuid4().hex[:8]}."
    await create_topics(kafka_bootstrap, prefix, [STORE_SALES])
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "TOPIC_PREFIX": prefix,
        "OMNI_STATE_DIR": str(tmp_path),  # no dev.env here: the environment is used
    }


async def test_publish_validates_fills_the_envelope_and_tail_decodes_it(
    env: dict[str, str],
) -> None:
    sent = omni(
        env,
        "events",
        "publish",
        STORE_SALES,
        "--type",
        "store.sale.recorded",
        "--data",
        json.dumps(SALE),
    )
    assert sent.returncode == 0, sent.stderr
    ce_id = sent.stdout.strip()
    uuid.UUID(ce_id)
    from_stdin = omni(
        env,
        "events",
        "publish",
        STORE_SALES,
        "--type",
        "store.sale.recorded",
        "-",
        stdin=json.dumps({**SALE, "sale_id": "S-2"}),
    )
    assert from_stdin.returncode == 0, from_stdin.stderr

    tailed = omni(
        env, "events", "tail", STORE_SALES, "--from-beginning", "--json", "--idle-exit", "3"
    )
    assert tailed.returncode == 0, tailed.stderr
    messages = [json.loads(line) for line in tailed.stdout.splitlines()]
    assert [m["data"]["sale_id"] for m in messages] == ["S-1", "S-2"]
    first = messages[0]
    assert first["key"] == "store-017"  # keyed as the contract says
    headers = first["headers"]
    assert headers["ce_id"] == ce_id and headers["ce_type"] == "store.sale.recorded"
    assert headers["ce_source"] == "/channels/cli" and headers["ce_time"]
    assert headers["traceparent"].startswith("00-")

    filtered = omni(
        env,
        "events",
        "tail",
        STORE_SALES,
        "--from-beginning",
        "--idle-exit",
        "2",
        "--type",
        "store.sale.recorded",
        "--key",
        "nowhere",
    )
    assert filtered.returncode == 0 and filtered.stdout == ""


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (
            ["--type", "store.sale.recorded", "--data", json.dumps({**SALE, "lines": []})],
            "lines: List should have at least 1 item",
        ),
        (["--type", "store.sale.recorded", "--data", "{not json"], "not valid JSON"),
        (["--type", "order.placed", "--data", "{}"], "belongs on order.lifecycle.v1"),
        (["--type", "store.sale.recorded"], "exactly one of --data"),
    ],
)
async def test_an_invalid_event_is_refused_with_the_field_and_the_reason(
    env: dict[str, str], args: list[str], reason: str
) -> None:
    result = omni(env, "events", "publish", STORE_SALES, *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], lines
