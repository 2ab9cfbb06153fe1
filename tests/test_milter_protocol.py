"""The milter server spoken to by an independent client (the `miltertest` package) and by our codec."""

from __future__ import annotations

import asyncio
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import miltertest
import pytest
from miltertest import constants as mc

from milter import protocol as p
from milter.engine import Scan
from milter.envelope import Envelope
from milter.policy.loader import Rules
from milter.server import Decision, MilterServer, ServerLimits, bind, parse_address, reply_lines
from tests.conftest import fill_disk
from tests.mail import build


class Running:
    """A MilterServer on its own event loop thread, bound to a free loopback port."""

    def __init__(
        self,
        rules: Rules,
        limits: ServerLimits | None = None,
        scanner: object = None,
        followup: object = None,
    ) -> None:
        self.decisions: list[Decision] = []
        kwargs = {"scanner": scanner} if scanner else {}
        if followup is not None:
            kwargs["followup"] = followup
        self.server = MilterServer(lambda: rules, limits, on_decision=self.decisions.append, **kwargs)  # type: ignore[arg-type]
        self.sock = bind("inet:127.0.0.1:0")
        self.port = self.sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(self.sock), self.loop).result(5)

    def decision(self, count: int) -> Decision:
        """The count-th decision, waiting for it: the hook runs just after the reply is sent."""
        deadline = time.monotonic() + 5
        while len(self.decisions) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.decisions[count - 1]

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(1), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def running(rules: Rules) -> Iterator[Running]:
    server = Running(rules)
    yield server
    server.close()


def split_message(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    headers: list[tuple[str, str]] = []
    for line in head.decode().split("\n"):
        if line[:1] in (" ", "\t"):
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line)
        else:
            name, _, value = line.partition(":")
            headers.append((name, value.lstrip()))
    return headers, body.replace(b"\n", b"\r\n")


def converse(
    conn: miltertest.MilterConnection, raw: bytes, sender: str, rcpts: list[str], client: str = "127.0.0.1"
) -> list[tuple[str, dict[str, object]]]:
    conn.send(mc.SMFIC_CONNECT, hostname="localhost", family=mc.SMFIA_INET, port=25000, address=client)
    conn.send(mc.SMFIC_HELO, helo="client.example")
    conn.send(mc.SMFIC_MAIL, args=[f"<{sender}>"])
    for rcpt in rcpts:
        conn.send(mc.SMFIC_RCPT, args=[f"<{rcpt}>"])
    headers, body = split_message(raw)
    conn.send_headers(headers)
    conn.send(mc.SMFIC_EOH)
    conn.send_body(body.decode())  # miltertest encodes the body itself, from str
    return conn.send_eom()  # type: ignore[no-any-return]


def negotiate(sock: socket.socket) -> miltertest.MilterConnection:
    conn = miltertest.MilterConnection(sock)
    # An MTA that offers no "no reply" steps (the server must answer each one) and no
    # symbol list (miltertest cannot decode that extension; our own codec test covers it).
    conn.optneg_mta(actions=mc.SMFI_V6_ACTS & ~p.SET_SYMLIST, protocol=0)
    return conn


def test_clean_mail_continues_with_result_header(running: Running) -> None:
    with running.connect() as sock:
        conn = negotiate(sock)
        replies = converse(conn, build(), "j.hughes@redborne.example", ["a.patel@redborne.example"])
    codes = [r[0] for r in replies]
    assert codes[-1] == mc.SMFIR_CONTINUE
    inserted = [r[1] for r in replies if r[0] == mc.SMFIR_INSHEADER]
    assert inserted and inserted[0]["name"] == "X-School-Policy"
    assert str(inserted[0]["value"]).startswith("accept; ref=RB-")
    assert running.decision(1).action == "accept"


def test_obscene_mail_from_staff_rejected_with_clause(running: Running) -> None:
    raw = build("j.hughes@redborne.example", "x@elsewhere.example", "Re: order", "this is fucking late")
    with running.connect() as sock:
        conn = negotiate(sock)
        replies = converse(conn, raw, "j.hughes@redborne.example", ["x@elsewhere.example"])
    kind, data = replies[-1]
    assert kind == mc.SMFIR_REPLYCODE
    text = str(data)
    assert "550" in text and "5.7.1" in text and "clause 5.5" in text and "Reference RB-" in text


def test_several_messages_on_one_connection_and_abort(running: Running) -> None:
    with running.connect() as sock:
        conn = negotiate(sock)
        first = converse(
            conn, build(subject="one"), "j.hughes@redborne.example", ["a.patel@redborne.example"]
        )
        conn._send(mc.SMFIC_ABORT)
        second = converse(
            conn,
            build(subject="WHO LEFT THE LAB DOOR OPEN AGAIN"),
            "j.hughes@redborne.example",
            ["a.patel@redborne.example"],
        )
    assert first[-1][0] == mc.SMFIR_CONTINUE
    changed = [r[1] for r in second if r[0] == mc.SMFIR_CHGHEADER]
    assert changed and changed[0]["name"] == "Subject" and str(changed[0]["value"]).startswith("[Shouting] ")
    assert [running.decision(1).action, running.decision(2).action] == ["accept", "tag"]


def test_quarantine_uses_the_protocol_action(running: Running) -> None:
    raw = build("spam@elsewhere.example", "a.patel@redborne.example", "hi", "fuck you and your school")
    with running.connect() as sock:
        conn = negotiate(sock)
        replies = converse(
            conn, raw, "spam@elsewhere.example", ["a.patel@redborne.example"], client="203.0.113.9"
        )
        # miltertest counts quarantine as final; in libmilter and Postfix it is a modification
        # followed by the real disposition, which must come next.
        final = conn.recv()
    assert replies[-1][0] == mc.SMFIR_QUARANTINE and "RB-" in str(replies[-1][1])
    assert final[0] == mc.SMFIR_CONTINUE


def test_engine_failure_is_a_tempfail_with_reference(rules: Rules) -> None:
    def broken(raw: bytes, envelope: Envelope, rules: Rules) -> Scan:
        raise RuntimeError("boom")

    server = Running(rules, scanner=broken)
    try:
        with server.connect() as sock:
            conn = negotiate(sock)
            replies = converse(conn, build(), "j.hughes@redborne.example", ["a.patel@redborne.example"])
        kind, data = replies[-1]
        assert kind == mc.SMFIR_REPLYCODE
        assert "451" in str(data) and "4.3.0" in str(data) and "Reference RB-" in str(data)
        assert server.decision(1).action == "tempfail" and server.decision(1).error == "RuntimeError"
    finally:
        server.close()


def test_slow_scan_sends_progress_keepalives(rules: Rules) -> None:
    from milter.engine import scan

    def slow(raw: bytes, envelope: Envelope, rules: Rules) -> Scan:
        time.sleep(0.6)
        return scan(raw, envelope, rules)

    server = Running(rules, ServerLimits(progress_interval=0.1), scanner=slow)
    try:
        with server.connect() as sock:
            conn = negotiate(sock)
            conn.send(mc.SMFIC_MAIL, args=["<j.hughes@redborne.example>"])
            conn.send(mc.SMFIC_RCPT, args=["<a.patel@redborne.example>"])
            headers, body = split_message(build())
            conn.send_headers(headers)
            conn.send(mc.SMFIC_EOH)
            conn.send_body(body.decode())
            conn._send(mc.SMFIC_BODYEOB)
            seen = []
            while True:
                kind, _ = conn._recv()
                seen.append(kind)
                if kind in miltertest.DISPOSITION_REPLIES:
                    break
        assert seen.count(mc.SMFIR_PROGRESS) >= 3
        assert seen[-1] == mc.SMFIR_CONTINUE
    finally:
        server.close()


def test_scan_timeout_is_a_tempfail(rules: Rules) -> None:
    def stuck(raw: bytes, envelope: Envelope, rules: Rules) -> Scan:
        time.sleep(2)
        raise AssertionError("unreachable")

    server = Running(rules, ServerLimits(scan_timeout=0.3, progress_interval=0.1), scanner=stuck)
    try:
        with server.connect() as sock:
            conn = negotiate(sock)
            replies = converse(conn, build(), "j.hughes@redborne.example", ["a.patel@redborne.example"])
        assert replies[-1][0] == mc.SMFIR_REPLYCODE and "451" in str(replies[-1][1])
    finally:
        server.close()


# --- our own codec as the MTA: "no reply" negotiation, macros, QUIT_NC, odd packets -------


def exchange(sock: socket.socket, *commands: p.Command, expect: int = 0) -> list[tuple[str, bytes]]:
    """Send commands; read `expect` replies, or with expect=0 up to a final disposition."""
    sock.sendall(b"".join(p.encode_command(c) for c in commands))
    data = b""
    deadline = time.monotonic() + 10

    def complete() -> bool:
        replies = p.decode_replies(data)
        if expect:
            return len(replies) >= expect
        return bool(replies) and replies[-1][0] in "acdrty"

    while not complete() and time.monotonic() < deadline:
        data += sock.recv(65536)
    return p.decode_replies(data)


def test_no_reply_steps_macros_and_connection_reuse(running: Running) -> None:
    raw = build("j.hughes@redborne.example", "x@elsewhere.example", "x", "bullshit")
    headers, body = split_message(raw)
    message = [
        p.MailFrom("j.hughes@redborne.example"),
        p.RcptTo("x@elsewhere.example"),
        *[p.Header(n, b" " + v.encode()) for n, v in headers],
        p.EndOfHeaders(),
        p.BodyChunk(body),
        p.EndOfMessage(),
    ]
    with running.connect() as sock:
        (optneg,) = exchange(sock, p.OptionNegotiation(6, 0x1FF, 0x1FFFFF), expect=1)
        assert optneg[0] == "O"
        version, _actions, proto = struct.unpack("!III", optneg[1][:12])
        assert version == 6 and proto & p.NR_HEADER and proto & p.NR_BODY and proto & p.HEADER_LEADING_SPACE
        # Everything it needs comes with MAIL FROM: the connection and HELO are skipped.
        mail_stage = struct.pack("!I", p.STAGE_MAIL) + b"{client_addr} {client_name} {auth_authen} i\0"
        assert mail_stage in optneg[1]
        assert proto & p.NO_CONNECT and proto & p.NO_HELO
        # Untrusted client, but authenticated: guidance-worthy outbound reject.
        replies = exchange(
            sock,
            p.DefineMacros(
                "M",
                {"client_addr": "198.51.100.7", "auth_authen": "j.hughes@redborne.example", "i": "4ABC123"},
            ),
            *message,
        )
        assert [r[0] for r in replies][-1:] == ["y"] and b"550 5.7.1" in replies[-1][1]
        assert running.decision(1).queue_id == "4ABC123"
        # QUIT_NC: a new SMTP session on the same socket; the old login must not carry over.
        replies = exchange(
            sock, p.QuitNewConnection(), p.DefineMacros("M", {"client_addr": "198.51.100.7"}), *message
        )
        kinds = [r[0] for r in replies]
        assert "q" in kinds and kinds[-1] == "c", "unauthenticated school sender from outside: quarantined"
        # An unknown command letter closes the connection, as libmilter does: any answer
        # could be one the MTA did not expect, shifting every later answer by one.
        sock.sendall(p.encode_command(p.UnrecognisedPacket(b"Z", b"x")))
        assert sock.recv(1024) == b"", "closed, with no reply"


def test_without_a_macro_list_the_connection_is_still_asked_for(running: Running) -> None:
    """An MTA that cannot take our macro list tells us the client address at CONNECT only."""
    raw = build("j.hughes@redborne.example", "x@elsewhere.example", "x", "bullshit")
    headers, body = split_message(raw)
    with running.connect() as sock:
        (optneg,) = exchange(sock, p.OptionNegotiation(6, 0x1FF & ~p.SET_SYMLIST, 0x1FFFFF), expect=1)
        _version, _actions, proto = struct.unpack("!III", optneg[1][:12])
        assert not proto & p.NO_CONNECT and proto & p.NR_CONNECT and proto & p.NO_HELO
        replies = exchange(
            sock,
            p.Connect("client.example", "4", 4000, "198.51.100.7"),
            p.MailFrom("j.hughes@redborne.example"),
            p.RcptTo("x@elsewhere.example"),
            *[p.Header(n, b" " + v.encode()) for n, v in headers],
            p.EndOfHeaders(),
            p.BodyChunk(body),
            p.EndOfMessage(),
        )
        # From outside and not signed in: held, which needs the connection's address.
        assert "q" in [r[0] for r in replies]


def test_oversized_packet_closes_connection(running: Running) -> None:
    with running.connect() as sock:
        sock.sendall(struct.pack("!I", 50_000_000) + b"B")
        sock.settimeout(5)
        assert sock.recv(10) == b""


def test_garbage_does_not_kill_the_server(running: Running) -> None:
    with running.connect() as sock:
        sock.sendall(struct.pack("!I", 1) + b"C")  # connect without data: a protocol error
        sock.settimeout(5)
        assert sock.recv(10) == b""
    with running.connect() as sock:
        (optneg,) = exchange(sock, p.OptionNegotiation(6, 0x1FF, 0x1FFFFF), expect=1)
        assert optneg[0] == "O"


def test_codec_round_trip_and_limits() -> None:
    decoder = p.Decoder(max_packet=100)
    data = p.encode_command(p.Header("Subject", b" hello")) + p.encode_command(p.BodyChunk(b"x" * 10))
    # Fed one byte at a time, packets still come out whole.
    out: list[p.Command] = []
    for i in range(len(data)):
        out.extend(decoder.feed(data[i : i + 1]))
    assert out == [p.Header("Subject", b" hello"), p.BodyChunk(b"x" * 10)]
    with pytest.raises(p.ProtocolError):
        decoder.feed(struct.pack("!I", 101) + b"B")


def test_decoder_gives_the_same_commands_however_the_stream_is_cut() -> None:
    commands: list[p.Command] = [
        p.Header("Subject", b" hello"),
        p.BodyChunk(b"y" * 70_000),
        p.EndOfHeaders(),
        p.Header("To", b" a@example.org"),
    ]
    data = b"".join(p.encode_command(c) for c in commands)
    for cut in [*range(0, 12), *range(len(data) - 40, len(data)), 35_000]:
        for second in (cut, min(cut + 3, len(data)), len(data)):
            decoder = p.Decoder(max_packet=1 << 17)
            out = decoder.feed(data[:cut]) + decoder.feed(data[cut:second]) + decoder.feed(data[second:])
            assert out == commands, (cut, second)
            assert decoder.pending == 0


def test_idle_connection_is_closed_and_the_server_goes_on(rules: Rules) -> None:
    server = Running(rules, ServerLimits(idle_timeout=0.3))
    try:
        with server.connect() as sock:
            (optneg,) = exchange(sock, p.OptionNegotiation(6, 0x1FF, 0x1FFFFF), expect=1)
            assert optneg[0] == "O"
            started = time.monotonic()
            sock.settimeout(5)
            assert sock.recv(10) == b""  # closed by the server, not by us
            assert 0.2 < time.monotonic() - started < 3
        # A connection that keeps talking is not cut off, and new connections are served.
        with server.connect() as sock:
            # Offering no "no reply" steps: every HELO is answered with continue.
            exchange(sock, p.OptionNegotiation(6, 0x1FF, 0), expect=1)
            for _ in range(5):
                time.sleep(0.1)
                assert exchange(sock, p.Helo("client.example"), expect=1)[0][0] == "c"
    finally:
        server.close()


def test_connection_that_never_negotiates_is_closed_after_negotiate_timeout(rules: Rules) -> None:
    server = Running(rules, ServerLimits(idle_timeout=30, negotiate_timeout=0.3))
    try:
        with server.connect() as sock:
            started = time.monotonic()
            sock.settimeout(10)
            assert sock.recv(10) == b""
            assert 0.2 < time.monotonic() - started < 5
    finally:
        server.close()


def test_packet_trickled_in_is_closed_after_packet_timeout(rules: Rules) -> None:
    """A peer sending a byte now and then never trips idle_timeout; the packet deadline
    stops it holding the connection."""
    server = Running(rules, ServerLimits(idle_timeout=30, packet_timeout=0.5))
    try:
        with server.connect() as sock:
            exchange(sock, p.OptionNegotiation(6, 0x1FF, 0x1FFFFF), expect=1)
            packet = p.encode_command(p.BodyChunk(b"x" * 1000))
            started = time.monotonic()
            closed = False
            for byte in packet[:40]:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.1)
            sock.settimeout(10)
            assert closed or sock.recv(10) == b""
            assert time.monotonic() - started < 5
    finally:
        server.close()


def test_long_body_streamed_steadily_outlasts_packet_timeout(rules: Rules) -> None:
    """Each packet completes quickly, so a message taking many packet_timeouts in all is fine."""
    server = Running(rules, ServerLimits(idle_timeout=30, packet_timeout=0.3))
    raw = build("j.hughes@redborne.example", "a.patel@redborne.example", "Minutes", "All fine.\n" * 5)
    headers, body = split_message(raw)
    try:
        with server.connect() as sock:
            exchange(sock, p.OptionNegotiation(6, 0x1FF, 0x1FFFFF), expect=1)
            sock.sendall(
                b"".join(
                    p.encode_command(c)
                    for c in (
                        p.MailFrom("j.hughes@redborne.example"),
                        p.RcptTo("a.patel@redborne.example"),
                        *[p.Header(n, b" " + v.encode()) for n, v in headers],
                        p.EndOfHeaders(),
                    )
                )
            )
            chunk = p.encode_command(p.BodyChunk(b"More text, all of it ordinary.\r\n" * 30))
            stream = chunk * 8
            # Writes that each finish one packet and start the next, 0.2 s apart: some packet
            # is always half-read, for 1.8 s in all, yet none of them for long.
            writes = [stream[:500]] + [
                stream[i : i + len(chunk)] for i in range(500, len(stream), len(chunk))
            ]
            started = time.monotonic()
            for piece in writes:
                sock.sendall(piece)
                time.sleep(0.2)
            assert time.monotonic() - started > 1.0
            replies = exchange(sock, p.BodyChunk(body), p.EndOfMessage())
            assert replies and replies[-1][0] == "c"
    finally:
        server.close()


def test_reply_code_multiline_and_escaping() -> None:
    ((kind, data),) = p.decode_replies(p.reply_code(550, "5.7.1", ["first 100% line", "Reference RB-1"]))
    assert kind == "y"
    # Doubled: Postfix turns "%%" into "%" (a lone "%" it drops), Sendmail formats it.
    assert data == b"550-5.7.1 first 100%% line\r\n550 5.7.1 Reference RB-1\0"
    ((_, accented),) = p.decode_replies(p.reply_code(550, "5.7.1", ["École Sainte-Thérèse \u2014 refusé"]))
    assert accented == b"550 5.7.1 Ecole Sainte-Therese ? refuse\0", "SMTP replies are ASCII"
    assert reply_lines("Refused: x. Reference RB-AAAA-BBBB.") == ["Refused: x.", "Reference RB-AAAA-BBBB."]
    with pytest.raises(ValueError):
        p.reply_code(250, "2.0.0", ["no"])


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("inet:127.0.0.1:8894", (socket.AF_INET, ("127.0.0.1", 8894))),
        ("inet:8894@127.0.0.1", (socket.AF_INET, ("127.0.0.1", 8894))),
        ("inet6:[::1]:8894", (socket.AF_INET6, ("::1", 8894))),
        ("unix:/run/school-milter/milter.sock", (socket.AF_UNIX, "/run/school-milter/milter.sock")),
    ],
)
def test_parse_address(spec: str, parsed: tuple[str, object]) -> None:
    assert parse_address(spec) == parsed


@pytest.mark.parametrize("spec", ["127.0.0.1:8894", "inet:127.0.0.1:http", "tcp:1", "unix:"])
def test_parse_address_errors(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_address(spec)


def test_a_full_disk_for_temporary_files_answers_452_and_later_mail_goes_through(
    rules: Rules, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bodies over spool_threshold go to a temporary file, here on a disk with 64 KiB left.
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))
    filler = fill_disk(small_disk, 64 * 1024)
    server = Running(rules, ServerLimits(spool_threshold=16_000))
    staff, colleague = "j.hughes@redborne.example", "a.patel@redborne.example"
    big = build(staff, colleague, "Minutes", "Minutes of the meeting.\n" * 12000)  # ~290 KB
    try:
        with server.connect() as sock:
            conn = negotiate(sock)
            kind, data = converse(conn, big, staff, [colleague])[-1]
            # The MTA keeps the message and retries; the reply says why and names a reference.
            assert kind == mc.SMFIR_REPLYCODE
            assert "452" in str(data) and "4.3.1 Insufficient system storage" in str(data), data
            decision = server.decision(1)
            assert decision.action == "tempfail" and decision.error == "temporary storage full"
            assert decision.reference in str(data)
            # The same connection goes on: a small message fits in memory and is scanned.
            replies = converse(conn, build(staff, colleague, "Rota", "Cover."), staff, [colleague])
            assert replies[-1][0] == mc.SMFIR_CONTINUE
        assert list(small_disk.iterdir()) == [filler], "no temporary file left behind"
        filler.unlink()
        with server.connect() as sock:
            conn = negotiate(sock)
            assert converse(conn, big, staff, [colleague])[-1][0] == mc.SMFIR_CONTINUE
        assert server.decision(3).action == "accept"
    finally:
        server.close()


# --- hostile and broken peers ------------------------------------------------------------------


def staff_message(body: str = "Hello,\n\nSee you tomorrow.\n", **kwargs: object) -> list[p.Command]:
    raw = build("j.hughes@redborne.example", "a.patel@redborne.example", "x", body, **kwargs)  # type: ignore[arg-type]
    headers, data = split_message(raw)
    return [
        p.MailFrom("j.hughes@redborne.example"),
        p.RcptTo("a.patel@redborne.example"),
        *[p.Header(n, b" " + v.encode()) for n, v in headers],
        p.EndOfHeaders(),
        p.BodyChunk(data),
        p.EndOfMessage(),
    ]


def postfix_negotiation(sock: socket.socket, actions: int = 0x1FF) -> None:
    (optneg,) = exchange(sock, p.OptionNegotiation(6, actions, 0x1FFFFF), expect=1)
    assert optneg[0] == "O"


def test_a_message_without_a_client_address_is_not_trusted_as_the_schools(running: Running) -> None:
    """A forged school sender with no client address from the MTA (a local socket, or macros
    without {client_addr}) is mail from outside: held, not judged as staff mail."""
    with running.connect() as sock:
        postfix_negotiation(sock)
        replies = exchange(sock, p.DefineMacros("M", {"i": "Q1"}), *staff_message("you are a fucking idiot"))
    kinds = [r[0] for r in replies]
    assert "q" in kinds, kinds
    decision = running.decision(1)
    assert decision.result is not None and decision.result.verdict.direction.value == "inbound"


def test_a_messages_macros_do_not_outlive_its_abort(running: Running) -> None:
    with running.connect() as sock:
        postfix_negotiation(sock)
        sock.sendall(
            b"".join(
                p.encode_command(c)
                for c in (
                    p.DefineMacros("M", {"i": "ABORTED1", "client_addr": "203.0.113.9"}),
                    p.MailFrom("j.hughes@redborne.example"),
                    p.Abort(),
                )
            )
        )
        replies = exchange(sock, p.DefineMacros("M", {"client_addr": "127.0.0.1"}), *staff_message())
    assert replies[-1][0] == "c"
    decision = running.decision(1)
    assert decision.queue_id is None, "the aborted message's queue id is gone"
    assert decision.result is not None and decision.result.verdict.direction.value == "internal"


def test_a_fix_the_mta_cannot_make_is_a_tempfail_not_unfixed_mail(tmp_path: Path) -> None:
    from milter.policy.loader import load_rules
    from tests.conftest import copy_rules

    root = copy_rules(tmp_path / "rules")
    policy = root / "policy.yaml"
    policy.write_text(
        policy.read_text().replace(
            "  - detector: missing_bcc\n    action: reject", "  - detector: missing_bcc\n    action: fix"
        )
    )
    parents = ["jane.taylor@gmail.example", "david.taylor@outlook.example", "anita.shah@yahoo.example"]
    raw = build("office@redborne.example", parents, "Trip", "Consent forms by Friday.")
    headers, data = split_message(raw)
    message = [
        p.MailFrom("office@redborne.example"),
        *[p.RcptTo(a) for a in parents],
        *[p.Header(n, b" " + v.encode()) for n, v in headers],
        p.EndOfHeaders(),
        p.BodyChunk(data),
        p.EndOfMessage(),
    ]
    server = Running(load_rules(root))
    try:
        with server.connect() as sock:  # an MTA that lets us change headers: fixed
            postfix_negotiation(sock)
            fixed = exchange(sock, p.DefineMacros("M", {"client_addr": "127.0.0.1"}), *message)
        assert [r[0] for r in fixed][-1] == "c" and any(r[0] == "m" for r in fixed)
        with server.connect() as sock:  # one that does not (no SMFIF_CHGHDRS): held back
            postfix_negotiation(sock, actions=0x1FF & ~p.CHANGE_HEADERS)
            refused = exchange(sock, p.DefineMacros("M", {"client_addr": "127.0.0.1"}), *message)
        kind, data = refused[-1]
        assert kind == "y" and data.startswith(b"451 4.7.0") and b"Reference RB-" in data
        assert not any(r[0] == "m" for r in refused)
        assert server.decision(2).action == "tempfail"
    finally:
        server.close()


def test_a_peer_that_does_not_read_our_answers_is_cut_off(rules: Rules) -> None:
    limits = ServerLimits(max_connections=2, idle_timeout=1.0, packet_timeout=1.0)
    server = Running(rules, limits)
    try:
        with socket.socket() as sock:
            # A small receive window, so our unread answers back up in the gateway quickly.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            # Every step wants an answer; we send steps and never read a single one.
            exchange(sock, p.OptionNegotiation(6, 0x1FF, 0), expect=1)
            sock.setblocking(False)
            helo = p.encode_command(p.Helo("client.example")) * 20_000
            pending, sent, started = memoryview(helo), 0, time.monotonic()
            while time.monotonic() - started < 8 and server.server.active:
                try:
                    done = sock.send(pending)
                except BlockingIOError:
                    time.sleep(0.05)
                    continue
                except OSError:
                    break  # reset by the gateway
                sent += done
                pending = pending[done:] or memoryview(helo)  # whole packets only
            assert sent > 1_000_000, "the gateway's answers backed up"
            deadline = time.monotonic() + 10
            while server.server.active and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.server.active == 0, "the connection slot is free again"
        with server.connect() as sock:
            postfix_negotiation(sock)
    finally:
        server.close()


def test_too_many_header_lines_are_refused_before_they_fill_memory(rules: Rules) -> None:
    server = Running(rules, ServerLimits(max_headers=50))
    try:
        with server.connect() as sock:
            postfix_negotiation(sock)
            many = [p.Header(f"X-Filler-{i}", b" x") for i in range(60)]
            replies = exchange(
                sock, p.MailFrom("a@b.example"), p.RcptTo("c@d.example"), *many, p.EndOfMessage()
            )
            kind, data = replies[-1]
            assert kind == "y" and data.startswith(b"552 5.3.4 Too many header lines")
            assert server.decision(1).error == "too many headers"
            # The connection goes on with the next message.
            assert (
                exchange(sock, p.DefineMacros("M", {"client_addr": "127.0.0.1"}), *staff_message())[-1][0]
                == "c"
            )
    finally:
        server.close()


def test_commands_before_a_bad_packet_in_the_same_read_are_answered(running: Running) -> None:
    with running.connect() as sock:
        postfix_negotiation(sock)
        commands = [p.DefineMacros("M", {"client_addr": "127.0.0.1"}), *staff_message()]
        sock.sendall(b"".join(p.encode_command(c) for c in commands) + b"\0\0\0\0")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert p.decode_replies(data)[-1][0] == "c", "the message got its answer before the connection closed"


class StuckClamd:
    """A clamd socket that accepts connections and never answers (clamd hung)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


def test_a_stuck_clamd_holds_one_small_message_not_the_whole_worker(tmp_path: Path) -> None:
    """Small mail is scanned on the event loop; its clamd question must not block the loop:
    keep-alives flow, scan_timeout answers 451, and other connections are served meanwhile."""
    from milter.policy.loader import load_rules
    from tests.conftest import copy_rules

    clamd = StuckClamd(Path(tempfile.mkdtemp(prefix="stuck-clamd-")) / "clamd.sock")
    root = copy_rules(tmp_path / "rules", virus_scan=True)
    policy = root / "policy.yaml"
    text = policy.read_text().replace("clamd: unix:/run/clamav/clamd.ctl", f"clamd: unix:{clamd.path}")
    policy.write_text(text.replace("clamd_conf: /etc/clamav/clamd.conf", "clamd_conf: ''"))
    limits = ServerLimits(inline_scan_bytes=65_536, scan_timeout=1.5, progress_interval=0.2)
    server = Running(load_rules(root), limits)
    try:
        attachment = [("worksheet.txt", b"Question 1", "text/plain")]
        with server.connect() as sock, server.connect() as other:
            postfix_negotiation(sock)
            sock.sendall(
                b"".join(
                    p.encode_command(c)
                    for c in (
                        p.DefineMacros("M", {"client_addr": "127.0.0.1"}),
                        *staff_message(attachments=attachment),
                    )
                )
            )
            time.sleep(0.3)  # the scan is waiting on clamd now
            started = time.monotonic()
            postfix_negotiation(other)  # answered at once although a scan waits
            assert time.monotonic() - started < 0.5
            replies = exchange(sock)
        kinds = [r[0] for r in replies]
        assert kinds.count("p") >= 3, kinds
        kind, data = replies[-1]
        assert kind == "y" and data.startswith(b"451") and b"Reference RB-" in data
    finally:
        server.close()
        clamd.close()


class SlowStore:
    """Stands in for FollowUp with a store that is locked by someone else: hold() waits."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def hold(self, *args: object) -> str:
        time.sleep(self.seconds)
        return "late"


def test_a_slow_store_holds_the_answer_no_longer_than_scan_timeout(rules: Rules) -> None:
    limits = ServerLimits(scan_timeout=0.8, progress_interval=0.2)
    server = Running(rules, limits, followup=SlowStore(3))
    try:
        with server.connect() as sock:
            postfix_negotiation(sock)
            started = time.monotonic()
            replies = exchange(
                sock, p.DefineMacros("M", {"client_addr": "203.0.113.9"}), *staff_message("you fucking idiot")
            )
            took = time.monotonic() - started
        kinds = [r[0] for r in replies]
        assert kinds.count("p") >= 2, kinds
        kind, data = replies[-1]
        assert kind == "y" and data.startswith(b"451") and b"Reference RB-" in data
        assert took < 2.5, "answered at scan_timeout, not when the store was done"
    finally:
        server.close()


def test_stopping_with_idle_connections_logs_no_errors(
    rules: Rules, caplog: pytest.LogCaptureFixture
) -> None:
    server = Running(rules)
    with server.connect() as first, server.connect() as second:
        postfix_negotiation(first)
        postfix_negotiation(second)
        with caplog.at_level("ERROR"):
            server.close()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


def test_fail_open_removes_forged_result_headers_too(tmp_path: Path) -> None:
    from milter.policy.loader import load_rules
    from tests.conftest import copy_rules

    root = copy_rules(tmp_path / "rules")
    policy = root / "policy.yaml"
    policy.write_text(
        policy.read_text().replace("on_failure:\n  default: tempfail", "on_failure:\n  default: fail_open")
    )

    def broken(raw: bytes, envelope: Envelope, rules: Rules) -> Scan:
        raise RuntimeError("boom")

    server = Running(load_rules(root), scanner=broken)
    forged = {"X-School-Policy": "accept; ref=FAKE", "X-School-Policy-Findings": "none (forged)"}
    try:
        with server.connect() as sock:
            postfix_negotiation(sock)
            replies = exchange(sock, *staff_message(headers=forged))
        deleted = [data for kind, data in replies if kind == "m"]
        assert sorted(d[4:].split(b"\0")[0] for d in deleted) == [
            b"X-School-Policy",
            b"X-School-Policy-Findings",
        ]
        inserted = [data for kind, data in replies if kind == "i"]
        assert len(inserted) == 1 and b"unscanned; ref=RB-" in inserted[0]
        assert replies[-1][0] == "c"
    finally:
        server.close()
