"""The milter wire protocol, version 6, without sockets: bytes in, typed commands out; replies to bytes.

Every packet is a 4-byte big-endian length (covering the command byte and the data),
one command byte, then the data. Strings are NUL-terminated. The reference is
Sendmail's libmilter (include/libmilter/mfdef.h) and Postfix's milter8.c; the server
in milter.server drives this codec and knows nothing of byte layouts.
"""

from __future__ import annotations

import struct
import unicodedata
from dataclasses import dataclass, field

VERSION = 6
# Body chunks are at most 65535 bytes; a macro packet can be longer, but nothing
# legitimate comes near this. A larger length is a broken or hostile peer.
DEFAULT_MAX_PACKET = 1 << 20

# Actions the filter may take (SMFIF_*).
ADD_HEADERS = 0x01
CHANGE_BODY = 0x02
ADD_RCPT = 0x04
DELETE_RCPT = 0x08
CHANGE_HEADERS = 0x10
QUARANTINE = 0x20
CHANGE_FROM = 0x40
ADD_RCPT_PARAMS = 0x80
SET_SYMLIST = 0x100

# Protocol steps the filter may skip or need no reply for (SMFIP_*).
NO_CONNECT = 0x01
NO_HELO = 0x02
NO_MAIL = 0x04
NO_RCPT = 0x08
NO_BODY = 0x10
NO_HEADERS = 0x20
NO_EOH = 0x40
NR_HEADER = 0x80
NO_UNKNOWN = 0x100
NO_DATA = 0x200
SKIP = 0x400
RCPT_REJECTED = 0x800
NR_CONNECT = 0x1000
NR_HELO = 0x2000
NR_MAIL = 0x4000
NR_RCPT = 0x8000
NR_DATA = 0x10000
NR_UNKNOWN = 0x20000
NR_EOH = 0x40000
NR_BODY = 0x80000
HEADER_LEADING_SPACE = 0x100000

# Macro stages for the symbol list (SMFIM_*).
STAGE_CONNECT = 0
STAGE_HELO = 1
STAGE_MAIL = 2
STAGE_RCPT = 3
STAGE_DATA = 4
STAGE_EOM = 5
STAGE_EOH = 6


class ProtocolError(Exception):
    """The peer sent something that is not the milter protocol; the connection must close."""


# --- commands (MTA -> filter) ---------------------------------------------------------


@dataclass(frozen=True)
class OptionNegotiation:
    version: int
    actions: int
    protocol: int


@dataclass(frozen=True)
class DefineMacros:
    stage: str  # the command letter these macros come before ("C", "M", "E", ...)
    macros: dict[str, str]


@dataclass(frozen=True)
class Connect:
    hostname: str
    family: str  # "4", "6", "L" (unix), "U" (unknown)
    port: int | None
    address: str | None


@dataclass(frozen=True)
class Helo:
    name: str


@dataclass(frozen=True)
class MailFrom:
    address: str
    esmtp_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class RcptTo:
    address: str
    esmtp_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Data:
    pass


@dataclass(frozen=True)
class Header:
    name: str
    value: bytes  # raw: may hold 8-bit bytes and folding; the scanner decodes


@dataclass(frozen=True)
class EndOfHeaders:
    pass


@dataclass(frozen=True)
class BodyChunk:
    data: bytes


@dataclass(frozen=True)
class EndOfMessage:
    data: bytes = b""  # a last body chunk may ride on this command


@dataclass(frozen=True)
class Abort:
    pass


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class QuitNewConnection:
    """End of this SMTP session; the MTA will reuse the socket for another."""


@dataclass(frozen=True)
class UnknownSmtpCommand:
    command: bytes


@dataclass(frozen=True)
class UnrecognisedPacket:
    """A command letter this codec does not know (the server closes the connection)."""

    code: bytes
    data: bytes


Command = (
    OptionNegotiation
    | DefineMacros
    | Connect
    | Helo
    | MailFrom
    | RcptTo
    | Data
    | Header
    | EndOfHeaders
    | BodyChunk
    | EndOfMessage
    | Abort
    | Quit
    | QuitNewConnection
    | UnknownSmtpCommand
    | UnrecognisedPacket
)


def _text(data: bytes) -> str:
    # Envelope strings are ASCII in practice; anything else must survive, not crash.
    return data.decode("utf-8", "surrogateescape")


def _strings(data: bytes) -> list[bytes]:
    """NUL-terminated strings; a missing final NUL is tolerated (some MTAs omit it)."""
    if data.endswith(b"\0"):
        data = data[:-1]
    return data.split(b"\0") if data else []


def _parse(code: bytes, data: bytes) -> Command:
    if code == b"O":
        if len(data) < 12:
            raise ProtocolError("option negotiation packet too short")
        version, actions, protocol = struct.unpack("!III", data[:12])
        return OptionNegotiation(version, actions, protocol)
    if code == b"D":
        if not data:
            raise ProtocolError("empty macro packet")
        items = _strings(data[1:])
        macros = {_text(items[i]).strip("{}"): _text(items[i + 1]) for i in range(0, len(items) - 1, 2)}
        return DefineMacros(chr(data[0]), macros)
    if code == b"C":
        host, sep, rest = data.partition(b"\0")
        if not sep or not rest:
            raise ProtocolError("connect packet without a family")
        family = chr(rest[0])
        if family == "U":
            return Connect(_text(host), family, None, None)
        if len(rest) < 3:
            raise ProtocolError("connect packet without a port")
        (port,) = struct.unpack("!H", rest[1:3])
        address_field = _strings(rest[3:])
        return Connect(_text(host), family, port, _text(address_field[0]) if address_field else None)
    if code == b"H":
        parts = _strings(data)
        return Helo(_text(parts[0]) if parts else "")
    if code in (b"M", b"R"):
        words = [_text(item) for item in _strings(data)]
        address = words[0].strip().removeprefix("<").removesuffix(">") if words else ""
        args = tuple(words[1:])
        return MailFrom(address, args) if code == b"M" else RcptTo(address, args)
    if code == b"T":
        return Data()
    if code == b"L":
        name, sep, rest = data.partition(b"\0")
        if not sep:
            raise ProtocolError("header packet without a value")
        return Header(_text(name), rest[:-1] if rest.endswith(b"\0") else rest)
    if code == b"N":
        return EndOfHeaders()
    if code == b"B":
        return BodyChunk(data)
    if code == b"E":
        return EndOfMessage(data)
    if code == b"A":
        return Abort()
    if code == b"Q":
        return Quit()
    if code == b"K":
        return QuitNewConnection()
    if code == b"U":
        return UnknownSmtpCommand(data.rstrip(b"\0"))
    return UnrecognisedPacket(code, data)


_LENGTH = struct.Struct("!I")


@dataclass
class Decoder:
    """Turns a byte stream into commands; keeps partial packets between feeds."""

    max_packet: int = DEFAULT_MAX_PACKET
    _buffer: bytearray = field(default_factory=bytearray)
    # A fault found after complete commands in the same read: those are returned first
    # (an end of message among them still gets its answer), the fault is raised after.
    failed: ProtocolError | None = None

    def feed(self, data: bytes) -> list[Command]:
        if self.failed is not None:
            raise self.failed
        if self._buffer:
            self._buffer += data
            data = bytes(self._buffer)
            self._buffer.clear()
        # Packets are sliced straight out of what was read: no copy of the whole buffer per
        # packet, and nothing kept when a read ends on a packet boundary (the usual case).
        commands: list[Command] = []
        position, end = 0, len(data)
        while end - position >= 4:
            (length,) = _LENGTH.unpack_from(data, position)
            fault = None
            if length < 1:
                fault = ProtocolError("zero-length packet")
            elif length > self.max_packet:
                fault = ProtocolError(f"packet of {length} bytes exceeds the {self.max_packet}-byte limit")
            if fault is not None:
                if not commands:
                    raise fault
                self.failed = fault
                return commands
            stop = position + 4 + length
            if stop > end:
                break
            commands.append(_parse(data[position + 4 : position + 5], data[position + 5 : stop]))
            position = stop
        if position < end:
            self._buffer += data[position:]
        return commands

    @property
    def pending(self) -> int:
        return len(self._buffer)


# --- replies (filter -> MTA) ----------------------------------------------------------


def _packet(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + code + data


def _z(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape") + b"\0"


def option_negotiation(actions: int, protocol: int, macros: dict[int, list[str]] | None = None) -> bytes:
    """Our answer to OptionNegotiation, with the macros we want at each stage (needs SET_SYMLIST)."""
    data = struct.pack("!III", VERSION, actions, protocol)
    for stage, names in (macros or {}).items():
        data += struct.pack("!I", stage) + _z(" ".join(names))
    return _packet(b"O", data)


def continue_() -> bytes:
    return _packet(b"c")


def accept() -> bytes:
    return _packet(b"a")


def reject() -> bytes:
    return _packet(b"r")


def tempfail() -> bytes:
    return _packet(b"t")


def discard() -> bytes:
    return _packet(b"d")


def progress() -> bytes:
    """Keep-alive while a long scan runs: the MTA restarts its timeout."""
    return _packet(b"p")


def quarantine(reason: str) -> bytes:
    return _packet(b"q", _z(reason))


def _ascii(text: str) -> str:
    if text.isascii():
        return text
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c if c.isascii() else "?" for c in decomposed if not unicodedata.combining(c))


def reply_code(code: int, enhanced: str, lines: list[str]) -> bytes:
    """An SMTP reply for reject (5xx) or tempfail (4xx); several lines become a multi-line reply."""
    if not (400 <= code < 600):
        raise ValueError("a milter reply code must be 4xx or 5xx")
    # Sendmail takes the reply as a format string and Postfix turns "%%" back into "%", so a
    # doubled '%' reaches the client as one. SMTP replies are ASCII (RFC 5321 4.2): accents
    # are dropped ("École" -> "Ecole"), anything else becomes "?". CR/LF would break framing.
    clean = [" ".join(_ascii(line).replace("%", "%%").split()) for line in lines] or [""]
    text = "\r\n".join(
        f"{code}{'-' if i < len(clean) - 1 else ' '}{enhanced} {line}" for i, line in enumerate(clean)
    )
    return _packet(b"y", _z(text))


def add_header(name: str, value: str) -> bytes:
    return _packet(b"h", _z(name) + _z(value))


def insert_header(index: int, name: str, value: str) -> bytes:
    return _packet(b"i", struct.pack("!I", index) + _z(name) + _z(value))


def change_header(name: str, index: int, value: str) -> bytes:
    """Replace the index-th (1-based) header of that name; an empty value deletes it."""
    return _packet(b"m", struct.pack("!I", index) + _z(name) + _z(value))


# --- encoding commands: used by tests and tools that play the MTA side ----------------


def encode_command(command: Command) -> bytes:
    """The bytes an MTA would send for a command (the inverse of Decoder.feed)."""
    if isinstance(command, OptionNegotiation):
        return _packet(b"O", struct.pack("!III", command.version, command.actions, command.protocol))
    if isinstance(command, DefineMacros):
        body = b"".join(_z("{" + k + "}" if len(k) > 1 else k) + _z(v) for k, v in command.macros.items())
        return _packet(b"D", command.stage.encode() + body)
    if isinstance(command, Connect):
        if command.family == "U":
            return _packet(b"C", _z(command.hostname) + b"U")
        port = struct.pack("!H", command.port or 0)
        return _packet(
            b"C", _z(command.hostname) + command.family.encode() + port + _z(command.address or "")
        )
    if isinstance(command, Helo):
        return _packet(b"H", _z(command.name))
    if isinstance(command, MailFrom | RcptTo):
        code = b"M" if isinstance(command, MailFrom) else b"R"
        return _packet(code, _z(f"<{command.address}>") + b"".join(_z(a) for a in command.esmtp_args))
    if isinstance(command, Header):
        return _packet(b"L", _z(command.name) + command.value + b"\0")
    if isinstance(command, BodyChunk):
        return _packet(b"B", command.data)
    if isinstance(command, EndOfMessage):
        return _packet(b"E", command.data)
    if isinstance(command, UnknownSmtpCommand):
        return _packet(b"U", command.command + b"\0")
    if isinstance(command, UnrecognisedPacket):
        return _packet(command.code, command.data)
    codes = {Data: b"T", EndOfHeaders: b"N", Abort: b"A", Quit: b"Q", QuitNewConnection: b"K"}
    return _packet(codes[type(command)])


def decode_replies(data: bytes) -> list[tuple[str, bytes]]:
    """(code letter, data) of each reply packet: for tests and tools on the MTA side."""
    out: list[tuple[str, bytes]] = []
    offset = 0
    while offset + 4 <= len(data):
        (length,) = struct.unpack_from("!I", data, offset)
        if offset + 4 + length > len(data):
            break
        out.append((chr(data[offset + 4]), data[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return out
