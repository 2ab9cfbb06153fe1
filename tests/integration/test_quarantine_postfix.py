"""The quarantine store behind a real Postfix: held mail is stored and not delivered, a release
delivers it once through Postfix's milter-free listener, a crash between storing and
replying loses nothing, alerts and guidance reach people, a report blocks the next message.
"""

from __future__ import annotations

import email
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter.cli import main as cli
from milter.store import HeldFilter, Store
from tests.conftest import copy_rules
from tests.integration.conftest import PostfixFactory
from tests.integration.test_postfix_milter import XCLIENT, send_from_outside
from tests.mail import build
from tests.postfix_harness import MilterSettings, PostfixInstance, SmtpRefused, SmtpSink, free_port
from tests.test_daemon import Daemon

pytestmark = pytest.mark.postfix

OUTSIDER = "prize@spam.example"
STAFF = "j.hughes@redborne.example"
TEACHER = "a.patel@redborne.example"
OBSCENE = "you are a fucking disgrace and so is your school"


class Stack:
    def __init__(self, tmp: Path, factory: PostfixFactory, sink: SmtpSink) -> None:
        self.tmp = tmp
        self.rules = copy_rules(tmp / "rules")
        self.database = f"sqlite:///{tmp}/quarantine.db"
        self.reinject_port = free_port()
        self.milter_port = free_port()
        self.sink = sink
        self.daemons: list[Daemon] = []
        self.mta: PostfixInstance = factory(
            milter=f"inet:127.0.0.1:{self.milter_port}",
            milter_settings=MilterSettings(command_timeout="5s", content_timeout="10s"),
            extra_main_cf=XCLIENT,
            reinject_port=self.reinject_port,
        )

    def start_gateway(self, env: dict[str, str] | None = None) -> Daemon:
        workdir = self.tmp / f"daemon-{len(self.daemons)}"
        workdir.mkdir()
        daemon = Daemon(
            self.rules,
            workdir,
            "--database",
            self.database,
            "--reinject",
            f"127.0.0.1:{self.reinject_port}",
            port=self.milter_port,
            env=env,
        )
        self.daemons.append(daemon)
        return daemon

    def store(self) -> Store:
        return Store(self.database)

    def cli(self, *args: str) -> int:
        return cli(["--rules", str(self.rules), *args])

    def delivered_to(self, address: str) -> list[email.message.Message]:
        return [
            email.message_from_bytes(m.data)
            for m in self.sink.messages
            if address in [r.lower() for r in m.rcpt_tos]
        ]

    def wait_held(self, count: int = 1, timeout: float = 15) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with_store = self.store()
            try:
                held = [r.id for r in with_store.find(HeldFilter(kind="quarantine"))]
            finally:
                with_store.close()
            if len(held) >= count:
                return held
            time.sleep(0.2)
        raise AssertionError(f"fewer than {count} held messages after {timeout} s")


@pytest.fixture
def stack(tmp_path: Path, postfix_factory: PostfixFactory, sink: SmtpSink) -> Iterator[Stack]:
    stack = Stack(tmp_path, postfix_factory, sink)
    try:
        yield stack
    finally:
        for daemon in stack.daemons:
            daemon.stop()


def test_held_message_is_stored_not_delivered_and_released_once(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    stack.start_gateway()
    raw = build(OUTSIDER, TEACHER, "you won", OBSCENE)
    code, _ = send_from_outside(stack.mta, raw, OUTSIDER, [TEACHER])
    assert code == 250  # the sender learns nothing
    (held_id,) = stack.wait_held()
    store = stack.store()
    record = store.get(held_id)
    assert record.sender == OUTSIDER and record.recipients == (TEACHER,)
    assert record.direction == "inbound" and "obscene_language/profanity" in " ".join(record.categories)
    # SLT is alerted (mail through the reinject listener) without the message's words.
    alert = stack.sink.wait_for(1, timeout=15)[0]
    assert "slt@redborne.example" in alert.rcpt_tos
    assert held_id.encode() in alert.data and b"fucking" not in alert.data
    time.sleep(1.0)
    assert stack.delivered_to(TEACHER) == []  # held, not delivered
    assert stack.mta.hold_queue() == []  # in our store, not Postfix's hold queue

    reinject = f"127.0.0.1:{stack.reinject_port}"
    common = ["--database", stack.database, "--as", "tech1"]
    assert (
        stack.cli(
            "quarantine", "release", held_id, "--reason", "false positive", "--reinject", reinject, *common
        )
        == 0
    )
    deadline = time.monotonic() + 15
    while not stack.delivered_to(TEACHER) and time.monotonic() < deadline:
        time.sleep(0.1)
    (delivered,) = stack.delivered_to(TEACHER)
    assert delivered["Subject"] == "you won"
    assert delivered["X-School-Policy-Released"].startswith(f"{held_id} by tech1")
    # A second release is refused and nothing more arrives.
    assert (
        stack.cli("quarantine", "release", held_id, "--reason", "again", "--reinject", reinject, *common) == 3
    )
    assert "released, not held" in capsys.readouterr().err
    time.sleep(1.0)
    assert len(stack.delivered_to(TEACHER)) == 1
    actions = [(e.action, e.actor, e.reason) for e in store.audit_entries(target=held_id)]
    assert ("release", "tech1", "false positive") in actions
    store.close()


def test_daemon_killed_between_storing_and_replying_loses_nothing(stack: Stack) -> None:
    crashing = stack.start_gateway(env={"SCHOOL_MILTER_FAULTS": "after-hold"})
    raw = build(OUTSIDER, TEACHER, "you won", OBSCENE)
    code, _ = send_from_outside(stack.mta, raw, OUTSIDER, [TEACHER])
    assert code == 451  # Postfix: the milter is gone -> tempfail; the sending server keeps the message
    assert crashing.proc.wait(10) == 70
    (held_id,) = stack.wait_held()  # stored before the crash
    # The sending server retries once the gateway is back: the same message, stored once.
    stack.start_gateway()
    code, _ = send_from_outside(stack.mta, raw, OUTSIDER, [TEACHER])
    assert code == 250
    time.sleep(1.0)
    assert stack.wait_held() == [held_id]
    assert stack.delivered_to(TEACHER) == []


def test_guidance_mail_reaches_a_school_sender_and_never_an_outsider(stack: Stack) -> None:
    stack.start_gateway()
    raw = build(STAFF, TEACHER, "Year 9", "That class are a bunch of fucking idiots")
    with pytest.raises(SmtpRefused) as refused:
        stack.mta.send(raw, STAFF, [TEACHER])
    assert refused.value.code == 550
    deadline = time.monotonic() + 15
    while not stack.delivered_to(STAFF) and time.monotonic() < deadline:
        time.sleep(0.1)
    (guidance,) = stack.delivered_to(STAFF)
    assert guidance["Auto-Submitted"] == "auto-replied"
    assert guidance.is_multipart() and {p.get_content_type() for p in guidance.walk()} >= {
        "text/plain",
        "text/html",
    }
    text = guidance.as_string()
    assert "fucking" not in text and "5.5" in text
    # An outsider refused for the same words gets the SMTP reply only.
    outside = build("someone@outside.example", TEACHER, "hi", "this policy is fucking stupid")
    send_from_outside(stack.mta, outside, "someone@outside.example", [TEACHER])
    time.sleep(1.5)
    assert stack.delivered_to("someone@outside.example") == []


def test_report_proposes_blocks_and_an_approved_block_holds_the_next_message(stack: Stack) -> None:
    stack.start_gateway()
    original = build(
        "troll@nasty.example",
        TEACHER,
        "hello",
        "A long offensive rant that the school will want to block outright.",
    )
    report = (
        b"From: a.patel@redborne.example\r\nTo: report-offensive@redborne.example\r\n"
        b"Subject: Fwd: hello\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n'
        b"Please block this.\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n" + original + b"\r\n--b--\r\n"
    )
    assert stack.mta.send(report, TEACHER, ["report-offensive@redborne.example"])[0] == 250
    store = stack.store()
    deadline = time.monotonic() + 15
    while not store.entries("block", "proposed") and time.monotonic() < deadline:
        time.sleep(0.2)
    proposals = {(e.kind, e.value): e.id for e in store.entries("block", "proposed")}
    assert ("sender", "troll@nasty.example") in proposals
    assert ("domain", "nasty.example") in proposals
    # Before approval the troll's mail still arrives...
    send_from_outside(
        stack.mta,
        build("troll@nasty.example", TEACHER, "again", "Hello again."),
        "troll@nasty.example",
        [TEACHER],
    )
    deadline = time.monotonic() + 15
    while not stack.delivered_to(TEACHER) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(stack.delivered_to(TEACHER)) == 1
    # ...after a technician approves the sender block, the next one is held, without a restart.
    assert (
        stack.cli(
            "lists",
            "approve",
            str(proposals[("sender", "troll@nasty.example")]),
            "--database",
            stack.database,
            "--as",
            "tech1",
        )
        == 0
    )
    time.sleep(1.2)  # lists_refresh: the daemon looks at most once a second
    code, _ = send_from_outside(
        stack.mta,
        build("troll@nasty.example", TEACHER, "third", "Hello a third time."),
        "troll@nasty.example",
        [TEACHER],
    )
    assert code == 250
    held = stack.wait_held()
    assert store.get(held[0]).categories == ("blocklist/sender",)
    assert len(stack.delivered_to(TEACHER)) == 1
    store.close()
