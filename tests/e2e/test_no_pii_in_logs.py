"""A shopper journey with a known e-mail and phone leaves neither in any service's log.

Every installed service (entry point group ``omni.services``) runs in this process at DEBUG
level, so services added later join the check by being installed. The journey sends the
e-mail and phone where channels do: in a checkout's delivery address, in a contact update,
in extra fields, and in a malformed message that ends in the DLQ. Both the raw log records
and the lines as the services write them (JSON) are searched.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import uuid
from typing import Any

import pytest
from omni_common.logging import NOISY_LOGGERS, log_handler
from omni_common.service import service_factories
from omni_contracts import CheckoutSubmitted, ContactDetailsUpdated
from omni_devkit.testing.events import ChannelPublisher, ce_headers
from omni_devkit.testing.plugin import TEST_CHANNEL_KEYS, OmniTestEnv
from omni_devkit.testing.services import RunningService, running

pytestmark = pytest.mark.e2e

EMAIL = "jane.doe.pii-probe@example.org"
PHONE = "+33 6 12 34 56 78"
NAME = "Jane Piiprobe"
STREET = "17 Rue des Secrets"


class _Records(logging.Handler):
    """Keeps each record's text as logged, before any redaction filter touches it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            text += record.exc_text
        self.records.append((record.name, text))


def _leaks(text: str) -> list[str]:
    found = [probe for probe in (EMAIL, PHONE, NAME, STREET) if probe in text]
    if PHONE.replace(" ", "") in text:
        found.append("phone (compact)")
    return found


def _checkout(customer: str, **extra: Any) -> dict[str, Any]:
    return {
        "checkout_id": f"chk-{uuid.uuid4().hex[:8]}",
        "customer_id": customer,
        "channel": "web",
        "lines": [
            {"sku": "SKU-PII", "qty": 1, "unit_price": {"amount": "9.00", "currency": "EUR"}}
        ],
        "fulfillment": {
            "type": "delivery",
            "address": {
                "line1": STREET,
                "city": "Lyon",
                "postal_code": "69001",
                "country": "FR",
                "recipient": NAME,
                "phone": PHONE,
            },
        },
        "payment": {"reference": "pay-pii", "authorized": {"amount": "9.00", "currency": "EUR"}},
        "contact_email": EMAIL,  # extra fields are kept by the contract
        **extra,
    }


async def test_a_shoppers_email_and_phone_never_reach_a_log(omni_env: OmniTestEnv) -> None:
    raw = _Records()
    written = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    # Our code at DEBUG; libraries as every service configures them (configure_logging).
    root.setLevel(logging.DEBUG)
    noisy = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    root.addHandler(raw)
    root.addHandler(log_handler("pii-probe", json_output=True, stream=written))
    customer = f"cust-pii-{uuid.uuid4().hex[:6]}"
    try:
        async with contextlib.AsyncExitStack() as stack:
            services: dict[str, RunningService] = {}
            for name, entry in sorted(service_factories().items()):
                app = entry.load()(omni_env.settings(name))
                services[name] = await stack.enter_async_context(running(app))
            channel = await stack.enter_async_context(
                ChannelPublisher(omni_env.bootstrap, omni_env.prefix)
            )
            placed_reader = await stack.enter_async_context(omni_env.reader("order.lifecycle.v1"))
            dlq = await stack.enter_async_context(omni_env.reader("checkout.submitted.v1.dlq"))

            # Over HTTP, as the web site would, with the shopper's token.
            order = services["order"]
            headers = {
                "Authorization": f"Bearer {TEST_CHANNEL_KEYS['web']}",
                "X-Shopper-Token": omni_env.shopper_token(customer),
            }
            placed = await order.http.post("/orders", json=_checkout(customer), headers=headers)
            assert placed.status_code == 201, placed.text
            # Refused bodies carrying the same data (errors are logged by some frameworks).
            bad = _checkout(customer, lines=[{"sku": EMAIL, "qty": -1}])
            assert (await order.http.post("/orders", json=bad, headers=headers)).status_code == 422
            history = await order.http.get(f"/customers/{customer}/orders", headers=headers)
            assert history.status_code == 200

            # Over Kafka: a checkout, a contact update, and a malformed checkout (to the DLQ).
            await channel.publish(CheckoutSubmitted(**_checkout(customer)))
            await channel.publish(
                ContactDetailsUpdated(customer_id=customer, email=EMAIL, phone=PHONE)
            )
            broken = json.dumps({**_checkout(customer), "lines": [{"sku": "x", "qty": PHONE}]})
            await channel.publish_raw(
                "checkout.submitted.v1",
                broken.encode(),
                key=customer,
                headers=ce_headers("checkout.submitted"),
            )
            await dlq.next(timeout=20)
            placed_events = await placed_reader.collect(2, 20)
            assert len(placed_events) == 2
            await asyncio.sleep(0.5)  # let consumers of other services log what they do
    finally:
        root.removeHandler(raw)
        root.setLevel(saved[0])
        for name, level in noisy.items():
            logging.getLogger(name).setLevel(level)
        root.handlers[:] = saved[1]

    assert raw.records, "no log record at all: the capture is broken"
    leaking = []
    for logger, text in raw.records:
        if found := _leaks(text):
            leaking.append(f"{logger}: {found}: {text[:300]}")
    assert leaking == [], "\n".join(leaking)
    assert _leaks(written.getvalue()) == []
    print(f"{len(raw.records)} log records of {len(service_factories())} services, no PII")
