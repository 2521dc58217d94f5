"""A channel written in TypeScript, against the real inventory and order services.

The Node program ``libs/contracts/typescript/e2e/roundtrip.ts`` uses kafkajs and the
``@omni/contracts`` package alone: it publishes a stock receipt, a store sale and a checkout
as a warehouse system, a till and a web shop would, reads ``inventory.availability.v1`` and
``order.lifecycle.v1`` back and validates every record with ajv against the committed JSON
Schemas (``docs/schemas/``), refusing any field they lack. So a field renamed in a Python
model without ``make contracts`` fails here, on the wire, as it would fail a channel team;
the test runs the program a second time against schemas that lag the code that way, and
sees it fail.

Needs ``node`` (skipped without it) and the package's ``node_modules`` (``make test`` runs
``npm ci`` once, from the lock file).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from inventory_service.entrypoints.app import create_app as create_inventory
from omni_devkit.testing.plugin import OmniTestEnv
from omni_devkit.testing.services import running
from order_service.entrypoints.app import create_app as create_order

NODE, NPM = shutil.which("node"), shutil.which("npm")
# At module level, so that without Node no broker or database is started for nothing.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        NODE is None or NPM is None,
        reason="node and npm are not on this machine: the Node round trip needs them",
    ),
]

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "libs" / "contracts" / "typescript"
COMMITTED_SCHEMAS = REPO / "docs" / "schemas"
STORE = "store-node-1"


@pytest.fixture(scope="module")
def node_program() -> Iterator[list[str]]:
    """The round trip's command line, once the package is built (``tsc --strict``)."""
    assert NODE is not None and NPM is not None
    if not (PACKAGE / "node_modules" / ".package-lock.json").is_file():
        pytest.fail(
            f"{PACKAGE}/node_modules is missing: run `make test`, or `npm ci` in that folder"
        )
    built = subprocess.run(
        [NPM, "run", "build", "--silent"],
        cwd=PACKAGE,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, f"tsc failed:\n{built.stdout}\n{built.stderr}"
    yield [NODE, str(PACKAGE / "dist" / "e2e" / "roundtrip.js")]


async def run_node(
    program: list[str], env: OmniTestEnv, schemas: Path | None = None
) -> tuple[int, dict[str, Any], str]:
    """Run the Node channel against ``env``'s topics: exit code, summary, all it printed."""
    extra = {"OMNI_SCHEMAS_DIR": str(schemas)} if schemas is not None else {}
    proc = await asyncio.create_subprocess_exec(
        *program,
        cwd=PACKAGE,
        env={
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": env.bootstrap,
            "TOPIC_PREFIX": env.prefix,
            "ROUNDTRIP_STORE": STORE,
            "ROUNDTRIP_TIMEOUT_MS": "60000",
            **extra,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    # The services answer in this event loop while the program waits for them.
    out, err = await asyncio.wait_for(proc.communicate(), timeout=240)
    printed = out.decode() + err.decode()
    lines = out.decode().strip().splitlines()
    assert lines, f"the Node program printed nothing (exit {proc.returncode}):\n{printed}"
    return proc.returncode or 0, json.loads(lines[-1]), printed


def renamed_in_the_code(tmp_path: Path) -> Path:
    """docs/schemas/ as if ``online_available`` had been renamed in the model (to what the
    committed schema now calls ``online_sellable``) without ``make contracts``."""
    copy = tmp_path / "schemas"
    shutil.copytree(COMMITTED_SCHEMAS, copy)
    path = copy / "inventory.availability.changed.json"
    schema = json.loads(path.read_text())
    properties = schema["properties"]
    schema["properties"] = {
        ("online_sellable" if name == "online_available" else name): value
        for name, value in properties.items()
    }
    schema["required"] = [
        "online_sellable" if name == "online_available" else name for name in schema["required"]
    ]
    path.write_text(json.dumps(schema))
    return copy


async def test_a_node_channel_sells_and_checks_out_and_reads_valid_events_back(
    omni_env: OmniTestEnv, node_program: list[str], tmp_path: Path
) -> None:
    async with (
        running(create_inventory(omni_env.settings("inventory"))) as inventory,
        running(create_order(omni_env.settings("order"))),
    ):
        # Where stock lives is set up through inventory's API, not an event.
        response = await inventory.http.put(
            f"/locations/{STORE}",
            json={"name": "Node store", "kind": "store", "offers_pickup": True},
        )
        assert response.status_code in (200, 201), response.text
        code, summary, printed = await run_node(node_program, omni_env)
        assert code == 0 and summary["ok"], json.dumps(summary, indent=2) + "\n" + printed
        assert summary["problems"] == []
        assert summary["steps"] == [
            "receipt -> availability",
            "sale -> availability, order.placed",
            "checkout -> order.placed, order.confirmed, availability",
        ]
        types = summary["types"]
        assert types["inventory.availability.changed"] >= 3
        assert types["order.placed"] >= 2 and types["order.confirmed"] >= 1
        assert summary["validated"] == sum(types.values())

        # The same program, the code's field now differing from the committed schema.
        code, summary, printed = await run_node(
            node_program, omni_env, renamed_in_the_code(tmp_path)
        )
    assert code == 1 and not summary["ok"], printed
    problems = "\n".join(summary["problems"])
    assert "must have required property 'online_sellable'" in problems
    assert "/online_available: not in the committed schema" in problems
