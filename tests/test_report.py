"""Reports of offensive mail (policy 5.7): what a technician is offered to block, per way of forwarding."""

from __future__ import annotations

import base64
import email
import random
import re
import textwrap
from collections.abc import Callable
from email import policy
from email.message import EmailMessage

import pytest

from milter.message import Message
from milter.report import (
    FREE_MAIL_DOMAINS,
    MAX_URL_INDICATORS,
    Indicator,
    Report,
    parse_report,
    text_fingerprint,
)
from tests.mail import build

SCHOOL = frozenset({"redborne.example"})
STAFF = "a.patel@redborne.example"
SENDER = "win@mail.prizes.example"
BODY = (
    "Dear teacher,\n\n"
    "You are a disgrace and everyone at that school knows exactly what you did last term. "
    "Look at https://smear.example/pics/teacher?id=42&utm=mail#top to see what we have posted about you "
    "for all the parents to read.\n\n"
    "We will keep sending these until you resign.\n\n"
    "A friend\n"
)


def original_raw(body: str = BODY, sender: str = f"Prize Team <{SENDER}>", html: str | None = None) -> bytes:
    return build(sender=sender, to=STAFF, subject="You have won", body=body, html=html)


def kinds(report: Report, kind: str) -> list[str]:
    return [i.value for i in report.indicators if i.kind == kind]


def report_with_attachment(original: bytes, note: str = "Please block this.\n") -> bytes:
    report = EmailMessage()
    report["From"] = f"Anita Patel <{STAFF}>"
    report["To"] = "report@redborne.example"
    report["Subject"] = "Fwd: You have won"
    report.set_content(note)
    report.add_attachment(email.message_from_bytes(original, policy=policy.default))
    return report.as_bytes()


# --- fingerprint ---------------------------------------------------------------------------


def test_fingerprint_is_short_and_stable() -> None:
    fingerprint = text_fingerprint(Message(original_raw()))
    assert fingerprint is not None
    assert re.fullmatch(r"t1:[0-9a-f]{32}", fingerprint)
    assert text_fingerprint(Message(original_raw())) == fingerprint


def test_fingerprint_ignores_what_forwarding_does_to_text() -> None:
    reference = text_fingerprint(Message(original_raw()))
    rewrapped = "\n\n".join(textwrap.fill(p, 30, break_long_words=False) for p in BODY.split("\n\n"))
    quoted = "".join(f"> {line}\n" for line in rewrapped.splitlines())
    shouted_and_spaced = "  " + BODY.upper().replace(" ", "   \t") + "\n\n\n"
    for text in (rewrapped, quoted, shouted_and_spaced):
        assert text_fingerprint(Message(original_raw(text))) == reference


def test_fingerprint_ignores_subject_and_headers() -> None:
    forwarded = build(sender="someone@else.example", subject="Fwd: You have won", body=BODY)
    assert text_fingerprint(Message(forwarded)) == text_fingerprint(Message(original_raw()))


def test_fingerprint_folds_unicode_forms_and_invisible_characters() -> None:
    disguised = BODY.replace("disgrace", "ｄｉｓｇｒａｃｅ").replace("resign", "re\u200bsign")
    assert text_fingerprint(Message(original_raw(disguised))) == text_fingerprint(Message(original_raw()))


def test_html_original_fingerprints_like_its_plain_text() -> None:
    html = "<html><body>" + "".join(f"<p>{p}</p>" for p in BODY.split("\n\n")) + "</body></html>"
    html_only = build(sender=SENDER, body=None, html=html)
    assert text_fingerprint(Message(html_only)) == text_fingerprint(Message(original_raw()))


def test_different_text_has_a_different_fingerprint() -> None:
    other = BODY.replace("resign", "apologise")
    assert text_fingerprint(Message(original_raw(other))) != text_fingerprint(Message(original_raw()))


@pytest.mark.parametrize("body", ["", "ok", "Thanks, see you on Monday!", "!!! ??? ... --- >>>" * 20])
def test_too_little_text_has_no_fingerprint(body: str) -> None:
    assert text_fingerprint(Message(original_raw(body))) is None


# --- (a) forwarded as an attachment ----------------------------------------------------------


def test_attached_message_gives_its_sender_domain_links_and_fingerprint() -> None:
    html = (
        "<p>Dear teacher, you are a disgrace and everyone at that school knows it.</p>"
        '<p><a href="https://track.example/c/1?u=a.patel">See the pictures</a> or '
        '<a href="https://www.redborne.example/staff">your staff page</a>.</p>'
    )
    original = original_raw(html=html)
    report = parse_report(report_with_attachment(original), school_domains=SCHOOL)

    assert report.reporter == STAFF
    assert report.original_from == SENDER
    assert report.original_subject == "You have won"
    assert report.original_message_id == Message(original).header("message-id")
    assert report.original is not None
    assert kinds(report, "sender") == [SENDER]
    assert kinds(report, "domain") == ["prizes.example"]
    # Query strings and fragments carry per-recipient tracking: they are dropped.
    # The link to the school's own site is not proposed.
    assert kinds(report, "url") == ["https://smear.example/pics/teacher", "https://track.example/c/1"]
    fingerprint = kinds(report, "fingerprint")
    assert fingerprint == [text_fingerprint(Message(report.original))]
    assert fingerprint == [text_fingerprint(Message(original))]


def test_eml_file_attached_as_octet_stream_is_the_original() -> None:
    original = original_raw()
    raw = build(
        sender=STAFF,
        to="report@redborne.example",
        subject="spam",
        body="See attached.\n",
        attachments=[("You have won.eml", original, "application/octet-stream")],
    )
    report = parse_report(raw)
    assert report.original == original
    assert report.original_from == SENDER
    assert kinds(report, "fingerprint") == [text_fingerprint(Message(original))]


def test_base64_encoded_attached_message_is_decoded() -> None:
    # Not allowed by RFC 2046 for message/rfc822, but some clients do it.
    original = original_raw()
    encoded = base64.encodebytes(original)
    raw = (
        (
            f"From: {STAFF}\nSubject: report\nMIME-Version: 1.0\n"
            'Content-Type: multipart/mixed; boundary="b"\n\n'
            "--b\nContent-Type: text/plain\n\nPlease block.\n"
            "--b\nContent-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n"
        ).encode()
        + encoded
        + b"--b--\n"
    )
    report = parse_report(raw)
    assert report.original_from == SENDER
    assert kinds(report, "fingerprint") == [text_fingerprint(Message(original))]


def test_attachment_wins_over_the_reporters_own_text() -> None:
    note = "---------- Forwarded message ---------\nFrom: decoy@other.example\nSubject: x\n\nhello\n"
    report = parse_report(report_with_attachment(original_raw(), note=note))
    assert report.original_from == SENDER


# --- (b) forwarded inline --------------------------------------------------------------------


def gmail(original: Message, body: str) -> str:
    return (
        "Please block this, it came in this morning.\n\n"
        "---------- Forwarded message ---------\n"
        f"From: Prize Team <{original.from_address}>\n"
        "Date: Mon, 1 Jan 2024 at 10:00\n"
        f"Subject: {original.subject}\n"
        f"To: <{STAFF}>\n\n\n" + body
    )


def outlook(original: Message, body: str) -> str:
    return (
        "Please block\n\nAnita\n\n"
        "________________________________\n"
        f"From: Prize Team <{original.from_address}>\n"
        "Sent: 01 January 2024 10:00\n"
        f"To: Patel, Anita <{STAFF}>\n"
        f"Subject: {original.subject}\n\n" + body
    )


def outlook_classic(original: Message, body: str) -> str:
    return (
        "FYI - offensive.\n\n"
        "-----Original Message-----\n"
        f"From: Prize Team [mailto:{original.from_address}]\n"
        "Sent: Monday, January 01, 2024 10:00 AM\n"
        f"To: {STAFF}; head@redborne.example;\n"
        "  office@redborne.example\n"
        f"Subject: {original.subject}\n\n" + body
    )


def thunderbird(original: Message, body: str) -> str:
    return (
        "-------- Forwarded Message --------\n"
        f"Subject: \t{original.subject}\n"
        "Date: \tMon, 1 Jan 2024 10:00:00 +0000\n"
        f"From: \tPrize Team <{original.from_address}>\n"
        f"To: \t{STAFF}\n\n\n\n" + body
    )


def apple_mail(original: Message, body: str) -> str:
    return (
        "Sent from my iPhone\n\n"
        "Begin forwarded message:\n\n"
        f"From: Prize Team <{original.from_address}>\n"
        f"Subject: {original.subject}\n"
        "Date: 1 January 2024 at 10:00:00 GMT\n"
        f"To: {STAFF}\n\n" + body
    )


def mutt(original: Message, body: str) -> str:
    return (
        "Another one.\n\n"
        f"----- Forwarded message from Prize Team <{original.from_address}> -----\n\n"
        "Date: Mon, 1 Jan 2024 10:00:00 +0000\n"
        f"From: Prize Team <{original.from_address}>\n"
        f"To: {STAFF}\n"
        f"Subject: {original.subject}\n\n" + body + "\n----- End forwarded message -----\n\n"
        "-- \nAnita Patel, Head of Science, extension 214, room S12, Redborne Upper School\n"
    )


def as_is(text: str) -> str:
    return text


def rewrapped(text: str) -> str:
    return "\n\n".join(
        textwrap.fill(p, 36, break_long_words=False, break_on_hyphens=False) for p in text.split("\n\n")
    )


def quoted(text: str) -> str:
    return "".join(f"> {line}\n" if line else ">\n" for line in text.splitlines())


STYLES = [gmail, outlook, outlook_classic, thunderbird, apple_mail, mutt]


@pytest.mark.parametrize("style", STYLES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("transform", [as_is, rewrapped, quoted], ids=lambda f: f.__name__)
def test_inline_forward_gives_the_originals_sender_links_and_fingerprint(
    style: Callable[[Message, str], str], transform: Callable[[str], str]
) -> None:
    original = original_raw()
    message = Message(original)
    forwarded = style(message, message.plain_text)
    if transform is quoted:
        # Quoting clients quote the whole forward, header block included.
        forwarded = quoted(forwarded)
    else:
        forwarded = forwarded.replace(message.plain_text, transform(message.plain_text))
    raw = build(
        sender=f"Anita Patel <{STAFF}>", to="report@redborne.example", subject="Fwd: x", body=forwarded
    )

    report = parse_report(raw, school_domains=SCHOOL)

    assert report.reporter == STAFF
    assert report.original is None
    assert report.original_from == SENDER
    assert report.original_subject == "You have won"
    assert kinds(report, "sender") == [SENDER]
    assert kinds(report, "domain") == ["prizes.example"]
    assert kinds(report, "url") == ["https://smear.example/pics/teacher"]
    assert kinds(report, "fingerprint") == [text_fingerprint(message)]


def test_gmail_forward_with_html_alternative_reads_the_plain_part() -> None:
    message = Message(original_raw())
    plain = gmail(message, message.plain_text)
    html = "<div dir=ltr>Please block this.<br><br><div class=gmail_quote>" + plain.replace("\n", "<br>")
    raw = build(sender=STAFF, to="report@redborne.example", body=plain, html=html)
    report = parse_report(raw)
    assert report.original_from == SENDER
    assert kinds(report, "fingerprint") == [text_fingerprint(message)]


def test_outlook_html_only_forward_without_a_text_separator() -> None:
    # Outlook draws its separator as a border: the visible text has no marker line.
    message = Message(original_raw())
    paragraphs = "".join(f"<p>{p}</p>" for p in message.plain_text.split("\n\n"))
    html = (
        "<html><body><p>Please block</p>"
        '<div style="border-top:solid #E1E1E1 1pt">'
        f"<b>From:</b> Prize Team &lt;{SENDER}&gt;<br><b>Sent:</b> 01 January 2024 10:00<br>"
        f"<b>To:</b> Patel, Anita &lt;{STAFF}&gt;<br><b>Subject:</b> You have won</div>"
        f"{paragraphs}</body></html>"
    )
    report = parse_report(build(sender=STAFF, to="report@redborne.example", body=None, html=html))
    assert report.original_from == SENDER
    assert report.original_subject == "You have won"
    assert kinds(report, "fingerprint") == [text_fingerprint(message)]


def test_subject_is_taken_from_the_report_when_the_block_has_none() -> None:
    body = f"---------- Forwarded message ---------\nFrom: {SENDER}\nDate: today\n\n{BODY}"
    report = parse_report(build(sender=STAFF, subject="Fwd: FW: You have won", body=body))
    assert report.original_subject == "You have won"


def test_outlook_sender_shown_by_name_only_still_gives_links_and_fingerprint() -> None:
    body = f"-----Original Message-----\nFrom: Prize Team\nSent: today\nSubject: You have won\n\n{BODY}"
    report = parse_report(build(sender=STAFF, body=body))
    assert report.original_from is None
    assert kinds(report, "sender") == kinds(report, "domain") == []
    assert kinds(report, "url") == ["https://smear.example/pics/teacher"]
    assert kinds(report, "fingerprint") == [text_fingerprint(Message(original_raw()))]


# --- what is never proposed ------------------------------------------------------------------


def test_school_sender_and_school_links_are_not_proposed() -> None:
    body = BODY + "\nhttps://intranet.redborne.example/staff/list and https://REDBORNE.example/\n"
    original = original_raw(body, sender="Year 10 <k.smith@students.redborne.example>")
    report = parse_report(report_with_attachment(original), school_domains=frozenset({"Redborne.Example."}))
    assert report.original_from == "k.smith@students.redborne.example"
    assert kinds(report, "sender") == kinds(report, "domain") == []
    assert kinds(report, "url") == ["https://smear.example/pics/teacher"]
    assert kinds(report, "fingerprint") == [text_fingerprint(Message(original))]


@pytest.mark.parametrize("address", ["troll1987@gmail.com", "troll@hotmail.co.uk", "Troll@YAHOO.co.uk"])
def test_free_mail_sender_is_proposed_but_not_its_domain(address: str) -> None:
    report = parse_report(report_with_attachment(original_raw(sender=address)))
    assert kinds(report, "sender") == [address.lower()]
    assert kinds(report, "domain") == []


def test_free_mail_list_holds_the_big_providers() -> None:
    assert {"gmail.com", "outlook.com", "hotmail.com", "icloud.com", "proton.me"} <= FREE_MAIL_DOMAINS


def test_caller_can_extend_the_free_mail_list() -> None:
    original = original_raw(sender="x@btinternet.com")
    report = parse_report(report_with_attachment(original), free_mail=FREE_MAIL_DOMAINS | {"btinternet.com"})
    assert kinds(report, "domain") == []


def test_links_are_capped_and_deduplicated() -> None:
    links = "\n".join(f"https://site{i}.example/p?n={j}" for i in range(30) for j in range(2))
    report = parse_report(report_with_attachment(original_raw(BODY + links)))
    urls = kinds(report, "url")
    assert len(urls) == MAX_URL_INDICATORS
    assert len(set(urls)) == len(urls)


def test_bare_and_odd_links_are_normalised() -> None:
    body = (
        BODY
        + "\nwww.Bad.example/Path?x=1 and HTTP://user@EVIL.example:8080\\a\\b#frag and mailto:x@y.example\n"
    )
    report = parse_report(report_with_attachment(original_raw(body)))
    assert kinds(report, "url") == [
        "https://smear.example/pics/teacher",
        "http://www.bad.example/Path",
        "http://evil.example/a/b",
    ]


def test_reporter_given_by_the_caller_wins_over_the_from_header() -> None:
    raw = report_with_attachment(original_raw())
    assert parse_report(raw, reporter="J.Hughes@redborne.example").reporter == "j.hughes@redborne.example"
    assert parse_report(raw).reporter == STAFF


def test_indicator_notes_never_carry_message_text() -> None:
    report = parse_report(report_with_attachment(original_raw()))
    assert {i.kind for i in report.indicators} == {"sender", "domain", "url", "fingerprint"}
    for indicator in report.indicators:
        assert isinstance(indicator, Indicator)
        assert "disgrace" not in indicator.note and "won" not in indicator.note


def test_report_repr_leaks_no_content() -> None:
    # Policy 2.4: a Report written to a log must not carry the message's words.
    text = repr(parse_report(report_with_attachment(original_raw())))
    assert "You have won" not in text and "disgrace" not in text


# --- (c) nothing recognisable, (d) malformed ---------------------------------------------------


def test_report_without_a_forwarded_message_proposes_nothing() -> None:
    body = (
        "Hi, I got a horrible email this morning from https://nasty.example and deleted it. "
        "From: what I remember it was about the trip. Can you block it?\n"
    )
    report = parse_report(build(sender=STAFF, to="report@redborne.example", subject="spam", body=body))
    assert report == Report(STAFF, None, None, None, None, ())


@pytest.mark.parametrize(
    "raw", [b"", b"\n", b"\x00\xff" * 50, b"From: \n\n", b"Content-Type: message/rfc822\n\n"]
)
def test_malformed_input_gives_an_empty_report(raw: bytes) -> None:
    report = parse_report(raw)
    assert report.indicators == ()
    assert report.original_from is None


def test_random_and_truncated_reports_never_crash() -> None:
    rng = random.Random(57)
    whole = [
        report_with_attachment(original_raw()),
        build(sender=STAFF, body=gmail(Message(original_raw()), BODY)),
    ]
    samples = [rng.randbytes(rng.randrange(1, 4000)) for _ in range(50)]
    for raw in whole:
        samples.extend(raw[: rng.randrange(len(raw))] for _ in range(40))
        samples.extend(bytes(b ^ 0xFF if rng.random() < 0.02 else b for b in raw) for _ in range(20))
    for raw in samples:
        report = parse_report(raw, school_domains=SCHOOL)
        assert isinstance(report, Report)
        assert all(i.value for i in report.indicators)


def test_marker_without_a_header_block_is_not_a_forward() -> None:
    body = "---------- Forwarded message ---------\n\nJust some words that follow the marker line here.\n"
    assert parse_report(build(sender=STAFF, body=body)).indicators == ()
