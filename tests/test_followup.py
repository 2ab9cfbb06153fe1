"""After the verdict: guidance mail (rate-limited, never to outsiders), alerts, digests, the
outbox, reports to the report address, and blocks that apply to the next message."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import logging
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
    up = FollowUp(store, sink.address)
    assert up.deliver_outbox() == (0, 0)  # it waits out its minute before the retry
    minute_passes(store)
    assert up.deliver_outbox() == (1, 0)
    assert len(sink.wait_for(1)) == 1


def minute_passes(store: Store) -> None:
    """Every pending outbox mail's wait is over (as when its backoff has run out)."""
    from sqlalchemy import update

    from milter.store.models import OutboxMail

    with store.session() as session:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        session.execute(update(OutboxMail).where(OutboxMail.status == "pending").values(next_attempt_at=past))


def queued_days_ago(store: Store, item: int, days: float) -> None:
    from sqlalchemy import update

    from milter.store.models import OutboxMail

    with store.session() as session:
        then = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
        session.execute(update(OutboxMail).where(OutboxMail.id == item).values(created_at=then))


def outbox_attempts(store: Store) -> list[int]:
    from sqlalchemy import select

    from milter.store.models import OutboxMail

    with store.session() as session:
        return list(session.scalars(select(OutboxMail.attempts).order_by(OutboxMail.id)))


def fields(record: logging.LogRecord, *names: str) -> tuple[object, ...]:
    """A log line's JSON fields (passed with extra=)."""
    return tuple(vars(record)[name] for name in names)


def test_a_short_relay_outage_delays_alerts_but_loses_none(store: Store) -> None:
    # The reviewer's case: twelve messages quarantined while the relay was down, each
    # queueing an SLT alert and waking the outbox. A wake must not retry the earlier
    # alerts (that used up their ten attempts in seconds and they were never sent).
    relay = SmtpSink()  # not started yet: the relay is down
    followup = FollowUp(store, relay.address)
    for n in range(12):
        store.queue_mail(
            "alert", ["slt@redborne.example"], f"Subject: alert {n}\r\n\r\nheld\r\n".encode(), about="slt"
        )
        assert followup.deliver_outbox() == (0, 1)  # only the new one is tried
    assert outbox_attempts(store) == [1] * 12
    relay.start()
    try:
        minute_passes(store)
        assert followup.deliver_outbox() == (12, 0)
        assert len(relay.wait_for(12)) == 12
        assert {o[2] for o in store.outbox()} == {"sent"}
        assert followup.deliver_outbox() == (0, 0)  # each sent once
    finally:
        relay.stop()


def test_an_alert_given_up_on_is_logged_once_without_its_content(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    from milter.logs import JsonFormatter
    from tests.postfix_harness import free_port

    down = FollowUp(store, ("127.0.0.1", free_port()))
    item = store.queue_mail(
        "alert",
        ["slt@redborne.example"],
        b"Subject: secret words\r\n\r\nx\r\n",
        about="slt",
        reference="RB-GONE-0001",
    )
    queued_days_ago(store, item, 6)  # the relay has been down for longer than the outbox waits
    with caplog.at_level(logging.INFO, logger="school_milter"):
        assert down.deliver_outbox() == (0, 1)
        minute_passes(store)
        assert down.deliver_outbox() == (0, 0)  # not tried again
    gone = [r for r in caplog.records if getattr(r, "event", None) == "outbox_given_up"]
    assert len(gone) == 1
    record = gone[0]
    assert record.levelno == logging.ERROR
    assert fields(record, "kind", "reference", "attempts") == ("alert", "RB-GONE-0001", 1)
    line = JsonFormatter().format(record)
    assert "slt@" not in line and "secret" not in line
    assert [o[2] for o in store.outbox()] == ["failed"]


def test_the_outbox_loop_logs_one_line_a_round_and_counts_what_it_gave_up(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import CollectorRegistry

    from milter.daemon import _deliver_outbox
    from milter.metrics import Metrics
    from tests.postfix_harness import free_port

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    down = FollowUp(store, ("127.0.0.1", free_port()))
    for n in range(5):
        store.queue_mail("alert", ["slt@redborne.example"], f"Subject: {n}\r\n\r\nx\r\n".encode())
    old = store.queue_mail("alert", ["slt@redborne.example"], b"Subject: old\r\n\r\nx\r\n", reference="RB-1")
    queued_days_ago(store, old, 6)

    def rounds() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "event", None) == "outbox"]

    async def run() -> None:
        wake, stop = asyncio.Event(), asyncio.Event()
        wake.set()  # new mail was queued
        task = asyncio.create_task(_deliver_outbox(down, 3600.0, wake, stop, metrics))
        for _ in range(200):  # at most 10 s
            if rounds():
                break
            await asyncio.sleep(0.05)
        wake.set()  # more new mail: nothing of the above is due yet
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(task, 10)

    with caplog.at_level(logging.INFO, logger="school_milter"):
        asyncio.run(run())
    (summary,) = rounds()
    assert summary.levelno == logging.WARNING
    assert fields(summary, "sent", "failed", "given_up") == (0, 5, 1)
    assert "unreachable" in str(fields(summary, "problem")[0])
    others = [r for r in caplog.records if r.levelno >= logging.WARNING and r not in (summary,)]
    assert [getattr(r, "event", None) for r in others] == ["outbox_given_up"]
    assert registry.get_sample_value("school_milter_outbox_given_up_total", {"kind": "alert"}) == 1.0
    assert registry.get_sample_value("school_milter_outbox_given_up_total", {"kind": "guidance"}) == 0.0
    assert outbox_attempts(store) == [1] * 6


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
