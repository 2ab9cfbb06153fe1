"""The quarantine store (milter/store), the same tests on SQLite and on a real PostgreSQL.

What a technician relies on: a held message is kept exactly as it came, with its envelope,
verdict and findings; a retried message is not held twice; every look at a body, release,
deletion, purge and list change is in the audit log, which the database itself keeps
append-only; a message marked personal stays closed until the Principal records authority;
a message is released once, even when two people (or two processes) try at the same time;
two daemons can write to one store at once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, select, text, update
from sqlalchemy.exc import DBAPIError

from milter.envelope import Envelope
from milter.lists import ListsSource
from milter.store import HeldFilter, NotFound, Refused, Store, migrate
from milter.store.models import HeldMessage, ListVersion
from milter.store.store import ReleaseJob
from tests.conftest import REPO
from tests.pg_harness import PostgresInstance, postgres  # noqa: F401  (pytest fixture)

BACKENDS = ["sqlite", "postgresql"]
OBSCENE = {
    "detector": "obscene_language",
    "category": "profanity",
    "severity": "high",
    "clause": "2.3",
    "summary": "obscene language in the body",
    "evidence": ["f***ing"],
    "location": "body",
}
MALWARE = {
    "detector": "virus_scan",
    "category": "malware",
    "severity": "critical",
    "clause": "2.9",
    "summary": "the attachment invoice.doc is infected",
    "evidence": ["Eicar-Signature"],
    "location": "invoice.doc",
}


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store: a new SQLite file, or a new database on the private PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/q.db"
    pg: PostgresInstance = request.getfixturevalue("postgres")
    return pg.fresh_database(f"store_{uuid.uuid4().hex[:20]}")


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = Store(store_url)
    yield opened
    opened.close()


# ------------------------------------------------------------------------------ helpers


def raw_message(
    subject: str = "Hello",
    body: str = "Hello there.",
    *,
    message_id: str = "<m1@outside.example>",
    received: str = "from mx1.outside.example by gw1.redborne.example; Tue, 24 Nov 2026 09:00:00 +0000",
    headers: str = "",
) -> bytes:
    return (
        f"Received: {received}\r\n"
        f"From: Sender <sender@outside.example>\r\n"
        f"To: pupil@redborne.example\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: {message_id}\r\n"
        f"{headers}"
        f"\r\n{body}\r\n"
    ).encode()


def verdict(
    reference: str,
    findings: list[dict[str, Any]] | None = None,
    *,
    direction: str = "inbound",
    sender_role: str = "outsider",
    action: str = "quarantine",
) -> dict[str, Any]:
    return {
        "action": action,
        "reference": reference,
        "direction": direction,
        "sender_role": sender_role,
        "clauses": sorted({f["clause"] for f in findings or []}),
        "findings": list(findings or []),
    }


def envelope(
    mail_from: str = "sender@outside.example",
    *rcpt_to: str,
    queue_id: str = "4XyZ1",
) -> Envelope:
    return Envelope(
        mail_from=mail_from,
        rcpt_to=rcpt_to or ("pupil@redborne.example",),
        client_address="192.0.2.7",
        auth_user=None,
        queue_id=queue_id,
    )


def hold(
    store: Store,
    reference: str,
    *,
    subject: str = "Hello",
    body: str = "Hello there.",
    mail_from: str = "sender@outside.example",
    rcpt_to: tuple[str, ...] = ("pupil@redborne.example",),
    findings: list[dict[str, Any]] | None = None,
    direction: str = "inbound",
    kind: str = "quarantine",
    sensitivity: str | None = None,
    header_from: str = "sender@outside.example",
) -> str:
    """Hold a distinct message (its Message-ID is the reference); the held id."""
    held_id, new = store.hold(
        raw_message(subject, body, message_id=f"<{reference}@test>"),
        envelope(mail_from, *rcpt_to),
        verdict(reference, findings if findings is not None else [OBSCENE], direction=direction),
        subject=subject,
        header_from=header_from,
        message_id=f"<{reference}@test>",
        sensitivity=sensitivity,
        kind=kind,
    )
    assert new and held_id == reference
    return held_id


def backdate(store: Store, held_id: str, days: float) -> None:
    """Make a held message look `days` old (the test cannot wait a month)."""
    with store.session() as session:
        session.execute(
            update(HeldMessage)
            .where(HeldMessage.id == held_id)
            .values(received_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=days))
        )


def actions(store: Store, **filters: Any) -> list[tuple[str, str, str, str]]:
    """(actor, action, target, reason) of the audit log, oldest first."""
    return [(e.actor, e.action, e.target, e.reason) for e in reversed(store.audit_entries(**filters))]


CHILD_PREAMBLE = r"""
import json, pathlib, sys, time
args = json.loads(sys.argv[1])
def wait_for_go():
    pathlib.Path(args["ready"]).touch()
    go = pathlib.Path(args["go"])
    deadline = time.monotonic() + 60
    while not go.exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal within 60 s")
        time.sleep(0.002)
"""


def run_at_once(tmp_path: Path, script: str, jobs: list[dict[str, Any]], timeout: float = 180) -> list[Any]:
    """Run one Python process per job, let them all start their work at the same moment,
    and return what each printed (JSON on its last line); fails on any error or exit status."""
    go = tmp_path / f"go-{uuid.uuid4().hex}"
    procs: list[subprocess.Popen[str]] = []
    ready: list[Path] = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        for n, job in enumerate(jobs):
            ready.append(tmp_path / f"ready-{n}-{go.name}")
            payload = json.dumps({**job, "ready": str(ready[-1]), "go": str(go)})
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", CHILD_PREAMBLE + script, payload],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in ready):
            failed = [p for p in procs if p.poll() is not None]
            if failed:
                out, err = failed[0].communicate()
                pytest.fail(f"a process ended before it was ready ({failed[0].returncode}):\n{err}")
            assert time.monotonic() < deadline, "the processes did not get ready within 60 s"
            time.sleep(0.01)
        go.touch()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"exit {proc.returncode}:\n{err}"
            assert "Traceback" not in err, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- holding


def test_hold_keeps_bytes_envelope_verdict_and_findings_exactly(store: Store, store_url: str) -> None:
    # CRLF line ends, 8-bit bytes that are not UTF-8 and a NUL: kept byte for byte.
    raw = raw_message("Win a prize", "Claim it now") + b"caf\xe9 \xff\xfe\x00 end\r\n"
    v = verdict("RB-7K2M-9QXD", [OBSCENE, MALWARE])
    v["headers"] = [["X-School-Policy", "quarantined"]]
    env = Envelope(
        mail_from="Sender@Outside.Example",
        rcpt_to=("Pupil@Redborne.example", "teacher@redborne.example"),
        client_address="192.0.2.7",
        auth_user="",
        queue_id="4XyZ1",
    )
    held_id, new = store.hold(
        raw,
        env,
        v,
        subject="Win a prize",
        header_from="Sender@Outside.Example",
        message_id="<m1@outside.example>",
    )
    assert (held_id, new) == ("RB-7K2M-9QXD", True)

    # What a reviewer sees later, from another connection (the console, another host).
    later = Store(store_url)
    try:
        record = later.get(held_id)
        assert record.status == "held" and record.kind == "quarantine"
        assert record.sender == "sender@outside.example"
        assert record.header_from == "sender@outside.example"
        assert record.recipients == ("pupil@redborne.example", "teacher@redborne.example")
        assert (record.queue_id, record.client_address) == ("4XyZ1", "192.0.2.7")
        assert record.subject == "Win a prize"
        assert record.message_id == "<m1@outside.example>"
        assert (record.direction, record.sender_role, record.action) == ("inbound", "outsider", "quarantine")
        assert record.findings == (OBSCENE, MALWARE)
        assert record.verdict == v
        assert record.categories == ("obscene_language/profanity", "virus_scan/malware")
        assert record.size == len(raw)
        assert record.body_sha256 == hashlib.sha256(raw).hexdigest()
        assert record.has_body and not record.personal
        assert record.received_at.tzinfo is not None
        assert abs(record.received_at - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
        assert later.body(held_id, "tech1", "checking the store") == raw
        assert json.loads(json.dumps(record.as_dict()))["findings"] == [OBSCENE, MALWARE]
    finally:
        later.close()


def test_a_repeat_of_the_same_message_is_found_not_held_twice(store: Store) -> None:
    first = raw_message(received="from mx1 by gw1; Tue, 24 Nov 2026 09:00:00 +0000")
    # The MTA retried after the daemon died between storing and replying: a new Received
    # line, a new queue id and a new verdict reference, but the same message.
    again = raw_message(received="from mx1 by gw2; Tue, 24 Nov 2026 09:05:00 +0000")
    assert first != again
    held, new = store.hold(
        first, envelope(queue_id="Q1"), verdict("RB-AAAA-0001", [OBSCENE]), message_id="<m1@outside.example>"
    )
    assert new
    repeat, new = store.hold(
        again, envelope(queue_id="Q2"), verdict("RB-AAAA-0002", [OBSCENE]), message_id="<m1@outside.example>"
    )
    assert (repeat, new) == (held, False)
    assert [r.id for r in store.find()] == [held]
    with pytest.raises(NotFound):
        store.get("RB-AAAA-0002")

    # The same content to someone else, or with another Message-ID, is another message.
    other, new = store.hold(
        again,
        envelope("sender@outside.example", "teacher@redborne.example"),
        verdict("RB-AAAA-0003", [OBSCENE]),
        message_id="<m1@outside.example>",
    )
    assert (other, new) == ("RB-AAAA-0003", True)
    other, new = store.hold(
        again, envelope(), verdict("RB-AAAA-0004", [OBSCENE]), message_id="<m2@outside.example>"
    )
    assert (other, new) == ("RB-AAAA-0004", True)
    assert len(store.find()) == 3


def test_a_reference_that_is_not_a_quarantine_id_is_refused(store: Store) -> None:
    for bad in ("../../etc/passwd", "RB-1234-5678'; DROP TABLE held_message; --", ""):
        with pytest.raises(NotFound):
            store.hold(raw_message(), envelope(), verdict(bad))
        with pytest.raises(NotFound):
            store.get(bad)
    assert store.find() == []


def test_find_filters(store: Store) -> None:
    old = hold(store, "RB-FIND-0001", subject="old one", findings=[MALWARE])
    backdate(store, old, days=10)
    obscene = hold(store, "RB-FIND-0002", subject="rude", findings=[OBSCENE])
    outbound = hold(
        store,
        "RB-FIND-0003",
        mail_from="a.patel@redborne.example",
        header_from="a.patel@redborne.example",
        rcpt_to=("parent@home.example",),
        direction="outbound",
        findings=[MALWARE],
    )
    report = hold(store, "RB-FIND-0004", kind="report", findings=[], rcpt_to=("report@redborne.example",))
    deleted = hold(store, "RB-FIND-0005", mail_from="Spammer@Lottery.example", findings=[OBSCENE])
    store.delete(deleted, "tech1", "obvious spam")

    def ids(**kwargs: Any) -> set[str]:
        return {r.id for r in store.find(HeldFilter(**kwargs))}

    everything = {old, obscene, outbound, report, deleted}
    assert ids() == everything
    # Newest first: the message from ten days ago comes last.
    assert store.find()[-1].id == old
    assert ids(since=dt.datetime.now(dt.UTC) - dt.timedelta(days=1)) == everything - {old}
    # A time with another offset means the same instant (SQLite keeps only UTC wall clock).
    plus_two = dt.timezone(dt.timedelta(hours=2))
    assert ids(since=(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).astimezone(plus_two)) == (
        everything - {old}
    )
    assert ids(since=(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).astimezone(plus_two)) == set()
    assert ids(category="obscene_language") == {obscene, deleted}
    assert ids(category="virus_scan/malware") == {old, outbound}
    assert ids(category="Virus_Scan") == {old, outbound}
    assert ids(direction="outbound") == {outbound}
    assert ids(sender="spammer@lottery") == {deleted}
    assert ids(sender="A.Patel@redborne.example") == {outbound}  # case does not matter
    assert ids(recipient="parent@home.example") == {outbound}
    assert ids(recipient="report@") == {report}
    assert ids(status="deleted") == {deleted}
    assert ids(status="held") == everything - {deleted}
    assert ids(kind="report") == {report}
    assert ids(kind="quarantine") == everything - {report}
    assert ids(direction="outbound", category="obscene_language") == set()
    assert ids(text="RUDE") == {obscene}
    assert [r.id for r in store.find(limit=2)] == [r.id for r in store.find()][:2]
    assert [r.id for r in store.find(limit=10, offset=4)] == [old]
    # Looking is not opening: no body, nothing in the audit log but the deletion.
    assert [a[1] for a in actions(store)] == ["delete"]


# ---------------------------------------------------------------- bodies and authority


def test_opening_a_body_needs_a_reason_and_is_audited(store: Store) -> None:
    held = hold(store, "RB-BODY-0001", body="the words in question")
    for blank in ("", "   "):
        with pytest.raises(Refused, match="reason"):
            store.body(held, "tech1", blank)
    assert actions(store) == []

    raw = store.body(held, "tech1", "parent complaint #4411")
    assert b"the words in question" in raw
    store.body(held, "dsl", "safeguarding review", via="console")
    assert actions(store) == [
        ("tech1", "view_body", held, "parent complaint #4411"),
        ("dsl", "view_body", held, "safeguarding review"),
    ]
    entry = store.audit_entries(action="view_body", actor="dsl")[0]
    assert entry.details["via"] == "console"
    assert abs(entry.at - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
    with pytest.raises(NotFound):
        store.body("RB-NONE-0000", "tech1", "looking")


@pytest.mark.parametrize(
    ("sensitivity", "subject"),
    [("Personal", "Trip letter"), ("private", "Trip letter"), (None, "PERSONAL: my appointment")],
)
def test_a_personal_body_stays_closed_without_authority(
    store: Store, sensitivity: str | None, subject: str
) -> None:
    held = hold(store, "RB-PERS-0001", subject=subject, sensitivity=sensitivity, body="private words")
    assert store.get(held).personal
    assert not store.may_open(held, "tech1")

    with pytest.raises(Refused, match="personal"):
        store.body(held, "tech1", "curious")
    assert actions(store) == [("tech1", "view_refused", held, "curious")]

    with pytest.raises(Refused, match="reason"):
        store.grant_authority(held, "principal", " ")
    # Authority for one reviewer does not open it for another.
    store.grant_authority(held, "principal", "safeguarding concern raised by DSL", granted_to="dsl")
    with pytest.raises(Refused):
        store.body(held, "tech1", "still curious")
    assert b"private words" in store.body(held, "dsl", "safeguarding review")
    # Authority for any reviewer.
    store.grant_authority(held, "principal", "police request ref 77")
    assert b"private words" in store.body(held, "tech1", "police request ref 77")
    assert actions(store) == [
        ("tech1", "view_refused", held, "curious"),
        ("principal", "grant_authority", held, "safeguarding concern raised by DSL"),
        ("tech1", "view_refused", held, "still curious"),
        ("dsl", "view_body", held, "safeguarding review"),
        ("principal", "grant_authority", held, "police request ref 77"),
        ("tech1", "view_body", held, "police request ref 77"),
    ]


def test_personal_is_a_word_in_the_subject_not_part_of_one(store: Store) -> None:
    held = hold(store, "RB-PERS-0002", subject="Personally, I think this is great")
    assert not store.get(held).personal
    assert store.body(held, "tech1", "review")


# --------------------------------------------------------------------------- release


def claim_from_two_threads(store: Store, held: str) -> tuple[list[ReleaseJob], list[Refused]]:
    """Two reviewers press release at the same moment: what each got."""
    barrier = threading.Barrier(2)
    jobs: list[ReleaseJob] = []
    refusals: list[Refused] = []
    lock = threading.Lock()

    def claim(who: str) -> None:
        barrier.wait()
        try:
            job = store.claim_release(held, who, "false positive")
        except Refused as exc:
            with lock:
                refusals.append(exc)
        else:
            with lock:
                jobs.append(job)

    threads = [threading.Thread(target=claim, args=(who,)) for who in ("tech1", "tech2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return jobs, refusals


def test_release_goes_to_exactly_one_of_two_threads(store: Store) -> None:
    ids = [hold(store, f"RB-RACE-{n:04d}") for n in range(8)]
    for held in ids:
        jobs, refusals = claim_from_two_threads(store, held)
        assert len(jobs) == 1 and len(refusals) == 1, (jobs, refusals)
        assert "releasing" in str(refusals[0])
        store.finish_release(jobs[0], store.get(held).status_by or "", "false positive")

    for held in ids:
        record = store.get(held)
        assert record.status == "released"
        with pytest.raises(Refused, match="released, not held"):
            store.claim_release(held, "tech3", "again")
    assert len(store.audit_entries(action="release")) == len(ids)


CLAIM_SCRIPT = r"""
from milter.store import Refused, Store
store = Store(args["url"], upgrade=False)
wait_for_go()
got = []
for held in args["ids"]:
    try:
        job = store.claim_release(held, args["actor"], "false positive")
    except Refused:
        continue
    got.append(job.id)
    store.finish_release(job, args["actor"], "false positive")
store.close()
print(json.dumps(got))
"""


def test_release_goes_to_exactly_one_of_two_processes(store: Store, store_url: str, tmp_path: Path) -> None:
    ids = [hold(store, f"RB-PROC-{n:04d}") for n in range(40)]
    first, second = run_at_once(
        tmp_path,
        CLAIM_SCRIPT,
        [{"url": store_url, "ids": ids, "actor": "tech1"}, {"url": store_url, "ids": ids, "actor": "tech2"}],
    )
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(ids)
    assert {store.get(i).status for i in ids} == {"released"}
    released = store.audit_entries(action="release")
    assert sorted(e.target for e in released) == sorted(ids)


def test_release_targets_and_a_failed_release_leaves_it_held(store: Store) -> None:
    held = hold(store, "RB-RELS-0001", rcpt_to=("a@redborne.example", "b@redborne.example"))
    job = store.claim_release(held, "tech1", "false positive")
    assert job.recipients == ("a@redborne.example", "b@redborne.example")
    assert job.mail_from == "sender@outside.example"
    assert job.raw == raw_message("Hello", "Hello there.", message_id=f"<{held}@test>")
    assert store.get(held).status == "releasing"
    # Being released right now: it cannot be deleted under the relay's feet.
    with pytest.raises(Refused, match="being released"):
        store.delete(held, "tech2", "spam")
    store.finish_release(job, "tech1", "false positive", error="SMTPServerDisconnected: gone")
    assert store.get(held).status == "held"
    assert actions(store, action="release_failed") == [("tech1", "release_failed", held, "false positive")]

    job = store.claim_release(held, "tech1", "to IT only", ["IT@Redborne.example"])
    assert job.recipients == ("it@redborne.example",)
    store.finish_release(job, "tech1", "to IT only")
    record = store.get(held)
    assert (record.status, record.status_by) == ("released", "tech1")
    assert store.audit_entries(action="release")[0].details["recipients"] == ["it@redborne.example"]
    with pytest.raises(NotFound):
        store.claim_release("RB-NONE-0000", "tech1", "x")


# ------------------------------------------------------------------ delete and purge


def test_delete_removes_the_body_for_good_and_is_audited(store: Store) -> None:
    held = hold(store, "RB-DELE-0001", body="do not keep this")
    kept = hold(store, "RB-DELE-0002")
    store.delete(held, "tech1", "spam, no value")
    record = store.get(held)
    assert not record.has_body
    assert (record.status, record.status_by) == ("deleted", "tech1")
    with pytest.raises(NotFound, match="gone"):
        store.body(held, "tech1", "look anyway")
    with pytest.raises(Refused):
        store.claim_release(held, "tech1", "release anyway")
    # The bytes are gone from the database, not just hidden.
    with store.engine.connect() as connection:
        bodies = dict(connection.execute(select(HeldMessage.id, HeldMessage.body)).all())
    assert bodies[held] is None and bodies[kept] is not None
    assert actions(store) == [("tech1", "delete", held, "spam, no value")]
    # The record (without content) stays until the purge: the audit trail can name it.
    assert [r.id for r in store.find(HeldFilter(status="deleted"))] == [held]


def test_purge_deletes_old_records_leaves_newer_ones_and_audits_once(store: Store) -> None:
    old = hold(store, "RB-PURG-0001", subject="Personal", sensitivity="Personal")
    older = hold(store, "RB-PURG-0002")
    newer = hold(store, "RB-PURG-0003")
    store.grant_authority(old, "principal", "needed for an investigation")
    store.add_pending_alert("it", old)
    store.body(old, "tech1", "investigation")
    backdate(store, old, days=31)
    backdate(store, older, days=400)
    backdate(store, newer, days=29)

    purged = store.purge(dt.timedelta(days=30), "retention-cron")
    assert sorted(purged) == [old, older]
    for held in (old, older):
        with pytest.raises(NotFound):
            store.get(held)
    assert store.get(newer).has_body
    assert [r.id for r in store.find()] == [newer]
    assert store.take_pending_alerts("it") == []
    entries = store.audit_entries(action="purge")
    assert len(entries) == 1
    assert (entries[0].actor, entries[0].reason) == ("retention-cron", "retention 30 days")
    assert entries[0].details["count"] == 2
    assert sorted(entries[0].details["ids"]) == [old, older]
    # The audit log keeps what happened to the purged messages.
    assert ("tech1", "view_body", old, "investigation") in actions(store)
    # A second purge finds nothing, and says so in the log.
    assert store.purge(dt.timedelta(days=30), "retention-cron") == []
    assert [e.details["count"] for e in store.audit_entries(action="purge")] == [0, 2]


def test_the_audit_log_refuses_update_and_delete_in_the_database(store: Store) -> None:
    held = hold(store, "RB-AUDT-0001")
    store.body(held, "tech1", "checking")
    store.audit("tech1", "block", "domain:spam.example", "phishing")
    before = actions(store)
    for statement in (
        "UPDATE audit_log SET reason = 'nothing to see'",
        "UPDATE audit_log SET actor = 'someone else' WHERE action = 'view_body'",
        "DELETE FROM audit_log",
        "DELETE FROM audit_log WHERE actor = 'tech1'",
    ):
        with pytest.raises(DBAPIError, match="append-only"), store.engine.begin() as connection:
            connection.execute(text(statement))
    assert actions(store) == before
    # Adding stays possible.
    store.audit("tech2", "note", "", "still appendable")
    assert len(actions(store)) == len(before) + 1


# --------------------------------------------------------------------------- lists


def test_lists_changes_approvals_and_version(store: Store) -> None:
    assert store.list_version() == 0
    assert store.lists().blocks("domain") == frozenset()

    domain = store.add_entry("block", "domain", " Spam.Example. ", "tech1", note="phishing run")
    assert store.list_version() == 1
    assert store.lists().blocks("domain") == {"spam.example"}
    assert store.add_entry("block", "domain", "spam.example", "tech2") == domain  # nothing new
    assert store.list_version() == 1

    proposed = store.add_entry(
        "block", "sender", "prize@lottery.example", "report", status="proposed", source="RB-REPT-0001"
    )
    assert store.list_version() == 1  # a proposal does not apply to mail
    assert "prize@lottery.example" not in store.lists().blocks("sender")
    assert [e.id for e in store.entries(status="proposed")] == [proposed]
    store.decide_entry(proposed, "tech1", True, "seen it three times")
    assert store.list_version() == 2
    assert store.lists().blocks("sender") == {"prize@lottery.example"}
    with pytest.raises(Refused, match="already approved"):
        store.decide_entry(proposed, "tech2", False)

    refused = store.add_entry("block", "url", "https://example.org/", "report", status="proposed")
    store.decide_entry(refused, "tech1", False, "a real school partner")
    assert store.list_version() == 2
    assert store.lists().blocks("url") == frozenset()
    assert store.entries("block", "refused")[0].decided_by == "tech1"

    store.remove_entry(domain, "tech2", "blocked too much")
    assert store.list_version() == 3
    assert store.lists().blocks("domain") == frozenset()
    with pytest.raises(Refused):
        store.remove_entry(domain, "tech2", "twice")
    withdrawn = store.add_entry("block", "fingerprint", "abc123", "report", status="proposed")
    store.remove_entry(withdrawn, "tech1", "withdrawn")
    assert store.list_version() == 3  # it never applied to mail

    allowed = store.add_entry("allow", "sender", "Newsletter@Trust.example", "tech1")
    snapshot = store.lists()
    assert snapshot.version == store.list_version() == 4
    assert snapshot.allows("sender") == {"newsletter@trust.example"}
    assert snapshot.blocks("sender") == {"prize@lottery.example"}
    assert [e.id for e in store.entries("allow")] == [allowed]
    with pytest.raises(NotFound):
        store.decide_entry(99999, "tech1", True)

    for bad in (
        ("grey", "domain", "spam.example"),
        ("block", "ip", "192.0.2.1"),
        ("block", "domain", "localhost"),
        ("block", "sender", "nobody"),
        ("block", "url", "  "),
    ):
        with pytest.raises(Refused):
            store.add_entry(*bad, "tech1")
    assert store.list_version() == 4
    assert actions(store) == [
        ("tech1", "block", "domain:spam.example", "phishing run"),
        ("report", "propose_block", "sender:prize@lottery.example", ""),
        ("tech1", "approve_block", "sender:prize@lottery.example", "seen it three times"),
        ("report", "propose_block", "url:https://example.org/", ""),
        ("tech1", "refuse_block", "url:https://example.org/", "a real school partner"),
        ("tech2", "remove_block", "domain:spam.example", "blocked too much"),
        ("report", "propose_block", "fingerprint:abc123", ""),
        ("tech1", "remove_block", "fingerprint:abc123", "withdrawn"),
        ("tech1", "allow", "sender:newsletter@trust.example", ""),
    ]


def test_a_list_change_applies_to_the_next_message(store: Store, store_url: str) -> None:
    loads: list[int] = []

    def load() -> Any:
        loads.append(1)
        return store.lists()

    source = ListsSource(store.list_version, load, interval=0)
    assert source.current().blocks("sender") == frozenset()
    assert source.current().blocks("sender") == frozenset()
    assert len(loads) == 1  # unchanged version: no reload

    console = Store(store_url)  # a technician's command, another connection
    try:
        console.add_entry("block", "sender", "prize@lottery.example", "tech1")
        assert source.current().blocks("sender") == {"prize@lottery.example"}
        console.add_entry("allow", "domain", "trust.example", "tech1")
        assert source.current().allows("domain") == {"trust.example"}
        assert len(loads) == 3
    finally:
        console.close()


def test_in_the_daemon_a_scan_reads_the_lists_without_asking_the_store(store: Store, store_url: str) -> None:
    """The daemon refreshes the lists in the background: a scan never waits on the database."""
    asked: list[int] = []

    def version() -> int:
        asked.append(1)
        return store.list_version()

    source = ListsSource(version, store.lists, interval=1.0, refreshed_elsewhere=True)
    source.refresh()
    console = Store(store_url)
    try:
        console.add_entry("block", "sender", "prize@lottery.example", "tech1")
        assert source.current().blocks("sender") == frozenset(), "not yet refreshed"
        assert len(asked) == 1, "current() did not touch the store"
        assert source.refresh().blocks("sender") == {"prize@lottery.example"}
        assert source.current().blocks("sender") == {"prize@lottery.example"}
    finally:
        console.close()


# -------------------------------------------------------------------------- outbox


def test_outbox_queue_claim_done_failed_and_retry(store: Store) -> None:
    first = store.queue_mail(
        "guidance", ["pupil@redborne.example"], b"guidance 1", about="pupil@redborne.example"
    )
    second = store.queue_mail("alert", ["dsl@redborne.example"], b"alert 1", about="dsl", reference="RB-1")
    third = store.queue_mail("digest", ["it@redborne.example"], b"digest")

    claimed = store.claim_outbox(limit=2)
    assert [(i.id, i.kind, i.recipients, i.data, i.reference, i.attempts) for i in claimed] == [
        (first, "guidance", ("pupil@redborne.example",), b"guidance 1", "", 1),
        (second, "alert", ("dsl@redborne.example",), b"alert 1", "RB-1", 1),
    ]
    assert [i.id for i in store.claim_outbox()] == [third]
    assert store.claim_outbox() == []  # everything is being sent

    failed_at = dt.datetime.now(dt.UTC)
    store.outbox_done(first)
    assert store.outbox_failed(second, "451 4.3.0 try again later", now=failed_at) is False
    store.outbox_done(third)
    assert [(i, s) for i, _k, s, _r in store.outbox()] == [
        (first, "sent"),
        (second, "pending"),
        (third, "sent"),
    ]
    assert [i for i, *_ in store.outbox("pending")] == [second]

    # The failed one waits a minute: new mail waking the outbox meanwhile does not retry it.
    assert store.claim_outbox() == []
    assert store.claim_outbox(now=failed_at + dt.timedelta(seconds=59)) == []
    (retry,) = store.claim_outbox(now=failed_at + dt.timedelta(minutes=1))
    assert (retry.id, retry.attempts) == (second, 2)
    store.outbox_done(second)
    assert store.outbox("pending") == [] and store.claim_outbox(now=failed_at + dt.timedelta(days=1)) == []


def test_an_outbox_mail_waits_longer_after_each_failure_and_is_not_given_up_early(store: Store) -> None:
    # A relay down for hours: the alert is tried ever less often (1, 2, 4 ... minutes, then
    # hourly), and still tried well past the ten tries that used to be the end of it.
    item = store.queue_mail("alert", ["slt@redborne.example"], b"alert", reference="RB-WAIT-0001")
    minutes = [1, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60, 60]
    at = dt.datetime.now(dt.UTC)
    (claimed,) = store.claim_outbox(now=at)
    for attempt, wait in enumerate(minutes, start=1):
        assert (claimed.id, claimed.attempts) == (item, attempt)
        assert store.outbox_failed(item, "outbox 1: relay unreachable", now=at) is False
        assert store.claim_outbox(now=at + dt.timedelta(minutes=wait, seconds=-1)) == []
        at += dt.timedelta(minutes=wait)
        (claimed,) = store.claim_outbox(now=at)
    assert claimed.attempts == len(minutes) + 1
    store.outbox_done(item)
    assert [s for _i, _k, s, _r in store.outbox()] == ["sent"]


def test_an_outbox_mail_is_given_up_once_after_five_days(store: Store) -> None:
    from milter.store.store import OUTBOX_LIFETIME

    queued = dt.datetime.now(dt.UTC)
    item = store.queue_mail("alert", ["slt@redborne.example"], b"alert", reference="RB-GONE-0001")
    almost = queued + OUTBOX_LIFETIME - dt.timedelta(minutes=5)
    assert [i.id for i in store.claim_outbox(now=almost)] == [item]
    assert store.outbox_failed(item, "outbox 1: relay unreachable", now=almost) is False  # kept

    late = queued + OUTBOX_LIFETIME + dt.timedelta(minutes=5)
    assert [i.id for i in store.claim_outbox(now=late)] == [item]
    assert store.outbox_failed(item, "outbox 1: relay unreachable", now=late) is True
    assert [i for i, *_ in store.outbox("failed")] == [item] and store.outbox("pending") == []
    # Never tried again, however long the gateway runs.
    assert store.claim_outbox(now=late + dt.timedelta(days=30)) == []


def test_two_claimers_get_disjoint_outbox_items(store: Store, store_url: str) -> None:
    queued = [store.queue_mail("alert", ["it@redborne.example"], f"alert {n}".encode()) for n in range(60)]
    stores = [Store(store_url, upgrade=False) for _ in range(2)]
    taken: list[list[int]] = [[], []]
    barrier = threading.Barrier(2)

    def claimer(n: int) -> None:
        barrier.wait()
        while items := stores[n].claim_outbox(limit=4):
            taken[n].extend(i.id for i in items)
            for item in items:
                stores[n].outbox_done(item.id)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        for s in stores:
            s.close()
    assert not set(taken[0]) & set(taken[1])
    assert sorted(taken[0] + taken[1]) == queued
    assert {s for _i, _k, s, _r in store.outbox()} == {"sent"}


def test_sent_recently_counts_for_the_guidance_rate_limit(store: Store) -> None:
    hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    for _ in range(3):
        store.queue_mail("guidance", ["pupil@redborne.example"], b"x", about="Pupil@Redborne.example")
    store.queue_mail("guidance", ["other@redborne.example"], b"x", about="other@redborne.example")
    store.queue_mail("alert", ["dsl@redborne.example"], b"x", about="pupil@redborne.example")
    assert store.sent_recently("guidance", "pupil@redborne.example", hour_ago) == 3
    assert store.sent_recently("guidance", "PUPIL@redborne.example", hour_ago) == 3
    assert store.sent_recently("guidance", "other@redborne.example", hour_ago) == 1
    assert store.sent_recently("alert", "pupil@redborne.example", hour_ago) == 1
    assert store.sent_recently("guidance", "nobody@redborne.example", hour_ago) == 0
    in_a_minute = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    assert store.sent_recently("guidance", "pupil@redborne.example", in_a_minute) == 0


# -------------------------------------------------------------------------- export


def test_export_person_returns_their_records_and_is_audited(store: Store) -> None:
    sent = hold(
        store,
        "RB-EXPT-0001",
        mail_from="ann@redborne.example",
        header_from="ann@redborne.example",
        rcpt_to=("x@outside.example",),
        body="secret words one",
    )
    received = hold(store, "RB-EXPT-0002", rcpt_to=("bob@redborne.example", "Ann@Redborne.example"))
    from_header = hold(
        store, "RB-EXPT-0003", mail_from="bounces@list.example", header_from="Ann@redborne.example"
    )
    hold(store, "RB-EXPT-0004", rcpt_to=("joann@redborne.example",))  # not hers
    hold(store, "RB-EXPT-0005", mail_from="jo.ann@redborne.example", header_from="jo.ann@redborne.example")
    store.add_entry("block", "sender", "ann@redborne.example", "tech1", note="compromised account")

    data = store.export_person(" ANN@redborne.example ", "dpo", "subject access request SAR-17")
    assert data["subject"] == "ann@redborne.example"
    assert sorted(m["id"] for m in data["messages"]) == sorted([sent, received, from_header])
    assert [(e["list"], e["value"], e["note"]) for e in data["lists"]] == [
        ("block", "ann@redborne.example", "compromised account")
    ]
    text_form = json.dumps(data)  # plain JSON, no bytes or datetimes
    assert "secret words" not in text_form  # records, not the bodies
    entry = store.audit_entries(action="export")[0]
    assert (entry.actor, entry.target, entry.reason) == (
        "dpo",
        "ann@redborne.example",
        "subject access request SAR-17",
    )
    assert entry.details["messages"] == 3
    with pytest.raises(Refused):
        store.export_person("ann", "dpo", "typo")


# ----------------------------------------------------------------------- migrations


def test_upgrade_twice_is_harmless(store: Store, store_url: str) -> None:
    held = hold(store, "RB-MIGR-0001")
    store.add_entry("block", "domain", "spam.example", "tech1")
    migrate.upgrade(store.engine)
    migrate.upgrade(store.engine)
    again = Store(store_url)
    try:
        assert migrate.current(again.engine) == migrate.head() is not None
        assert again.get(held).has_body
        assert again.list_version() == 1
        with again.session() as session:
            assert len(list(session.scalars(select(ListVersion)))) == 1
    finally:
        again.close()


def test_mail_the_old_attempt_limit_stranded_is_sent_after_the_upgrade(store_url: str) -> None:
    # A store at 0002 holding an alert that used up its ten attempts in a short outage:
    # 0003 makes it due again rather than leaving it pending for ever.
    import sqlalchemy as sa
    from alembic import command

    from milter.store.store import open_engine

    outbox = sa.table(
        "outbox",
        *(sa.column(n) for n in ("created_at", "kind", "about", "reference", "status", "attempts")),
        sa.column("last_error"),
        sa.column("recipients", sa.JSON()),
        sa.column("data", sa.LargeBinary()),
    )
    engine = open_engine(store_url)
    try:
        with engine.begin() as connection:
            command.upgrade(migrate._config(connection), "0002")
            connection.execute(
                outbox.insert().values(
                    created_at=dt.datetime.now(dt.UTC),
                    kind="alert",
                    about="slt",
                    reference="RB-OLD0-0001",
                    status="pending",
                    attempts=10,
                    last_error="outbox 1: relay 127.0.0.1:10026 unreachable (ConnectionRefusedError)",
                    recipients=["slt@redborne.example"],
                    data=b"alert",
                )
            )
    finally:
        engine.dispose()
    store = Store(store_url)
    try:
        assert migrate.current(store.engine) == migrate.head()
        (item,) = store.claim_outbox()
        assert (item.reference, item.attempts) == ("RB-OLD0-0001", 11)
    finally:
        store.close()


MIGRATE_SCRIPT = r"""
from milter.store import migrate
from milter.store.store import open_engine
engine = open_engine(args["url"])
wait_for_go()
migrate.upgrade(engine)
print(json.dumps(migrate.current(engine)))
engine.dispose()
"""


def test_two_processes_migrating_one_fresh_database_at_once(store_url: str, tmp_path: Path) -> None:
    revisions = run_at_once(tmp_path, MIGRATE_SCRIPT, [{"url": store_url}] * 3)
    assert revisions == [migrate.head()] * 3
    store = Store(store_url)
    try:
        tables = set(inspect(store.engine).get_table_names())
        assert {"held_message", "audit_log", "list_entry", "list_version", "outbox", "authority"} <= tables
        assert store.list_version() == 0
        with store.session() as session:
            assert len(list(session.scalars(select(ListVersion)))) == 1
        hold(store, "RB-MIGR-0002")
        store.audit("tech1", "note")
        with pytest.raises(DBAPIError, match="append-only"), store.engine.begin() as connection:
            connection.execute(text("DELETE FROM audit_log"))
    finally:
        store.close()


# ------------------------------------------------------------- two daemons at once

HOLD_SCRIPT = r"""
from milter.envelope import Envelope
from milter.store import Store
store = Store(args["url"], upgrade=False)   # as the daemon does, after migrating at start
wait_for_go()
finding = {"detector": "obscene_language", "category": "profanity", "severity": "high",
           "clause": "2.3", "summary": "obscene", "evidence": [], "location": "body"}
def one(reference, message_id, body, received):
    raw = (f"Received: {received}\r\nMessage-ID: {message_id}\r\nSubject: test\r\n\r\n{body}\r\n").encode()
    return store.hold(
        raw,
        Envelope(mail_from="sender@outside.example", rcpt_to=("pupil@redborne.example",), queue_id=reference),
        {"reference": reference, "action": "quarantine", "direction": "inbound", "findings": [finding]},
        subject="test", message_id=message_id,
    )
held, shared = [], {}
for i in range(args["count"]):
    ref = f"{args['prefix']}-{i:04d}-HOLD"
    held_id, new = one(ref, f"<{ref}@test>", f"body of {ref}", f"by daemon {args['prefix']}")
    assert new and held_id == ref, (held_id, new)
    held.append(held_id)
    # The same message offered to both daemons (an MTA retrying at the other one).
    if i < args["shared"]:
        held_id, _new = one(f"{args['prefix']}-{i:04d}-SHRD", f"<shared-{i}@test>", f"shared {i}",
                            f"by daemon {args['prefix']}")
        shared[i] = held_id
store.close()
print(json.dumps({"held": held, "shared": shared}))
"""


def test_two_daemon_processes_hold_messages_at_once(store: Store, store_url: str, tmp_path: Path) -> None:
    first, second = run_at_once(
        tmp_path,
        HOLD_SCRIPT,
        [
            {"url": store_url, "prefix": "P1", "count": 50, "shared": 10},
            {"url": store_url, "prefix": "P2", "count": 50, "shared": 10},
        ],
    )
    assert len(first["held"]) == len(second["held"]) == 50
    # Each shared message is held once, and both daemons were told the same id.
    assert first["shared"] == second["shared"]
    shared = set(first["shared"].values())
    assert len(shared) == 10

    records = store.find(limit=1000)
    assert len(records) == 100 + 10
    assert {r.id for r in records} == set(first["held"]) | set(second["held"]) | shared
    for record in records:
        assert record.has_body and record.status == "held"
        assert record.findings[0]["category"] == "profanity"
    sample = first["held"][17]
    assert f"body of {sample}".encode() in store.body(sample, "tech1", "spot check")


def test_the_migrations_build_exactly_the_models(store: Store) -> None:
    # A model changed without a migration would pass on a fresh test database and fail
    # on a school's existing one.
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from milter.store.models import Base

    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_a_release_or_outbox_mail_left_by_a_dead_process_is_claimed_again(store: Store) -> None:
    from sqlalchemy import update

    from milter.store.models import HeldMessage, OutboxMail
    from milter.store.store import STALE_CLAIM

    reference = "RB-STAL-E001"
    hold(store, reference)
    store.claim_release(reference, "tech1", "first try")  # ...and the process dies here
    with pytest.raises(Refused):
        store.claim_release(reference, "tech2", "too soon")
    store.queue_mail("alert", ["it@redborne.example"], b"x")
    (item,) = store.claim_outbox()  # ...and this sender dies too
    assert store.claim_outbox() == []
    long_ago = dt.datetime.now(dt.UTC) - STALE_CLAIM - dt.timedelta(minutes=1)
    with store.session() as session:
        session.execute(update(HeldMessage).where(HeldMessage.id == reference).values(status_at=long_ago))
        session.execute(update(OutboxMail).where(OutboxMail.id == item.id).values(claimed_at=long_ago))
    assert store.claim_release(reference, "tech2", "retry").id == reference
    assert [i.id for i in store.claim_outbox()] == [item.id]
