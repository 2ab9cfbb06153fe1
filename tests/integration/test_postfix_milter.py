"""The gateway as the milter of a real Postfix: real SMTP in, real delivery to a sink.

Postfix sees every test client as 127.0.0.1, one of the school's trusted networks, so
mail counts as sent by the school; tests of mail from outside use XCLIENT (allowed for
loopback here) to give Postfix, and so the milter, an outside client address.
"""

from __future__ import annotations

import email
import email.message
import signal
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clamd_harness import ClamdInstance, clamd  # noqa: F401
from tests.conftest import copy_rules
from tests.integration.conftest import PostfixFactory
from tests.mail import build
from tests.postfix_harness import MilterSettings, PostfixInstance, ReceivedMessage, SmtpRefused, SmtpSink
from tests.test_clamd import SIGNATURE
from tests.test_daemon import Daemon
from tests.test_virus_scan import CARRIERS, OUTSIDER

pytestmark = pytest.mark.postfix

STAFF = "j.hughes@redborne.example"
PARENTS = ["jane.taylor@gmail.example", "david.taylor@outlook.example", "anita.shah@yahoo.example"]
# XCLIENT for loopback clients, and the school's domains as ones this Postfix accepts mail
# for, so a message "from outside" to a member of staff is taken in.
XCLIENT = {
    "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
    "relay_domains": "redborne.example, students.redborne.example",
}


@pytest.fixture
def rules_copy(tmp_path: Path) -> Path:
    copy_rules(tmp_path / "rules")
    return tmp_path / "rules"


@pytest.fixture
def gateway(rules_copy: Path, tmp_path: Path) -> Iterator[Daemon]:
    daemon = Daemon(rules_copy, tmp_path)
    yield daemon
    daemon.stop()


@pytest.fixture
def mta(gateway: Daemon, postfix_factory: PostfixFactory) -> PostfixInstance:
    return postfix_factory(
        milter=f"inet:127.0.0.1:{gateway.port}",
        milter_settings=MilterSettings(command_timeout="5s", content_timeout="5s"),
        extra_main_cf=XCLIENT,
    )


def parse(received: ReceivedMessage) -> email.message.Message:
    return email.message_from_bytes(received.data)


def send_from_outside(mta: PostfixInstance, raw: bytes, sender: str, rcpts: list[str]) -> tuple[int, bytes]:
    with smtplib.SMTP(*mta.address, timeout=30) as smtp:
        smtp.ehlo("outside.example")
        code, text = smtp.docmd("XCLIENT", "ADDR=203.0.113.9 NAME=mail.outside.example")
        assert code == 220, text
        smtp.ehlo("mail.outside.example")
        smtp.mail(sender)
        for rcpt in rcpts:
            smtp.rcpt(rcpt)
        return smtp.data(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


def test_clean_mail_delivered_with_result_header(mta: PostfixInstance, sink: SmtpSink) -> None:
    raw = build(STAFF, "a.patel@redborne.example", "Cover", "Can you cover period 3?")
    code, _ = mta.send(raw, STAFF, ["a.patel@redborne.example"])
    assert code == 250
    (message,) = sink.wait_for(1, timeout=15)
    parsed = parse(message)
    assert parsed["X-School-Policy"].startswith("accept; ref=RB-")
    # On top, with a space after the colon, as an MTA writes its own trace headers.
    assert message.data.startswith(b"X-School-Policy: accept; ref=RB-")
    assert parsed.get_payload().strip() == "Can you cover period 3?"  # type: ignore[union-attr]


def test_obscene_mail_from_staff_refused_with_clause(mta: PostfixInstance, sink: SmtpSink) -> None:
    raw = build(STAFF, "supplier@elsewhere.example", "Re: delivery", "Your fucking van was late again")
    with pytest.raises(SmtpRefused) as refused:
        mta.send(raw, STAFF, ["supplier@elsewhere.example"])
    assert refused.value.code == 550
    assert "5.7.1" in refused.value.text and "clause 5.5" in refused.value.text
    assert "Reference RB-" in refused.value.text
    time.sleep(0.5)
    assert sink.messages == []


def test_parent_mailing_with_visible_addresses_refused(mta: PostfixInstance, sink: SmtpSink) -> None:
    raw = build("office@redborne.example", PARENTS, "Trip", "Consent forms by Friday.")
    with pytest.raises(SmtpRefused) as refused:
        mta.send(raw, "office@redborne.example", PARENTS)
    assert refused.value.code == 550 and "Appendix 1" in refused.value.text
    assert sink.messages == []


def test_parent_mailing_fixed_by_rule(
    rules_copy: Path, tmp_path: Path, postfix_factory: PostfixFactory, sink: SmtpSink
) -> None:
    policy = rules_copy / "policy.yaml"
    policy.write_text(
        policy.read_text().replace(
            "  - detector: missing_bcc\n    action: reject", "  - detector: missing_bcc\n    action: fix"
        )
    )
    daemon = Daemon(rules_copy, tmp_path)
    try:
        mta = postfix_factory(milter=f"inet:127.0.0.1:{daemon.port}")
        raw = build(
            "office@redborne.example", PARENTS[:2], "Trip", "Consent forms by Friday.", cc=PARENTS[2:]
        )
        assert mta.send(raw, "office@redborne.example", PARENTS)[0] == 250
        (message,) = sink.wait_for(1, timeout=15)
        assert sorted(message.rcpt_tos) == sorted(PARENTS), "every parent still gets it"
        head = message.data.split(b"\r\n\r\n", 1)[0].decode()
        assert not any(parent in head for parent in PARENTS), head
        assert "undisclosed-recipients:;" in head
        assert parse(message)["X-School-Policy"].startswith("fix; ref=RB-")
    finally:
        daemon.stop()


def test_without_a_store_received_obscene_mail_goes_to_the_hold_queue(
    rules_copy: Path, tmp_path: Path, postfix_factory: PostfixFactory, sink: SmtpSink
) -> None:
    # With `database = ""` the protocol's quarantine action is used: Postfix's hold queue.
    # (With the store, the default, see tests/integration/test_quarantine_postfix.py.)
    (tmp_path / "nostore").mkdir()
    daemon = Daemon(rules_copy, tmp_path / "nostore", "--database=")
    try:
        mta = postfix_factory(milter=f"inet:127.0.0.1:{daemon.port}", extra_main_cf=XCLIENT)
        raw = build("prize@spam.example", "a.patel@redborne.example", "you won", "fuck you and your school")
        code, _ = send_from_outside(mta, raw, "prize@spam.example", ["a.patel@redborne.example"])
        assert code == 250  # accepted into Postfix's hold queue: the sender learns nothing
        deadline = time.monotonic() + 10
        while not mta.hold_queue() and time.monotonic() < deadline:
            time.sleep(0.2)
        (held,) = mta.hold_queue()
        assert held.sender == "prize@spam.example"
        time.sleep(0.5)
        assert sink.messages == []
    finally:
        daemon.stop()


def test_gateway_down_means_4xx_then_delivery(mta: PostfixInstance, gateway: Daemon, sink: SmtpSink) -> None:
    raw = build(STAFF, "a.patel@redborne.example", "Minutes", "Minutes attached.")
    gateway.proc.send_signal(signal.SIGSTOP)  # stuck, not dead: Postfix times the milter out
    try:
        with pytest.raises(SmtpRefused) as refused:
            mta.send(raw, STAFF, ["a.patel@redborne.example"])
        assert 400 <= refused.value.code < 500
    finally:
        gateway.proc.send_signal(signal.SIGCONT)
    # The sending server retries; now it goes through, once.
    assert mta.send(raw, STAFF, ["a.patel@redborne.example"])[0] == 250
    (message,) = sink.wait_for(1, timeout=15)
    assert parse(message)["Subject"] == "Minutes"


def test_queued_mail_waits_for_the_gateway(
    mta: PostfixInstance, gateway: Daemon, sink: SmtpSink, rules_copy: Path, tmp_path: Path
) -> None:
    gateway.stop()
    raw = build(STAFF, "a.patel@redborne.example", "Queued", "Sent while the gateway was down.")
    mta.sendmail(raw, STAFF, ["a.patel@redborne.example"])  # local submission: Postfix keeps it
    time.sleep(2)
    assert sink.messages == []
    (tmp_path / "again").mkdir()
    restarted = Daemon(rules_copy, tmp_path / "again", "--milter", f"inet:127.0.0.1:{gateway.port}")
    try:
        deadline = time.monotonic() + 30
        while not sink.messages and time.monotonic() < deadline:
            mta.flush()
            time.sleep(1)
        (message,) = sink.wait_for(1, timeout=5)
        assert parse(message)["Subject"] == "Queued"
        assert parse(message)["X-School-Policy"].startswith("accept; ref=RB-")
    finally:
        restarted.stop()


def test_broken_reload_keeps_old_rules(
    mta: PostfixInstance, gateway: Daemon, rules_copy: Path, sink: SmtpSink
) -> None:
    (rules_copy / "policy.yaml").write_text("school: [\n")
    gateway.proc.send_signal(signal.SIGHUP)
    gateway.wait_for_log("rules reload failed; keeping the rules in force")
    with pytest.raises(SmtpRefused) as refused:
        mta.send(build(STAFF, "x@elsewhere.example", "x", "bullshit"), STAFF, ["x@elsewhere.example"])
    assert refused.value.code == 550
    assert (
        mta.send(build(STAFF, "a.patel@redborne.example", "ok", "fine"), STAFF, ["a.patel@redborne.example"])[
            0
        ]
        == 250
    )
    assert len(sink.wait_for(1, timeout=15)) == 1


@pytest.mark.parametrize("carrier", list(CARRIERS))
def test_virus_refused_through_postfix_naming_signature(
    carrier: str,
    tmp_path: Path,
    postfix_factory: PostfixFactory,
    sink: SmtpSink,
    clamd: ClamdInstance,  # noqa: F811
) -> None:
    root = copy_rules(tmp_path / "rules-av", virus_scan=True)
    policy = root / "policy.yaml"
    policy.write_text(
        policy.read_text().replace("clamd: unix:/run/clamav/clamd.ctl", f"clamd: {clamd.unix_address}")
    )
    (tmp_path / "av").mkdir()
    daemon = Daemon(root, tmp_path / "av")
    try:
        mta = postfix_factory(milter=f"inet:127.0.0.1:{daemon.port}", extra_main_cf=XCLIENT)
        raw = CARRIERS[carrier]()
        code, text = send_from_outside(mta, raw, OUTSIDER, [STAFF])
        assert code == 550 and SIGNATURE.encode() in text, text
        assert sink.messages == []
        # The console's scanner health reads this: clamd answered. (The decision is recorded
        # just after the reply, so the metric may lag the 550 by a moment.)
        deadline = time.monotonic() + 5
        while 'dependency="clamd"} 1.0' not in daemon.metrics() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 'school_milter_dependency_up{dependency="clamd"} 1.0' in daemon.metrics()
    finally:
        daemon.stop()
