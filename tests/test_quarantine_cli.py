"""The technicians' commands (`school-milter quarantine|block|allow|lists`) against a real
SQLite store and a real SMTP relay: what they print, what they refuse, what they deliver,
and that everything they do is in the audit log with who did it and why."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from milter.cli import main
from milter.envelope import Envelope
from milter.store import NotFound, Store
from milter.store.models import HeldMessage
from tests.postfix_harness import SmtpSink, free_port
from tests.test_store import OBSCENE

ADVERT = {
    "detector": "advertising",
    "category": "commercial",
    "severity": "medium",
    "clause": "2.8",
    "summary": "commercial advertising from a member of staff",
    "evidence": ["buy now"],
    "location": "body",
}


def raw(subject: str, body: str, message_id: str, mail_from: str, to: str, extra: str = "") -> bytes:
    return (
        f"Received: from mx1.outside.example by gw1.redborne.example\r\n"
        f"From: {mail_from}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n{extra}"
        f"\r\n{body}\r\n"
    ).encode()


class Held:
    """A store with three held messages, made the way the daemon makes them (Store.hold)."""

    def __init__(self, tmp: Path, rules: Path) -> None:
        self.database = f"sqlite:///{tmp}/q.db"
        self.rules = rules
        self.store = Store(self.database)
        self.rude = self._hold(
            "RB-RUDE-0001",
            raw(
                "You lost",
                "BODY-RUDE you are a disgrace",
                "<rude@outside.example>",
                "troll@outside.example",
                "pupil@redborne.example",
            ),
            Envelope(
                mail_from="troll@outside.example",
                rcpt_to=("pupil@redborne.example", "form-tutor@redborne.example"),
                queue_id="Q1",
            ),
            [OBSCENE],
            "inbound",
            subject="You lost",
            header_from="troll@outside.example",
        )
        self.advert = self._hold(
            "RB-ADVT-0002",
            raw(
                "Cheap tickets",
                "BODY-ADVERT buy now",
                "<advert@redborne.example>",
                "a.patel@redborne.example",
                "parent@home.example",
            ),
            Envelope(mail_from="a.patel@redborne.example", rcpt_to=("parent@home.example",), queue_id="Q2"),
            [ADVERT],
            "outbound",
            subject="Cheap tickets",
            header_from="a.patel@redborne.example",
        )
        self.personal = self._hold(
            "RB-PERS-0003",
            raw(
                "Appointment",
                "BODY-PERSONAL my hospital appointment",
                "<personal@redborne.example>",
                "j.hughes@redborne.example",
                "gp@surgery.example",
                extra="Sensitivity: Personal\r\n",
            ),
            Envelope(mail_from="j.hughes@redborne.example", rcpt_to=("gp@surgery.example",), queue_id="Q3"),
            [OBSCENE],
            "outbound",
            subject="Appointment",
            header_from="j.hughes@redborne.example",
            sensitivity="Personal",
        )

    def _hold(
        self,
        reference: str,
        message: bytes,
        envelope: Envelope,
        findings: list[dict[str, Any]],
        direction: str,
        **kwargs: Any,
    ) -> str:
        verdict = {
            "action": "quarantine",
            "reference": reference,
            "direction": direction,
            "sender_role": "outsider" if direction == "inbound" else "staff",
            "clauses": [f["clause"] for f in findings],
            "findings": findings,
        }
        held_id, new = self.store.hold(message, envelope, verdict, message_id=f"<{reference}>", **kwargs)
        assert new
        return held_id

    def raw_of(self, held_id: str) -> bytes:
        return self.store.body(held_id, "test-harness", "comparing what was delivered")

    def cli(self, *args: str) -> int:
        """`school-milter --rules R <args...> --database D`, as a technician would type it."""
        return main(["--rules", str(self.rules), *args, "--database", self.database])

    def audit(self) -> list[tuple[str, str, str, str]]:
        return [(e.actor, e.action, e.target, e.reason) for e in self.store.audit_entries()]


@pytest.fixture
def held(tmp_path: Path, rules_dir: Path) -> Iterator[Held]:
    h = Held(tmp_path, rules_dir)
    yield h
    h.store.close()


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


def reinject(sink: SmtpSink) -> str:
    return f"127.0.0.1:{sink.port}"


# ----------------------------------------------------------------------------- list


def test_list_shows_held_messages_with_filters(held: Held, capsys: pytest.CaptureFixture[str]) -> None:
    assert held.cli("quarantine", "list") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["ID", "RECEIVED", "(UTC)", "STATUS"]
    for held_id in (held.rude, held.advert, held.personal):
        assert held_id in out
    assert "obscene_language/profanity" in out and "troll@outside.example" in out
    assert "BODY-" not in out

    def listed(*filters: str) -> set[str]:
        assert held.cli("quarantine", "list", "--json", *filters) == 0
        return {json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()}

    everything = {held.rude, held.advert, held.personal}
    assert listed() == everything
    assert listed("--direction", "outbound") == {held.advert, held.personal}
    assert listed("--direction", "inbound") == {held.rude}
    assert listed("--sender", "A.Patel@") == {held.advert}
    assert listed("--recipient", "form-tutor@redborne.example") == {held.rude}
    assert listed("--category", "advertising") == {held.advert}
    assert listed("--category", "obscene_language/profanity") == {held.rude, held.personal}
    assert listed("--status", "held") == everything
    assert listed("--status", "released") == set()
    assert listed("--kind", "report") == set()
    assert listed("--since", "1h") == everything
    assert (
        listed("--since", (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).date().isoformat()) == everything
    )
    in_an_hour = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).astimezone(
        dt.timezone(dt.timedelta(hours=5))
    )
    assert listed("--since", in_an_hour.isoformat()) == set()
    assert listed("--limit", "1") <= everything and len(listed("--limit", "1")) == 1

    assert held.cli("quarantine", "list", "--json", "--sender", "troll") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["recipients"] == ["pupil@redborne.example", "form-tutor@redborne.example"]
    assert record["findings"] == [OBSCENE]
    assert record["has_body"] is True and record["personal"] is False

    assert held.cli("quarantine", "list", "--sender", "nobody@") == 0
    assert "nothing held matches" in capsys.readouterr().out
    # Listing opens nothing.
    assert held.audit() == []


def test_bad_since_is_a_usage_error(held: Held, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        held.cli("quarantine", "list", "--since", "last tuesday")
    assert exit_.value.code == 2
    assert "use 7d, 12h, 30m or an ISO date" in capsys.readouterr().err


# ----------------------------------------------------------------------------- show


def test_show_without_reason_shows_findings_but_not_the_body(
    held: Held, capsys: pytest.CaptureFixture[str]
) -> None:
    assert held.cli("quarantine", "show", held.rude, "--as", "tech1") == 0
    out = capsys.readouterr().out
    assert f"id:          {held.rude}  (quarantine, held)" in out
    assert "obscene_language/profanity (high, clause 2.3): obscene language in the body" in out
    assert "evidence: f***ing" in out
    assert "pupil@redborne.example, form-tutor@redborne.example" in out
    assert "BODY-RUDE" not in out
    assert "add --reason" in out

    assert held.cli("quarantine", "show", held.rude, "--json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["id"] == held.rude and record["findings"] == [OBSCENE]
    assert held.store.audit_entries(action="view_body") == []
    assert held.audit() == []


def test_show_with_reason_prints_the_body_and_audits_who_and_why(
    held: Held, capsys: pytest.CaptureFixture[str]
) -> None:
    assert held.cli("quarantine", "show", held.rude, "--as", "tech1", "--reason", "parent complaint #12") == 0
    out = capsys.readouterr().out
    assert "----- message as received -----" in out
    assert "BODY-RUDE you are a disgrace" in out
    assert "Message-ID: <rude@outside.example>" in out
    assert held.audit() == [("tech1", "view_body", held.rude, "parent complaint #12")]
    assert held.store.audit_entries()[0].details["via"] == "cli"


def test_show_of_an_unknown_or_malformed_id_is_refused(
    held: Held, capsys: pytest.CaptureFixture[str]
) -> None:
    assert held.cli("quarantine", "show", "RB-NONE-0000") == 3
    assert "no held message RB-NONE-0000" in capsys.readouterr().err
    assert held.cli("quarantine", "show", "../etc/passwd", "--reason", "x") == 3
    assert "is not a quarantine id" in capsys.readouterr().err


def test_personal_body_stays_closed_until_the_principal_authorizes(
    held: Held, capsys: pytest.CaptureFixture[str]
) -> None:
    assert held.cli("quarantine", "show", held.personal, "--as", "tech1", "--reason", "curious") == 3
    captured = capsys.readouterr()
    assert "BODY-PERSONAL" not in captured.out
    assert "personal:    yes" in captured.out
    assert "marked personal" in captured.err

    # Only the people rules/policy.yaml names may record authority.
    assert held.cli("quarantine", "authorize", held.personal, "--as", "tech1", "--reason", "I need it") == 3
    assert "tech1 may not grant authority" in capsys.readouterr().err
    assert held.cli("quarantine", "show", held.personal, "--as", "tech1", "--reason", "again") == 3
    capsys.readouterr()

    assert (
        held.cli(
            "quarantine",
            "authorize",
            held.personal,
            "--as",
            "principal",
            "--reason",
            "DSL request",
            "--for",
            "dsl",
        )
        == 0
    )
    assert "authority recorded by principal for dsl" in capsys.readouterr().out
    assert held.cli("quarantine", "show", held.personal, "--as", "tech1", "--reason", "still curious") == 3
    capsys.readouterr()
    assert (
        held.cli("quarantine", "show", held.personal, "--as", "dsl", "--reason", "safeguarding review") == 0
    )
    assert "BODY-PERSONAL my hospital appointment" in capsys.readouterr().out

    assert held.cli("quarantine", "authorize", held.personal, "--as", "Deputy-Head", "--reason", "any") == 0
    assert "for any reviewer" in capsys.readouterr().out
    assert held.cli("quarantine", "show", held.personal, "--as", "tech1", "--reason", "with authority") == 0
    assert "BODY-PERSONAL" in capsys.readouterr().out

    assert list(reversed(held.audit())) == [
        ("tech1", "view_refused", held.personal, "curious"),
        ("tech1", "view_refused", held.personal, "again"),
        ("principal", "grant_authority", held.personal, "DSL request"),
        ("tech1", "view_refused", held.personal, "still curious"),
        ("dsl", "view_body", held.personal, "safeguarding review"),
        ("Deputy-Head", "grant_authority", held.personal, "any"),
        ("tech1", "view_body", held.personal, "with authority"),
    ]


# -------------------------------------------------------------------------- release


def test_release_delivers_once_to_the_original_recipients(
    held: Held, sink: SmtpSink, capsys: pytest.CaptureFixture[str]
) -> None:
    original = held.raw_of(held.rude)
    assert (
        held.cli(
            "quarantine",
            "release",
            held.rude,
            "--as",
            "tech1",
            "--reason",
            "false positive",
            "--reinject",
            reinject(sink),
        )
        == 0
    )
    assert f"{held.rude} released to pupil@redborne.example, form-tutor@redborne.example" in (
        capsys.readouterr().out
    )
    (message,) = sink.wait_for(1)
    assert message.mail_from == "troll@outside.example"
    assert message.rcpt_tos == ("pupil@redborne.example", "form-tutor@redborne.example")
    assert message.data == f"X-School-Policy-Released: {held.rude} by tech1\r\n".encode() + original
    record = held.store.get(held.rude)
    assert (record.status, record.status_by) == ("released", "tech1")

    # A second release, by anyone, is refused and nothing more arrives.
    assert (
        held.cli(
            "quarantine",
            "release",
            held.rude,
            "--as",
            "tech2",
            "--reason",
            "again",
            "--reinject",
            reinject(sink),
        )
        == 3
    )
    assert "released, not held" in capsys.readouterr().err
    time.sleep(0.5)
    assert len(sink.messages) == 1
    assert [a for a in held.audit() if a[1] == "release"] == [
        ("tech1", "release", held.rude, "false positive")
    ]


def test_release_to_a_named_address_goes_only_there(
    held: Held, sink: SmtpSink, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        held.cli(
            "quarantine",
            "release",
            held.rude,
            "--as",
            "tech1",
            "--reason",
            "evidence for the head of year",
            "--to",
            "HeadOfYear@redborne.example",
            "--reinject",
            reinject(sink),
        )
        == 0
    )
    (message,) = sink.wait_for(1)
    assert message.rcpt_tos == ("headofyear@redborne.example",)
    assert b"BODY-RUDE" in message.data
    assert "released to headofyear@redborne.example" in capsys.readouterr().out
    entry = held.store.audit_entries(action="release")[0]
    assert entry.details["recipients"] == ["headofyear@redborne.example"]


def test_release_refuses_a_bad_address_and_a_missing_reason(
    held: Held, sink: SmtpSink, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = ("quarantine", "release", held.rude, "--reinject", reinject(sink))
    assert held.cli(*bad, "--reason", "x", "--to", "someone\r\nRCPT TO:<evil@x>") == 3
    assert "is not a mail address" in capsys.readouterr().err
    assert held.cli(*bad, "--reason", "  ") == 3
    assert "a reason is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        held.cli(*bad)
    capsys.readouterr()
    assert held.store.get(held.rude).status == "held"
    assert sink.messages == []


def test_release_when_the_relay_is_down_leaves_it_held(
    held: Held, sink: SmtpSink, capsys: pytest.CaptureFixture[str]
) -> None:
    down = f"127.0.0.1:{free_port()}"
    release = ("quarantine", "release", held.rude, "--as", "tech1", "--reason", "false positive")
    assert held.cli(*release, "--reinject", down) == 1
    err = capsys.readouterr().err
    assert err.startswith("school-milter: ") and "still held" in err and "Traceback" not in err
    assert held.store.get(held.rude).status == "held"
    assert held.audit()[0][:3] == ("tech1", "release_failed", held.rude)
    # Once the relay is back, the release goes through.
    assert held.cli(*release, "--reinject", reinject(sink)) == 0
    assert len(sink.wait_for(1)) == 1


# ------------------------------------------------------------ delete, purge, export


def test_delete_removes_the_body(held: Held, capsys: pytest.CaptureFixture[str]) -> None:
    assert held.cli("quarantine", "delete", held.advert, "--as", "tech1", "--reason", "obvious spam") == 0
    assert f"{held.advert}: body deleted" in capsys.readouterr().out
    assert not held.store.get(held.advert).has_body
    with pytest.raises(NotFound):
        held.store.body(held.advert, "tech1", "look")
    assert held.cli("quarantine", "show", held.advert, "--as", "tech2", "--reason", "look") == 3
    assert "gone" in capsys.readouterr().err
    assert held.cli("quarantine", "list", "--status", "deleted", "--json") == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [held.advert]
    assert held.audit() == [("tech1", "delete", held.advert, "obvious spam")]
    with pytest.raises(SystemExit):  # --reason is required
        held.cli("quarantine", "delete", held.rude)
    assert held.store.get(held.rude).has_body


def backdate(store: Store, held_id: str, days: int) -> None:
    with store.session() as session:
        session.execute(
            update(HeldMessage)
            .where(HeldMessage.id == held_id)
            .values(received_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=days))
        )


def test_purge_deletes_what_is_older_than_the_days_given(
    held: Held, capsys: pytest.CaptureFixture[str]
) -> None:
    backdate(held.store, held.rude, 10)
    backdate(held.store, held.advert, 40)
    assert held.cli("quarantine", "purge", "--days", "35", "--as", "cron") == 0
    assert "purged 1 message(s) older than 35 days" in capsys.readouterr().out
    with pytest.raises(NotFound):
        held.store.get(held.advert)
    assert held.store.get(held.rude).has_body
    # Without --days: rules/policy.yaml's retention_days (30).
    assert held.cli("quarantine", "purge", "--as", "cron") == 0
    assert "purged 0 message(s) older than 30 days" in capsys.readouterr().out
    backdate(held.store, held.rude, 31)
    assert held.cli("quarantine", "purge", "--as", "cron") == 0
    assert "purged 1 message(s) older than 30 days" in capsys.readouterr().out
    with pytest.raises(NotFound):
        held.store.get(held.rude)
    assert held.store.get(held.personal).has_body
    purges = held.store.audit_entries(action="purge")
    assert [(e.actor, e.reason, e.details["count"], e.details["ids"]) for e in purges] == [
        ("cron", "retention 30 days", 1, [held.rude]),
        ("cron", "retention 30 days", 0, []),
        ("cron", "retention 35 days", 1, [held.advert]),
    ]


def test_export_writes_one_persons_records_to_a_file(
    held: Held, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "sar.json"
    assert (
        held.cli(
            "quarantine",
            "export",
            "A.Patel@redborne.example",
            "--as",
            "dpo",
            "--reason",
            "subject access request SAR-17",
            "--output",
            str(output),
        )
        == 0
    )
    assert f"1 record(s) written to {output}" in capsys.readouterr().out
    data = json.loads(output.read_text())
    assert data["subject"] == "a.patel@redborne.example"
    assert [m["id"] for m in data["messages"]] == [held.advert]
    assert data["messages"][0]["findings"] == [ADVERT]
    assert "BODY-ADVERT" not in output.read_text()
    assert held.audit() == [("dpo", "export", "a.patel@redborne.example", "subject access request SAR-17")]
    # To standard output without --output.
    assert held.cli("quarantine", "export", "gp@surgery.example", "--as", "dpo", "--reason", "SAR-18") == 0
    assert [m["id"] for m in json.loads(capsys.readouterr().out)["messages"]] == [held.personal]


# --------------------------------------------------------------------------- lists


def test_block_allow_and_approving_proposals(held: Held, capsys: pytest.CaptureFixture[str]) -> None:
    assert held.cli("block", "domain", "Spam.Example", "--as", "tech1", "--reason", "phishing run") == 0
    assert "applies to the next message" in capsys.readouterr().out
    assert held.cli("allow", "sender", "news@trust.example", "--as", "tech1", "--reason", "newsletter") == 0
    assert held.cli("block", "domain", "localhost", "--as", "tech1") == 3
    assert "not a valid domain" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        held.cli("block", "ip", "192.0.2.1")
    capsys.readouterr()
    # Proposals come from the report address (milter/followup.py).
    proposed = held.store.add_entry("block", "sender", "prize@lottery.example", "report", status="proposed")
    refused = held.store.add_entry("block", "url", "https://partner.example/", "report", status="proposed")
    version = held.store.list_version()

    assert held.cli("lists", "--status", "proposed") == 0
    out = capsys.readouterr().out
    assert "prize@lottery.example" in out and "https://partner.example/" in out and "spam.example" not in out
    assert held.cli("lists", "approve", str(proposed), "--as", "tech2", "--reason", "seen three times") == 0
    assert f"entry {proposed}: approved" in capsys.readouterr().out
    assert held.store.list_version() == version + 1
    assert held.cli("lists", "refuse", str(refused), "--as", "tech2", "--reason", "a real partner") == 0
    assert f"entry {refused}: refused" in capsys.readouterr().out
    assert held.store.list_version() == version + 1
    assert held.cli("lists", "approve", str(refused), "--as", "tech2") == 3
    assert "already refused" in capsys.readouterr().err
    assert held.cli("lists", "approve") == 3
    assert "needs the entry's number" in capsys.readouterr().err
    assert held.cli("lists", "approve", "9999") == 3
    assert "no list entry 9999" in capsys.readouterr().err

    lists = held.store.lists()
    assert lists.blocks("domain") == {"spam.example"}
    assert lists.blocks("sender") == {"prize@lottery.example"}
    assert lists.blocks("url") == frozenset()
    assert lists.allows("sender") == {"news@trust.example"}

    domain = next(e.id for e in held.store.entries("block") if e.value == "spam.example")
    assert held.cli("lists", "remove", str(domain), "--as", "tech1", "--reason", "too broad") == 0
    assert held.store.lists().blocks("domain") == frozenset()
    assert held.cli("lists", "--list", "block") == 0
    out = capsys.readouterr().out
    assert "removed" in out and "by tech2" in out

    assert list(reversed(held.audit())) == [
        ("tech1", "block", "domain:spam.example", "phishing run"),
        ("tech1", "allow", "sender:news@trust.example", "newsletter"),
        ("report", "propose_block", "sender:prize@lottery.example", ""),
        ("report", "propose_block", "url:https://partner.example/", ""),
        ("tech2", "approve_block", "sender:prize@lottery.example", "seen three times"),
        ("tech2", "refuse_block", "url:https://partner.example/", "a real partner"),
        ("tech1", "remove_block", "domain:spam.example", "too broad"),
    ]


# --------------------------------------------------------------------------- audit


def test_audit_csv_has_every_action_with_actor_and_reason(
    held: Held, sink: SmtpSink, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    steps: list[tuple[str, ...]] = [
        ("quarantine", "show", held.rude, "--as", "tech1", "--reason", "parent complaint"),
        ("quarantine", "show", held.personal, "--as", "tech2", "--reason", "curious"),
        ("quarantine", "authorize", held.personal, "--as", "principal", "--reason", "DSL request"),
        ("quarantine", "show", held.personal, "--as", "tech2", "--reason", "DSL request"),
        ("quarantine", "release", held.rude, "--as", "tech1", "--reason", "false positive"),
        ("quarantine", "delete", held.advert, "--as", "tech1", "--reason", "spam"),
        ("quarantine", "purge", "--days", "30", "--as", "cron"),
        ("quarantine", "export", "troll@outside.example", "--as", "dpo", "--reason", "SAR-17"),
        ("block", "domain", "spam.example", "--as", "tech1", "--reason", "phishing"),
        ("allow", "sender", "news@trust.example", "--as", "tech1", "--reason", "newsletter"),
    ]
    for step in steps:
        extra = ("--reinject", reinject(sink)) if step[1] == "release" else ()
        expected = 3 if step[-1] == "curious" else 0
        assert held.cli(*step, *extra) == expected, step
    sink.wait_for(1)
    capsys.readouterr()

    assert held.cli("quarantine", "audit", "--csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(rows[0]) == ["id", "at", "actor", "action", "target", "reason", "details"]
    got = [(r["actor"], r["action"], r["target"], r["reason"]) for r in reversed(rows)]
    assert got == [
        ("tech1", "view_body", held.rude, "parent complaint"),
        ("tech2", "view_refused", held.personal, "curious"),
        ("principal", "grant_authority", held.personal, "DSL request"),
        ("tech2", "view_body", held.personal, "DSL request"),
        ("tech1", "release", held.rude, "false positive"),
        ("tech1", "delete", held.advert, "spam"),
        ("cron", "purge", "", "retention 30 days"),
        ("dpo", "export", "troll@outside.example", "SAR-17"),
        ("tech1", "block", "domain:spam.example", "phishing"),
        ("tech1", "allow", "sender:news@trust.example", "newsletter"),
    ]
    for row in rows:
        at = dt.datetime.fromisoformat(row["at"])
        assert abs(at - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
        json.loads(row["details"])
    release = next(r for r in rows if r["action"] == "release")
    assert json.loads(release["details"])["recipients"] == [
        "pupil@redborne.example",
        "form-tutor@redborne.example",
    ]

    # The filters of the plain listing.
    assert held.cli("quarantine", "audit", "--actor", "tech2") == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("tech2" in line for line in out)
    assert "reason='DSL request'" in out[0]
    assert held.cli("quarantine", "audit", "--action", "delete", "--csv") == 0
    assert len(list(csv.DictReader(io.StringIO(capsys.readouterr().out)))) == 1
    assert held.cli("quarantine", "audit", "--target", held.personal, "--since", "1h", "--csv") == 0
    assert len(list(csv.DictReader(io.StringIO(capsys.readouterr().out)))) == 3
