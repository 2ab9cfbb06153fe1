"""The gateway's SMTP mode behind a real Postfix, set up as deploy/postfix/master.cf.snippet says.

Before-queue (section 2): the public smtpd hands each message to the gateway with
smtpd_proxy_filter and passes the gateway's answer back to the client. After-queue
(section 3): Postfix queues the message and delivers it to the gateway over the
`school-scan` transport. Either way the gateway relays what it accepts to the
re-injection listener (no milters, no content filter, XFORWARD allowed), which delivers
to the harness's sink. The -o settings are read from the snippet itself, so these tests
exercise what a school pastes; only ports and chroot (off in the harness) differ.

Test clients connect from 127.0.0.1, a trusted network, so their mail counts as the
school's; mail "from outside" uses XCLIENT (allowed for loopback here), which Postfix
passes on to the gateway with XFORWARD.
"""

from __future__ import annotations

import email
import email.message
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter.store import HeldFilter, Store
from tests.conftest import REPO, copy_rules
from tests.integration.test_postfix_milter import XCLIENT, send_from_outside
from tests.mail import build
from tests.postfix_harness import PostfixInstance, ReceivedMessage, SmtpRefused, SmtpSink, free_port
from tests.test_daemon import Daemon

pytestmark = pytest.mark.postfix

SNIPPET = REPO / "deploy" / "postfix" / "master.cf.snippet"
STAFF = "j.hughes@redborne.example"
TEACHER = "a.patel@redborne.example"
OUTSIDER = "prize@spam.example"
# The snippet's example ports, replaced by the test's own.
SNIPPET_GATEWAY = "127.0.0.1:10025"
SNIPPET_REINJECT = "127.0.0.1:10026"


def snippet_options() -> dict[str, list[tuple[str, str]]]:
    """The `-o name=value` lines of each (commented-out) service in the snippet, by service name."""
    services: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in SNIPPET.read_text().splitlines():
        if start := re.match(r"#(\S+)\s+(?:inet|unix)\s", line):
            current = services.setdefault(start.group(1), [])
        elif (option := re.match(r"#\s+-o\s+([a-z_]+)=(\S*)\s*$", line)) and current is not None:
            current.append((option.group(1), option.group(2)))
        else:
            current = None
    return services


def reinject_service(port: int) -> str:
    """The snippet's re-injection listener on `port` (chroot off, as every harness service)."""
    options = snippet_options()[SNIPPET_REINJECT]
    return f"127.0.0.1:{port} inet n - n - - smtpd\n" + "".join(f"  -o {n}={v}\n" for n, v in options)


class Stack:
    """A gateway in SMTP mode and a private Postfix in front of it, relaying to the sink."""

    def __init__(self, tmp: Path, sink: SmtpSink) -> None:
        self.tmp = tmp
        self.sink = sink
        self.rules = copy_rules(tmp / "rules")  # virus_scan off: no clamd here
        self.database = f"sqlite:///{tmp}/quarantine.db"
        self.gateway_port = free_port()
        self.reinject_port = free_port()
        self.gateway: Daemon | None = None
        self.mta: PostfixInstance | None = None

    def start_gateway(self) -> Daemon:
        workdir = self.tmp / "gateway"
        workdir.mkdir()
        # --reinject (guidance, alerts) stays Daemon's unused port: only relayed mail reaches the sink.
        self.gateway = Daemon(
            self.rules,
            workdir,
            "--smtp",
            f"127.0.0.1:{self.gateway_port}",
            "--next-hop",
            f"127.0.0.1:{self.reinject_port}",
            "--spool",
            str(workdir / "spool"),
            "--database",
            self.database,
        )
        return self.gateway

    def start_postfix(
        self, smtpd_options: dict[str, str], extra_main_cf: dict[str, str], services: str
    ) -> None:
        self.mta = PostfixInstance(
            self.tmp / "postfix",
            next_hop=self.sink.address,
            extra_main_cf={**XCLIENT, **extra_main_cf},
            smtpd_options=smtpd_options,
            extra_master_cf=reinject_service(self.reinject_port) + services,
        )
        self.mta.start()

    def stop(self) -> None:
        if self.mta is not None:
            self.mta.stop()
        if self.gateway is not None:
            self.gateway.stop()

    def decision(self, reference: str, timeout: float = 10) -> dict[str, object]:
        """The gateway's decision line for `reference`."""
        assert self.gateway is not None
        deadline = time.monotonic() + timeout
        while True:
            found = [
                e
                for e in self.gateway.log_lines()
                if e.get("event") == "decision" and e.get("reference") == reference
            ]
            if found:
                return found[0]
            assert time.monotonic() < deadline, (
                f"no decision for {reference}:\n{self.gateway.log_path.read_text()}"
            )
            time.sleep(0.05)

    def assert_xforward_used(self) -> None:
        """Postfix told the gateway the real client: no "sent no XFORWARD" warning."""
        assert self.gateway is not None
        log = self.gateway.log_path.read_text()
        assert "sent no XFORWARD" not in log, log

    def held(self) -> list[str]:
        store = Store(self.database)
        try:
            return [r.id for r in store.find(HeldFilter(kind="quarantine"))]
        finally:
            store.close()

    def delivered_once(self, subject: str) -> email.message.Message:
        """The one message with `subject` at the sink, after the queue has drained."""
        assert self.mta is not None
        deadline = time.monotonic() + 20
        while not [m for m in self.sink.messages if parse(m)["Subject"] == subject]:
            assert time.monotonic() < deadline, f"{subject!r} not delivered:\n{self.mta.log()[-3000:]}"
            time.sleep(0.05)
        self.mta.wait_for_empty_queue(timeout=15)
        time.sleep(1)  # a second copy would follow within Postfix's 1 s retry
        copies = [parse(m) for m in self.sink.messages if parse(m)["Subject"] == subject]
        assert len(copies) == 1, f"{len(copies)} copies of {subject!r}"
        return copies[0]


def parse(received: ReceivedMessage) -> email.message.Message:
    return email.message_from_bytes(received.data)


def gateway_reference(message: email.message.Message) -> str:
    """The gateway's reference in X-School-Policy, checked against its own Received: line."""
    policy = message["X-School-Policy"]
    assert policy is not None, message.as_string()[:2000]
    match = re.search(r"ref=(RB-[\w-]+)", policy)
    assert match, policy
    ours = [r for r in message.get_all("Received", []) if "(school-milter)" in r]
    assert len(ours) == 1, message.get_all("Received")
    assert re.search(r"by \S+ \(school-milter\) with ESMTP id " + re.escape(match.group(1)) + ";", ours[0]), (
        ours
    )
    return match.group(1)


@pytest.fixture
def stack(tmp_path: Path, sink: SmtpSink) -> Iterator[Stack]:
    stack = Stack(tmp_path, sink)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def proxy(stack: Stack) -> Stack:
    """Section 2: the public smtpd with the snippet's smtpd_proxy_filter settings."""
    options = dict(snippet_options()["smtp"])
    assert options["smtpd_proxy_filter"] == SNIPPET_GATEWAY
    options["smtpd_proxy_filter"] = f"127.0.0.1:{stack.gateway_port}"
    stack.start_gateway()
    stack.start_postfix(options, {}, "")
    return stack


@pytest.fixture
def content_filter(stack: Stack) -> Stack:
    """Section 3: content_filter = school-scan:[127.0.0.1]:PORT and the snippet's transport."""
    options = snippet_options()["school-scan"]
    transport = "school-scan unix - - n - 10 smtp\n" + "".join(f"  -o {n}={v}\n" for n, v in options)
    stack.start_gateway()
    stack.start_postfix({}, {"content_filter": f"school-scan:[127.0.0.1]:{stack.gateway_port}"}, transport)
    return stack


def test_the_snippet_has_the_services_these_tests_use() -> None:
    services = snippet_options()
    assert dict(services[SNIPPET_REINJECT])["smtpd_milters"] == ""
    assert dict(services[SNIPPET_REINJECT])["content_filter"] == ""
    assert dict(services["school-scan"])["smtp_send_xforward_command"] == "yes"
    assert dict(services["smtp"])["smtpd_proxy_filter"] == SNIPPET_GATEWAY


# --- section 2: before-queue proxy ------------------------------------------------------------


def test_proxy_clean_staff_mail_delivered_once_with_result_header(proxy: Stack) -> None:
    assert proxy.mta is not None
    raw = build(STAFF, TEACHER, "Cover", "Can you cover period 3?")
    code, text = proxy.mta.send(raw, STAFF, [TEACHER])
    assert code == 250, text
    message = proxy.delivered_once("Cover")
    assert message["X-School-Policy"].startswith("accept; ref=RB-")
    reference = gateway_reference(message)
    assert reference in text  # the client heard the gateway's answer, passed on by Postfix
    decision = proxy.decision(reference)
    assert decision["action"] == "accept"
    assert decision["direction"] == "internal", decision  # staff to staff, from the school's network
    assert message.get_payload().strip() == "Can you cover period 3?"  # type: ignore[union-attr]


def test_proxy_obscene_staff_mail_refused_to_the_client(proxy: Stack) -> None:
    assert proxy.mta is not None
    raw = build(STAFF, "supplier@elsewhere.example", "Re: delivery", "Your fucking van was late again")
    with pytest.raises(SmtpRefused) as refused:
        proxy.mta.send(raw, STAFF, ["supplier@elsewhere.example"])
    assert refused.value.stage == "DATA" and refused.value.code == 550, refused.value
    assert "5.7.1" in refused.value.text and "clause 5.5" in refused.value.text
    reference = re.search(r"Reference (RB-[\w-]+)", refused.value.text)
    assert reference, refused.value.text
    decision = proxy.decision(reference.group(1))
    assert decision["action"] == "reject" and decision["direction"] == "outbound", decision
    assert decision["sender_role"] == "staff", decision
    time.sleep(1)
    assert proxy.sink.messages == []
    assert proxy.mta.queue() == []


def test_proxy_mail_from_outside_is_judged_inbound(proxy: Stack) -> None:
    assert proxy.mta is not None
    raw = build("parent@outside.example", TEACHER, "Homework", "Is the homework due on Friday?")
    code, text = send_from_outside(proxy.mta, raw, "parent@outside.example", [TEACHER])
    assert code == 250, text
    message = proxy.delivered_once("Homework")
    reference = gateway_reference(message)
    decision = proxy.decision(reference)
    assert decision["direction"] == "inbound", decision
    assert decision["action"] == "accept", decision
    proxy.assert_xforward_used()


# --- section 3: after-queue content filter ----------------------------------------------------


def test_content_filter_clean_mail_delivered_once_with_result_header(content_filter: Stack) -> None:
    assert content_filter.mta is not None
    raw = build(STAFF, TEACHER, "Minutes", "Minutes of the staff meeting attached.")
    code, _ = content_filter.mta.send(raw, STAFF, [TEACHER])
    assert code == 250
    message = content_filter.delivered_once("Minutes")
    assert message["X-School-Policy"].startswith("accept; ref=RB-")
    decision = content_filter.decision(gateway_reference(message))
    assert decision["action"] == "accept" and decision["direction"] == "internal", decision
    # Postfix's IDENT (its queue id) came over XFORWARD.
    assert decision["queue_id"], decision
    content_filter.assert_xforward_used()


def test_content_filter_obscene_mail_from_outside_is_held_not_delivered(content_filter: Stack) -> None:
    assert content_filter.mta is not None
    raw = build(OUTSIDER, TEACHER, "you won", "you are a fucking disgrace and so is your school")
    code, _ = send_from_outside(content_filter.mta, raw, OUTSIDER, [TEACHER])
    assert code == 250  # Postfix queued it; the gateway answers Postfix, not the sender
    deadline = time.monotonic() + 20
    while not (held := content_filter.held()):
        assert time.monotonic() < deadline, (
            f"nothing held:\n{content_filter.mta.log()[-3000:]}\n"
            f"{content_filter.gateway.log_path.read_text()[-3000:] if content_filter.gateway else ''}"
        )
        time.sleep(0.1)
    assert len(held) == 1
    # Postfix has handed it over: nothing left queued, nothing bounced, nothing delivered.
    content_filter.mta.wait_for_empty_queue(timeout=15)
    time.sleep(1)
    assert content_filter.sink.messages == []
    decisions = [e for e in content_filter.gateway.log_lines() if e.get("event") == "decision"]  # type: ignore[union-attr]
    assert len(decisions) == 1, decisions
    assert decisions[0]["action"] == "quarantine" and decisions[0]["direction"] == "inbound", decisions[0]
