"""Attachment rules through the engine: each dangerous type on a real file the tests build."""

from __future__ import annotations

from pathlib import Path

import pytest

from milter.engine import scan
from milter.envelope import Envelope
from milter.policy.loader import Rules, load_rules
from milter.policy.schema import Action
from tests import samples
from tests.conftest import copy_rules
from tests.mail import build

STAFF = "j.hughes@redborne.example"
OUTSIDER = "someone@elsewhere.example"
INBOUND = Envelope(mail_from=OUTSIDER, rcpt_to=(STAFF,), client_address="203.0.113.9")

CASES = [
    ("pe-as-exe", "setup.exe", samples.pe_exe, "application/octet-stream", "executable"),
    ("pe-named-pdf", "invoice.pdf", samples.pe_exe, "application/pdf", "type_mismatch"),
    ("double-extension", "report.pdf.exe", samples.pe_exe, "application/octet-stream", "double_extension"),
    ("rtlo-name", "invoice\u202efdp.exe", samples.pe_exe, "application/octet-stream", "name_trick"),
    (
        "docm-macro",
        "letter.docm",
        lambda: samples.docx(macros=True),
        "application/octet-stream",
        "office_macro",
    ),
    ("doc-macro", "letter.doc", samples.doc_with_macros, "application/msword", "office_macro"),
    ("encrypted-zip", "data.zip", samples.zip_encrypted, "application/zip", "encrypted"),
    ("encrypted-pdf", "report.pdf", lambda: samples.pdf(password="secret"), "application/pdf", "encrypted"),
    ("zip-bomb", "logs.zip", samples.zip_bomb, "application/zip", "archive_bomb"),
    ("exe-deep-in-zips", "photos.zip", lambda: samples.nested_zip(2), "application/zip", "executable"),
    (
        "script-js",
        "invoice.js",
        lambda: b"var s = new ActiveXObject('WScript.Shell');",
        "text/plain",
        "script",
    ),
    (
        "iso-image",
        "setup.iso",
        lambda: samples.iso_image([("A.TXT", b"x")]),
        "application/octet-stream",
        "disk_image",
    ),
]


@pytest.mark.parametrize(("name", "filename", "make", "ctype", "kind"), CASES, ids=[c[0] for c in CASES])
def test_dangerous_type_is_held_for_it(
    name: str, filename: str, make: object, ctype: str, kind: str, rules: Rules
) -> None:
    raw = build(OUTSIDER, STAFF, "documents", "please see attached", attachments=[(filename, make(), ctype)])  # type: ignore[operator]
    verdict = scan(raw, INBOUND, rules).verdict
    kinds = {f.category for f in verdict.findings if f.detector == "dangerous_attachment"}
    assert kind in kinds, kinds
    assert verdict.action is Action.QUARANTINE
    assert "it" in verdict.alerts
    evidence = [e for f in verdict.findings if f.category == kind for e in f.evidence]
    assert evidence, "the reviewer is told which file"


def test_ordinary_attachment_from_outside_is_tagged(rules: Rules) -> None:
    raw = build(
        OUTSIDER,
        STAFF,
        "minutes",
        "attached",
        attachments=[("minutes.pdf", samples.pdf(), "application/pdf")],
    )
    verdict = scan(raw, INBOUND, rules).verdict
    assert verdict.action is Action.TAG
    assert [f.category for f in verdict.findings] == ["external_attachment"]


def test_ordinary_attachment_between_staff_is_accepted(rules: Rules) -> None:
    raw = build(
        STAFF,
        "a.patel@redborne.example",
        "minutes",
        "attached",
        attachments=[
            ("minutes.pdf", samples.pdf(), "application/pdf"),
            ("photo.png", samples.png(), "image/png"),
        ],
    )
    assert scan(raw, Envelope(), rules).verdict.action is Action.ACCEPT


def test_encrypted_zip_from_local_authority_is_an_exception(rules: Rules) -> None:
    sender = "admissions@bedford.gov.example"
    raw = build(
        sender,
        STAFF,
        "pupil data",
        "password by phone",
        attachments=[
            ("pupils.zip", samples.zip_encrypted(name="pupils.csv", content=b"a,b\n"), "application/zip")
        ],
    )
    verdict = scan(
        raw, Envelope(mail_from=sender, rcpt_to=(STAFF,), client_address="203.0.113.9"), rules
    ).verdict
    assert "encrypted" not in {f.category for f in verdict.findings}
    assert verdict.action is Action.TAG  # still an attachment from outside


def test_kinds_not_blocked_for_a_direction_are_not_findings(tmp_path: Path) -> None:
    root = copy_rules(tmp_path / "rules")
    policy = root / "policy.yaml"
    policy.write_text(
        policy.read_text().replace(
            "  dangerous_attachment:\n",
            "  dangerous_attachment:\n    blocked:\n      inbound: [executable]\n"
            "      outbound: []\n      internal: []\n",
            1,
        )
    )
    rules = load_rules(root)
    raw = build(
        STAFF,
        OUTSIDER,
        "macro",
        "attached",
        attachments=[("letter.docm", samples.docx(macros=True), "application/octet-stream")],
    )
    assert scan(raw, Envelope(), rules).verdict.action is Action.ACCEPT


def test_unknown_kind_in_rules_is_an_error_with_line(tmp_path: Path) -> None:
    from milter.errors import RulesError

    root = copy_rules(tmp_path / "rules")
    policy = root / "policy.yaml"
    policy.write_text(policy.read_text().replace("kinds: [encrypted]", "kinds: [encryptd]"))
    with pytest.raises(RulesError) as info:
        load_rules(root)
    assert "encryptd" in str(info.value) and "policy.yaml:" in str(info.value)
