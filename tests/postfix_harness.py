"""Runs a private Postfix instance and an in-memory SMTP sink on loopback, for integration tests.

A `PostfixInstance` is a complete, throw-away Postfix: its own main.cf and master.cf in
its own config directory, its own queue and data directories and its own log file, all
under a work directory; an smtpd on a free 127.0.0.1 port; no local delivery (every
message is relayed to one next hop, normally an `SmtpSink`); optionally the gateway as
its milter. It never touches /etc/postfix or the system's queue, so it runs beside a
system Postfix and beside other instances.

    with SmtpSink() as sink, PostfixInstance(tmp_path, next_hop=sink.address) as mta:
        mta.send(raw, "a.patel@redborne.example", ["parent@example.org"])
        [delivered] = sink.wait_for(1, timeout=10)

What Postfix needs to run privately as root (each one found the hard way):

- `postfix -c DIR` works for root without listing DIR in `alternate_config_directories`
  of /etc/postfix/main.cf; that list only guards non-root users of the set-gid commands.
- `maillog_file` is refused (silently: `postfix check` and `start` exit 1 and say
  nothing, since they cannot log) unless the path starts with one of `maillog_file_prefixes`, whose
  default is `/var, /dev/stdout`; master.cf also needs the `postlog` unix-dgram service.
- The master opens `data_directory/master.lock` with the effective uid of `mail_owner`,
  so the data directory must be owned by postfix *and every directory above it must be
  searchable by postfix*. pytest's tmp_path lives under /tmp/pytest-of-root (mode 0700),
  so when the work directory is out of postfix's reach the data directory goes to a
  private directory under the system temp dir instead (removed again by `stop()`).
- The queue directory may stay root-owned under a 0700 parent: the daemons chdir into it
  as root before dropping privileges, and the integrity check of `postfix start` creates
  its subdirectories with the right owners and the `postdrop` group (about 2 s).
- chroot is off for every service in master.cf (a chrooted smtpd would need a copy of
  /etc/services, resolv.conf and friends inside the queue directory).
- `postfix stop` returns before the master is gone; `stop()` waits for the master and
  then for every process whose working directory is this instance's queue directory.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP, Envelope, Session

POSTFIX = Path("/usr/sbin/postfix")
POSTQUEUE = Path("/usr/sbin/postqueue")
POSTSUPER = Path("/usr/sbin/postsuper")
LOOPBACK = "127.0.0.1"

# The macros the gateway reads (client address and name, authenticated user, queue id,
# envelope addresses) added to Postfix's default lists for each stage. The gateway also
# asks for them itself during option negotiation; listing them here keeps the instance
# useful for a milter that does not.
MILTER_MACROS: Mapping[str, str] = {
    "milter_connect_macros": "j {daemon_name} {daemon_addr} v _ {client_addr} {client_name}",
    "milter_helo_macros": "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
    "milter_mail_macros": "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}",
    "milter_rcpt_macros": "i {rcpt_addr} {rcpt_host} {rcpt_mailer}",
    "milter_data_macros": "i",
    "milter_end_of_header_macros": "i",
    "milter_end_of_data_macros": "i {auth_authen} {client_addr} {client_name}",
}

# Debian's master.cf minus local delivery, chroot and the pipe transports. The smtpd
# listener is added in front. Columns: service type private unpriv chroot wakeup maxproc.
_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixHarnessError(RuntimeError):
    """The private Postfix could not be set up, started or stopped; the message says why."""


class SmtpRefused(Exception):
    """The SMTP server refused a command: `stage` is MAIL, RCPT or DATA."""

    def __init__(self, stage: str, code: int, text: str) -> None:
        super().__init__(f"{stage} refused: {code} {text}")
        self.stage = stage
        self.code = code
        self.text = text


def smtp_submit(
    address: tuple[str, int],
    raw: bytes,
    mail_from: str,
    rcpts: Sequence[str],
    *,
    helo: str = "client.test.example",
    timeout: float = 60.0,
    source_address: tuple[str, int] | None = None,
) -> tuple[int, str]:
    """Submit one message over SMTP to an MTA (LF line ends become CRLF); the final DATA
    reply (code, text). Raises SmtpRefused with the stage, code and text when MAIL, any
    RCPT or DATA is refused (4xx or 5xx): what a milter's reject or tempfail looks like
    to a client. Shared by the Postfix and Sendmail harnesses."""
    host, port = address
    with smtplib.SMTP(
        host, port, local_hostname=helo, timeout=timeout, source_address=source_address
    ) as smtp:
        smtp.ehlo()
        code, text = smtp.mail(mail_from)
        if code != 250:
            raise SmtpRefused("MAIL", code, text.decode(errors="replace"))
        for rcpt in rcpts:
            code, text = smtp.rcpt(rcpt)
            if code not in (250, 251):
                raise SmtpRefused("RCPT", code, text.decode(errors="replace"))
        try:
            # smtplib sends bytes as they are: a bare LF would reach the MTA as a line end,
            # and the CRLF smtplib appends after it as one more empty line.
            code, text = smtp.data(_crlf(raw))
        except smtplib.SMTPDataError as exc:  # DATA itself refused (no 354)
            error = exc.smtp_error
            reason = error.decode(errors="replace") if isinstance(error, bytes) else error
            raise SmtpRefused("DATA", exc.smtp_code, reason) from exc
        if code != 250:
            raise SmtpRefused("DATA", code, text.decode(errors="replace"))
        return code, text.decode(errors="replace")


@dataclass(frozen=True)
class MilterSettings:
    """How Postfix talks to the milter. Timeouts are Postfix time values ("5s", "2m")."""

    default_action: str = "tempfail"  # the gateway's promise: a message is never lost
    connect_timeout: str = "5s"
    command_timeout: str = "10s"
    content_timeout: str = "30s"
    protocol: int = 6
    macros: Mapping[str, str] = field(default_factory=lambda: dict(MILTER_MACROS))
    apply_to_non_smtpd: bool = True  # also sendmail(1)/pickup mail, as a school would


@dataclass(frozen=True)
class QueueEntry:
    """One message in the Postfix queue, from `postqueue -j`."""

    queue_id: str
    queue_name: str  # incoming, active, deferred, hold, maildrop
    sender: str
    recipients: tuple[str, ...]
    reasons: tuple[str, ...]  # delay reasons, one per recipient that has one


def postfix_available() -> bool:
    """True when the Postfix binaries the harness drives are installed."""
    return POSTFIX.exists() and POSTQUEUE.exists()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the kernel's pick; tiny race accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until host:port accepts connections; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")
        time.sleep(0.05)


def _searchable_by(path: Path, user: str) -> bool:
    """True when `user` may traverse every directory from / down to `path` (mode bits only)."""
    account = pwd.getpwnam(user)
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_uid == account.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _crlf(raw: bytes) -> bytes:
    """Line ends as on the wire: every bare LF becomes CRLF, as a mail client sends it."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", raw)


def _alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class PostfixInstance:
    """A private Postfix on 127.0.0.1 that relays all mail to `next_hop`; a context manager.

    workdir:          an empty or new directory for conf/, queue/, data/ and maillog
    next_hop:         (host, port) every message is relayed to, e.g. `SmtpSink.address`
    milter:           "inet:127.0.0.1:PORT" (or "unix:/path"), or None for no milter
    milter_settings:  default action, timeouts and macro lists for that milter
    smtpd_port:       the port of the smtpd listener; a free one when None
    extra_main_cf:    more main.cf parameters, overriding the harness's own
    smtpd_options:    `-o name=value` overrides for the smtpd listener (e.g. a proxy filter)
    extra_master_cf:  more master.cf services (complete lines, chroot off), appended as given
    """

    def __init__(
        self,
        workdir: Path,
        *,
        next_hop: tuple[str, int],
        milter: str | None = None,
        milter_settings: MilterSettings | None = None,
        smtpd_port: int | None = None,
        extra_main_cf: Mapping[str, str] | None = None,
        hostname: str = "gateway-test.localdomain",
        reinject_port: int | None = None,
        smtpd_options: Mapping[str, str] | None = None,
        extra_master_cf: str = "",
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.next_hop = next_hop
        self.milter = milter
        self.milter_settings = milter_settings or MilterSettings()
        self.smtpd_port = smtpd_port or free_port()
        self.extra_main_cf = dict(extra_main_cf or {})
        self.hostname = hostname
        # A second smtpd that runs no milter, as deploy/postfix/master.cf.snippet defines:
        # where the gateway delivers released mail, guidance and alerts.
        self.reinject_port = reinject_port
        self.smtpd_options = dict(smtpd_options or {})
        self.extra_master_cf = extra_master_cf
        self.config_directory = self.workdir / "conf"
        self.queue_directory = self.workdir / "queue"
        self.maillog = self.workdir / "maillog"
        self.data_directory = self.workdir / "data"
        self._own_data_directory: Path | None = None  # created outside workdir; removed on stop

    # -- configuration -------------------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters, in the order they are written."""
        host, port = self.next_hop
        params = {
            # 3.6 is what Debian's own main.cf declares; without a level Postfix warns
            # about backwards-compatible defaults on every command.
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_directory),
            "data_directory": str(self.data_directory),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": "localdomain",
            "myorigin": "$myhostname",
            # Loopback only, IPv4 only: the machine has no other network, and a test must
            # never be reachable from outside.
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            # No local delivery at all: every address, including postmaster's bounces, is
            # relayed to the next hop.
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": f"[{host}]:{port}",
            # No DNS on this machine: the next hop is an IP literal and client names are
            # not looked up, so nothing ever waits on a resolver timeout.
            "smtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.workdir),
            # A deferred message is retried within seconds instead of minutes.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
            "delay_warning_time": "0h",
            "biff": "no",
        }
        if self.milter:
            settings = self.milter_settings
            params["smtpd_milters"] = self.milter
            params["non_smtpd_milters"] = self.milter if settings.apply_to_non_smtpd else ""
            params["milter_default_action"] = settings.default_action
            params["milter_protocol"] = str(settings.protocol)
            params["milter_connect_timeout"] = settings.connect_timeout
            params["milter_command_timeout"] = settings.command_timeout
            params["milter_content_timeout"] = settings.content_timeout
            params.update(settings.macros)
        params.update(self.extra_main_cf)
        return params

    def master_cf(self) -> str:
        """master.cf: the smtpd listener on LOOPBACK:smtpd_port, internal services, extra_master_cf."""
        listener = f"{LOOPBACK}:{self.smtpd_port} inet n - n - - smtpd\n"
        listener += "".join(f"  -o {name}={value}\n" for name, value in self.smtpd_options.items())
        if self.reinject_port:
            listener += (
                f"{LOOPBACK}:{self.reinject_port} inet n - n - - smtpd\n"
                "  -o syslog_name=postfix/school-reinject\n"
                "  -o smtpd_milters=\n"
                "  -o receive_override_options=no_milters\n"
            )
        extra = self.extra_master_cf
        return listener + _MASTER_SERVICES + (extra if not extra or extra.endswith("\n") else extra + "\n")

    def write_config(self) -> None:
        """Create the directories and write main.cf and master.cf (start() does this)."""
        self.config_directory.mkdir(parents=True, exist_ok=True)
        self.queue_directory.mkdir(parents=True, exist_ok=True)
        self._prepare_data_directory()
        lines = [f"{name} = {value}".rstrip() for name, value in self.main_cf().items()]
        (self.config_directory / "main.cf").write_text(
            "# Written by tests/postfix_harness.py for a private test instance.\n" + "\n".join(lines) + "\n"
        )
        (self.config_directory / "master.cf").write_text(self.master_cf())

    def _prepare_data_directory(self) -> None:
        postfix = pwd.getpwnam("postfix")
        if self._own_data_directory is None and not _searchable_by(self.workdir, "postfix"):
            # See the module docstring: master.lock is opened as postfix.
            self._own_data_directory = Path(tempfile.mkdtemp(prefix="postfix-harness-data-"))
            self.data_directory = self._own_data_directory
        self.data_directory.mkdir(parents=True, exist_ok=True)
        os.chown(self.data_directory, postfix.pw_uid, postfix.pw_gid)
        self.data_directory.chmod(0o700)

    # -- life cycle ----------------------------------------------------------------------

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(POSTFIX), "-c", str(self.config_directory), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise PostfixHarnessError(
                f"postfix {' '.join(args)} failed (exit {result.returncode}): "
                f"{(result.stderr + result.stdout).strip()}\n-- {self.maillog} --\n{self.log()[-3000:]}"
            )
        return result

    def start(self) -> None:
        """Write the configuration, check it, start the master and wait for the smtpd port."""
        if os.geteuid() != 0:
            raise PostfixHarnessError("a private Postfix instance must be started as root")
        if not postfix_available():
            raise PostfixHarnessError(f"{POSTFIX} is not installed (apt-get install postfix)")
        self.write_config()
        try:
            # `start` runs the integrity check first: it creates the queue subdirectories
            # with their owners and modes (about 2 s), and fails with a reason in the log.
            self._postfix("start")
            wait_for_port(LOOPBACK, self.smtpd_port, timeout=15)
        except TimeoutError as exc:
            self.stop()
            raise PostfixHarnessError(f"{exc}\n-- {self.maillog} --\n{self.log()[-3000:]}") from exc
        except BaseException:
            self.stop()  # __exit__ does not run when __enter__ raises
            raise

    def master_pid(self) -> int | None:
        """The pid of this instance's master process, or None when it is not running."""
        try:
            pid = int((self.queue_directory / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def processes(self) -> list[int]:
        """Live processes of this instance: every Postfix daemon's cwd is its queue directory."""
        pids = []
        queue = str(self.queue_directory)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue  # gone, or a zombie
            if (cwd == queue or cwd.startswith(queue + "/")) and _alive(int(entry.name)):
                pids.append(int(entry.name))
        return pids

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Postfix and wait until none of its processes is left; safe to call twice."""
        pid = self.master_pid()
        if pid is not None:
            self._postfix("stop", check=False)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        # The master signals its process group on the way out; a daemon busy in a
        # transaction may take a moment longer. Whatever still runs from our queue
        # directory after the grace period is ours, and is killed by pid.
        deadline = time.monotonic() + 5.0
        while (leftovers := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for leftover in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGKILL)
        if self._own_data_directory is not None:
            shutil.rmtree(self._own_data_directory, ignore_errors=True)
            self._own_data_directory = None
            self.data_directory = self.workdir / "data"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- mail ----------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the smtpd listener."""
        return (LOOPBACK, self.smtpd_port)

    def send(
        self,
        raw: bytes,
        mail_from: str,
        rcpts: Sequence[str],
        *,
        helo: str = "client.test.example",
        timeout: float = 60.0,
    ) -> tuple[int, str]:
        """Submit one message over SMTP (LF line ends become CRLF); the final DATA reply (code, text).

        Raises SmtpRefused with the stage, code and text when MAIL, any RCPT or DATA is
        refused (4xx or 5xx): what a milter's reject or tempfail looks like to a client.
        """
        return smtp_submit(self.address, raw, mail_from, rcpts, helo=helo, timeout=timeout)

    def sendmail(self, raw: bytes, mail_from: str, rcpts: Sequence[str]) -> None:
        """Submit through /usr/sbin/sendmail -C (the non-SMTP path: postdrop, pickup)."""
        subprocess.run(
            ["/usr/sbin/sendmail", "-C", str(self.config_directory), "-f", mail_from, "-i", "--", *rcpts],
            input=raw,
            check=True,
            timeout=30,
        )

    # -- inspection ----------------------------------------------------------------------

    def log(self) -> str:
        """Everything this instance has logged so far (its maillog_file)."""
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first match of a regular expression in the log, waiting up to `timeout` s."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = compiled.search(self.log())
            if found:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not in {self.maillog} after {timeout:.0f} s")
            time.sleep(0.05)

    def _postqueue(self, *args: str) -> str:
        result = subprocess.run(
            [str(POSTQUEUE), "-c", str(self.config_directory), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise PostfixHarnessError(f"postqueue {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def queue(self) -> list[QueueEntry]:
        """Every message in the queue (any state), from `postqueue -j`."""
        entries = []
        for line in self._postqueue("-j").splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            recipients = item.get("recipients", [])
            entries.append(
                QueueEntry(
                    queue_id=item["queue_id"],
                    queue_name=item["queue_name"],
                    sender=item.get("sender", ""),
                    recipients=tuple(r["address"] for r in recipients),
                    reasons=tuple(r["delay_reason"] for r in recipients if r.get("delay_reason")),
                )
            )
        return entries

    def queue_ids(self) -> list[str]:
        """Queue ids of every message still queued."""
        return [entry.queue_id for entry in self.queue()]

    def mailq(self) -> str:
        """`postqueue -p` as text (a held message has '!' after its queue id)."""
        return self._postqueue("-p")

    def hold_queue(self) -> list[QueueEntry]:
        """Messages on hold (what a milter's quarantine does in Postfix)."""
        return [entry for entry in self.queue() if entry.queue_name == "hold"]

    def release(self, queue_id: str = "ALL") -> None:
        """Release held messages back to the deferred queue (`postsuper -H`)."""
        subprocess.run(
            [str(POSTSUPER), "-c", str(self.config_directory), "-H", queue_id],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def flush(self) -> None:
        """Retry every deferred message now (`postqueue -f`)."""
        self._postqueue("-f")

    def wait_for_empty_queue(self, timeout: float = 10.0) -> None:
        """Block until nothing is queued; TimeoutError lists what is left."""
        deadline = time.monotonic() + timeout
        while entries := self.queue():
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not empty after {timeout:.0f} s: {entries}")
            time.sleep(0.1)


@dataclass(frozen=True)
class ReceivedMessage:
    """What the sink received: the envelope and the message bytes exactly as sent."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    peer: str


class _SinkHandler:
    """aiosmtpd handler: keeps each message, or refuses the next few with a given reply."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        refusal = self.sink._take_refusal()
        if refusal is not None:
            return refusal
        content = envelope.original_content or b""
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        self.sink._keep(
            ReceivedMessage(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=content,
                peer=peer,
            )
        )
        return "250 2.0.0 Ok: kept by the test sink"


class SmtpSink:
    """An SMTP server on 127.0.0.1 that accepts every message and keeps it in memory.

    `refuse(n, reply)` makes it answer the next n messages with `reply` instead (a 4xx
    to make Postfix defer and retry, a 5xx to make it bounce).
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.messages: list[ReceivedMessage] = []
        self._cond = threading.Condition()
        self._refusals: list[str] = []
        self._controller: Controller | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def start(self) -> None:
        from aiosmtpd.controller import Controller  # only the sink needs aiosmtpd

        # server_hostname avoids socket.getfqdn(), which waits on a resolver offline.
        self._controller = Controller(
            _SinkHandler(self),
            hostname=LOOPBACK,
            port=self.port,
            server_hostname="sink.test.example",
            ready_timeout=10.0,
        )
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def refuse(self, count: int, reply: str = "451 4.3.0 Test sink: try again later") -> None:
        """Answer the next `count` messages with `reply` instead of keeping them."""
        with self._cond:
            self._refusals.extend([reply] * count)

    def _take_refusal(self) -> str | None:
        with self._cond:
            return self._refusals.pop(0) if self._refusals else None

    def _keep(self, message: ReceivedMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until at least `count` messages arrived; all kept so far, in arrival order."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(
                    f"the sink has {len(self.messages)} of {count} message(s) after {timeout} s"
                )
            return list(self.messages)

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()
