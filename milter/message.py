"""Message: raw bytes parsed once, with lazy, never-raising access to what detectors need.

Detectors see headers, decoded subject, To/Cc recipients, text views and attachments
through this class only. Every accessor survives malformed input: a broken header or
part yields an empty value and a recorded defect, never an exception.
"""

from __future__ import annotations

import codecs
import email.errors
import email.feedparser
import email.header
import email.utils
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy
from email.feedparser import FeedParser
from email.message import Message as StdMessage
from functools import cached_property
from typing import Any

import charset_normalizer

from milter.textview import HtmlView, Link, html_view

# Text beyond this many characters per message is not scanned: it bounds CPU per message,
# and anything past it is still delivered or held whole; only detection stops there.
TEXT_SCAN_LIMIT = 2_000_000
# libxml2 slows down sharply on one tag with tens of thousands of attributes; no real
# mail has a tag this long, so such tags are blanked before parsing.
_HUGE_TAG = re.compile(r"<[^<>]{16384,}>")
# MIME nesting deeper than this is not walked (each level costs a Python frame in the stdlib).
MAX_PART_DEPTH = 40
MAX_PARTS = 2_000


@dataclass(frozen=True)
class Attachment:
    """A non-body part: something the reader opens rather than reads inline."""

    filename: str
    content_type: str
    size: int
    part: StdMessage

    def payload(self) -> bytes:
        try:
            data = self.part.get_payload(decode=True)
        except Exception:
            return b""
        return data if isinstance(data, bytes) else b""


@dataclass(frozen=True)
class Defect:
    """A structural fault in the MIME, named by the stdlib defect class (safe to log)."""

    name: str
    where: str


def _decode_bytes(data: bytes, declared: str | None) -> tuple[str, bool]:
    """Decode text with the declared charset, falling back when it is unknown or lies.

    Returns the text and whether a fallback was needed.
    """
    if declared:
        try:
            codecs.lookup(declared)
            return data.decode(declared), False
        except (LookupError, UnicodeDecodeError, ValueError):
            pass
    try:
        return data.decode("utf-8"), declared is not None and declared.lower() not in ("us-ascii", "ascii")
    except UnicodeDecodeError:
        pass
    # Detection is slow, and a guess from a few bytes is noise (a header word comes out
    # as Chinese), so only mid-sized text gets it; cp1252 decodes any byte sequence and
    # is the most common mislabelled charset in mail.
    if 64 <= len(data) <= 64_000:
        best = charset_normalizer.from_bytes(data).best()
        if best is not None:
            return str(best), True
    return data.decode("cp1252", errors="replace"), True


def _decode_header_value(value: str) -> str:
    """RFC 2047 decoding that tolerates unknown charsets, broken encoded words and raw 8-bit bytes."""
    if not value.isascii():
        # Raw 8-bit header bytes arrive as surrogate escapes; decode them as a body would be.
        raw = value.encode("utf-8", "surrogateescape")
        value = _decode_bytes(raw, None)[0]
    if "=?" not in value:
        return " ".join(value.split())
    try:
        pieces = email.header.decode_header(value)
    except Exception:
        return " ".join(value.split())
    out: list[str] = []
    for chunk, charset in pieces:
        if isinstance(chunk, str):
            out.append(chunk)
        else:
            out.append(_decode_bytes(chunk, charset)[0])
    return " ".join("".join(out).split())


# --- parsing ------------------------------------------------------------------------------
#
# The stdlib feed parser compiles a regular expression for every multipart boundary it meets
# (`re.compile('(?P<sep>' + re.escape(separator) + ...)`). Boundaries are unique per message,
# so that is a fresh compile, about 0.1 ms, per multipart: a third of the parse of a typical
# message. Our parser runs the stdlib's own parsing code unchanged, but with a `re` in which
# that one pattern is matched by `str.startswith` plus one precompiled pattern for the rest
# of the line: the same lines match, with the same `end` and `linesep` groups it reads. Any
# other pattern is compiled as usual. tests/test_speed_regressions.py holds the result to
# BytesParser's.

_BOUNDARY_HEAD = "(?P<sep>"
_BOUNDARY_TAIL = r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"
_AFTER_SEPARATOR = re.compile(_BOUNDARY_TAIL[1:])
_ESCAPED_CHAR = re.compile(r"\\(.)", re.S)


class _BoundaryPattern:
    """`re.compile(boundary pattern)` without the compile: only `match` is used."""

    __slots__ = ("_length", "_separator")

    def __init__(self, separator: str) -> None:
        self._separator = separator
        self._length = len(separator)

    def match(self, line: str) -> re.Match[str] | None:
        if not line.startswith(self._separator):
            return None
        return _AFTER_SEPARATOR.match(line, self._length)


def _compile(pattern: str, flags: int = 0) -> Any:
    if not flags and pattern.startswith(_BOUNDARY_HEAD) and pattern.endswith(_BOUNDARY_TAIL):
        escaped = pattern[len(_BOUNDARY_HEAD) : -len(_BOUNDARY_TAIL)]
        separator = _ESCAPED_CHAR.sub(r"\1", escaped)
        if re.escape(separator) == escaped:  # exactly the stdlib's pattern for this separator
            return _BoundaryPattern(separator)
    return re.compile(pattern, flags)


_re_for_parser = types.ModuleType("re")
_re_for_parser.__dict__.update(vars(re))
_re_for_parser.compile = _compile  # type: ignore[attr-defined]


_STDLIB_EOL = email.feedparser.NLCRE_eol  # type: ignore[attr-defined]


class _EolPattern:
    """`NLCRE_eol` (a line ending at the very end), searched from where a match can start.

    The stdlib searches each part's whole payload with it, trying every position of a long
    body; the match can only start at one of the last two characters, so the search starts
    there and finds the same match.
    """

    __slots__ = ()

    def search(self, text: str) -> re.Match[str] | None:
        return _STDLIB_EOL.search(text, max(0, len(text) - 2))  # type: ignore[no-any-return]


_stdlib_parsegen = FeedParser._parsegen  # type: ignore[attr-defined]
# Neither is in typeshed's stub of email.feedparser.
_NEED_MORE_DATA: object = email.feedparser.NeedMoreData  # type: ignore[attr-defined]
_BufferedSubFile: Any = email.feedparser.BufferedSubFile  # type: ignore[attr-defined]


class _LineBuffer(_BufferedSubFile):  # type: ignore[misc]
    """The stdlib's line buffer, asking its end-of-part predicates only about lines that can match.

    Every body line is checked against the boundary of each enclosing multipart: two or three
    Python calls a line, most of a leaf part's parse. When every predicate on the stack is a
    `_BoundaryPattern.match`, a line can only match if it starts with one of their separators,
    which one `str.startswith` with a tuple answers in C; only such lines go to the predicates.
    Any other predicate (the stdlib pushes a compiled regex for message/delivery-status) makes
    every line go to the predicates, as in the stdlib.
    """

    def __init__(self) -> None:
        super().__init__()
        # Separators of the predicates on the stack, or None when one is not a boundary.
        self._prefixes: tuple[str, ...] | None = ()

    def _restack(self) -> None:
        prefixes: list[str] = []
        for pred in self._eofstack:
            owner = getattr(pred, "__self__", None)
            if type(owner) is not _BoundaryPattern or pred.__func__ is not _BoundaryPattern.match:
                self._prefixes = None
                return
            prefixes.append(owner._separator)
        self._prefixes = tuple(prefixes)

    def push_eof_matcher(self, pred: Any) -> None:
        self._eofstack.append(pred)
        self._restack()

    def pop_eof_matcher(self) -> Any:
        pred = self._eofstack.pop()
        self._restack()
        return pred

    def readline(self) -> Any:
        lines = self._lines
        if not lines:
            return "" if self._closed else _NEED_MORE_DATA
        line = lines.popleft()
        prefixes = self._prefixes
        if prefixes is None or (prefixes and line.startswith(prefixes)):
            # RFC 2046: outer boundaries count at any depth, most nested first (as the stdlib).
            for ateof in reversed(self._eofstack):
                if ateof(line):
                    lines.appendleft(line)
                    return ""
        return line

    def __next__(self) -> Any:
        # readline() written out again: this runs once per body line.
        lines = self._lines
        if not lines:
            if self._closed:
                raise StopIteration
            return _NEED_MORE_DATA
        line = lines.popleft()
        prefixes = self._prefixes
        if prefixes is None or (prefixes and line.startswith(prefixes)):
            for ateof in reversed(self._eofstack):
                if ateof(line):
                    lines.appendleft(line)
                    raise StopIteration
        if not line:  # an end of input the parser pushed back with unreadline()
            raise StopIteration
        return line


# _LineBuffer relies on the stdlib buffer's private state; a Python whose buffer keeps it
# differently gets the stdlib's own buffer (slower, same result).
_LINE_BUFFER_FITS = all(hasattr(_BufferedSubFile(), name) for name in ("_lines", "_eofstack", "_closed"))


class _FeedParser(FeedParser):
    # The stdlib method itself, looking up `re` in a namespace of its own.
    _parsegen = types.FunctionType(
        _stdlib_parsegen.__code__,
        {**vars(email.feedparser), "re": _re_for_parser, "NLCRE_eol": _EolPattern()},
        _stdlib_parsegen.__name__,
        _stdlib_parsegen.__defaults__,
        _stdlib_parsegen.__closure__,
    )

    def __init__(self, *, policy: Any) -> None:
        super().__init__(policy=policy)
        if _LINE_BUFFER_FITS:
            self._input = _LineBuffer()


def _parse(raw: bytes) -> StdMessage:
    """What `BytesParser(policy=compat32).parsebytes(raw)` returns, step for step."""
    text = raw.decode("ascii", errors="surrogateescape")
    parser = _FeedParser(policy=policy.compat32)
    for start in range(0, len(text), 8192):  # the stdlib feeds 8192 characters at a time
        parser.feed(text[start : start + 8192])
    return parser.close()


class Message:
    """One message, parsed lazily from its raw bytes."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    @property
    def size(self) -> int:
        return len(self.raw)

    @cached_property
    def _parsed(self) -> StdMessage:
        try:
            # compat32 keeps headers as strings; policy.default builds a header object on
            # every access, which cost more than all the detectors together. Decoding
            # (RFC 2047, charsets) is done here instead, tolerantly.
            return _parse(self.raw)
        except Exception:
            # The stdlib parser is very tolerant; this guards the rare crash (deep recursion).
            fallback = StdMessage()
            fallback.set_payload(self.raw.decode("latin-1"))
            fallback.defects.append(ParserCrashed())
            return fallback

    @cached_property
    def _raw_headers(self) -> list[tuple[str, str]]:
        # raw_items() gives the unparsed values, so a header the policy cannot parse
        # never raises here; we decode RFC 2047 ourselves.
        try:
            return [(k.lower(), str(v)) for k, v in self._parsed.raw_items()]
        except Exception:
            return []

    def header(self, name: str) -> str | None:
        """The first value of a header, RFC 2047-decoded, or None."""
        name = name.lower()
        for key, value in self._raw_headers:
            if key == name:
                return _decode_header_value(value)
        return None

    def headers(self, name: str) -> list[str]:
        name = name.lower()
        return [_decode_header_value(v) for k, v in self._raw_headers if k == name]

    @cached_property
    def subject(self) -> str:
        return self.header("subject") or ""

    def _addresses(self, *names: str) -> list[str]:
        values = [v for n in names for k, v in self._raw_headers if k == n]
        if not values:
            return []
        try:
            pairs = email.utils.getaddresses([_decode_header_value(v) for v in values])
        except Exception:
            return []
        out: list[str] = []
        for _, addr in pairs:
            addr = addr.strip().strip("<>").lower()
            if "@" in addr and addr not in out:
                out.append(addr)
        return out

    @cached_property
    def from_address(self) -> str | None:
        found = self._addresses("from")
        return found[0] if found else None

    @cached_property
    def visible_recipients(self) -> list[str]:
        """Addresses every recipient can see: To and Cc."""
        return self._addresses("to", "cc")

    @cached_property
    def header_recipients(self) -> list[str]:
        return self._addresses("to", "cc", "bcc")

    # --- MIME structure -------------------------------------------------------

    def _walk(self) -> Iterator[tuple[StdMessage, int]]:
        """Leaf parts with their depth, bounded in depth and count, without recursion."""
        stack: list[tuple[StdMessage, int]] = [(self._parsed, 0)]
        seen = 0
        while stack and seen < MAX_PARTS:
            part, depth = stack.pop()
            seen += 1
            payload = part.get_payload()
            if part.is_multipart() and isinstance(payload, list):
                if depth < MAX_PART_DEPTH:
                    stack.extend((p, depth + 1) for p in reversed(payload) if isinstance(p, StdMessage))
                continue
            yield part, depth

    @cached_property
    def _leaves(self) -> list[StdMessage]:
        return [p for p, _ in self._walk()]

    @cached_property
    def defects(self) -> list[Defect]:
        found: list[Defect] = []
        stack: list[tuple[StdMessage, str, int]] = [(self._parsed, "message", 0)]
        while stack and len(found) < 100:
            part, where, depth = stack.pop()
            found.extend(Defect(type(d).__name__, where) for d in getattr(part, "defects", []))
            payload = part.get_payload() if part.is_multipart() else None
            if isinstance(payload, list) and depth < MAX_PART_DEPTH:
                stack.extend((p, f"{where}/{i + 1}", depth + 1) for i, p in enumerate(payload))
        if len(self._leaves) >= MAX_PARTS:
            found.append(Defect("TooManyParts", "message"))
        return found

    @staticmethod
    def _filename(part: StdMessage) -> str:
        try:
            name = part.get_filename()
        except Exception:
            return ""
        return _decode_header_value(str(name)) if name else ""

    @staticmethod
    def _is_attachment(part: StdMessage, filename: str) -> bool:
        try:
            disposition = part.get_content_disposition()
        except Exception:
            disposition = None
        if disposition == "attachment" or filename:
            return True
        return part.get_content_maintype() not in ("text", "multipart", "message")

    @cached_property
    def _part_facts(self) -> dict[int, tuple[str, bool]]:
        return {}

    def _facts(self, part: StdMessage) -> tuple[str, bool]:
        """A leaf's decoded file name and whether it is an attachment, worked out once per message.

        Both `attachments` and `_text_parts` need them; the file name alone is two header
        parameter parses. Keyed by identity: the parts live as long as the message.
        """
        found = self._part_facts.get(id(part))
        if found is None:
            filename = self._filename(part)
            found = self._part_facts[id(part)] = (filename, self._is_attachment(part, filename))
        return found

    @cached_property
    def attachments(self) -> list[Attachment]:
        out: list[Attachment] = []
        for part in self._leaves:
            filename, is_attachment = self._facts(part)
            if not is_attachment:
                continue
            raw_payload = part.get_payload()
            size = len(raw_payload) if isinstance(raw_payload, str | bytes) else 0
            if part.get("content-transfer-encoding", "").strip().lower() == "base64":
                size = size * 3 // 4  # near enough for thresholds, without decoding twice
            out.append(Attachment(filename, part.get_content_type(), size, part))
        return out

    @cached_property
    def _text_parts(self) -> list[tuple[str, str]]:
        """(subtype, decoded text) of each body text part, plain and html."""
        parts: list[tuple[str, str]] = []
        budget = TEXT_SCAN_LIMIT
        for part in self._leaves:
            if part.get_content_maintype() != "text" or self._facts(part)[1]:
                continue
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
            text, _ = _decode_bytes(data[:budget], charset)
            budget -= len(text)
            parts.append((part.get_content_subtype(), text))
            if budget <= 0:
                break
        return parts

    @cached_property
    def _html_views(self) -> list[HtmlView]:
        return [
            html_view(_HUGE_TAG.sub(" ", text)) for subtype, text in self._text_parts if subtype == "html"
        ]

    @cached_property
    def plain_text(self) -> str:
        return "\n".join(text for subtype, text in self._text_parts if subtype != "html")

    @cached_property
    def visible_text(self) -> str:
        """Everything a reader sees in the body: plain parts and the visible part of HTML."""
        pieces = [self.plain_text] if self.plain_text else []
        pieces.extend(v.visible for v in self._html_views if v.visible)
        return "\n".join(pieces)

    @cached_property
    def hidden_text(self) -> str:
        """Text present in HTML that a reader cannot see: kept apart, a signal of its own."""
        return "\n".join(v.hidden for v in self._html_views if v.hidden)

    @cached_property
    def html_links(self) -> list[Link]:
        return [link for v in self._html_views for link in v.links]

    @property
    def has_html(self) -> bool:
        return bool(self._html_views)


class ParserCrashed(email.errors.MessageDefect):
    """Stands in the defect list when the stdlib parser itself failed."""
