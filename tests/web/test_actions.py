"""Actions from the console: release (once, to a real SMTP sink), release to chosen recipients,
delete, block, false positive, list decisions, bulk actions; each in the audit log with who
and why, the same entries the command line writes; the audit page and its CSV export."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

from milter.store import Store
from tests.postfix_harness import SmtpSink
from tests.web.conftest import Held, token

STATUS = re.compile(r'<div role="status" class="flash flash-(ok|error)">(.*?)</div>', re.S)


def flash(response: Any) -> tuple[str, str]:
    match = STATUS.search(response.text)
    assert match, "no flash message"
    return match.group(1), match.group(2).strip()


def post(client: Any, url: str, **data: Any) -> Any:
    return client.post(url, data={"csrf_token": token(client), **data}, follow_redirects=True)


def test_release_delivers_once(tech: Any, held: Held, store: Store, sink: SmtpSink) -> None:
    response = post(
        tech, f"/quarantine/{held.plain}/release", reason="false alarm, checked with the form tutor"
    )
    assert flash(response) == ("ok", "RB-PLN1-0001 released to pupil@redborne.example.")
    delivered = sink.wait_for(1)
    assert delivered[0].rcpt_tos == ("pupil@redborne.example",)
    assert delivered[0].mail_from == "troll@outside.example"
    assert b"X-School-Policy-Released: RB-PLN1-0001 by tech" in delivered[0].data
    assert b"PLAIN-BODY" in delivered[0].data
    assert store.get(held.plain).status == "released"

    again = post(tech, f"/quarantine/{held.plain}/release", reason="twice")
    kind, text = flash(again)
    assert kind == "error" and "released, not held" in text
    assert len(sink.messages) == 1
    entry = store.audit_entries(action="release")[0]
    assert (entry.actor, entry.target, entry.reason) == (
        "tech",
        held.plain,
        "false alarm, checked with the form tutor",
    )
    assert entry.details == {"recipients": ["pupil@redborne.example"], "via": "web"}


def test_release_to_chosen_recipients(tech: Any, held: Held, store: Store, sink: SmtpSink) -> None:
    response = post(
        tech,
        f"/quarantine/{held.hostile}/release",
        reason="forward to the bursar's deputy",
        recipients="deputy@redborne.example,\n it@redborne.example ",
    )
    assert flash(response)[0] == "ok"
    assert sink.wait_for(1)[0].rcpt_tos == ("deputy@redborne.example", "it@redborne.example")
    assert store.audit_entries(action="release")[0].details["recipients"] == [
        "deputy@redborne.example",
        "it@redborne.example",
    ]


def test_release_refuses_bad_recipients_and_needs_a_reason(
    tech: Any, held: Held, sink: SmtpSink, store: Store
) -> None:
    kind, text = flash(
        post(tech, f"/quarantine/{held.plain}/release", reason="x", recipients="not-an-address")
    )
    assert kind == "error" and "is not a mail address" in text
    kind, text = flash(post(tech, f"/quarantine/{held.plain}/release", reason=" "))
    assert kind == "error" and "reason" in text
    assert sink.messages == [] and store.get(held.plain).status == "held"


def test_a_failed_release_leaves_the_message_held(
    tech: Any, held: Held, store: Store, sink: SmtpSink
) -> None:
    sink.refuse(1, "554 5.7.1 no thanks")
    kind, text = flash(post(tech, f"/quarantine/{held.plain}/release", reason="try"))
    assert kind == "error" and "still held" in text
    assert store.get(held.plain).status == "held"
    assert store.audit_entries(action="release_failed")[0].actor == "tech"


def test_delete(tech: Any, held: Held, store: Store) -> None:
    page = tech.get(f"/quarantine/{held.plain}").text
    assert ">Delete</button>" in page
    response = post(tech, f"/quarantine/{held.plain}/delete", reason="obscene spam")
    assert flash(response) == ("ok", "RB-PLN1-0001: body deleted.")
    assert store.get(held.plain).status == "deleted"
    assert not store.get(held.plain).has_body
    entry = store.audit_entries(action="delete")[0]
    assert (entry.actor, entry.reason, entry.details["via"]) == ("tech", "obscene spam", "web")


def test_block_sender_and_domain(tech: Any, held: Held, store: Store) -> None:
    kind, text = flash(post(tech, f"/quarantine/{held.plain}/block", kind="sender", reason="troll"))
    assert kind == "ok" and "troll@outside.example" in text
    kind, text = flash(post(tech, f"/quarantine/{held.plain}/block", kind="domain", reason="whole domain"))
    assert kind == "ok" and "outside.example" in text
    values = {(e.list, e.kind, e.value, e.status) for e in store.entries()}
    assert values == {
        ("block", "sender", "troll@outside.example", "approved"),
        ("block", "domain", "outside.example", "approved"),
    }
    assert store.lists().blocked["domain"] == frozenset({"outside.example"})
    entry = store.audit_entries(action="block")[0]
    assert (entry.actor, entry.target, entry.reason, entry.details["source"]) == (
        "tech",
        "domain:outside.example",
        "whole domain",
        held.plain,
    )
    # The school's own domain (outbound mail) is never blocked from here.
    kind, text = flash(post(tech, f"/quarantine/{held.personal}/block", kind="domain", reason="no"))
    assert kind == "error" and "block the sender" in text
    kind, _ = flash(post(tech, f"/quarantine/{held.plain}/block", kind="everything", reason="no"))
    assert kind == "error"


def test_false_positive_proposes_an_allow_entry_and_lists_decide(tech: Any, held: Held, store: Store) -> None:
    kind, text = flash(
        post(tech, f"/quarantine/{held.plain}/false-positive", reason="it is a quote from Macbeth")
    )
    assert kind == "ok" and "proposed" in text
    (entry,) = store.entries()
    assert (entry.list, entry.kind, entry.value, entry.status, entry.source) == (
        "allow",
        "sender",
        "troll@outside.example",
        "proposed",
        held.plain,
    )
    assert store.audit_entries(action="propose_allow")[0].reason == "it is a quote from Macbeth"

    lists = tech.get("/lists").text
    assert f'action="/lists/{entry.id}/approve"' in lists and ">Approve</button>" in lists
    assert flash(post(tech, f"/lists/{entry.id}/approve", reason="agreed")) == (
        "ok",
        f"Entry {entry.id} approved.",
    )
    assert store.entries()[0].status == "approved"
    kind, text = flash(post(tech, f"/lists/{entry.id}/refuse"))
    assert kind == "error" and "already approved" in text
    assert flash(post(tech, f"/lists/{entry.id}/remove", reason="no longer"))[0] == "ok"
    assert store.entries()[0].status == "removed"
    assert [e.action for e in store.audit_entries(target="sender:troll@outside.example")] == [
        "remove_allow",
        "approve_allow",
        "propose_allow",
    ]


def test_block_proposals_from_the_report_address(tech: Any, held: Held, store: Store) -> None:
    proposal = store.add_entry(
        "block", "domain", "spam.example", "report@redborne.example", status="proposed", source="RB-REPT-0001"
    )
    assert "spam.example" in tech.get("/lists").text.replace("<wbr>", "")
    assert flash(post(tech, f"/lists/{proposal}/refuse", reason="a parent's provider"))[0] == "ok"
    assert store.entries()[0].status == "refused"
    assert store.audit_entries(action="refuse_block")[0].reason == "a parent's provider"


def test_bulk_actions_on_a_selection(tech: Any, held: Held, store: Store, sink: SmtpSink) -> None:
    page = tech.get("/quarantine").text
    assert 'name="ids" value="RB-PLN1-0001"' in page and "Apply to selected" in page
    response = post(
        tech,
        "/quarantine/bulk",
        ids=[held.plain, held.hostile, "RB-NONE-9999", "../etc"],
        action="delete",
        reason="spam wave",
        back="/quarantine?status=held",
    )
    assert response.url.path == "/quarantine" and response.url.query == b"status=held"
    kind, text = flash(response)
    assert kind == "error"
    assert "2 deleted: RB-PLN1-0001, RB-HOST-0002." in text and "not found" in text
    deleted = store.audit_entries(action="delete", actor="tech")
    assert {e.target for e in deleted} == {held.plain, held.hostile}
    assert all(e.reason == "spam wave" and e.details["via"] == "web" for e in deleted)

    kind, text = flash(post(tech, "/quarantine/bulk", ids=[held.safeguarding], action="release", reason="ok"))
    assert (kind, text) == ("ok", "1 released: RB-SAFE-0003.")
    assert len(sink.wait_for(1)) == 1
    kind, _ = flash(post(tech, "/quarantine/bulk", ids=[held.personal], action="block_sender", reason="r"))
    assert kind == "ok" and store.entries()[0].value == "j.hughes@redborne.example"
    # An open redirect through `back` is not possible.
    response = post(
        tech, "/quarantine/bulk", ids=[], action="delete", reason="r", back="https://evil.example/"
    )
    assert response.url.path == "/quarantine" and response.url.host == "testserver"
    assert flash(response) == ("error", "Select at least one message.")


def test_the_audit_page_and_csv_show_who_did_what_and_why(
    tech: Any, auditor: Any, held: Held, store: Store
) -> None:
    post(tech, f"/quarantine/{held.plain}/open", reason="reviewing the report")
    post(tech, f"/quarantine/{held.plain}/delete", reason='=HYPERLINK("http://evil.example")')
    page = auditor.get("/audit")
    assert page.status_code == 200
    assert (
        "reviewing the report" in page.text
        and "view_body" in page.text
        and '<a class="btn" href="/audit.csv" download>Export CSV</a>' in page.text
    )
    filtered = auditor.get(
        "/audit", params={"action": "view_body", "actor": "tech", "target": held.plain, "since": "1h"}
    )
    assert "reviewing the report" in filtered.text and "HYPERLINK" not in filtered.text
    bad = auditor.get("/audit", params={"since": "yesterday-ish"})
    assert bad.status_code == 200 and "use 7d, 12h, 30m or an ISO date" in bad.text

    export = auditor.get("/audit.csv", params={"actor": "tech"})
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("text/csv")
    assert export.headers["content-disposition"].startswith('attachment; filename="audit-')
    rows = list(csv.DictReader(io.StringIO(export.text)))
    seen = {(r["actor"], r["action"], r["target"]): r for r in rows}
    assert seen[("tech", "view_body", held.plain)]["reason"] == "reviewing the report"
    # A reason that a spreadsheet would run as a formula is quoted.
    assert seen[("tech", "delete", held.plain)]["reason"] == '\'=HYPERLINK("http://evil.example")'
    assert '"via": "web"' in seen[("tech", "delete", held.plain)]["details"]
    assert {r["actor"] for r in rows} == {"tech"}
    # The export is itself recorded.
    assert store.audit_entries(action="export_audit")[0].actor == "audit"


def test_the_console_writes_the_same_audit_entries_as_the_cli(tech: Any, held: Held, store: Store) -> None:
    post(tech, f"/quarantine/{held.plain}/open", reason="why")
    store.body(held.hostile, "cli-user", "why")
    cli, web = store.audit_entries(action="view_body")  # newest first
    assert (web.action, web.reason, set(web.details)) == (cli.action, cli.reason, set(cli.details))
    assert (web.actor, web.details["via"], cli.actor, cli.details["via"]) == (
        "tech",
        "web",
        "cli-user",
        "cli",
    )
