"""The console's backend without a stack: metrics summaries, the Maildir, feature detection."""

from __future__ import annotations

from email.message import EmailMessage

import httpx
from omni_devkit.console.app import create_console_app, read_maildir, summarise_metrics

METRICS = """\
# TYPE omni_consumer_lag gauge
omni_consumer_lag{service="inventory",group="g",topic="store.sales.v1",partition="0"} 3.0
omni_consumer_lag{service="inventory",group="g",topic="store.sales.v1",partition="1"} 2.0
# TYPE omni_outbox_backlog gauge
omni_outbox_backlog{service="inventory"} 7.0
# TYPE omni_dlq_messages counter
omni_dlq_messages_total{service="inventory",topic="store.sales.v1",reason="malformed_json"} 2.0
# TYPE omni_inventory_stock_to_availability_seconds histogram
omni_inventory_stock_to_availability_seconds_bucket{service="inventory",le="0.01"} 4.0
omni_inventory_stock_to_availability_seconds_bucket{service="inventory",le="+Inf"} 5.0
omni_inventory_stock_to_availability_seconds_count{service="inventory"} 5.0
omni_inventory_stock_to_availability_seconds_sum{service="inventory"} 0.2
"""


def test_health_is_summarised_from_the_services_metrics() -> None:
    summary = summarise_metrics(METRICS)
    assert summary["consumer_lag"] == 5
    assert summary["outbox_backlog"] == 7
    assert summary["dlq"] == {"store.sales.v1: malformed_json": 2}
    assert summary["stock_to_availability"] == {"buckets": {"0.01": 4, "+Inf": 5}, "count": 5}


def test_emails_are_read_from_the_maildir_for_one_recipient(tmp_path) -> None:
    for n, to in enumerate(["alice@example.com", "bob@example.com"]):
        message = EmailMessage()
        message["To"], message["Subject"] = to, f"Your cart {n}"
        message.set_content("You left 2 items")
        (tmp_path / "new").mkdir(exist_ok=True)
        (tmp_path / "new" / f"{n}.eml").write_bytes(message.as_bytes())
    found = read_maildir(tmp_path, "alice@example.com")
    assert [m["subject"] for m in found] == ["Your cart 0"]
    assert "2 items" in found[0]["text"]


async def test_services_not_in_the_stack_are_skipped_not_errors(tmp_path) -> None:
    env = tmp_path / "dev.env"
    env.write_text("API_KEY=secret-key\nKAFKA_BOOTSTRAP_SERVERS=127.0.0.1:1\n")
    app = create_console_app(env)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://console"
    ) as console:
        health = (await console.get("/api/health")).json()["services"]
        assert health["loyalty"] == {"skipped": "the loyalty service is not running"}
        shopper = (await console.get("/api/shoppers/demo-alice")).json()
        assert shopper["points"] == {"skipped": "the loyalty service is not running"}
        assert "skipped" in shopper["emails"]
        page = await console.get("/")
        assert page.status_code == 200 and "secret-key" not in page.text
        script = await console.get("/static/vendor/htm-preact-3.1.1.mjs")
        assert script.status_code == 200 and "useState" in script.text
        assert (await console.get("/api/shoppers/somebody")).status_code == 404
