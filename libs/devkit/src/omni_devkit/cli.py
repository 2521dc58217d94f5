"""``omni``: the platform's command line (dev stack, services, topics, migrations, docs, benches).

Expected failures (a port in use, a stack already running, an unknown service, an unreachable
broker) end with one line on stderr and a non-zero exit code, never a traceback.

Benchmarks: other modules add commands with ``@bench_app.command()``; installed packages
register such modules under the entry point group ``omni.bench`` (loaded for ``omni bench``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from omni_common.topics import TopicsError

from omni_devkit.devstack.process import DevStackError, ensure_port_free, run_blocking, tail

BENCH_ENTRY_POINT_GROUP = "omni.bench"

app = typer.Typer(
    name="omni",
    help="Omnichannel retail platform: dev stack, services, topics, migrations, docs, benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dev_app = typer.Typer(
    help="The local dev stack (PostgreSQL, Kafka, every service).", no_args_is_help=True
)
topics_app = typer.Typer(help="Kafka topics of the catalogue.", no_args_is_help=True)
docs_app = typer.Typer(help="Generated documentation.", no_args_is_help=True)
dlq_app = typer.Typer(
    help="Dead-lettered messages: list them, show one, replay them to their source topic, "
    "purge one shopper's.",
    no_args_is_help=True,
)
bench_app = typer.Typer(
    help="Benchmarks. Modules add commands with @bench_app.command().", no_args_is_help=True
)
app.add_typer(dev_app, name="dev")
app.add_typer(topics_app, name="topics")
app.add_typer(docs_app, name="docs")
app.add_typer(dlq_app, name="dlq")
app.add_typer(bench_app, name="bench")
events_app = typer.Typer(
    help="Publish and tail contract events (CloudEvents-aware, validated).", no_args_is_help=True
)
contracts_app = typer.Typer(help="The public contract: compatibility gate.", no_args_is_help=True)
app.add_typer(events_app, name="events")
app.add_typer(contracts_app, name="contracts")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` (one line) to stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def echo(line: str) -> None:
    """Print a progress line now (also when stdout is a file)."""
    typer.echo(line)
    sys.stdout.flush()


# -- dev -------------------------------------------------------------------------------------

StateDirOption = Annotated[
    Path | None,
    typer.Option(help="State directory [default: $OMNI_STATE_DIR or .omni in the repo root]"),
]


def _config(
    state_dir: Path | None = None,
    kafka_port: int | None = None,
    pg_port: int | None = None,
    http_base_port: int | None = None,
    metrics_base_port: int | None = None,
) -> Any:
    from omni_devkit.devstack.stack import DevStackConfig

    return DevStackConfig.from_env(
        state_dir=state_dir,
        kafka_port=kafka_port,
        pg_port=pg_port,
        http_base_port=http_base_port,
        metrics_base_port=metrics_base_port,
    )


@dev_app.command("up")
def dev_up(
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Run in the background; return once ready.")
    ] = False,
    kafka_port: Annotated[
        int | None, typer.Option(help="Kafka port [default: $OMNI_KAFKA_PORT or 9092]")
    ] = None,
    pg_port: Annotated[
        int | None, typer.Option(help="PostgreSQL port [default: $OMNI_PG_PORT or 5432]")
    ] = None,
    http_base_port: Annotated[
        int | None,
        typer.Option(help="First service port [default: $OMNI_HTTP_BASE_PORT or 8001]"),
    ] = None,
    metrics_base_port: Annotated[
        int | None,
        typer.Option(
            help="First service's metrics port [default: $OMNI_METRICS_BASE_PORT or 8101]"
        ),
    ] = None,
    state_dir: StateDirOption = None,
) -> None:
    """Start PostgreSQL, Kafka (Apache Kafka given Java 17+, else Tansu), topics, services."""
    from omni_devkit.devstack.stack import DevStack, handle_termination

    config = _config(state_dir, kafka_port, pg_port, http_base_port, metrics_base_port)
    if detach:
        _up_detached(config)
        return
    stack = DevStack(config, echo=echo)
    with handle_termination():
        try:
            stack.up()
        except KeyboardInterrupt:
            fail("interrupted; everything that had started was stopped", 130)
        try:
            for line in stack.summary():
                echo(line)
            echo("press Ctrl-C to stop (or run `omni dev down` in another shell)")
            stack.supervise()
        except KeyboardInterrupt:  # arrived before supervise() took over
            echo("stopping ...")
            stack.stop()
    echo("dev stack stopped")


def _up_detached(config: Any) -> None:
    """Run ``omni dev up`` as a background supervisor; wait until it is ready or failed."""
    from omni_devkit.devstack.stack import (
        DevStack,
        format_summary,
        read_kv_file,
        read_pids,
        rotate_log,
    )

    DevStack(config).check_can_start()  # fail fast with a one-line reason
    config.logs_dir.mkdir(parents=True, exist_ok=True)
    log_path: Path = config.supervisor_log
    rotate_log(log_path)
    offset = 0
    cmd = [
        sys.executable,
        "-m",
        "omni_devkit.cli",
        "dev",
        "up",
        "--state-dir",
        str(config.state_dir),
        "--kafka-port",
        str(config.kafka_port),
        "--pg-port",
        str(config.pg_port),
        "--http-base-port",
        str(config.http_base_port),
        "--metrics-base-port",
        str(config.metrics_base_port),
    ]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives this shell; `omni dev down` stops it
        )
    echo(f"starting the dev stack in the background (pid {proc.pid}, log {log_path})")
    deadline = time.monotonic() + config.ready_timeout + 60
    while True:
        offset = _relay_progress(log_path, offset)
        code = proc.poll()
        if code is not None:
            _relay_progress(log_path, offset)
            errors = [ln for ln in tail(log_path, 50) if ln.startswith("error: ")]
            reason = errors[-1].removeprefix("error: ") if errors else f"exit code {code}"
            fail(f"the dev stack did not start: {reason}")
        if read_pids(config).get("supervisor") == proc.pid and config.env_file.exists():
            break
        if time.monotonic() > deadline:
            DevStack.down(config, echo=lambda _: None)
            fail(f"the dev stack was not ready in time; see {log_path}")
        time.sleep(0.2)
    for line in format_summary(config, read_kv_file(config.env_file)):
        echo(line)
    echo("stop it with `omni dev down`")


def _relay_progress(log_path: Path, offset: int) -> int:
    """Echo the supervisor's new progress lines; return the new file offset."""
    try:
        with log_path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return offset
    complete, newline, _ = data.rpartition(b"\n")
    if not newline:
        return offset
    for line in complete.decode("utf-8", errors="replace").splitlines():
        if line.startswith("omni dev stack is up"):
            break  # the summary: printed by the caller from dev.env
        if line.startswith(("- ", "  ", "service ", "! ")):
            echo(line)
    return offset + len(complete) + 1


@dev_app.command("down")
def dev_down(state_dir: StateDirOption = None) -> None:
    """Stop the dev stack (services, then Kafka, then PostgreSQL)."""
    from omni_devkit.devstack.stack import DevStack

    if not DevStack.down(_config(state_dir), echo=echo):
        echo("no dev stack is running")


@dev_app.command("status")
def dev_status(state_dir: StateDirOption = None) -> None:
    """Show the dev stack's processes and each service's readiness."""
    from omni_devkit.devstack.stack import DevStack

    config = _config(state_dir)
    status = DevStack.status(config)
    if not status.running:
        fail("no dev stack is running (start one with `omni dev up`)")
    for name, (pid, alive) in status.processes.items():
        url, state = status.services.get(name, ("", ""))
        line = f"{name:<17} pid {pid:<8} {'running' if alive else 'DEAD':<8}"
        if url:
            line += f" {url:<24} {state}"
        echo(line.rstrip())
    if "KAFKA_BOOTSTRAP_SERVERS" in status.env:
        echo(f"env: {config.env_file}")
    if not status.healthy:
        fail("the dev stack is not healthy")


@dev_app.command("token")
def dev_token(
    customer_id: Annotated[str, typer.Argument(help="The shopper the token is for (its sub)")],
    ttl: Annotated[int, typer.Option(help="Seconds the token is valid")] = 3600,
    state_dir: StateDirOption = None,
) -> None:
    """Print a shopper token for CUSTOMER_ID that the running dev stack accepts.

    Send it as ``X-Shopper-Token`` with a web or app key to read that shopper's orders.
    """
    from omni_devkit.devstack.stack import read_kv_file
    from omni_devkit.tokens import mint_shopper_token

    config = _config(state_dir)
    env = read_kv_file(config.env_file) if config.env_file.exists() else {}
    secret = env.get("SHOPPER_TOKEN_HS256_SECRET")
    if not secret:
        fail(f"no shopper token secret in {config.env_file}: start the stack with `omni dev up`")
    typer.echo(
        mint_shopper_token(
            secret,
            customer_id,
            ttl_s=ttl,
            issuer=env.get("SHOPPER_TOKEN_ISSUER") or None,
            audience=env.get("SHOPPER_TOKEN_AUDIENCE") or None,
        )
    )


# -- services --------------------------------------------------------------------------------


@app.command("run")
def run_service(
    service: Annotated[str, typer.Argument(help="Service name, e.g. inventory")],
) -> None:
    """Run one service (HTTP API, consumers, outbox relay) until SIGTERM/Ctrl-C.

    The same as ``omni-service SERVICE``, the container image's entry point.
    """
    from omni_common.run import serve
    from omni_common.settings import ServiceSettings

    from omni_devkit.devstack.stack import load_service_factory

    # The dev stack's discovery (it honours OMNI_SERVICES), then the image's entry point.
    factory = load_service_factory(service)
    settings = ServiceSettings(service_name=service)
    ensure_port_free(settings.http_host, settings.http_port, f"service {service}")
    code = serve(service, factory)
    if code:
        fail(f"service {service} failed to start (see the log lines above)", code)


@app.command("migrate")
def migrate_command(
    target: Annotated[str, typer.Argument(help="A service name, or 'all'")],
) -> None:
    """Apply pending database migrations of one service, or of all (DATABASE_URL)."""
    from omni_common.db import migrate
    from omni_common.settings import ServiceSettings

    from omni_devkit.devstack.stack import discover_services, service_package

    names = list(discover_services()) if target == "all" else [target]
    for name in names:
        package: str | None = f"{service_package(name)}.migrations"
        if importlib.util.find_spec(package) is None:
            echo(f"{name}: no package {package}; applying the common tables only")
            package = None
        settings = ServiceSettings(service_name=name)
        try:
            applied = run_blocking(migrate(settings, package))
        except (OSError, TimeoutError) as exc:
            fail(f"cannot reach the database for {name}: {exc}")
        except Exception as exc:
            if type(exc).__module__.startswith("asyncpg"):
                fail(f"migrating {name} failed: {type(exc).__name__}: {exc}")
            raise
        done = ", ".join(applied) if applied else "already up to date"
        echo(f"{name} (schema {settings.schema}): {done}")


# -- topics ----------------------------------------------------------------------------------


@topics_app.command("create")
def topics_create(
    prefix: Annotated[
        str | None, typer.Option(help="Prefix for every topic name [default: $TOPIC_PREFIX]")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker")] = 10.0,
) -> None:
    """Create every catalogue topic and its .dlq on KAFKA_BOOTSTRAP_SERVERS."""
    from omni_common.settings import ServiceSettings
    from omni_common.topics import create_topics, wait_for_broker

    settings = ServiceSettings()
    bootstrap = settings.kafka_bootstrap_servers
    chosen = settings.topic_prefix if prefix is None else prefix

    async def work() -> list[str]:
        await wait_for_broker(bootstrap, timeout)
        return await create_topics(bootstrap, chosen)

    echo(f"creating topics on {bootstrap}{f' with prefix {chosen!r}' if chosen else ''} ...")
    created = run_blocking(work())
    for name in created:
        echo(f"  created {name}")
    echo(f"{len(created)} topics created (the others already existed)")


# -- dlq -------------------------------------------------------------------------------------

TopicArgument = Annotated[
    str, typer.Argument(help="Contract topic (or its .dlq), e.g. inventory.adjustments.v1")
]
ReasonOption = Annotated[
    str | None, typer.Option("--reason", help="Only messages dead-lettered for this reason")
]
SinceOption = Annotated[
    str | None,
    typer.Option("--since", help="Only messages dead-lettered since: 30m, 2h, 1d or an ISO time"),
]
BootstrapOption = Annotated[
    str | None,
    typer.Option(
        "--bootstrap",
        help="Kafka bootstrap servers [default: $KAFKA_BOOTSTRAP_SERVERS, else the dev stack's]",
    ),
]
PrefixOption = Annotated[
    str | None, typer.Option(help="Topic name prefix [default: $TOPIC_PREFIX]")
]


def _dlq_target(topic: str, bootstrap: str | None, prefix: str | None) -> tuple[str, str, str]:
    """``(bootstrap, physical dlq topic, physical source topic)``."""
    from omni_devkit.dlq import dlq_topic_name

    servers, chosen_prefix = _dlq_where(bootstrap, prefix)
    return servers, *dlq_topic_name(topic, chosen_prefix)


def _dlq_where(bootstrap: str | None, prefix: str | None) -> tuple[str, str]:
    """``(bootstrap, topic prefix)``: the options, else the environment, else the dev stack."""
    import os

    from omni_common.settings import ServiceSettings

    from omni_devkit.devstack.stack import default_state_dir, read_kv_file

    if bootstrap is None:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if bootstrap is None:
        dev_env = read_kv_file(default_state_dir() / "dev.env")
        bootstrap = dev_env.get("KAFKA_BOOTSTRAP_SERVERS")
    settings = ServiceSettings()
    bootstrap = bootstrap or settings.kafka_bootstrap_servers
    return bootstrap, settings.topic_prefix if prefix is None else prefix


def _dlq_run(coro: Any) -> Any:
    from omni_devkit.dlq import DlqError

    try:
        return run_blocking(coro)
    except DlqError as exc:
        fail(str(exc))


@dlq_app.command("list")
def dlq_list(
    topic: TopicArgument,
    reason: ReasonOption = None,
    since: SinceOption = None,
    bootstrap: BootstrapOption = None,
    prefix: PrefixOption = None,
) -> None:
    """List the dead-lettered messages of TOPIC: id, time, reason, event type, error."""
    from collections import Counter

    from omni_devkit.dlq import DlqError, parse_since, read_dead_letters

    servers, dlq_topic, _ = _dlq_target(topic, bootstrap, prefix)
    try:
        since_at = parse_since(since) if since else None
    except DlqError as exc:
        fail(str(exc))
    letters = _dlq_run(read_dead_letters(servers, dlq_topic, reason=reason, since=since_at))
    for letter in letters:
        error = letter.header("dlq_error").replace("\n", " ")
        echo(
            f"{letter.ref:<9} {letter.timestamp:%Y-%m-%d %H:%M:%S}Z  {letter.reason:<20} "
            f"{letter.header('ce_type', '-'):<32} {letter.ce_id or '-':<36}  {error[:120]}"
        )
    counts = Counter(letter.reason for letter in letters)
    summary = ", ".join(f"{n} {why}" for why, n in counts.most_common())
    echo(f"{len(letters)} dead-lettered in {dlq_topic}" + (f" ({summary})" if summary else ""))


@dlq_app.command("show")
def dlq_show(
    topic: TopicArgument,
    message: Annotated[str, typer.Argument(help="partition:offset (from list) or a ce_id")],
    bootstrap: BootstrapOption = None,
    prefix: PrefixOption = None,
) -> None:
    """Show one dead-lettered message: where it came from, its headers and its body."""
    from omni_devkit.dlq import body_text, read_dead_letters

    servers, dlq_topic, _ = _dlq_target(topic, bootstrap, prefix)
    letters = _dlq_run(read_dead_letters(servers, dlq_topic, refs=[message]))
    if not letters:
        fail(f"no message {message} in {dlq_topic}")
    for letter in letters:
        echo(f"{dlq_topic} {letter.ref} at {letter.timestamp.isoformat()}")
        key = letter.key.decode("utf-8", errors="replace") if letter.key is not None else "-"
        echo(f"key: {key}")
        echo("headers:")
        for name, value in letter.headers:
            echo(f"  {name}: {value.decode('utf-8', errors='replace')}")
        echo("body:")
        echo(body_text(letter.value))


@dlq_app.command("replay")
def dlq_replay(
    topic: TopicArgument,
    reason: ReasonOption = None,
    since: SinceOption = None,
    ids: Annotated[
        list[str] | None,
        typer.Option("--id", help="Only this message (partition:offset or ce_id); repeatable"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be replayed, send nothing")
    ] = False,
    bootstrap: BootstrapOption = None,
    prefix: PrefixOption = None,
) -> None:
    """Send dead-lettered messages back to their source topic, keeping ce_id and the original
    headers (minus dlq_*): the consumers' inbox makes a second replay harmless."""
    from omni_devkit.dlq import DlqError, parse_since, read_dead_letters, replay

    servers, dlq_topic, source = _dlq_target(topic, bootstrap, prefix)
    try:
        since_at = parse_since(since) if since else None
    except DlqError as exc:
        fail(str(exc))
    letters = _dlq_run(
        read_dead_letters(servers, dlq_topic, reason=reason, since=since_at, refs=ids or ())
    )
    if not letters:
        echo(f"nothing to replay in {dlq_topic}")
        return
    if dry_run:
        for letter in letters:
            echo(f"would replay {letter.ref} ({letter.reason}) to {letter.source_topic(source)}")
        echo(f"{len(letters)} would be replayed")
        return
    echo(f"replaying {len(letters)} from {dlq_topic} to {source} ...")
    step = max(1, len(letters) // 10)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            echo(f"  {done}/{total}")

    result = _dlq_run(replay(servers, letters, source, progress))
    echo(f"{result.replayed} replayed (they stay in {dlq_topic} until its retention ends)")


@dlq_app.command("purge")
def dlq_purge(
    customer: Annotated[
        str, typer.Option("--customer", help="The erased shopper's customer id", show_default=False)
    ],
    emails: Annotated[
        list[str] | None,
        typer.Option("--email", help="Also remove entries holding this e-mail; repeatable"),
    ] = None,
    phones: Annotated[
        list[str] | None,
        typer.Option("--phone", help="Also remove entries holding this phone; repeatable"),
    ] = None,
    identifiers: Annotated[
        list[str] | None,
        typer.Option(
            "--identifier",
            help="Also remove entries naming this id (loyalty card, anonymous id); repeatable",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be removed, change nothing")
    ] = False,
    bootstrap: BootstrapOption = None,
    prefix: PrefixOption = None,
) -> None:
    """Remove every dead letter naming a shopper from every DLQ topic (after an erasure).

    Kafka cannot delete one record: each partition holding some is rewritten, the other
    entries before the last one naming the shopper copied to its end (key, value, headers
    and time kept, plus dlq_rewritten_from), then the partition's records up to there
    deleted. Safe to run again."""
    from omni_devkit.dlq import DlqError, Shopper, catalogue_dlq_topics, purge_customer

    servers, chosen_prefix = _dlq_where(bootstrap, prefix)
    try:
        shopper = Shopper(
            customer.strip(),
            emails=tuple(emails or ()),
            phones=tuple(phones or ()),
            identifiers=tuple(identifiers or ()),
        )
    except DlqError as exc:
        fail(str(exc))
    topics = catalogue_dlq_topics(chosen_prefix)
    echo(f"purging {customer} from {len(topics)} DLQ topics" + (" (dry run)" if dry_run else ""))
    results = _dlq_run(purge_customer(servers, topics, shopper, dry_run=dry_run, progress=echo))
    removed = sum(result.removed for result in results)
    touched = sum(1 for result in results if result.removed)
    verb = "would be removed" if dry_run else "removed"
    echo(f"{removed} dead letters naming {customer} {verb} from {touched} topics")


# -- docs ------------------------------------------------------------------------------------


CONTRACT_FILE = Path("docs/asyncapi.yaml")
"""The committed contract, relative to the repository root."""
SCHEMAS_DIR = Path("docs/schemas")
"""The committed JSON Schemas (one per event type, and index.json), relative to the root."""


@docs_app.command("asyncapi")
def docs_asyncapi(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="yaml or json")] = "yaml",
) -> None:
    """Print (or write) the AsyncAPI 3 document of the public topics."""
    import json

    from omni_contracts.asyncapi import asyncapi_document, to_yaml

    document = asyncapi_document()
    if fmt not in ("yaml", "json"):
        fail(f"--format {fmt!r} is not yaml or json")
    text = to_yaml(document) if fmt == "yaml" else json.dumps(document, indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    echo(f"wrote {output}")


def _git_show(ref: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "show", f"{ref}:{path.as_posix()}"], capture_output=True, text=True, check=False
    )


def _load_contract(against: str) -> dict[str, Any]:
    """The contract in file ``against``, else ``docs/asyncapi.yaml`` at git ref ``against``."""
    import yaml

    path = Path(against)
    if path.is_file():
        text = path.read_text()
    else:
        shown = _git_show(against, CONTRACT_FILE)
        if shown.returncode != 0:
            why = (shown.stderr.strip().splitlines() or ["git show failed"])[-1]
            fail(f"{against!r} is neither a file nor a git ref with {CONTRACT_FILE}: {why}")
        text = shown.stdout
    document = yaml.safe_load(text)
    if not isinstance(document, dict) or "channels" not in document:
        fail(f"{against!r} is not an AsyncAPI document")
    return document


def _load_schemas(against: str) -> list[dict[str, Any]] | None:
    """The JSON Schemas in directory ``against``, else in ``docs/schemas/`` at git ref
    ``against``; None when there are none (a file, or a ref older than the schemas)."""
    from omni_contracts.schemas import read_schemas

    path = Path(against)

    def from_directory(name: str) -> str | None:
        file = path / name
        return file.read_text(encoding="utf-8") if file.is_file() else None

    def from_git(name: str) -> str | None:
        shown = _git_show(against, SCHEMAS_DIR / name)
        return shown.stdout if shown.returncode == 0 else None

    if path.is_file():
        return None
    try:
        return read_schemas(from_directory if path.is_dir() else from_git)
    except ValueError as exc:
        fail(f"the JSON Schemas of {against!r} are incomplete: {exc}")


@contracts_app.command("check")
def contracts_check(
    against: Annotated[
        str,
        typer.Option(
            help="The contract to stay compatible with: a git ref (its docs/asyncapi.yaml and "
            "docs/schemas/), an AsyncAPI file or a directory of JSON Schemas",
            metavar="REF",
        ),
    ] = "HEAD",
) -> None:
    """Refuse breaking changes of the code's contract against REF (exit 1, one line each).

    Breaking: a topic or event type removed, a topic's key changed, a field removed or
    renamed, a field's type changed, a field made required. Additions pass. At a git ref
    both published forms are judged: the AsyncAPI document and the JSON Schemas.
    """
    from omni_contracts.asyncapi import asyncapi_document
    from omni_contracts.compat import Comparison, compare, schemas_document
    from omni_contracts.schemas import INDEX, json_schemas

    judged: list[tuple[str, Comparison]] = []
    if not Path(against).is_dir():
        judged.append((str(CONTRACT_FILE), compare(_load_contract(against), asyncapi_document())))
    old_schemas = _load_schemas(against)
    if old_schemas is not None:
        code = [schema for name, schema in json_schemas().items() if name != INDEX]
        judged.append(
            (f"{SCHEMAS_DIR}/", compare(schemas_document(old_schemas), schemas_document(code)))
        )
    elif Path(against).is_dir():
        fail(f"{against!r} has no {INDEX}: not a directory of the contract's JSON Schemas")
    # Both forms come from one model, so most changes show in both: say each once.
    breaking = list(dict.fromkeys(c for _, result in judged for c in result.breaking))
    additive = list(dict.fromkeys(c for _, result in judged for c in result.additive))
    for change in additive:
        echo(f"ok: {change}")
    if breaking:
        for change in breaking:
            typer.echo(f"breaking: {change}", err=True)
        fail(
            f"{len(breaking)} breaking change(s) against {against}: keep the old field "
            "or event type, or publish a new .vN topic"
        )
    forms = " and ".join(name for name, _ in judged)
    echo(f"compatible with {against} ({len(additive)} additive change(s); judged {forms})")


# -- events ----------------------------------------------------------------------------------


@events_app.command("publish")
def events_publish(
    topic: Annotated[str, typer.Argument(help="Contract topic, e.g. store.sales.v1")],
    ce_type: Annotated[
        str, typer.Option("--type", help="CloudEvents type, e.g. store.sale.recorded")
    ],
    stdin: Annotated[
        str | None, typer.Argument(help="`-` to read the event data from standard input")
    ] = None,
    key: Annotated[str | None, typer.Option(help="Message key [default: the contract's]")] = None,
    data: Annotated[str | None, typer.Option(help="The event data as JSON")] = None,
    file: Annotated[Path | None, typer.Option(help="A file holding the event data")] = None,
    source: Annotated[str, typer.Option(help="ce_source")] = "/channels/cli",
) -> None:
    """Validate an event against its model, then publish it; prints its ce_id."""
    from omni_devkit import events

    if stdin not in (None, "-"):
        fail(f"unexpected argument {stdin!r} (use - for standard input)")
    payload = events.read_data(data, file, stdin == "-", sys.stdin.read)
    ce_id = events.run(
        events.publish(events.find_target(), topic, ce_type, payload, key=key, source=source)
    )
    typer.echo(ce_id)


@events_app.command("tail")
def events_tail(
    topic: Annotated[str, typer.Argument(help="Topic, e.g. inventory.availability.v1")],
    ce_type: Annotated[str | None, typer.Option("--type", help="Only this ce_type")] = None,
    key: Annotated[str | None, typer.Option(help="Only this message key")] = None,
    from_beginning: Annotated[bool, typer.Option(help="Start at the oldest message")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line")] = False,
    idle_exit: Annotated[
        float | None, typer.Option(help="Stop after this many seconds without a message")
    ] = None,
) -> None:
    """Print a topic's messages with their decoded envelope, until Ctrl-C."""
    import json

    from omni_devkit import events

    async def follow() -> None:
        async for message in events.tail(
            events.find_target(),
            topic,
            ce_type=ce_type,
            key=key,
            from_beginning=from_beginning,
            stop_after=idle_exit,
        ):
            echo(json.dumps(message) if as_json else events.one_line(message))

    events.run(follow())


# -- benchmarks ------------------------------------------------------------------------------

_BENCH_BUILTINS = ("all", "list")
_bench_plugins_loaded = False


def load_bench_plugins() -> None:
    """Import the modules registered under ``omni.bench`` (they add ``bench_app`` commands)."""
    global _bench_plugins_loaded
    if _bench_plugins_loaded:
        return
    _bench_plugins_loaded = True
    for ep in entry_points(group=BENCH_ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken benchmark must not break the CLI
            typer.echo(f"warning: benchmark plugin {ep.name} ({ep.value}): {exc}", err=True)


def _bench_commands() -> dict[str, Any]:
    group: Any = typer.main.get_group(bench_app)
    return {n: c for n, c in group.commands.items() if n not in _BENCH_BUILTINS}


@bench_app.command("list")
def bench_list() -> None:
    """List the registered benchmarks."""
    load_bench_plugins()
    commands = _bench_commands()
    if not commands:
        echo("no benchmarks registered")
    for name, command in commands.items():
        echo(f"{name:<24} {(command.help or '').strip().splitlines()[0] if command.help else ''}")


@bench_app.command("all")
def bench_all() -> None:
    """Run every registered benchmark with its default options."""
    load_bench_plugins()
    commands = _bench_commands()
    if not commands:
        echo("no benchmarks registered yet (add one with @bench_app.command())")
        return
    failed: list[str] = []
    for name, command in commands.items():
        echo(f"== omni bench {name}")
        try:
            command.main(args=[], prog_name=f"omni bench {name}", standalone_mode=False)
        except SystemExit as exc:
            if exc.code not in (0, None):
                failed.append(name)
        except (typer.Exit, typer.Abort) as exc:
            if getattr(exc, "exit_code", 1) != 0:
                failed.append(name)
        except DevStackError as exc:
            echo(f"error: {exc}")
            failed.append(name)
    if failed:
        fail(f"benchmarks failed: {', '.join(failed)}")


# -- demo ------------------------------------------------------------------------------------


@app.command("demo")
def demo_command(
    start: Annotated[
        bool, typer.Option("--start", help="Start a private stack for the demo (and stop it)")
    ] = False,
    story: Annotated[
        list[int] | None, typer.Option("--story", help="Only these stories (repeatable)")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Dev stack state dir [default: .omni]")
    ] = None,
) -> None:
    """Play the omnichannel stories against the running stack, checking each outcome."""
    from omni_devkit.demo_cli import run_demo

    raise typer.Exit(run_demo(start=start, stories=tuple(story or ()), state_dir=state_dir))


# -- entry point -----------------------------------------------------------------------------


def main() -> None:
    """Console-script entry point of ``omni``."""
    if sys.argv[1:2] == ["bench"]:
        load_bench_plugins()
    try:
        app()
    except (DevStackError, TopicsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    # `python -m omni_devkit.cli` (how the dev stack starts services): run the importable
    # module's app, so commands registered on `omni_devkit.cli.bench_app` are the ones we see.
    from omni_devkit.cli import main as _main

    _main()
