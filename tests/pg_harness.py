"""Runs a private PostgreSQL server on loopback, for tests of the gateway's SQL stores.

A `PostgresInstance` is a throw-away cluster: its own data directory made by initdb, its
own configuration, log and UNIX socket directory; a server listening only on a free
127.0.0.1 port. It never touches Debian's clusters (/etc/postgresql, /var/lib/postgresql,
port 5432, pg_ctlcluster), so it runs beside a system PostgreSQL and beside other
instances.

    with PostgresInstance(tmp_path) as pg:
        engine = sqlalchemy.create_engine(pg.url)        # the database "school_milter_test"
        other = sqlalchemy.create_engine(pg.fresh_database("store_b"))

Tests normally take the session-wide `postgres` fixture instead (import it from here).

Choices and what was found the hard way:

- initdb and postgres refuse to run as root. As root the harness runs initdb, pg_ctl and
  so the server as Debian's `postgres` system user (`runuser -u postgres --`); otherwise
  as the current user.
- The server user must be able to traverse every directory down to its data and socket
  directories. pytest's tmp_path lives under /tmp/pytest-of-root (mode 0700). Rather than
  opening that up with chmod (which would let every local user look into every test's
  temporary files, and which pytest undoes at the start of the next session anyway), the
  cluster then goes to a private directory made with tempfile.mkdtemp under the system
  temp dir and chown'ed to postgres. `close()` (and so leaving the `with` block) copies
  the server log into the work directory and removes that private directory.
- A UNIX socket path must fit in 108 bytes; a long work directory also sends the cluster
  to the short private directory.
- Authentication is scram-sha-256 with a random password, for the socket and for
  127.0.0.1 only (no other line in pg_hba.conf): a "trust" cluster would let any local
  user connect as a superuser, and a PostgreSQL superuser can run programs as the server's
  OS user (COPY ... PROGRAM). The password is in `.url`.
- Durability is off (fsync, synchronous_commit, full_page_writes; initdb --no-sync): the
  cluster is thrown away, and a commit then costs no disk flush.
- The port is picked free by the kernel and then handed to the server, so another process
  can take it in between; the server then fails to bind and the harness retries with
  another port.
- pg_ctl runs the server in its own session (setsid), so a Ctrl-C in the test run does not
  reach it; `stop()` (pg_ctl -m fast, then -m immediate, then SIGKILL by pid) does.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

LOOPBACK = "127.0.0.1"
DEBIAN_LIBDIR = Path("/usr/lib/postgresql")  # Debian's /usr/lib/postgresql/<major>/bin
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
SYSTEM_USER = "postgres"  # the server's OS user when the tests run as root (postgresql-common)
SUPERUSER = "postgres"  # the cluster's database superuser, which the tests connect as
DEFAULT_DATABASE = "school_milter_test"
SKIP_REASON = (
    f"no PostgreSQL server binaries ({', '.join(SERVER_BINARIES)}) in {DEBIAN_LIBDIR}/*/bin or on PATH: "
    "install Debian's postgresql (deploy/install-system-packages.sh)"
)
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # a plain SQL identifier, no quoting games
_RESERVED_DATABASES = frozenset({"postgres", "template0", "template1"})
_MAX_UNIX_PATH = 100  # sun_path is 108 bytes with the NUL; leave a little room
_SOCKET_NAME = ".s.PGSQL.65535"  # the longest name the server gives its socket


class PostgresHarnessError(RuntimeError):
    """The private PostgreSQL could not be set up, started or stopped; the message says why."""


def find_bindir() -> Path | None:
    """The directory of the newest installed server binaries (initdb, pg_ctl, postgres), or None.

    Debian installs each major version in /usr/lib/postgresql/<major>/bin and puts none of
    them on PATH; elsewhere they are usually on PATH.
    """

    def complete(bindir: Path) -> bool:
        return all(os.access(bindir / name, os.X_OK) for name in SERVER_BINARIES)

    def version(bindir: Path) -> tuple[int, ...]:
        with contextlib.suppress(ValueError):
            return tuple(int(part) for part in bindir.parent.name.split("."))  # "15", "9.6"
        return ()

    versioned = [bindir for bindir in DEBIAN_LIBDIR.glob("*/bin") if version(bindir) and complete(bindir)]
    if versioned:
        return max(versioned, key=version)
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is not None and complete(Path(pg_ctl).resolve().parent):
        return Path(pg_ctl).resolve().parent
    return None


def postgres_available() -> bool:
    """True when the server binaries the harness runs are installed."""
    return find_bindir() is not None


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the kernel's pick; the race is retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _bindable(host: str, port: int) -> bool:
    """True when a listener could bind host:port right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_open(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _searchable_by(path: Path, uid: int) -> bool:
    """True when user `uid` may traverse every directory from / down to `path` (mode bits only)."""
    if uid == 0:
        return True
    account = pwd.getpwuid(uid)
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem}
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _quote(value: str) -> str:
    """A postgresql.conf value: every value may be quoted, whatever its type."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class PostgresInstance:
    """A private PostgreSQL server on 127.0.0.1 with one empty database; a context manager.

    workdir:          a directory for the cluster (or, when the server user cannot reach it,
                      for a copy of the server log only; see the module docstring)
    dbname:           the database created at start; `.url` points at it
    max_connections:  the server's max_connections (a few are reserved for superusers
                      beyond it by default; this is per server, not per database)
    settings:         more postgresql.conf parameters ("log_statement": "all"), overriding
                      the harness's own
    bindir:           the server binaries to use; the newest installed when None
    start_timeout:    seconds pg_ctl waits for the server to accept connections

    start() initialises the cluster on first use; stop() stops the server and keeps the
    data (a later start() brings it back, on the same port when that is still free);
    close(), and leaving the `with` block, stop it and remove a private cluster directory.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        dbname: str = DEFAULT_DATABASE,
        max_connections: int = 100,
        settings: Mapping[str, str] | None = None,
        bindir: Path | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        _check_database_name(dbname)
        self.workdir = Path(workdir).resolve()
        self.dbname = dbname
        self.max_connections = max_connections
        self.settings = dict(settings or {})
        self._bindir = bindir
        self.start_timeout = start_timeout
        self.host = LOOPBACK
        self.port = 0
        self.user = SUPERUSER
        # Only [A-Za-z0-9_-]: goes into URLs and conninfo strings without any escaping.
        self.password = secrets.token_urlsafe(24)
        self.cluster_directory = self.workdir / "postgres"
        self._own_cluster_directory: Path | None = None  # made with mkdtemp; removed by close()
        self.startup_seconds: float | None = None  # how long the last start took (initdb included)

    # -- paths and addresses -------------------------------------------------------------

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_bindir()
            if self._bindir is None:
                raise PostgresHarnessError(SKIP_REASON)
        return self._bindir

    @property
    def data_directory(self) -> Path:
        return self.cluster_directory / "data"

    @property
    def socket_directory(self) -> Path:
        return self.cluster_directory / "run"

    @property
    def log_path(self) -> Path:
        return self.cluster_directory / "postgres.log"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the database made at start: postgresql+psycopg://..."""
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of one database of this server, over TCP."""
        return f"postgresql+psycopg://{self.user}:{self.password}@{self.host}:{self.port}/{dbname}"

    def conninfo(self, dbname: str | None = None) -> str:
        """A libpq connection string, for psycopg.connect() or psql."""
        return (
            f"host={self.host} port={self.port} user={self.user} password={self.password} "
            f"dbname={dbname or self.dbname} connect_timeout=10"
        )

    @property
    def server_user(self) -> str | None:
        """The OS user the server runs as: `postgres` when we are root, else None (ourselves)."""
        return SYSTEM_USER if os.geteuid() == 0 else None

    # -- running commands ----------------------------------------------------------------

    def _server_ids(self) -> tuple[int, int]:
        user = self.server_user
        if user is None:
            return os.geteuid(), os.getegid()
        try:
            account = pwd.getpwnam(user)
        except KeyError:
            raise PostgresHarnessError(
                f"running as root, but there is no {user!r} system user to run PostgreSQL as "
                "(Debian's postgresql-common creates it; initdb and postgres refuse to run as root)"
            ) from None
        return account.pw_uid, account.pw_gid

    def _run(
        self, *command: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run one of the server binaries as the server user; raise with its output on failure."""
        argv: Sequence[str] = [str(self.bindir / command[0]), *command[1:]]
        if self.server_user is not None:
            argv = ["runuser", "-u", self.server_user, "--", *argv]
        # No PG* variable of the caller's (PGDATA, PGPORT, PGHOST, PGSSLMODE ...) may steer
        # the tools; messages in English, for the retry check and for people.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        env.pop("LANGUAGE", None)
        try:
            result = subprocess.run(
                argv,
                cwd=self.cluster_directory,  # initdb fails in a cwd the server user cannot see
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresHarnessError(
                f"{command[0]} did not finish within {timeout:.0f} s"
                f"\n-- {self.log_path} --\n{self.log_tail()}"
            ) from exc
        if check and result.returncode != 0:
            raise PostgresHarnessError(
                f"{command[0]} failed (exit {result.returncode}): {(result.stderr + result.stdout).strip()}"
                f"\n-- {self.log_path} --\n{self.log_tail()}"
            )
        return result

    # -- configuration -------------------------------------------------------------------

    def config(self) -> dict[str, str]:
        """The postgresql.conf parameters the harness sets, in the order written."""
        params = {
            # Loopback only, IPv4 only: a test server must never be reachable from outside.
            "listen_addresses": LOOPBACK,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_directory),
            "unix_socket_permissions": "0700",
            "max_connections": str(self.max_connections),
            # A throw-away cluster: nothing is worth a disk flush.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            # The log goes to pg_ctl's log file (stderr), not to a collector's directory.
            "logging_collector": "off",
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "timezone": "UTC",
            "log_timezone": "UTC",
            "ssl": "off",
        }
        params.update(self.settings)
        return params

    def write_config(self) -> None:
        """Write harness.conf, which the cluster's postgresql.conf includes last."""
        lines = [f"# private PostgreSQL for tests, written by {__name__}; rewritten on every start"]
        lines += [f"{name} = {_quote(value)}" for name, value in self.config().items()]
        path = self.data_directory / "harness.conf"
        path.write_text("\n".join(lines) + "\n")
        os.chown(path, *self._server_ids())

    def _choose_cluster_directory(self) -> None:
        if self._own_cluster_directory is not None or (self.data_directory / "PG_VERSION").exists():
            return
        uid, _gid = self._server_ids()
        self.workdir.mkdir(parents=True, exist_ok=True)
        socket_path = self.socket_directory / _SOCKET_NAME
        if not _searchable_by(self.workdir, uid) or len(str(socket_path)) > _MAX_UNIX_PATH:
            # See the module docstring: a private directory rather than chmod on pytest's.
            self._own_cluster_directory = Path(tempfile.mkdtemp(prefix="pg-harness-"))
            self.cluster_directory = self._own_cluster_directory

    def _initdb(self) -> None:
        """Make the cluster: initdb, our pg_hba.conf, and postgresql.conf including harness.conf."""
        uid, gid = self._server_ids()
        self.cluster_directory.mkdir(parents=True, exist_ok=True)
        self.socket_directory.mkdir(exist_ok=True)
        for directory in (self.cluster_directory, self.socket_directory):
            os.chown(directory, uid, gid)
            directory.chmod(0o700)
        password_file = self.cluster_directory / "initdb-password"
        password_file.write_text(self.password + "\n")
        os.chown(password_file, uid, gid)
        password_file.chmod(0o600)
        try:
            self._run(
                "initdb",
                f"--pgdata={self.data_directory}",
                f"--username={self.user}",
                f"--pwfile={password_file}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            )
        finally:
            password_file.unlink(missing_ok=True)
        hba = self.data_directory / "pg_hba.conf"
        hba.write_text(
            "# private PostgreSQL for tests: the socket and 127.0.0.1 only, with the password\n"
            "# TYPE  DATABASE  USER  ADDRESS       METHOD\n"
            "local   all       all                 scram-sha-256\n"
            f"host    all       all   {LOOPBACK}/32  scram-sha-256\n"
        )
        with (self.data_directory / "postgresql.conf").open("a") as conf:
            conf.write("\n# The test harness's settings (tests/pg_harness.py) override all above.\n")
            conf.write("include 'harness.conf'\n")

    # -- running -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.postmaster_pid() is not None

    def postmaster_pid(self) -> int | None:
        """The pid of this cluster's postmaster, or None when it is not running."""
        try:
            pid = int((self.data_directory / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def start(self) -> None:
        """Initialise the cluster if needed, start the server, create `dbname` if missing."""
        if self.running:
            return
        started = time.monotonic()
        try:
            self._choose_cluster_directory()
            if not (self.data_directory / "PG_VERSION").exists():
                self._initdb()
            self._start_server()
            self._create_database(self.dbname, replace=False)
        except BaseException:
            self.close()  # __exit__ does not run when __enter__ raises
            raise
        atexit.register(self.close)  # a pytest that dies without teardown leaves no server
        self.startup_seconds = time.monotonic() - started

    def _start_server(self) -> None:
        for attempt in range(3):
            # A restart keeps the port when it can, so that URLs handed out stay valid.
            if attempt > 0 or not self.port or not _bindable(LOOPBACK, self.port):
                self.port = free_port()
            self.write_config()
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            result = self._run(
                "pg_ctl",
                "start",
                f"--pgdata={self.data_directory}",
                f"--log={self.log_path}",
                "--wait",
                f"--timeout={int(self.start_timeout)}",
                timeout=self.start_timeout + 30,
                check=False,
            )
            if result.returncode == 0:
                return
            log = self.log_text()[log_start:]
            if "Address already in use" not in log:  # not the free-port race: retrying cannot help
                output = (result.stderr + result.stdout).strip()
                raise PostgresHarnessError(
                    f"pg_ctl start failed (exit {result.returncode}): {output}"
                    f"\n-- {self.log_path} --\n{log[-3000:]}"
                )
        raise PostgresHarnessError(f"no free port after 3 attempts\n-- {self.log_path} --\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (fast shutdown: running sessions are cut off) and wait until none of
        its processes is left; the data stays. Safe to call twice, and when never started."""
        pid = self.postmaster_pid()
        if pid is not None:
            for mode in ("fast", "immediate"):
                self._run(
                    "pg_ctl",
                    "stop",
                    f"--pgdata={self.data_directory}",
                    f"--mode={mode}",
                    "--wait",
                    f"--timeout={int(timeout)}",
                    timeout=timeout + 30,
                    check=False,
                )
                if not _alive(pid):
                    break
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # Backends notice a dead postmaster and exit within moments; whatever still runs in
        # our data directory after a grace period is ours, and is killed by pid.
        deadline = time.monotonic() + 5.0
        while (leftovers := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for leftover in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGKILL)

    def close(self) -> None:
        """Stop the server and remove a private cluster directory, keeping a copy of the log
        in the work directory. Safe to call twice."""
        atexit.unregister(self.close)
        self.stop()
        if self._own_cluster_directory is not None:
            with contextlib.suppress(OSError):
                if self.log_path.exists():
                    shutil.copyfile(self.log_path, self.workdir / "postgres.log")
            shutil.rmtree(self._own_cluster_directory, ignore_errors=True)
            self._own_cluster_directory = None
            self.cluster_directory = self.workdir / "postgres"

    def processes(self) -> list[int]:
        """Live processes of this cluster: every PostgreSQL process's cwd is its data directory."""
        pids = []
        data = str(self.data_directory)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue  # gone, or a zombie
            if cwd == data and _alive(int(entry.name)):
                pids.append(int(entry.name))
        return pids

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- databases -----------------------------------------------------------------------

    def fresh_database(self, name: str) -> str:
        """Create an empty database `name` (dropping one of that name first, with its
        connections) and return its SQLAlchemy URL."""
        self._create_database(name, replace=True)
        return self.url_for(name)

    def _create_database(self, name: str, *, replace: bool) -> None:
        _check_database_name(name)
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if exists and not replace:
                return
            if exists:
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            # template0: guaranteed empty, whatever someone put into template1.
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C'").format(
                    sql.Identifier(name)
                )
            )

    # -- inspection ----------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything the server has logged so far."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def _check_database_name(name: str) -> None:
    if not _DATABASE_NAME.fullmatch(name) or name in _RESERVED_DATABASES:
        raise ValueError(
            f"database name {name!r}: use lower-case letters, digits and _ (at most 63), "
            f"not one of {sorted(_RESERVED_DATABASES)}"
        )


def require_postgres() -> None:
    """Skip the calling test when no server is installed, unless CI is set: then it is an error."""
    if postgres_available():
        return
    if os.environ.get("CI"):
        raise PostgresHarnessError(f"CI is set, and the tests need PostgreSQL: {SKIP_REASON}")
    pytest.skip(SKIP_REASON)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresInstance]:
    """One private PostgreSQL server for the session, with the empty database school_milter_test
    at `.url`; tests that need more take `fresh_database(name)`."""
    require_postgres()
    with PostgresInstance(tmp_path_factory.mktemp("postgres")) as instance:
        yield instance
