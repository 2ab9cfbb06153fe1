"""The gateway as the milter of a real Sendmail: real SMTP in, real delivery to a sink.

Sendmail is Debian's 8.17, extracted (not installed: it conflicts with postfix) by
deploy/install-sendmail-for-tests.sh; tests/sendmail_harness.py runs it privately on
127.0.0.1 with deploy/sendmail/school-milter.mc as its milter configuration, only the
socket changed. The messages and expectations are those of test_postfix_milter.py: the
policy must not depend on which MTA a school runs. Tests that need Sendmail skip, with
the reason, when the install script has not been run.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter import protocol as p
from milter.config import Settings
from milter.server import WANTED_ACTIONS, WANTED_MACROS
from milter.store import HeldFilter, Store
from tests.integration import test_postfix_milter as postfix_tests
from tests.mail import build
from tests.postfix_harness import SmtpRefused, SmtpSink, free_port
from tests.sendmail_harness import DEPLOY_MC, SendmailInstance, sendmail_missing
from tests.test_daemon import Daemon

# The Postfix tests' fixtures, messages and addresses: both MTAs meet the same gateway.
rules_copy = postfix_tests.rules_copy
gateway = postfix_tests.gateway
parse = postfix_tests.parse
STAFF = postfix_tests.STAFF
PARENTS = postfix_tests.PARENTS

# How Sendmail's debug output names each stage: its option (macros.NAME) and its command.
STAGE_OPTION = {
    p.STAGE_CONNECT: "connect",
    p.STAGE_HELO: "helo",
    p.STAGE_MAIL: "envfrom",
    p.STAGE_RCPT: "envrcpt",
    p.STAGE_DATA: "data",
    p.STAGE_EOM: "eom",
    p.STAGE_EOH: "eoh",
}
STAGE_COMMAND = {
    p.STAGE_CONNECT: "C",
    p.STAGE_HELO: "H",
    p.STAGE_MAIL: "M",
    p.STAGE_RCPT: "R",
    p.STAGE_DATA: "T",
    p.STAGE_EOM: "E",
    p.STAGE_EOH: "N",
}

# Decided before any fixture starts a gateway; only the install script's absence skips.
needs_sendmail = pytest.mark.skipif(sendmail_missing() is not None, reason=str(sendmail_missing()))


def start_sendmail(workdir: Path, sink: SmtpSink, gateway_port: int) -> SendmailInstance:
    instance = SendmailInstance(workdir, next_hop=sink.address, milter=f"inet:{gateway_port}@127.0.0.1")
    instance.start()
    return instance


@pytest.fixture
def mta(gateway: Daemon, sink: SmtpSink, tmp_path: Path) -> Iterator[SendmailInstance]:
    instance = start_sendmail(tmp_path / "sendmail", sink, gateway.port)
    try:
        yield instance
    finally:
        instance.stop()


def decisions(daemon: Daemon) -> list[dict[str, object]]:
    return [line for line in daemon.log_lines() if line["message"] == "decision"]


def wait_for_decisions(daemon: Daemon, count: int, timeout: float = 5) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while len(found := decisions(daemon)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


@needs_sendmail
def test_clean_mail_delivered_with_result_header(
    mta: SendmailInstance, gateway: Daemon, sink: SmtpSink
) -> None:
    raw = build(STAFF, "a.patel@redborne.example", "Cover", "Can you cover period 3?")
    code, text = mta.send(raw, STAFF, ["a.patel@redborne.example"])
    assert code == 250
    queue_id = re.search(r"2\.0\.0 (\w+) Message accepted", text)
    assert queue_id, text
    (message,) = sink.wait_for(1, timeout=15)
    parsed = parse(message)
    header = parsed["X-School-Policy"]
    assert header.startswith("accept; ref=RB-")
    # On top, above Sendmail's own Received line (the gateway inserts it at index 0).
    assert message.data.startswith(b"X-School-Policy: accept; ref=RB-")
    assert parsed.get_payload().strip() == "Can you cover period 3?"  # type: ignore[union-attr]
    # The gateway's decision names Sendmail's queue id: the macro `i` it asked for arrived.
    (decision,) = wait_for_decisions(gateway, 1)
    assert decision["action"] == "accept"
    assert decision["queue_id"] == queue_id.group(1)
    assert f"ref={decision['reference']};" in header
    assert decision["sender_role"] == "staff" and decision["direction"] == "internal"


@needs_sendmail
def test_sendmail_negotiates_what_the_gateway_asks_for(
    mta: SendmailInstance,
    gateway: Daemon,
) -> None:
    mta.send(build(STAFF, "a.patel@redborne.example", "Hi", "Hello."), STAFF, ["a.patel@redborne.example"])
    dialogue = mta.milter_dialogue()
    offered = re.search(r"milter_negotiate\(school-milter\): send: version (\d+), fflags (0x\w+)", dialogue)
    granted = re.search(
        r"milter_negotiate\(school-milter\): received: version (\d+), fflags (0x\w+), pflags (0x\w+)",
        dialogue,
    )
    assert offered and granted, dialogue
    assert int(granted.group(1)) == 6
    # Every action the gateway asked for (add and change headers, quarantine, its own
    # macro lists) was offered by Sendmail, so none is missing from what was agreed.
    assert int(offered.group(2), 16) & WANTED_ACTIONS == WANTED_ACTIONS
    assert int(granted.group(2), 16) == WANTED_ACTIONS
    # No reply to each header and body chunk: one round trip per message, not per line.
    assert int(granted.group(3), 16) & (p.NR_HEADER | p.NR_BODY) == p.NR_HEADER | p.NR_BODY
    # Sendmail took the gateway's own macro lists, and at those stages sent those macros
    # only. (At end of message Sendmail 8.17 sends confMILTER_MACROS_EOM whatever the
    # milter asked for: see deploy/sendmail/school-milter.mc.)
    for stage, names in WANTED_MACROS.items():
        assert f'macros.{STAGE_OPTION[stage]}, "{" ".join(names)}")={len(names)}' in dialogue, stage
        sent = set(
            re.findall(rf"milter_send_macros\(school-milter, {STAGE_COMMAND[stage]}\): (\S+)=", dialogue)
        )
        assert sent, stage
        if stage != p.STAGE_EOM:
            assert sent <= set(names), (stage, sent)
    assert re.search(r"milter_send_macros\(school-milter, E\): i=\w+", dialogue), "queue id at end of message"
    assert "milter_insheader: Insert (0) X-School-Policy:" in dialogue
    assert wait_for_decisions(gateway, 1)


@needs_sendmail
def test_obscene_mail_from_staff_refused_with_clause(
    mta: SendmailInstance,
    gateway: Daemon,
    sink: SmtpSink,
) -> None:
    raw = build(STAFF, "supplier@elsewhere.example", "Re: delivery", "Your fucking van was late again")
    with pytest.raises(SmtpRefused) as refused:
        mta.send(raw, STAFF, ["supplier@elsewhere.example"])
    # Sendmail passes the gateway's reply on as it is: code, enhanced code, both lines.
    assert refused.value.stage == "DATA" and refused.value.code == 550
    assert "5.7.1" in refused.value.text and "clause 5.5" in refused.value.text
    assert "Reference RB-" in refused.value.text
    (decision,) = wait_for_decisions(gateway, 1)
    assert decision["action"] == "reject" and decision["clauses"] == ["5.5"]
    assert f"Reference {decision['reference']}" in refused.value.text
    time.sleep(0.5)
    assert sink.messages == []
    assert mta.queue_files() == []  # refused, not queued: nothing left to bounce later


@needs_sendmail
def test_parent_mailing_with_visible_addresses_refused(mta: SendmailInstance, sink: SmtpSink) -> None:
    raw = build("office@redborne.example", PARENTS, "Trip", "Consent forms by Friday.")
    with pytest.raises(SmtpRefused) as refused:
        mta.send(raw, "office@redborne.example", PARENTS)
    assert refused.value.code == 550 and "Appendix 1" in refused.value.text
    time.sleep(0.5)
    assert sink.messages == []


@needs_sendmail
def test_parent_mailing_fixed_by_rule(
    rules_copy: Path,
    tmp_path: Path,
    sink: SmtpSink,
) -> None:
    policy = rules_copy / "policy.yaml"
    policy.write_text(
        policy.read_text().replace(
            "  - detector: missing_bcc\n    action: reject", "  - detector: missing_bcc\n    action: fix"
        )
    )
    daemon = Daemon(rules_copy, tmp_path)
    mta = None
    try:
        mta = start_sendmail(tmp_path / "sendmail", sink, daemon.port)
        raw = build(
            "office@redborne.example", PARENTS[:2], "Trip", "Consent forms by Friday.", cc=PARENTS[2:]
        )
        assert mta.send(raw, "office@redborne.example", PARENTS)[0] == 250
        (message,) = sink.wait_for(1, timeout=15)
        assert sorted(message.rcpt_tos) == sorted(PARENTS), "every parent still gets it"
        head = message.data.split(b"\r\n\r\n", 1)[0].decode()
        assert not any(parent in head for parent in PARENTS), head
        assert "To: undisclosed-recipients:;" in head
        assert "\r\nCc:" not in head
        assert parse(message)["X-School-Policy"].startswith("fix; ref=RB-")
    finally:
        if mta is not None:
            mta.stop()
        daemon.stop()


@needs_sendmail
def test_gateway_down_means_4xx_then_delivery(
    mta: SendmailInstance,
    gateway: Daemon,
    sink: SmtpSink,
    rules_copy: Path,
    tmp_path: Path,
) -> None:
    # F=T in deploy/sendmail/school-milter.mc: a gateway that cannot be reached means a
    # temporary failure, never mail passing unscanned.
    gateway.stop()
    raw = build(STAFF, "a.patel@redborne.example", "Minutes", "Minutes attached.")
    with pytest.raises(SmtpRefused) as refused:
        mta.send(raw, STAFF, ["a.patel@redborne.example"])
    assert 400 <= refused.value.code < 500, refused.value
    time.sleep(0.5)
    assert sink.messages == []
    # The sending server retries; with the gateway back it goes through, scanned, once.
    (tmp_path / "again").mkdir()
    restarted = Daemon(rules_copy, tmp_path / "again", port=gateway.port)
    try:
        assert mta.send(raw, STAFF, ["a.patel@redborne.example"])[0] == 250
        (message,) = sink.wait_for(1, timeout=15)
        assert parse(message)["Subject"] == "Minutes"
        assert parse(message)["X-School-Policy"].startswith("accept; ref=RB-")
    finally:
        restarted.stop()


def trust_only_127_0_0_1(rules: Path) -> None:
    """The rules trust 127.0.0.1 alone, so mail from 127.0.0.2 comes from a client outside."""
    policy = rules / "policy.yaml"
    trusted = "trusted_networks: [127.0.0.0/8,"
    assert trusted in policy.read_text()
    policy.write_text(policy.read_text().replace(trusted, "trusted_networks: [127.0.0.1/32,"))


def send_obscene_from_outside(mta: SendmailInstance) -> int:
    raw = build("prize@spam.example", "a.patel@redborne.example", "you won", "fuck you and your school")
    code, _ = mta.send(raw, "prize@spam.example", ["a.patel@redborne.example"], client_address="127.0.0.2")
    return code


@needs_sendmail
def test_without_a_store_received_obscene_mail_is_quarantined_by_sendmail(
    rules_copy: Path, tmp_path: Path, sink: SmtpSink
) -> None:
    # With `database = ""` the protocol's quarantine action is used: Sendmail keeps the
    # message in its queue, held (an hf file), and delivers nothing. The rules trust
    # 127.0.0.1 alone and the mail comes from 127.0.0.2: a client from outside.
    trust_only_127_0_0_1(rules_copy)
    (tmp_path / "nostore").mkdir()
    daemon = Daemon(rules_copy, tmp_path / "nostore", "--database=")
    mta = None
    try:
        mta = SendmailInstance(
            tmp_path / "sendmail",
            next_hop=sink.address,
            milter=f"inet:{daemon.port}@127.0.0.1",
            extra_mc=["RELAY_DOMAIN(`redborne.example')dnl"],  # the school's mail server
        )
        mta.start()
        code = send_obscene_from_outside(mta)
        assert code == 250  # held by Sendmail: the sender learns nothing
        (decision,) = wait_for_decisions(daemon, 1)
        assert decision["action"] == "quarantine" and decision["direction"] == "inbound"
        (held,) = [name for name in mta.queue_files() if name.startswith("hf")]
        control = (mta.queue_directory / held).read_text(errors="replace")
        assert f"qschool policy, reference {decision['reference']}" in control.splitlines()
        time.sleep(0.5)
        assert sink.messages == []
    finally:
        if mta is not None:
            mta.stop()
        daemon.stop()


@needs_sendmail
def test_with_the_store_over_a_unix_socket_quarantined_mail_is_stored_and_sendmail_keeps_no_copy(
    rules_copy: Path, tmp_path: Path, sink: SmtpSink
) -> None:
    # The deployment most schools have: the store (the default), and S=local: to a socket
    # file. The gateway stores the message, then tells Sendmail to discard its copy.
    trust_only_127_0_0_1(rules_copy)
    # Sendmail refuses a socket with a world-writable directory on its path ("unsafe"), so
    # not under /tmp: a private directory in /run, as the systemd unit's RuntimeDirectory.
    run = Path(tempfile.mkdtemp(prefix="school-milter-test-", dir="/run"))
    socket_path = run / "milter.sock"
    (tmp_path / "gw").mkdir()
    host, port = sink.address
    # Alerts and guidance go to the sink too (the re-injection listener's stand-in).
    daemon = Daemon(
        rules_copy, tmp_path / "gw", "--milter", f"unix:{socket_path}", "--reinject", f"{host}:{port}"
    )
    mta = None
    try:
        mta = SendmailInstance(
            tmp_path / "sendmail",
            next_hop=sink.address,
            milter=f"local:{socket_path}",
            extra_mc=["RELAY_DOMAIN(`redborne.example')dnl"],
        )
        mta.start()
        assert f"S=local:{socket_path}" in (mta.conf / "school-milter.mc").read_text()
        code = send_obscene_from_outside(mta)
        assert code == 250  # the sender learns nothing
        (decision,) = wait_for_decisions(daemon, 1)
        assert decision["action"] == "quarantine" and decision["direction"] == "inbound"
        store = Store(f"sqlite:///{tmp_path / 'gw'}/q.db")
        try:
            (held,) = store.find(HeldFilter(kind="quarantine"))
            record = store.get(held.id)
        finally:
            store.close()
        assert record.sender == "prize@spam.example" and record.recipients == ("a.patel@redborne.example",)
        assert record.id == decision["reference"] and record.queue_id == decision["queue_id"] != ""
        # SLT's alert arrives; the message itself does not, and Sendmail holds no copy.
        alert = sink.wait_for(1, timeout=15)[0]
        assert "slt@redborne.example" in alert.rcpt_tos and b"fuck you" not in alert.data
        time.sleep(0.5)
        assert not any("a.patel@redborne.example" in m.rcpt_tos for m in sink.messages)
        assert mta.queue_files() == []
    finally:
        if mta is not None:
            mta.stop()
        daemon.stop()
        shutil.rmtree(run, ignore_errors=True)


@needs_sendmail
def test_reinjection_listener_of_the_snippet_skips_the_gateway(
    gateway: Daemon, sink: SmtpSink, tmp_path: Path
) -> None:
    # Released mail and guidance come back through the listener the snippet documents
    # (commented out there, see why); it must take them without scanning them again.
    (line,) = [
        line.removeprefix("dnl ")
        for line in DEPLOY_MC.read_text().splitlines()
        if line.startswith("dnl DAEMON_OPTIONS(`Port=10026")
    ]
    reinject_port = free_port()
    mta = SendmailInstance(
        tmp_path / "sendmail",
        next_hop=sink.address,
        milter=f"inet:{gateway.port}@127.0.0.1",
        extra_mc=[line.replace("Port=10026", f"Port={reinject_port}")],
    )
    mta.start()
    try:
        raw = build(STAFF, "supplier@elsewhere.example", "Re: delivery", "Your fucking van was late again")
        with pytest.raises(SmtpRefused):
            mta.send(raw, STAFF, ["supplier@elsewhere.example"])  # the MTA listener: scanned
        mta.port = reinject_port
        assert mta.send(raw, STAFF, ["supplier@elsewhere.example"])[0] == 250
        (message,) = sink.wait_for(1, timeout=15)
        assert "X-School-Policy" not in parse(message)
        assert len(decisions(gateway)) == 1  # only the first one met the gateway
    finally:
        mta.stop()


def _sendmail_seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)([smh]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1, "s": 1, "m": 60, "h": 3600}[unit]


def test_deploy_timeouts_leave_the_verdict_to_the_gateway() -> None:
    # Sendmail's T=E is the whole wait from end of message to the final reply; keep-alives
    # (SMFIR_PROGRESS) do not extend it, they only restart the T=R wait for the next
    # packet. So E must outlast the gateway's scan_timeout (whose tempfail carries a
    # reference) and R must outlast the interval between keep-alives.
    line = next(line for line in DEPLOY_MC.read_text().splitlines() if line.startswith("INPUT_MAIL_FILTER"))
    found = re.search(r"T=([^,']+)", line)
    assert found, line
    timeouts = {
        name: _sendmail_seconds(value)
        for name, value in (part.split(":") for part in found.group(1).split(";"))
    }
    defaults = Settings()
    assert timeouts["E"] > defaults.scan_timeout
    assert timeouts["R"] > defaults.progress_interval
    assert "F=T" in line
