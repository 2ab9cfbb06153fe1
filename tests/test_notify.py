"""notify: guidance to senders, alerts and the digest from the real rules/, sent over real SMTP."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import html
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from milter import lists
from milter.context import Context
from milter.detectors import (
    dangerous_attachment,
    obscene_language,
    safeguarding_concern,
)
from milter.detectors.registry import DETECTORS
from milter.engine import scan
from milter.envelope import Envelope
from milter.findings import Finding, Severity
from milter.lexicon import mask
from milter.notify import HeldItem, alert_message, digest_message, guidance_message, send
from milter.policy.loader import Rules
from milter.policy.schema import Action, Direction, Role
from milter.verdict import Verdict
from tests.conftest import REPO
from tests.mail import build

EXAMPLES = REPO / "rules" / "examples"
STAFF = "j.hughes@redborne.example"
OUTBOUND = Context(Direction.OUTBOUND, Role.STAFF, STAFF, True, ("supplier@sportsgear.example",))


def parts(msg: EmailMessage) -> tuple[str, str]:
    """The text part and the HTML part (unescaped, so both read the same), as a reader gets them."""
    text = msg.get_body(("plain",))
    page = msg.get_body(("html",))
    assert text is not None and page is not None, "guidance must have a text and an HTML part"
    assert isinstance(text, EmailMessage) and isinstance(page, EmailMessage)
    return text.get_content(), page.get_content()


def reject(findings: list[Finding], guidance: tuple[str, ...], ctx: Context = OUTBOUND) -> Verdict:
    return Verdict(
        action=Action.REJECT,
        reference="RB-7KQ2-M9XD",
        findings=tuple(findings),
        direction=ctx.direction,
        sender_role=ctx.sender_role,
        clauses=tuple(dict.fromkeys(f.clause for f in findings)),
        guidance=guidance,
    )


def absent(raw: str, text: str) -> bool:
    """The raw words appear nowhere, in any case (whole words, so 'ass' is not found in 'class')."""
    return re.search(rf"(?<![a-z]){re.escape(raw.lower())}(?![a-z])", text.lower()) is None


# --- guidance: end to end from real example messages --------------------------------------


def test_abusive_reply_gets_guidance_mail_without_the_words(rules: Rules) -> None:
    raw = (EXAMPLES / "02-staff-abusive-reply.eml").read_bytes()
    result = scan(raw, Envelope(auth_user="m.oconnor@redborne.example", client_address="192.0.2.7"), rules)
    verdict, ctx = result.verdict, result.context
    assert verdict.guidance == ("obscene_language",)

    msg = guidance_message(
        verdict,
        ctx,
        rules,
        sender="m.oconnor@redborne.example",
        original_message_id="<pe-7@redborne.example>",
    )
    assert msg is not None
    assert msg["To"] == "m.oconnor@redborne.example"
    assert msg["From"].addresses[0].addr_spec == "postmaster@redborne.example"
    assert msg["Subject"].startswith("Your message was not delivered: ")
    assert f"(reference {verdict.reference})" in msg["Subject"]
    assert "late delivery" not in msg["Subject"].lower()  # never the original subject
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-School-Policy-Reference"] == verdict.reference
    assert msg["In-Reply-To"] == "<pe-7@redborne.example>"
    assert msg["Message-ID"] and msg["Date"]
    assert msg["Reply-To"] == "it-support@redborne.example"
    assert msg.get_content_type() == "multipart/alternative"

    for body in parts(msg):
        page = html.unescape(body)
        assert verdict.reference in page
        assert "Clause 5.5, Inappropriate use of email" in page
        assert "f******" in page and "s*** (leetspeak)" in page  # masked evidence, as found
        assert "revised version" in page and "it-support@redborne.example" in page
        for word in ("fucking", "sh1t", "van was late", "late delivery"):
            assert absent(word, page), word


def test_parents_without_bcc_guidance_does_not_list_the_parents(rules: Rules) -> None:
    raw = (EXAMPLES / "03-parents-without-bcc.eml").read_bytes()
    result = scan(raw, Envelope(auth_user="office@redborne.example", client_address="192.0.2.7"), rules)
    msg = guidance_message(result.verdict, result.context, rules, sender="office@redborne.example")
    assert msg is not None
    assert "parents' addresses visible" in msg["Subject"]
    for body in parts(msg):
        page = html.unescape(body)
        assert "5 parent addresses in To/Cc (limit 2)" in page
        assert "Bcc" in page and "parent-communication tool" in page and "Appendix 1" in page
        assert "jane.taylor" not in page and "Natural History Museum" not in page


def test_html_guidance_escapes_what_it_shows(rules: Rules) -> None:
    finding = Finding(
        "dangerous_attachment",
        "html_script",
        Severity.STRONG,
        "1.2",
        "an HTML attachment carries script",
        ("<script>alert(1)</script>.html",),
        "attachments",
    )
    msg = guidance_message(reject([finding], ("dangerous_attachment",)), OUTBOUND, rules, sender=STAFF)
    assert msg is not None
    _, page = parts(msg)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.html" in page


def test_several_templates_make_one_mail_with_one_greeting_and_footer(rules: Rules) -> None:
    findings = [
        Finding(
            "obscene_language", "profanity", Severity.STRONG, "5.5", "strong profanity in the body", ("f***",)
        ),
        Finding(
            "missing_bcc", "missing_bcc", Severity.STRONG, "appendix", "3 parents visible", ("3 in To/Cc",)
        ),
    ]
    msg = guidance_message(
        reject(findings, ("obscene_language", "missing_bcc")), OUTBOUND, rules, sender=STAFF
    )
    assert msg is not None
    text, page = parts(msg)
    for body in (text, page):
        assert body.count("could not be delivered") == 1
        assert body.count("If you believe this is a mistake") == 1
        assert body.count("How to fix it") == 2
    assert page.count("<html") == 1 and page.count("</html>") == 1
    assert "offensive or inappropriate language; parents' addresses visible" in msg["Subject"]


def test_fixed_message_guidance_says_it_was_delivered(rules: Rules) -> None:
    finding = Finding("missing_bcc", "missing_bcc", Severity.STRONG, "appendix", "parents visible", ("3",))
    verdict = dataclasses.replace(reject([finding], ("missing_bcc",)), action=Action.FIX)
    msg = guidance_message(verdict, OUTBOUND, rules, sender=STAFF)
    assert msg is not None
    assert msg["Subject"].startswith("Your message was changed before delivery: ")
    for body in parts(msg):
        assert "was delivered, but only after" in body and "could not be delivered" not in body


def test_from_address_can_be_given(rules: Rules) -> None:
    finding = Finding("missing_bcc", "missing_bcc", Severity.STRONG, "appendix", "parents visible", ("3",))
    msg = guidance_message(
        reject([finding], ("missing_bcc",)),
        OUTBOUND,
        rules,
        sender=STAFF,
        from_address="noreply@redborne.example",
    )
    assert msg is not None and msg["From"] == "noreply@redborne.example"
    assert msg["In-Reply-To"] is None


PROFANITY = Finding("obscene_language", "profanity", Severity.STRONG, "5.5", "strong profanity", ("f***",))
SELF_HARM = Finding(
    "safeguarding_concern", "self_harm", Severity.SEVERE, "KCSIE", "possible self-harm concern", ('"x"',)
)


@pytest.mark.parametrize(
    ("why", "ctx", "findings", "guidance", "sender"),
    [
        ("untrusted sender", dataclasses.replace(OUTBOUND, sender_trusted=False), [PROFANITY], True, STAFF),
        ("empty sender", OUTBOUND, [PROFANITY], True, ""),
        ("outside address", OUTBOUND, [PROFANITY], True, "someone@elsewhere.example"),
        ("a parent", OUTBOUND, [PROFANITY], True, "jane.taylor@gmail.example"),
        ("no guidance named", OUTBOUND, [PROFANITY], False, STAFF),
        ("safeguarding finding", OUTBOUND, [PROFANITY, SELF_HARM], True, STAFF),
        ("header injection", OUTBOUND, [PROFANITY], True, "x@redborne.example\r\nBcc: a@redborne.example"),
        ("the gateway's own notice", OUTBOUND, [PROFANITY], True, "postmaster@redborne.example"),
        ("a mail system", OUTBOUND, [PROFANITY], True, "MAILER-DAEMON@redborne.example"),
    ],
)
def test_no_guidance_mail(
    rules: Rules, why: str, ctx: Context, findings: list[Finding], guidance: bool, sender: str
) -> None:
    verdict = reject(findings, ("obscene_language",) if guidance else (), ctx)
    assert guidance_message(verdict, ctx, rules, sender=sender) is None, why


def test_student_sender_gets_guidance(rules: Rules) -> None:
    student = "leo.brown@students.redborne.example"
    ctx = Context(Direction.INTERNAL, Role.STUDENT, student, True, (STAFF,))
    msg = guidance_message(reject([PROFANITY], ("obscene_language",), ctx), ctx, rules, sender=student)
    assert msg is not None and msg["To"] == student


# --- guidance: every finding type ---------------------------------------------------------


@dataclass(frozen=True)
class Case:
    finding: Finding
    raw: str  # what the offending message said, which the guidance must not repeat
    shown: tuple[str, ...] = ()  # evidence as the reader sees it, when not the stored text


def lexicon_word(rules: Rules, category: str) -> str:
    """A real single-word term of the category, long enough to search for as a whole word."""
    words = sorted(
        (t for t in rules.obscene.terms if t.category == category and " " not in t.text and len(t.text) >= 5),
        key=lambda t: (-t.severity, t.text),
    )
    assert words, f"no {category} word in the lexicon"
    return words[0].text


def realistic_cases(rules: Rules) -> list[Case]:
    cases: list[Case] = []
    for category, words in obscene_language.CATEGORY_WORDS.items():
        term = next(t for t in rules.obscene.terms if t.text == lexicon_word(rules, category))
        summary = f"{term.severity} {words} in the subject and body"
        evidence = (mask(term.text), f"{mask(term.text)} (leetspeak)")
        cases.append(
            Case(Finding("obscene_language", category, term.severity, "5.5", summary, evidence), term.text)
        )

    sites = {"adult": "porn.example", "hate": "hate-site.example", "malware": "malware-download.example"}
    assert sorted(sites) == rules.domains.categories(), "a new domain list needs a case here"
    for category, domain in sites.items():
        match = rules.domains.match(f"www.{domain}")
        assert match is not None and match.category == category
        summary = f"links to 1 site(s) on the school's {category} list"
        finding = Finding("offensive_links", category, Severity.SEVERE, "5.5", summary, (domain,), "links")
        cases.append(Case(finding, f"https://www.{domain}/videos/watch?id=4471"))
    cases.append(
        Case(
            Finding(
                "offensive_links",
                "deceptive_link",
                Severity.MILD,
                "5.5",
                "1 link(s) show one site but lead to another",
                ("shows paypal.com, goes to com.example",),
                "links",
            ),
            "http://www.paypal.com.example/login",
        )
    )

    cases.append(
        Case(
            Finding(
                "missing_bcc",
                "missing_bcc",
                Severity.STRONG,
                "appendix",
                "5 parent addresses are visible to every recipient in To/Cc; use Bcc",
                ("5 parent addresses in To/Cc (limit 2)",),
                "headers",
            ),
            "jane.taylor@gmail.example",
        )
    )
    cases.append(
        Case(
            Finding(
                "bulk_weight",
                "bulk_weight",
                Severity.STRONG,
                "1.2",
                "a 6.0 MB message to 200 recipients puts 1.2 GB on the mail system; "
                "share a Drive link instead",
                ("6.0 MB x 200 recipients = 1.2 GB",),
                "size",
            ),
            "Sports day photos for every tutor group",
        )
    )
    cases.append(
        Case(
            Finding(
                "bulk_weight",
                "large_attachment",
                Severity.STRONG,
                "1.2",
                "1 attachment(s) over 15.0 MB; share a Drive link instead",
                ("sports-day.zip: 22.4 MB",),
                "attachments",
            ),
            "all the photos from Thursday",
        )
    )
    cases.append(
        Case(
            Finding(
                "shouting",
                "shouting",
                Severity.MILD,
                "appendix",
                "continuous capitals in the subject and body read as shouting",
                ("subject 100% capitals", "body 91% capitals"),
                "subject and body",
            ),
            "WHO MOVED THE SCIENCE LAB KEYS AGAIN",
        )
    )
    cases.append(
        Case(
            Finding(
                "advertising",
                "advertising",
                Severity.STRONG,
                "5.5",
                "the message reads as unsolicited commercial or advertising material",
                ("score 6 (threshold 4)", '"buy now"', '"limited time offer"', "unsubscribe link"),
                "body",
            ),
            "wristbands at half price this weekend",
        )
    )
    cases.append(
        Case(
            Finding(
                "hidden_text",
                "hidden_text",
                Severity.MILD,
                "5.5",
                "the HTML hides 57 characters of text from the reader",
                ("57 hidden characters",),
                "body",
            ),
            "cheap pills cheap pills",
        )
    )
    cases.append(
        Case(
            Finding(
                "malformed_mime",
                "malformed_mime",
                Severity.MILD,
                "2.2",
                "the message is not well-formed MIME (2 fault(s))",
                ("StartBoundaryNotFoundDefect", "MissingHeaderBodySeparatorDefect"),
                "body",
            ),
            "minutes of the governors meeting",
        )
    )

    names = {
        "executable": ("setup.exe",),
        "script": ("invoice.js",),
        "disk_image": ("photos.iso",),
        "office_macro": ("budget.xlsm",),
        "html_script": ("page.html",),
        "type_mismatch": ("report.pdf",),
        "double_extension": ("report.pdf.exe",),
        "name_trick": ("invoice\u202egpj.exe",),
        "encrypted": ("pupil-data.zip", "pupil-data.zip/list.xlsx"),
        "archive_bomb": ("bomb.zip",),
        "archive_unreadable": ("broken.zip",),
    }
    assert set(names) == set(dangerous_attachment.SEVERITY), "a new attachment kind needs a case here"
    for kind, places in names.items():
        finding = Finding(
            "dangerous_attachment",
            kind,
            dangerous_attachment.SEVERITY[kind],
            "1.2",
            dangerous_attachment.SUMMARY[kind],
            places,
            "attachments",
        )
        shown = ("invoice<U+202E>gpj.exe",) if kind == "name_trick" else ()
        cases.append(Case(finding, "please run this tonight", shown))
    cases.append(
        Case(
            Finding(
                "dangerous_attachment",
                "external_attachment",
                Severity.MILD,
                "1.2",
                "attachments from outside the school: do not open them unless you expect them",
                ("invoice.pdf",),
                "attachments",
            ),
            "your invoice is attached",
        )
    )

    blocks = {
        "sender": ("The sender is on the school's block list", "winner@spam-sender.example"),
        "domain": ("The sender's domain is on the school's block list", "spam-sender.example"),
        "url": ("The message links to an address on the school's block list", "http://prize.example/claim"),
        "fingerprint": ("The message's text matches reported offensive mail", "t1:" + "0f" * 16),
    }
    assert set(blocks) == set(lists.KINDS), "a new kind of block entry needs a case here"
    for kind, (summary, evidence) in blocks.items():
        finding = Finding("blocklist", kind, Severity.STRONG, "5.7", summary, (evidence,))
        cases.append(
            Case(finding, "http://prize.example/claim?winner=a.patel" if kind == "url" else "you won")
        )

    cases.append(
        Case(
            Finding(
                "virus_scan",
                "malware",
                Severity.SEVERE,
                "1.2",
                "virus found: Win.Test.EICAR_HDB-1",
                ("Win.Test.EICAR_HDB-1",),
                "attachments",
            ),
            "here is the worksheet",
        )
    )
    cases.append(
        Case(
            Finding(
                "virus_scan",
                "unscanned",
                Severity.MILD,
                "1.2",
                "the virus scanner could not be reached: the message is unscanned",
                ("down",),
                "message",
            ),
            "here is the worksheet",
        )
    )
    return cases


def test_every_detector_but_safeguarding_has_a_case(rules: Rules) -> None:
    """Rules may reject any detector's findings, so each needs guidance; safeguarding never gets any."""
    names = {module.NAME for module in DETECTORS}
    covered = {case.finding.detector for case in realistic_cases(rules)}
    assert covered == names - {safeguarding_concern.NAME}
    for name in covered:
        assert (rules.root / "guidance" / f"{name}.txt").is_file(), name
        assert (rules.root / "guidance" / f"{name}.html").is_file(), name


def test_guidance_renders_for_every_finding_type(rules: Rules) -> None:
    cases = realistic_cases(rules)
    for case in cases:
        f = case.finding
        verdict = reject([f], (f.detector,))
        msg = guidance_message(verdict, OUTBOUND, rules, sender=STAFF)
        assert msg is not None, f"{f.detector}/{f.category}"
        text, page = parts(msg)
        assert verdict.reference in msg["Subject"]
        clause = rules.clause(f.clause)
        label = clause.title if f.clause == "appendix" else f"Clause {f.clause}, {clause.title}"
        for body in (text, html.unescape(page)):
            where = f"{f.detector}/{f.category}"
            assert verdict.reference in body, where
            assert label in body and clause.text in body, where
            assert f.summary in body, where
            for shown in case.shown or f.evidence:
                assert shown in body, where
            assert "How to fix it" in body, where
            assert absent(case.raw, body), where
            assert "\u202e" not in body, where


# --- alerts ------------------------------------------------------------------------------

WHEN = datetime(2026, 11, 23, 14, 0, tzinfo=UTC)


def held_from(path: Path, rules: Rules, envelope: Envelope, held_id: str) -> tuple[HeldItem, Verdict]:
    raw = path.read_bytes()
    result = scan(raw, envelope, rules)
    verdict = result.verdict
    item = HeldItem(
        id=held_id,
        reference=verdict.reference,
        received_at=WHEN,
        direction=verdict.direction.value,
        sender=result.context.sender or "",
        recipients=result.context.recipients,
        subject=result.message.subject,
        action=verdict.action.value,
        categories=tuple(f"{f.detector}/{f.category}" for f in verdict.findings),
        findings=tuple(f.as_dict() for f in verdict.findings),
        size=len(raw),
    )
    return item, verdict


def test_received_obscene_mail_alerts_slt_and_it_with_masked_facts(rules: Rules) -> None:
    item, verdict = held_from(
        EXAMPLES / "07-received-obscene.eml", rules, Envelope(client_address="198.51.100.9"), "Q-0007"
    )
    assert verdict.action is Action.QUARANTINE
    msg = alert_message(
        item, list(verdict.alerts), rules, console_url="https://mail.redborne.example/held/{id}"
    )
    assert msg is not None
    assert msg["To"] == "slt@redborne.example, it-support@redborne.example"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-School-Policy-Reference"] == item.reference
    assert item.reference in msg["Subject"] and "held for review" in msg["Subject"]
    assert msg.get_content_type() == "text/plain"
    body = msg.get_content()
    assert "winner@spam-sender.example" in body and "a.patel@redborne.example" in body
    assert "f*** (confusable)" in body and "porn.example" in body
    assert "clause 5.7: Reporting offensive email received" in body
    assert "school-milter quarantine show Q-0007 --reason" in body
    assert "https://mail.redborne.example/held/Q-0007" in body
    # The subject swears (with a Cyrillic letter): withheld, named masked. No body text at all.
    assert "Subject:    (withheld: it contains f***)" in body
    assert "won a prize" not in body and "Claim now" not in body and "cheap pills" not in body


def test_subject_is_shown_when_clean(rules: Rules) -> None:
    finding = Finding(
        "dangerous_attachment", "executable", Severity.SEVERE, "1.2", "a program", ("setup.exe",)
    )
    item = HeldItem(
        "Q-1", "RB-AAAA-BBBB", WHEN, "inbound", "x@elsewhere.example", (STAFF,),
        "Your parcel\r\nBcc: evil@elsewhere.example", "quarantine",
        ("dangerous_attachment/executable",), (finding.as_dict(),), 48_000,
    )  # fmt: skip
    msg = alert_message(item, ["it"], rules)
    assert msg is not None and msg["To"] == "it-support@redborne.example"
    body = msg.get_content()
    assert "Subject:    Your parcel Bcc: evil@elsewhere.example" in body  # one line: no header injection
    assert "setup.exe" in body and "48.0 KB" in body
    assert "Review console" not in body


def test_safeguarding_alert_carries_only_concern_reference_and_addresses(rules: Rules) -> None:
    envelope = Envelope(auth_user="leo.brown@students.redborne.example", client_address="10.20.4.4")
    item, verdict = held_from(EXAMPLES / "06-student-safeguarding.eml", rules, envelope, "Q-0006")
    assert verdict.alerts == ("dsl",)
    msg = alert_message(item, list(verdict.alerts), rules)
    assert msg is not None and msg["To"] == "safeguarding@redborne.example"
    assert (
        msg["Subject"]
        == f"Safeguarding alert for the designated safeguarding lead (reference {item.reference})"
    )
    body = msg.get_content()
    assert "possible self-harm concern" in body
    assert item.reference in body
    assert "leo.brown@students.redborne.example" in body and "m.oconnor@redborne.example" in body
    for private in ("cant come to pe", "want to die", "hates me", "KCSIE"):
        assert private not in body.lower() and private not in msg["Subject"].lower(), private


def test_alert_skips_unknown_roles_and_needs_an_address(rules: Rules) -> None:
    finding = Finding("virus_scan", "malware", Severity.SEVERE, "1.2", "virus found: X", ("X",))
    item = HeldItem(
        "", "RB-AAAA-CCCC", WHEN, "outbound", STAFF, ("a@elsewhere.example",), "Worksheet", "reject",
        ("virus_scan/malware",), (finding.as_dict(),), 1000,
    )  # fmt: skip
    assert alert_message(item, ["caretaker"], rules) is None
    msg = alert_message(item, ["caretaker", "it", "it"], rules)
    assert msg is not None and msg["To"] == "it-support@redborne.example"
    body = msg.get_content()
    assert "refused (returned to its sender)" in body
    assert "quarantine show" not in body  # nothing held, nothing to show


# --- digest ------------------------------------------------------------------------------


def digest_items(rules: Rules) -> list[HeldItem]:
    obscene, _ = held_from(
        EXAMPLES / "07-received-obscene.eml", rules, Envelope(client_address="198.51.100.9"), "Q-0007"
    )
    exe = Finding("dangerous_attachment", "executable", Severity.SEVERE, "1.2", "a program", ("setup.exe",))
    attachment = HeldItem(
        "Q-0008", "RB-AAAA-DDDD", WHEN, "inbound", "x@elsewhere.example", (STAFF,), "Delivery note",
        "quarantine", ("dangerous_attachment/executable",), (exe.as_dict(),), 120_000,
    )  # fmt: skip
    bullying = Finding(
        "safeguarding_concern", "bullying", Severity.STRONG, "6.15", "possible bullying concern", ('"loser"',)
    )
    child = HeldItem(
        "Q-0009", "RB-AAAA-EEEE", WHEN, "internal", "leo.brown@students.redborne.example",
        ("sam.hill@students.redborne.example",), "about sam", "quarantine",
        ("safeguarding_concern/bullying",), (bullying.as_dict(),), 2_000,
    )  # fmt: skip
    return [obscene, attachment, child]


def test_digest_lists_held_mail_for_technicians(rules: Rules) -> None:
    msg = digest_message(
        digest_items(rules),
        rules,
        role="it",
        period="23 November 2026",
        console_url="https://console.example/",
    )
    assert msg is not None
    assert msg["To"] == "it-support@redborne.example"
    assert msg["Subject"] == "Quarantine digest, 23 November 2026: 3 message(s) held"
    assert msg["Auto-Submitted"] == "auto-generated"
    body = msg.get_content()
    assert "Q-0007" in body and "Q-0008" in body and "Q-0009" in body
    assert "Delivery note" in body and "setup.exe" in body
    assert "(withheld: it contains f***)" in body
    assert "school-milter quarantine show ID --reason" in body and "https://console.example/" in body
    # The safeguarding item: no concern, no people, no subject, no words for IT.
    assert "safeguarding lead: no details here" in body
    for private in ("bullying", "leo.brown", "sam.hill", "about sam", "loser"):
        assert private not in body, private


def test_digest_for_the_dsl_names_the_concern_but_not_the_subject(rules: Rules) -> None:
    msg = digest_message(digest_items(rules), rules, role="dsl", period="today")
    assert msg is not None and msg["To"] == "safeguarding@redborne.example"
    body = msg.get_content()
    assert "possible bullying concern" in body and "leo.brown@students.redborne.example" in body
    assert "about sam" not in body and "loser" not in body


def test_no_digest_without_items_or_address(rules: Rules) -> None:
    assert digest_message([], rules, role="it", period="today") is None
    assert digest_message(digest_items(rules), rules, role="caretaker", period="today") is None


# --- sending over real SMTP --------------------------------------------------------------


class Recorder:
    """An aiosmtpd handler that keeps what arrives and refuses chosen recipients."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 OK queued"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def relay() -> Iterator[tuple[Recorder, tuple[str, int]]]:
    handler = Recorder()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, ("127.0.0.1", port)
    finally:
        controller.stop()


def test_send_delivers_with_empty_envelope_sender(
    rules: Rules, relay: tuple[Recorder, tuple[str, int]]
) -> None:
    handler, address = relay
    verdict = reject([PROFANITY], ("obscene_language",))
    guidance = guidance_message(verdict, OUTBOUND, rules, sender=STAFF)
    item, _ = held_from(
        EXAMPLES / "07-received-obscene.eml", rules, Envelope(client_address="198.51.100.9"), "Q-0007"
    )
    alert = alert_message(item, ["slt", "it"], rules)
    assert guidance is not None and alert is not None

    assert send([guidance, alert], address, timeout=10) == []

    (from1, to1, data1), (from2, to2, _) = handler.received
    assert from1 == from2 == "<>"  # the null reverse-path, as aiosmtpd records it
    assert to1 == [STAFF]
    assert to2 == ["slt@redborne.example", "it-support@redborne.example"]
    arrived = email.message_from_bytes(data1, policy=email.policy.default)
    assert isinstance(arrived, EmailMessage)
    assert arrived["X-School-Policy-Reference"] == verdict.reference
    text, page = parts(arrived)
    assert "revised version" in text and "<html" in page
    assert b"safeguarding" not in data1.lower()


def test_send_reports_refusals_and_carries_on(rules: Rules, relay: tuple[Recorder, tuple[str, int]]) -> None:
    handler, address = relay
    finding = Finding("missing_bcc", "missing_bcc", Severity.STRONG, "appendix", "parents visible", ("3",))
    refused = guidance_message(
        reject([finding], ("missing_bcc",)), OUTBOUND, rules, sender="nobody@redborne.example"
    )
    delivered = guidance_message(reject([finding], ("missing_bcc",)), OUTBOUND, rules, sender=STAFF)
    assert refused is not None and delivered is not None
    failures = send([refused, delivered], address, timeout=10)
    assert failures == ["RB-7KQ2-M9XD: all 1 recipient(s) refused (550)"]
    assert [to for _, to, _ in handler.received] == [[STAFF]]


def test_send_to_an_unreachable_relay_fails_each_message_without_raising(rules: Rules) -> None:
    finding = Finding("missing_bcc", "missing_bcc", Severity.STRONG, "appendix", "parents visible", ("3",))
    msg = guidance_message(reject([finding], ("missing_bcc",)), OUTBOUND, rules, sender=STAFF)
    assert msg is not None
    failures = send([msg, msg], ("127.0.0.1", free_port()), timeout=5)
    assert len(failures) == 2
    assert all(f.startswith("RB-7KQ2-M9XD: ") and "unreachable" in f for f in failures)
    assert all("parents" not in f for f in failures)


def test_guidance_mail_from_build_is_not_confused_with_the_original(rules: Rules) -> None:
    # A shouted subject from a staff member: the guidance subject is our own, not theirs.
    raw = build(sender=STAFF, subject="WHO MOVED THE SCIENCE LAB KEYS AGAIN")
    result = scan(raw, Envelope(auth_user=STAFF, client_address="192.0.2.7"), rules)
    (finding,) = [f for f in result.verdict.findings if f.detector == "shouting"]
    verdict = dataclasses.replace(result.verdict, action=Action.REJECT, guidance=("shouting",))
    msg = guidance_message(verdict, result.context, rules, sender=STAFF)
    assert msg is not None
    assert (
        msg["Subject"]
        == f"Your message was not delivered: written in capitals (reference {verdict.reference})"
    )
    text, page = parts(msg)
    assert "sentence case" in text and "sentence case" in page
    assert "SCIENCE LAB" not in text and "SCIENCE LAB" not in page
    assert finding.evidence[0] in text
