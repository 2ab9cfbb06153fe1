"""Roles: the DSL sees safeguarding concerns only; mail marked personal opens only after SLT
records authority; auditors read the audit log only; DSL and SLT read their own entries."""

from __future__ import annotations

import re
from typing import Any

import pytest

from milter.store import Store
from tests.web.conftest import Held, token

IDS = re.compile(r'<tr data-id="([^"]+)"')


def listed(client: Any, query: str = "") -> list[str]:
    response = client.get("/quarantine" + query)
    assert response.status_code == 200
    return IDS.findall(response.text)


def test_the_dsl_lists_only_safeguarding_concerns(dsl: Any, tech: Any, held: Held) -> None:
    assert listed(dsl) == [held.safeguarding]
    assert listed(dsl, "?category=obscene_language") == []
    assert listed(dsl, "?q=troll") == []
    assert listed(dsl, "?status=deleted") == []
    assert set(listed(tech)) == {held.plain, held.hostile, held.safeguarding, held.personal, held.released}
    assert dsl.get("/").headers["location"] == "/quarantine"


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("GET", ""),
        ("GET", "/html"),
        ("GET", "/attachments/1"),
        ("POST", "/open"),
        ("POST", "/release"),
        ("POST", "/delete"),
        ("POST", "/block"),
        ("POST", "/false-positive"),
        ("POST", "/attachments/1/download"),
    ],
)
def test_the_dsl_gets_404_for_any_other_message(
    dsl: Any, held: Held, store: Store, method: str, suffix: str
) -> None:
    for message_id in (held.plain, held.hostile, held.personal):
        url = f"/quarantine/{message_id}{suffix}"
        if method == "GET":
            response = dsl.get(url)
        else:
            data = {"csrf_token": token(dsl), "reason": "r", "kind": "sender", "confirm": "yes"}
            response = dsl.post(url, data=data)
        assert response.status_code == 404, url
        assert message_id not in response.text or suffix == ""
    assert store.get(held.plain).status == "held"
    assert not store.audit_entries(actor="dsl", action="view_body")
    assert not store.entries()


def test_the_dsl_bulk_action_skips_other_messages(dsl: Any, held: Held, store: Store) -> None:
    response = dsl.post(
        "/quarantine/bulk",
        data={
            "csrf_token": token(dsl),
            "ids": [held.plain, held.safeguarding],
            "action": "delete",
            "reason": "dsl",
        },
        follow_redirects=True,
    )
    assert "1 deleted: RB-SAFE-0003." in response.text
    assert "RB-PLN1-0001: not found" in response.text
    assert store.get(held.plain).status == "held"
    assert store.get(held.safeguarding).status == "deleted"


def test_the_dsl_opens_a_safeguarding_message(dsl: Any, held: Held, store: Store) -> None:
    page = dsl.get(f"/quarantine/{held.safeguarding}")
    assert '"want to disappear"' not in page.text
    opened = dsl.post(
        f"/quarantine/{held.safeguarding}/open", data={"csrf_token": token(dsl), "reason": "DSL review"}
    )
    assert opened.status_code == 200
    assert "SAFE-BODY" in opened.text
    assert "&#34;want to disappear&#34;" in opened.text
    assert store.audit_entries(action="view_body")[0].actor == "dsl"


def test_personal_mail_opens_only_with_recorded_authority(
    tech: Any, slt: Any, held: Held, store: Store
) -> None:
    # The subject is hidden in the list and on the page.
    for page in (tech.get("/quarantine").text, tech.get(f"/quarantine/{held.personal}").text):
        assert "Hospital appointment" not in page
        assert "(marked personal)" in page
    # A search cannot probe the hidden subject.
    assert listed(tech, "?q=hospital") == []

    refused = tech.post(
        f"/quarantine/{held.personal}/open", data={"csrf_token": token(tech), "reason": "curious"}
    )
    assert refused.status_code == 403
    assert "marked personal" in refused.text
    assert "PERSONAL-BODY" not in refused.text
    assert store.audit_entries(action="view_refused")[0].actor == "tech"
    # Attachments and the HTML frame are closed too.
    assert tech.get(f"/quarantine/{held.personal}/attachments/1").status_code in (403, 404)
    assert tech.get(f"/quarantine/{held.personal}/html").status_code == 403

    # A technician cannot record authority; SLT can, with a reason.
    assert (
        tech.post(
            f"/quarantine/{held.personal}/authority", data={"csrf_token": token(tech), "reason": "x"}
        ).status_code
        == 403
    )
    page = slt.get(f"/quarantine/{held.personal}")
    assert "Record authority" in page.text and "Open message" not in page.text
    no_reason = slt.post(
        f"/quarantine/{held.personal}/authority", data={"csrf_token": token(slt), "reason": ""}
    )
    assert no_reason.status_code == 303
    assert not store.audit_entries(action="grant_authority")
    granted = slt.post(
        f"/quarantine/{held.personal}/authority",
        data={"csrf_token": token(slt), "reason": "suspected harassment, case 17", "granted_to": "*"},
        follow_redirects=True,
    )
    assert 'role="status"' in granted.text and "authority recorded for any reviewer" in granted.text
    entry = store.audit_entries(action="grant_authority")[0]
    assert (entry.actor, entry.target, entry.reason, entry.details["via"]) == (
        "head",
        held.personal,
        "suspected harassment, case 17",
        "web",
    )

    assert "Hospital appointment" in tech.get("/quarantine").text
    opened = tech.post(
        f"/quarantine/{held.personal}/open", data={"csrf_token": token(tech), "reason": "case 17"}
    )
    assert opened.status_code == 200
    assert "PERSONAL-BODY" in opened.text


def test_authority_for_one_reviewer_opens_it_for_that_reviewer_only(
    app: Any, tech: Any, slt: Any, held: Held
) -> None:
    from tests.web.conftest import signed_in

    slt.post(
        f"/quarantine/{held.personal}/authority",
        data={"csrf_token": token(slt), "reason": "case 18", "granted_to": "tech2"},
    )
    tech2 = signed_in(app, "tech2")
    assert (
        tech2.post(
            f"/quarantine/{held.personal}/open", data={"csrf_token": token(tech2), "reason": "18"}
        ).status_code
        == 200
    )
    assert (
        tech.post(
            f"/quarantine/{held.personal}/open", data={"csrf_token": token(tech), "reason": "18"}
        ).status_code
        == 403
    )
    refused = slt.post(
        f"/quarantine/{held.personal}/authority",
        data={"csrf_token": token(slt), "reason": "x", "granted_to": "nobody"},
        follow_redirects=True,
    )
    assert "is not a reviewer" in refused.text


def test_slt_reads_records_but_does_not_open_or_act(slt: Any, held: Held) -> None:
    assert slt.get("/").status_code == 200
    assert slt.get(f"/quarantine/{held.plain}").status_code == 200
    for suffix in ("/open", "/release", "/delete", "/block", "/false-positive"):
        data = {"csrf_token": token(slt), "reason": "r", "kind": "sender"}
        assert slt.post(f"/quarantine/{held.plain}{suffix}", data=data).status_code == 403
    assert slt.get(f"/quarantine/{held.plain}/attachments/1").status_code == 403
    assert slt.get("/lists").status_code == 403


def test_the_auditor_reads_the_audit_log_only(auditor: Any, tech: Any, held: Held) -> None:
    tech.post(f"/quarantine/{held.plain}/open", data={"csrf_token": token(tech), "reason": "tech looked"})
    assert auditor.get("/").headers["location"] == "/audit"
    page = auditor.get("/audit")
    assert page.status_code == 200 and "tech looked" in page.text
    for path in ("/quarantine", f"/quarantine/{held.plain}", "/lists"):
        assert auditor.get(path).status_code == 403
    nav = re.search(r'<nav class="mainnav".*?</nav>', page.text, re.S)
    assert nav and ">Audit<" in nav.group(0) and ">Quarantine<" not in nav.group(0)


def test_dsl_and_slt_read_only_their_own_audit_entries(dsl: Any, slt: Any, tech: Any, held: Held) -> None:
    tech.post(f"/quarantine/{held.plain}/open", data={"csrf_token": token(tech), "reason": "tech looked"})
    dsl.post(f"/quarantine/{held.safeguarding}/open", data={"csrf_token": token(dsl), "reason": "dsl looked"})
    for client, own, other in ((dsl, "dsl looked", "tech looked"), (slt, None, "tech looked")):
        for query in ("", "?actor=tech"):
            page = client.get("/audit" + query).text
            assert other not in page
            if own:
                assert own in page
        csv_text = client.get("/audit.csv?actor=tech").text
        assert "tech looked" not in csv_text
    assert "dsl looked" in tech.get("/audit").text
