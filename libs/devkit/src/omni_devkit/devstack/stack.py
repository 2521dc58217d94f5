"""The local dev stack: PostgreSQL, a Kafka broker, the topics and every service.

The broker is Apache Kafka (durable, under ``<state>/kafka``) when a Java 17+ runtime is
found, else Tansu; ``OMNI_BROKER=kafka|tansu`` forces the choice (see
:func:`omni_devkit.devstack.kafka.choose_broker`).

Used by ``omni dev up|down|status`` and by the end-to-end tests. Everything lives under a
state directory (default ``.omni/`` in the repository root): the PostgreSQL cluster, one log
per process, ``dev.env`` (what a shell, a script or a test needs to talk to the stack) and
``dev.pid`` (every process of the running stack, so another shell can stop it).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import IO, Any

import httpx
from omni_common.auth import DEFAULT_SCOPES, ApiKey, format_api_keys
from omni_common.topics import create_topics

from omni_devkit.devstack.kafka import (
    ApacheKafkaBroker,
    BrokerChoice,
    TansuBroker,
    choose_broker,
    fetch_max_wait_ms,
    kafka_version,
    make_broker,
)
from omni_devkit.devstack.postgres import EmbeddedPostgres, create_database
from omni_devkit.devstack.process import (
    DevStackError,
    PortInUseError,
    cmdline,
    free_port,
    free_port_range,
    pid_alive,
    port_is_free,
    run_blocking,
    stop_pid,
    stop_process,
    tail,
)
from omni_devkit.devstack.smtp import MaildirSmtpServer
from omni_devkit.devstack.vapid import VapidKeys, ensure_vapid_keys
from omni_devkit.tokens import DEV_AUDIENCE, DEV_ISSUER, new_hs256_secret

ENTRY_POINT_GROUP = "omni.services"
# Stable default ports: the n-th service of this list listens on http_base_port + n.
DEFAULT_SERVICE_ORDER = ("order", "inventory", "customer-profile", "notification", "loyalty")
CHANNELS = ("web", "app", "pos", "call_center", "ops")
# The key written as API_KEY in dev.env: the operator's, for curl and scripts.
DEFAULT_CHANNEL = "ops"
SERVICES_ENV = "OMNI_SERVICES"

Echo = Callable[[str], None]


def _echo(line: str) -> None:
    print(line, flush=True)


# -- service discovery -------------------------------------------------------------------------


PARTITIONS_ENV = "OMNI_TOPIC_PARTITIONS"


def topic_partitions() -> int:
    """Partitions per topic of the dev stack: ``$OMNI_TOPIC_PARTITIONS``, else one per core.

    One instance of each service consumes everything here: a partition more than it has
    cores to work them adds requests, not parallelism. Production keeps the catalogue's
    counts (``deploy/``), sized for several pods.
    """
    raw = os.environ.get(PARTITIONS_ENV, "").strip()
    if not raw:
        return max(1, os.cpu_count() or 1)
    try:
        value = int(raw)
    except ValueError:
        raise DevStackError(f"{PARTITIONS_ENV}={raw!r} is not a whole number") from None
    if value < 1:
        raise DevStackError(f"{PARTITIONS_ENV} must be at least 1")
    return value


def discover_services() -> dict[str, str]:
    """Installed services, in start order: ``{name: "module:factory"}``.

    Services come from the ``omni.services`` entry points. ``$OMNI_SERVICES`` (comma
    separated ``name`` or ``name=module:factory``) picks a subset, sets the order, or points
    a name at another factory (e.g. a stand-in app in tests).
    """
    installed = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    spec = os.environ.get(SERVICES_ENV, "").strip()
    if not spec:
        ordered = [n for n in DEFAULT_SERVICE_ORDER if n in installed]
        ordered += sorted(set(installed) - set(ordered))
        return {name: installed[name] for name in ordered}
    chosen: dict[str, str] = {}
    for item in spec.split(","):
        name, sep, target = (part.strip() for part in item.partition("="))
        if not name:
            continue
        if sep:
            if ":" not in target:
                raise DevStackError(f"{SERVICES_ENV}: {item!r} is not NAME=module:factory")
            chosen[name] = target
        elif name in installed:
            chosen[name] = installed[name]
        else:
            raise DevStackError(f"{SERVICES_ENV}: unknown service {name!r}; {_known(installed)}")
    return chosen


def _known(services: Mapping[str, str]) -> str:
    return f"known services: {', '.join(services) or 'none installed'}"


def load_service_factory(name: str) -> Callable[..., Any]:
    """The ``create_app`` factory of service ``name`` (as ``$OMNI_SERVICES`` may point it).

    Raises :class:`DevStackError` for an unknown service or a factory that cannot be loaded.
    """
    services = discover_services()
    if name not in services:
        raise DevStackError(f"unknown service {name!r}; {_known(services)}")
    try:
        factory: Callable[..., Any] = EntryPoint(name, services[name], ENTRY_POINT_GROUP).load()
    except (ImportError, AttributeError) as exc:
        raise DevStackError(f"service {name!r}: {services[name]} cannot be loaded ({exc})") from exc
    return factory


def service_package(name: str) -> str:
    """The top-level package of service ``name`` (e.g. ``order_service``)."""
    services = discover_services()
    if name not in services:
        raise DevStackError(f"unknown service {name!r}; {_known(services)}")
    return services[name].partition(":")[0].split(".")[0]


def env_var_name(service: str) -> str:
    """``customer-profile`` -> ``CUSTOMER_PROFILE_URL``."""
    return service.upper().replace("-", "_") + "_URL"


def metrics_env_var_name(service: str) -> str:
    """``customer-profile`` -> ``CUSTOMER_PROFILE_METRICS_URL`` (its metrics port)."""
    return service.upper().replace("-", "_") + "_METRICS_URL"


# -- configuration -----------------------------------------------------------------------------


def default_state_dir() -> Path:
    """``$OMNI_STATE_DIR``, else ``.omni`` in the repository root (nearest ``uv.lock``/``.git``
    above the working directory), else ``.omni`` in the working directory."""
    if env := os.environ.get("OMNI_STATE_DIR"):
        return Path(env).expanduser().absolute()
    cwd = Path.cwd().absolute()
    for directory in (cwd, *cwd.parents):
        if (directory / "uv.lock").exists() or (directory / ".git").exists():
            return directory / ".omni"
    return cwd / ".omni"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise DevStackError(f"{name}={raw!r} is not a whole number") from None


@dataclass(frozen=True)
class DevStackConfig:
    """Where the dev stack keeps its state and which ports it uses."""

    state_dir: Path = field(default_factory=default_state_dir)
    host: str = "127.0.0.1"
    kafka_port: int = 9092
    pg_port: int = 5432
    http_base_port: int = 8001
    # The n-th service serves its metrics on metrics_base_port + n (METRICS_PORT), apart
    # from its API, as in a cluster.
    metrics_base_port: int = 8101
    # The console (the page a newcomer opens first): CONSOLE_URL in dev.env.
    console_port: int = 8000
    database: str = "omni"
    ready_timeout: float = 60.0
    log_json: bool = False
    fast_postgres: bool = False

    @classmethod
    def from_env(cls, **overrides: Any) -> DevStackConfig:
        """Defaults, then ``OMNI_KAFKA_PORT``/``OMNI_PG_PORT``/``OMNI_HTTP_BASE_PORT``/
        ``OMNI_METRICS_BASE_PORT``/``OMNI_STATE_DIR``/``OMNI_READY_TIMEOUT`` (seconds per
        start-up), then ``overrides`` (``None`` values are ignored)."""
        config = cls(
            kafka_port=_env_int("OMNI_KAFKA_PORT", cls.kafka_port),
            pg_port=_env_int("OMNI_PG_PORT", cls.pg_port),
            http_base_port=_env_int("OMNI_HTTP_BASE_PORT", cls.http_base_port),
            metrics_base_port=_env_int("OMNI_METRICS_BASE_PORT", cls.metrics_base_port),
            console_port=_env_int("OMNI_CONSOLE_PORT", cls.console_port),
            ready_timeout=float(_env_int("OMNI_READY_TIMEOUT", int(cls.ready_timeout))),
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        if "state_dir" in given:
            given["state_dir"] = Path(given["state_dir"]).expanduser().absolute()
        return replace(config, **given)

    @classmethod
    def with_free_ports(
        cls, state_dir: Path, services: int = 8, **overrides: Any
    ) -> DevStackConfig:
        """A config on ports free right now (tests): ``services`` consecutive HTTP ports,
        then as many metrics ports (one range: two picked apart could overlap)."""
        host = overrides.get("host", cls.host)
        n = max(services, len(DEFAULT_SERVICE_ORDER))
        base = free_port_range(host, 2 * n)
        return cls(
            state_dir=Path(state_dir),
            kafka_port=free_port(host),
            pg_port=free_port(host),
            http_base_port=base,
            metrics_base_port=base + n,
            console_port=free_port(host),
            **overrides,
        )

    @property
    def logs_dir(self) -> Path:
        """One log file per process."""
        return self.state_dir / "logs"

    @property
    def kafka_dir(self) -> Path:
        """Apache Kafka's configuration and durable log directory (kept between runs)."""
        return self.state_dir / "kafka"

    @property
    def pgdata(self) -> Path:
        """The PostgreSQL cluster (kept between runs)."""
        return self.state_dir / "pgdata"

    @property
    def pg_socket_dir(self) -> Path:
        """Where PostgreSQL's Unix socket is, for the services (see ``service_database_url``)."""
        return self.state_dir / "pgsock"

    @property
    def env_file(self) -> Path:
        """``KEY=value`` lines describing the running stack."""
        return self.state_dir / "dev.env"

    @property
    def pid_file(self) -> Path:
        """``name=pid`` lines, one per process of the running stack."""
        return self.state_dir / "dev.pid"

    @property
    def supervisor_log(self) -> Path:
        """Output of a detached ``omni dev up``."""
        return self.logs_dir / "supervisor.log"

    @property
    def bootstrap_servers(self) -> str:
        """Where clients reach the broker."""
        return f"{self.host}:{self.kafka_port}"

    @property
    def database_url(self) -> str:
        """The URL services use (one database, a schema per service)."""
        return f"postgresql://postgres@{self.host}:{self.pg_port}/{self.database}"

    def service_ports(self, services: list[str]) -> dict[str, int]:
        """``{service: HTTP port}``; default-order services keep their port in any subset."""
        return {s: self.http_base_port + n for s, n in self._positions(services).items()}

    def metrics_ports(self, services: list[str]) -> dict[str, int]:
        """``{service: metrics port}``, in the same order as :meth:`service_ports`."""
        return {s: self.metrics_base_port + n for s, n in self._positions(services).items()}

    def _positions(self, services: list[str]) -> dict[str, int]:
        ordered = list(DEFAULT_SERVICE_ORDER) + [
            s for s in services if s not in DEFAULT_SERVICE_ORDER
        ]
        if os.environ.get(SERVICES_ENV):
            ordered = services  # an explicit list sets the order
        return {s: ordered.index(s) for s in services}


# -- pid and env files -------------------------------------------------------------------------


def rotate_log(path: Path) -> None:
    """Keep the previous run's log as ``<name>.1`` so a new run starts with a clean file."""
    with contextlib.suppress(FileNotFoundError):
        path.replace(path.with_name(path.name + ".1"))


def read_kv_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of ``path`` (empty when it does not exist)."""
    result: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() and not key.lstrip().startswith("#"):
                result[key.strip()] = value.strip()
    return result


def _write_kv_file(path: Path, values: Mapping[str, object], header: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    body = "".join(f"{k}={v}\n" for k, v in values.items())
    tmp.write_text(header + body)
    tmp.chmod(0o600)  # dev.env holds API keys
    tmp.replace(path)  # atomic: a reader never sees half a file


def read_pids(config: DevStackConfig) -> dict[str, int]:
    """Every process recorded in the pid file (alive or not)."""
    pids: dict[str, int] = {}
    for name, value in read_kv_file(config.pid_file).items():
        with contextlib.suppress(ValueError):
            pids[name] = int(value)
    return pids


def _is_ours(name: str, pid: int) -> bool:
    """Whether ``pid`` is alive and still the process we recorded (pids get reused)."""
    if not pid_alive(pid):
        return False
    cmd = cmdline(pid)
    if cmd is None:
        return True
    if name == "kafka":
        return "tansu" in cmd or "kafka.Kafka" in cmd
    marker = {"postgres": "postgres"}.get(name, "omni")
    return marker in cmd


def live_pids(config: DevStackConfig) -> dict[str, int]:
    """The recorded processes that still run."""
    return {name: pid for name, pid in read_pids(config).items() if _is_ours(name, pid)}


# -- the stack -----------------------------------------------------------------------------------


@dataclass
class ServiceProcess:
    """One running service."""

    name: str
    port: int
    url: str
    log_path: Path
    proc: subprocess.Popen[bytes]
    log_fh: IO[bytes]
    reported_exit: bool = False
    metrics_url: str | None = None


@dataclass
class StackStatus:
    """What ``omni dev status`` reports."""

    running: bool
    processes: dict[str, tuple[int, bool]]  # name -> (pid, alive)
    services: dict[str, tuple[str, str]]  # name -> (url, "ready" | reason)
    env: dict[str, str]

    @property
    def healthy(self) -> bool:
        """Every process alive and every service ready."""
        return (
            self.running
            and all(alive for _, alive in self.processes.values())
            and all(state == "ready" for _, state in self.services.values())
        )


class DevStack:
    """Starts and stops the whole local platform.

    ``up()`` starts PostgreSQL, the database, Tansu, the topics and every service, and
    returns once each service answers ``GET /readyz`` with 200. ``stop()`` stops what this
    object started; :meth:`down` stops a stack started by another process (via the pid file).
    """

    def __init__(self, config: DevStackConfig | None = None, echo: Echo = _echo) -> None:
        self.config = config or DevStackConfig.from_env()
        self.echo = echo
        self.postgres: EmbeddedPostgres | None = None
        self.broker: TansuBroker | ApacheKafkaBroker | None = None
        self.broker_choice: BrokerChoice | None = None
        self.smtp: MaildirSmtpServer | None = None
        self.vapid: VapidKeys | None = None
        self.services: dict[str, ServiceProcess] = {}
        # Not one of the services: it has no /metrics, topics or schema of its own.
        self.console: ServiceProcess | None = None
        self.api_keys: dict[str, str] = {}
        self.shopper_secret = ""
        self._pids: dict[str, int] = {}

    def __enter__(self) -> DevStack:
        self.up()
        return self

    @property
    def service_urls(self) -> dict[str, str]:
        """Base URL of every running service."""
        return {name: svc.url for name, svc in self.services.items()}

    @property
    def metrics_urls(self) -> dict[str, str]:
        """Base URL of every running service's metrics port (``/metrics``)."""
        return {n: s.metrics_url for n, s in self.services.items() if s.metrics_url}

    def __exit__(self, *exc: object) -> None:
        self.stop(quiet=True)

    # -- start ---------------------------------------------------------------------------------

    def check_can_start(self) -> dict[str, int]:
        """Fail fast, before starting anything: returns ``{service: port}`` to use.

        Raises :class:`DevStackError` when a stack already runs on this state dir, no
        service is installed, or one of the ports is taken.
        """
        cfg = self.config
        running = live_pids(cfg)
        if running:
            pid = running.get("supervisor") or next(iter(running.values()))
            raise DevStackError(
                f"a dev stack is already running (pid {pid}, state {cfg.state_dir}); "
                "stop it with `omni dev down`"
            )
        if cfg.pid_file.exists():  # left behind by a killed run: nothing of it runs any more
            cfg.pid_file.unlink(missing_ok=True)
            cfg.env_file.unlink(missing_ok=True)
        services = list(discover_services())
        if not services:
            raise DevStackError(f"no services installed (entry point group {ENTRY_POINT_GROUP})")
        ports = cfg.service_ports(services)
        wanted = [
            ("Kafka", cfg.kafka_port, "--kafka-port / OMNI_KAFKA_PORT"),
            ("PostgreSQL", cfg.pg_port, "--pg-port / OMNI_PG_PORT"),
            ("the console", cfg.console_port, "OMNI_CONSOLE_PORT"),
            *(
                (f"service {s}", p, "--http-base-port / OMNI_HTTP_BASE_PORT")
                for s, p in ports.items()
            ),
            *(
                (f"{s}'s metrics", p, "--metrics-base-port / OMNI_METRICS_BASE_PORT")
                for s, p in cfg.metrics_ports(services).items()
            ),
        ]
        for what, port, option in wanted:
            if not port_is_free(cfg.host, port):
                raise PortInUseError(
                    f"port {port} ({what}) on {cfg.host} is already in use: is a dev stack "
                    f"already running? Stop it with `omni dev down`, or choose ports with {option}"
                )
        return ports

    def up(self) -> None:
        """Start everything; on any failure stop what was started and raise."""
        cfg = self.config
        ports = self.check_can_start()
        cfg.logs_dir.mkdir(parents=True, exist_ok=True)
        self._record("supervisor", os.getpid())
        try:
            self._start_postgres()
            self._start_broker()
            self._start_mail_and_push()
            self.api_keys = {ch: secrets.token_urlsafe(24) for ch in CHANNELS}
            self.shopper_secret = new_hs256_secret()
            self._start_services(ports)
            self._write_env()
            self._start_console()
            self._write_env()
        except BaseException:
            self.stop(quiet=True)
            raise

    def _step(self, what: str) -> _Timer:
        self.echo(f"- {what} ...")
        return _Timer()

    def _start_postgres(self) -> None:
        cfg = self.config
        timer = self._step(f"starting PostgreSQL on {cfg.host}:{cfg.pg_port}")
        rotate_log(cfg.logs_dir / "postgres.log")
        self.postgres = EmbeddedPostgres(
            cfg.pgdata,
            cfg.pg_port,
            cfg.host,
            fast=cfg.fast_postgres,
            log_path=cfg.logs_dir / "postgres.log",
            socket_dir=cfg.pg_socket_dir,
        )
        self.postgres.start()
        assert self.postgres.pid is not None
        self._record("postgres", self.postgres.pid)
        run_blocking(create_database(self.postgres.url(), cfg.database))
        self.echo(f"  PostgreSQL ready in {timer}, database {cfg.database!r}")

    def _start_broker(self) -> None:
        cfg = self.config
        choice = self.broker_choice = choose_broker()
        if choice.kind == "kafka":
            what = f"Apache Kafka {kafka_version()}, {choice.reason}"
        else:
            what = f"Tansu, {choice.reason}"
        timer = self._step(f"starting Kafka ({what}) on {cfg.bootstrap_servers}")
        rotate_log(cfg.logs_dir / "kafka.log")
        self.broker = make_broker(
            choice,
            cfg.kafka_port,
            cfg.host,
            data_dir=cfg.kafka_dir,
            log_path=cfg.logs_dir / "kafka.log",
            echo=self.echo,
        )
        self.broker.start(timeout=max(cfg.ready_timeout, 90.0))
        assert self.broker.pid is not None
        self._record("kafka", self.broker.pid)
        partitions = topic_partitions()
        created = run_blocking(create_topics(cfg.bootstrap_servers, partitions=partitions))
        self.echo(
            f"  Kafka ready in {timer}, {len(created)} topics created"
            f" (at most {partitions} partitions each, {PARTITIONS_ENV})"
        )

    def _start_mail_and_push(self) -> None:
        cfg = self.config
        timer = self._step("starting the SMTP server (Maildir) and the VAPID keys")
        # Runs in this (the supervisor's) process, in a thread: it lives as long as the stack.
        self.smtp = MaildirSmtpServer(cfg.state_dir / "maildir", host=cfg.host).start()
        self.vapid = ensure_vapid_keys(cfg.state_dir)
        self.echo(f"  SMTP on {self.smtp.url} into {self.smtp.path} ({timer})")

    def _unsubscribe_secret(self) -> str:
        # Kept in the state dir, so links in mails sent before a restart keep working.
        path = self.config.state_dir / "unsubscribe.secret"
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(32))
        return path.read_text().strip()

    def _mail_and_push_env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        if self.smtp is not None:
            values.update(SMTP_URL=self.smtp.url, MAILDIR=str(self.smtp.path))
        if self.vapid is not None:
            values.update(
                VAPID_PUBLIC_KEY=self.vapid.public_key,
                VAPID_PRIVATE_KEY_FILE=str(self.vapid.private_key_file),
            )
        return values

    def _service_database_url(self) -> str:
        # The services run beside the server: its Unix socket halves the CPU of a statement's
        # round trip. dev.env keeps the TCP address, which any tool can use.
        if self.postgres is None:
            return self.config.database_url
        return self.postgres.local_url(self.config.database)

    def _service_env(self, name: str, port: int, metrics_port: int) -> dict[str, str]:
        cfg = self.config
        env = dict(os.environ)
        env.pop("DB_SCHEMA", None)  # each service uses its own schema
        env.update(
            SERVICE_NAME=name,
            KAFKA_BOOTSTRAP_SERVERS=cfg.bootstrap_servers,
            DATABASE_URL=self._service_database_url(),
            TOPIC_PREFIX="",
            HTTP_HOST=cfg.host,
            HTTP_PORT=str(port),
            METRICS_PORT=str(metrics_port),
            API_KEYS=self._api_keys_value(),
            **self._shopper_token_env(),
            LOG_JSON="true" if cfg.log_json else "false",
            PYTHONUNBUFFERED="1",
        )
        # The stack is a developer's machine, unless the environment says otherwise.
        env.setdefault("OMNI_ENV", "development")
        # Kafka answers a fetch as soon as data arrives; only Tansu needs the short wait.
        env.setdefault("CONSUMER_FETCH_MAX_WAIT_MS", str(fetch_max_wait_ms(self._broker_kind)))
        env.update(self._mail_and_push_env())
        if name == "notification":
            # Unsubscribe links in e-mails point back at this service.
            env.setdefault("NOTIFY_PUBLIC_URL", f"http://{cfg.host}:{port}")
            env.setdefault("UNSUBSCRIBE_SECRET", self._unsubscribe_secret())
            # Push services a developer runs (the console's, a test's) listen on loopback.
            env.setdefault("NOTIFY_PUSH_PRIVATE_ENDPOINTS", "allow")
        # A few demo stores, a warehouse and stock, so the platform is usable at once.
        env.setdefault("INVENTORY_SEED_FILE", "demo")
        # Timers of seconds, not days, so `omni demo` and the console's stories can be watched.
        from omni_devkit.demo import DEMO_TIMERS

        for key, value in DEMO_TIMERS.items():
            env.setdefault(key, value)
        return env

    def _start_console(self) -> None:
        cfg = self.config
        timer = self._step(f"starting the console on {cfg.host}:{cfg.console_port}")
        log_path = cfg.logs_dir / "console.log"
        rotate_log(log_path)
        log_fh = log_path.open("ab")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "omni_devkit.console",
                "--env-file",
                str(cfg.env_file),
                "--host",
                cfg.host,
                "--port",
                str(cfg.console_port),
            ],
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://{cfg.host}:{cfg.console_port}"
        self.console = ServiceProcess("console", cfg.console_port, url, log_path, proc, log_fh)
        self._record("console", proc.pid)
        deadline = time.monotonic() + self.config.ready_timeout
        with httpx.Client(timeout=2.0) as client:
            while _readiness(client, url) != "ready":
                if proc.poll() is not None:
                    self._fail_service(self.console, f"exited with code {proc.returncode}")
                if time.monotonic() > deadline:
                    self._fail_service(self.console, "did not answer /readyz in time")
                time.sleep(0.1)
        self.echo(f"  console ready on {url} ({timer})")

    @property
    def _broker_kind(self) -> str:
        return self.broker_choice.kind if self.broker_choice else "kafka"

    def _api_keys_value(self) -> str:
        # Scopes spelled out (each channel's defaults), so dev.env shows who may do what.
        return format_api_keys(
            {key: ApiKey(ch, DEFAULT_SCOPES[ch]) for ch, key in self.api_keys.items()}
        )

    def _shopper_token_env(self) -> dict[str, str]:
        return {
            "SHOPPER_TOKEN_HS256_SECRET": self.shopper_secret,
            "SHOPPER_TOKEN_ISSUER": DEV_ISSUER,
            "SHOPPER_TOKEN_AUDIENCE": DEV_AUDIENCE,
        }

    def _start_services(self, ports: dict[str, int]) -> None:
        cfg = self.config
        timer = self._step(f"starting services: {', '.join(ports)}")
        metrics_ports = cfg.metrics_ports(list(ports))
        # Start all at once: their imports and migrations overlap.
        for name, port in ports.items():
            log_path = cfg.logs_dir / f"{name}.log"
            rotate_log(log_path)
            log_fh = log_path.open("ab")
            proc = subprocess.Popen(
                [sys.executable, "-m", "omni_devkit.cli", "run", name],
                env=self._service_env(name, port, metrics_ports[name]),
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            url = f"http://{cfg.host}:{port}"
            metrics_url = f"http://{cfg.host}:{metrics_ports[name]}"
            self.services[name] = ServiceProcess(
                name, port, url, log_path, proc, log_fh, metrics_url=metrics_url
            )
            self._record(name, proc.pid)
        self._wait_services_ready(timer)

    def _wait_services_ready(self, timer: _Timer) -> None:
        deadline = time.monotonic() + self.config.ready_timeout
        pending = dict(self.services)
        last_state: dict[str, str] = {}
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for name, svc in list(pending.items()):
                    code = svc.proc.poll()
                    if code is not None:
                        self._fail_service(svc, f"exited with code {code} during start-up")
                    last_state[name] = _readiness(client, svc.url)
                    if last_state[name] == "ready":
                        self.echo(f"  {name} ready on {svc.url} ({timer})")
                        del pending[name]
                if pending and time.monotonic() > deadline:
                    name, svc = next(iter(pending.items()))
                    self._fail_service(
                        svc,
                        f"did not become ready within {self.config.ready_timeout:.0f}s "
                        f"(/readyz: {last_state.get(name, 'not asked')})",
                    )
                time.sleep(0.1)

    def _fail_service(self, svc: ServiceProcess, why: str) -> None:
        lines = tail(svc.log_path, 25)
        self.echo(f"service {svc.name} {why}; last lines of {svc.log_path}:")
        for line in lines:
            self.echo(f"    {line}")
        raise DevStackError(f"service {svc.name} {why} (log: {svc.log_path})")

    def _write_env(self) -> None:
        cfg = self.config
        values: dict[str, str] = {
            "KAFKA_BOOTSTRAP_SERVERS": cfg.bootstrap_servers,
            "OMNI_BROKER_KIND": self._broker_kind,
            "DATABASE_URL": cfg.database_url,
        }
        for name, svc in self.services.items():
            values[env_var_name(name)] = svc.url
            if svc.metrics_url is not None:
                values[metrics_env_var_name(name)] = svc.metrics_url
        values.update(self._mail_and_push_env())
        values["API_KEY"] = self.api_keys[DEFAULT_CHANNEL]
        values["API_KEYS"] = self._api_keys_value()
        for channel, key in self.api_keys.items():
            values[f"API_KEY_{channel.upper()}"] = key
        values.update(self._shopper_token_env())
        if self.console is not None:
            values["CONSOLE_URL"] = self.console.url
        _write_kv_file(
            cfg.env_file,
            values,
            header="# written by `omni dev up`; removed by `omni dev down`\n",
        )

    def _record(self, name: str, pid: int) -> None:
        self._pids[name] = pid
        _write_kv_file(self.config.pid_file, self._pids)

    # -- run -----------------------------------------------------------------------------------

    def summary(self) -> list[str]:
        """Human-readable lines describing the running stack."""
        return format_summary(self.config, read_kv_file(self.config.env_file))

    def supervise(self) -> None:
        """Block until SIGINT/SIGTERM/SIGHUP, reporting processes that die; then stop."""
        with handle_termination():
            try:
                while True:
                    time.sleep(0.5)
                    self._report_deaths()
            except KeyboardInterrupt:
                self.echo("stopping ...")
            finally:
                self.stop()

    def _report_deaths(self) -> None:
        for svc in [*self.services.values(), *([self.console] if self.console else [])]:
            code = svc.proc.poll()
            if code is not None and not svc.reported_exit:
                svc.reported_exit = True
                self.echo(f"! service {svc.name} exited with code {code}; see {svc.log_path}")

    # -- stop ----------------------------------------------------------------------------------

    def stop(self, quiet: bool = False) -> None:
        """Stop services (SIGTERM, then SIGKILL), broker, PostgreSQL; remove dev.env/dev.pid."""
        with _signals_ignored():
            if self.console is not None:
                if self.console.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        self.console.proc.terminate()
                stop_process(self.console.proc, timeout=5)
                self.console.log_fh.close()
                self.console = None
            for svc in self.services.values():
                if svc.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        svc.proc.terminate()
            for svc in self.services.values():
                stop_process(svc.proc, timeout=15)
                svc.log_fh.close()
            if self.services and not quiet:
                self.echo("  services stopped")
            self.services.clear()
            if self.smtp is not None:
                self.smtp.stop()
                self.smtp = None
            if self.broker is not None:
                self.broker.stop()
                self.broker = None
                if not quiet:
                    self.echo("  Kafka stopped")
            if self.postgres is not None:
                self.postgres.stop()
                self.postgres = None
                if not quiet:
                    self.echo("  PostgreSQL stopped")
            self.config.env_file.unlink(missing_ok=True)
            if self._pids.get("supervisor") == os.getpid():
                self.config.pid_file.unlink(missing_ok=True)
            self._pids.clear()

    @staticmethod
    def down(config: DevStackConfig, echo: Echo = _echo, timeout: float = 30.0) -> bool:
        """Stop the stack recorded in ``config``'s pid file; False when none was running."""
        alive = live_pids(config)
        if not alive:
            config.pid_file.unlink(missing_ok=True)
            config.env_file.unlink(missing_ok=True)
            # A crashed run may leave a postmaster without a pid file entry.
            _stop_orphan_postgres(config)
            return False
        supervisor = alive.pop("supervisor", None)
        if supervisor is not None and supervisor != os.getpid():
            # The supervisor stops its children in order and cleans up after itself.
            echo(f"- stopping the dev stack (supervisor pid {supervisor}) ...")
            stop_pid(supervisor, timeout=timeout)
        infra = ("kafka", "postgres")
        leftovers = {n: p for n, p in alive.items() if pid_alive(p)}
        services = {n: p for n, p in leftovers.items() if n not in infra}
        for pid in services.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in services.values():
            stop_pid(pid, timeout=15)
        if "kafka" in leftovers:
            # Apache Kafka's controlled shutdown takes a few seconds on a busy machine.
            stop_pid(leftovers["kafka"], timeout=30)
        if "postgres" in leftovers:
            stop_pid(leftovers["postgres"], timeout=15, sig=signal.SIGINT)
        _stop_orphan_postgres(config)
        config.pid_file.unlink(missing_ok=True)
        config.env_file.unlink(missing_ok=True)
        echo("dev stack stopped")
        return True

    @staticmethod
    def status(config: DevStackConfig) -> StackStatus:
        """Which processes of the recorded stack run and which services answer /readyz."""
        pids = read_pids(config)
        env = read_kv_file(config.env_file)
        processes = {name: (pid, _is_ours(name, pid)) for name, pid in pids.items()}
        running = any(alive for _, alive in processes.values())
        services: dict[str, tuple[str, str]] = {}
        urls = {
            name: env[env_var_name(name)]
            for name in processes
            if name not in ("supervisor", "kafka", "postgres") and env_var_name(name) in env
        }
        with httpx.Client(timeout=2.0) as client:
            for name, url in urls.items():
                services[name] = (url, _readiness(client, url))
        for name in processes:
            if name not in ("supervisor", "kafka", "postgres") and name not in services:
                services[name] = ("-", "starting")
        return StackStatus(running, processes, services, env)


# -- helpers -------------------------------------------------------------------------------------


def format_summary(config: DevStackConfig, env: Mapping[str, str]) -> list[str]:
    """The short summary printed once the stack is up."""
    state = _display_path(config.state_dir)
    rows = [
        ("kafka", env.get("KAFKA_BOOTSTRAP_SERVERS", config.bootstrap_servers)),
        ("database", env.get("DATABASE_URL", config.database_url)),
    ]
    rows += [(n, env[env_var_name(n)]) for n in read_pids(config) if env_var_name(n) in env]
    rows += [
        ("logs", f"{state}/logs/"),
        ("env", f"{state}/dev.env (API_KEY: Authorization: Bearer $API_KEY)"),
    ]
    width = max(len(name) for name, _ in rows) + 2
    lines = ["omni dev stack is up"]
    lines += [f"  {name:<{width}}{value}" for name, value in rows]
    if "CONSOLE_URL" in env:
        lines.append(f"open {env['CONSOLE_URL']} in a browser; `omni demo` plays the stories")
    return lines


def _display_path(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _readiness(client: httpx.Client, url: str) -> str:
    try:
        response = client.get(f"{url}/readyz")
    except httpx.HTTPError:
        return "not answering"
    if response.status_code == 200:
        return "ready"
    try:
        reason = response.json().get("reason")
    except ValueError:
        reason = None
    return f"not ready ({reason or response.status_code})"


def _stop_orphan_postgres(config: DevStackConfig) -> None:
    pidfile = config.pgdata / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int(pidfile.read_text().splitlines()[0])
        if pid_alive(pid):
            stop_pid(pid, timeout=15, sig=signal.SIGINT)


class _Timer:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __str__(self) -> str:
        return f"{time.monotonic() - self.started:.1f}s"


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def handle_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP behave like Ctrl-C (KeyboardInterrupt), so every exit path can
    stop the stack cleanly. A no-op outside the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for sig in previous:
        signal.signal(sig, _raise_interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """While stopping, a second Ctrl-C must not leave processes behind."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.getsignal(s) for s in sigs}
    for sig in sigs:
        signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
