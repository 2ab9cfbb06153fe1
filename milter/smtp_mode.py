"""SMTP mode: the scanning engine as an SMTP server that relays what it accepts to a next hop.

For mail servers without milter support, and for Postfix's content_filter or
smtpd_proxy_filter. Each message is written to a spool file before it is scanned and
the client hears 250 only once the next hop has taken the message (or it is held in
quarantine), so nothing is lost: every failure ends in a 4xx and the client retries.

    client --SMTP--> SmtpGateway --spool--> engine.scan (thread pool) --> verdict
        accept/tag/fix: modified copy relayed to the next hop, its answer passed back
        reject/tempfail: the verdict's reply; discard: 250, dropped
        quarantine: spool_dir/quarantine/REF.eml + REF.json, then 250

Spool layout (spool_dir): tmp/ (being written), incoming/ (received, being handled),
quarantine/ (held for review), failed/ (a crash while handling; kept for inspection).
The worker processes of `serve --workers N` share one spool (see Spool).

Behind Postfix every client is Postfix itself on 127.0.0.1, a trusted network, which
would make every message look as if the school sent it. Postfix forwards the real
client with the XFORWARD command (smtp_send_xforward_command = yes); the gateway
accepts it from `xforward_hosts` only and scans with the forwarded client address.

TLS, both ways, because between two servers on a school network the mail (children's
data) would otherwise cross the network in clear text. The listener offers STARTTLS when
it has a certificate and key (TLS 1.2 and later) and, with `require_tls`, refuses MAIL
before STARTTLS except from `tls_exempt` (loopback: Postfix's content_filter beside us).
The relay to the next hop uses STARTTLS as `next_hop_tls` says: "opportunistic" (when
offered, certificate unchecked, plain text if the handshake fails: Postfix's
`smtp_tls_security_level = may`), "required" (a verified certificate, else 451 and the
client keeps the message, as when the next hop is down) or "off".

The relay has a timeout for each stage, as an MTA's SMTP client does: connecting, each
command before the message, the message itself (bounded by progress, not by its total
time: a slow but steady next hop is never cut off) and the reply to its final dot (up to
10 minutes, RFC 5321 4.5.3.2.6). The client is itself waiting for the answer to its own
final dot (Postfix gives up after smtp_data_done_timeout, 600 s, and sends it again), so
every stage also ends by reply_deadline_seconds after the client's final dot. Giving up
before our final dot has gone out is safe: the connection is reset (SO_LINGER 0), so
neither the rest of the message nor the dot ever reaches the next hop, and the client's
retry is the only copy. Giving up after it is the one case where a copy may have been
delivered and the client's retry makes a second (RFC 1047): the final dot is sent only
while at least a command timeout remains before the deadline, and such a case is logged.

Recipients: while the client's RCPT waits, the gateway asks the next hop about that
recipient in a session of its own (MAIL, RCPT; Exim's recipient callout, Postfix's
smtpd_proxy_filter) and passes a refusal back as the answer to that RCPT. So each
recipient gets its own answer: a 550 for an unknown one is bounced by the client for that
recipient alone, a 452 "too many recipients" makes the client send the rest in a further
transaction (RFC 5321 4.5.3.1.10), and the single reply after DATA covers only recipients
the next hop has taken. Should the next hop still refuse some of them when the message is
relayed (it changed its mind, or could not be asked), nothing is sent and the client is
told 451 (4xx when every refusal is temporary, the next hop's 5xx when all are permanent):
its retry asks again, recipient by recipient. Delivering to some and answering for all
could only lose mail (250) or duplicate it (4xx, 5xx and a resend).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import errno
import functools
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import struct
import textwrap
import time
import unicodedata
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, LoginPassword, Session, TLSSetupException, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from milter import engine
from milter.engine import Scan
from milter.envelope import Envelope
from milter.followup import FollowUp
from milter.modify import Modification, apply_to_bytes, modifications
from milter.policy.loader import Rules
from milter.policy.schema import Action, PolicyFile
from milter.reference import new_reference
from milter.smtp_tls import (
    EXPIRY_WARNING_DAYS,
    NextHopTls,
    StartTlsRefused,
    TlsSetupError,
    certificate_expiry,
    negotiated_version,
    relay_tls_context,
    server_tls_context,
    tls_failure,
)
from milter.verdict import Verdict

log = logging.getLogger(__name__)

# The verdict, the envelope, the scan's seconds and the scan itself (findings, size) for logs and metrics.
DecisionHook = Callable[[Verdict, Envelope, float, Scan], None]

# Used for a reference when the rules themselves cannot be had (the provider raised).
_FALLBACK_PREFIX: str = PolicyFile.model_fields["reference_prefix"].default

# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its CRLF; keep well inside it.
_REPLY_WIDTH = 400
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")

# aiosmtpd's own answers to an oversized message carry no enhanced status code.
_SIZE_REPLIES = (
    "552 Error: message size exceeds fixed maximum message size",
    "552 Error: Too much mail data",
)

# XFORWARD attributes (Postfix XFORWARD_README); values are xtext, "[UNAVAILABLE]" means unknown.
_XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
_XFORWARD_UNKNOWN = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")

_MUST_STARTTLS = "530 5.7.0 Must issue a STARTTLS command first"
_MUST_DECLARE_UTF8 = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"

# DSN (RFC 3461) and AUTH (RFC 4954) parameters: taken from MAIL and RCPT before aiosmtpd
# sees them (it refuses every parameter it does not know with 555). Values are xtext.
_MAIL_PARAMETERS = ("RET", "ENVID", "AUTH")
_RCPT_PARAMETERS = ("NOTIFY", "ORCPT")
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")
_PARAMETER_SYNTAX = {
    "RET": re.compile(r"FULL|HDRS", re.IGNORECASE),
    "ENVID": _XTEXT,
    "AUTH": re.compile(r"<>|" + _XTEXT.pattern),
    "NOTIFY": re.compile(r"NEVER|(?:SUCCESS|FAILURE|DELAY)(?:,(?:SUCCESS|FAILURE|DELAY))*", re.IGNORECASE),
    # addr-type ";" xtext, or RFC 6533's "utf-8" type whose address may be UTF-8.
    "ORCPT": re.compile(r"[A-Za-z0-9-]+;\S+"),
}
# RFC 3461 4 and RFC 4954 5: ENVID, AUTH= and ORCPT make MAIL and RCPT up to 600 and 500
# characters longer than 512; aiosmtpd reads no line longer than 1001 anyway.
_COMMAND_LIMITS = {"MAIL": 1000, "RCPT": 1000}

# How the relay writes a message: in chunks, each waited for until the next hop has taken
# most of what is buffered (progress), never the whole message at once.
_CHUNK = 64 * 1024
# RFC 5321 4.5.2 and 2.3.8: every line ends in CRLF on the wire (a bare LF or CR would let
# "\n.\r\n" end the message early at a lenient next hop: SMTP smuggling), and a line that
# begins with a dot gets another.
_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")
# A reply from the next hop: lines of at most this many bytes, at most this many lines.
_HOP_LINE_LIMIT = 4096
_HOP_REPLY_LINES = 100
# After the next hop could not be reached for a recipient check, relays still try it but
# recipient checks wait this long, so a next hop that is down does not slow every RCPT.
_CHECK_BACKOFF_SECONDS = 30.0


@dataclass(frozen=True)
class SmtpModeConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 10025
    next_hop_host: str = "127.0.0.1"
    next_hop_port: int = 10026
    spool_dir: Path = Path("var/spool")
    max_message_bytes: int = 50_000_000
    max_connections: int = 100
    # How long a client may send nothing (between commands, or in the middle of its
    # message) before it is told 421 and the connection is closed; scanning and relaying
    # do not count against it.
    timeout_seconds: float = 300.0
    # The relay's stages (see the module's docstring): connecting and the next hop's
    # greeting; each command before the message (EHLO, STARTTLS, MAIL, RCPT, DATA); the
    # message, as the longest the next hop may take none of it (Postfix's
    # smtp_data_xfer_timeout); the reply to its final dot (RFC 5321 4.5.3.2.6).
    relay_connect_timeout_seconds: float = 30.0
    relay_command_timeout_seconds: float = 60.0
    relay_stall_timeout_seconds: float = 180.0
    relay_final_reply_timeout_seconds: float = 600.0
    # The client hears its answer within this of its final dot, whatever the next hop
    # does: under the client's own wait (Postfix's smtp_data_done_timeout, 600 s), or it
    # gives up and sends the message again while we may still deliver it.
    reply_deadline_seconds: float = 540.0
    # Clients whose XFORWARD (the real client behind Postfix) is believed. Whoever may
    # send it chooses the client address the rules see, so only the MTA in front of us.
    xforward_hosts: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Free space the spool keeps: MAIL is answered 452 when the disk has less than this
    # plus the size the client declares (SIZE=), so a client is turned away before it sends
    # its message rather than after (Postfix's queue_minfree). 0: only a write that fails.
    spool_min_free: int = 20_000_000
    # How long stop() waits for messages being scanned or relayed before cutting them off.
    stop_grace_seconds: float = 30.0
    # Name in the banner and EHLO, and to the next hop; None: the host's name, looked up once.
    hostname: str | None = None
    # STARTTLS for clients: offered when both are set (PEM files; the key unencrypted).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Refuse MAIL before STARTTLS from every client outside tls_exempt.
    require_tls: bool = False
    tls_exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # STARTTLS to the next hop: see the module's docstring.
    next_hop_tls: NextHopTls = "opportunistic"
    # CA certificates (PEM) a "required" next hop's certificate must chain to; None: the system's.
    next_hop_tls_ca: Path | None = None
    # The name a "required" next hop's certificate must carry when next_hop_host is not it
    # (an IP address, an internal alias); None: next_hop_host.
    next_hop_tls_name: str | None = None


# --- replies -----------------------------------------------------------------------------


def _ascii_line(text: str) -> str:
    """Reply text as printable ASCII: aiosmtpd sends replies as ASCII, and no line breaks may sneak in."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return "".join(ch if " " <= ch <= "~" else " " for ch in folded).strip()


def format_reply(code: int, enhanced: str | None, text: str) -> str:
    """One SMTP reply, over several lines when the text has several or is long.

    The reference goes on a line of its own so it stands out in a bounce. Lines after
    the first are joined by CRLF with "code-" continuation, which aiosmtpd sends as is.
    """
    lines: list[str] = []
    for raw_line in text.splitlines() or [""]:
        head, sep, tail = raw_line.partition(" Reference ")
        parts = [head, f"Reference {tail}"] if sep and head.strip() else [raw_line]
        for part in parts:
            clean = _ascii_line(part)
            lines.extend(textwrap.wrap(clean, _REPLY_WIDTH) or [clean])
    lines = [line for line in lines if line] or ["-"]
    status = f"{enhanced} " if enhanced else ""
    out = [f"{code}-{status}{line}" for line in lines[:-1]]
    out.append(f"{code} {status}{lines[-1]}")
    return "\r\n".join(out)


@dataclass(frozen=True)
class _Reply:
    """A reply from the next hop: its code and its text, lines joined by newlines."""

    code: int
    text: str

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300


def _next_hop_reply(reply: _Reply, reference: str | None) -> str:
    """The next hop's refusal passed back to the client, with our reference when there is one."""
    # A 421 closes the next hop's connection, not the client's: to the client it is a 451.
    code = 451 if reply.code == 421 else reply.code
    enhanced = None
    lines = []
    for line in reply.text.splitlines():
        match = _ENHANCED.match(line)
        if match:
            enhanced = enhanced or match.group(1)
            line = line[match.end() :]
        lines.append(line)
    if not enhanced or enhanced[0] != str(code)[0]:
        enhanced = f"{str(code)[0]}.0.0"
    lines.append(f"(from the next hop) Reference {reference}." if reference else "(from the next hop)")
    return format_reply(code, enhanced, "\n".join(lines))


def _tempfail(enhanced: str, why: str, reference: str) -> str:
    return format_reply(451, enhanced, f"{why}; please try again later. Reference {reference}.")


# --- spool -------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory holding it is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Message files on disk: every message is here before it is scanned, until it is dealt with.

    Several worker processes share one spool directory. A file in incoming/ is named
    REF.PID.eml and one in tmp/ NAME.PID.tmp after the process handling or writing it, so
    a worker (re)starting counts as left over only the files whose process is gone, never
    those a live sibling is writing or handling. It only counts incoming/'s (nothing there
    is moved or deleted at start); tmp/'s are half-written files of a process that died
    mid-write, which nobody can use, so those are removed. (A dead worker's pid taken by a
    new process hides its files until that process ends: a late report, never a
    disturbed message.)
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.incoming = root / "incoming"
        self.quarantine_dir = root / "quarantine"
        self.failed = root / "failed"

    def prepare(self) -> int:
        """Create the directories; the number of messages left in incoming/ by processes now gone.

        Call it before this process spools anything: a file named with our own pid is then
        an earlier process's that had the same pid (in a container, the usual case).
        """
        for path in (self.tmp, self.incoming, self.quarantine_dir, self.failed):
            # Message content is private (policy 2.4, 2.6): only the gateway's user reads the spool.
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return sum(1 for path in self.incoming.iterdir() if not _handler_alive(path))

    def remove_half_written(self) -> int:
        """Remove the files in tmp/ of processes now gone (killed mid-write); how many.

        Like prepare(), before this process writes anything. A file without a pid (an
        older gateway's) is removed once it is an hour old: no write takes that long.
        """
        removed = 0
        for path in self.tmp.iterdir():
            pid = _writer_pid(path.name)
            if pid is None:
                try:
                    stale = time.time() - path.stat().st_mtime > 3600
                except FileNotFoundError:
                    continue
            else:
                stale = not _process_alive(pid)
            if stale:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _write(self, final: Path, data: bytes) -> Path:
        """Write through tmp/ and rename: a reader never sees half a file; one a crash leaves
        in tmp/ carries the writer's pid, for remove_half_written()."""
        tmp = self.tmp / f"{final.name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            # A disk that filled up mid-write: a half file would only take more of it.
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return final

    def receive(self, reference: str, raw: bytes) -> Path:
        return self._write(self.incoming / f"{reference}.{os.getpid()}.eml", raw)

    def hold(self, path: Path, reference: str, record: dict[str, object]) -> None:
        """Move a message into quarantine/ with its record; REF.json, written last, marks it complete."""
        os.replace(path, self.quarantine_dir / f"{reference}.eml")
        self._write(self.quarantine_dir / f"{reference}.json", _json(record))

    def keep_failed(self, path: Path, reference: str, record: dict[str, object]) -> None:
        os.replace(path, self.failed / f"{reference}.eml")
        self._write(self.failed / f"{reference}.json", _json(record))

    @staticmethod
    def remove(path: Path) -> None:
        path.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        """Space left for messages on the spool's disk (what an unprivileged user may use)."""
        try:
            stats = os.statvfs(self.root)
        except OSError:
            return 0
        return stats.f_bavail * stats.f_frsize


def _writer_pid(name: str) -> int | None:
    """The pid in a spool file's name: REF.PID.eml (incoming/) or NAME.PID.tmp (tmp/)."""
    pid = name.rpartition(".")[0].rpartition(".")[2]
    return int(pid) if pid.isdigit() else None


def _process_alive(pid: int) -> bool:
    """Whether another live process has this pid; ours counts as gone (an earlier process's)."""
    if pid in (0, os.getpid()):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, as another user
    return True


def _handler_alive(path: Path) -> bool:
    """Whether another live process may be handling this incoming/ file (named REF.PID.eml)."""
    pid = _writer_pid(path.name)
    # No pid: an older gateway's file.
    return pid is not None and _process_alive(pid)


def _json(record: dict[str, object]) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True, default=str).encode() + b"\n"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- the SMTP server side ----------------------------------------------------------------


def _xtext_decode(value: str) -> str:
    """RFC 3461 xtext: "+XX" is the character with hex code XX."""
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _utf8_address_ok(address: str, smtputf8: bool) -> bool:
    """RFC 6531 3.4: an address may be UTF-8 only in a transaction that declared SMTPUTF8
    (and must be valid UTF-8: aiosmtpd keeps bytes that are not as surrogates)."""
    if address.isascii():
        return True
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return smtputf8


def _needs_smtputf8(transaction: SmtpEnvelope, data: bytes) -> bool:
    """Whether a message that declared SMTPUTF8 needs it from the next hop (Postfix's rule):
    UTF-8 in an envelope address or in the header. Otherwise it goes on without it."""
    if not transaction.smtp_utf8:
        return False
    addresses = [transaction.mail_from or "", *transaction.rcpt_tos]
    return not all(a.isascii() for a in addresses) or not data.partition(b"\r\n\r\n")[0].isascii()


def _command(head: str, parameters: list[str], utf8: bool) -> bytes:
    """A command line for the next hop; UTF-8 only in a SMTPUTF8 transaction (UnicodeError otherwise)."""
    if not utf8:
        parameters = [p for p in parameters if p.isascii()]  # an ORCPT=utf-8;... needs SMTPUTF8
    return " ".join([head, *parameters]).encode("utf-8" if utf8 else "ascii")


def _trace_name(name: str | None) -> str:
    """A name as it may stand in a Received: line: what a client says in HELO is anything."""
    return re.sub(r"[^A-Za-z0-9.:_\[\]-]", "", name or "")[:255] or "unknown"


class _Busy(asyncio.Protocol):
    """Answers a connection over the limit with 421 and hangs up, so the client retries later."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.reply.encode("ascii") + b"\r\n")
        transport.close()


class _GatewaySMTP(SMTP):
    """aiosmtpd's SMTP plus XFORWARD, DSN parameters, coded size replies, no AUTH, and an idle
    timer that counts every byte the client sends and is paused while we work."""

    def __init__(self, gateway: SmtpGateway, **kwargs: Any) -> None:
        self._recipient_check: _RecipientCheck | None = None
        super().__init__(gateway, **kwargs)
        self.gateway = gateway
        # Room for DSN parameters; an instance's own (aiosmtpd's is shared by the class).
        self.command_size_limits = defaultdict(lambda: SMTP.command_size_limit, _COMMAND_LIMITS)
        # XFORWARD attributes, tied to the aiosmtpd envelope they were given for: aiosmtpd
        # makes a new envelope after DATA, RSET and HELO/EHLO, so they last one transaction.
        self._xforward: tuple[SmtpEnvelope | None, dict[str, str | None]] = (None, {})
        # The DSN and AUTH parameters of the MAIL or RCPT being handled, for the handler hooks.
        self.parameters: dict[str, str] = {}
        self.handling = False
        self._last_input = self.loop.time()

    def _create_envelope(self) -> _Transaction:
        return _Transaction()

    def _set_post_data_state(self) -> None:
        # A new transaction (after DATA, RSET, HELO/EHLO): the old one's recipient check ends.
        self.end_recipient_check()
        super()._set_post_data_state()  # type: ignore[no-untyped-call]

    def recipient_check(self, transaction: SmtpEnvelope) -> _RecipientCheck:
        check = self._recipient_check
        if check is None or check.transaction is not transaction:
            self.end_recipient_check()
            check = self._recipient_check = _RecipientCheck(transaction)
        return check

    def end_recipient_check(self) -> None:
        if self._recipient_check is not None:
            self._recipient_check.close()
            self._recipient_check = None

    def connection_lost(self, error: Exception | None) -> None:
        self.gateway._connections.discard(self)
        self.end_recipient_check()
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        self._last_input = self.loop.time()
        super().data_received(data)

    def _timeout_cb(self) -> None:
        # aiosmtpd restarts its idle timer only when a command arrives, so a client sending a
        # long message slowly would be cut off mid-message: idle means no bytes at all.
        if self.handling or self.transport is None:
            return
        quiet = self.loop.time() - self._last_input
        if quiet < self._timeout_duration:
            self._reset_timeout(self._timeout_duration - quiet)
            return
        # RFC 5321 3.8: say why before closing, so the client knows to retry.
        self.hang_up(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    async def smtp_DATA(self, arg: str) -> None:
        # The recipients are known: the next hop's session that checked them is not needed
        # while the client sends its message and we scan it (the relay opens its own).
        self.end_recipient_check()
        # A message counts as in flight from handle_DATA until its reply has been written
        # (aiosmtpd writes it after handle_DATA returns), so stop() never cuts it short.
        try:
            await super().smtp_DATA(arg)
        finally:
            if self.handling:
                self.handling = False
                self.gateway._message_done()

    async def smtp_AUTH(self, arg: str) -> None:
        # There is nothing to check a login against, so AUTH is neither offered nor taken
        # (aiosmtpd would offer it after STARTTLS and then refuse every login).
        await self.push("503 5.5.1 Error: authentication not enabled")

    def _split_parameters(
        self, arg: str | None, keyword: str, names: tuple[str, ...]
    ) -> tuple[str | None, dict[str, str]]:
        """`arg` without the parameters named (aiosmtpd refuses them), and those parameters.
        ValueError, whose text is the reply, for one that is malformed or given twice."""
        if not arg or self.session is None or not self.session.extended_smtp:
            return arg, {}
        after_keyword = self._strip_command_keyword(keyword, arg)
        if after_keyword is None:
            return arg, {}
        address, rest = self._getaddr(after_keyword)
        if address is None or not rest or not arg.endswith(rest):
            return arg, {}  # aiosmtpd's own syntax errors
        kept: list[str] = []
        taken: dict[str, str] = {}
        for parameter in rest.split():
            name, _, value = parameter.partition("=")
            name = name.upper()
            if name not in names:
                kept.append(parameter)
                continue
            limit = 100 if name == "ENVID" else 500
            if name in taken or len(value) > limit or not _PARAMETER_SYNTAX[name].fullmatch(value):
                raise ValueError(f"501 5.5.4 Bad {name} parameter")
            taken[name] = value
        return " ".join([arg[: len(arg) - len(rest)].rstrip(), *kept]), taken

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and status.startswith(_SIZE_REPLIES):
            status = f"552 5.3.4 Message too big for this gateway (limit {self.data_size_limit} bytes)"
        await super().push(status)

    def peer_address(self) -> str | None:
        peer: object = self.session.peer if self.session else None
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
        return peer if isinstance(peer, str) else None

    def xforward_allowed(self) -> bool:
        return self.gateway._xforward_trusted(self.peer_address())

    def tls_version(self) -> str | None:
        """The TLS version ("TLSv1.3") once STARTTLS has succeeded on this connection, else None."""
        if self.session is None or self.session.ssl is None or self.transport is None:
            return None
        return negotiated_version(self.transport.get_extra_info("ssl_object"))

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")  # as aiosmtpd's, for HELP
    async def smtp_MAIL(self, arg: str | None) -> None:
        # aiosmtpd's require_starttls holds every client to it; the decision here is per
        # connection, so Postfix's content_filter on loopback (tls_exempt) needs no TLS.
        if self.gateway._must_starttls(self.peer_address()) and self.tls_version() is None:
            await self.push(_MUST_STARTTLS)
            return
        try:
            arg, self.parameters = self._split_parameters(arg, "FROM:", _MAIL_PARAMETERS)
        except ValueError as exc:
            await self.push(str(exc))
            return
        try:
            await super().smtp_MAIL(arg)
        finally:
            self.parameters = {}

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        try:
            arg, self.parameters = self._split_parameters(arg, "TO:", _RCPT_PARAMETERS)
        except ValueError as exc:
            await self.push(str(exc))
            return
        try:
            await super().smtp_RCPT(arg)
        finally:
            self.parameters = {}

    def forwarded(self) -> dict[str, str | None]:
        envelope, attributes = self._xforward
        return attributes if envelope is self.envelope and envelope is not None else {}

    async def smtp_XFORWARD(self, arg: str | None) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        if not self.xforward_allowed():
            await self.push("550 5.7.0 Error: insufficient authorization")
            return
        if self.envelope is not None and self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        if not arg:
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value...")
            return
        given: dict[str, str | None] = {}
        for item in arg.split():
            name, sep, value = item.partition("=")
            name = name.upper()
            if not sep or name not in _XFORWARD_ATTRIBUTES:
                await self.push(f"501 5.5.4 Bad XFORWARD attribute: {_ascii_line(name)[:40]}")
                return
            decoded = _xtext_decode(value)
            given[name] = None if decoded.upper() in _XFORWARD_UNKNOWN else decoded
        envelope, attributes = self._xforward
        merged = {**(attributes if envelope is self.envelope else {}), **given}
        self._xforward = (self.envelope, merged)
        await self.push("250 2.0.0 Ok")

    def pause_idle_timer(self) -> None:
        # aiosmtpd's idle timer restarts only when a command arrives. While we scan and
        # relay, the client is waiting for us, not idle, so the timer must not cut it off.
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()

    def resume_idle_timer(self) -> None:
        if self.transport is not None:
            self._reset_timeout()

    def hang_up(self, reply: str | None) -> None:
        transport = self.transport
        if transport is None:
            return
        if reply and isinstance(transport, asyncio.WriteTransport):
            with contextlib.suppress(Exception):
                transport.write(reply.encode("ascii") + b"\r\n")
        transport.close()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _auth_user(session: Session) -> str | None:
    """The SMTP AUTH login, if the client authenticated (aiosmtpd keeps it in auth_data)."""
    if not session.authenticated:
        return None
    data: object = session.auth_data
    if isinstance(data, LoginPassword):
        data = data.login
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace") or None
    return data if isinstance(data, str) and data else None


# --- the next hop --------------------------------------------------------------------------


class _HopError(Exception):
    """The conversation with the next hop broke down: a garbled or overlong reply, or it hung up."""


class _HopRefused(_HopError):
    """The next hop would not talk to us at all (its greeting or EHLO was not positive)."""

    def __init__(self, stage: str, reply: _Reply) -> None:
        super().__init__(f"{stage} answered {reply.code}")
        self.reply = reply


class _NextHopSession:
    """One SMTP session with the next hop, each wait bounded by the caller.

    The gateway's own client rather than aiosmtplib's, whose DATA writes the whole message
    at once under one timeout and whose close() still flushes what it had buffered, final
    dot included, after we have given up: here the message goes out chunk by chunk as the
    next hop takes it, the final dot only after the rest, and abort() resets the
    connection so that nothing buffered is sent any more.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        # EHLO keywords (upper case) and their parameters, from the latest EHLO.
        self.extensions: dict[str, str] = {}
        # The TLS version once STARTTLS has succeeded ("TLSv1.3"), else None.
        self.tls: str | None = None
        # Whether our final dot has been written: from then on the next hop may have the message.
        self.dot_sent = False

    @classmethod
    async def open(cls, host: str, port: int, timeout: float) -> _NextHopSession:
        """Connect and read the greeting, both within `timeout`; _HopRefused if it is not 220."""
        loop = asyncio.get_running_loop()
        ends = loop.time() + timeout
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=_HOP_LINE_LIMIT)
        session = cls(reader, writer)
        try:
            greeting = await session.read_reply(ends - loop.time())
        except BaseException:
            session.abort()
            raise
        if greeting.code != 220:
            session.abort()
            raise _HopRefused("greeting", greeting)
        return session

    def offers(self, keyword: str) -> bool:
        return keyword in self.extensions

    async def read_reply(self, timeout: float) -> _Reply:
        lines: list[str] = []
        try:
            async with asyncio.timeout(max(timeout, 0)):
                while True:
                    line = await self.reader.readline()
                    if not line.endswith(b"\n"):
                        raise _HopError("connection closed")
                    code, separator = line[:3], line[3:4]
                    if not code.isdigit() or separator not in (b" ", b"-", b"\r", b"\n"):
                        raise _HopError("malformed reply")
                    lines.append(line[4:].strip().decode("utf-8", "replace"))
                    if separator != b"-":
                        return _Reply(int(code), "\n".join(lines))
                    if len(lines) >= _HOP_REPLY_LINES:
                        raise _HopError("reply too long")
        except ValueError:  # a line over the reader's limit
            raise _HopError("reply line too long") from None

    async def command(self, line: bytes, timeout: float) -> _Reply:
        self.writer.write(line + b"\r\n")
        return await self.read_reply(timeout)

    async def ehlo(self, name: str, timeout: float) -> _Reply:
        reply = await self.command(b"EHLO " + name.encode("ascii", "replace"), timeout)
        if reply.positive:
            extensions = {}
            for line in reply.text.splitlines()[1:]:
                keyword, _, parameters = line.partition(" ")
                extensions[keyword.upper()] = parameters
            self.extensions = extensions
        return reply

    async def starttls(self, context: ssl.SSLContext, server_hostname: str, timeout: float) -> None:
        reply = await self.command(b"STARTTLS", timeout)
        if reply.code != 220:
            raise StartTlsRefused(reply.code)
        # Nothing may follow the 220 in clear text; anything that did was put there by
        # someone in between (STARTTLS command injection) and would pass for TLS replies.
        if getattr(self.reader, "_buffer", b""):
            raise _HopError("data after the reply to STARTTLS")
        async with asyncio.timeout(max(timeout, 0)):
            await self.writer.start_tls(context, server_hostname=server_hostname)
        self.extensions = {}  # RFC 3207 4.2: what the next hop said before TLS no longer counts
        self.tls = negotiated_version(self.writer.get_extra_info("ssl_object")) or "TLS"

    async def send_message(
        self, data: bytes, *, stall: float, final_reply: float, reserve: float, deadline: float
    ) -> _Reply:
        """After DATA's 354: the message and its final dot; the next hop's reply to the dot.

        Each chunk is waited for until the next hop has taken most of what is buffered, for
        at most `stall` (a next hop that takes nothing for that long is given up on), and
        all of it by `deadline` less `reserve`, the least time left for the final reply.
        TimeoutError before the final dot is written means the next hop cannot have the
        message (provided the caller then abort()s); after it, `dot_sent` is True.
        """
        loop = asyncio.get_running_loop()
        wire = _LINE_ENDS.sub(b"\r\n", data)
        if not wire.endswith(b"\r\n"):
            wire += b"\r\n"
        view = memoryview(_LEADING_DOT.sub(b"..", wire))
        for start in range(0, len(view), _CHUNK):
            self.writer.write(view[start : start + _CHUNK])
            async with asyncio.timeout(max(min(stall, deadline - reserve - loop.time()), 0)):
                await self.writer.drain()
        if deadline - loop.time() < reserve:
            raise TimeoutError  # too late for the next hop to answer the dot in time: keep it back
        self.writer.write(b".\r\n")
        self.dot_sent = True
        return await self.read_reply(min(final_reply, deadline - loop.time()))

    def quit_soon(self) -> None:
        """QUIT and close without waiting for the answer: only when no message is pending."""
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
        self.writer.close()

    def abort(self) -> None:
        """Reset the connection: whatever is still buffered, ours or the kernel's, is dropped.

        A plain close() would send it all, the rest of a message and its final dot
        included, after the client has been told 451 and will send the message again.
        """
        transport = self.writer.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()


class _Transaction(SmtpEnvelope):
    """aiosmtpd's envelope plus what the relay passes on: DSN parameters (RFC 3461)."""

    def __init__(self) -> None:
        super().__init__()
        # RET= and ENVID= as the client gave them.
        self.dsn: list[str] = []
        # NOTIFY= and ORCPT= of each recipient, in the order of rcpt_tos.
        self.rcpt_dsn: list[list[str]] = []

    def sender(self) -> str:
        # aiosmtpd keeps the null sender as "<>".
        return (self.mail_from or "").removeprefix("<").removesuffix(">")


class _RecipientCheck:
    """The session in which the next hop is asked about one transaction's recipients."""

    def __init__(self, transaction: SmtpEnvelope) -> None:
        self.transaction = transaction
        self.session: _NextHopSession | None = None
        # Whether MAIL has been said (and taken) in the session.
        self.mail_said = False
        # The next hop could not be asked: the relay after DATA answers for these recipients.
        self.unavailable = False

    def close(self) -> None:
        if self.session is not None:
            self.session.quit_soon()
            self.session = None
            self.mail_said = False


class _RelayFailure(Exception):
    """The next hop did not take the message; `reply` is what the client is told."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class SmtpGateway:
    """An SMTP server that scans each message and relays, refuses or holds it by the verdict.

    It is also the aiosmtpd handler of its connections (handle_EHLO, handle_DATA, ...).
    """

    def __init__(
        self,
        config: SmtpModeConfig,
        rules_provider: Callable[[], Rules],
        executor: concurrent.futures.Executor | None = None,
        *,
        on_decision: DecisionHook | None = None,
        followup: FollowUp | None = None,
    ) -> None:
        self.config = config
        # The quarantine store, guidance and alerts; None keeps held mail in spool_dir/quarantine.
        self.followup = followup
        self.rules_provider = rules_provider
        # Called after each scanned message with the verdict, envelope and scan seconds,
        # just before the client gets its answer. It must be quick, and never log content.
        self.on_decision = on_decision
        self._tls_exempt = [ipaddress.ip_network(n, strict=False) for n in config.tls_exempt]
        # Built here so a bad file stops the gateway before it listens or starts threads (TlsSetupError).
        self._tls_context: ssl.SSLContext | None = None
        if config.tls_cert is not None and config.tls_key is not None:
            self._tls_context = server_tls_context(config.tls_cert, config.tls_key)
        elif config.tls_cert is not None or config.tls_key is not None:
            raise TlsSetupError("STARTTLS needs both a certificate and a key")
        if config.require_tls and self._tls_context is None:
            raise TlsSetupError("require_tls needs a TLS certificate and key")
        self._relay_tls = relay_tls_context(config.next_hop_tls, config.next_hop_tls_ca)
        # When the listener's certificate expires (for a metric); None without one.
        self.certificate_expires: datetime | None = None
        self.spool = Spool(config.spool_dir)
        self._own_executor = executor is None
        # Scanning is CPU work: a few threads keep the event loop free without
        # oversubscribing the cores (the GIL makes more threads no faster).
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="smtp-scan"
        )
        self._xforward_networks = [ipaddress.ip_network(n, strict=False) for n in config.xforward_hosts]
        self._hostname = config.hostname or ""
        self._server: asyncio.Server | None = None
        self._connections: set[_GatewaySMTP] = set()
        self._stopping = False
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._prefix = _FALLBACK_PREFIX
        self._warned_no_xforward = False
        self._spool_low_logged = -3600.0
        # Whether the next hop offered DSN when last asked: then so do we (RFC 3461 asks a
        # server that offers it to pass the parameters on, which only such a next hop takes).
        self._next_hop_dsn = False
        # Until when (loop time) recipient checks are skipped: the next hop could not be reached.
        self._checks_resume = 0.0

    def _follow_up(self, result: Scan, held_id: str | None) -> None:
        """Guidance and alerts, queued in the background; the outbox sends them."""
        if self.followup is not None:
            self._executor.submit(self.followup.after_verdict, result, self.rules_provider(), held_id)

    # -- lifecycle --

    @staticmethod
    def _withhold_client_text(record: logging.LogRecord) -> bool:
        """Filter for aiosmtpd's logger: each record is kept, with the client's words withheld.

        aiosmtpd's own words are its format strings; what a client sent comes in as text
        arguments (an unknown command's verb: a body line's first word when a client sends
        its body after DATA was refused). The peer's address is a tuple, and stays.
        """
        withheld = "(withheld)"
        if isinstance(record.args, tuple):
            record.args = tuple(withheld if isinstance(a, str | bytes) else a for a in record.args)
        elif record.args:
            record.args = {k: withheld if isinstance(v, str | bytes) else v for k, v in record.args.items()}
        return True

    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve on the running loop: on `sock`, a listening socket the parent of worker
        processes bound and shares with them all, or else on listen_host:listen_port."""
        loop = asyncio.get_running_loop()
        # aiosmtpd logs every command at INFO, envelope addresses included; the gateway's
        # logs carry no addresses (policy 2.4), so only its warnings and errors get through.
        aiosmtpd_log = logging.getLogger("mail.log")
        if aiosmtpd_log.getEffectiveLevel() < logging.WARNING:
            aiosmtpd_log.setLevel(logging.WARNING)
        # Those warnings quote the client too ("unrecognised: <verb>"), and no message content
        # may reach the logs (policy 2.4): the warning stays, the client's text does not.
        # addFilter ignores a filter already there: one per process however many starts.
        aiosmtpd_log.addFilter(SmtpGateway._withhold_client_text)
        self._idle = asyncio.Event()
        self._idle.set()
        if not self._hostname:
            # aiosmtpd would call getfqdn() (a DNS lookup) for every connection, on the loop.
            self._hostname = await asyncio.to_thread(socket.getfqdn)
        left = await asyncio.to_thread(self.spool.prepare)
        half_written = await asyncio.to_thread(self.spool.remove_half_written)
        if half_written:
            log.warning(
                "removed %d half-written file(s) from %s left by processes that no longer exist",
                half_written,
                self.spool.tmp,
                extra={"event": "spool_tmp_removed", "count": half_written, "pid": os.getpid()},
            )
        if left:
            log.warning(
                "%d message(s) in %s from an earlier run: their senders were not told 250 and will "
                "retry; kept for inspection",
                left,
                self.spool.incoming,
                extra={"event": "spool_left_over", "count": left, "pid": os.getpid()},
            )
        if sock is not None:
            self._server = await loop.create_server(self._new_connection, sock=sock)
        else:
            self._server = await loop.create_server(
                self._new_connection, self.config.listen_host, self.config.listen_port
            )
        config = self.config
        starttls = "off" if self._tls_context is None else "required" if config.require_tls else "offered"
        log.info(
            "SMTP mode listening on %s:%d (STARTTLS %s), relaying to %s:%d (TLS %s)",
            config.listen_host,
            self.port,
            starttls,
            config.next_hop_host,
            config.next_hop_port,
            config.next_hop_tls,
            extra={"event": "smtp_listening", "starttls": starttls, "next_hop_tls": config.next_hop_tls},
        )
        self._check_expiry()
        if self._tls_context is None and not _loopback(config.listen_host):
            log.warning(
                "SMTP mode listens on %s without TLS: mail from other hosts crosses the network in "
                "clear text; set smtp_tls_cert and smtp_tls_key",
                config.listen_host,
            )
        if config.next_hop_tls == "off" and not _loopback(config.next_hop_host):
            log.warning(
                "next_hop_tls = off and the next hop %s is another host: mail to it crosses the "
                "network in clear text",
                config.next_hop_host,
            )

    def reload_tls(self) -> bool:
        """Read the TLS files again (SIGHUP, once a certificate is renewed): new connections and
        relays use them, connections already open keep theirs. A file that cannot be used is
        logged with what is wrong with it and the files in force stay; False then."""
        config = self.config
        if config.tls_cert is None and config.next_hop_tls_ca is None:
            return True  # no file to read again
        try:
            server = None
            if config.tls_cert is not None and config.tls_key is not None:
                server = server_tls_context(config.tls_cert, config.tls_key)
            relay = relay_tls_context(config.next_hop_tls, config.next_hop_tls_ca)
        except TlsSetupError as exc:
            log.error(
                "TLS reload failed; keeping the TLS files in force: %s",
                exc,
                extra={"event": "tls_reload_failed"},
            )
            return False
        self._tls_context, self._relay_tls = server, relay
        log.info("TLS files reloaded", extra={"event": "tls_reloaded", "pid": os.getpid()})
        self._check_expiry()
        return True

    def _check_expiry(self) -> None:
        """Warn while there is time to renew the listener's certificate; an error once it has expired
        (clients that check certificates then refuse STARTTLS, and a required-TLS client sends nothing)."""
        cert = self.config.tls_cert
        expires = certificate_expiry(cert) if cert is not None else None
        self.certificate_expires = expires
        if cert is None or expires is None:
            return
        days = (expires - datetime.now(UTC)).total_seconds() / 86400
        on = expires.date().isoformat()
        if days < 0:
            log.error(
                "TLS certificate %s expired on %s: renew it, then send SIGHUP",
                cert,
                on,
                extra={"event": "tls_certificate_expired", "expires": on},
            )
        elif days < EXPIRY_WARNING_DAYS:
            log.warning(
                "TLS certificate %s expires in %d day(s), on %s: renew it, then send SIGHUP",
                cert,
                int(days),
                on,
                extra={"event": "tls_certificate_expiring", "expires": on},
            )

    async def stop(self) -> None:
        """Stop accepting, let messages being handled finish (within stop_grace_seconds), then close."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        if self._in_flight and self._idle is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), self.config.stop_grace_seconds)
            except TimeoutError:
                # Their clients hear 421 instead of an answer, so they keep the messages and
                # retry; a relay not yet past its final dot is reset, so nothing goes out.
                log.warning("stopping with %d message(s) still being handled", self._in_flight)
        for connection in list(self._connections):
            connection.hang_up(f"421 4.3.2 {self._hostname} Service shutting down, try again later")
        if self._in_flight and self._idle is not None:
            # The hang-ups cancel those messages' handlers: let them clean up (spool files).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 5)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def port(self) -> int:
        """The bound port (listen_port may be 0, for any free port)."""
        if self._server is None or not self._server.sockets:
            return self.config.listen_port
        return int(self._server.sockets[0].getsockname()[1])

    def _new_connection(self) -> asyncio.Protocol:
        if self._stopping or len(self._connections) >= self.config.max_connections:
            return _Busy(f"421 4.7.0 {self._hostname} Too many connections, try again later")
        connection = _GatewaySMTP(
            self,
            data_size_limit=self.config.max_message_bytes,
            timeout=self.config.timeout_seconds,
            hostname=self._hostname,
            ident="ESMTP school-milter",
            # UTF-8 addresses (RFC 6531); passed on when the next hop offers it too.
            enable_SMTPUTF8=True,
            # STARTTLS is offered when set; whether it is required is decided per client (smtp_MAIL).
            tls_context=self._tls_context,
            loop=asyncio.get_running_loop(),
        )
        self._connections.add(connection)
        return connection

    def _xforward_trusted(self, address: str | None) -> bool:
        if not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._xforward_networks)

    def _must_starttls(self, address: str | None) -> bool:
        """Whether this client must use STARTTLS before MAIL: require_tls, unless tls_exempt."""
        if not self.config.require_tls:
            return False
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 client of a dual-stack listener
        return not any(ip in net for net in self._tls_exempt)

    # -- aiosmtpd handler hooks --

    async def handle_EHLO(
        self,
        server: _GatewaySMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # With this hook aiosmtpd leaves recording the client's name to us.
        session.host_name = hostname
        # No AUTH (see smtp_AUTH): aiosmtpd lists it once TLS is up.
        offered = [line for line in responses[:-1] if not line[4:].upper().startswith("AUTH")]
        if server.xforward_allowed():
            offered.append("250-XFORWARD " + " ".join(_XFORWARD_ATTRIBUTES))
        if self._next_hop_dsn:
            offered.append("250-DSN")
        return [*offered, responses[-1]]

    async def handle_MAIL(
        self,
        server: _GatewaySMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not _utf8_address_ok(address, envelope.smtp_utf8):
            return _MUST_DECLARE_UTF8
        declared = next((o[5:] for o in mail_options if o.startswith("SIZE=") and o[5:].isdigit()), "0")
        needed = self.config.spool_min_free + int(declared)
        if needed and self.spool.free_bytes() < needed:
            now = time.monotonic()
            if now - self._spool_low_logged > 60:  # once a minute, not once per client
                self._spool_low_logged = now
                log.warning(
                    "the spool %s has less than %d bytes free: MAIL is answered 452 until there is room",
                    self.spool.root,
                    needed,
                    extra={"event": "spool_low"},
                )
            return "452 4.3.1 Insufficient system storage; please try again later"
        # With this hook aiosmtpd leaves recording the sender to us.
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        if isinstance(envelope, _Transaction):
            # AUTH= is taken and dropped: we authenticate nobody to the next hop.
            envelope.dsn = [f"{name}={value}" for name, value in server.parameters.items() if name != "AUTH"]
        return "250 OK"

    async def handle_RCPT(
        self,
        server: _GatewaySMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not _utf8_address_ok(address, envelope.smtp_utf8):
            return _MUST_DECLARE_UTF8
        dsn = [f"{name}={value}" for name, value in server.parameters.items()]
        if isinstance(envelope, _Transaction):
            # The client waits for us meanwhile: not idle.
            server.pause_idle_timer()
            try:
                refusal = await self._check_recipient(server, envelope, address, dsn)
            finally:
                server.resume_idle_timer()
            if refusal is not None:
                return refusal
            envelope.rcpt_dsn.append(dsn)
        # With this hook aiosmtpd leaves recording the recipient to us.
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # A client that cannot do TLS with us (old protocol, a scanner): aiosmtpd hangs up
            # and the client still has its message; a warning, not a fault of ours.
            log.warning("STARTTLS handshake with a client failed: %s", tls_failure(error.__cause__ or error))
            return "421 4.7.0 TLS handshake failed"  # never sent: aiosmtpd just closes the connection
        # aiosmtpd's default answer is a permanent 500 with the exception's text: never that.
        reference = new_reference(self._prefix)
        log.error("%s: SMTP session error: %s", reference, type(error).__name__)
        return _tempfail("4.3.0", "Temporary problem in the mail gateway", reference)

    async def handle_DATA(self, server: _GatewaySMTP, session: Session, envelope: SmtpEnvelope) -> str:
        # The client's wait for its answer starts now (its final dot has just arrived).
        deadline = asyncio.get_running_loop().time() + self.config.reply_deadline_seconds
        server.handling = True
        self._in_flight += 1
        if self._idle is not None:
            self._idle.clear()
        server.pause_idle_timer()
        try:
            assert isinstance(envelope, _Transaction)  # _GatewaySMTP._create_envelope
            return await self._handle_message(server, session, envelope, deadline)
        finally:
            server.resume_idle_timer()

    def _message_done(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    # -- one message --

    def _envelope(self, server: _GatewaySMTP, session: Session, smtp_envelope: SmtpEnvelope) -> Envelope:
        forwarded = server.forwarded()
        client_address = server.peer_address()
        if "ADDR" in forwarded:
            client_address = (forwarded["ADDR"] or "").removeprefix("IPv6:") or None
        elif server.xforward_allowed() and not self._warned_no_xforward:
            # Without XFORWARD, mail relayed by the MTA in front counts as sent from its
            # (trusted) address: inbound mail would be judged as the school's own.
            self._warned_no_xforward = True
            log.warning(
                "client %s sent no XFORWARD: its mail counts as sent from %s; behind Postfix's "
                "content_filter set smtp_send_xforward_command = yes on the filter's transport",
                client_address,
                client_address,
            )
        return Envelope(
            # aiosmtpd keeps the null sender as "<>"; the milter side wants "".
            mail_from=(smtp_envelope.mail_from or "").removeprefix("<").removesuffix(">"),
            rcpt_to=tuple(smtp_envelope.rcpt_tos),
            client_address=client_address,
            client_name=forwarded.get("NAME"),
            helo=forwarded.get("HELO", session.host_name),
            auth_user=_auth_user(session),
            queue_id=forwarded.get("IDENT"),
            from_wire=True,
        )

    async def _handle_message(
        self, server: _GatewaySMTP, session: Session, transaction: _Transaction, deadline: float
    ) -> str:
        raw = transaction.original_content or b""
        # aiosmtpd keeps the content on its envelope until we return; from here the
        # spool file is the copy of record and `raw` the only one in memory.
        transaction.content = transaction.original_content = None
        envelope = self._envelope(server, session, transaction)
        try:
            rules = self.rules_provider()
            self._prefix = rules.policy.reference_prefix
        except Exception as exc:
            reference = new_reference(self._prefix)
            log.error("%s: no rules to scan with: %s", reference, type(exc).__name__)
            return _tempfail("4.3.0", "Temporary problem in the mail gateway", reference)
        # One reference names the spool file, the verdict and any failure, so they can be matched up.
        reference = new_reference(rules.policy.reference_prefix)

        path: Path | None = None
        writing: asyncio.Task[Path] | None = None
        stage = "spool"
        try:
            # Shielded: the write goes on in its thread even if we are cancelled (see below).
            writing = asyncio.ensure_future(asyncio.to_thread(self.spool.receive, reference, raw))
            path = await asyncio.shield(writing)
            stage = "scan"
            started = time.perf_counter()
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor, functools.partial(engine.scan, raw, envelope, rules, reference)
            )
            seconds = time.perf_counter() - started
            verdict = result.verdict
            if verdict.action is Action.QUARANTINE and self.followup is not None:
                # The shared quarantine store (issue 5) instead of the spool's quarantine/.
                stage = "hold"
                held_id = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.followup.hold, raw, envelope, result
                )
                await asyncio.to_thread(Spool.remove, path)
                self._decided(verdict, envelope, seconds, result)
                self._follow_up(result, held_id)
                return format_reply(250, "2.0.0", f"Held for review, reference {reference}.")
            if verdict.alerts or verdict.guidance:
                self._follow_up(result, None)
            changes: list[Modification] = []
            if verdict.action in (Action.ACCEPT, Action.TAG, Action.FIX):
                changes = modifications(verdict, result.message)

            stage = verdict.action.value
            reply, relay_tls = await self._carry_out(
                verdict,
                envelope,
                raw,
                changes,
                transaction,
                path,
                reference,
                self._received(server, session, transaction, reference),
                deadline,
            )
        except asyncio.CancelledError:
            # The client went away (or we are stopping) before hearing an answer: it still
            # has the message and will send it again, so nothing of it is kept.
            if path is None and writing is not None:
                # Cancelled mid-write: the thread writes on regardless; remove the file once it is there.
                with contextlib.suppress(Exception):
                    path = await writing
            if path is not None:
                Spool.remove(path)
            log.info(
                "%s: the connection closed before the answer (at %s): nothing kept, the client "
                "still has the message",
                reference,
                stage,
                extra={"event": "client_gone"},
            )
            raise
        except OSError as exc:
            if stage == "spool" and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # Nothing was taken: the client keeps the message and retries (RFC 3463 4.3.1).
                log.error(
                    "%s: the spool %s is full: mail is refused with 452 until there is room",
                    reference,
                    self.spool.root,
                    extra={"event": "spool_full"},
                )
                return format_reply(
                    452,
                    "4.3.1",
                    f"Insufficient system storage; please try again later. Reference {reference}.",
                )
            return await self._failed(path, reference, envelope, stage, exc)
        except Exception as exc:
            return await self._failed(path, reference, envelope, stage, exc)
        log.info(
            "%s: %s, %d bytes, %d recipient(s), scanned in %.1f ms: %s",
            reference,
            verdict.action.value,
            len(raw),
            len(envelope.rcpt_to),
            seconds * 1000,
            reply.split("\r\n")[-1][:3],
            extra={
                # Which worker process handled it, when several share the socket.
                "pid": os.getpid(),
                # Whether the message crossed the network encrypted, each way ("none": plain text).
                "client_tls": server.tls_version() or "none",
                **({"relay_tls": relay_tls} if relay_tls is not None else {}),
            },
        )
        self._decided(verdict, envelope, seconds, result)
        return reply

    def _received(
        self, server: _GatewaySMTP, session: Session, transaction: _Transaction, reference: str
    ) -> bytes:
        """The Received: line for this hop (RFC 5321 4.4), for the top of the relayed copy.

        It names the client as it connected to us: behind Postfix's content_filter that is
        Postfix, whose own Received: line already names the client before it.
        """
        address = server.peer_address() or "unknown"
        literal = f"IPv6:{address}" if ":" in address else address
        tls = server.tls_version()
        # RFC 3848 and RFC 6531 3.7.3: ESMTP, ESMTPS (TLS), UTF8SMTP(S) (SMTPUTF8 used).
        protocol = "UTF8SMTP" if transaction.smtp_utf8 else "ESMTP" if session.extended_smtp else "SMTP"
        lines = [
            f"Received: from {_trace_name(session.host_name)} ([{literal}])",
            *([f"\t(using {tls})"] if tls else []),
            f"\tby {_trace_name(self._hostname)} (school-milter) with {protocol}{'S' if tls else ''}"
            f" id {reference};",
            f"\t{email.utils.format_datetime(datetime.now(UTC))}",
        ]
        return ("\r\n".join(lines) + "\r\n").encode("ascii")

    async def _carry_out(
        self,
        verdict: Verdict,
        envelope: Envelope,
        raw: bytes,
        changes: list[Modification],
        transaction: _Transaction,
        path: Path,
        reference: str,
        received: bytes,
        deadline: float,
    ) -> tuple[str, str | None]:
        """Do what the verdict says: the reply for the client, and for a message the next hop
        took, the TLS version it went over ("none" for plain text). Raises only on a fault of ours."""
        action = verdict.action
        if action is Action.QUARANTINE:
            record: dict[str, object] = {
                "reference": reference,
                "received": _now(),
                "size": len(raw),
                "envelope": dataclasses.asdict(envelope),
                "verdict": verdict.as_dict(),
            }
            # Held durably before the client is told 250: the 250 ends the sender's responsibility.
            await asyncio.to_thread(self.spool.hold, path, reference, record)
            return format_reply(250, "2.0.0", f"Held for review, reference {reference}."), None
        if action in (Action.ACCEPT, Action.TAG, Action.FIX):
            relay_tls: str | None = None
            try:
                reply, relay_tls = await self._relay(
                    received + apply_to_bytes(raw, changes), transaction, reference, deadline
                )
            except _RelayFailure as failure:
                # Refused or unreachable: the client keeps the message (4xx) or bounces it (5xx).
                reply = failure.reply
            await asyncio.to_thread(Spool.remove, path)
            return reply, relay_tls
        await asyncio.to_thread(Spool.remove, path)
        if action is Action.DISCARD:
            return format_reply(250, "2.0.0", "Ok"), None
        if verdict.reply is not None:
            return format_reply(verdict.reply.code, verdict.reply.enhanced, verdict.reply.text), None
        if action is Action.REJECT:
            refused = f"Message refused by school policy. Reference {reference}."
            return format_reply(550, "5.7.1", refused), None
        return _tempfail("4.3.0", "Temporary problem while checking this message", reference), None

    # -- the next hop --

    def _within(self, timeout: float, deadline: float | None) -> float:
        """A stage's timeout, cut short so that it ends by the deadline (if any)."""
        if deadline is None:
            return timeout
        return max(0.0, min(timeout, deadline - asyncio.get_running_loop().time()))

    async def _ehlo(self, session: _NextHopSession, deadline: float | None) -> None:
        timeout = self._within(self.config.relay_command_timeout_seconds, deadline)
        reply = await session.ehlo(self._hostname, timeout)
        if not reply.positive:
            raise _HopRefused("EHLO", reply)
        self._next_hop_dsn = session.offers("DSN")

    async def _next_hop_session(self, reference: str | None, deadline: float | None) -> _NextHopSession:
        """A session with the next hop that has said EHLO, over TLS as next_hop_tls says.

        _HopError, OSError and TimeoutError as they come; _RelayFailure (a 451, as for a next
        hop that is down) when TLS is required and cannot be had. `reference` None: for a
        recipient check, which logs nothing (the relay of the message will).
        """
        config = self.config
        connect = self._within(config.relay_connect_timeout_seconds, deadline)
        session = await _NextHopSession.open(config.next_hop_host, config.next_hop_port, connect)
        try:
            await self._ehlo(session, deadline)
            if self._relay_tls is None:
                return session
            if not session.offers("STARTTLS"):
                if config.next_hop_tls == "required":
                    if reference:
                        log.error(
                            "%s: next hop %s:%d does not offer STARTTLS and next_hop_tls = required: "
                            "not relayed",
                            reference,
                            config.next_hop_host,
                            config.next_hop_port,
                            extra={"event": "relay_tls_failed"},
                        )
                    raise _RelayFailure(_tempfail("4.4.1", "Next hop unavailable", reference or "-"))
                return session
            try:
                name = config.next_hop_tls_name or config.next_hop_host
                await session.starttls(
                    self._relay_tls, name, self._within(config.relay_command_timeout_seconds, deadline)
                )
                await self._ehlo(session, deadline)  # RFC 3207: what it said before TLS no longer counts
            except (ssl.SSLError, StartTlsRefused, _HopError, OSError, TimeoutError) as exc:
                why = tls_failure(exc)
                if config.next_hop_tls == "required":
                    if reference:
                        log.error(
                            "%s: TLS with the next hop %s:%d failed (%s) and next_hop_tls = required: "
                            "not relayed",
                            reference,
                            config.next_hop_host,
                            config.next_hop_port,
                            why,
                            extra={"event": "relay_tls_failed"},
                        )
                    unavailable = _tempfail("4.4.1", "Next hop unavailable", reference or "-")
                    raise _RelayFailure(unavailable) from None
                # Opportunistic: a next hop whose TLS is broken still gets its mail (as Postfix
                # retries in plain text at security level "may"); nothing was sent yet.
                if reference:
                    log.warning(
                        "%s: TLS with the next hop %s:%d failed (%s): relaying in plain text",
                        reference,
                        config.next_hop_host,
                        config.next_hop_port,
                        why,
                    )
                session.abort()
                connect = self._within(config.relay_connect_timeout_seconds, deadline)
                session = await _NextHopSession.open(config.next_hop_host, config.next_hop_port, connect)
                await self._ehlo(session, deadline)
            return session
        except BaseException:
            session.abort()
            raise

    @staticmethod
    def _mail_command(
        session: _NextHopSession, transaction: _Transaction, utf8: bool, size: int | None
    ) -> bytes:
        parameters: list[str] = []
        body = next((o[5:] for o in transaction.mail_options if o.upper().startswith("BODY=")), None)
        if body and session.offers("8BITMIME"):
            parameters.append(f"BODY={body}")
        if size is not None and session.offers("SIZE"):
            parameters.append(f"SIZE={size}")
        if utf8:
            parameters.append("SMTPUTF8")
        if session.offers("DSN"):
            parameters.extend(transaction.dsn)
        return _command(f"MAIL FROM:<{transaction.sender()}>", parameters, utf8)

    @staticmethod
    def _rcpt_command(session: _NextHopSession, recipient: str, dsn: list[str], utf8: bool) -> bytes:
        return _command(f"RCPT TO:<{recipient}>", dsn if session.offers("DSN") else [], utf8)

    async def _check_recipient(
        self, server: _GatewaySMTP, transaction: _Transaction, address: str, dsn: list[str]
    ) -> str | None:
        """The next hop's refusal of this recipient, as the answer to the client's RCPT (see the
        module's docstring); None when it takes the recipient or cannot be asked, and the
        relay after DATA answers for it."""
        check = server.recipient_check(transaction)
        loop = asyncio.get_running_loop()
        if check.unavailable or loop.time() < self._checks_resume:
            return None
        timeout = self.config.relay_command_timeout_seconds
        try:
            if check.session is None:
                try:
                    check.session = await self._next_hop_session(None, None)
                except (_HopError, _RelayFailure, OSError, TimeoutError):
                    self._checks_resume = loop.time() + _CHECK_BACKOFF_SECONDS
                    raise
            session = check.session
            utf8 = transaction.smtp_utf8 and session.offers("SMTPUTF8")
            if not utf8 and not (address.isascii() and transaction.sender().isascii()):
                # Postfix bounces such a message; here the recipient is refused before it is sent.
                return format_reply(553, "5.6.7", "SMTPUTF8 is required, but was not offered by the next hop")
            if not check.mail_said:
                reply = await session.command(self._mail_command(session, transaction, utf8, None), timeout)
                if not reply.positive:
                    raise _HopRefused("MAIL", reply)  # the relay will meet it and answer for it
                check.mail_said = True
            reply = await session.command(self._rcpt_command(session, address, dsn, utf8), timeout)
        except asyncio.CancelledError:
            check.close()
            raise
        except (_HopError, _RelayFailure, OSError, TimeoutError, UnicodeError) as exc:
            log.debug("recipient check not possible: %s", type(exc).__name__)
            check.close()
            check.unavailable = True
            return None
        if reply.code == 421:  # the next hop is closing: nothing more to learn from it
            check.close()
            check.unavailable = True
            return None
        if reply.positive:
            return None
        log.debug("the next hop refused a recipient: %d", reply.code)
        return _next_hop_reply(reply, None)

    async def _relay(
        self, data: bytes, transaction: _Transaction, reference: str, deadline: float
    ) -> tuple[str, str]:
        """Send the message to the next hop: its acceptance as our 250 and the TLS version
        used ("none": plain text), else _RelayFailure. Each stage has its own timeout, and
        all end by `deadline`; see the module's docstring."""
        config = self.config
        session: _NextHopSession | None = None
        delivered = False
        try:
            session = await self._next_hop_session(reference, deadline)
            utf8 = transaction.smtp_utf8 and session.offers("SMTPUTF8")
            if not utf8 and _needs_smtputf8(transaction, data):
                # As Postfix: the message cannot go on without it, and never will (RFC 6531 3.5).
                required = "SMTPUTF8 is required, but was not offered by the next hop"
                raise _RelayFailure(format_reply(554, "5.6.7", f"{required}. Reference {reference}."))
            command = config.relay_command_timeout_seconds
            reply = await session.command(
                self._mail_command(session, transaction, utf8, len(data)), self._within(command, deadline)
            )
            if not reply.positive:
                raise _RelayFailure(_next_hop_reply(reply, reference))
            refused: list[tuple[str, _Reply]] = []
            for recipient, dsn in zip(transaction.rcpt_tos, transaction.rcpt_dsn, strict=True):
                reply = await session.command(
                    self._rcpt_command(session, recipient, dsn, utf8), self._within(command, deadline)
                )
                if not reply.positive:
                    refused.append((recipient, reply))
            if refused:
                raise _RelayFailure(self._refused_reply(refused, len(transaction.rcpt_tos), reference))
            reply = await session.command(b"DATA", self._within(command, deadline))
            if reply.code != 354:
                raise _RelayFailure(_next_hop_reply(reply, reference))
            reply = await session.send_message(
                data,
                stall=config.relay_stall_timeout_seconds,
                final_reply=config.relay_final_reply_timeout_seconds,
                # The final reply gets at least a command's time, or the dot is kept back.
                reserve=min(command, config.relay_final_reply_timeout_seconds),
                deadline=deadline,
            )
            if not reply.positive:
                raise _RelayFailure(_next_hop_reply(reply, reference))
            delivered = True
            # The message is the next hop's: a QUIT it does not answer changes nothing.
            session.quit_soon()
        except _RelayFailure:
            raise
        except _HopRefused as exc:
            # A next hop that will not talk to us at all is a set-up fault, not this message's.
            log.error("%s: next hop refused the connection: %d", reference, exc.reply.code)
            raise _RelayFailure(_tempfail("4.4.1", "Next hop unavailable", reference)) from None
        except (_HopError, OSError, TimeoutError, UnicodeError) as exc:
            if session is not None and session.dot_sent:
                log.warning(
                    "%s: no answer from the next hop %s:%d to the end of the message in time: the "
                    "client is told to retry, and the next hop may have the message, so it may be "
                    "delivered twice",
                    reference,
                    config.next_hop_host,
                    config.next_hop_port,
                    extra={"event": "relay_unconfirmed"},
                )
                raise _RelayFailure(_tempfail("4.4.2", "No answer from the next hop", reference)) from None
            log.warning(
                "%s: next hop %s:%d unavailable: %s",
                reference,
                config.next_hop_host,
                config.next_hop_port,
                type(exc).__name__,
            )
            if session is not None and isinstance(exc, TimeoutError):
                # Given up mid-way, with the connection reset: the next hop has no message.
                raise _RelayFailure(_tempfail("4.4.2", "Next hop too slow", reference)) from None
            raise _RelayFailure(_tempfail("4.4.1", "Next hop unavailable", reference)) from None
        except asyncio.CancelledError:
            if session is not None and session.dot_sent and not delivered:
                log.warning(
                    "%s: the connection closed while the next hop had the end of the message: it "
                    "may be delivered twice",
                    reference,
                    extra={"event": "relay_unconfirmed"},
                )
            raise
        finally:
            if session is not None and not delivered:
                # Never close(): it would still send what is buffered, the final dot included.
                session.abort()
        log.debug(
            "%s: relayed to the next hop over %s",
            reference,
            session.tls or "plain text",
            extra={"event": "relayed", "reference": reference, "tls": session.tls or "none"},
        )
        said = _ascii_line(reply.text)[:120]
        return (
            format_reply(250, "2.0.0", f"Delivered to the next hop ({said}); reference {reference}."),
            session.tls or "none",
        )

    @staticmethod
    def _refused_reply(refused: list[tuple[str, _Reply]], total: int, reference: str) -> str:
        """When the next hop refuses recipients as the message is relayed (its recipient check
        said otherwise, or could not be made): nothing is sent, see the module's docstring."""
        permanent = [reply for _, reply in refused if reply.code >= 500]
        if len(refused) == total and len(permanent) == total:
            return _next_hop_reply(permanent[0], reference)
        if len(refused) == total:
            first = next(reply for _, reply in refused if reply.code < 500)
            return _next_hop_reply(first, reference)
        # Some recipients taken, some not: one DATA reply cannot say both, and a 5xx would
        # bounce the good ones. Nothing is sent; the client retries all of them.
        codes = ", ".join(f"{recipient} {reply.code}" for recipient, reply in refused[:3])
        return _tempfail(
            "4.4.0", f"The next hop refused some recipients ({codes}); nothing was delivered", reference
        )

    async def _failed(
        self, path: Path | None, reference: str, envelope: Envelope, stage: str, exc: Exception
    ) -> str:
        """A fault of ours: the message is kept in failed/ for inspection and the client retries."""
        # Only the exception type: its text may quote message content.
        log.error(
            "%s: failed at %s: %s",
            reference,
            stage,
            type(exc).__name__,
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        if path is not None:
            record: dict[str, object] = {
                "reference": reference,
                "received": _now(),
                "stage": stage,
                "error": type(exc).__name__,
                "envelope": dataclasses.asdict(envelope),
            }
            try:
                await asyncio.to_thread(self.spool.keep_failed, path, reference, record)
            except Exception as keep_exc:
                log.error(
                    "%s: could not move the spool file to failed/: %s", reference, type(keep_exc).__name__
                )
        return _tempfail("4.3.0", "Temporary problem in the mail gateway", reference)

    def _decided(self, verdict: Verdict, envelope: Envelope, seconds: float, result: Scan) -> None:
        if self.on_decision is None:
            return
        try:
            self.on_decision(verdict, envelope, seconds, result)
        except Exception as exc:
            # Logging and counting must never change what happens to mail.
            log.error("on_decision hook failed: %s", type(exc).__name__)
