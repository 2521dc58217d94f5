"""Every service starts with the settings its README documents, each at the README's example.

The source is the first table under ``## Settings`` in ``services/<name>/README.md``: one row
a variable (``variable`` column), its examples in backticks (``example`` column). Round 1 sets
every variable to its first example, as a user who typed the whole table would. Further
rounds set each to its next example (or its first again), and leave out the variables whose
row says it "wins over" others, so that what they shadow is started with too. Each round
builds the service with its ``create_app`` and runs its start-up (migrations, consumers,
relay, timers) against the test's broker and database; a round that fails names the
variables that fail.

A few examples name a file or a directory; the test makes them exist first, as a user's
machine would have them (:data:`MATERIALISED`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from omni_common.settings import ServiceSettings
from omni_devkit.testing.services import running
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[2]
FACTORIES = {ep.name: ep for ep in entry_points(group="omni.services")}
SERVICES = sorted(FACTORIES)
_NAME = re.compile(r"`([A-Z][A-Z0-9_]*)`")
_WINS_OVER = re.compile(r"wins over ((?:`[A-Z][A-Z0-9_]*`(?:,? and |, )?)+)")


@dataclass(frozen=True)
class Documented:
    """One row of a README's settings table."""

    name: str
    examples: tuple[str, ...]
    # Variables this one shadows when both are set (the row says "wins over `X`").
    wins_over: frozenset[str]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def documented_settings(readme: Path) -> list[Documented]:
    """The rows of the first table under ``## Settings`` in ``readme``."""
    lines = readme.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("## Settings")), None)
    assert start is not None, f"{readme} has no '## Settings' section"
    table: list[str] = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            table.append(line)
        elif table or line.startswith("## "):
            break
    header = [cell.lower() for cell in _cells(table[0])]
    assert "variable" in header and "example" in header, f"{readme}: columns {header}"
    variable, example = header.index("variable"), header.index("example")
    rows = []
    for line in table[2:]:
        cells = _cells(line)
        names = _NAME.findall(cells[variable])
        assert len(names) == 1, f"{readme}: one variable a row, not {cells[variable]!r}"
        shadowed = {n for group in _WINS_OVER.findall(line) for n in _NAME.findall(group)}
        examples = tuple(re.findall(r"`([^`]+)`", cells[example]))
        rows.append(Documented(names[0], examples, frozenset(shadowed)))
    return rows


def rounds(rows: list[Documented]) -> Iterator[tuple[str, dict[str, str]]]:
    """``(what, environment)`` of each start-up, as the module docstring says."""
    yield "every variable at its first example", {r.name: r.examples[0] for r in rows}
    winners = {r.name for r in rows if r.wins_over}
    further = max(len(r.examples) for r in rows)
    for k in range(1, max(further, 2 if winners else 1)):
        what = f"example {k + 1} where there is one"
        if winners:
            what += f", without {', '.join(sorted(winners))}"
        yield (
            what,
            {
                r.name: r.examples[k] if k < len(r.examples) else r.examples[0]
                for r in rows
                if r.name not in winners
            },
        )


def _private_key_file(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _service_account_key(path: Path) -> None:
    """A Google service account key file (as the Cloud console downloads it)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "omni-shop",
                "private_key_id": "0" * 40,
                "private_key": pem.decode(),
                "client_email": "notify@omni-shop.iam.gserviceaccount.com",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )


def _templates_copy(path: Path) -> None:
    packaged = Path(str(files("notification_service") / "templates"))
    shutil.copytree(packaged, path, dirs_exist_ok=True)


# Examples that name a file or directory, and how it comes to exist on a user's machine.
MATERIALISED: dict[str, Callable[[Path], None]] = {
    "VAPID_PRIVATE_KEY_FILE": _private_key_file,  # as `omni dev up` writes it
    "FCM_SERVICE_ACCOUNT_FILE": _service_account_key,  # as Google gives it out
    "NOTIFY_TEMPLATES_DIR": _templates_copy,  # a copy of the packaged templates, to edit
}


def _readme(service: str) -> Path:
    return REPO / "services" / service / "README.md"


def _settings_class(service: str) -> type[ServiceSettings]:
    """The service's own settings class, from the app its create_app builds (not started)."""
    app = FACTORIES[service].load()(ServiceSettings(service_name=service))
    return type(app.state.runtime.settings)


@pytest.mark.parametrize("service", SERVICES)
def test_every_setting_of_a_service_is_documented_with_an_example(service: str) -> None:
    rows = documented_settings(_readme(service))
    documented = [r.name for r in rows]
    assert len(documented) == len(set(documented)), f"a variable twice: {documented}"
    platform = set(ServiceSettings.model_fields)
    own = {name.upper() for name in _settings_class(service).model_fields if name not in platform}
    assert own - set(documented) == set(), f"{_readme(service)} does not document these"
    assert set(documented) - own == set(), f"{_readme(service)} documents what is not a setting"
    assert [r.name for r in rows if not r.examples] == [], "rows without an example value"
    shadowed = {n for r in rows for n in r.wins_over}
    assert shadowed <= set(documented), f"'wins over' names what is not documented: {shadowed}"


async def _start(omni_env: Any, service: str, env: dict[str, str], unset: set[str]) -> str | None:
    """Build and start ``service`` with ``env`` (and none of ``unset``): None, or why not."""
    with pytest.MonkeyPatch.context() as patch:
        for name in unset:
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        try:
            app = FACTORIES[service].load()(omni_env.settings(service))
            async with running(app):
                pass
        except ValidationError as exc:
            return "; ".join(
                f"{'.'.join(map(str, e['loc'])).upper()}={env.get(str(e['loc'][0]).upper())!r}:"
                f" {e['msg']}"
                for e in exc.errors(include_url=False, include_input=False)
            )
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
    return None


@pytest.mark.integration
@pytest.mark.parametrize("service", SERVICES)
async def test_a_service_starts_with_every_example_of_its_readme(
    service: str, omni_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = documented_settings(_readme(service))
    names = {r.name for r in rows}
    # Relative paths in the examples are relative to where the service is started.
    monkeypatch.chdir(tmp_path)
    for row in rows:
        if row.name in MATERIALISED:
            for example in row.examples:
                MATERIALISED[row.name](tmp_path / example)
    for what, env in rounds(rows):
        problem = await _start(omni_env, service, env, names)
        if problem is None:
            continue
        # Which of them fail on their own (the others unset)?
        alone = [
            f"{name}={value!r} ({why})"
            for name, value in env.items()
            if (why := await _start(omni_env, service, {name: value}, names)) is not None
        ]
        pytest.fail(
            f"{service} does not start with the examples of {_readme(service).relative_to(REPO)}"
            f" ({what}): {problem}. Failing alone: {'; '.join(alone) or 'none, only together'}"
        )
