"""Hostile mail renders inert: script in the HTML body, the subject, an attachment's name and
headers never becomes markup; the HTML view is sanitised and sandboxed; attachments are
downloadable as-is only behind a warning, and the download is audited."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import pytest

from milter.message import Message
from milter.store import Store
from milter.web import views
from milter.web.display import content_disposition, download_name, sanitize_html, text_view
from milter.web.security import MAIL_HTML_CSP
from tests.mail import build
from tests.web.conftest import Held, hold, signed_in, token


class Elements(HTMLParser):
    """Every element with its attributes, as a browser's parser sees them."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.script_text: list[str] = []
        self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text.append(data)


def assert_inert(text: str, *, allow_console_script: bool = True) -> None:
    parsed = Elements(text)
    for tag, attrs in parsed.elements:
        handlers = [a for a in attrs if a.lower().startswith("on")]
        assert not handlers, (tag, attrs)
        for name in ("href", "src", "action", "formaction", "data"):
            value = (attrs.get(name) or "").strip().lower()
            assert not value.startswith(("javascript:", "http:", "https:", "//")), (tag, attrs)
        if tag == "script":
            assert allow_console_script and attrs == {"src": "/static/console.js", "defer": None}, attrs
        if tag == "iframe":
            assert "sandbox" in attrs and attrs["sandbox"] in ("", None), attrs
        assert tag not in ("object", "embed", "base", "style"), tag
    assert not "".join(parsed.script_text).strip()


def test_the_list_shows_a_hostile_subject_as_text(tech: Any, held: Held) -> None:
    page = tech.get("/quarantine").text
    assert_inert(page)
    assert "&lt;script&gt;alert(&#39;subject&#39;)&lt;/script&gt; Urgent \\u202eexe.pdf" in page
    assert "\u202e" not in page  # a bidi override cannot reorder the page
    row = re.search(r'<tr data-id="RB-HOST-0002"[^>]*>.*?</tr>', page, re.S)
    assert row and '<a href="/quarantine/RB-HOST-0002">RB-HOST-0002</a>' in row.group(0)
    # Evidence is not in the list.
    assert "f***ing" not in page


def test_the_message_page_is_inert_and_masks_evidence_until_opened(
    tech: Any, held: Held, store: Store
) -> None:
    page = tech.get(f"/quarantine/{held.hostile}").text
    assert_inert(page)
    assert "f***ing" not in page
    assert "shown once the message is opened with a reason" in page
    # Attachments: the hostile name is text, with type, size and its finding.
    assert "&lt;script&gt;alert(&#34;name&#34;)&lt;/script&gt;&#34;onmouseover=&#34;x.exe" in page
    assert "application/octet-stream" in page
    assert "a program (executable) is attached" in page
    assert "view_body" not in {e.action for e in store.audit_entries()}

    opened = tech.post(
        f"/quarantine/{held.hostile}/open", data={"csrf_token": token(tech), "reason": "phishing report"}
    )
    assert opened.status_code == 200
    assert_inert(opened.text)
    assert "f***ing" in opened.text
    # Body text, headers and link targets are shown as escaped text.
    assert "Hello &lt;script&gt;alert(&#39;text&#39;)&lt;/script&gt; see below" in opened.text
    assert "&lt;script&gt;alert(&#39;header&#39;)&lt;/script&gt;" not in opened.text  # X-Evil is not shown
    assert "&lt;b onmouseover=x&gt;" in opened.text  # Reply-To is, escaped
    assert '<code class="wrap">https://evil.example/phish</code>' in opened.text
    assert f'<iframe class="mailframe" sandbox src="/quarantine/{held.hostile}/html"' in opened.text
    assert opened.headers["cache-control"] == "no-store"
    entry = store.audit_entries(action="view_body")[0]
    assert (entry.actor, entry.target, entry.reason, entry.details["via"]) == (
        "tech",
        held.hostile,
        "phishing report",
        "web",
    )


def test_the_html_view_is_sanitised_and_sandboxed(tech: Any, held: Held) -> None:
    tech.post(f"/quarantine/{held.hostile}/open", data={"csrf_token": token(tech), "reason": "check links"})
    response = tech.get(f"/quarantine/{held.hostile}/html")
    assert response.status_code == 200
    assert response.headers["content-security-policy"] == MAIL_HTML_CSP
    assert response.headers["content-security-policy"].startswith(
        "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    )
    assert response.headers["x-frame-options"] == "SAMEORIGIN"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    html = response.text
    assert_inert(html, allow_console_script=False)
    assert "evil.example" not in html
    assert "<script" not in html.lower() and "alert(" not in html.replace("ipt&gt;alert(5)", "")
    parsed = Elements(html)
    tags = {t for t, _ in parsed.elements}
    assert not tags & {"script", "iframe", "form", "input", "link", "style", "object", "svg", "meta"} - {
        "meta"
    }
    assert '<img src="data:image/png;base64,iVBORw0KGgo=">' in html  # embedded images stay
    assert "<h1>Invoice</h1>" in html and "click here" in html


def test_the_html_view_needs_a_recent_open_in_this_session(
    app: Any, tech: Any, held: Held, monkeypatch: Any
) -> None:
    assert tech.get(f"/quarantine/{held.hostile}/html").status_code == 403
    tech.post(f"/quarantine/{held.hostile}/open", data={"csrf_token": token(tech), "reason": "check"})
    assert tech.get(f"/quarantine/{held.hostile}/html").status_code == 200
    # Another technician who did not open it, and the same one in a new session: no.
    assert signed_in(app, "tech2").get(f"/quarantine/{held.hostile}/html").status_code == 403
    assert signed_in(app, "tech").get(f"/quarantine/{held.hostile}/html").status_code == 403
    # Ten minutes on, the view is over.
    import datetime as dt

    monkeypatch.setattr(views, "OPEN_WINDOW", dt.timedelta(0))
    assert tech.get(f"/quarantine/{held.hostile}/html").status_code == 403


def test_opening_needs_a_reason(tech: Any, held: Held, store: Store) -> None:
    response = tech.post(f"/quarantine/{held.plain}/open", data={"csrf_token": token(tech), "reason": "  "})
    assert response.status_code == 400
    assert "Give a reason" in response.text
    assert "PLAIN-BODY" not in response.text
    assert not store.audit_entries(action="view_body")


def test_a_deleted_body_cannot_be_opened(tech: Any, held: Held) -> None:
    response = tech.post(
        f"/quarantine/{held.released}/open", data={"csrf_token": token(tech), "reason": "look"}
    )
    assert response.status_code == 410
    assert "is gone" in response.text


def test_an_attachment_is_shown_behind_a_warning(tech: Any, held: Held, store: Store) -> None:
    page = tech.get(f"/quarantine/{held.hostile}/attachments/1")
    assert page.status_code == 200
    assert_inert(page.text)
    assert "may be harmful" in page.text
    assert "a program (executable) is attached" in page.text
    assert "Detected type" in page.text
    assert not store.audit_entries(action="view_body")

    # Without the confirmation: no file, back to the warning.
    refused = tech.post(
        f"/quarantine/{held.hostile}/attachments/1/download", data={"csrf_token": token(tech), "reason": "r"}
    )
    assert refused.status_code == 303
    assert not store.audit_entries(action="view_body")

    response = tech.post(
        f"/quarantine/{held.hostile}/attachments/1/download",
        data={"csrf_token": token(tech), "confirm": "yes", "reason": "send to the antivirus vendor"},
    )
    assert response.status_code == 200
    assert response.content == b"MZ\x90\x00 not really a program"
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["x-content-type-options"] == "nosniff"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="')
    assert "<" not in disposition.split("filename*=")[0] and "\n" not in disposition
    entry = store.audit_entries(action="view_body")[0]
    assert entry.actor == "tech"
    assert entry.reason == "attachment 1 download: send to the antivirus vendor"


def test_a_download_without_a_reason_takes_the_reason_given_at_opening(
    tech: Any, held: Held, store: Store
) -> None:
    url = f"/quarantine/{held.hostile}/attachments/1/download"
    assert tech.post(url, data={"csrf_token": token(tech), "confirm": "yes"}).status_code == 303
    tech.post(f"/quarantine/{held.hostile}/open", data={"csrf_token": token(tech), "reason": "incident 42"})
    response = tech.post(url, data={"csrf_token": token(tech), "confirm": "yes"})
    assert response.status_code == 200
    assert store.audit_entries(action="view_body")[0].reason == "attachment 1 download: incident 42"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Windows\\evil.exe", "evil.exe"),
        ("a\r\nSet-Cookie: x=1.txt", "aSet-Cookie: x=1.txt"),
        ("\u202etxt.exe", "txt.exe"),
        ("...", "attachment-3.bin"),
        ("", "attachment-3.bin"),
    ],
)
def test_download_names_cannot_escape_or_break_the_header(name: str, expected: str) -> None:
    assert download_name(name, 3) == expected
    header = content_disposition(download_name(name, 3))
    assert "\r" not in header and "\n" not in header


def test_sanitize_removes_every_remote_reference() -> None:
    cleaned = sanitize_html(
        '<div style="background:url(http://x.example/a)">a</div><img src="http://x.example/i.png">'
        '<img src="data:image/svg+xml;base64,PHN2Zz4=" alt="svg"><a href="https://x.example">l</a>'
        '<table background="http://x.example/b.png"><tr><td>c</td></tr></table>'
        '<blockquote cite="http://x.example">q</blockquote><p style="color:red;position:fixed">p</p>'
    )
    assert "x.example" not in cleaned
    assert "svg+xml" not in cleaned
    assert '<p style="color:red">p</p>' in cleaned


def _mime(parts: list[tuple[str, str]], subtype: str) -> bytes:
    """A hand-made multipart body: (content type, text) per part."""
    boundary = f"=={subtype}=="
    lines = [f'Content-Type: multipart/{subtype}; boundary="{boundary}"', ""]
    for ctype, text in parts:
        lines += [f"--{boundary}", f"Content-Type: {ctype}", "", text]
    return "\n".join([*lines, f"--{boundary}--", ""]).encode()


ALTERNATIVE = build(
    body="Mr Hughes,\n\nThe PLAIN part of the message.\n",
    html="<p>Mr Hughes,</p><p>The <b>HTML</b> part of the message.</p>"
    '<p style="display:none">HIDDEN-IN-HTML</p><a href="https://x.example/a">a link</a>',
)


@pytest.mark.parametrize(
    ("raw", "shown", "not_shown"),
    [
        # multipart/alternative: the plain part only, once.
        (ALTERNATIVE, ["The PLAIN part of the message."], ["HTML part"]),
        # An HTML-only message: its visible text.
        (build(body=None, html="<p>Only <i>HTML</i> here</p>"), ["Only HTML here"], []),
        # An empty plain alternative: the HTML's text instead.
        (build(body="\n", html="<p>The real text</p>"), ["The real text"], []),
        # Plain, then HTML with inline images (multipart/related): still the plain part.
        (
            b"From: a@b.example\nMIME-Version: 1.0\n"
            + _mime(
                [
                    ("text/plain", "PLAIN-ALT"),
                    (
                        'multipart/related; boundary="rel"',
                        "--rel\nContent-Type: text/html\n\n<p>HTML-ALT</p>\n--rel--",
                    ),
                ],
                "alternative",
            ),
            ["PLAIN-ALT"],
            ["HTML-ALT"],
        ),
        # HTML and a calendar invitation, no plain part: the HTML, not the calendar.
        (
            b"From: a@b.example\nMIME-Version: 1.0\n"
            + _mime(
                [("text/html", "<p>HTML-INVITE</p>"), ("text/calendar", "BEGIN:VCALENDAR")], "alternative"
            ),
            ["HTML-INVITE"],
            ["VCALENDAR"],
        ),
        # multipart/mixed is not a choice: every body part shows, in order.
        (
            b"From: a@b.example\nMIME-Version: 1.0\n"
            + _mime([("text/plain", "FIRST-PART"), ("text/html", "<p>SECOND-PART</p>")], "mixed"),
            ["FIRST-PART", "SECOND-PART"],
            [],
        ),
    ],
    ids=["alternative", "html-only", "empty-plain", "related-html", "calendar", "mixed"],
)
def test_the_text_view_shows_one_alternative(raw: bytes, shown: list[str], not_shown: list[str]) -> None:
    view = text_view(raw)
    for text in shown:
        assert view.visible.count(text) == 1, (text, view.visible)
    for text in not_shown:
        assert text not in view.visible, (text, view.visible)
        assert text in Message(raw).visible_text  # the detectors still see every part


def test_the_text_view_keeps_the_html_signals_of_a_skipped_alternative() -> None:
    view = text_view(ALTERNATIVE)
    assert view.visible.count("Mr Hughes,") == 1
    assert "HIDDEN-IN-HTML" in view.hidden and "HIDDEN-IN-HTML" not in view.visible
    assert ("https://x.example/a", "a link") in view.links
    assert view.has_html


def test_an_opened_alternative_message_shows_its_text_once(tech: Any, store: Store) -> None:
    message_id = hold(
        store,
        "RB-ALT0-0006",
        ALTERNATIVE,
        sender="parent@outside.example",
        rcpt=("j.hughes@redborne.example",),
        findings=[],
        subject="Both parts",
    )
    opened = tech.post(f"/quarantine/{message_id}/open", data={"csrf_token": token(tech), "reason": "check"})
    assert opened.status_code == 200
    text = re.search(r'<pre class="mailtext">(.*?)</pre>', opened.text, re.S)
    assert text, opened.text
    assert text.group(1).count("Mr Hughes,") == 1
    assert "The PLAIN part of the message." in text.group(1) and "HTML" not in text.group(1)
