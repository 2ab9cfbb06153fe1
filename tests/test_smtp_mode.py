"""SMTP mode over real sockets: a client (smtplib) -> the gateway -> a real aiosmtpd next hop.

The gateway and the next hop share one event loop on a background thread; the tests
speak SMTP from the test thread, as a mail server in front of the gateway would.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import email.utils
import json
import logging
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiosmtpd.smtp import SMTP, LoginPassword, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

import milter.engine
from milter.engine import Scan
from milter.envelope import Envelope
from milter.followup import FollowUp
from milter.policy.loader import Rules
from milter.policy.schema import Action, ActionRule
from milter.smtp_mode import (
    SmtpGateway,
    SmtpModeConfig,
    Spool,
    _auth_user,
    format_reply,
)
from milter.smtp_tls import TlsSetupError, relay_tls_context, server_tls_context
from milter.store import Store
from milter.verdict import Verdict
from tests.conftest import REPO, fill_disk
from tests.mail import build
from tests.tls_certs import ServerCert, TestCA

T = TypeVar("T")

STAFF = "j.hughes@redborne.example"
STAFF2 = "a.patel@redborne.example"
OUTSIDER = "someone@elsewhere.example"
# The parents of tests/test_policy_table.py, listed in rules/directory.csv.
PARENTS = [
    "jane.taylor@gmail.example",
    "david.taylor@outlook.example",
    "anita.shah@yahoo.example",
    "raj.shah@btinternet.example",
    "claire.brown@hotmail.example",
]
REFERENCE = re.compile(r"RB-[0-9A-Z]{4}-[0-9A-Z]{4}")


def crlf(raw: bytes) -> bytes:
    """Mail on the wire has CRLF line ends; smtplib sends bytes as they are."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def body_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


class NextHop:
    """A real SMTP server standing in for the MTA's reinjection port; it keeps what it is given."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []
        # For each message received, the MAIL parameters it came with.
        self.mail_options: list[list[str]] = []
        self.data_reply: str | None = None
        self.refuse_rcpt: dict[str, str] = {}
        # Recipients refused only from the second time they are given (a next hop that changed
        # its mind between the gateway's recipient check and its relay of the message).
        self.refuse_rcpt_later: dict[str, str] = {}
        self.rcpt_seen: collections.Counter[str] = collections.Counter()
        # At most this many recipients per transaction (452 4.5.3 for the rest, RFC 5321 4.5.3.1.10).
        self.max_rcpt: int | None = None
        # When set, DATA is answered only once the gate opens: a message held in flight.
        self.gate: threading.Event | None = None
        # For each message received, the TLS version of its session ("TLSv1.3"), or None: plain text.
        self.tls: list[str | None] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        self.rcpt_seen[address] += 1
        if address in self.refuse_rcpt:
            return self.refuse_rcpt[address]
        if address in self.refuse_rcpt_later and self.rcpt_seen[address] > 1:
            return self.refuse_rcpt_later[address]
        if self.max_rcpt is not None and len(envelope.rcpt_tos) >= self.max_rcpt:
            return "452 4.5.3 Error: too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, 30)
        if self.data_reply:
            return self.data_reply
        assert envelope.mail_from is not None and envelope.original_content is not None
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        self.mail_options.append(list(envelope.mail_options))
        ssl_object = (
            server.transport.get_extra_info("ssl_object") if session.ssl and server.transport else None
        )
        self.tls.append(ssl_object.version() if ssl_object else None)
        return "250 2.0.0 Ok: queued as NEXT1"


class RawHop:
    """A next hop spoken to byte by byte, on a loop thread of its own: it keeps every command
    line and every message whose final dot arrived, and can be told to read messages slowly
    (read_rate), not to read them until `reading` is set, never to answer DATA, or to answer
    a final dot late."""

    def __init__(
        self, extensions: tuple[str, ...] = ("8BITMIME",), receive_buffer: int | None = None
    ) -> None:
        self.extensions = extensions
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []
        # Bytes received of each message whose connection ended before its final dot.
        self.cut_short: list[int] = []
        self.read_rate: float | None = None
        self.reading = threading.Event()
        self.reading.set()
        self.answer_data = True
        self.final_reply_delay = 0.0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        sock = socket.socket()
        if receive_buffer:  # inherited by accepted connections: the kernel buffers little
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        self.server = asyncio.run_coroutine_threadsafe(self._start(sock), self.loop).result(10)

    async def _start(self, sock: socket.socket) -> asyncio.Server:
        return await asyncio.start_server(self._serve, sock=sock)

    def data_commands(self) -> int:
        return sum(1 for line in self.commands if line.upper() == b"DATA")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 rawhop.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                self.commands.append(line.rstrip(b"\r\n"))
                verb = line[:4].upper()
                if verb == b"EHLO":
                    lines = [b"rawhop.test", *(e.encode() for e in self.extensions)]
                    writer.write(b"".join(b"250-" + x + b"\r\n" for x in lines[:-1]))
                    writer.write(b"250 " + lines[-1] + b"\r\n")
                elif verb == b"DATA":
                    if not self.answer_data:
                        await asyncio.sleep(60)
                    writer.write(b"354 go ahead\r\n")
                    if not await self._message(reader):
                        return
                    await asyncio.sleep(self.final_reply_delay)
                    writer.write(b"250 2.0.0 Ok: queued as RAW1\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _message(self, reader: asyncio.StreamReader) -> bool:
        data = bytearray()
        try:
            while not data.endswith(b"\r\n.\r\n"):
                if not self.reading.is_set():
                    await asyncio.to_thread(self.reading.wait, 30)
                chunk = await reader.read(4096 if self.read_rate else 65536)
                if not chunk:
                    break
                data += chunk
                if self.read_rate:
                    await asyncio.sleep(len(chunk) / self.read_rate)
        except ConnectionError:
            pass
        if data.endswith(b"\r\n.\r\n"):
            self.messages.append(bytes(data))
            return True
        self.cut_short.append(len(data))
        return False

    async def _stop(self) -> None:
        self.server.close()
        sessions = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)

    def close(self) -> None:
        self.reading.set()
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Running:
    """A gateway and its next hop, serving on a loop thread, bound to free loopback ports."""

    def __init__(
        self,
        rules: Rules | Callable[[], Rules],
        spool: Path,
        next_hop_down: bool = False,
        followup: FollowUp | None = None,
        next_hop_tls_context: ssl.SSLContext | None = None,
        next_hop_smtputf8: bool = False,
        hop_port: int | None = None,
        **config: Any,
    ) -> None:
        # The next hop offers STARTTLS with this; read for each connection, so a test can change it.
        self.next_hop_tls_context = next_hop_tls_context
        self.next_hop_smtputf8 = next_hop_smtputf8
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.next_hop = NextHop()
        self.next_hop_server: asyncio.Server | None = None
        if next_hop_down:
            hop_port = free_port()
        elif hop_port is None:  # else another next hop of the test's own (RawHop)
            self.next_hop_server = self.run(self._serve_next_hop())
            hop_port = int(self.next_hop_server.sockets[0].getsockname()[1])
        self.spool = spool
        self.config = SmtpModeConfig(
            listen_port=0, next_hop_port=hop_port, spool_dir=spool, hostname="gateway.test", **config
        )
        self.decisions: list[tuple[Verdict, Envelope, float]] = []
        self.scans: list[Scan] = []
        provider = rules if callable(rules) else (lambda: rules)
        self.gateway = SmtpGateway(self.config, provider, on_decision=self._decided, followup=followup)
        self.run(self.gateway.start())

    def _decided(self, verdict: Verdict, envelope: Envelope, seconds: float, scan: Scan) -> None:
        self.decisions.append((verdict, envelope, seconds))
        self.scans.append(scan)

    async def _serve_next_hop(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: SMTP(
                self.next_hop,
                hostname="nexthop.test",
                tls_context=self.next_hop_tls_context,
                enable_SMTPUTF8=self.next_hop_smtputf8,
                loop=loop,
            ),
            "127.0.0.1",
            0,
        )

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client(self, source: str = "127.0.0.1") -> smtplib.SMTP:
        client = smtplib.SMTP(
            "127.0.0.1",
            self.gateway.port,
            local_hostname="client.test",
            timeout=10,
            source_address=(source, 0),
        )
        client.ehlo()
        return client

    def send(
        self, raw: bytes, mail_from: str, rcpt_to: list[str], xforward: str | None = None
    ) -> tuple[int, str]:
        """One transaction; the DATA reply as (code, text), multi-line replies joined by newlines."""
        with self.client() as client:
            return transaction(client, raw, mail_from, rcpt_to, xforward)

    async def _close_next_hop(self) -> None:
        assert self.next_hop_server is not None
        self.next_hop_server.close()

    def files(self, folder: str) -> list[Path]:
        return sorted((self.spool / folder).iterdir())

    def close(self) -> None:
        self.run(self.gateway.stop())
        if self.next_hop_server is not None:
            # On the loop's own thread: asyncio servers are not thread-safe, and closing one
            # from here while a next-hop connection ends on the loop could wake its waiters
            # twice (a TypeError in Python 3.11's Server._wakeup, seen in a CI run).
            self.run(self._close_next_hop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def transaction(
    client: smtplib.SMTP, raw: bytes, mail_from: str, rcpt_to: list[str], xforward: str | None = None
) -> tuple[int, str]:
    if xforward:
        code, text = client.docmd("XFORWARD", xforward)
        assert code == 250, text
    code, text = client.mail(mail_from)
    assert code == 250, text
    for rcpt in rcpt_to:
        code, text = client.rcpt(rcpt)
        assert code == 250, text
    code, reply = client.data(crlf(raw))
    return code, reply.decode()


@pytest.fixture
def start(rules: Rules, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def _start(**kwargs: Any) -> Running:
        running = Running(kwargs.pop("rules", rules), tmp_path / "spool", **kwargs)
        started.append(running)
        return running

    yield _start
    for running in started:
        running.close()


@pytest.fixture
def gateway(start: Callable[..., Running]) -> Running:
    return start()


@pytest.fixture
def raw_hop() -> Iterator[Callable[..., RawHop]]:
    started: list[RawHop] = []

    def _raw_hop(**kwargs: Any) -> RawHop:
        hop = RawHop(**kwargs)
        started.append(hop)
        return hop

    yield _raw_hop
    for hop in started:
        hop.close()


def wait_until(condition: Callable[[], object], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def big_message(megabytes: float) -> bytes:
    """Clean mail of about this size, in long lines (fewer for aiosmtpd to read one by one)."""
    line = b"Minutes of the meeting, item by item. " * 24 + b"\r\n"
    head = crlf(build(STAFF, STAFF2, "Minutes", None)).rstrip(b"\r\n") + b"\r\n\r\n"
    return head + line * int(megabytes * 1_000_000 / len(line))


# --- what each verdict does ----------------------------------------------------------------


def test_clean_mail_is_relayed_with_the_policy_header_and_the_body_unchanged(gateway: Running) -> None:
    raw = crlf(build(STAFF, STAFF2, "Rota", "Hello,\n\n.Dots at line starts survive.\nSee you tomorrow.\n"))

    code, reply = gateway.send(raw, STAFF, [STAFF2])

    assert code == 250, reply
    assert "queued as NEXT1" in reply
    reference = REFERENCE.search(reply)
    assert reference
    [(mail_from, rcpts, relayed)] = gateway.next_hop.received
    assert (mail_from, rcpts) == (STAFF, [STAFF2])
    assert f"X-School-Policy: accept; ref={reference.group()}; direction=internal".encode() in relayed
    assert body_of(relayed) == body_of(raw)
    assert gateway.files("incoming") == [] and gateway.files("tmp") == []
    [(verdict, envelope, seconds)] = gateway.decisions
    assert verdict.action is Action.ACCEPT and verdict.reference == reference.group()
    assert envelope.client_address == "127.0.0.1" and envelope.helo == "client.test"
    assert envelope.mail_from == STAFF and envelope.rcpt_to == (STAFF2,)
    assert 0 < seconds < 5
    # The hook also gets the scan, for the decision line's size and findings.
    [scan] = gateway.scans
    assert scan.verdict is verdict and scan.message.size >= len(raw) > 0


def test_a_bounce_keeps_its_null_sender(gateway: Running) -> None:
    raw = build(
        "MAILER-DAEMON@redborne.example", STAFF2, "Undelivered Mail", "The message could not be sent."
    )

    code, reply = gateway.send(raw, "", [STAFF2])

    assert code == 250, reply
    [(mail_from, rcpts, _)] = gateway.next_hop.received
    assert (mail_from, rcpts) == ("<>", [STAFF2])  # aiosmtpd's spelling of the null sender
    assert gateway.decisions[0][1].mail_from == ""


def test_obscene_mail_from_staff_is_refused_with_the_clause_and_nothing_relayed(gateway: Running) -> None:
    raw = build(STAFF, OUTSIDER, "Re: late delivery", "Your van was late again and you are all sh1t.")

    code, reply = gateway.send(raw, STAFF, [OUTSIDER])

    assert code == 550
    assert reply.startswith("5.7.1 Message refused under clause 5.5")
    # Multi-line: the reference on its own line, every line with the enhanced code.
    lines = reply.splitlines()
    assert len(lines) == 2 and all(line.startswith("5.7.1 ") for line in lines)
    assert REFERENCE.fullmatch(lines[1].removeprefix("5.7.1 Reference ").rstrip("."))
    assert gateway.next_hop.received == []
    assert gateway.files("incoming") == [] and gateway.files("quarantine") == []
    assert gateway.decisions[0][0].action is Action.REJECT


def test_shouting_is_relayed_with_a_subject_prefix(gateway: Running) -> None:
    raw = build(
        STAFF,
        STAFF2,
        "WHO TOOK THE HISTORY PROJECTOR AGAIN",
        "I NEED IT BACK IN ROOM 14 BEFORE PERIOD THREE OR THE YEAR NINE LESSON ON THE TUDORS "
        "CANNOT GO AHEAD.\n",
    )

    code, reply = gateway.send(raw, STAFF, [STAFF2])

    assert code == 250, reply
    [(_, _, relayed)] = gateway.next_hop.received
    assert b"\r\nSubject: [Shouting] WHO TOOK THE HISTORY PROJECTOR AGAIN\r\n" in relayed
    assert b"X-School-Policy: tag;" in relayed
    assert body_of(relayed) == body_of(crlf(raw))


def test_a_parent_mailing_with_every_parent_visible_is_refused(gateway: Running) -> None:
    raw = build("office@redborne.example", PARENTS, "Trip", "Consent forms by Friday.")

    code, reply = gateway.send(raw, "office@redborne.example", PARENTS)

    assert code == 550
    assert "Appendix 1" in reply and "Bcc" in reply and REFERENCE.search(reply)
    assert gateway.next_hop.received == []


def test_inbound_obscene_mail_is_held_in_quarantine(gateway: Running) -> None:
    raw = build(OUTSIDER, STAFF, "hello", "You are a fucking idiot.")

    # Postfix in front of the gateway tells it who the real client was.
    code, reply = gateway.send(
        raw, OUTSIDER, [STAFF], xforward="NAME=mail.elsewhere.example ADDR=203.0.113.9 HELO=elsewhere.example"
    )

    assert code == 250
    assert reply.startswith("2.0.0 Held for review, reference RB-")
    reference = REFERENCE.search(reply)
    assert reference
    held = gateway.spool / "quarantine" / f"{reference.group()}.eml"
    assert held.read_bytes() == crlf(raw)
    record = json.loads(held.with_suffix(".json").read_text())
    assert record["verdict"]["action"] == "quarantine"
    assert record["verdict"]["direction"] == "inbound"
    assert record["envelope"]["client_address"] == "203.0.113.9"
    assert record["envelope"]["client_name"] == "mail.elsewhere.example"
    assert record["envelope"]["rcpt_to"] == [STAFF]
    assert gateway.next_hop.received == []
    assert gateway.files("incoming") == []


def test_with_a_store_held_mail_goes_to_the_quarantine_store(
    start: Callable[..., Running], tmp_path: Path
) -> None:
    store = Store(f"sqlite:///{tmp_path}/q.db")
    gateway = start(followup=FollowUp(store, None))
    raw = build(OUTSIDER, STAFF, "hello", "You are a fucking idiot.")
    code, reply = gateway.send(
        raw, OUTSIDER, [STAFF], xforward="NAME=mail.elsewhere.example ADDR=203.0.113.9"
    )
    assert code == 250
    reference = REFERENCE.search(reply)
    assert reference
    record = store.get(reference.group())
    assert record.direction == "inbound" and record.recipients == (STAFF,)
    # Kept as it would be delivered on release: the gateway's result headers on top.
    body = store.body(reference.group(), "tech", "test")
    assert body.endswith(crlf(raw))
    assert body.startswith(b"X-School-Policy-Findings: ") or body.startswith(b"X-School-Policy: ")
    assert f"X-School-Policy: quarantine; ref={reference.group()}".encode() in body
    assert gateway.files("quarantine") == [] and gateway.files("incoming") == []
    assert gateway.next_hop.received == []
    store.close()


def test_discard_answers_250_and_drops_the_message(start: Callable[..., Running], rules: Rules) -> None:
    # No example rule discards; a table that discards every finding stands in for one.
    policy = rules.policy.model_copy(update={"actions": [ActionRule(action=Action.DISCARD)]})
    gateway = start(rules=dataclasses.replace(rules, policy=policy))
    raw = build(
        STAFF, STAFF2, "THIS IS IMPORTANT", "PLEASE READ THIS BEFORE THE STAFF MEETING ON MONDAY MORNING."
    )

    code, _ = gateway.send(raw, STAFF, [STAFF2])

    assert code == 250
    assert gateway.next_hop.received == [] and gateway.files("incoming") == []
    assert gateway.decisions[0][0].action is Action.DISCARD


# --- the wire: XFORWARD, limits, timeouts ---------------------------------------------------


def test_xforward_lasts_one_transaction(gateway: Running) -> None:
    with gateway.client() as client:
        assert "xforward" in client.esmtp_features
        transaction(client, build(STAFF, STAFF2), STAFF, [STAFF2], xforward="ADDR=203.0.113.9 IDENT=4F2A1")
        transaction(client, build(STAFF, STAFF2), STAFF, [STAFF2])
    first, second = (envelope for _, envelope, _ in gateway.decisions)
    assert (first.client_address, first.queue_id) == ("203.0.113.9", "4F2A1")
    assert (second.client_address, second.queue_id) == ("127.0.0.1", None)


def test_xforward_from_an_unlisted_client_is_refused(start: Callable[..., Running]) -> None:
    gateway = start(xforward_hosts=("10.9.9.9/32",))
    with gateway.client() as client:
        assert "xforward" not in client.esmtp_features
        code, text = client.docmd("XFORWARD", "ADDR=203.0.113.9")
    assert code == 550 and b"5.7.0" in text


def test_an_oversized_message_is_refused_with_552(start: Callable[..., Running]) -> None:
    gateway = start(max_message_bytes=2_000)
    raw = crlf(build(STAFF, STAFF2, "Big", ("x" * 70 + "\n") * 60))

    # A client that declares the size is refused at MAIL FROM ...
    with pytest.raises(smtplib.SMTPSenderRefused) as declared, gateway.client() as client:
        client.sendmail(STAFF, [STAFF2], raw)
    assert declared.value.smtp_code == 552 and declared.value.smtp_error.startswith(b"5.3.4")
    # ... one that does not, after DATA.
    code, reply = gateway.send(raw, STAFF, [STAFF2])
    assert code == 552 and reply.startswith("5.3.4 Message too big")
    assert gateway.next_hop.received == [] and gateway.files("incoming") == []


def test_a_client_that_says_nothing_is_told_421_and_dropped_after_the_timeout(
    start: Callable[..., Running],
) -> None:
    gateway = start(timeout_seconds=0.3)
    with socket.create_connection(("127.0.0.1", gateway.gateway.port), timeout=5) as sock:
        assert sock.recv(1024).startswith(b"220 gateway.test")
        started = time.monotonic()
        # Told why (RFC 5321 3.8), so it knows to come back, then closed by the gateway.
        assert sock.recv(1024) == b"421 4.4.2 gateway.test Error: timeout exceeded\r\n"
        assert sock.recv(1024) == b""
        assert time.monotonic() - started < 3


def test_a_slow_but_steady_client_is_not_cut_off_mid_message(start: Callable[..., Running]) -> None:
    gateway = start(timeout_seconds=0.6)
    raw = crlf(build(STAFF, STAFF2, "Rota", "".join(f"Line {n} of the rota.\n" for n in range(8))))
    with gateway.client() as client:
        client.mail(STAFF)
        client.rcpt(STAFF2)
        assert client.docmd("DATA")[0] == 354
        started = time.monotonic()
        # A piece every 0.2 s for 1.6 s: never idle for the timeout, though the whole message
        # takes more than twice as long.
        step = len(raw) // 8 + 1
        for start_at in range(0, len(raw), step):
            client.send(raw[start_at : start_at + step])
            time.sleep(0.2)
        client.send(b".\r\n")
        code, reply = client.getreply()
        assert time.monotonic() - started > 1.5
    assert code == 250, reply
    [(_, _, relayed)] = gateway.next_hop.received
    assert body_of(relayed) == body_of(raw)


def test_a_client_that_stops_mid_message_is_told_421_and_nothing_is_kept(
    start: Callable[..., Running],
) -> None:
    gateway = start(timeout_seconds=0.3)
    with gateway.client() as client:
        client.mail(STAFF)
        client.rcpt(STAFF2)
        assert client.docmd("DATA")[0] == 354
        client.send(b"Subject: Rota\r\n\r\nThe first half of a message")
        assert client.getreply() == (421, b"4.4.2 gateway.test Error: timeout exceeded")
    assert gateway.next_hop.received == [] and gateway.files("incoming") == []


def test_a_client_that_hangs_up_after_its_final_dot_leaves_nothing_behind(
    gateway: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The spool write is still going when the client's hang-up cancels the message's handling.
    real_receive = Spool.receive
    writing = threading.Event()

    def slow_receive(spool: Spool, reference: str, raw: bytes) -> Path:
        writing.set()
        time.sleep(0.5)
        return real_receive(spool, reference, raw)

    monkeypatch.setattr(Spool, "receive", slow_receive)
    with caplog.at_level(logging.INFO, logger="milter.smtp_mode"):
        with gateway.client() as client:
            client.mail(STAFF)
            client.rcpt(STAFF2)
            assert client.docmd("DATA")[0] == 354
            client.send(crlf(build(STAFF, STAFF2, "Rota", "Hello")) + b".\r\n")
            assert writing.wait(5)
            client.sock.shutdown(socket.SHUT_RDWR)  # gone before hearing 250
        wait_until(lambda: any(getattr(r, "event", None) == "client_gone" for r in caplog.records))
        time.sleep(0.2)

    # The client never heard 250, so it still has the message: no copy is kept or delivered.
    assert gateway.files("incoming") == [] and gateway.files("tmp") == []
    assert gateway.next_hop.received == [] and gateway.decisions == []
    [gone] = [r for r in caplog.records if getattr(r, "event", None) == "client_gone"]
    assert REFERENCE.search(gone.getMessage()) and STAFF not in gone.getMessage()


def test_connections_over_the_limit_are_told_to_come_back(start: Callable[..., Running]) -> None:
    gateway = start(max_connections=1)
    with socket.create_connection(("127.0.0.1", gateway.gateway.port), timeout=5) as first:
        assert first.recv(1024).startswith(b"220 ")
        with socket.create_connection(("127.0.0.1", gateway.gateway.port), timeout=5) as second:
            assert second.recv(1024).startswith(b"421 4.7.0")


# --- SMTPUTF8, DSN, AUTH, Received ----------------------------------------------------------

UTF8_SENDER = "müller@redborne.example"
UTF8_RECIPIENT = "josé@redborne.example"


def utf8_client(gateway: Running) -> smtplib.SMTP:
    client = gateway.client()
    client.command_encoding = "utf-8"  # smtplib's own choice only inside sendmail()
    return client


def test_utf8_addresses_are_taken_with_smtputf8_and_passed_on(start: Callable[..., Running]) -> None:
    gateway = start(next_hop_smtputf8=True)
    raw = crlf(build(UTF8_SENDER, UTF8_RECIPIENT, "Café", "Bonjour")).replace(
        b"Subject: =?utf-8?q?Caf=C3=A9?=", "Subject: Café".encode()
    )
    assert "Subject: Café".encode() in raw

    with utf8_client(gateway) as client:
        assert client.has_extn("smtputf8")
        assert client.mail(UTF8_SENDER, ["SMTPUTF8", "BODY=8BITMIME"])[0] == 250
        assert client.rcpt(UTF8_RECIPIENT)[0] == 250
        code, reply = client.data(raw)

    assert code == 250, reply
    [(mail_from, rcpts, relayed)] = gateway.next_hop.received
    assert (mail_from, rcpts) == (UTF8_SENDER, [UTF8_RECIPIENT])
    assert "SMTPUTF8" in gateway.next_hop.mail_options[0]
    assert "Subject: Café".encode() in relayed


def test_utf8_needed_and_the_next_hop_without_smtputf8_is_refused_as_postfix_would(
    gateway: Running,
) -> None:
    with utf8_client(gateway) as client:
        # A UTF-8 address without declaring SMTPUTF8 (RFC 6531 3.4).
        assert client.docmd("MAIL", f"FROM:<{UTF8_SENDER}>") == (
            553,
            b"5.6.7 Must declare SMTPUTF8 to send unicode address",
        )
        # Declared, but the next hop cannot take a UTF-8 address: refused for that recipient.
        assert client.mail(STAFF, ["SMTPUTF8"])[0] == 250
        code, text = client.rcpt(UTF8_RECIPIENT)
        assert (code, text.split(b"\n")[0]) == (
            553,
            b"5.6.7 SMTPUTF8 is required, but was not offered by the next hop",
        )
        assert client.rcpt(STAFF2)[0] == 250
        # ASCII addresses but a UTF-8 header: refused after DATA, as Postfix bounces it.
        utf8_header = crlf(build(STAFF, STAFF2, "Rota", "Hello")).replace(
            b"Subject: Rota", "Subject: Caf\u00e9".encode()
        )
        code, reply = client.data(utf8_header)
        assert code == 554 and reply.startswith(b"5.6.7 SMTPUTF8 is required, but was not offered"), reply
        # Declared but not needed (all ASCII): relayed without it.
        assert transaction_with(client, ["SMTPUTF8"], crlf(build(STAFF, STAFF2, "Rota", "Hello")))[0] == 250
    [(_, rcpts, _)] = gateway.next_hop.received
    assert rcpts == [STAFF2] and "SMTPUTF8" not in gateway.next_hop.mail_options[0]


def transaction_with(client: smtplib.SMTP, mail_options: list[str], raw: bytes) -> tuple[int, bytes]:
    assert client.mail(STAFF, mail_options)[0] == 250
    assert client.rcpt(STAFF2)[0] == 250
    return client.data(raw)


def test_dsn_parameters_are_taken_and_passed_on_to_a_next_hop_that_offers_dsn(
    start: Callable[..., Running], raw_hop: Callable[..., RawHop]
) -> None:
    hop = raw_hop(extensions=("8BITMIME", "DSN", "SIZE 100000000"))
    gateway = start(hop_port=hop.port)
    raw = crlf(build(STAFF, STAFF2, "Rota", "Hello"))

    with gateway.client() as client:
        assert client.mail(STAFF, ["RET=HDRS", "ENVID=QQ+2B314", "AUTH=<>"])[0] == 250
        assert (
            client.rcpt(STAFF2, ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;A.Patel@redborne.example"])[0] == 250
        )
        code, reply = client.data(raw)
        assert code == 250, reply
        # Once the next hop has been seen to offer DSN, so does the gateway.
        client.ehlo()
        assert client.has_extn("dsn")
        # A parameter that is not what RFC 3461 says is refused, not passed on.
        client.rset()
        assert client.mail(STAFF)[0] == 250
        assert client.rcpt(STAFF2, ["NOTIFY=SOMETIMES"]) == (501, b"5.5.4 Bad NOTIFY parameter")

    relayed = hop.commands[hop.commands.index(b"DATA") - 2 :][:2]
    assert relayed == [
        f"MAIL FROM:<{STAFF}> SIZE={len(hop.messages[0]) - 3} RET=HDRS ENVID=QQ+2B314".encode(),
        f"RCPT TO:<{STAFF2}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A.Patel@redborne.example".encode(),
    ]


def test_dsn_and_auth_parameters_are_taken_when_the_next_hop_does_not_offer_dsn(gateway: Running) -> None:
    with gateway.client() as client:
        assert not client.has_extn("dsn")  # the next hop does not offer it
        assert client.mail(STAFF, ["RET=FULL", "ENVID=abc", "AUTH=<>"])[0] == 250
        assert client.rcpt(STAFF2, ["NOTIFY=NEVER"])[0] == 250
        code, reply = client.data(crlf(build(STAFF, STAFF2, "Rota", "Hello")))
    # Relayed without them: this next hop would refuse them (555).
    assert code == 250, reply
    assert len(gateway.next_hop.received) == 1


def test_relayed_mail_gets_a_received_line_on_top(gateway: Running) -> None:
    raw = crlf(build(STAFF, STAFF2, "Rota", "Hello"))

    code, reply = gateway.send(raw, STAFF, [STAFF2])

    assert code == 250, reply
    [(_, _, relayed)] = gateway.next_hop.received
    reference = gateway.decisions[0][0].reference
    trace = re.match(
        rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
        rb"\tby gateway\.test \(school-milter\) with ESMTP id (RB-[0-9A-Z]{4}-[0-9A-Z]{4});\r\n"
        rb"\t([^\r\n]+)\r\n",
        relayed,
    )
    assert trace, relayed[:300]
    assert trace.group(1).decode() == reference
    stamped = email.utils.parsedate_to_datetime(trace.group(2).decode())
    assert abs(stamped.timestamp() - time.time()) < 60
    # Then the policy header and the message as it was sent.
    policy_header, _, rest = relayed[trace.end() :].partition(b"\r\n")
    assert policy_header.startswith(b"X-School-Policy: accept;") and rest == raw


# --- nothing is lost --------------------------------------------------------------------------


def test_next_hop_down_is_a_temporary_failure(start: Callable[..., Running]) -> None:
    gateway = start(next_hop_down=True, relay_connect_timeout_seconds=2)
    raw = build(STAFF, STAFF2, "Rota", "Hello")

    code, reply = gateway.send(raw, STAFF, [STAFF2])

    assert code == 451 and reply.startswith("4.4.1 Next hop unavailable")
    assert gateway.decisions[0][0].reference in reply
    # The client was told to retry, so it keeps the message; the spool keeps no copy.
    assert gateway.files("incoming") == [] and gateway.files("failed") == []


@pytest.mark.parametrize(
    ("data_reply", "expect"),
    [
        ("554 5.7.1 Rejected by the next hop", (554, "5.7.1 Rejected by the next hop")),
        ("452 4.3.1 Insufficient system storage", (452, "4.3.1 Insufficient system storage")),
    ],
)
def test_a_next_hop_refusal_of_the_message_is_passed_back(
    gateway: Running, data_reply: str, expect: tuple[int, str]
) -> None:
    gateway.next_hop.data_reply = data_reply

    code, reply = gateway.send(build(STAFF, STAFF2, "Rota", "Hello"), STAFF, [STAFF2])

    assert (code, reply[: len(expect[1])]) == expect
    assert REFERENCE.search(reply.splitlines()[-1])
    assert gateway.next_hop.received == []


# --- a slow or stuck next hop: a timeout for each stage, never a duplicate ---------------------


def test_a_next_hop_that_stops_taking_the_message_never_gets_it_and_the_client_retries(
    start: Callable[..., Running], raw_hop: Callable[..., RawHop]
) -> None:
    # A next hop that takes the first few MB (kernel buffers) and then nothing more.
    hop = raw_hop(receive_buffer=16384)
    hop.reading.clear()
    gateway = start(hop_port=hop.port, relay_stall_timeout_seconds=0.5, relay_final_reply_timeout_seconds=2)
    # More than the kernel can buffer on the gateway's side (tcp_wmem's maximum, 4 MB here).
    send_buffer = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    raw = big_message(max(6, (send_buffer + 2_000_000) / 1_000_000))

    started = time.monotonic()
    code, reply = gateway.send(raw, STAFF, [STAFF2])

    # Given up after the stall, not after a total time; the client keeps the message.
    assert code == 451 and reply.startswith("4.4.2 Next hop too slow"), reply
    assert time.monotonic() - started < 10
    # The next hop wakes up and reads all it was ever sent: never the rest nor the final dot,
    # so the client's retry will be the only copy delivered.
    hop.reading.set()
    wait_until(lambda: hop.messages or hop.cut_short, timeout=10)
    assert hop.messages == [] and hop.cut_short[0] < len(raw)
    assert gateway.files("incoming") == []


def test_a_next_hop_slow_to_read_and_to_answer_gets_the_message_once(
    start: Callable[..., Running], raw_hop: Callable[..., RawHop]
) -> None:
    # It reads 300 KB at 200 KB/s, then answers the final dot a second later: far longer than
    # any one command may take, but it never stops making progress.
    hop = raw_hop()
    hop.read_rate = 200_000
    hop.final_reply_delay = 1.0
    gateway = start(hop_port=hop.port, relay_command_timeout_seconds=0.3, relay_stall_timeout_seconds=0.5)
    raw = big_message(0.3)

    started = time.monotonic()
    code, reply = gateway.send(raw, STAFF, [STAFF2])

    assert code == 250 and "queued as RAW1" in reply, reply
    assert time.monotonic() - started > 1.5
    [message] = hop.messages
    assert message.endswith(body_of(raw) + b".\r\n")


def test_the_client_hears_its_answer_by_the_reply_deadline_whatever_the_next_hop_does(
    start: Callable[..., Running], raw_hop: Callable[..., RawHop], caplog: pytest.LogCaptureFixture
) -> None:
    # The next hop takes the message but answers its final dot after 3 s; the client (Postfix:
    # smtp_data_done_timeout) would give up before that, so the gateway answers first.
    hop = raw_hop()
    hop.final_reply_delay = 3.0
    gateway = start(hop_port=hop.port, relay_command_timeout_seconds=0.2, reply_deadline_seconds=1.0)

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="milter.smtp_mode"):
        code, reply = gateway.send(build(STAFF, STAFF2, "Rota", "Hello"), STAFF, [STAFF2])

    assert code == 451 and reply.startswith("4.4.2 No answer from the next hop"), reply
    assert 0.9 < time.monotonic() - started < 2.5
    # The one case where a retry may be a second copy: said so in the log, with the reference.
    [warning] = [r for r in caplog.records if getattr(r, "event", None) == "relay_unconfirmed"]
    assert gateway.decisions[0][0].reference in warning.getMessage()
    assert "delivered twice" in warning.getMessage()


def test_a_next_hop_that_never_answers_data_is_given_up_on_after_the_command_timeout(
    start: Callable[..., Running], raw_hop: Callable[..., RawHop]
) -> None:
    hop = raw_hop()
    hop.answer_data = False
    gateway = start(hop_port=hop.port, relay_command_timeout_seconds=0.5)

    started = time.monotonic()
    code, reply = gateway.send(build(STAFF, STAFF2, "Rota", "Hello"), STAFF, [STAFF2])

    assert code == 451 and reply.startswith("4.4.2 Next hop too slow"), reply
    assert time.monotonic() - started < 2
    assert hop.messages == []


# --- recipients the next hop refuses ------------------------------------------------------------

UNKNOWN = "nobody@redborne.example"
BUSY = "busy@redborne.example"


def test_each_recipient_the_next_hop_refuses_is_refused_alone_and_the_others_get_the_message_once(
    gateway: Running,
) -> None:
    gateway.next_hop.refuse_rcpt = {UNKNOWN: "550 5.1.1 User unknown", BUSY: "450 4.2.1 Mailbox busy"}

    with gateway.client() as client:
        # The client hears the next hop's answer for each recipient, as an MTA needs to bounce
        # the unknown one, retry the busy one later, and deliver the message to the rest now.
        refused = client.sendmail(STAFF, [STAFF2, UNKNOWN, BUSY], crlf(build(STAFF, STAFF2, "Rota", "Hello")))

    assert refused == {
        UNKNOWN: (550, b"5.1.1 User unknown\n5.1.1 (from the next hop)"),
        BUSY: (450, b"4.2.1 Mailbox busy\n4.2.1 (from the next hop)"),
    }
    [(_, rcpts, _)] = gateway.next_hop.received
    assert rcpts == [STAFF2]
    assert gateway.decisions[0][1].rcpt_to == (STAFF2,)


def test_too_many_recipients_for_the_next_hop_go_in_further_transactions(gateway: Running) -> None:
    gateway.next_hop.max_rcpt = 2
    parents = list(PARENTS)
    raw = crlf(build("office@redborne.example", "undisclosed-recipients:;", "Trip", "Forms by Friday."))

    # An MTA sends the recipients refused with 452 again in a further transaction (RFC 5321
    # 4.5.3.1.10), each transaction taking what the next hop can.
    with gateway.client() as client:
        pending = parents
        for _ in range(3):
            refused = client.sendmail("office@redborne.example", pending, raw)
            assert all(code == 452 and text.startswith(b"4.5.3 ") for code, text in refused.values())
            pending = [r for r in pending if r in refused]
        assert pending == []

    assert [rcpts for _, rcpts, _ in gateway.next_hop.received] == [parents[0:2], parents[2:4], parents[4:5]]


def test_when_the_next_hop_refuses_some_recipients_only_on_relay_nothing_is_sent_until_the_retry(
    gateway: Running,
) -> None:
    # The recipient check takes it, the relay after DATA is refused: one DATA reply cannot say
    # "delivered to some", so nothing is sent and the client retries all of them.
    gateway.next_hop.refuse_rcpt_later = {UNKNOWN: "550 5.1.1 User unknown"}
    raw = build(STAFF, [STAFF2, UNKNOWN], "Rota", "Hello")

    code, reply = gateway.send(raw, STAFF, [STAFF2, UNKNOWN])

    assert code == 451 and reply.startswith("4.4.0 The next hop refused some recipients"), reply
    assert REFERENCE.search(reply) and gateway.next_hop.received == []
    # The retry is checked recipient by recipient again: the unknown one is refused alone.
    with gateway.client() as client:
        refused = client.sendmail(STAFF, [STAFF2, UNKNOWN], crlf(raw))
    assert list(refused) == [UNKNOWN] and refused[UNKNOWN][0] == 550
    assert [rcpts for _, rcpts, _ in gateway.next_hop.received] == [[STAFF2]]


def test_recipients_every_one_refused_on_relay_get_the_next_hops_answer(gateway: Running) -> None:
    gateway.next_hop.refuse_rcpt_later = {UNKNOWN: "550 5.1.1 User unknown"}

    code, reply = gateway.send(build(STAFF, UNKNOWN, "Rota", "Hello"), STAFF, [UNKNOWN])

    assert code == 550 and reply.startswith("5.1.1 User unknown"), reply
    assert gateway.next_hop.received == []


def test_an_engine_crash_is_451_and_the_message_kept_in_failed(
    gateway: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("message text must not reach the log")

    monkeypatch.setattr(milter.engine, "scan", crash)
    raw = crlf(build(STAFF, STAFF2, "Rota", "Hello"))

    code, reply = gateway.send(raw, STAFF, [STAFF2])

    assert code == 451 and reply.startswith("4.3.0 Temporary problem in the mail gateway")
    reference = REFERENCE.search(reply)
    assert reference
    kept = gateway.spool / "failed" / f"{reference.group()}.eml"
    assert kept.read_bytes() == raw
    record = json.loads(kept.with_suffix(".json").read_text())
    assert (record["stage"], record["error"]) == ("scan", "RuntimeError")
    assert gateway.next_hop.received == [] and gateway.decisions == []


def test_a_crashing_detector_makes_the_verdict_a_tempfail(
    gateway: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object) -> list[object]:
        raise RuntimeError("boom")

    monkeypatch.setattr(milter.engine, "active", lambda rules: [("obscene_language", crash)])

    code, reply = gateway.send(build(STAFF, STAFF2, "Rota", "Hello"), STAFF, [STAFF2])

    assert code == 451 and reply.startswith("4.3.0 Temporary problem while checking this message")
    assert gateway.decisions[0][0].failed_checks == ("obscene_language",)
    assert gateway.next_hop.received == []


def test_rules_that_cannot_be_had_are_a_temporary_failure(start: Callable[..., Running]) -> None:
    def no_rules() -> Rules:
        raise OSError("rules directory gone")

    gateway = start(rules=no_rules)

    code, reply = gateway.send(build(STAFF, STAFF2), STAFF, [STAFF2])

    assert code == 451 and REFERENCE.search(reply)


def test_stop_lets_a_message_being_scanned_finish(gateway: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    real_scan = milter.engine.scan
    scanning = threading.Event()

    def slow_scan(*args: Any, **kwargs: Any) -> milter.engine.Scan:
        scanning.set()
        time.sleep(0.3)
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(milter.engine, "scan", slow_scan)
    result: list[tuple[int, str]] = []
    closing: list[int] = []

    def send() -> None:
        client = gateway.client()
        result.append(transaction(client, build(STAFF, STAFF2), STAFF, [STAFF2]))
        closing.append(client.getreply()[0])
        client.close()

    sender = threading.Thread(target=send)
    sender.start()
    assert scanning.wait(5)

    gateway.run(gateway.gateway.stop())
    sender.join(5)

    assert result and result[0][0] == 250
    assert len(gateway.next_hop.received) == 1
    # Once its message is done the connection is closed with 421, not left open.
    assert closing == [421]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gateway.gateway.port), timeout=1).close()


def test_stop_waits_only_the_grace_for_a_stuck_relay_and_the_next_hop_never_gets_it(
    start: Callable[..., Running], raw_hop: Callable[..., RawHop]
) -> None:
    hop = raw_hop()
    hop.answer_data = False  # the relay waits for 354 (a minute, by default)
    gateway = start(hop_port=hop.port, stop_grace_seconds=0.5)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        sending = pool.submit(gateway.send, build(STAFF, STAFF2, "Rota", "Hello"), STAFF, [STAFF2])
        wait_until(lambda: hop.data_commands())
        started = time.monotonic()
        gateway.run(gateway.gateway.stop())
        stopped = time.monotonic() - started
        # The client is told to come back rather than left waiting; it keeps the message.
        code, reply = sending.result(5)
    assert 0.4 < stopped < 2
    assert code == 421 and reply.startswith("4.3.2 gateway.test Service shutting down"), reply
    assert hop.messages == [] and gateway.files("incoming") == []


def test_the_daemon_takes_the_relay_timeouts_and_shutdown_grace_from_its_config_file(
    rules_dir: Path, tmp_path: Path, raw_hop: Callable[..., RawHop]
) -> None:
    hop = raw_hop()
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        "[gateway]\n"
        f'rules = "{rules_dir}"\n'
        'milter = ""\n'
        f'smtp = "127.0.0.1:{port}"\n'
        f'next_hop = "127.0.0.1:{hop.port}"\n'
        f'spool = "{tmp_path / "spool"}"\n'
        'database = ""\n'
        'metrics = ""\n'
        f'reinject = "127.0.0.1:{free_port()}"\n'
        "workers = 1\n"
        "next_hop_command_timeout = 0.5\n"
        "shutdown_grace = 1.0\n"
    )
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "milter", "serve", "--config", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def events() -> list[str]:
        lines = log_path.read_text().splitlines()
        return [str(json.loads(line).get("event")) for line in lines if line.startswith("{")]

    def send() -> tuple[int, str]:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
            client.ehlo()
            return transaction(client, build(STAFF, STAFF2, "Rota", "Hello"), STAFF, [STAFF2])

    try:
        wait_until(lambda: "ready" in events(), timeout=30)
        # next_hop_command_timeout: a next hop that never answers DATA is given up on at once.
        hop.answer_data = False
        started = time.monotonic()
        code, reply = send()
        assert code == 451 and reply.startswith("4.4.2 Next hop too slow"), reply
        assert time.monotonic() - started < 3

        # shutdown_grace: SIGTERM while a relay waits for the next hop's final reply.
        hop.answer_data = True
        hop.final_reply_delay = 30
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            sending = pool.submit(send)
            wait_until(lambda: hop.messages)
            started = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            code, reply = sending.result(20)
            told = time.monotonic() - started
        assert code == 421 and reply.startswith("4.3.2"), reply
        assert 0.8 < told < 4
        # And it leaves within the grace, before its watchdog would kill it (grace + 15 s).
        assert daemon.wait(10) == 0
        # The next hop had the final dot: the one case that is logged as a possible duplicate.
        assert "relay_unconfirmed" in events()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


# --- one spool shared by worker processes -----------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_a_starting_worker_counts_only_what_dead_processes_left_and_moves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert spool.prepare() == 0
    sibling = subprocess.Popen(["sleep", "60"])  # a live worker sharing the spool
    try:
        files = {
            f"RB-AAAA-AAAA.{sibling.pid}.eml": b"being handled by a live worker",
            f"RB-BBBB-BBBB.{dead_pid()}.eml": b"left by a worker that was killed",
            f"RB-CCCC-CCCC.{os.getpid()}.eml": b"left by an earlier process that had our pid",
            "RB-DDDD-DDDD.eml": b"left by an older gateway (no pid in the name)",
        }
        for name, data in files.items():
            (spool.incoming / name).write_bytes(data)
        (spool.tmp / f"RB-EEEE-EEEE.{sibling.pid}.eml").write_bytes(b"being written")

        assert spool.prepare() == 3

        # Counted, not touched: every file is where it was, as it was.
        assert {p.name: p.read_bytes() for p in spool.incoming.iterdir()} == files
        assert [p.name for p in spool.tmp.iterdir()] == [f"RB-EEEE-EEEE.{sibling.pid}.eml"]
        sibling.kill()
        sibling.wait()
        assert spool.prepare() == 4, "once the sibling is gone its message is left over too"
    finally:
        sibling.kill()
        sibling.wait()


def test_messages_left_over_are_reported_at_start_and_kept(
    start: Callable[..., Running], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True)
    left = incoming / f"RB-BBBB-BBBB.{dead_pid()}.eml"
    left.write_bytes(crlf(build(STAFF, STAFF2)))

    with caplog.at_level(logging.WARNING, logger="milter.smtp_mode"):
        gateway = start()
    [warning] = [r for r in caplog.records if getattr(r, "event", None) == "spool_left_over"]
    assert getattr(warning, "count", None) == 1 and "were not told 250" in warning.getMessage()

    gate = gateway.next_hop.gate = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            sending = pool.submit(gateway.send, build(STAFF, STAFF2, "Rota", "Hello"), STAFF, [STAFF2])
            # While this process handles a message, its spool file carries its pid.
            deadline = time.monotonic() + 5
            while len(gateway.files("incoming")) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            [mine] = [p for p in gateway.files("incoming") if p != left]
            assert mine.name.endswith(f".{os.getpid()}.eml")
        finally:
            gate.set()
        assert sending.result(10)[0] == 250
    assert gateway.files("incoming") == [left] and len(gateway.next_hop.received) == 1


def test_half_written_files_of_a_killed_process_are_removed_at_start(
    start: Callable[..., Running], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    # A process killed while it writes a message to the spool (its fsync never returns).
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time\n"
            "from pathlib import Path\n"
            "from milter.smtp_mode import Spool\n"
            "os.fsync = lambda fd: time.sleep(60)\n"
            "spool = Spool(Path(sys.argv[1]))\n"
            "spool.prepare()\n"
            "spool.receive('RB-KILL-0001', b'x' * 100000)\n",
            str(spool),
        ],
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        wait_until(lambda: (spool / "tmp").is_dir() and any((spool / "tmp").iterdir()), timeout=20)
    finally:
        writer.kill()
        writer.wait()
    [half] = (spool / "tmp").iterdir()
    assert half.name.endswith(f".{writer.pid}.tmp")
    # A live sibling's file being written, and an older gateway's fresh one: not touched.
    sibling = subprocess.Popen(["sleep", "60"])
    try:
        (spool / "tmp" / f"RB-BBBB-BBBB.eml.{sibling.pid}.tmp").write_bytes(b"being written")
        (spool / "tmp" / "RB-CCCC-CCCC.json").write_bytes(b"{")
        old = spool / "tmp" / "RB-DDDD-DDDD.json"
        old.write_bytes(b"{")
        os.utime(old, (time.time() - 7200, time.time() - 7200))

        with caplog.at_level(logging.WARNING, logger="milter.smtp_mode"):
            gateway = start()

        assert sorted(p.name for p in gateway.files("tmp")) == [
            f"RB-BBBB-BBBB.eml.{sibling.pid}.tmp",
            "RB-CCCC-CCCC.json",
        ]
        [report] = [r for r in caplog.records if getattr(r, "event", None) == "spool_tmp_removed"]
        assert getattr(report, "count", None) == 2 and "half-written" in report.getMessage()
    finally:
        sibling.kill()
        sibling.wait()


# --- TLS, both ways ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def school_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("tls") / "school-ca")


@pytest.fixture(scope="session")
def gateway_cert(school_ca: TestCA) -> ServerCert:
    return school_ca.issue("gateway")


@pytest.fixture(scope="session")
def next_hop_cert(school_ca: TestCA) -> ServerCert:
    return school_ca.issue("nexthop")


def smtp_mode_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The per-message lines of SMTP mode ("RB-...: accept, ...")."""
    return [r for r in caplog.records if r.name == "milter.smtp_mode" and hasattr(r, "client_tls")]


def test_without_a_certificate_starttls_is_not_offered(gateway: Running) -> None:
    with gateway.client() as client:
        assert not client.has_extn("starttls")
        code, _ = client.docmd("STARTTLS")
    assert code in (454, 500, 502)


def test_starttls_is_offered_and_mail_sent_over_it_is_relayed(
    start: Callable[..., Running],
    school_ca: TestCA,
    gateway_cert: ServerCert,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = start(tls_cert=gateway_cert.cert, tls_key=gateway_cert.key)
    raw = crlf(build(STAFF, STAFF2, "Rota", "Hello,\n\nSee you tomorrow.\n"))

    with caplog.at_level(logging.INFO, logger="milter.smtp_mode"), gateway.client() as client:
        assert client.has_extn("starttls")
        # The client checks the certificate and its name, as a careful MTA does.
        code, _ = client.starttls(context=school_ca.client_context())
        assert code == 220
        assert isinstance(client.sock, ssl.SSLSocket)
        version = client.sock.version()
        assert version in ("TLSv1.2", "TLSv1.3")
        client.ehlo()
        assert not client.has_extn("starttls")
        code, reply = transaction(client, raw, STAFF, [STAFF2])

    assert code == 250, reply
    [(mail_from, rcpts, relayed)] = gateway.next_hop.received
    assert (mail_from, rcpts) == (STAFF, [STAFF2])
    assert body_of(relayed) == body_of(raw)
    # The trace line says the message came in over TLS.
    assert relayed.startswith(
        f"Received: from client.test ([127.0.0.1])\r\n\t(using {version})\r\n"
        f"\tby gateway.test (school-milter) with ESMTPS id ".encode()
    )
    # XFORWARD-less client seen as itself, HELO from the EHLO after STARTTLS.
    [(_, envelope, _)] = gateway.decisions
    assert envelope.client_address == "127.0.0.1" and envelope.helo == "client.test"
    # The log line says the client's session was encrypted, and nothing about who or what.
    [line] = smtp_mode_lines(caplog)
    assert getattr(line, "client_tls", None) == version
    assert STAFF not in line.getMessage() and "Rota" not in line.getMessage()


def test_auth_is_not_offered_even_over_tls(
    start: Callable[..., Running], school_ca: TestCA, gateway_cert: ServerCert
) -> None:
    # There is nothing to check a login against: offering AUTH would only make clients that
    # have credentials try, fail with 535, and perhaps give up on the message.
    gateway = start(tls_cert=gateway_cert.cert, tls_key=gateway_cert.key)
    with gateway.client() as client:
        assert not client.has_extn("auth")
        client.starttls(context=school_ca.client_context())
        client.ehlo()
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN AGouaHVnaGVzAHNlY3JldA==") == (
            503,
            b"5.5.1 Error: authentication not enabled",
        )
        code, reply = transaction(client, build(STAFF, STAFF2, "Rota", "Hello"), STAFF, [STAFF2])
    assert code == 250, reply
    assert gateway.decisions[0][1].auth_user is None


def test_a_client_offering_only_tls_1_1_is_refused(
    start: Callable[..., Running], gateway_cert: ServerCert, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = start(tls_cert=gateway_cert.cert, tls_key=gateway_cert.key)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 and 1.1 are, rightly
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so this client really offers TLS 1.1

    with caplog.at_level(logging.WARNING, logger="milter.smtp_mode"), gateway.client() as client:
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected)):
            client.starttls(context=old)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (
            gateway.gateway._connections or "STARTTLS handshake" not in caplog.text
        ):
            time.sleep(0.01)

    # Refused by the gateway (the client did offer TLS 1.1), logged as a warning, not a fault.
    [warning] = [r for r in caplog.records if "STARTTLS handshake" in r.getMessage()]
    assert warning.levelno == logging.WARNING and "UNSUPPORTED_PROTOCOL" in warning.getMessage()
    # The failed connection is gone: failed handshakes cannot use up max_connections.
    assert not gateway.gateway._connections
    # And the gateway still serves everyone else.
    assert gateway.send(build(STAFF, STAFF2, "Rota", "Hello"), STAFF, [STAFF2])[0] == 250


def test_require_tls_refuses_mail_before_starttls_except_from_exempt_clients(
    start: Callable[..., Running], school_ca: TestCA, gateway_cert: ServerCert
) -> None:
    # Loopback is all of 127.0.0.0/8: exempt only 127.0.0.1, and be another host from 127.0.0.2.
    gateway = start(
        tls_cert=gateway_cert.cert, tls_key=gateway_cert.key, require_tls=True, tls_exempt=("127.0.0.1/32",)
    )
    raw = build(STAFF, STAFF2, "Rota", "Hello")

    with gateway.client(source="127.0.0.2") as client:
        assert client.has_extn("starttls")
        assert client.mail(STAFF) == (530, b"5.7.0 Must issue a STARTTLS command first")
        # Nor does a transaction sneak in another way.
        assert client.rcpt(STAFF2)[0] == 503
        assert client.docmd("DATA")[0] == 503
        assert client.starttls(context=school_ca.client_context())[0] == 220
        client.ehlo()
        code, reply = transaction(client, raw, STAFF, [STAFF2])
    assert code == 250, reply
    assert gateway.next_hop.received and gateway.decisions[0][1].client_address == "127.0.0.2"

    # The exempt client (Postfix's content_filter beside the gateway) needs no TLS.
    code, reply = gateway.send(raw, STAFF, [STAFF2])
    assert code == 250, reply
    assert [e.client_address for _, e, _ in gateway.decisions] == ["127.0.0.2", "127.0.0.1"]
    assert len(gateway.next_hop.received) == 2


def test_require_tls_exempts_all_of_loopback_by_default(
    start: Callable[..., Running], gateway_cert: ServerCert
) -> None:
    gateway = start(tls_cert=gateway_cert.cert, tls_key=gateway_cert.key, require_tls=True)
    with gateway.client(source="127.0.0.2") as client:
        code, reply = transaction(client, build(STAFF, STAFF2), STAFF, [STAFF2])
    assert code == 250, reply


@pytest.mark.parametrize(
    ("mode", "next_hop_offers_tls", "sent_over_tls"),
    [
        ("opportunistic", False, False),
        # No certificate check: the next hop's certificate is from a CA nobody configured.
        ("opportunistic", True, True),
        ("off", True, False),
    ],
)
def test_relay_tls_opportunistic_and_off(
    start: Callable[..., Running],
    next_hop_cert: ServerCert,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    next_hop_offers_tls: bool,
    sent_over_tls: bool,
) -> None:
    gateway = start(
        next_hop_tls=mode,
        next_hop_tls_context=next_hop_cert.server_context() if next_hop_offers_tls else None,
    )
    with caplog.at_level(logging.INFO, logger="milter.smtp_mode"):
        code, reply = gateway.send(build(STAFF, STAFF2, "Rota", "Hello"), STAFF, [STAFF2])
    assert code == 250, reply
    [version] = gateway.next_hop.tls
    assert (version is not None) == sent_over_tls
    [line] = smtp_mode_lines(caplog)
    assert getattr(line, "relay_tls", None) == (version or "none")


def test_relay_tls_required_to_a_next_hop_with_a_certificate_from_the_configured_ca(
    start: Callable[..., Running],
    school_ca: TestCA,
    next_hop_cert: ServerCert,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = start(
        next_hop_tls="required",
        next_hop_tls_ca=school_ca.cert_path,
        next_hop_tls_context=next_hop_cert.server_context(),
    )
    raw = crlf(build(STAFF, STAFF2, "Rota", "Hello"))
    with caplog.at_level(logging.DEBUG, logger="milter.smtp_mode"):
        code, reply = gateway.send(raw, STAFF, [STAFF2])

    assert code == 250 and "queued as NEXT1" in reply, reply
    [(_, _, relayed)] = gateway.next_hop.received
    assert body_of(relayed) == body_of(raw)
    [version] = gateway.next_hop.tls
    assert version in ("TLSv1.2", "TLSv1.3")
    relayed_lines = [r for r in caplog.records if getattr(r, "event", None) == "relayed"]
    assert [getattr(r, "tls", None) for r in relayed_lines] == [version]


def test_relay_tls_required_checks_the_configured_name_when_the_next_hop_is_an_address(
    start: Callable[..., Running], school_ca: TestCA
) -> None:
    """next_hop = 127.0.0.1 with a certificate naming only mail.redborne.test: verified against
    next_hop_tls_name (as Postfix's smtp_tls_verify_cert_match), refused without it."""
    named = school_ca.issue("named", names=("mail.redborne.test",))
    raw = crlf(build(STAFF, STAFF2, "Rota", "Hello"))
    without = start(
        next_hop_tls="required",
        next_hop_tls_ca=school_ca.cert_path,
        next_hop_tls_context=named.server_context(),
    )
    assert without.send(raw, STAFF, [STAFF2])[0] == 451
    gateway = start(
        next_hop_tls="required",
        next_hop_tls_ca=school_ca.cert_path,
        next_hop_tls_name="mail.redborne.test",
        next_hop_tls_context=named.server_context(),
    )
    code, reply = gateway.send(raw, STAFF, [STAFF2])
    assert code == 250, reply
    assert gateway.next_hop.tls[0] in ("TLSv1.2", "TLSv1.3")
    # The name is checked, not just present: another name is refused.
    other = start(
        next_hop_tls="required",
        next_hop_tls_ca=school_ca.cert_path,
        next_hop_tls_name="mail.elsewhere.test",
        next_hop_tls_context=named.server_context(),
    )
    assert other.send(raw, STAFF, [STAFF2])[0] == 451


@pytest.mark.parametrize(
    ("next_hop", "why"),
    [
        ("plain", "does not offer STARTTLS"),
        # A certificate from a CA the gateway was not told to trust (nor the system).
        ("other CA", "certificate not accepted"),
        # The right CA, but a certificate for another host than the next hop's.
        ("wrong name", "certificate not accepted"),
    ],
)
def test_relay_tls_required_and_not_had_is_a_temporary_failure_and_nothing_is_lost(
    start: Callable[..., Running],
    school_ca: TestCA,
    next_hop_cert: ServerCert,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    next_hop: str,
    why: str,
) -> None:
    context = {
        "plain": None,
        "other CA": TestCA(tmp_path / "other-ca").issue("nexthop").server_context(),
        "wrong name": school_ca.issue("elsewhere", names=("mail.elsewhere.example",)).server_context(),
    }[next_hop]
    gateway = start(
        next_hop_tls="required", next_hop_tls_ca=school_ca.cert_path, next_hop_tls_context=context
    )
    raw = build(STAFF, STAFF2, "Rota", "Hello")

    with caplog.at_level(logging.WARNING, logger="milter.smtp_mode"):
        code, reply = gateway.send(raw, STAFF, [STAFF2])

    # As when the next hop is down: 451, the client keeps the message and retries.
    assert code == 451 and reply.startswith("4.4.1 Next hop unavailable"), reply
    reference = gateway.decisions[0][0].reference
    assert reference in reply
    assert gateway.next_hop.received == []
    assert gateway.files("incoming") == [] and gateway.files("failed") == []
    [error] = [r for r in caplog.records if getattr(r, "event", None) == "relay_tls_failed"]
    assert error.levelno == logging.ERROR and why in error.getMessage() and reference in error.getMessage()
    assert STAFF not in caplog.text

    # Once the next hop has a proper certificate, the client's retry is delivered, once.
    gateway.next_hop_tls_context = next_hop_cert.server_context()
    code, reply = gateway.send(raw, STAFF, [STAFF2])
    assert code == 250, reply
    assert len(gateway.next_hop.received) == 1 and gateway.next_hop.tls[0] is not None


def test_relay_tls_opportunistic_falls_back_to_plain_text_when_the_handshake_fails(
    start: Callable[..., Running], next_hop_cert: ServerCert, caplog: pytest.LogCaptureFixture
) -> None:
    # A next hop whose TLS cannot work with us: it demands a client certificate we do not have.
    broken = next_hop_cert.server_context()
    broken.verify_mode = ssl.CERT_REQUIRED
    gateway = start(next_hop_tls_context=broken)

    with caplog.at_level(logging.WARNING, logger="milter.smtp_mode"):
        code, reply = gateway.send(build(STAFF, STAFF2, "Rota", "Hello"), STAFF, [STAFF2])

    assert code == 250, reply
    assert gateway.next_hop.tls == [None] and len(gateway.next_hop.received) == 1
    assert any("relaying in plain text" in r.getMessage() for r in caplog.records)


def test_tls_files_that_cannot_be_used_are_named(
    rules: Rules, gateway_cert: ServerCert, next_hop_cert: ServerCert, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            str(gateway_cert.key),
            "-aes256",
            "-passout",
            "pass:x",
            "-out",
            str(encrypted),
        ],
        check=True,
    )
    missing = tmp_path / "missing.pem"
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: server_tls_context(missing, gateway_cert.key), f"{missing}: cannot read: No such file"),
        (lambda: server_tls_context(gateway_cert.cert, missing), f"{missing}: cannot read"),
        (lambda: server_tls_context(junk, gateway_cert.key), f"{junk}: no PEM certificate"),
        (lambda: server_tls_context(gateway_cert.cert, junk), f"{junk}: no PEM private key"),
        (
            lambda: server_tls_context(gateway_cert.cert, encrypted),
            f"{encrypted}: encrypted with a passphrase",
        ),
        (
            lambda: server_tls_context(gateway_cert.cert, next_hop_cert.key),
            f"{next_hop_cert.key}: does not belong to the certificate in {gateway_cert.cert}",
        ),
        (lambda: relay_tls_context("required", junk), f"{junk}: no PEM certificate"),
        (lambda: relay_tls_context("required", missing), f"{missing}: cannot read"),
    ]
    for make, message in cases:
        with pytest.raises(TlsSetupError) as raised:
            make()
        assert message in str(raised.value)
    assert server_tls_context(gateway_cert.cert, gateway_cert.key).minimum_version >= ssl.TLSVersion.TLSv1_2
    assert relay_tls_context("off") is None
    # Opportunistic does not need (and does not read) the CA file.
    assert relay_tls_context("opportunistic", missing) is not None
    with pytest.raises(TlsSetupError):
        SmtpGateway(SmtpModeConfig(tls_cert=gateway_cert.cert, tls_key=junk), lambda: rules)


# --- pieces --------------------------------------------------------------------------------------


def test_format_reply_makes_multi_line_ascii_replies() -> None:
    reply = format_reply(550, "5.7.1", "Refused: “naïve” words\nsee\r\nbelow. Reference RB-AAAA-BBBB.")
    assert reply.split("\r\n") == [
        "550-5.7.1 Refused: naive words",
        "550-5.7.1 see",
        "550-5.7.1 below.",
        "550 5.7.1 Reference RB-AAAA-BBBB.",
    ]
    long = format_reply(451, "4.3.0", "word " * 300)
    assert all(len(line) <= 510 for line in long.split("\r\n"))
    assert long.split("\r\n")[-1].startswith("451 4.3.0 ")


def test_the_authenticated_user_comes_from_aiosmtpd_auth_data() -> None:
    session = Session(asyncio.new_event_loop())
    session.auth_data = LoginPassword(b"j.hughes@redborne.example", b"secret")  # type: ignore[assignment]
    assert _auth_user(session) is None  # not authenticated: the login is not believed
    session.authenticated = True
    assert _auth_user(session) == "j.hughes@redborne.example"
    session.loop.close()


# --- a full disk ---------------------------------------------------------------------------


def test_a_full_spool_disk_answers_452_and_keeps_nothing_half_written(rules: Rules, small_disk: Path) -> None:
    # No free-space check at MAIL: the write itself meets the full disk.
    gateway = Running(rules, small_disk / "spool", spool_min_free=0)
    try:
        filler = fill_disk(small_disk, 64 * 1024)
        big = build(STAFF, STAFF2, "Minutes", "Minutes of the meeting.\n" * 8000)  # ~190 KB
        code, reply = gateway.send(big, STAFF, [STAFF2])
        # Nothing was taken: the client keeps the message and tries again later.
        assert code == 452 and reply.startswith("4.3.1 Insufficient system storage"), reply
        assert REFERENCE.search(reply)
        assert gateway.files("tmp") == [] and gateway.files("incoming") == []  # no half file left
        assert gateway.next_hop.received == []
        # Small mail still fits and goes through.
        assert gateway.send(build(STAFF, STAFF2, "Rota", "Cover."), STAFF, [STAFF2])[0] == 250
        # Once there is room again, the retry of the big one is delivered.
        filler.unlink()
        code, reply = gateway.send(big, STAFF, [STAFF2])
        assert code == 250, reply
        subjects = [re.search(rb"^Subject: (.*)$", data, re.M) for _, _, data in gateway.next_hop.received]
        assert [m.group(1).strip() for m in subjects if m] == [b"Rota", b"Minutes"]
    finally:
        gateway.close()


def test_mail_is_turned_away_at_mail_from_while_the_spool_is_low(rules: Rules, small_disk: Path) -> None:
    gateway = Running(rules, small_disk / "spool", spool_min_free=100_000)
    try:
        filler = fill_disk(small_disk, 160_000)
        with gateway.client() as client:
            # A client that declares 100 KB would leave less than spool_min_free: not now.
            code, text = client.mail(STAFF, ["SIZE=100000"])
            assert (code, text) == (452, b"4.3.1 Insufficient system storage; please try again later")
            # One that declares little (or nothing) still fits and is delivered.
            assert transaction(client, build(STAFF, STAFF2, "Rota", "Cover."), STAFF, [STAFF2])[0] == 250
        filler.unlink()
        fill_disk(small_disk, 50_000)
        with gateway.client() as client:
            assert client.mail(STAFF)[0] == 452
        assert [r for r in gateway.next_hop.received if b"Subject: Rota" in r[2]]
        assert gateway.files("incoming") == []
    finally:
        gateway.close()


# --- what the log says about a client ------------------------------------------------------------


def test_a_body_sent_after_data_was_refused_leaves_none_of_its_words_in_the_log(
    start: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    from milter.logs import JsonFormatter

    # At DEBUG from before the start, as `serve --log-level debug` has it: the most that can get out.
    with caplog.at_level(logging.DEBUG):
        gateway = start()
        gateway.next_hop.refuse_rcpt = {UNKNOWN: "550 5.1.1 User unknown"}
        # A client that pipelines its body although its only recipient was refused (so DATA is
        # too): aiosmtpd reads each body line as a command it does not know.
        with socket.create_connection(("127.0.0.1", gateway.gateway.port), timeout=10) as sock:
            dialogue = (
                f"EHLO client.test\r\nMAIL FROM:<{STAFF}>\r\nRCPT TO:<{UNKNOWN}>\r\nDATA\r\n"
                "Subject: Zebraquilt secret\r\n\r\nMarmaladex is the password\r\nWombatrix: call me\r\n"
                ".\r\nQUIT\r\n"
            )
            sock.sendall(dialogue.encode())
            replies = b""
            deadline = time.monotonic() + 10
            while b"\r\n221 " not in replies and time.monotonic() < deadline:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                replies += chunk
    assert b"\r\n550-5.1.1 User unknown" in replies and b"\r\n221 " in replies, replies
    assert gateway.next_hop.received == []

    lines = [JsonFormatter().format(r) for r in caplog.records]
    for word in ("zebraquilt", "marmaladex", "wombatrix"):
        assert not [line for line in lines if word in line.lower()], word
    # aiosmtpd's warning itself is kept (an operator sees a client sending what is no command).
    assert any(r.name == "mail.log" and "unrecognised: (withheld)" in r.getMessage() for r in caplog.records)
