"""`school-milter serve` as a process: workers, reload on SIGHUP, metrics, SIGTERM, bad config."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP

from milter import protocol as p
from milter.store import Store
from tests.conftest import REPO, copy_rules
from tests.mail import build
from tests.test_milter_protocol import converse, negotiate
from tests.test_smtp_mode import OUTSIDER, REFERENCE, STAFF, STAFF2, NextHop, crlf, transaction
from tests.tls_certs import ServerCert, TestCA


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    def __init__(
        self, rules: Path, tmp: Path, *extra: str, port: int | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.log_path = tmp / "daemon.log"
        self.log_file = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "milter",
                "--rules",
                str(rules),
                "serve",
                "--milter",
                f"inet:127.0.0.1:{self.port}",
                "--metrics",
                f"127.0.0.1:{self.metrics_port}",
                # The test's own store, never the repository's var/.
                *(
                    []
                    if any(a.startswith("--database") for a in extra)
                    else ["--database", f"sqlite:///{tmp}/q.db"]
                ),
                # Guidance and alerts go to a port of the test's own where nothing listens (they
                # wait in the outbox), never to 127.0.0.1:10026, which a running gateway may own.
                *([] if "--reinject" in extra else ["--reinject", f"127.0.0.1:{free_port()}"]),
                *extra,
            ],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        self.wait_for_log("worker ready")

    def log_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def wait_for_log(self, message: str, count: int = 1, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for e in self.log_lines() if e["message"] == message) >= count:
                return
            assert self.proc.poll() is None, self.log_path.read_text()
            time.sleep(0.05)
        raise AssertionError(f"no {message!r} in log:\n{self.log_path.read_text()}")

    def send(self, body: str, subject: str = "s") -> tuple[str, dict[str, object]]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            conn = negotiate(sock)
            raw = build("j.hughes@redborne.example", "a.patel@redborne.example", subject, body)
            return converse(conn, raw, "j.hughes@redborne.example", ["a.patel@redborne.example"])[-1]  # type: ignore[no-any-return]

    def metrics(self) -> str:
        return (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            self.log_file.close()


@pytest.fixture
def rules_copy(tmp_path: Path) -> Path:
    copy_rules(tmp_path / "rules")
    return tmp_path / "rules"


@pytest.fixture
def daemon(rules_copy: Path, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(rules_copy, tmp_path, "--workers", "2")
    d.wait_for_log("worker ready", count=2)
    yield d
    d.stop()


def test_workers_answer_and_log_decisions_without_content(daemon: Daemon) -> None:
    assert daemon.send("hello")[0] == "c"
    assert daemon.send("this is fucking late")[0] == "y"
    daemon.wait_for_log("decision", count=2)
    decisions = [e for e in daemon.log_lines() if e.get("event") == "decision"]
    assert [d["action"] for d in decisions] == ["accept", "reject"]
    assert decisions[1]["findings"] == ["obscene_language/profanity/strong"]
    assert str(decisions[1]["reference"]).startswith("RB-")
    text = daemon.log_path.read_text()
    assert "fucking" not in text and "f******" not in text and "a.patel" not in text


def test_metrics_add_up_across_workers(daemon: Daemon) -> None:
    for _ in range(4):
        daemon.send("this is shit")
    daemon.wait_for_log("decision", count=4)
    text = daemon.metrics()
    assert 'school_milter_messages_total{action="reject"} 4.0' in text
    assert 'school_milter_findings_total{category="profanity",detector="obscene_language"} 4.0' in text
    assert "school_milter_scan_seconds_count 4.0" in text
    assert 'school_milter_dependency_up{dependency="rules"} 1.0' in text


def test_reload_bad_rules_keeps_running_then_good_rules_apply(daemon: Daemon, rules_copy: Path) -> None:
    policy = rules_copy / "policy.yaml"
    good = policy.read_text()
    policy.write_text(good + "\nbroken: [\n")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for_log("rules reload failed; keeping the rules in force", count=2)
    assert daemon.send("this is shit")[0] == "y", "old rules still refuse obscene mail"
    assert 'school_milter_dependency_up{dependency="rules"} 0.0' in daemon.metrics()
    # A good change: shouting from staff is now refused instead of tagged.
    policy.write_text(
        good.replace("    action: tag\n    subject_prefix:", "    action: reject\n    subject_prefix:")
    )
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for_log("rules reloaded", count=2)
    assert daemon.send("fine", subject="WHO TOOK THE SCIENCE PROJECTOR AGAIN")[0] == "y"
    # The change of rules is in the audit log once (not once per worker); the failed reload is not.
    store = Store(f"sqlite:///{daemon.log_path.parent}/q.db")
    changes = store.audit_entries(action="rules_change")
    store.close()
    assert len(changes) == 1 and changes[0].target == str(rules_copy)


def test_sigterm_stops_cleanly(daemon: Daemon) -> None:
    assert daemon.stop() == 0
    assert any(e["message"] == "stopping: finishing messages in flight" for e in daemon.log_lines())


def test_refuses_to_start_on_broken_rules(rules_copy: Path, tmp_path: Path) -> None:
    (rules_copy / "directory.csv").write_text("address,role\nx@y.example,janitor\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "milter",
            "--rules",
            str(rules_copy),
            "serve",
            "--milter",
            "inet:127.0.0.1:0",
            "--metrics",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2
    assert "directory.csv:2" in result.stderr and "janitor" in result.stderr


def test_bad_config_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text('[gateway]\nworkers = "many"\n')
    result = subprocess.run(
        [sys.executable, "-m", "milter", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2 and str(config) in result.stderr and "workers" in result.stderr


def test_stage_timeouts_come_from_the_config_file(rules_copy: Path, tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text("[gateway]\nnegotiate_timeout = 0.5\npacket_timeout = 0.7\nidle_timeout = 60\n")
    d = Daemon(rules_copy, tmp_path, "--config", str(config))
    try:
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as silent:
            started = time.monotonic()
            assert silent.recv(10) == b"", "a client that never negotiates is hung up on"
            assert 0.4 < time.monotonic() - started < 5
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as trickle:
            negotiate(trickle)
            started = time.monotonic()
            trickle.sendall(b"\x00\x00\x10")  # the start of a 4 KiB packet, and then nothing
            assert trickle.recv(10) == b"", "a packet that stalls is cut off"
            assert 0.6 < time.monotonic() - started < 5
    finally:
        assert d.stop() == 0


# --- SMTP mode in every worker ----------------------------------------------------------------


class Sink:
    """The next hop SMTP mode relays to: tests.test_smtp_mode.NextHop on a loop thread."""

    def __init__(self) -> None:
        self.hop = NextHop()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _serve(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: SMTP(self.hop, hostname="nexthop.test", loop=loop), "127.0.0.1", 0
        )

    def subjects(self) -> list[str]:
        found = (re.search(rb"\r\nSubject: (.*)\r\n", raw) for _, _, raw in self.hop.received)
        return [m.group(1).decode() for m in found if m]

    def close(self) -> None:
        if self.hop.gate is not None:
            self.hop.gate.set()
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class SmtpDaemon(Daemon):
    """`serve --workers N` with SMTP mode (and the milter) relaying to a Sink."""

    def __init__(self, rules: Path, tmp: Path, sink: Sink, workers: int = 2) -> None:
        self.sink = sink
        self.smtp_port = free_port()
        self.spool = tmp / "spool"
        super().__init__(
            rules,
            tmp,
            "--workers",
            str(workers),
            "--smtp",
            f"127.0.0.1:{self.smtp_port}",
            "--next-hop",
            f"127.0.0.1:{sink.port}",
            "--spool",
            str(self.spool),
            # No store: nothing (guidance, alerts) is mailed out besides the relayed messages.
            "--database=",
        )

    def smtp(
        self, raw: bytes, mail_from: str = STAFF, rcpt_to: tuple[str, ...] = (STAFF2,)
    ) -> tuple[int, str]:
        with smtplib.SMTP("127.0.0.1", self.smtp_port, local_hostname="client.test", timeout=30) as client:
            client.ehlo()
            return transaction(client, raw, mail_from, list(rcpt_to))

    def ready_pids(self) -> list[int]:
        return [int(str(e["pid"])) for e in self.log_lines() if e["message"] == "worker ready"]

    def handled_by(self) -> dict[str, int]:
        """Reference -> pid of the worker whose SMTP mode handled the message."""
        found: dict[str, int] = {}
        for entry in self.log_lines():
            match = REFERENCE.match(str(entry["message"]))
            if entry["logger"] == "milter.smtp_mode" and "pid" in entry and match:
                found[match.group()] = int(str(entry["pid"]))
        return found

    def incoming(self) -> list[Path]:
        return sorted((self.spool / "incoming").iterdir())

    def wait_for_incoming(self, count: int, timeout: float = 10) -> list[Path]:
        deadline = time.monotonic() + timeout
        while len(files := self.incoming()) < count:
            assert time.monotonic() < deadline, f"no message in {self.spool}/incoming"
            time.sleep(0.01)
        return files


@pytest.fixture
def smtp_daemon(rules_copy: Path, tmp_path: Path) -> Iterator[SmtpDaemon]:
    sink = Sink()
    try:
        d = SmtpDaemon(rules_copy, tmp_path, sink)
        try:
            d.wait_for_log("worker ready", count=2)
            yield d
        finally:
            if sink.hop.gate is not None:
                sink.hop.gate.set()  # a message held in flight would hold up the stop
            d.stop()
    finally:
        sink.close()


def send_clean(d: SmtpDaemon, numbers: range) -> dict[int, tuple[int, str]]:
    """Clean messages "Rota N", each on its own connection, eight connections at a time."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = pool.map(
            lambda n: d.smtp(build(STAFF, STAFF2, f"Rota {n}", f"Cover for period {n}.")), numbers
        )
        return dict(zip(numbers, replies, strict=True))


def references(replies: dict[int, tuple[int, str]]) -> list[str]:
    found = [REFERENCE.search(text) for _, text in replies.values()]
    return [m.group() for m in found if m]


def test_smtp_mode_runs_in_every_worker_and_survives_a_killed_worker(smtp_daemon: SmtpDaemon) -> None:
    d = smtp_daemon
    workers = set(d.ready_pids())
    assert len(workers) == 2
    assert not any("first worker" in str(e["message"]) for e in d.log_lines())

    # Parallel connections until both workers have taken some (the kernel picks who accepts).
    replies: dict[int, tuple[int, str]] = {}
    for batch in range(10):
        replies |= send_clean(d, range(batch * 16, (batch + 1) * 16))
        assert all(code == 250 for code, _ in replies.values()), replies
        handled = d.handled_by()
        if {handled[ref] for ref in references(replies)} == workers:
            break
    assert {handled[ref] for ref in references(replies)} == workers
    # Every message reached the next hop, once.
    assert sorted(d.sink.subjects()) == sorted(f"Rota {n}" for n in replies)

    code, text = d.smtp(build(STAFF, OUTSIDER, "Re: late delivery", "You are all sh1t."), rcpt_to=(OUTSIDER,))
    assert code == 550 and text.startswith("5.7.1 Message refused under clause 5.5"), text
    assert len(d.sink.hop.received) == len(replies)
    # The log says what happened, never to whom or about what.
    text = d.log_path.read_text()
    assert "redborne.example" not in text and "elsewhere.example" not in text and "Rota" not in text
    # SMTP mode's decision lines carry what the milter path's do: size, direction, findings.
    refused = [e for e in d.log_lines() if e.get("event") == "decision" and e.get("action") == "reject"]
    assert refused and int(str(refused[0]["size"])) > 0
    assert refused[0]["direction"] == "outbound" and "5.5" in refused[0]["clauses"]  # type: ignore[operator]
    assert any(str(f).startswith("obscene_language/") for f in refused[0]["findings"])  # type: ignore[attr-defined]

    # A worker killed outright is replaced, and the new one takes SMTP connections too.
    killed = min(workers)
    os.kill(killed, signal.SIGKILL)
    d.wait_for_log("worker ready", count=3)
    assert any(
        f"(pid {killed}) exited with status -9; restarting" in str(e["message"]) for e in d.log_lines()
    )
    [replacement] = set(d.ready_pids()) - workers
    workers = workers - {killed} | {replacement}
    more: dict[int, tuple[int, str]] = {}
    for batch in range(10):
        more |= send_clean(d, range(1000 + batch * 16, 1000 + (batch + 1) * 16))
        assert all(code == 250 for code, _ in more.values()), more
        handled = d.handled_by()
        if replacement in {handled[ref] for ref in references(more)}:
            break
    assert {handled[ref] for ref in references(more)} <= workers
    assert replacement in {handled[ref] for ref in references(more)}
    assert sorted(d.sink.subjects()) == sorted(f"Rota {n}" for n in replies | more)
    assert d.incoming() == []

    # SIGTERM stops every worker and the parent; nobody listens any more.
    assert d.stop() == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", d.smtp_port), timeout=2).close()


def test_a_restarting_worker_leaves_a_live_workers_message_alone_and_reports_a_dead_ones(
    smtp_daemon: SmtpDaemon,
) -> None:
    d = smtp_daemon
    workers = d.ready_pids()

    def left_over_reports() -> list[dict[str, object]]:
        return [e for e in d.log_lines() if e.get("event") == "spool_left_over"]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # A message held in flight: the next hop answers DATA only when the gate opens.
        gate = d.sink.hop.gate = threading.Event()
        first = pool.submit(d.smtp, crlf(build(STAFF, STAFF2, "Rota 1", "Cover for period 1.")))
        [in_flight] = d.wait_for_incoming(1)
        holder = int(in_flight.name.split(".")[1])
        assert holder in workers
        # The other worker dies and is replaced; the newcomer must not count or touch the message.
        [other] = set(workers) - {holder}
        os.kill(other, signal.SIGKILL)
        d.wait_for_log("worker ready", count=3)
        assert left_over_reports() == []
        assert d.incoming() == [in_flight]
        gate.set()
        code, text = first.result(30)
        assert code == 250, text
        assert d.sink.subjects() == ["Rota 1"] and d.incoming() == []

        # Now the worker handling a message is killed: the client was never told 250, and the
        # worker that replaces it reports the message left over and keeps it.
        gate = d.sink.hop.gate = threading.Event()
        raw = crlf(build(STAFF, STAFF2, "Rota 2", "Cover for period 2."))
        second = pool.submit(d.smtp, raw)
        [in_flight] = d.wait_for_incoming(1)
        holder = int(in_flight.name.split(".")[1])
        os.kill(holder, signal.SIGKILL)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            second.result(30)
        d.wait_for_log("worker ready", count=4)
        [replacement] = set(d.ready_pids()[3:])
        [report] = left_over_reports()
        assert (report["count"], report["pid"]) == (1, replacement)
        assert d.incoming() == [in_flight] and in_flight.read_bytes() == raw
        gate.set()

    # Mail still flows through both live workers.
    assert d.smtp(build(STAFF, STAFF2, "Rota 3", "Cover for period 3."))[0] == 250


def test_smtp_mode_with_one_worker(rules_copy: Path, tmp_path: Path) -> None:
    sink = Sink()
    try:
        d = SmtpDaemon(rules_copy, tmp_path, sink, workers=1)
        try:
            assert d.smtp(build(STAFF, STAFF2, "Rota 1", "Cover for period 1."))[0] == 250
            code, _ = d.smtp(build(STAFF, OUTSIDER, "Re: late", "You are all sh1t."), rcpt_to=(OUTSIDER,))
            assert code == 550
            assert sink.subjects() == ["Rota 1"] and d.incoming() == []
            assert set(d.handled_by().values()) == {d.proc.pid}
        finally:
            assert d.stop() == 0
    finally:
        sink.close()


def test_smtp_address_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "milter",
                "serve",
                "--workers",
                "2",
                "--milter",
                "inet:127.0.0.1:0",
                "--smtp",
                f"127.0.0.1:{port}",
                "--metrics",
                "",
                "--database=",
                "--spool",
                str(tmp_path / "spool"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            check=False,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "worker ready" not in result.stderr


# --- SMTP mode's TLS through `serve` -----------------------------------------------------------


def serve_and_fail(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "milter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def _answers_on_unix_socket(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        negotiate(sock)
        return True


def test_a_unix_socket_in_use_is_never_taken_and_a_stale_one_is_replaced(
    rules_copy: Path, tmp_path: Path
) -> None:
    path = tmp_path / "milter.sock"
    (tmp_path / "first").mkdir()
    first = Daemon(rules_copy, tmp_path / "first", "--milter", f"unix:{path}", "--metrics=")
    try:
        assert _answers_on_unix_socket(path)
        # A second gateway started by mistake on the same socket stops, naming the owner...
        second = serve_and_fail(
            "--rules", str(rules_copy), "serve", "--milter", f"unix:{path}", "--metrics=", "--database="
        )
        assert second.returncode == 1
        assert f"another process is listening on {path}" in second.stderr
        # ...and the running one keeps its socket.
        assert _answers_on_unix_socket(path)
    finally:
        assert first.stop() == 0
    # A socket file nobody listens on (a gateway killed with SIGKILL leaves one) is replaced.
    if not path.exists():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as leftover:
            leftover.bind(str(path))
    (tmp_path / "third").mkdir()
    third = Daemon(rules_copy, tmp_path / "third", "--milter", f"unix:{path}", "--metrics=")
    try:
        assert _answers_on_unix_socket(path)
    finally:
        assert third.stop() == 0


def test_a_file_that_is_not_a_socket_is_not_replaced(rules_copy: Path, tmp_path: Path) -> None:
    path = tmp_path / "milter.sock"
    path.write_text("someone's file\n")
    result = serve_and_fail(
        "--rules", str(rules_copy), "serve", "--milter", f"unix:{path}", "--metrics=", "--database="
    )
    assert result.returncode == 1 and f"{path} exists and is not a socket" in result.stderr
    assert path.read_text() == "someone's file\n"


@pytest.mark.parametrize("fault", ["missing certificate", "key of another certificate", "CA file not PEM"])
def test_smtp_tls_files_that_cannot_be_used_stop_the_start_naming_the_file(
    rules_copy: Path, tmp_path: Path, fault: str
) -> None:
    ca = TestCA(tmp_path / "ca")
    mine, other = ca.issue("gateway"), ca.issue("other")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cert, key, ca_file, named = {
        "missing certificate": (tmp_path / "nowhere.pem", mine.key, ca.cert_path, tmp_path / "nowhere.pem"),
        "key of another certificate": (mine.cert, other.key, ca.cert_path, other.key),
        "CA file not PEM": (mine.cert, mine.key, junk, junk),
    }[fault]
    port = free_port()
    result = serve_and_fail(
        "--rules",
        str(rules_copy),
        "serve",
        "--workers",
        "2",
        "--milter",
        "",
        "--smtp",
        f"127.0.0.1:{port}",
        "--smtp-tls-cert",
        str(cert),
        "--smtp-tls-key",
        str(key),
        "--next-hop-tls",
        "required",
        "--next-hop-tls-ca",
        str(ca_file),
        "--metrics",
        "",
        "--database=",
        "--spool",
        str(tmp_path / "spool"),
    )
    assert result.returncode == 2, result.stderr
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [error] = [e for e in logged if e["level"] == "error"]
    assert str(error["message"]).startswith("not starting: ") and error["event"] == "tls_setup_failed"
    assert str(named) in str(error["message"])
    assert "Traceback" not in result.stderr and "worker ready" not in result.stderr
    # It stopped before listening: the port is free.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("toml", "complaint"),
    [
        ('smtp_tls_cert = "/etc/ssl/gateway.pem"\n', "smtp_tls_cert and smtp_tls_key go together"),
        ("smtp_require_tls = true\n", "smtp_require_tls: Value error, needs smtp_tls_cert and smtp_tls_key"),
        ('smtp_tls_exempt = ["loopback"]\n', "'loopback' is not a network"),
        ('next_hop_tls = "may"\n', "next_hop_tls: Input should be 'opportunistic', 'required' or 'off'"),
    ],
)
def test_smtp_tls_settings_that_do_not_fit_are_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, complaint: str
) -> None:
    from milter.cli import main

    config = tmp_path / "gw.toml"
    config.write_text(f'[gateway]\nsmtp = "127.0.0.1:0"\n{toml}')
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and complaint in err


class TlsSink(Sink):
    """The Sink, offering STARTTLS with a certificate."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        super().__init__()

    async def _serve(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: SMTP(self.hop, hostname="nexthop.test", tls_context=self.context, loop=loop),
            "127.0.0.1",
            0,
        )


class TlsSmtpDaemon(SmtpDaemon):
    """SmtpDaemon's `serve --workers 2`, with a config file (the TLS settings) too."""

    def __init__(self, rules: Path, tmp: Path, sink: Sink, config: Path) -> None:
        self.sink = sink
        self.smtp_port = free_port()
        self.spool = tmp / "spool"
        Daemon.__init__(
            self,
            rules,
            tmp,
            "--config",
            str(config),
            "--workers",
            "2",
            "--smtp",
            f"127.0.0.1:{self.smtp_port}",
            "--next-hop",
            f"127.0.0.1:{sink.port}",
            "--spool",
            str(self.spool),
            "--database=",
        )


def test_smtp_tls_both_ways_in_every_worker(rules_copy: Path, tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    gateway_cert = ca.issue("gateway")
    # The next hop is reached as 127.0.0.1; its certificate names it only by host name.
    sink = TlsSink(ca.issue("nexthop", names=("nexthop.redborne.test",)).server_context())
    config = tmp_path / "gw.toml"
    config.write_text(
        "[gateway]\n"
        f'smtp_tls_cert = "{gateway_cert.cert}"\n'
        f'smtp_tls_key = "{gateway_cert.key}"\n'
        "smtp_require_tls = true\n"
        # Only 127.0.0.1 is exempt; the clients below come from 127.0.0.2, as another host would.
        'smtp_tls_exempt = ["127.0.0.1/32"]\n'
        'next_hop_tls = "required"\n'
        f'next_hop_tls_ca = "{ca.cert_path}"\n'
        'next_hop_tls_name = "nexthop.redborne.test"\n'
    )
    try:
        d = TlsSmtpDaemon(rules_copy, tmp_path, sink, config)
        try:
            d.wait_for_log("worker ready", count=2)
            workers = set(d.ready_pids())
            _send_over_tls_until_every_worker_has_some(d, ca, workers)
        finally:
            d.stop()
    finally:
        sink.close()


def _send_over_tls_until_every_worker_has_some(d: SmtpDaemon, ca: TestCA, workers: set[int]) -> None:
    """Clients from 127.0.0.2: refused before STARTTLS, sent after it; checked end to end."""

    def send(n: int) -> tuple[int, str, str | None]:
        with smtplib.SMTP(
            "127.0.0.1",
            d.smtp_port,
            local_hostname="client.test",
            timeout=30,
            source_address=("127.0.0.2", 0),
        ) as client:
            client.ehlo()
            refused = client.mail(STAFF)
            assert refused == (530, b"5.7.0 Must issue a STARTTLS command first"), refused
            client.starttls(context=ca.client_context())
            version = client.sock.version() if isinstance(client.sock, ssl.SSLSocket) else None
            client.ehlo()
            code, text = transaction(client, build(STAFF, STAFF2, f"Rota {n}", "Cover."), STAFF, [STAFF2])
            return code, text, version

    # Connections until both workers have taken some (the kernel picks who accepts).
    replies: dict[int, tuple[int, str, str | None]] = {}
    for batch in range(10):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            numbers = range(batch * 8, (batch + 1) * 8)
            replies |= dict(zip(numbers, pool.map(send, numbers), strict=True))
        assert all(code == 250 for code, _, _ in replies.values()), replies
        handled = d.handled_by()
        by = {handled[m.group()] for _, text, _ in replies.values() if (m := REFERENCE.search(text))}
        if by == workers:
            break
    assert by == workers
    assert all(version in ("TLSv1.2", "TLSv1.3") for _, _, version in replies.values())
    # Every message reached the next hop once, over verified TLS.
    assert sorted(d.sink.subjects()) == sorted(f"Rota {n}" for n in replies)
    assert all(version in ("TLSv1.2", "TLSv1.3") for version in d.sink.hop.tls)
    lines = [e for e in d.log_lines() if e["logger"] == "milter.smtp_mode" and "client_tls" in e]
    assert len(lines) == len(replies)
    assert all(e["client_tls"] != "none" and e["relay_tls"] != "none" for e in lines)
    assert "redborne.example" not in d.log_path.read_text()
    assert d.stop() == 0


def _served_certificate(d: SmtpDaemon, ca: TestCA) -> tuple[int, int]:
    """The serial number of the certificate a STARTTLS client is given now, and the reply to a message."""
    with smtplib.SMTP("127.0.0.1", d.smtp_port, local_hostname="client.test", timeout=30) as client:
        client.starttls(context=ca.client_context())
        assert isinstance(client.sock, ssl.SSLSocket)
        peer = client.sock.getpeercert()
        assert peer is not None
        serial = int(str(peer["serialNumber"]), 16)
        client.ehlo()
        code, _text = transaction(client, build(STAFF, STAFF2, "Rota", "Cover."), STAFF, [STAFF2])
        return serial, code


def _serial(cert: Path) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def _wait_for_event(d: Daemon, event: str, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = [e for e in d.log_lines() if e.get("event") == event]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {count} {event!r} in log:\n{d.log_path.read_text()}")


@contextlib.contextmanager
def _daemon_with_certificate(rules: Path, tmp_path: Path, cert: ServerCert) -> Iterator[SmtpDaemon]:
    """`serve --workers 2` in SMTP mode offering STARTTLS with `cert`, both workers ready."""
    config = tmp_path / "gw.toml"
    config.write_text(f'[gateway]\nsmtp_tls_cert = "{cert.cert}"\nsmtp_tls_key = "{cert.key}"\n')
    sink = Sink()
    try:
        d = TlsSmtpDaemon(rules, tmp_path, sink, config)
        try:
            d.wait_for_log("worker ready", count=2)
            yield d
        finally:
            assert d.stop() == 0
    finally:
        sink.close()


def test_sighup_takes_a_renewed_certificate_and_keeps_the_old_one_when_the_new_is_broken(
    rules_copy: Path, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path / "ca")
    live = ca.issue("live", days=5)  # the files the config names, as certbot's live/ directory
    first = _serial(live.cert)
    with _daemon_with_certificate(rules_copy, tmp_path, live) as d:
        # Five days left: each worker warns at start, and the metric says when.
        warnings = _wait_for_event(d, "tls_certificate_expiring", 2)
        assert "expires in 4 day(s)" in str(warnings[0]["message"])
        expiry = re.search(
            r"^school_milter_tls_certificate_expiry_timestamp_seconds (\S+)$", d.metrics(), re.M
        )
        assert expiry and abs(float(expiry.group(1)) - (time.time() + 5 * 86400)) < 600
        assert {_served_certificate(d, ca) for _ in range(6)} == {(first, 250)}

        renewed = ca.issue("renewed", days=90)
        for path, new in ((live.cert, renewed.cert), (live.key, renewed.key)):
            os.replace(new, path)
        d.proc.send_signal(signal.SIGHUP)
        _wait_for_event(d, "tls_reloaded", 2)
        # Every worker now hands out the renewed certificate (six connections, two workers).
        assert {_served_certificate(d, ca) for _ in range(6)} == {(_serial(live.cert), 250)}
        assert _serial(live.cert) != first
        assert len([e for e in d.log_lines() if e.get("event") == "tls_certificate_expiring"]) == 2

        # A renewal that went wrong: the key is not PEM. The certificate in force stays.
        live.key.write_text("not a key\n")
        d.proc.send_signal(signal.SIGHUP)
        failures = _wait_for_event(d, "tls_reload_failed", 2)
        message = str(failures[0]["message"])
        assert str(live.key) in message and "no PEM private key" in message
        assert {_served_certificate(d, ca) for _ in range(6)} == {(_serial(live.cert), 250)}
        assert d.proc.poll() is None


def test_an_expired_certificate_is_an_error_in_the_log_but_mail_still_flows(
    rules_copy: Path, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path / "ca")
    expired = ca.issue("expired", days=-2)
    with _daemon_with_certificate(rules_copy, tmp_path, expired) as d:
        errors = _wait_for_event(d, "tls_certificate_expired", 2)
        assert errors[0]["level"] == "error" and str(expired.cert) in str(errors[0]["message"])
        # A client that checks certificates refuses it; one that does not (most MTAs) still sends.
        with pytest.raises(ssl.SSLCertVerificationError):
            _served_certificate(d, ca)
        assert d.smtp(build(STAFF, STAFF2, "Rota", "Cover."))[0] == 250


def test_the_deployed_config_names_every_setting_and_loads() -> None:
    """deploy/school-milter.toml is where an administrator looks for what can be set."""
    from milter.config import Settings, load_settings

    path = Path(__file__).resolve().parents[1] / "deploy" / "school-milter.toml"
    text = path.read_text()
    missing = [
        name for name in Settings.model_fields if f"\n{name} =" not in text and f"# {name} =" not in text
    ]
    assert missing == []
    load_settings(path, {})


def _ready_pids(d: Daemon) -> list[int]:
    return [int(str(e["pid"])) for e in d.log_lines() if e["message"] == "worker ready"]


def test_a_worker_that_replaces_a_dead_one_runs_the_reloaded_rules(daemon: Daemon, rules_copy: Path) -> None:
    policy = rules_copy / "policy.yaml"
    policy.write_text(policy.read_text().replace("reference_prefix: RB", "reference_prefix: ZZ"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for_log("rules reloaded", count=2)
    os.kill(_ready_pids(daemon)[0], signal.SIGKILL)
    daemon.wait_for_log("worker ready", count=3)
    for _ in range(12):  # the kernel picks which worker accepts: enough for both
        daemon.send("hello")
    daemon.wait_for_log("decision", count=12)
    references = [str(e["reference"]) for e in daemon.log_lines() if e.get("event") == "decision"]
    assert references and all(r.startswith("ZZ-") for r in references), references


def test_a_reload_asked_for_as_soon_as_the_gateway_is_ready_does_not_kill_it(
    rules_copy: Path, tmp_path: Path
) -> None:
    """systemd may send SIGHUP (ExecReload) right after READY=1."""
    for workers in ("1", "2"):
        notify = tmp_path / f"notify-{workers}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(str(notify))
        listener.settimeout(30)
        work = tmp_path / f"w{workers}"
        work.mkdir()
        log = (work / "daemon.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "milter", "--rules", str(rules_copy), "serve",
             "--milter", f"inet:127.0.0.1:{free_port()}", "--metrics", "", "--database", "",
             "--workers", workers],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "NOTIFY_SOCKET": str(notify)},
        )  # fmt: skip
        try:
            while b"READY=1" not in listener.recv(4096):
                pass
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            text = ""
            while time.monotonic() < deadline:
                text = (work / "daemon.log").read_text()
                if text.count('"rules reloaded"') >= int(workers):
                    break
                time.sleep(0.05)
            assert proc.poll() is None, text
            assert text.count('"rules reloaded"') >= int(workers), text
            assert "exited with status" not in text, "no worker died"
        finally:
            proc.terminate()
            proc.wait(20)
            log.close()
            listener.close()


def test_a_metrics_port_in_use_stops_the_start_cleanly_and_leaves_no_worker(
    rules_copy: Path, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        for workers in ("1", "2"):
            port = free_port()
            result = subprocess.run(
                [sys.executable, "-m", "milter", "--rules", str(rules_copy), "serve",
                 "--milter", f"inet:127.0.0.1:{port}", "--metrics", f"127.0.0.1:{busy}", "--database", "",
                 "--workers", workers],
                capture_output=True, text=True, cwd=REPO, timeout=60,
            )  # fmt: skip
            assert result.returncode == 2, result.stderr
            assert f"cannot serve metrics on 127.0.0.1:{busy}" in result.stderr
            assert "Traceback" not in result.stderr
            with socket.socket() as probe:  # no orphaned worker still serving the milter port
                assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_after_sigterm_new_connections_are_refused_not_left_waiting(rules_copy: Path, tmp_path: Path) -> None:
    """With workers, the parent's copy of the listening socket must not keep taking connections
    that nobody will serve while a worker finishes a message in flight."""
    from tests.test_milter_protocol import StuckClamd, exchange, postfix_negotiation, staff_message

    clamd = StuckClamd(Path(tempfile.mkdtemp(prefix="stuck-clamd-")) / "clamd.sock")
    policy = rules_copy / "policy.yaml"
    text = policy.read_text().replace("\n  virus_scan:\n    enabled: false\n", "\n  virus_scan:\n", 1)
    text = text.replace("clamd: unix:/run/clamav/clamd.ctl", f"clamd: unix:{clamd.path}")
    policy.write_text(text.replace("clamd_conf: /etc/clamav/clamd.conf", "clamd_conf: ''"))
    d = Daemon(rules_copy, tmp_path, "--workers", "2")
    try:
        d.wait_for_log("worker ready", count=2)
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as busy:
            postfix_negotiation(busy)
            attachment = [("worksheet.txt", b"Question 1", "text/plain")]
            commands = [
                p.DefineMacros("M", {"client_addr": "127.0.0.1"}),
                *staff_message(attachments=attachment),
            ]
            busy.sendall(b"".join(p.encode_command(c) for c in commands))
            time.sleep(0.5)  # the scan now waits on the stuck clamd: a message in flight
            d.proc.send_signal(signal.SIGTERM)
            d.wait_for_log("stopping: finishing messages in flight")
            time.sleep(0.5)
            started = time.monotonic()
            with socket.socket() as late:
                late.settimeout(5)
                try:
                    late.connect(("127.0.0.1", d.port))
                    answered = exchange(late, p.OptionNegotiation(6, 0x1FF, 0x1FFFFF), expect=1)
                except OSError:
                    answered = []
            assert answered == [] and time.monotonic() - started < 2, "refused at once, not left waiting"
            assert d.proc.poll() is None, "the message in flight is still being finished"
    finally:
        clamd.close()  # the scan in flight ends (clamd gone: 451), so the workers can stop
        d.stop()


def test_config_file_rules_are_used_unless_the_command_line_names_others(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\nrules = "{tmp_path}/no-such-rules"\nmilter = "inet:127.0.0.1:{free_port()}"\n'
    )
    checked = subprocess.run(
        [sys.executable, "-m", "milter", "serve", "--config", str(config), "--check"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 2 and "no-such-rules" in checked.stdout + checked.stderr


def test_a_setting_above_the_gateway_table_is_an_error_not_ignored(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('workers = 0\n[gateway]\nmilter = "inet:127.0.0.1:8894"\n')
    checked = subprocess.run(
        [sys.executable, "-m", "milter", "serve", "--config", str(config), "--check"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 2 and "workers: settings go under [gateway]" in checked.stderr
