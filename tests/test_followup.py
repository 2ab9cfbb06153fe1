"""After the verdict: guidance mail (rate-limited, never to outsiders), alerts, digests, the
outbox, reports to the report address, and blocks that apply to the next message."""

from __future__ import annotations

import datetime as dt
import email
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter import lists
from milter.engine import scan
from milter.envelope import Envelope
from milter.followup import FollowUp, is_report
from milter.policy.loader import Rules
from milter.store import HeldFilter, Store
from tests.mail import build
from tests.postfix_harness import SmtpSink

STAFF = "j.hughes@redborne.example"
TEACHER = "a.patel@redborne.example"
OUTSIDER = "troll@nasty.example"
SCHOOL_CLIENT = Envelope(client_address="10.20.1.5")  # a trusted network in rules/


def envelope(sender: str, rcpts: list[str], client: str = "203.0.113.9", auth: str | None = None) -> Envelope:
    return Envelope(mail_from=sender, rcpt_to=tuple(rcpts), client_address=client, auth_user=auth)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path}/q.db")
    yield store
    store.close()


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


def test_guidance_is_queued_for_a_school_sender_and_rate_limited(store: Store, rules: Rules) -> None:
    followup = FollowUp(store, None)
    limit = rules.policy.notifications.guidance_per_hour
    for i in range(limit + 3):
        raw = build(STAFF, TEACHER, f"Year 9 ({i})", "That class are a bunch of fucking idiots")
        result = scan(raw, envelope(STAFF, [TEACHER], client="10.20.1.5"), rules)
        assert result.verdict.action.value == "reject"
        followup.after_verdict(result, rules, None)
    guidance = [o for o in store.outbox() if o[1] == "guidance"]
    assert len(guidance) == limit
    assert all(o[3] == (STAFF,) for o in guidance)


def test_no_guidance_for_an_outsider(store: Store, rules: Rules) -> None:
    followup = FollowUp(store, None)
    raw = build("someone@outside.example", TEACHER, "hi", "this policy is fucking stupid")
    result = scan(raw, envelope("someone@outside.example", [TEACHER]), rules)
    followup.after_verdict(result, rules, None)
    assert [o for o in store.outbox() if o[1] == "guidance"] == []


def test_quarantine_alert_goes_to_the_role_in_rules_and_outbox_delivers_it(
    store: Store, rules: Rules, sink: SmtpSink
) -> None:
    followup = FollowUp(store, sink.address)
    raw = build(OUTSIDER, TEACHER, "you won", "you are a fucking disgrace")
    result = scan(raw, envelope(OUTSIDER, [TEACHER]), rules)
    assert result.verdict.action.value == "quarantine" and result.verdict.alerts == ("slt",)
    held_id = followup.hold(raw, envelope(OUTSIDER, [TEACHER]), result)
    followup.after_verdict(result, rules, held_id)
    assert followup.deliver_outbox() == (1, 0)
    (alert,) = sink.wait_for(1)
    assert list(alert.rcpt_tos) == [rules.policy.school.contacts["slt"]]
    assert alert.mail_from in ("", "<>")
    assert held_id.encode() in alert.data and b"fucking" not in alert.data
    assert [o[2] for o in store.outbox()] == ["sent"]


def test_outbox_keeps_mail_while_the_relay_is_down(store: Store, rules: Rules, sink: SmtpSink) -> None:
    from tests.postfix_harness import free_port

    down = FollowUp(store, ("127.0.0.1", free_port()))
    store.queue_mail("alert", ["it-support@redborne.example"], b"Subject: x\r\n\r\nhello\r\n")
    assert down.deliver_outbox() == (0, 1)
    assert [o[2] for o in store.outbox()] == ["pending"]
    assert FollowUp(store, sink.address).deliver_outbox() == (1, 0)
    assert len(sink.wait_for(1)) == 1


def test_digest_lists_what_was_held_for_it(store: Store, rules: Rules, sink: SmtpSink) -> None:
    followup = FollowUp(store, sink.address)
    for i in range(3):
        raw = build(OUTSIDER, TEACHER, f"offer {i}", f"you are a fucking disgrace {i}")
        result = scan(raw, envelope(OUTSIDER, [TEACHER]), rules)
        followup.hold(raw, envelope(OUTSIDER, [TEACHER]), result)
    assert followup.send_digest("it", rules) == 3
    assert followup.send_digest("slt", rules) == 0  # not the digest role, nothing deferred to it
    followup.deliver_outbox()
    (digest,) = sink.wait_for(1)
    assert list(digest.rcpt_tos) == [rules.policy.school.contacts["it"]]
    text = email.message_from_bytes(digest.data).get_payload(decode=True)
    assert isinstance(text, bytes) and text.count(b"RB-") >= 3 and b"fucking" not in text


def test_report_needs_a_trusted_school_sender(rules: Rules) -> None:
    address = rules.policy.school.report_address
    assert address
    assert is_report(envelope(TEACHER, [address], client="10.20.1.5"), rules)
    assert is_report(envelope(TEACHER, [address], auth=TEACHER), rules)
    assert not is_report(envelope(OUTSIDER, [address]), rules)  # an outsider cannot propose blocks
    assert not is_report(envelope(TEACHER, [address, STAFF], client="10.20.1.5"), rules)


def test_report_proposes_blocks_and_approval_blocks_the_next_message(store: Store, rules: Rules) -> None:
    followup = FollowUp(store, None)
    original = build(OUTSIDER, TEACHER, "hello", "A long offensive rant that the school will want to block.")
    first = scan(original, envelope(OUTSIDER, [TEACHER]), rules)
    report = (
        b"From: a.patel@redborne.example\r\nTo: report-offensive@redborne.example\r\nSubject: Fwd: hello\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain\r\n\r\nPlease block.\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
        + original
        + b"\r\n--b--\r\n"
    )
    address = rules.policy.school.report_address
    assert address
    taken = followup.take_report(
        report, envelope(TEACHER, [address], client="10.20.1.5"), rules, "RB-AAAA-0001"
    )
    kinds = {(e.kind, e.value): e for e in store.entries("block", "proposed")}
    assert ("sender", OUTSIDER) in kinds and ("domain", "nasty.example") in kinds
    assert any(k == "fingerprint" for k, _ in kinds)
    assert taken.proposals == len(kinds)
    assert store.get(taken.id).kind == "report"
    assert first.verdict.action.value == "accept"
    # Nothing applies until a technician approves; then the same text is held.
    lists.install(lists.ListsSource(store.list_version, store.lists).current)
    try:
        again = build(
            "other@elsewhere.example",
            TEACHER,
            "hi",
            "A long offensive rant that the school will want to block.",
        )
        assert (
            scan(again, envelope("other@elsewhere.example", [TEACHER]), rules).verdict.action.value
            == "accept"
        )
        fingerprint = next(e for (k, _), e in kinds.items() if k == "fingerprint")
        store.decide_entry(fingerprint.id, "tech1", approve=True)
        result = scan(again, envelope("other@elsewhere.example", [TEACHER]), rules)
        assert result.verdict.action.value == "quarantine"
        assert [f.category for f in result.verdict.findings if f.detector == "blocklist"] == ["fingerprint"]
        # An allow entry for the sender's domain beats the block.
        store.add_entry("allow", "domain", "elsewhere.example", "tech1")
        assert (
            scan(again, envelope("other@elsewhere.example", [TEACHER]), rules).verdict.action.value
            == "accept"
        )
        # Mail from the school is not subject to the block list (received mail only, 5.7).
        assert (
            scan(again, envelope(STAFF, [TEACHER], client="10.20.1.5"), rules).verdict.action.value
            == "accept"
        )
    finally:
        lists.install(None)


def test_personal_marking_is_recorded(store: Store, rules: Rules) -> None:
    followup = FollowUp(store, None)
    raw = build(OUTSIDER, TEACHER, "hello", "you are a fucking disgrace", headers={"Sensitivity": "Personal"})
    result = scan(raw, envelope(OUTSIDER, [TEACHER]), rules)
    held_id = followup.hold(raw, envelope(OUTSIDER, [TEACHER]), result)
    assert store.get(held_id).personal
    assert store.find(HeldFilter(since=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)))[0].id == held_id


def test_outbox_mail_refused_for_some_recipients_is_not_sent_again(store: Store) -> None:
    from aiosmtpd.controller import Controller

    from tests.postfix_harness import free_port
    from tests.test_notify import Recorder  # refuses nobody@...

    handler = Recorder()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        store.queue_mail(
            "alert", ["it-support@redborne.example", "nobody@redborne.example"], b"Subject: x\r\n\r\nhi\r\n"
        )
        followup = FollowUp(store, ("127.0.0.1", port))
        assert followup.deliver_outbox() == (1, 0)
        assert followup.deliver_outbox() == (0, 0)  # taken once: no second copy for it-support
        assert [r for _, r, _ in handler.received] == [["it-support@redborne.example"]]
        assert [o[2] for o in store.outbox()] == ["sent"]
    finally:
        controller.stop()
