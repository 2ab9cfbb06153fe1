"""SMTP mode over real sockets: a client (smtplib) -> the gateway -> a real aiosmtpd next hop.

The gateway and the next hop share one event loop on a background thread; the tests
speak SMTP from the test thread, as a mail server in front of the gateway would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import re
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
from tests.conftest import fill_disk
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
        self.data_reply: str | None = None
        self.refuse_rcpt: dict[str, str] = {}
        # When set, DATA is answered only once the gate opens: a message held in flight.
        self.gate: threading.Event | None = None
        # For each message received, the TLS version of its session ("TLSv1.3"), or None: plain text.
        self.tls: list[str | None] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list[str]
    ) -> str:
        if address in self.refuse_rcpt:
            return self.refuse_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, 30)
        if self.data_reply:
            return self.data_reply
        assert envelope.mail_from is not None and envelope.original_content is not None
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        ssl_object = (
            server.transport.get_extra_info("ssl_object") if session.ssl and server.transport else None
        )
        self.tls.append(ssl_object.version() if ssl_object else None)
        return "250 2.0.0 Ok: queued as NEXT1"


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
        **config: Any,
    ) -> None:
        # The next hop offers STARTTLS with this; read for each connection, so a test can change it.
        self.next_hop_tls_context = next_hop_tls_context
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.next_hop = NextHop()
        self.next_hop_server: asyncio.Server | None = None
        if next_hop_down:
            hop_port = free_port()
        else:
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
                self.next_hop, hostname="nexthop.test", tls_context=self.next_hop_tls_context, loop=loop
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

    def files(self, folder: str) -> list[Path]:
        return sorted((self.spool / folder).iterdir())

    def close(self) -> None:
        self.run(self.gateway.stop())
        if self.next_hop_server is not None:
            self.next_hop_server.close()
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
    assert store.body(reference.group(), "tech", "test") == crlf(raw)
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


def test_a_client_that_says_nothing_is_dropped_after_the_timeout(start: Callable[..., Running]) -> None:
    gateway = start(timeout_seconds=0.3)
    with socket.create_connection(("127.0.0.1", gateway.gateway.port), timeout=5) as sock:
        assert sock.recv(1024).startswith(b"220 gateway.test")
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the gateway
        assert time.monotonic() - started < 3


def test_connections_over_the_limit_are_told_to_come_back(start: Callable[..., Running]) -> None:
    gateway = start(max_connections=1)
    with socket.create_connection(("127.0.0.1", gateway.gateway.port), timeout=5) as first:
        assert first.recv(1024).startswith(b"220 ")
        with socket.create_connection(("127.0.0.1", gateway.gateway.port), timeout=5) as second:
            assert second.recv(1024).startswith(b"421 4.7.0")


# --- nothing is lost --------------------------------------------------------------------------


def test_next_hop_down_is_a_temporary_failure(start: Callable[..., Running]) -> None:
    gateway = start(next_hop_down=True, relay_timeout_seconds=2)
    raw = build(STAFF, STAFF2, "Rota", "Hello")

    code, reply = gateway.send(raw, STAFF, [STAFF2])

    assert code == 451 and reply.startswith("4.4.1 Next hop unavailable")
    assert gateway.decisions[0][0].reference in reply
    # The client was told to retry, so it keeps the message; the spool keeps no copy.
    assert gateway.files("incoming") == [] and gateway.files("failed") == []


@pytest.mark.parametrize(
    ("data_reply", "refuse_rcpt", "expect"),
    [
        ("554 5.7.1 Rejected by the next hop", {}, (554, "5.7.1 Rejected by the next hop")),
        ("452 4.3.1 Insufficient system storage", {}, (452, "4.3.1 Insufficient system storage")),
        (None, {STAFF2: "550 5.1.1 User unknown"}, (550, "5.1.1 User unknown")),
        # One good recipient, one refused: a 5xx would bounce the good one too.
        (None, {"x@redborne.example": "550 5.1.1 User unknown"}, (451, "4.4.0 The next hop refused some")),
    ],
)
def test_a_next_hop_refusal_is_passed_back(
    gateway: Running, data_reply: str | None, refuse_rcpt: dict[str, str], expect: tuple[int, str]
) -> None:
    gateway.next_hop.data_reply = data_reply
    gateway.next_hop.refuse_rcpt = refuse_rcpt
    rcpts = [STAFF2, *refuse_rcpt] if STAFF2 not in refuse_rcpt else [STAFF2]

    code, reply = gateway.send(build(STAFF, STAFF2, "Rota", "Hello"), STAFF, rcpts)

    assert (code, reply[: len(expect[1])]) == expect
    assert REFERENCE.search(reply.splitlines()[-1])
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
    # XFORWARD-less client seen as itself, HELO from the EHLO after STARTTLS.
    [(_, envelope, _)] = gateway.decisions
    assert envelope.client_address == "127.0.0.1" and envelope.helo == "client.test"
    # The log line says the client's session was encrypted, and nothing about who or what.
    [line] = smtp_mode_lines(caplog)
    assert getattr(line, "client_tls", None) == version
    assert STAFF not in line.getMessage() and "Rota" not in line.getMessage()


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
