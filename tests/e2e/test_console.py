"""The console in a real browser (headless Debian Chromium) and ``omni demo``, both against
the whole platform as ``omni dev up`` runs it (the ``dev_stack`` fixture).

Screenshots are kept as test artifacts in ``.omni/artifacts/`` (and the pytest tmp dir).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from omni_contracts import Line, Money, SaleRecorded, StockAdjusted
from omni_contracts.envelope import new_envelope
from omni_devkit.devstack.stack import read_kv_file
from omni_devkit.testing.events import ChannelPublisher

pytestmark = pytest.mark.e2e

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / ".omni" / "artifacts"


def _chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.skip("no chromium: install Debian's (`make browser`, as root) to run the browser test")


def _env(dev_stack: Any) -> dict[str, str]:
    return read_kv_file(dev_stack.config.env_file)


async def _count(env: dict[str, str], sku: str, location_id: str, counted: int) -> None:
    """A store's stock count, as its handheld publishes it; waits until inventory has it."""
    async with ChannelPublisher(env["KAFKA_BOOTSTRAP_SERVERS"]) as channel:
        await channel.publish(
            StockAdjusted(
                adjustment_id=uuid.uuid4().hex,
                location_id=location_id,
                sku=sku,
                kind="count",
                counted=counted,
                occurred_at=datetime.now(UTC),
            )
        )
    headers = {"Authorization": f"Bearer {env['API_KEY']}"}
    async with httpx.AsyncClient(base_url=env["INVENTORY_URL"], headers=headers) as http:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = (await http.get(f"/availability/{sku}")).json()["locations"]
            if any(x["location_id"] == location_id and x["on_hand"] == counted for x in found):
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"inventory did not take the count of {sku}")


async def _sell(env: dict[str, str], sku: str, location_id: str, qty: int) -> float:
    async with ChannelPublisher(env["KAFKA_BOOTSTRAP_SERVERS"], source="/channels/pos") as pos:
        await pos.publish(
            SaleRecorded(
                sale_id=uuid.uuid4().hex,
                location_id=location_id,
                lines=[
                    Line(sku=sku, qty=qty, unit_price=Money(amount=Decimal("5"), currency="EUR"))
                ],
                occurred_at=datetime.now(UTC),
            )
        )
        return time.perf_counter()


async def test_the_grid_turns_a_tile_out_of_stock_live_when_a_till_sells_the_last_units(
    dev_stack, tmp_path
) -> None:
    executable = _chromium()
    playwright_api = pytest.importorskip("playwright.async_api")
    env = _env(dev_stack)
    sku, store = f"BROWSER-{uuid.uuid4().hex[:6].upper()}", "store-017"
    await _count(env, sku, store, 3)

    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            # A phone's screen: the console must be usable there.
            page = await browser.new_page(viewport={"width": 412, "height": 915})
            await page.goto(env["CONSOLE_URL"])
            tile = page.get_by_test_id(f"cell-{sku}@{store}")
            await tile.wait_for(timeout=15_000)
            assert await tile.get_attribute("data-status") == "in_stock"
            assert (await page.get_by_test_id("live").inner_text()) == "live"
            path = tmp_path / "console-before.png"
            await page.screenshot(path=str(path), full_page=True)

            sold_at = await _sell(env, sku, store, 3)
            # Within a second, without a reload: the stream moved the tile.
            await page.wait_for_function(
                '([id]) => document.querySelector(`[data-testid="${id}"]`)'
                "?.dataset.status === 'out_of_stock'",
                arg=[f"cell-{sku}@{store}"],
                timeout=1_000,
            )
            took = time.perf_counter() - sold_at
            assert took < 1.0, f"the tile turned out of stock after {took:.2f} s"
            await page.screenshot(path=str(tmp_path / "console-after.png"), full_page=True)
            wide = await browser.new_page(viewport={"width": 1280, "height": 1000})
            await wide.goto(env["CONSOLE_URL"])
            await wide.get_by_test_id(f"cell-{sku}@{store}").wait_for(timeout=15_000)
            await wide.get_by_test_id("latency").wait_for(timeout=15_000)
            await wide.screenshot(path=str(tmp_path / "console-desktop.png"), full_page=True)
        finally:
            await browser.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for shot in tmp_path.glob("console-*.png"):
        shutil.copy(shot, ARTIFACTS / shot.name)


async def test_a_story_played_from_the_console_narrates_and_holds(dev_stack) -> None:
    env = _env(dev_stack)
    async with httpx.AsyncClient(base_url=env["CONSOLE_URL"], timeout=10) as console:
        started = await console.post("/api/stories/1")
        assert started.status_code == 200, started.text
        deadline = time.monotonic() + 30
        while (run := (await console.get("/api/stories/1")).json())["state"] == "running":
            assert time.monotonic() < deadline, run
            await asyncio.sleep(0.2)
        assert run["state"] == "passed", run
        assert any("out of stock after" in line for line in run["lines"])
        # The page never sees a key; the console's API shows what the services tell.
        health = (await console.get("/api/health")).json()["services"]
        assert health["inventory"]["up"] is True
        assert health["inventory"]["stock_to_availability"]["count"] > 0
        page = await console.get("/")
        assert env["API_KEY"] not in page.text
        shopper = (await console.get("/api/shoppers/demo-alice")).json()
        assert set(shopper) >= {"profile", "orders", "points", "notifications", "emails"}

        # A till sends garbage: the console shows the dead letter with its reason.
        sale = SaleRecorded(
            sale_id=uuid.uuid4().hex,
            location_id="store-001",
            lines=[Line(sku="X", qty=1, unit_price=Money(amount=Decimal("1"), currency="EUR"))],
            occurred_at=datetime.now(UTC),
        )
        async with ChannelPublisher(env["KAFKA_BOOTSTRAP_SERVERS"]) as pos:
            headers = new_envelope(sale, source="/channels/pos/store-001").headers()
            await pos.publish_raw("store.sales.v1", b"{not json", key="store-001", headers=headers)
        deadline = time.monotonic() + 30
        while True:
            letters = (await console.get("/api/dlq")).json()
            if any(d["reason"] == "malformed_json" for d in letters):
                break
            assert time.monotonic() < deadline, letters
            await asyncio.sleep(0.5)


def test_omni_demo_plays_every_story_against_the_stack(dev_stack) -> None:
    state = str(dev_stack.config.state_dir)
    result = subprocess.run(
        [sys.executable, "-m", "omni_devkit.cli", "demo", "--state-dir", state],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for number in range(1, 8):
        assert f"story {number}:" in result.stdout
    assert "7 stories held" in result.stdout, result.stdout


async def test_a_demo_cart_becomes_a_message_in_the_shopper_panel(dev_stack, tmp_path) -> None:
    """Story 4 from the console's button: the reminder e-mail shows in the shopper panel."""
    executable = _chromium()
    playwright_api = pytest.importorskip("playwright.async_api")
    env = _env(dev_stack)
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1000})
            await page.goto(env["CONSOLE_URL"])
            await page.get_by_test_id("play-4").click()
            story = page.get_by_test_id("story-4")
            await story.wait_for(timeout=10_000)
            async with httpx.AsyncClient(base_url=env["CONSOLE_URL"], timeout=10) as console:
                deadline = time.monotonic() + 90
                while (run := (await console.get("/api/stories/4")).json())["state"] == "running":
                    assert time.monotonic() < deadline, run
                    await asyncio.sleep(0.5)
            assert run["state"] == "passed", run
            shopper = page.get_by_test_id("shopper")
            await page.wait_for_function(
                "() => !document.querySelector('[data-testid=shopper]')"
                "?.innerText.includes('E-mails received\\nnone yet')",
                timeout=10_000,
            )
            await shopper.screenshot(path=str(tmp_path / "console-shopper.png"))
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "console-shopper.png", ARTIFACTS / "console-shopper.png")
        finally:
            await browser.close()
