"""What a verdict changes in delivered mail: result headers, subject prefix, the Bcc fix."""

from __future__ import annotations

import email
from email.header import decode_header, make_header
from pathlib import Path

from milter.engine import scan
from milter.envelope import Envelope
from milter.modify import UNDISCLOSED, AddHeader, ChangeHeader, apply_to_bytes, modifications
from milter.policy.loader import Rules, load_rules
from milter.policy.schema import Action
from tests.conftest import copy_rules
from tests.mail import build

PARENTS = ["jane.taylor@gmail.example", "david.taylor@outlook.example", "anita.shah@yahoo.example"]


def delivered(raw: bytes, rules: Rules) -> tuple[Action, email.message.Message]:
    result = scan(raw, Envelope(), rules)
    changed = apply_to_bytes(raw, modifications(result.verdict, result.message))
    return result.verdict.action, email.message_from_bytes(changed)


def test_forged_result_header_is_replaced(rules: Rules) -> None:
    raw = build(headers={"X-School-Policy": "accept; ref=RB-FAKE-FAKE"}, body="hello")
    action, message = delivered(raw, rules)
    values = message.get_all("X-School-Policy")
    assert action is Action.ACCEPT and values is not None and len(values) == 1
    assert "RB-FAKE" not in values[0] and values[0].startswith("accept; ref=RB-")


def test_forged_findings_header_is_removed_from_clean_mail(rules: Rules) -> None:
    """Clean mail gets no findings header of ours, so a forged one must not survive either."""
    forged = {"X-School-Policy-Findings": "none (checked by the school)", "X-School-Policy": "accept"}
    action, message = delivered(build(headers=forged, body="hello"), rules)
    assert action is Action.ACCEPT
    assert message.get_all("X-School-Policy-Findings") is None
    assert len(message.get_all("X-School-Policy") or []) == 1


def test_tag_prefixes_subject_once(rules: Rules) -> None:
    _, message = delivered(build(subject="WHO TOOK THE SCIENCE PROJECTOR AGAIN"), rules)
    assert message["Subject"] == "[Shouting] WHO TOOK THE SCIENCE PROJECTOR AGAIN"
    _, again = delivered(message.as_bytes(), rules)
    assert again["Subject"] == "[Shouting] WHO TOOK THE SCIENCE PROJECTOR AGAIN"


def fix_rules(tmp_path: Path) -> Rules:
    root = tmp_path / "rules"
    copy_rules(root)
    policy = root / "policy.yaml"
    policy.write_text(
        policy.read_text().replace(
            "  - detector: missing_bcc\n    action: reject", "  - detector: missing_bcc\n    action: fix"
        )
    )
    return load_rules(root)


def test_fix_hides_parents_but_keeps_body(tmp_path: Path) -> None:
    rules = fix_rules(tmp_path)
    raw = build("office@redborne.example", PARENTS[:2], "Trip", "Consent forms by Friday.", cc=PARENTS[2:])
    action, message = delivered(raw, rules)
    assert action is Action.FIX
    assert message["To"] == UNDISCLOSED and message["Cc"] is None
    text = message.as_string()
    assert not any(p in text for p in PARENTS)
    assert message.get_payload().strip() == "Consent forms by Friday."  # type: ignore[union-attr]


def test_apply_to_bytes_folded_headers_and_crlf() -> None:
    raw = b"Subject: a\r\n b\r\nTo: x@y.example,\r\n\tz@y.example\r\nX-A: 1\r\n\r\nbody\r\n"
    out = apply_to_bytes(
        raw, [AddHeader("X-New", "v"), ChangeHeader("To", 1, None), ChangeHeader("Subject", 1, "c")]
    )
    assert out == b"X-New: v\r\nSubject: c\r\nX-A: 1\r\n\r\nbody\r\n"


def test_a_parent_mailing_held_for_something_else_is_held_with_parents_hidden(tmp_path: Path) -> None:
    """A release must not show every parent's address because another finding won."""
    from milter.followup import FollowUp
    from milter.store import Store

    rules = fix_rules(tmp_path)
    raw = build(
        "office@redborne.example",
        PARENTS[:2],
        "Trip",
        "Consent forms by Friday.",
        cc=PARENTS[2:],
        attachments=[("form.exe", b"MZ\x90\x00" + b"\x00" * 200, "application/octet-stream")],
    )
    envelope = Envelope(mail_from="office@redborne.example", rcpt_to=tuple(PARENTS), auth_user="office")
    result = scan(raw, envelope, rules)
    assert result.verdict.action is Action.QUARANTINE and result.verdict.fix_recipients
    changed = apply_to_bytes(raw, modifications(result.verdict, result.message))
    assert not any(p.encode() in changed for p in PARENTS), "the hold queue's copy (no store)"
    store = Store(f"sqlite:///{tmp_path}/q.db")
    try:
        held = FollowUp(store, None).hold(raw, envelope, result)
        body = store.body(held, "tech", "review")
        assert not any(p.encode() in body for p in PARENTS), "the stored copy a release delivers"
        assert b"Consent forms by Friday." in body
        assert f"X-School-Policy: quarantine; ref={result.verdict.reference}".encode() in body
    finally:
        store.close()


def test_a_long_subject_is_folded_when_it_is_rewritten(rules: Rules) -> None:
    subject = " ".join(["RESIDENTIAL TRIP"] * 90)  # over 1,400 characters, all capitals
    raw = build(subject=subject)
    result = scan(raw, Envelope(), rules)
    changed = apply_to_bytes(raw, modifications(result.verdict, result.message))
    assert max(len(line) for line in changed.split(b"\n")) <= 998, "no line over SMTP's limit"
    message = email.message_from_bytes(changed)
    assert str(make_header(decode_header(message["Subject"]))).replace("\n", "") == "[Shouting] " + subject


def test_a_subject_that_spells_an_encoded_word_is_shown_as_written_after_a_tag(rules: Rules) -> None:
    """Literal "=?utf-8?q?...?=" text in a subject must not turn into other words on the way."""
    from email.header import Header

    literal = "=?utf-8?q?FREE_PRIZE?= WHO TOOK THE LAB KEYS AGAIN"
    raw = build(subject="placeholder").replace(
        b"Subject: placeholder", b"Subject: " + Header(literal, "utf-8").encode().encode()
    )
    action, message = delivered(raw, rules)
    assert action is Action.TAG
    assert str(make_header(decode_header(message["Subject"]))) == "[Shouting] " + literal
