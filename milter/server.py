"""The milter server: one asyncio task per MTA connection, driving the codec and the engine.

Nothing is lost: any failure while handling a message ends in a 4xx reply with a
reference id, so the MTA keeps the message and retries. The scan runs in a thread
pool so the event loop keeps answering other connections and can send keep-alives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import socket
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from milter import protocol as p
from milter.clamd import ClamdResult, ClamdUnavailable
from milter.decide import TEMPFAIL_TEXT
from milter.detectors import virus_scan
from milter.engine import Scan, conclude, examine, scan
from milter.envelope import Envelope
from milter.followup import FollowUp, is_report
from milter.modify import AddHeader, ChangeHeader, Modification, modifications, removals
from milter.policy.loader import Rules
from milter.policy.schema import Action
from milter.reference import new_reference
from milter.sockets import parse_socket_name

log = logging.getLogger(__name__)
T = TypeVar("T")

# What we ask the MTA for: header changes (tag, fix), quarantine, and our own macro list.
WANTED_ACTIONS = p.ADD_HEADERS | p.CHANGE_HEADERS | p.QUARANTINE | p.SET_SYMLIST
# Steps we never use are skipped; every step but end-of-message needs no reply, which
# saves a round trip per header and per body chunk.
WANTED_PROTOCOL = (
    p.NO_UNKNOWN
    | p.NO_DATA
    | p.NO_HELO
    | p.NR_CONNECT
    | p.NR_HELO
    | p.NR_MAIL
    | p.NR_RCPT
    | p.NR_HEADER
    | p.NR_EOH
    | p.NR_BODY
    | p.NR_DATA
    | p.NR_UNKNOWN
    | p.HEADER_LEADING_SPACE
)
# Only the macros the engine uses: client address and name, authenticated user, queue id,
# all asked for at MAIL FROM. The MTA then need not tell us of the connection or HELO at
# all (two packets fewer a session for it to write and us to read); an MTA that cannot
# take our macro list still sends the connection, where the client address is.
WANTED_MACROS = {
    p.STAGE_MAIL: ["{client_addr}", "{client_name}", "{auth_authen}", "i"],
    p.STAGE_EOM: ["i"],
}
SKIPPED_WITH_MACROS = p.NO_CONNECT
# Detectors that wait on another process: on the loop they are awaited, not called.
ON_LOOP = frozenset({virus_scan.NAME})
# Macro stages in protocol order; those from MAIL on belong to one message (as libmilter
# clears them) and are forgotten after its end or abort.
MACRO_STAGE_ORDER = ("C", "H", "M", "R", "T", "L", "N", "B", "E", "U")
MESSAGE_STAGES = ("M", "R", "T", "L", "N", "B", "E")
NO_REPLY_FLAG: dict[type, int] = {
    p.Connect: p.NR_CONNECT,
    p.Helo: p.NR_HELO,
    p.MailFrom: p.NR_MAIL,
    p.RcptTo: p.NR_RCPT,
    p.Data: p.NR_DATA,
    p.Header: p.NR_HEADER,
    p.EndOfHeaders: p.NR_EOH,
    p.BodyChunk: p.NR_BODY,
    p.UnknownSmtpCommand: p.NR_UNKNOWN,
}


@dataclass(frozen=True)
class ServerLimits:
    max_connections: int = 200
    # Timeouts by stage. Between two commands from the MTA; Postfix keeps a milter
    # connection for a whole SMTP session, whose own commands may each take minutes.
    idle_timeout: float = 900.0
    # From connecting to option negotiation: an MTA sends it at once.
    negotiate_timeout: float = 30.0
    # From the first bytes of a packet to its last: a packet (at most 64 KiB of body,
    # max_packet in all) is written in one go, so a packet that stalls is a stuck peer,
    # even one that trickles a byte now and then to dodge idle_timeout.
    packet_timeout: float = 120.0
    scan_timeout: float = 120.0
    # Keep-alives while a scan runs, well inside Postfix's milter_content_timeout (300 s).
    progress_interval: float = 10.0
    max_packet: int = p.DEFAULT_MAX_PACKET
    max_message_bytes: int = 100_000_000
    # Header fields per message: each costs far more memory than its bytes, so a message of
    # a million tiny headers must not be held whole. Real mail has tens.
    max_headers: int = 10_000
    # Bodies larger than this are kept in a temporary file instead of memory.
    spool_threshold: int = 4_000_000
    # Messages up to this size are scanned on the event loop's own thread.
    inline_scan_bytes: int = 0


@dataclass
class Decision:
    """What happened to one message, for logs and metrics (no content)."""

    reference: str
    action: str
    scan_seconds: float
    queue_id: str | None
    size: int
    recipients: int
    result: Scan | None = None
    error: str | None = None


DecisionHook = Callable[[Decision], None]


@dataclass
class _MessageState:
    mail_from: str | None = None
    rcpts: list[str] = field(default_factory=list)
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    body: tempfile.SpooledTemporaryFile[bytes] | None = None
    size: int = 0
    too_large: bool = False
    too_many_headers: bool = False
    # The body could not be kept (the temporary files' disk is full): errno's name.
    storage_error: str | None = None


class MilterSession:
    """One MTA connection: several messages, possibly several SMTP sessions (QUIT_NC)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        server: MilterServer,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.server = server
        self.limits = server.limits
        self.decoder = p.Decoder(max_packet=self.limits.max_packet)
        self.actions = 0
        self.protocol = 0
        # Scanning and answering a message: what SIGTERM lets finish. A message still being
        # transferred is cut off; the MTA tempfails it and the sender retries.
        self.in_message = False
        # The stage timeouts' single timer and when it is due (see _check_idle).
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_due = 0.0
        self._reset_connection()

    def _reset_connection(self) -> None:
        # Macros by the stage they came with ("C", "M", "E", ...): those of the message's
        # stages end with the message, so an aborted message's queue id or client address
        # never carries over to the next one.
        self.stage_macros: dict[str, dict[str, str]] = {}
        self.client_address: str | None = None
        self.client_name: str | None = None
        self.helo: str | None = None
        self._reset_message()

    def _reset_message(self) -> None:
        state = getattr(self, "message", None)
        if state is not None and state.body is not None:
            state.body.close()
        self.message = _MessageState()

    def _end_message(self) -> None:
        """After end of message or abort: the message's state and its stages' macros go."""
        self._reset_message()
        for stage in MESSAGE_STAGES:
            self.stage_macros.pop(stage, None)

    @property
    def macros(self) -> dict[str, str]:
        """The macros in force, later stages over earlier ones."""
        merged: dict[str, str] = {}
        for stage in MACRO_STAGE_ORDER:
            values = self.stage_macros.get(stage)
            if values:
                merged.update(values)
        return merged

    def _tcp_socket(self) -> socket.socket | None:
        """The connection's socket when it is TCP (quick ACKs apply), else None."""
        sock = self.writer.get_extra_info("socket")
        if (
            sock is not None
            and sock.family in (socket.AF_INET, socket.AF_INET6)
            and hasattr(socket, "TCP_QUICKACK")
        ):
            return sock  # type: ignore[no-any-return]
        return None

    def _deadline(self) -> tuple[float, str]:
        """When this connection has waited too long, by the stage it is in, and the stage."""
        limits = self.limits
        candidates = [(self._last_read + limits.idle_timeout, "idle")]
        if not self._negotiated:
            candidates.append((self._connected + limits.negotiate_timeout, "negotiation"))
        if self._packet_started is not None:
            candidates.append((self._packet_started + limits.packet_timeout, "packet"))
        return min(candidates)

    def _arm(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog_due = deadline
        self._watchdog = loop.call_at(max(deadline, loop.time() + 0.05), self._check_idle)

    def _check_idle(self) -> None:
        """The stage timeouts: one timer a connection, moved only when it fires or a stricter
        deadline begins (a timer per read cost more than the rest of reading a packet)."""
        loop = asyncio.get_running_loop()
        deadline, stage = self._deadline()
        if self.in_message:
            # Scanning: the scan has its own timeout; the MTA waits for our answer.
            deadline = loop.time() + self.limits.idle_timeout
        if loop.time() < deadline:
            self._arm(deadline)
            return
        log.info("milter connection stalled (%s timeout): closing", stage)
        self._idle_closed = True
        # Aborted, not closed: close() waits to send what is buffered, for ever when the peer
        # does not read. The pending read or write then fails and run() ends.
        self.writer.transport.abort()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_read = self._connected = loop.time()
        self._negotiated = False
        self._packet_started: float | None = None
        self._idle_closed = False
        self._arm(self._deadline()[0])
        # With "no reply" steps the MTA sends packet after packet that we never answer;
        # Postfix does not set TCP_NODELAY, so each of its writes waits for our ACK, which
        # Linux delays by up to 40 ms. Asking for quick ACKs (after every read: the kernel
        # drops back to delayed ACKs on its own) removes that wait.
        tcp = self._tcp_socket()
        try:
            while True:
                data = await self.reader.read(65536 + 16)
                if not data or self._idle_closed:
                    return
                self._last_read = now = loop.time()
                if tcp is not None:
                    with contextlib.suppress(OSError):
                        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                commands = self.decoder.feed(data)
                if not self.decoder.pending:
                    self._packet_started = None
                elif commands or self._packet_started is None:
                    # A packet left half-read: its own, shorter deadline starts now.
                    self._packet_started = now
                    if now + self.limits.packet_timeout < self._watchdog_due:
                        self._arm(now + self.limits.packet_timeout)
                for command in commands:
                    if not await self._handle(command):
                        return
                if self.decoder.failed is not None:
                    # The commands before the fault were handled; now the fault ends it.
                    raise self.decoder.failed
        except p.ProtocolError as exc:
            log.warning("milter protocol error, closing the connection: %s", exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._reset_message()
            self.writer.close()

    async def _send(self, data: bytes) -> None:
        self.writer.write(data)
        if not self.writer.transport.get_write_buffer_size():
            return  # all of it went to the socket: the usual case, no wait
        try:
            # A peer that does not read our answers must not hold the connection for ever.
            async with asyncio.timeout(self.limits.packet_timeout):
                await self.writer.drain()
        except TimeoutError:
            log.info("milter connection not reading our replies (packet timeout): closing")
            self.writer.transport.abort()
            raise ConnectionError("the MTA does not read our replies") from None

    async def _handle(self, command: p.Command) -> bool:
        """Handle one command; False ends the connection."""
        if isinstance(command, p.OptionNegotiation):
            await self._negotiate(command)
            return True
        if isinstance(command, p.DefineMacros):
            # One packet a stage; a stage's new macros replace its old ones.
            self.stage_macros[command.stage] = dict(command.macros)
            return True
        if isinstance(command, p.UnrecognisedPacket):
            # As libmilter: a command we do not know may want an answer we cannot give, and
            # any guess shifts every later answer by one. Closing makes the MTA apply its
            # milter_default_action (tempfail): the mail waits, it is not lost.
            log.warning("unknown milter command %r: closing the connection", command.code)
            return False
        if isinstance(command, p.Connect):
            self.client_name = command.hostname
            self.client_address = command.address if command.family in ("4", "6") else None
        elif isinstance(command, p.Helo):
            self.helo = command.name
        elif isinstance(command, p.MailFrom):
            self._reset_message()
            self.message.mail_from = command.address
        elif isinstance(command, p.RcptTo):
            self.message.rcpts.append(command.address)
        elif isinstance(command, p.Header):
            self._add_header(command)
        elif isinstance(command, p.BodyChunk):
            self._add_body(command.data)
        elif isinstance(command, p.EndOfMessage):
            if command.data:
                self._add_body(command.data)
            self.in_message = True
            try:
                await self._end_of_message()
            finally:
                self.in_message = False
            self._end_message()
            # Shutting down: this connection has had its answer; the MTA reconnects elsewhere.
            return not self.server.stopping
        elif isinstance(command, p.Abort):
            self._end_message()
            return not self.server.stopping
        elif isinstance(command, p.Quit):
            return False
        elif isinstance(command, p.QuitNewConnection):
            self._reset_connection()
            return True
        # Steps that want a reply unless negotiated away.
        flag = NO_REPLY_FLAG.get(type(command), 0)
        if not (flag and self.protocol & flag):
            await self._send(p.continue_())
        return True

    async def _negotiate(self, offer: p.OptionNegotiation) -> None:
        self._negotiated = True
        if offer.version < 2:
            raise p.ProtocolError(f"milter protocol version {offer.version} is too old")
        self.actions = WANTED_ACTIONS & offer.actions
        macros = WANTED_MACROS if self.actions & p.SET_SYMLIST else None
        wanted = WANTED_PROTOCOL | (SKIPPED_WITH_MACROS if macros else 0)
        self.protocol = wanted & offer.protocol
        missing = WANTED_ACTIONS & ~offer.actions & ~p.SET_SYMLIST
        if missing:
            log.warning(
                "the MTA does not offer milter actions 0x%x: tags and fixes may be incomplete", missing
            )
        await self._send(p.option_negotiation(self.actions, self.protocol, macros))

    def _add_header(self, header: p.Header) -> None:
        value = header.value
        # Folded values arrive with bare newlines; the message is rebuilt with CRLF.
        value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if not self.protocol & p.HEADER_LEADING_SPACE:
            value = b" " + value
        self._count(len(header.name) + len(value) + 3)
        state = self.message
        if len(state.headers) >= self.limits.max_headers:
            state.too_many_headers = True
        if not state.too_large and not state.too_many_headers:
            state.headers.append((header.name, value))

    def _add_body(self, data: bytes) -> None:
        self._count(len(data))
        state = self.message
        if state.too_large or state.storage_error:
            return
        try:
            if state.body is None:
                # Lives across many BODY commands; closed in _reset_message.
                state.body = tempfile.SpooledTemporaryFile(max_size=self.limits.spool_threshold)  # noqa: SIM115
            state.body.write(data)
        except OSError as exc:
            # A large body goes to a temporary file; with its disk full the message cannot be
            # scanned whole. The rest of it is read and dropped; end of message answers 4xx.
            state.storage_error = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            if state.body is not None:
                with contextlib.suppress(OSError):
                    state.body.close()
                state.body = None

    def _count(self, size: int) -> None:
        self.message.size += size
        if self.message.size > self.limits.max_message_bytes:
            self.message.too_large = True

    def _raw_message(self) -> bytes:
        head = b"".join(
            name.encode("utf-8", "surrogateescape") + b":" + value + b"\r\n"
            for name, value in self.message.headers
        )
        body = b""
        if self.message.body is not None:
            self.message.body.seek(0)
            body = self.message.body.read()
        return head + b"\r\n" + body

    def _envelope(self) -> Envelope:
        macros = self.macros
        return Envelope(
            mail_from=self.message.mail_from,
            rcpt_to=tuple(self.message.rcpts),
            client_address=macros.get("client_addr") or self.client_address,
            client_name=macros.get("client_name") or self.client_name,
            helo=self.helo,
            auth_user=macros.get("auth_authen") or None,
            queue_id=macros.get("i"),
            macros=macros,
            from_wire=True,
        )

    async def _end_of_message(self) -> None:
        envelope = self._envelope()
        state = self.message
        started = time.perf_counter()
        if state.storage_error:
            await self._storage_full(envelope, state)
            return
        if state.too_large or state.too_many_headers:
            reference = new_reference(self.server.rules_provider().policy.reference_prefix)
            what = "Message too large" if state.too_large else "Too many header lines"
            await self._send(
                p.reply_code(552, "5.3.4", [f"{what} for the school's gateway. Reference {reference}."])
            )
            self.server.decided(
                Decision(
                    reference,
                    "reject",
                    0.0,
                    envelope.queue_id,
                    state.size,
                    len(state.rcpts),
                    error="too large" if state.too_large else "too many headers",
                )
            )
            return
        followup = self.server.followup
        try:
            raw = self._raw_message()
            if followup and is_report(envelope, self.server.rules_provider()):
                await self._take_report(followup, raw, envelope, started)
                return
            result = await self._scan(raw, envelope)
            held_id = None
            if followup and result.verdict.action is Action.QUARANTINE:
                # Durably stored before the MTA is told to drop it; a failure here is a 4xx.
                held_id = await self._with_keepalives(
                    self._in_executor(followup.hold, raw, envelope, result), "storing the message"
                )
        except Exception as exc:
            await self._failed(envelope, exc, time.perf_counter() - started)
            return
        applied = await self._apply(result, held=held_id is not None)
        # Only for a verdict carried out: one the MTA is to retry is followed up on its retry.
        if (
            followup
            and applied == result.verdict.action.value
            and (result.verdict.alerts or result.verdict.guidance)
        ):
            self.server.follow_up(result, held_id)
        self.server.decided(
            Decision(
                result.verdict.reference,
                applied,
                time.perf_counter() - started,
                envelope.queue_id,
                len(raw),
                len(state.rcpts),
                result,
            )
        )

    async def _storage_full(self, envelope: Envelope, state: _MessageState) -> None:
        """The body did not fit on the temporary files' disk: 452 4.3.1, and the MTA keeps the mail."""
        reference = new_reference(self.server.rules_provider().policy.reference_prefix)
        log.error(
            "%s: no room for the body in a temporary file (%s, in %s): answered 452, the MTA retries",
            reference,
            state.storage_error,
            tempfile.gettempdir(),
            extra={"event": "temporary_storage_full"},
        )
        text = f"Insufficient system storage; please try again later. Reference {reference}."
        await self._send(p.reply_code(452, "4.3.1", [text]))
        self.server.decided(
            Decision(
                reference,
                "tempfail",
                0.0,
                envelope.queue_id,
                state.size,
                len(state.rcpts),
                error="temporary storage full",
            )
        )

    def _in_executor(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self.server.executor, fn, *args)

    async def _take_report(self, followup: FollowUp, raw: bytes, envelope: Envelope, started: float) -> None:
        """A report for the report address (5.7): kept in the store, then dropped, not scanned."""
        rules = self.server.rules_provider()
        reference = new_reference(rules.policy.reference_prefix)
        taken = await self._with_keepalives(
            self._in_executor(followup.take_report, raw, envelope, rules, reference), "storing the report"
        )
        await self._send(p.discard())
        log.info(
            "report taken",
            extra={
                "event": "report",
                "reference": taken.id,
                "proposals": taken.proposals,
                "linked": taken.linked,
            },
        )
        self.server.decided(
            Decision(
                taken.id,
                "report",
                time.perf_counter() - started,
                envelope.queue_id,
                len(raw),
                len(self.message.rcpts),
            )
        )

    async def _scan(self, raw: bytes, envelope: Envelope) -> Scan:
        loop = asyncio.get_running_loop()
        rules = self.server.rules_provider()
        if len(raw) <= self.limits.inline_scan_bytes and self.server.scanner is scan:
            return await self._scan_on_loop(raw, envelope, rules)
        future = loop.run_in_executor(self.server.executor, self.server.scanner, raw, envelope, rules)
        return await self._with_keepalives(future, "the scan")

    async def _scan_on_loop(self, raw: bytes, envelope: Envelope, rules: Rules) -> Scan:
        """Small mail scans in a few milliseconds on this thread: handing it to a pool thread
        and back costs more than that (two wake-ups and GIL hand-offs a message). clamd is
        asked without blocking, so a stuck clamd holds this message only, within
        scan_timeout and with keep-alives, and the other connections go on."""
        exam = examine(raw, envelope, rules, skip=ON_LOOP)
        if rules.policy.detectors.virus_scan.enabled and virus_scan.wanted(exam.message, rules):
            answer: ClamdResult | ClamdUnavailable
            try:
                answer = await self._with_keepalives(virus_scan.client(rules).ascan(raw), "the virus scan")
            except ClamdUnavailable as exc:
                answer = exc
            exam.record(virus_scan.NAME, lambda: virus_scan.judge(answer, exam.message, rules))
        return conclude(exam, rules)

    async def _with_keepalives(self, work: Awaitable[T], what: str) -> T:
        """`work`'s result, sending keep-alives meanwhile so the MTA does not time out; a
        TimeoutError after scan_timeout (the MTA then hears 451 and keeps the message)."""
        loop = asyncio.get_running_loop()
        future = asyncio.ensure_future(work)
        deadline = loop.time() + self.limits.scan_timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                future.cancel()
                raise TimeoutError(f"{what} took longer than {self.limits.scan_timeout:.0f} s")
            done, _ = await asyncio.wait({future}, timeout=min(self.limits.progress_interval, remaining))
            if done:
                return future.result()
            await self._send(p.progress())

    async def _failed(self, envelope: Envelope, exc: Exception, seconds: float) -> None:
        rules = self.server.rules_provider()
        reference = new_reference(rules.policy.reference_prefix)
        # The exception's type only: its text may quote the message.
        log.error(
            "scan failed (reference %s, queue id %s): %s", reference, envelope.queue_id, type(exc).__name__
        )
        if rules.policy.on_failure.default == "fail_open":
            names = rules.policy.headers
            # A sender's forged result headers go on this path too.
            changes: list[Modification] = [
                *removals((names.verdict, names.findings), self._header_count),
                AddHeader(names.verdict, f"unscanned; ref={reference}"),
            ]
            replies, _ = self._header_replies(changes)
            await self._send(b"".join([*replies, p.continue_()]))
            action = "accept"
        else:
            text = TEMPFAIL_TEXT.format(reference=reference)
            await self._send(p.reply_code(451, "4.3.0", reply_lines(text)))
            action = "tempfail"
        self.server.decided(
            Decision(
                reference,
                action,
                seconds,
                envelope.queue_id,
                self.message.size,
                len(self.message.rcpts),
                error=type(exc).__name__,
            )
        )

    def _value(self, value: str) -> str:
        """A header value as the MTA expects it: with leading-space negotiated, it is taken verbatim."""
        return " " + value if self.protocol & p.HEADER_LEADING_SPACE and value else value

    def _header_count(self, name: str) -> int:
        """How many headers of this name the message being handled has (names match in any case)."""
        return sum(1 for header, _ in self.message.headers if header.lower() == name.lower())

    def _header_replies(self, changes: list[Modification]) -> tuple[list[bytes], bool]:
        """The protocol replies for header changes, and whether any could not be made because
        the MTA did not offer that action."""
        replies: list[bytes] = []
        unapplied = False
        for change in changes:
            if isinstance(change, AddHeader) and self.actions & p.ADD_HEADERS:
                # On top, where an MTA puts its own trace headers.
                replies.append(p.insert_header(0, change.name, self._value(change.value)))
            elif isinstance(change, ChangeHeader) and self.actions & p.CHANGE_HEADERS:
                replies.append(p.change_header(change.name, change.index, self._value(change.value or "")))
            else:
                unapplied = True
        return replies, unapplied

    async def _apply(self, result: Scan, held: bool = False) -> str:
        """Carry out the verdict; the action the MTA was given, for the decision line."""
        verdict = result.verdict
        # Everything for this message in one write: header changes and the final answer.
        replies, unapplied = self._header_replies(modifications(verdict, result.message))
        action = verdict.action
        if action is Action.FIX and unapplied:
            # A fix the MTA does not let us make (parents' addresses left visible) must not
            # go out unfixed: keep it waiting, as for a quarantine the MTA cannot do.
            log.warning("MTA cannot change headers; tempfailing the fix of %s instead", verdict.reference)
            await self._send(_held_for_review(verdict.reference))
            return Action.TEMPFAIL.value
        if action in (Action.REJECT, Action.TEMPFAIL) and verdict.reply:
            replies.append(
                p.reply_code(verdict.reply.code, verdict.reply.enhanced, reply_lines(verdict.reply.text))
            )
        elif action is Action.DISCARD or (action is Action.QUARANTINE and held):
            # A quarantined message is in the store by now: the MTA may drop its copy.
            replies.append(p.discard())
        elif action is Action.QUARANTINE:
            if self.actions & p.QUARANTINE:
                replies.append(p.quarantine(f"school policy, reference {verdict.reference}"))
                replies.append(p.continue_())
            else:
                # Without quarantine the only safe choices are keep-and-retry or refuse: retry.
                log.warning("MTA cannot quarantine; tempfailing %s instead", verdict.reference)
                replies.append(_held_for_review(verdict.reference))
                await self._send(b"".join(replies))
                return Action.TEMPFAIL.value
        else:
            replies.append(p.continue_())
        await self._send(b"".join(replies))
        return action.value


def _held_for_review(reference: str) -> bytes:
    """451: a hold or a fix the MTA cannot carry out; it keeps the message and retries."""
    return p.reply_code(451, "4.7.0", [f"Held for review. Reference {reference}."])


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("follow-up failed: %s", type(future.exception()).__name__)


def reply_lines(text: str) -> list[str]:
    """A long reply split before its reference, so the reference stands on a line of its own."""
    head, sep, tail = text.partition(" Reference ")
    return [head, f"Reference {tail}"] if sep else [text]


class MilterServer:
    """Accepts MTA connections on a listening socket and runs a MilterSession for each."""

    def __init__(
        self,
        rules_provider: Callable[[], Rules],
        limits: ServerLimits | None = None,
        executor: concurrent.futures.Executor | None = None,
        on_decision: DecisionHook | None = None,
        scanner: Callable[[bytes, Envelope, Rules], Scan] = scan,
        followup: FollowUp | None = None,
    ) -> None:
        self.rules_provider = rules_provider
        self.limits = limits or ServerLimits()
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="scan"
        )
        self.on_decision = on_decision
        self.scanner = scanner
        self.followup = followup
        self.active = 0
        # Called (from a worker thread) when mail was queued in the outbox, to send it soon.
        self.outbox_waiting: Callable[[], None] | None = None
        self._server: asyncio.Server | None = None
        self._sessions: dict[asyncio.Task[None], MilterSession] = {}
        self.stopping = False

    def decided(self, decision: Decision) -> None:
        if self.on_decision:
            try:
                self.on_decision(decision)
            except Exception:
                log.exception("decision hook failed")

    def follow_up(self, result: Scan, held_id: str | None) -> None:
        """Guidance mail and alerts, queued in the background after the MTA has its answer."""
        followup = self.followup
        if followup is None:
            return
        rules = self.rules_provider()

        def work() -> None:
            followup.after_verdict(result, rules, held_id)
            if self.outbox_waiting is not None:
                self.outbox_waiting()

        future = asyncio.get_running_loop().run_in_executor(self.executor, work)
        future.add_done_callback(_log_failure)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.limits.max_connections:
            # The MTA applies its milter_default_action (tempfail): the mail waits, it is not lost.
            log.warning(
                "connection limit (%d) reached: refusing a milter connection", self.limits.max_connections
            )
            writer.close()
            return
        self.active += 1
        task = asyncio.current_task()
        session = MilterSession(reader, writer, self)
        if task:
            self._sessions[task] = session
        try:
            await session.run()
        except asyncio.CancelledError:
            # Cancelled by stop(). Ending normally: asyncio's stream server logs a cancelled
            # connection task as an error ("Exception in callback"), one per idle connection.
            pass
        finally:
            self.active -= 1
            if task:
                self._sessions.pop(task, None)

    async def start(self, sock: socket.socket) -> None:
        if sock.family == socket.AF_UNIX:
            self._server = await asyncio.start_unix_server(self._connection, sock=sock)
        else:
            self._server = await asyncio.start_server(self._connection, sock=sock)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting; give messages in flight up to `grace` seconds to finish.

        A connection not scanning a message is closed at once (Postfix keeps them open for
        whole SMTP sessions; a message cut off mid-transfer is tempfailed and retried); one
        being scanned is closed once it has its answer.
        """
        self.stopping = True
        if self._server:
            self._server.close()
        for task, session in list(self._sessions.items()):
            if not session.in_message:
                task.cancel()
        if self._sessions:
            _done, pending = await asyncio.wait(set(self._sessions), timeout=grace)
            for task in pending:
                task.cancel()


def parse_address(spec: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """A milter socket name (inet:HOST:PORT, inet:PORT@HOST, inet6:..., unix:/path) as family and address."""
    return parse_socket_name(spec, "milter socket")


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a gateway that is gone; OSError when `path` is in use or
    is not a socket, so a second gateway never takes a running one's socket from it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # nobody listens: left by a gateway that stopped
            return
        except OSError:
            pass  # no answer in time: someone holds it
    raise OSError(errno.EADDRINUSE, f"another process is listening on {path}")


def bind(spec: str, backlog: int = 256) -> socket.socket:
    """A listening socket for the spec; shared by worker processes after fork."""
    family, where = parse_address(spec)
    if family == socket.AF_UNIX:
        assert isinstance(where, str)
        _remove_stale_socket(where)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(where)
        os.chmod(where, 0o660)
    else:
        assert isinstance(where, tuple)
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when
        # the socket says it is TCP, and without it every reply waited ~40 ms for an ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
