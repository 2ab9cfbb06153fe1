"""Message modifications a Verdict asks for, independent of the wire that carries them out.

The milter sends them as protocol replies at end of message; SMTP mode applies them to
the bytes before relaying. Both take the same list, so both modes change mail alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from milter.message import Message
from milter.policy.schema import Action
from milter.verdict import Verdict

# RFC 5322 group syntax with no members: what mail clients show when every address is in Bcc.
UNDISCLOSED = "undisclosed-recipients:;"


@dataclass(frozen=True)
class AddHeader:
    name: str
    value: str


@dataclass(frozen=True)
class ChangeHeader:
    """Replace the `index`-th (1-based) occurrence of a header; value None deletes it."""

    name: str
    index: int
    value: str | None


Modification = AddHeader | ChangeHeader


def _encode_if_needed(value: str) -> str:
    """A header value as it may be written: RFC 2047 words for non-ASCII text, for text that
    would read as an encoded word ("=?utf-8?q?FREE?=" shown literally, not decoded into other
    words than the ones scanned), and folded lines for a long value (998 octets at most)."""
    literal = value.isascii() and "=?" not in value
    if literal and len(value) < 900:
        return value
    from email.header import Header

    return Header(value, "us-ascii" if literal else "utf-8").encode()


def removals(names: Iterable[str], count: Callable[[str], int]) -> list[ChangeHeader]:
    """Deletions of every copy of these headers (`count` says how many a message has), the
    last copy first so that the indexes of those before it stay right."""
    return [
        ChangeHeader(name, index, None)
        for name in dict.fromkeys(names)
        for index in range(count(name), 0, -1)
    ]


def modifications(verdict: Verdict, message: Message) -> list[Modification]:
    """What to change in the delivered message, for verdicts that deliver it (accept, tag, fix)."""
    if verdict.action not in (Action.ACCEPT, Action.TAG, Action.FIX, Action.QUARANTINE):
        return []
    # A sender may forge our result headers; only the gateway's own may reach the reader.
    names = [*verdict.result_header_names, *(name for name, _ in verdict.headers)]
    changes: list[Modification] = [*removals(names, lambda name: len(message.headers(name)))]
    changes.extend(AddHeader(name, value) for name, value in verdict.headers)
    if verdict.action in (Action.TAG, Action.FIX) and verdict.subject_prefix:
        subject = message.subject
        if not subject.startswith(verdict.subject_prefix.strip()):
            new = _encode_if_needed(verdict.subject_prefix + subject)
            changes.append(
                ChangeHeader("Subject", 1, new)
                if message.header("subject") is not None
                else AddHeader("Subject", new)
            )
    if verdict.fix_recipients and verdict.action in (Action.FIX, Action.QUARANTINE):
        # Parents must not see each other: To becomes the empty group, every Cc goes.
        # The envelope recipients are untouched, so everyone still gets the message.
        to_count = len(message.headers("to"))
        for index in range(to_count, 0, -1):
            changes.append(ChangeHeader("To", index, UNDISCLOSED if index == 1 else None))
        if to_count == 0:
            changes.append(AddHeader("To", UNDISCLOSED))
        for index in range(len(message.headers("cc")), 0, -1):
            changes.append(ChangeHeader("Cc", index, None))
    return changes


def apply_to_bytes(raw: bytes, changes: list[Modification]) -> bytes:
    """The message with the changes made to its header block; the body is not touched."""
    if not changes:
        return raw
    crlf = b"\r\n" in raw[:4096]
    eol = b"\r\n" if crlf else b"\n"
    split = raw.find(eol + eol)
    head, body = (raw, b"") if split < 0 else (raw[: split + len(eol)], raw[split + len(eol) :])
    # Header fields as (name, complete field bytes including folded continuation lines).
    fields: list[list[bytes]] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1] += line
        else:
            fields.append([line.split(b":", 1)[0].strip().lower(), line])

    def field(name: str, value: str) -> bytes:
        # A folded value's line breaks become the message's own.
        return f"{name}: {value}".replace("\r\n", "\n").encode().replace(b"\n", eol) + eol

    for change in changes:
        if isinstance(change, AddHeader):
            # Added on top, as an MTA adds trace headers: the receiving side reads them first.
            fields.insert(0, [change.name.lower().encode(), field(change.name, change.value)])
            continue
        seen = 0
        for existing in fields:
            if existing[0] == change.name.lower().encode():
                seen += 1
                if seen == change.index:
                    existing[1] = b"" if change.value is None else field(change.name, change.value)
                    break
    out = b"".join(f[1] for f in fields)
    return out + (body if split >= 0 else b"")
