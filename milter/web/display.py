"""Safe display of held mail: a text view, sanitised HTML for a sandboxed frame, attachments.

The message's own HTML never reaches a console page. The page shows text (escaped by the
templates); the HTML, cleaned by nh3 with every link and remote reference removed, goes
only to a sandboxed frame under its own Content-Security-Policy.
"""

from __future__ import annotations

import email.policy
import re
import unicodedata
from dataclasses import dataclass
from email.message import Message as StdMessage
from email.parser import BytesParser
from typing import Any
from urllib.parse import quote

import nh3
from markupsafe import Markup, escape

from milter.message import _HUGE_TAG, MAX_PART_DEPTH, MAX_PARTS, TEXT_SCAN_LIMIT, Message, _decode_bytes
from milter.textview import html_view

# The most text a page shows; the rest is there in the download, not on screen.
TEXT_LIMIT = 200_000
HTML_LIMIT = 2_000_000
SHOWN_HEADERS = ("From", "Reply-To", "To", "Cc", "Date", "Subject", "Message-ID", "Return-Path")

_TAGS = set(nh3.ALLOWED_TAGS) - {"a", "area", "map", "img"} | {"a", "img", "font"}
_ATTRIBUTES: dict[str, set[str]] = {
    "*": {"style", "title", "lang", "dir", "align"},
    "a": set(),  # no href: nothing in the frame goes anywhere
    "img": {"src", "alt", "width", "height"},
    "td": {"colspan", "rowspan", "width", "height", "valign", "bgcolor"},
    "th": {"colspan", "rowspan", "width", "height", "valign", "bgcolor", "scope"},
    "table": {"width", "cellpadding", "cellspacing", "border", "bgcolor"},
    "tr": {"valign", "bgcolor"},
    "col": {"span", "width"},
    "colgroup": {"span", "width"},
    "ol": {"start"},
    "font": {"color", "size", "face"},
    "bdo": {"dir"},
}
# Layout and colour only: nothing positions itself over the page, nothing names a URL.
_STYLE_PROPERTIES = {
    "color",
    "background-color",
    "font-family",
    "font-size",
    "font-style",
    "font-weight",
    "text-align",
    "text-decoration",
    "text-transform",
    "line-height",
    "letter-spacing",
    "vertical-align",
    "white-space",
    "width",
    "max-width",
    "min-width",
    "height",
    "margin",
    "margin-top",
    "margin-bottom",
    "margin-left",
    "margin-right",
    "padding",
    "padding-top",
    "padding-bottom",
    "padding-left",
    "padding-right",
    "border",
    "border-top",
    "border-bottom",
    "border-left",
    "border-right",
    "border-color",
    "border-style",
    "border-width",
    "border-collapse",
    "border-spacing",
    "border-radius",
}
_DATA_IMAGE = re.compile(r"^data:image/(png|gif|jpeg|jpg|webp|bmp);base64,[a-z0-9+/=\s]*$", re.IGNORECASE)


def _attribute_filter(tag: str, attribute: str, value: str) -> str | None:
    if attribute == "src":
        # Embedded images only: a remote image is a read receipt for the sender.
        return value if _DATA_IMAGE.match(value.strip()) else None
    if attribute in ("href", "action", "background", "cite", "poster", "srcset", "formaction"):
        return None
    if attribute == "style" and ("url(" in value.lower() or "expression(" in value.lower()):
        return None
    return value


def sanitize_html(html: str) -> str:
    """The HTML with no script, no event handler, no link target and no remote reference."""
    return nh3.clean(
        html[:HTML_LIMIT],
        tags=_TAGS,
        clean_content_tags={"script", "style", "title", "noscript", "template", "textarea", "select"},
        attributes=_ATTRIBUTES,
        attribute_filter=_attribute_filter,
        strip_comments=True,
        link_rel=None,
        url_schemes={"data"},
        url_relative="deny",
        filter_style_properties=_STYLE_PROPERTIES,
    )


def html_document(raw: bytes) -> str | None:
    """A whole document for the sandboxed frame: every HTML body part, sanitised; None if none."""
    parts = html_parts(raw)
    if not parts:
        return None
    body = "\n<hr>\n".join(sanitize_html(p) for p in parts)
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        '<meta name="referrer" content="no-referrer"><title>Message</title></head>'
        f"<body>{body}</body></html>\n"
    )


def _parse(raw: bytes) -> StdMessage:
    return BytesParser(policy=email.policy.compat32).parsebytes(raw)


def _decode(part: StdMessage) -> str:
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")


def html_parts(raw: bytes) -> list[str]:
    """The decoded text/html body parts (not attachments)."""
    try:
        parsed = _parse(raw)
        out = []
        for part in parsed.walk():
            if part.is_multipart() or part.get_content_type() != "text/html":
                continue
            if part.get_content_disposition() == "attachment" or part.get_filename():
                continue
            out.append(_decode(part))
        return out
    except Exception:
        # Malformed MIME shows no HTML rather than an error page; the text view still works.
        return []


@dataclass(frozen=True)
class TextView:
    headers: tuple[tuple[str, str], ...]
    visible: str
    hidden: str
    links: tuple[tuple[str, str], ...]
    has_html: bool
    truncated: bool


def _clip(text: str) -> tuple[str, bool]:
    return (text[:TEXT_LIMIT], True) if len(text) > TEXT_LIMIT else (text, False)


def printable(text: str) -> str:
    """Text with control and bidi-override characters made visible: nothing reorders the page."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for ch in text:
        if ch in "\n\t":
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf"):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _leaf_text(part: StdMessage) -> tuple[str, str] | None:
    """(subtype, what a reader sees) of a body text part; None for anything else.

    Decoded as milter.message decodes it for the detectors (same charset fallbacks); HTML
    becomes its visible text.
    """
    if part.get_content_maintype() != "text":
        return None
    filename = Message._filename(part)
    if Message._is_attachment(part, filename):
        return None
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if not isinstance(data, bytes):
        payload = part.get_payload()
        data = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else b""
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    text, _ = _decode_bytes(data[:TEXT_SCAN_LIMIT], charset)
    subtype = part.get_content_subtype()
    if subtype == "html":
        text = html_view(_HUGE_TAG.sub(" ", text)).visible
    return subtype, text


def _shown_texts(root: StdMessage) -> list[str]:
    """The body texts a mail client shows, in order: of each multipart/alternative only one
    child, the text/plain one when it has text, else the HTML (or the part holding it).

    Message.visible_text keeps every alternative (the detectors must see them all); shown
    together they repeat the body.
    """
    budget = MAX_PARTS

    def walk(part: StdMessage, depth: int) -> list[tuple[str, str]]:
        nonlocal budget
        budget -= 1
        if budget < 0:
            return []
        payload = part.get_payload()
        if part.is_multipart() and isinstance(payload, list):
            if depth >= MAX_PART_DEPTH:
                return []
            children = [walk(p, depth + 1) for p in payload if isinstance(p, StdMessage)]
            if part.get_content_type() != "multipart/alternative":
                return [piece for child in children for piece in child]
            filled = [c for c in children if any(text.strip() for _, text in c)]
            for wanted in ("plain", "html"):
                for child in filled:
                    if child[0][0] == wanted:
                        return child
            return filled[-1] if filled else []  # RFC 2046: the last is the sender's preferred
        leaf = _leaf_text(part)
        return [leaf] if leaf else []

    return [text for _, text in walk(root, 0) if text]


def shown_text(raw: bytes, message: Message | None = None) -> str:
    """The body as the console's text view shows it: one alternative of each multipart/
    alternative. Falls back to every part (Message.visible_text) when the structure gives
    nothing, so no text a detector saw is ever hidden from the reviewer."""
    message = message or Message(raw)
    try:
        texts = _shown_texts(message._parsed)  # parsed once, as the detectors parse it
    except Exception:
        texts = []
    return "\n".join(texts) if any(t.strip() for t in texts) else message.visible_text


def text_view(raw: bytes) -> TextView:
    message = Message(raw)
    visible, cut_visible = _clip(shown_text(raw, message))
    hidden, cut_hidden = _clip(message.hidden_text)
    headers = []
    for name in SHOWN_HEADERS:
        for value in message.headers(name):
            headers.append((name, printable(value)[:2000]))
    links = tuple(
        (printable(link.href)[:2000], printable(link.text)[:500]) for link in message.html_links[:200]
    )
    return TextView(
        tuple(headers),
        printable(visible),
        printable(hidden),
        links,
        message.has_html,
        cut_visible or cut_hidden,
    )


@dataclass(frozen=True)
class AttachmentInfo:
    number: int  # 1-based, as in the URL
    name: str
    content_type: str
    size: int
    findings: tuple[dict[str, Any], ...]


def _about(finding: dict[str, Any], name: str) -> bool:
    if "attachment" not in str(finding.get("location", "")):
        return False
    evidence = [str(e) for e in finding.get("evidence", [])]
    key = name or "(unnamed)"
    return any(e == key or e.startswith(key + "/") or e.startswith(key + ":") for e in evidence)


def attachments(raw: bytes, findings: tuple[dict[str, Any], ...]) -> list[AttachmentInfo]:
    """Each attachment with the findings that name it; findings about 'the attachments' in
    general (a virus found in the message) go with every attachment."""
    message = Message(raw)
    items = message.attachments
    named = {id(f) for f in findings for a in items if _about(f, a.filename)}
    general = tuple(f for f in findings if "attachment" in str(f.get("location", "")) and id(f) not in named)
    out = []
    for n, item in enumerate(items, 1):
        mine = tuple(f for f in findings if _about(f, item.filename))
        out.append(AttachmentInfo(n, printable(item.filename), item.content_type, item.size, mine + general))
    return out


def attachment_payload(raw: bytes, number: int) -> tuple[str, bytes] | None:
    items = Message(raw).attachments
    if not 1 <= number <= len(items):
        return None
    item = items[number - 1]
    return item.filename, item.payload()


def download_name(name: str, number: int) -> str:
    """A file name that cannot escape a folder or break the header; the header quotes it too."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] not in ("C", "Z") or ch == " ")
    base = base.strip(" .")[:150]
    return base or f"attachment-{number}.bin"


def content_disposition(name: str) -> str:
    ascii_name = "".join(ch if 32 <= ord(ch) < 127 and ch not in '"\\;' else "_" for ch in name)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


# Where a long address or target may break: before "@" and ".", after ":" and "/".
_BREAK = re.compile(r"(?<=.)(?=[@.])|(?<=[:/])(?=.)")


def breakable(value: object) -> Markup:
    """The value escaped, with a line-break opportunity (<wbr>) at each "@", "." ":" and "/":
    a long address in a narrow column breaks at its parts, not mid-word. Copying the text
    copies no extra characters."""
    return Markup(_BREAK.sub("<wbr>", str(escape(str(value)))))


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"
