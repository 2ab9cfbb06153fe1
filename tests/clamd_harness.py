"""Runs a private clamd (Debian's clamav-daemon) with the project's own signatures, for tests.

A `ClamdInstance` is a throw-away clamd: its own clamd.conf, database directory, temporary
directory, log and pid file under a work directory; a UNIX socket there and a TCP socket
on a free 127.0.0.1 port. It never reads /etc/clamav or /var/lib/clamav, so it runs beside
a system clamd and beside other instances.

    with ClamdInstance(tmp_path, stream_max_length="1M") as clamd:
        ClamdClient(clamd.unix_address).scan_bytes(data)

The database is only tests/data/clamav/ (*.ndb, *.hdb): there is no freshclam and no
network here, and a tiny database makes start-up take a fraction of a second instead of
the 20 s and 1 GB of memory of the official one. clamd marks our signatures' names
".UNOFFICIAL".

Found the hard way:

- clamd reads each option once: the *first* occurrence in clamd.conf wins and a repeated
  option does not override it, so the harness writes each option exactly once, its own
  settings replacing those of a `base_config`.
- clamd refuses to start on a database or config line it cannot parse, and says why only
  in its output: `start()` raises with the tail of it.
- clamd runs as the current user when the config names no `User` (Debian's clamd.conf
  says `User clamav`, which would make it drop root and lose access to the work dir).
- A UNIX socket path must fit in 108 bytes; a long work directory gets its socket in a
  short private directory under the system temp dir instead (removed again by `stop()`).
- The TCP port is picked free by the kernel and then handed to clamd, so another process
  can take it in between; clamd then exits with a bind error and the harness retries
  with another port.
- Debian's AppArmor profile for /usr/sbin/clamd (enforced on some hosts) allows /tmp/**
  but not, for example, a work directory under $HOME: keep work directories under /tmp.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from milter.clamd import ClamdClient

CLAMD = Path("/usr/sbin/clamd")
SIGNATURES = Path(__file__).resolve().parent / "data" / "clamav"
LOOPBACK = "127.0.0.1"
SKIP_REASON = f"{CLAMD} is missing: install Debian's clamav-daemon (deploy/install-system-packages.sh)"

# Options the harness always sets itself: sockets, files and identity of the private
# instance. Taken out of a base_config, whatever it says.
PRIVATE_OPTIONS = frozenset(
    {
        "Foreground",
        "LocalSocket",
        "LocalSocketGroup",
        "LocalSocketMode",
        "FixStaleSocket",
        "TCPSocket",
        "TCPAddr",
        "User",
        "DatabaseDirectory",
        "TemporaryDirectory",
        "LogFile",
        "LogFileUnlock",
        "LogFileMaxSize",
        "LogRotate",
        "LogSyslog",
        "LogTime",
        "PidFile",
        "SelfCheck",
    }
)
_MAX_UNIX_PATH = 100  # sun_path is 108 bytes with the NUL; leave a little room


class ClamdHarnessError(RuntimeError):
    """The private clamd could not be set up or started; the message says why."""


def clamd_available() -> bool:
    """True when the clamd binary the harness runs is installed."""
    return CLAMD.exists()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the kernel's pick; the race is retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ClamdInstance:
    """A private clamd on a UNIX socket and on 127.0.0.1; a context manager.

    workdir:            an empty or new directory for clamd.conf, db/, tmp/ and the log
    stream_max_length:  clamd's StreamMaxLength ("25M", "1M", ...); None leaves it to
                        base_config or clamd's default
    settings:           more clamd.conf options ("MaxFileSize": "512K"), overriding
                        base_config
    base_config:        a clamd.conf to take every other option from (for example
                        deploy/clamd/clamd.conf); its sockets, files and User are replaced
    start_timeout:      seconds to wait for PONG
    """

    def __init__(
        self,
        workdir: Path,
        stream_max_length: str | None = "25M",
        *,
        settings: Mapping[str, str] | None = None,
        base_config: Path | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.stream_max_length = stream_max_length
        self.settings = dict(settings or {})
        self.base_config = base_config
        self.start_timeout = start_timeout
        self.config_path = self.workdir / "clamd.conf"
        self.database_directory = self.workdir / "db"
        self.temporary_directory = self.workdir / "tmp"
        self.log_path = self.workdir / "clamd.log"
        self.output_path = self.workdir / "clamd.out"  # stdout and stderr: config errors go there
        self.pid_path = self.workdir / "clamd.pid"
        self.socket_path = self.workdir / "clamd.sock"
        self._own_socket_dir: Path | None = None
        self.tcp_port = 0
        self.startup_seconds: float | None = None  # how long the last start took, to PONG
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def unix_address(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def tcp_address(self) -> str:
        return f"inet:{LOOPBACK}:{self.tcp_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- configuration -------------------------------------------------------------------

    def config_options(self) -> dict[str, str]:
        """clamd.conf options in the order written; each once, since clamd keeps the first."""
        options = {
            "Foreground": "yes",
            "LocalSocket": str(self.socket_path),
            "LocalSocketMode": "600",
            "FixStaleSocket": "yes",
            "TCPSocket": str(self.tcp_port),
            "TCPAddr": LOOPBACK,  # loopback only: a test must never be reachable from outside
            "DatabaseDirectory": str(self.database_directory),
            "TemporaryDirectory": str(self.temporary_directory),
            "LogFile": str(self.log_path),
            "LogTime": "yes",
            "PidFile": str(self.pid_path),
            # Nobody changes the database under a test; no reload thread waking up.
            "SelfCheck": "0",
        }
        if self.stream_max_length is not None:
            options["StreamMaxLength"] = self.stream_max_length
        options.update(self.settings)
        if self.base_config is not None:
            for name, value in _read_options(self.base_config):
                if name not in PRIVATE_OPTIONS and name not in options and name != "Example":
                    options[name] = value
        return options

    def write_config(self) -> None:
        lines = [f"# private clamd for tests, written by {__name__}; do not edit"]
        lines += [f"{name} {value}" for name, value in self.config_options().items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.temporary_directory.mkdir(exist_ok=True)
        shutil.rmtree(self.database_directory, ignore_errors=True)
        self.database_directory.mkdir()
        signatures = sorted([*SIGNATURES.glob("*.ndb"), *SIGNATURES.glob("*.hdb")])
        if not signatures:
            raise ClamdHarnessError(f"no signature database (*.ndb, *.hdb) in {SIGNATURES}")
        for path in signatures:
            shutil.copy(path, self.database_directory / path.name)
        if len(str(self.socket_path)) > _MAX_UNIX_PATH:
            self._own_socket_dir = Path(tempfile.mkdtemp(prefix="clamd-"))
            self.socket_path = self._own_socket_dir / "clamd.sock"

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        """Start clamd and wait until it answers PING on both sockets."""
        if self.running:
            return
        self._prepare()
        for _attempt in range(3):
            self.tcp_port = free_port()
            self.write_config()
            started = time.monotonic()
            self._spawn()
            if self._wait_ready():
                self.startup_seconds = time.monotonic() - started
                return
            output = self.output_tail()
            if "bind" not in output.lower():  # not the free-port race: retrying cannot help
                break
        self.stop()
        raise ClamdHarnessError(
            f"clamd did not start (config {self.config_path}); its output ends:\n{self.output_tail()}"
        )

    def _spawn(self) -> None:
        with self.output_path.open("ab") as output:
            self._process = subprocess.Popen(
                [str(CLAMD), f"--config-file={self.config_path}"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the test run is for pytest, not clamd
            )

    def _wait_ready(self) -> bool:
        """True when clamd answers PONG on both sockets; False when it exited."""
        deadline = time.monotonic() + self.start_timeout
        clients = [ClamdClient(self.unix_address, timeout=1.0), ClamdClient(self.tcp_address, timeout=1.0)]
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                return False
            if all(client.ping() for client in clients):
                return True
            time.sleep(0.02)
        self._terminate()
        raise ClamdHarnessError(
            f"clamd gave no PONG within {self.start_timeout:.0f} s; its output ends:\n{self.output_tail()}"
        )

    def stop(self) -> None:
        """Stop clamd (SIGTERM, then SIGKILL after 10 s) and remove a private socket directory."""
        self._terminate()
        if self._own_socket_dir is not None:
            shutil.rmtree(self._own_socket_dir, ignore_errors=True)
            self._own_socket_dir = None
            self.socket_path = self.workdir / "clamd.sock"

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def output_tail(self, lines: int = 20) -> str:
        """The last lines clamd wrote to stdout/stderr (its errors are there, not in the log)."""
        with contextlib.suppress(OSError):
            return "\n".join(self.output_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _read_options(path: Path) -> Iterator[tuple[str, str]]:
    """(option, value) pairs of a clamd.conf, comments and blank lines skipped."""
    for line in path.read_text().splitlines():
        fields = line.split(None, 1)
        if fields and not fields[0].startswith("#"):
            yield fields[0], fields[1].strip() if len(fields) > 1 else ""


def _require_clamd() -> None:
    if not clamd_available():
        pytest.skip(SKIP_REASON)


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdInstance]:
    """One private clamd for the session: StreamMaxLength 25M, the project's signatures."""
    _require_clamd()
    with ClamdInstance(tmp_path_factory.mktemp("clamd")) as instance:
        yield instance


@pytest.fixture
def clamd_small_limit(tmp_path: Path) -> Iterator[ClamdInstance]:
    """A private clamd with small limits: StreamMaxLength 1M; MaxFileSize 512K, reported
    (AlertExceedsMax) rather than silently passed."""
    _require_clamd()
    settings = {"MaxFileSize": "512K", "AlertExceedsMax": "yes"}
    with ClamdInstance(tmp_path / "clamd", stream_max_length="1M", settings=settings) as instance:
        yield instance
