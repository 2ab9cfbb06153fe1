"""The private Postfix harness itself: mail goes through it untouched, and it cleans up after itself."""

from __future__ import annotations

import time
from email import message_from_bytes
from email.policy import compat32

import pytest

from tests.mail import build
from tests.postfix_harness import (
    LOOPBACK,
    MilterSettings,
    PostfixInstance,
    SmtpRefused,
    SmtpSink,
    free_port,
    port_open,
)

from .conftest import PostfixFactory

pytestmark = pytest.mark.postfix

SENDER = "j.hughes@redborne.example"
PARENTS = ["parent.one@example.org", "parent.two@example.net"]


def _headers(raw: bytes) -> list[tuple[str, str]]:
    return [(name, str(value)) for name, value in message_from_bytes(raw, policy=compat32).items()]


def _body(raw: bytes) -> bytes:
    normalised = raw.replace(b"\r\n", b"\n")
    return normalised.split(b"\n\n", 1)[1]


def test_message_without_milter_arrives_at_the_sink_unchanged(
    postfix: PostfixInstance, sink: SmtpSink
) -> None:
    raw = build(
        sender=SENDER,
        to=PARENTS,
        subject="Year 9 museum trip on Thursday",
        body="Dear parents,\n\nPlease send a packed lunch.\n.\n..leading dots survive\n",
        html="<p>Dear parents,</p><p>Please send a <b>packed lunch</b>.</p>",
        attachments=[("consent-form.pdf", b"%PDF-1.4\n" + bytes(range(256)) * 8, "application/pdf")],
        headers={"X-School-Ref": "trip-2024-09"},
    )

    code, text = postfix.send(raw, SENDER, PARENTS)

    assert code == 250 and "queued as" in text
    [delivered] = sink.wait_for(1, timeout=10)
    assert delivered.mail_from == SENDER
    assert sorted(delivered.rcpt_tos) == sorted(PARENTS)  # Postfix orders recipients by domain
    # Postfix prepends its own Received header; every header of the original follows in
    # order and unchanged, and the body (MIME parts, dot-stuffed lines) is byte-identical.
    received, *rest = _headers(delivered.data)
    assert received[0] == "Received"
    assert f"by {postfix.hostname} (Postfix)" in received[1]
    assert rest == _headers(raw)
    assert _body(delivered.data) == _body(raw)
    postfix.wait_for_log(r"status=sent \(250 2\.0\.0 Ok: kept by the test sink\)")
    postfix.wait_for_empty_queue()


def test_stop_leaves_no_process_behind(postfix_factory: PostfixFactory) -> None:
    postfix = postfix_factory()
    master = postfix.master_pid()
    running = postfix.processes()
    assert master is not None and master in running
    assert port_open(LOOPBACK, postfix.smtpd_port)

    postfix.stop()

    assert postfix.master_pid() is None
    assert postfix.processes() == []
    assert not port_open(LOOPBACK, postfix.smtpd_port)
    postfix.stop()  # a second stop is harmless


def test_unreachable_milter_tempfails_the_message(postfix_factory: PostfixFactory, sink: SmtpSink) -> None:
    # Nothing listens on this port: milter_default_action = tempfail must refuse the
    # message with a 4xx so the client keeps it and retries; it must not be delivered.
    postfix = postfix_factory(milter=f"inet:{LOOPBACK}:{free_port()}", milter_settings=MilterSettings())

    with pytest.raises(SmtpRefused) as refused:
        postfix.send(build(sender=SENDER, to=PARENTS[0]), SENDER, PARENTS[:1])

    assert refused.value.code == 451 and "4.7.1" in refused.value.text
    assert sink.messages == []
    assert postfix.queue_ids() == []
    postfix.wait_for_log(r"connect to Milter service inet:127\.0\.0\.1:\d+: Connection refused")


def test_deferred_message_is_retried_within_seconds(postfix: PostfixInstance, sink: SmtpSink) -> None:
    sink.refuse(1, "451 4.3.0 Sink busy: try again later")

    postfix.send(build(sender=SENDER, to=PARENTS[0]), SENDER, PARENTS[:1])

    # No flush: the short backoff times alone bring it back within seconds.
    [delivered] = sink.wait_for(1, timeout=10)
    assert delivered.rcpt_tos == (PARENTS[0],)
    # The sink has it before Postfix logs the 250 it got back: wait for the log line.
    sent = postfix.wait_for_log(r"status=sent")
    assert "status=deferred" in postfix.log()[: sent.start()]
    postfix.wait_for_empty_queue()


def test_flush_retries_a_deferred_message_now(postfix_factory: PostfixFactory, sink: SmtpSink) -> None:
    postfix = postfix_factory(extra_main_cf={"minimal_backoff_time": "1h", "maximal_backoff_time": "2h"})
    sink.refuse(1, "451 4.3.0 Sink busy: try again later")

    postfix.send(build(sender=SENDER, to=PARENTS[0]), SENDER, PARENTS[:1])

    postfix.wait_for_log(r"status=deferred .*451 4\.3\.0 Sink busy")
    # The queue manager moves it from active to deferred just after that log line.
    deadline = time.monotonic() + 10
    while (queue := postfix.queue()) and queue[0].queue_name != "deferred" and time.monotonic() < deadline:
        time.sleep(0.05)
    [deferred] = queue
    assert deferred.queue_name == "deferred" and deferred.recipients == (PARENTS[0],)
    assert "Sink busy" in deferred.reasons[0]
    assert postfix.queue_ids() == [deferred.queue_id]
    postfix.flush()
    sink.wait_for(1, timeout=10)
    postfix.wait_for_empty_queue()


def test_held_message_is_listed_until_released(postfix_factory: PostfixFactory, sink: SmtpSink) -> None:
    # HOLD from an access map stands in for a milter's quarantine: both put the
    # message in Postfix's hold queue.
    postfix = postfix_factory(
        extra_main_cf={"smtpd_sender_restrictions": "check_sender_access inline:{hold@test.example=HOLD}"}
    )

    postfix.send(build(sender="hold@test.example", to=PARENTS[0]), "hold@test.example", PARENTS[:1])

    [held] = postfix.hold_queue()
    assert held.sender == "hold@test.example"
    assert f"{held.queue_id}!" in postfix.mailq()
    assert sink.messages == []
    postfix.release(held.queue_id)
    postfix.flush()
    sink.wait_for(1, timeout=10)
    assert postfix.hold_queue() == []


def test_sendmail_submission_goes_through_pickup_to_the_sink(
    postfix: PostfixInstance, sink: SmtpSink
) -> None:
    raw = build(sender=SENDER, to=PARENTS[0], subject="Sent with sendmail(1)")

    postfix.sendmail(raw, SENDER, PARENTS[:1])

    [delivered] = sink.wait_for(1, timeout=10)
    assert delivered.mail_from == SENDER
    assert ("Subject", "Sent with sendmail(1)") in _headers(delivered.data)
    assert "postfix/pickup" in postfix.log()
