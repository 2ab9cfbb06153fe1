"""Runs a private Sendmail on loopback, for integration tests: Debian's own, never installed.

Debian's sendmail-bin conflicts with postfix, which must stay installed, so
`deploy/install-sendmail-for-tests.sh` extracts the three .debs into PREFIX
(/opt/school-milter-test/sendmail, or $SCHOOL_MILTER_SENDMAIL_PREFIX). A
`SendmailInstance` is a throw-away daemon from there: its own sendmail.mc, built with m4
from the extracted sendmail-cf into its own sendmail.cf, its own queue, pid file and
logs under a work directory; one listener on a free 127.0.0.1 port; every message
relayed to one next hop (normally a `tests.postfix_harness.SmtpSink`); optionally the
gateway as its milter, configured by `deploy/sendmail/school-milter.mc` itself with
only the socket changed.

    with SmtpSink() as sink, SendmailInstance(tmp_path, next_hop=sink.address,
                                              milter=f"inet:{port}@127.0.0.1") as mta:
        mta.send(raw, "a.patel@redborne.example", ["parent@example.org"])
        [delivered] = sink.wait_for(1, timeout=10)

What a private Sendmail needs (each one found the hard way):

- Its own host name, before it reads any configuration. At start Sendmail looks its host
  name up with the C library (the resolver, then /etc/hosts: the DNS query leaves the
  machine) and, when the name has no dot and no dotted alias ("vm" here), sleeps 60 s
  and tries again. confDOMAIN_NAME and the ServiceSwitchFile come too late for that.
  So the daemon runs in its own UTS and mount namespaces (`unshare`): host name
  sendmail-test.localdomain, and a private /etc/hosts, /etc/nsswitch.conf
  (`hosts: files`) and /etc/resolv.conf (127.0.0.1) bind-mounted for it alone. Nothing
  it looks up leaves 127.0.0.1, and the rest of the machine sees no change.
- Its own PID namespace too: `sendmail -bD` (a daemon in the foreground) is its init,
  so when it exits the kernel ends every process it forked (per-connection children,
  deliveries). `unshare` ignores SIGTERM, so stop() signals Sendmail itself.
- A smart host that is not itself: a bare `[127.0.0.1]` is one of Sendmail's own
  addresses ($=w), so SMART_HOST `[127.0.0.1]` would be dropped as local and mail sent to
  each domain's MX. `relay:[127.0.0.1]` names the mailer, which skips that check; the
  mailers' `TCP $h PORT` arguments then point at the sink's port.
- FEATURE(`accept_unresolvable_domains'): no sender domain resolves without DNS.
- The queue directory root-owned and 0700; the .cf not group or world writable.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.postfix_harness import LOOPBACK, free_port, smtp_submit

REPO = Path(__file__).resolve().parents[1]
PREFIX = Path(os.environ.get("SCHOOL_MILTER_SENDMAIL_PREFIX", "/opt/school-milter-test/sendmail"))
SENDMAIL = PREFIX / "usr/libexec/sendmail/sendmail"
CF_DIR = PREFIX / "usr/share/sendmail/cf"
INSTALL_SCRIPT = REPO / "deploy/install-sendmail-for-tests.sh"
DEPLOY_MC = REPO / "deploy/sendmail/school-milter.mc"
HOSTNAME = "sendmail-test.localdomain"

# The socket in deploy/sendmail/school-milter.mc, which the test copy replaces.
_FILTER_SOCKET = re.compile(r"(INPUT_MAIL_FILTER\(`school-milter',\s*`S=)([^,']+)")

# Runs inside the new namespaces: name the host, give this Sendmail its own resolver
# files, then become Sendmail. Arguments: host name, hosts, nsswitch.conf, resolv.conf,
# then the command.
_NAMESPACE_SETUP = """\
set -e
hostname "$1"
mount --bind "$2" /etc/hosts
mount --bind "$3" /etc/nsswitch.conf
if [ -e /etc/resolv.conf ]; then mount --bind "$4" /etc/resolv.conf; fi
shift 4
exec "$@"
"""


class SendmailHarnessError(RuntimeError):
    """The private Sendmail could not be configured, started or stopped; the message says why."""


def sendmail_missing() -> str | None:
    """Why the tests cannot have a private Sendmail (the reason to skip), or None when they can."""
    if not SENDMAIL.is_file() or not (CF_DIR / "m4/cf.m4").is_file():
        return (
            f"no private Sendmail in {PREFIX} (Debian's sendmail-bin conflicts with postfix, so it "
            f"is extracted, not installed): run `sudo {INSTALL_SCRIPT.relative_to(REPO)}`"
        )
    return None


def milter_snippet(socket: str, source: Path = DEPLOY_MC) -> str:
    """deploy/sendmail/school-milter.mc with the filter's socket (S=) replaced, nothing else."""
    text = source.read_text()
    adapted, count = _FILTER_SOCKET.subn(lambda m: m.group(1) + socket, text)
    if count != 1:
        raise SendmailHarnessError(
            f"{source}: expected one INPUT_MAIL_FILTER(`school-milter', `S=...') line, found {count}"
        )
    return adapted


class SendmailInstance:
    """A private Sendmail on 127.0.0.1 that relays all mail to `next_hop`; a context manager.

    workdir:   an empty or new directory for conf/, mqueue/ and the logs
    next_hop:  (host, port) every message is relayed to, e.g. `SmtpSink.address`
    milter:    the gateway's socket in Sendmail's syntax ("inet:PORT@127.0.0.1",
               "local:/path"), or None for no milter
    extra_mc:  more .mc lines, after the harness's own and before the MAILER() lines
    """

    def __init__(
        self,
        workdir: Path,
        *,
        next_hop: tuple[str, int],
        milter: str | None = None,
        port: int | None = None,
        extra_mc: Sequence[str] = (),
        hostname: str = HOSTNAME,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.next_hop = next_hop
        self.milter = milter
        self.port = port or free_port()
        self.extra_mc = list(extra_mc)
        self.hostname = hostname
        self.conf = self.workdir / "conf"
        self.queue_directory = self.workdir / "mqueue"
        self.cf = self.conf / "sendmail.cf"
        self.output = self.workdir / "sendmail.out"  # the daemon's own stdout and stderr
        self.milter_debug_log = self.workdir / "milter-debug.log"  # -d64.10: the milter dialogue
        self.smtp_trace = self.workdir / "smtp-trace.log"  # -X: every SMTP line in and out
        self._proc: subprocess.Popen[bytes] | None = None

    # -- configuration -------------------------------------------------------------------

    def mc(self) -> str:
        """The sendmail.mc of this instance."""
        host, port = self.next_hop
        conf, work = self.conf, self.workdir
        lines = [
            "divert(-1)dnl",
            "# Written by tests/sendmail_harness.py for a private test instance.",
            "divert(0)dnl",
            "VERSIONID(`school-milter test instance')dnl",
            "OSTYPE(`linux')dnl",
            # Nothing from /etc/mail: helpfile, local-host-names and friends come from conf/.
            f"define(`MAIL_SETTINGS_DIR', `{conf}/')dnl",
            f"define(`confDOMAIN_NAME', `{self.hostname}')dnl",
            f"define(`confSERVICE_SWITCH_FILE', `{conf}/service.switch')dnl",
            f"define(`confHOSTS_FILE', `{conf}/hosts')dnl",
            f"define(`QUEUE_DIR', `{self.queue_directory}')dnl",
            f"define(`STATUS_FILE', `{work}/sendmail.st')dnl",
            f"define(`confPID_FILE', `{work}/sendmail.pid')dnl",
            f"define(`confDEAD_LETTER_DROP', `{work}/dead.letter')dnl",
            "undefine(`ALIAS_FILE')dnl",
            "define(`confDONT_PROBE_INTERFACES', `True')dnl",
            "define(`confTO_IDENT', `0')dnl",
            # A busy shared machine must not make Sendmail queue or refuse mail.
            "define(`confQUEUE_LA', `1000')dnl",
            "define(`confREFUSE_LA', `1000')dnl",
            # Everything, local names included, goes to the next hop (see the module docstring).
            f"define(`SMART_HOST', `relay:[{host}]')dnl",
            f"define(`MAIL_HUB', `relay:[{host}]')dnl",
            *(
                f"define(`{mailer}_MAILER_ARGS', `TCP $h {port}')dnl"
                for mailer in ("RELAY", "SMTP", "ESMTP", "SMTP8", "DSMTP")
            ),
            "FEATURE(`no_default_msa')dnl",
            "FEATURE(`accept_unresolvable_domains')dnl",
            f"DAEMON_OPTIONS(`Port={self.port}, Addr={LOOPBACK}, Name=MTA')dnl",
            *self.extra_mc,
        ]
        if self.milter:
            lines.append(f"include(`{conf}/school-milter.mc')dnl")
        lines += ["MAILER(`local')dnl", "MAILER(`smtp')dnl"]
        return "\n".join(lines) + "\n"

    def write_config(self) -> None:
        """Write conf/ and build sendmail.cf with m4 (start() does this)."""
        self.conf.mkdir(parents=True, exist_ok=True)
        self.queue_directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.queue_directory, 0o700)
        (self.conf / "service.switch").write_text("hosts files\naliases files\n")
        (self.conf / "hosts").write_text(
            f"127.0.0.1\tlocalhost\n127.0.0.1\t{self.hostname} {self.hostname.split('.')[0]}\n"
        )
        (self.conf / "nsswitch.conf").write_text(
            "passwd: files\ngroup: files\nshadow: files\nhosts: files\nservices: files\n"
        )
        (self.conf / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        if self.milter:
            (self.conf / "school-milter.mc").write_text(milter_snippet(self.milter))
        (self.conf / "sendmail.mc").write_text(self.mc())
        if shutil.which("m4") is None:
            raise SendmailHarnessError(f"m4 is not installed: run `sudo {INSTALL_SCRIPT}`")
        built = subprocess.run(
            ["m4", f"-D_CF_DIR_={CF_DIR}/", str(CF_DIR / "m4/cf.m4"), str(self.conf / "sendmail.mc")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if built.returncode != 0 or built.stderr.strip():
            raise SendmailHarnessError(f"m4 could not build sendmail.cf:\n{built.stderr}")
        self.cf.write_text(built.stdout)
        os.chmod(self.cf, 0o644)

    # -- lifecycle -----------------------------------------------------------------------

    def command(self) -> list[str]:
        """The command line: namespaces, their set-up, then `sendmail -bD` with this .cf."""
        return [
            # Should the test process die without stop(), the kernel ends unshare (its
            # parent-death signal), unshare's --kill-child ends Sendmail, and with Sendmail
            # (the namespace's init) everything it forked.
            "setpriv",
            "--pdeathsig",
            "KILL",
            "unshare",
            "--uts",
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child=SIGKILL",
            "sh",
            "-c",
            _NAMESPACE_SETUP,
            "sh",
            self.hostname,
            str(self.conf / "hosts"),
            str(self.conf / "nsswitch.conf"),
            str(self.conf / "resolv.conf"),
            str(SENDMAIL),
            "-C",
            str(self.cf),
            "-bD",
            "-X",
            str(self.smtp_trace),
            "-D",
            str(self.milter_debug_log),
            "-d64.10",
        ]

    def start(self) -> None:
        reason = sendmail_missing()
        if reason:
            raise SendmailHarnessError(reason)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        with self.output.open("wb") as output:
            self._proc = subprocess.Popen(self.command(), stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            while not self.listening():
                if self._proc.poll() is not None:
                    raise SendmailHarnessError(f"sendmail exited with {self._proc.returncode}\n{self.log()}")
                if time.monotonic() > deadline:
                    raise SendmailHarnessError(f"sendmail is not listening on port {self.port}\n{self.log()}")
                time.sleep(0.05)
        except BaseException:
            self.stop()  # __exit__ does not run when __enter__ raises
            raise

    def listening(self) -> bool:
        """True once the daemon listens on its port.

        Read from /proc/net/tcp rather than by connecting: a connection would be an SMTP
        session, and Sendmail opens a milter session for every one, even one that says nothing.
        """
        local = f"0100007F:{self.port:04X}"  # 127.0.0.1, little-endian as the kernel prints it
        with contextlib.suppress(OSError):
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[1] == local and fields[3] == "0A":  # 0A: LISTEN
                    return True
        return False

    def daemon_pid(self) -> int | None:
        """The pid (in our namespace) of the Sendmail daemon, the child of `unshare`.

        setpriv execs unshare, so the Popen pid is unshare's; its one child is Sendmail.
        """
        if self._proc is None or self._proc.poll() is not None:
            return None
        with contextlib.suppress(OSError, ValueError):
            children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children").read_text().split()
            return int(children[0]) if children else None
        return None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Sendmail; everything it forked goes with it (PID namespace). Safe to call twice."""
        proc = self._proc
        if proc is None:
            return
        pid = self.daemon_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if (pid := self.daemon_pid()) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()  # unshare: its --kill-child takes Sendmail along
            proc.wait(timeout)
        self._proc = None

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
        """(host, port) of the SMTP listener."""
        return (LOOPBACK, self.port)

    def send(
        self,
        raw: bytes,
        mail_from: str,
        rcpts: Sequence[str],
        *,
        helo: str = "client.test.example",
        client_address: str | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, str]:
        """Submit one message over SMTP (LF line ends become CRLF); the final DATA reply (code, text).

        `client_address` is the loopback address to connect from (127.0.0.2, say), for a
        client that is not the school's when the rules trust 127.0.0.1 alone. Raises
        tests.postfix_harness.SmtpRefused with the stage (MAIL, RCPT or DATA), code and text
        when Sendmail refuses, as PostfixInstance.send does.
        """
        source = (client_address, 0) if client_address else None
        return smtp_submit(
            self.address, raw, mail_from, rcpts, helo=helo, timeout=timeout, source_address=source
        )

    # -- inspection ----------------------------------------------------------------------

    def milter_dialogue(self) -> str:
        """Sendmail's own account of its milter conversations (debug category 64)."""
        with contextlib.suppress(FileNotFoundError):
            return self.milter_debug_log.read_text(errors="replace")
        return ""

    def queue_files(self) -> list[str]:
        """Names of the files in the queue directory (qf/df: queued; hf: quarantined)."""
        return sorted(p.name for p in self.queue_directory.iterdir())

    def log(self) -> str:
        """The tail of what this instance wrote: its output, SMTP trace and milter dialogue."""
        parts = []
        for path in (self.output, self.smtp_trace, self.milter_debug_log):
            with contextlib.suppress(FileNotFoundError):
                parts.append(f"-- {path} --\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)
