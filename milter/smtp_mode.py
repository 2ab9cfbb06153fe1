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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import textwrap
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, AnyStr

import aiosmtplib
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


@dataclass(frozen=True)
class SmtpModeConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 10025
    next_hop_host: str = "127.0.0.1"
    next_hop_port: int = 10026
    spool_dir: Path = Path("var/spool")
    max_message_bytes: int = 50_000_000
    max_connections: int = 100
    # Idle time allowed between client commands (and for sending DATA) before the
    # connection is dropped; scanning and relaying do not count against it.
    timeout_seconds: float = 300.0
    # The whole relay transaction with the next hop, connect to final reply.
    relay_timeout_seconds: float = 60.0
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


def _next_hop_reply(code: int, message: str, reference: str) -> str:
    """The next hop's refusal passed back to the client, with our reference added."""
    enhanced = None
    lines = []
    for line in message.splitlines():
        match = _ENHANCED.match(line)
        if match:
            enhanced = enhanced or match.group(1)
            line = line[match.end() :]
        lines.append(line)
    if not enhanced or enhanced[0] != str(code)[0]:
        enhanced = f"{str(code)[0]}.0.0"
    lines.append(f"(from the next hop) Reference {reference}.")
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

    Several worker processes share one spool directory. A file in incoming/ (and tmp/) is
    named REF.PID.eml after the process handling it, so a worker (re)starting counts as
    left over only the files whose process is gone, never those a live sibling is writing
    or handling, and it only counts them: nothing in incoming/ is moved or deleted at
    start. (A dead worker's pid taken by a new process hides its files until that process
    ends: a late report, never a disturbed message.)
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

    def _write(self, final: Path, data: bytes) -> Path:
        """Write through tmp/ and rename: a reader never sees half a file, a crash leaves none."""
        tmp = self.tmp / final.name
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


def _handler_alive(path: Path) -> bool:
    """Whether another live process may be handling this incoming/ file (named REF.PID.eml)."""
    pid = path.name.removesuffix(".eml").rpartition(".")[2]
    if not pid.isdigit() or int(pid) in (0, os.getpid()):
        return False  # no pid (an older gateway's file), or ours from before we started
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, as another user
    return True


def _json(record: dict[str, object]) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True, default=str).encode() + b"\n"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- the SMTP server side ----------------------------------------------------------------


def _xtext_decode(value: str) -> str:
    """RFC 3461 xtext: "+XX" is the character with hex code XX."""
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


class _Busy(asyncio.Protocol):
    """Answers a connection over the limit with 421 and hangs up, so the client retries later."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.reply.encode("ascii") + b"\r\n")
        transport.close()


class _GatewaySMTP(SMTP):
    """aiosmtpd's SMTP plus XFORWARD, coded size replies and an idle timer paused while we work."""

    def __init__(self, gateway: SmtpGateway, **kwargs: Any) -> None:
        super().__init__(gateway, **kwargs)
        self.gateway = gateway
        # XFORWARD attributes, tied to the aiosmtpd envelope they were given for: aiosmtpd
        # makes a new envelope after DATA, RSET and HELO/EHLO, so they last one transaction.
        self._xforward: tuple[SmtpEnvelope | None, dict[str, str | None]] = (None, {})
        self.handling = False

    def connection_lost(self, error: Exception | None) -> None:
        self.gateway._connections.discard(self)
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        # A message counts as in flight from handle_DATA until its reply has been written
        # (aiosmtpd writes it after handle_DATA returns), so stop() never cuts it short.
        try:
            await super().smtp_DATA(arg)
        finally:
            if self.handling:
                self.handling = False
                self.gateway._message_done()

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
        await super().smtp_MAIL(arg)

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

    def _follow_up(self, result: Scan, held_id: str | None) -> None:
        """Guidance and alerts, queued in the background; the outbox sends them."""
        if self.followup is not None:
            self._executor.submit(self.followup.after_verdict, result, self.rules_provider(), held_id)

    # -- lifecycle --

    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve on the running loop: on `sock`, a listening socket the parent of worker
        processes bound and shares with them all, or else on listen_host:listen_port."""
        loop = asyncio.get_running_loop()
        # aiosmtpd logs every command at INFO, envelope addresses included; the gateway's
        # logs carry no addresses (policy 2.4), so only its warnings and errors get through.
        aiosmtpd_log = logging.getLogger("mail.log")
        if aiosmtpd_log.getEffectiveLevel() < logging.WARNING:
            aiosmtpd_log.setLevel(logging.WARNING)
        self._idle = asyncio.Event()
        self._idle.set()
        if not self._hostname:
            # aiosmtpd would call getfqdn() (a DNS lookup) for every connection, on the loop.
            self._hostname = await asyncio.to_thread(socket.getfqdn)
        left = await asyncio.to_thread(self.spool.prepare)
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
        """Stop accepting, let messages being handled finish (bounded wait), then close."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        if self._in_flight and self._idle is not None:
            try:
                await asyncio.wait_for(self._idle.wait(), self.config.stop_grace_seconds)
            except TimeoutError:
                # Their clients are told nothing, so they keep the messages and retry.
                log.warning("stopping with %d message(s) still being handled", self._in_flight)
        for connection in list(self._connections):
            connection.hang_up(f"421 4.3.2 {self._hostname} Service shutting down, try again later")
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
        if server.xforward_allowed():
            responses.insert(len(responses) - 1, "250-XFORWARD " + " ".join(_XFORWARD_ATTRIBUTES))
        return responses

    async def handle_MAIL(
        self,
        server: _GatewaySMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
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
        server.handling = True
        self._in_flight += 1
        if self._idle is not None:
            self._idle.clear()
        server.pause_idle_timer()
        try:
            return await self._handle_message(server, session, envelope)
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
            # aiosmtpd keeps the null sender as "<>"; the milter side (and aiosmtplib) want "".
            mail_from=(smtp_envelope.mail_from or "").removeprefix("<").removesuffix(">"),
            rcpt_to=tuple(smtp_envelope.rcpt_tos),
            client_address=client_address,
            client_name=forwarded.get("NAME"),
            helo=forwarded.get("HELO", session.host_name),
            auth_user=_auth_user(session),
            queue_id=forwarded.get("IDENT"),
        )

    async def _handle_message(
        self, server: _GatewaySMTP, session: Session, smtp_envelope: SmtpEnvelope
    ) -> str:
        raw = smtp_envelope.original_content or b""
        # aiosmtpd keeps the content on its envelope until we return; from here the
        # spool file is the copy of record and `raw` the only one in memory.
        smtp_envelope.content = smtp_envelope.original_content = None
        envelope = self._envelope(server, session, smtp_envelope)
        body_type = next(
            (o.partition("=")[2] for o in smtp_envelope.mail_options if o.upper().startswith("BODY=")), None
        )
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
        stage = "spool"
        try:
            path = await asyncio.to_thread(self.spool.receive, reference, raw)
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
                verdict, envelope, raw, changes, body_type, path, reference
            )
        except asyncio.CancelledError:
            # The client went away (or we are stopping) before hearing an answer: it still
            # has the message and will send it again.
            if path is not None:
                Spool.remove(path)
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

    async def _carry_out(
        self,
        verdict: Verdict,
        envelope: Envelope,
        raw: bytes,
        changes: list[Modification],
        body_type: str | None,
        path: Path,
        reference: str,
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
                    apply_to_bytes(raw, changes),
                    envelope.mail_from or "",
                    envelope.rcpt_to,
                    body_type,
                    reference,
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

    def _relay_client(self) -> aiosmtplib.SMTP:
        config = self.config
        return aiosmtplib.SMTP(
            hostname=config.next_hop_host,
            port=config.next_hop_port,
            timeout=config.relay_timeout_seconds,
            local_hostname=self._hostname,
            # STARTTLS is done by _next_hop_session, which decides what a failure means.
            start_tls=False,
        )

    async def _next_hop_session(self, reference: str) -> tuple[aiosmtplib.SMTP, str | None]:
        """A connected client that has said EHLO, over TLS as next_hop_tls says, and the TLS
        version (None: plain text). aiosmtplib's errors as they come; _RelayFailure (a 451,
        as for a next hop that is down) when TLS is required and cannot be had."""
        config = self.config
        client = self._relay_client()
        await client.connect()
        try:
            await client.ehlo()
            if self._relay_tls is None:
                return client, None
            if not client.supports_extension("starttls"):
                if config.next_hop_tls == "required":
                    log.error(
                        "%s: next hop %s:%d does not offer STARTTLS and next_hop_tls = required: not relayed",
                        reference,
                        config.next_hop_host,
                        config.next_hop_port,
                        extra={"event": "relay_tls_failed"},
                    )
                    raise _RelayFailure(_tempfail("4.4.1", "Next hop unavailable", reference))
                return client, None
            try:
                await client.starttls(tls_context=self._relay_tls, server_hostname=config.next_hop_tls_name)
                await client.ehlo()  # RFC 3207: what the server said before TLS no longer counts
            except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
                why = tls_failure(exc)
                if config.next_hop_tls == "required":
                    log.error(
                        "%s: TLS with the next hop %s:%d failed (%s) and next_hop_tls = required: "
                        "not relayed",
                        reference,
                        config.next_hop_host,
                        config.next_hop_port,
                        why,
                        extra={"event": "relay_tls_failed"},
                    )
                    raise _RelayFailure(_tempfail("4.4.1", "Next hop unavailable", reference)) from None
                # Opportunistic: a next hop whose TLS is broken still gets its mail (as Postfix
                # retries in plain text at security level "may"); nothing was sent yet.
                log.warning(
                    "%s: TLS with the next hop %s:%d failed (%s): relaying in plain text",
                    reference,
                    config.next_hop_host,
                    config.next_hop_port,
                    why,
                )
                client.close()
                client = self._relay_client()
                await client.connect()
                await client.ehlo()
                return client, None
            return client, negotiated_version(client.get_transport_info("ssl_object")) or "TLS"
        except BaseException:
            client.close()
            raise

    async def _relay(
        self, data: bytes, sender: str, recipients: Sequence[str], body_type: str | None, reference: str
    ) -> tuple[str, str]:
        """Send the message to the next hop: its acceptance as our 250 and the TLS version
        used ("none": plain text), else _RelayFailure."""
        config = self.config
        unavailable = "Next hop unavailable"
        tls: str | None = None
        try:
            async with asyncio.timeout(config.relay_timeout_seconds):
                client, tls = await self._next_hop_session(reference)
                try:
                    options = []
                    if body_type and client.supports_extension("8bitmime"):
                        options.append(f"BODY={body_type}")
                    if client.supports_extension("size"):
                        options.append(f"SIZE={len(data)}")
                    await client.mail(sender, options=options)
                    refused: list[aiosmtplib.SMTPRecipientRefused] = []
                    for recipient in recipients:
                        try:
                            await client.rcpt(recipient)
                        except aiosmtplib.SMTPRecipientRefused as exc:
                            refused.append(exc)
                    if refused:
                        raise _RelayFailure(self._refused_reply(refused, len(recipients), reference))
                    response = await client.data(data)
                    # Polite, but the message is already the next hop's: a failed QUIT changes nothing.
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.quit(), 2)
                finally:
                    # After a refusal or a fault, just hang up: a QUIT could land inside DATA.
                    client.close()
        except _RelayFailure:
            raise
        except (aiosmtplib.SMTPConnectResponseError, aiosmtplib.SMTPHeloError) as exc:
            # A next hop that will not talk to us at all is a set-up fault, not this message's.
            log.error("%s: next hop refused the connection: %d", reference, exc.code)
            raise _RelayFailure(_tempfail("4.4.1", unavailable, reference)) from None
        except aiosmtplib.SMTPResponseException as exc:
            if 400 <= exc.code < 600:
                raise _RelayFailure(_next_hop_reply(exc.code, exc.message, reference)) from None
            raise _RelayFailure(_tempfail("4.4.1", unavailable, reference)) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            log.warning(
                "%s: next hop %s:%d unavailable: %s",
                reference,
                config.next_hop_host,
                config.next_hop_port,
                type(exc).__name__,
            )
            raise _RelayFailure(_tempfail("4.4.1", unavailable, reference)) from None
        log.debug(
            "%s: relayed to the next hop over %s",
            reference,
            tls or "plain text",
            extra={"event": "relayed", "reference": reference, "tls": tls or "none"},
        )
        said = _ascii_line(response.message)[:120]
        reply = format_reply(250, "2.0.0", f"Delivered to the next hop ({said}); reference {reference}.")
        return reply, tls or "none"

    @staticmethod
    def _refused_reply(refused: list[aiosmtplib.SMTPRecipientRefused], total: int, reference: str) -> str:
        permanent = [exc for exc in refused if exc.code >= 500]
        if len(refused) == total and len(permanent) == total:
            return _next_hop_reply(permanent[0].code, permanent[0].message, reference)
        if len(refused) == total:
            first = next(exc for exc in refused if exc.code < 500)
            return _next_hop_reply(first.code, first.message, reference)
        # Some recipients accepted, some not: one DATA reply cannot say both, and a 5xx
        # would bounce the good ones. Nothing is sent; the client retries all of them.
        codes = ", ".join(f"{exc.recipient} {exc.code}" for exc in refused[:3])
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
