"""Reports of offensive mail (policy 5.7): read a forwarded message and propose what to block.

Staff forward offensive mail they received to a report address. `parse_report` finds the
original in the report - attached as message/rfc822 (or an .eml file), or forwarded inline
by Gmail, Outlook, Thunderbird, Apple Mail or mutt - and proposes block indicators (sender,
sender's domain, links, a fingerprint of the text) for a technician to approve. Nothing here
blocks anything, and nothing raises: a report is mail written by people, in any shape.

`text_fingerprint` is also what the blocking check computes on every incoming message, so it
is one cheap normalisation pass plus a hash, and it ignores what forwarding does to text
(quoting, re-wrapping, whitespace).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import quopri
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from email import policy
from email.generator import BytesGenerator
from email.message import Message as StdMessage
from email.parser import BytesParser
from typing import Literal

from milter.context import domain_of
from milter.message import MAX_PART_DEPTH, MAX_PARTS, Message
from milter.urls import extract_urls, registrable_domain, url_host

__all__ = ["FREE_MAIL_DOMAINS", "Indicator", "Report", "parse_report", "text_fingerprint"]

# Blocking one of these domains would block a large share of parents and the public, so a
# report proposes the sender's address there, never the domain. Callers can pass their own
# list (from rules/) through `parse_report(free_mail=...)`.
FREE_MAIL_DOMAINS = frozenset(
    {
        "gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "hotmail.co.uk", "live.com",
        "yahoo.com", "yahoo.co.uk", "icloud.com", "aol.com", "proton.me", "protonmail.com",
    }
)  # fmt: skip

# Under this many normalised characters a text is too generic ("thanks, see you soon") to block on.
MIN_FINGERPRINT_CHARS = 40
# A report with more links than this is more likely a newsletter than one offensive message;
# a technician can't judge hundreds of proposals anyway.
MAX_URL_INDICATORS = 20

IndicatorKind = Literal["sender", "domain", "url", "fingerprint"]


@dataclass(frozen=True)
class Indicator:
    """One proposed block: what to match and a note for the technician (never message text)."""

    kind: IndicatorKind
    value: str
    note: str


@dataclass(frozen=True)
class Report:
    """What a report says about the message it reports."""

    reporter: str | None
    original_message_id: str | None
    original_from: str | None
    # Subject and raw bytes are message content: kept out of repr so a logged Report leaks none (2.4).
    original_subject: str | None = field(repr=False)
    original: bytes | None = field(repr=False)
    indicators: tuple[Indicator, ...]


# --- fingerprint ---------------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[\W_]+")
# Invisible characters are dropped rather than spaced: a reader sees "word", not "wo rd",
# and spam inserts them inside words to defeat exact matching.
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u200b\u200c\u200d\u2060\ufeff"))
# The same collapse for ASCII text, about three times faster than the regex: most mail is ASCII.
_ASCII_NON_ALNUM = str.maketrans({chr(c): " " for c in range(128) if not chr(c).isalnum()})


def _fingerprint_text(text: str) -> str | None:
    # Punctuation, quoting marks ("> ") and every kind of whitespace or line break collapse
    # to one space, so re-wrapping and quoting by a forwarding client change nothing.
    if text.isascii():
        normal = " ".join(text.lower().translate(_ASCII_NON_ALNUM).split())
    else:
        # NFKC folds full-width and compatibility forms; ASCII is already in NFKC.
        text = unicodedata.normalize("NFKC", text.translate(_INVISIBLE))
        normal = _NON_ALNUM.sub(" ", text.casefold()).strip()
    if len(normal) < MIN_FINGERPRINT_CHARS:
        return None
    # "t1" names this normalisation: changing it needs a new prefix, so that stored block
    # entries are never compared with fingerprints made another way.
    return "t1:" + hashlib.sha256(normal.encode("utf-8")).hexdigest()[:32]


def text_fingerprint(message: Message) -> str | None:
    """A stable fingerprint ("t1:" + 32 hex digits) of the message's visible text, or None if too short.

    The text is `Message.visible_text` (plain parts and the visible text of HTML parts). The
    subject and headers are not part of it: forwarding rewrites them ("Fwd:").
    """
    return _fingerprint_text(message.visible_text)


# --- the original, attached ----------------------------------------------------------------


def _serialise(inner: StdMessage, encoding: str) -> bytes | None:
    """The bytes of an attached message (re-generated: the parser keeps no byte offsets)."""
    buffer = io.BytesIO()
    try:
        BytesGenerator(buffer, mangle_from_=False, policy=policy.compat32).flatten(inner)
    except Exception:
        return None
    data = buffer.getvalue()
    # message/rfc822 must not be encoded (RFC 2046 5.2.1), but some clients do; the stdlib
    # then parses the encoded text as if it were the message, so decode what it held.
    if encoding == "base64":
        try:
            return base64.b64decode(b"".join(data.split()))
        except (binascii.Error, ValueError):
            return None
    if encoding == "quoted-printable":
        return quopri.decodestring(data)
    return data


def _attached_original(raw: bytes) -> bytes | None:
    """The first message attached to the report, as message/rfc822 or as an .eml file."""
    try:
        root = BytesParser(policy=policy.compat32).parsebytes(raw)
    except Exception:  # the stdlib parser very rarely crashes (deep nesting); then nothing is attached
        return None
    stack: list[tuple[StdMessage, int]] = [(root, 0)]
    seen = 0
    while stack and seen < MAX_PARTS:
        part, depth = stack.pop()
        seen += 1
        payload = part.get_payload()
        if part.get_content_type() == "message/rfc822" and depth > 0:
            if isinstance(payload, list) and payload and isinstance(payload[0], StdMessage):
                encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
                return _serialise(payload[0], encoding)
            continue
        if isinstance(payload, list):
            if depth < MAX_PART_DEPTH:
                stack.extend((p, depth + 1) for p in reversed(payload) if isinstance(p, StdMessage))
            continue
        try:
            filename = part.get_filename() or ""
            data = part.get_payload(decode=True) if str(filename).lower().endswith(".eml") else None
        except Exception:
            continue
        if isinstance(data, bytes) and data:
            return data
    return None


# --- the original, forwarded inline --------------------------------------------------------

# The line each client puts before the forwarded header block:
# Gmail "---------- Forwarded message ---------", Thunderbird "-------- Forwarded Message --------",
# mutt "----- Forwarded message from ... -----", Outlook "-----Original Message-----" or a rule
# of underscores, Apple Mail "Begin forwarded message:".
_MARKER = re.compile(
    r"-{2,}\s*(?:forwarded message\b.*|original message\s*-{2,})|_{10,}|begin forwarded message:",
    re.IGNORECASE,
)
_END_MARKER = re.compile(r"-{2,}\s*end (?:of )?forwarded message\s*-{2,}", re.IGNORECASE)
_HEADER_LINE = re.compile(
    r"(from|sent|date|to|cc|bcc|subject|reply-to|message-id|organization|newsgroups)[ \t]*:[ \t]*(.*)",
    re.IGNORECASE,
)
_QUOTE = re.compile(r"^(?:[ \t]*>)+[ \t]?", re.MULTILINE)
_ANGLE_ADDRESS = re.compile(r"<\s*(?:mailto:)?([^<>\s@]+@[^<>\s@]+)\s*>", re.IGNORECASE)
_BARE_ADDRESS = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")
_FORWARD_PREFIX = re.compile(r"^(?:\s*fwd?\s*:\s*)+", re.IGNORECASE)


@dataclass(frozen=True)
class _Inline:
    headers: dict[str, str]
    text: str


def _header_block(lines: list[str], start: int) -> tuple[dict[str, str], int]:
    """The forwarded header block starting at or after `start`, and the index of the first body line."""
    i, end = start, len(lines)
    while i < end and not lines[i].strip():
        i += 1
    headers: dict[str, str] = {}
    last = ""
    while i < end:
        line = lines[i]
        match = _HEADER_LINE.match(line.strip())
        if match:
            last = match.group(1).lower()
            headers.setdefault(last, match.group(2).strip())
        elif (
            headers
            and line.strip()
            and (line[:1] in " \t" or (last in ("to", "cc", "bcc") and headers[last].endswith((",", ";"))))
        ):
            # A folded header, or a long recipient list the client wrapped after a separator.
            headers[last] = f"{headers[last]} {line.strip()}"
        else:
            break
        i += 1
    return headers, i


def _inline_original(text: str) -> _Inline | None:
    """The header block and text of a message forwarded inline, if the report holds one."""
    lines = _QUOTE.sub("", text).splitlines()
    found: tuple[dict[str, str], int] | None = None
    for index, line in enumerate(lines):
        stripped = line.strip()
        if _MARKER.fullmatch(stripped):
            headers, body = _header_block(lines, index + 1)
            if headers:
                found = headers, body
                break
        elif stripped[:5].lower() == "from:" and found is None:
            # No marker (Outlook's HTML forward draws its rule as a border, not as text):
            # a From line heading a block of at least two forwarded headers will do.
            headers, body = _header_block(lines, index)
            if len(headers) >= 2:
                found = headers, body
                break
    if found is None:
        return None
    headers, body = found
    kept: list[str] = []
    for line in lines[body:]:
        if _END_MARKER.fullmatch(line.strip()):
            break
        kept.append(line)
    return _Inline(headers, "\n".join(kept))


def _address(value: str) -> str | None:
    """The address in a forwarded From line: "Name <a@b>", "Name [mailto:a@b]" or "a@b"."""
    match = _ANGLE_ADDRESS.search(value) or _BARE_ADDRESS.search(value)
    if match is None:
        return None
    address = (match.group(1) if match.lastindex else match.group()).lower().strip(".")
    return address if "@" in address else None


# --- indicators ----------------------------------------------------------------------------

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_WEB_SCHEMES = frozenset({"http", "https", "ftp", "ftps", "ws", "wss"})
_AUTHORITY_END = re.compile(r"[/\\?#]")


def normal_url(url: str) -> tuple[str, str] | None:
    """(scheme://host/path, host): canonical host, no query or fragment (those vary per recipient)."""
    host = url_host(url)
    if host is None:
        return None
    text = url.strip()
    scheme_match = _SCHEME.match(text)
    scheme = "http"  # bare "www.example.com/x" and "//example.com/x" are read as web links
    if scheme_match and scheme_match.group(1).lower() in _WEB_SCHEMES:
        scheme = scheme_match.group(1).lower()
        text = text[scheme_match.end() :]
    text = text.lstrip("/\\")
    end = _AUTHORITY_END.search(text)
    path = re.split(r"[?#]", text[end.start() :], maxsplit=1)[0].replace("\\", "/") if end else ""
    shown_host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown_host}{path or '/'}", host


def _within(host: str, domains: frozenset[str]) -> bool:
    """Whether a host is one of the domains or a subdomain of one."""
    while host:
        if host in domains:
            return True
        host = host.partition(".")[2]
    return False


def _indicators(
    sender: str | None,
    urls: Iterable[str],
    fingerprint: str | None,
    *,
    how: str,
    school_domains: frozenset[str],
    free_mail: frozenset[str],
) -> tuple[Indicator, ...]:
    found: list[Indicator] = []
    sender_domain = domain_of(sender)
    if sender and sender_domain and not _within(sender_domain, school_domains):
        found.append(Indicator("sender", sender, f"From address of the {how}"))
        domain = registrable_domain(sender_domain)
        if domain and domain not in free_mail and sender_domain not in free_mail:
            found.append(Indicator("domain", domain, f"sender's domain, from the {how}"))
    seen: set[str] = set()
    for url in urls:
        normal = normal_url(url)
        if normal is None or normal[0] in seen or _within(normal[1], school_domains):
            continue
        seen.add(normal[0])
        found.append(Indicator("url", normal[0], f"link in the {how}"))
        if len(seen) >= MAX_URL_INDICATORS:
            break
    if fingerprint:
        found.append(Indicator("fingerprint", fingerprint, f"normalised text of the {how}"))
    return tuple(found)


def _domains(names: Iterable[str]) -> frozenset[str]:
    return frozenset(name.strip().strip(".").lower() for name in names if name.strip().strip("."))


def parse_report(
    raw: bytes,
    *,
    reporter: str | None = None,
    school_domains: frozenset[str] = frozenset(),
    free_mail: frozenset[str] = FREE_MAIL_DOMAINS,
) -> Report:
    """Read a report of offensive mail and propose block indicators for what it reports.

    `reporter` (the authenticated sender, say) takes precedence over the report's From.
    Senders and links in `school_domains` (or their subdomains) are never proposed, and
    domains in `free_mail` are proposed only as single addresses. Never raises.
    """
    report = Message(raw)
    who = reporter.strip().lower() if reporter and reporter.strip() else report.from_address
    schools, free = _domains(school_domains), _domains(free_mail)

    attached = _attached_original(raw)
    if attached is not None:
        original = Message(attached)
        return Report(
            reporter=who,
            original_message_id=original.header("message-id") or None,
            original_from=original.from_address,
            original_subject=original.header("subject"),
            original=attached,
            indicators=_indicators(
                original.from_address,
                [*extract_urls(original.visible_text), *(link.href for link in original.html_links)],
                text_fingerprint(original),
                how="attached message",
                school_domains=schools,
                free_mail=free,
            ),
        )

    # Forwarding clients send the plain alternative with the header block as lines; an
    # HTML-only report is read through its visible text.
    inline = _inline_original(report.plain_text or report.visible_text)
    if inline is None:
        return Report(who, None, None, None, None, ())
    sender = _address(inline.headers.get("from", ""))
    subject = inline.headers.get("subject")
    if not subject and _FORWARD_PREFIX.match(report.subject):
        # No Subject line in the forwarded block: the client put the original's after "Fwd:".
        subject = _FORWARD_PREFIX.sub("", report.subject).strip()
    return Report(
        reporter=who,
        original_message_id=inline.headers.get("message-id") or None,
        original_from=sender,
        original_subject=subject or None,
        original=None,
        indicators=_indicators(
            sender,
            extract_urls(inline.text),
            _fingerprint_text(inline.text),
            how="inline forward",
            school_domains=schools,
            free_mail=free,
        ),
    )
