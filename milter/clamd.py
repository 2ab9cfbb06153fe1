"""Virus scanning through clamd's INSTREAM command, over its UNIX or TCP socket.

    client = ClamdClient("unix:/run/clamav/clamd.ctl", timeout=30.0)
    result = client.scan_bytes(raw_message)          # in a worker thread
    result = await client.ascan(raw_message)         # on an event loop

The engine scans in a thread pool, so the main client is synchronous: plain sockets
with timeouts, every socket operation bounded by the time left until one overall
deadline per command. `ascan` is the same protocol on the event loop's socket
functions for callers that are already there.

Results are typed, not strings: "clean", "infected" (with clamd's signature name),
"size_limit" (clamd refused or could not wholly scan the data because of one of its
limits: not an infection, and clamd is fine) and "error" (clamd answered, with an
error). Not reaching clamd, a timeout or a reply we cannot read raises
`ClamdUnavailable`; what that means for the message (normally a temporary failure)
is the policy's decision, not this module's.

Only the `z` commands are used: NUL-terminated, so a reply ends at a NUL whatever it
says. The `clamd` package on PyPI is not used: it is unmaintained since 2014 and
reports the size-limit reply as a broken connection.

`read_clamd_limits` reads the size and count limits from a clamd.conf so the gateway
can warn when clamd would refuse or skip messages that the gateway itself accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from milter.sockets import parse_socket_name

ScanStatus = Literal["clean", "infected", "size_limit", "error"]
Buffer = bytes | bytearray | memoryview

DEFAULT_ADDRESS = "unix:/run/clamav/clamd.ctl"  # Debian's LocalSocket
DEFAULT_TCP_PORT = 3310

SIZE_LIMIT_REPLY = "INSTREAM size limit exceeded. ERROR"
# With AlertExceedsMax, clamd reports data it could not wholly scan (MaxFileSize,
# MaxScanSize, MaxRecursion, MaxFiles, MaxScanTime) as a "virus" with this prefix.
# It is a limit, not malware: reported as size_limit with the name kept.
LIMIT_HEURISTIC_PREFIX = "Heuristics.Limits.Exceeded"

_END_OF_STREAM = b"\0\0\0\0"
# A reply is one short line; anything longer is not clamd talking.
_MAX_REPLY = 64 * 1024
# clamd's own ceiling on a chunk is StreamMaxLength; far smaller chunks keep memory flat
# and let us notice an early reply (size limit) soon.
_MAX_CHUNK = 16 * 1024 * 1024
# Errors that mean clamd closed the connection while we were still sending: clamd does
# that after "INSTREAM size limit exceeded", and the reply is still waiting to be read.
_PEER_CLOSED = (errno.EPIPE, errno.ECONNRESET, errno.ESHUTDOWN)
# ExtendedDetectionInfo appends "(md5:size)" to the signature name.
_EXTENDED_INFO = re.compile(r"\((?:[0-9a-fA-F]{32}|[0-9a-fA-F]{64}):\d+\)$")


@dataclass(frozen=True)
class ClamdResult:
    """clamd's verdict on one stream of data."""

    status: ScanStatus
    signature: str | None = None  # e.g. "Eicar-Test-Signature" or "School.Test.EICAR.UNOFFICIAL"
    detail: str = ""  # clamd's own text for errors and limits (never message content)

    @property
    def infected(self) -> bool:
        return self.status == "infected"


class ClamdUnavailable(Exception):
    """clamd could not be asked: cannot connect, timed out, or its reply was unreadable."""


class ClamdConfigError(ValueError):
    """A clamd.conf line that clamd itself would refuse; the message has file, line and reason."""


def parse_address(address: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """The socket family and address of a clamd socket name (milter spellings, see milter.sockets)."""
    return parse_socket_name(address, "clamd address")


def parse_scan_reply(reply: str) -> ClamdResult:
    """The result for clamd's reply to INSTREAM (NUL already removed).

    Raises ClamdUnavailable for a reply that is none of clamd's known answers, since
    then we do not know what clamd did with the data.
    """
    text = reply.strip()
    if text == "stream: OK":
        return ClamdResult("clean")
    if text == SIZE_LIMIT_REPLY:
        return ClamdResult("size_limit", detail=text)
    if text.startswith("stream: ") and text.endswith(" FOUND"):
        name = _EXTENDED_INFO.sub("", text[len("stream: ") : -len(" FOUND")].strip()).strip()
        if name.startswith(LIMIT_HEURISTIC_PREFIX):
            return ClamdResult("size_limit", signature=name, detail=text)
        if name:
            return ClamdResult("infected", signature=name)
    if text.endswith(" ERROR"):
        return ClamdResult("error", detail=text)
    raise ClamdUnavailable(f"unexpected reply from clamd: {text[:200]!r}")


class ClamdClient:
    """A clamd connection per command; safe to share between threads.

    address:         "unix:/run/clamav/clamd.ctl" or "inet:127.0.0.1:3310"
    timeout:         overall deadline in seconds for one command, scan included
    chunk_size:      bytes per INSTREAM chunk
    max_stream:      data longer than this is not sent; the result is size_limit (set it
                     to clamd's StreamMaxLength to save sending what clamd would refuse)
    connect_timeout: how long connecting may take, within `timeout`; a clamd that is
                     down or overloaded is noticed quickly
    """

    def __init__(
        self,
        address: str,
        timeout: float = 30.0,
        chunk_size: int = 64 * 1024,
        max_stream: int | None = None,
        *,
        connect_timeout: float = 5.0,
    ) -> None:
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("clamd timeouts must be positive")
        if not 0 < chunk_size <= _MAX_CHUNK:
            raise ValueError(f"clamd chunk_size must be between 1 and {_MAX_CHUNK} bytes")
        if max_stream is not None and max_stream < 0:
            raise ValueError("clamd max_stream must not be negative")
        self.address = address
        self.family, self.sockaddr = parse_address(address)  # a bad address fails at start
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.max_stream = max_stream
        self.connect_timeout = connect_timeout

    def __repr__(self) -> str:
        return f"ClamdClient({self.address!r}, timeout={self.timeout})"

    # -- synchronous: for worker threads ---------------------------------------------------

    def ping(self) -> bool:
        """True when clamd answers PONG; False when it cannot be reached or answers otherwise."""
        try:
            return self._command(b"zPING\0") == "PONG"
        except ClamdUnavailable:
            return False

    def version(self) -> str:
        """clamd's version line, e.g. "ClamAV 1.4.6/27470/Mon Nov 24 09:31:01 2026"."""
        return self._command(b"zVERSION\0")

    def scan_bytes(self, data: Buffer) -> ClamdResult:
        """Scan `data` with INSTREAM. Raises ClamdUnavailable."""
        view = memoryview(data).cast("B")
        if self.max_stream is not None and len(view) > self.max_stream:
            return self._over_max_stream(len(view))
        if len(view) <= self.chunk_size:
            # Most mail is one chunk: the command, the chunk and the end marker go in one
            # write. clamd cannot answer before it has the chunk, so there is no early reply
            # to look for between them, and the stream clamd reads is the same bytes.
            sized = (struct.pack(">I", len(view)), view) if len(view) else ()
            return parse_scan_reply(self._command(b"".join((b"zINSTREAM\0", *sized, _END_OF_STREAM))))
        chunks = (view[i : i + self.chunk_size] for i in range(0, len(view), self.chunk_size))
        return self._instream(chunks)

    def scan_file(self, fp: BinaryIO) -> ClamdResult:
        """Scan the rest of an open binary file (a spooled message) without reading it whole."""
        size = _remaining_size(fp)
        if self.max_stream is not None and size is not None and size > self.max_stream:
            return self._over_max_stream(size)
        sent = 0

        def chunks() -> Iterator[bytes]:
            nonlocal sent
            while chunk := fp.read(self.chunk_size):
                sent += len(chunk)
                if self.max_stream is not None and sent > self.max_stream:
                    raise _OverMaxStream
                yield chunk

        try:
            return self._instream(chunks())
        except _OverMaxStream:
            return self._over_max_stream(sent)

    # -- asyncio: for callers on the event loop ---------------------------------------------

    async def ascan(self, data: Buffer) -> ClamdResult:
        """`scan_bytes` on the event loop. Raises ClamdUnavailable.

        Uses the loop's socket functions, not streams: a stream transport that hits a
        broken pipe closes the socket at once, throwing away the size-limit reply clamd
        sent just before it closed; a plain socket still lets us read it.
        """
        view = memoryview(data).cast("B")
        if self.max_stream is not None and len(view) > self.max_stream:
            return self._over_max_stream(len(view))
        loop = asyncio.get_running_loop()
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        await loop.sock_connect(sock, self.sockaddr)
                except (OSError, TimeoutError) as exc:
                    raise self._cannot_connect(exc) from exc
                _no_delay(sock)
                reply = bytearray()
                try:
                    if len(view) <= self.chunk_size:
                        # One write, as scan_bytes does: the daemon asks clamd this way for
                        # every small message, and each loop round trip costs CPU.
                        sized = (struct.pack(">I", len(view)), view) if len(view) else ()
                        await loop.sock_sendall(sock, b"".join((b"zINSTREAM\0", *sized, _END_OF_STREAM)))
                    else:
                        await self._asend_chunks(loop, sock, view, reply)
                except OSError as exc:
                    if exc.errno not in _PEER_CLOSED:
                        raise ClamdUnavailable(f"sending to clamd at {self.address} failed: {exc}") from exc
                while b"\0" not in reply and len(reply) <= _MAX_REPLY:
                    try:
                        more = await loop.sock_recv(sock, 4096)
                    except OSError as exc:
                        raise ClamdUnavailable(f"reading clamd's reply failed: {exc}") from exc
                    if not more:
                        break
                    reply += more
        except TimeoutError as exc:
            raise ClamdUnavailable(
                f"clamd at {self.address} did not answer within {self.timeout:g} s"
            ) from exc
        finally:
            sock.close()
        return parse_scan_reply(self._reply_text(bytes(reply)))

    async def _asend_chunks(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview, reply: bytearray
    ) -> None:
        await loop.sock_sendall(sock, b"zINSTREAM\0")
        for start in range(0, len(view), self.chunk_size):
            if _take_available(sock, reply):
                return  # clamd answered early: it stopped reading
            chunk = view[start : start + self.chunk_size]
            await loop.sock_sendall(sock, b"".join((struct.pack(">I", len(chunk)), chunk)))
        await loop.sock_sendall(sock, _END_OF_STREAM)

    # -- the protocol -------------------------------------------------------------------

    def _instream(self, chunks: Iterator[Buffer]) -> ClamdResult:
        deadline = time.monotonic() + self.timeout
        with self._connect(deadline) as sock:
            poller = select.poll()  # poll, not select: a busy gateway has fds above 1024
            poller.register(sock, select.POLLIN)
            if self._send(sock, b"zINSTREAM\0", deadline):
                for chunk in chunks:
                    # clamd answers before the end only when it refuses the rest (size
                    # limit) and then stops reading: stop sending and read why.
                    if poller.poll(0):
                        break
                    # One write per chunk: with TCP_NODELAY a separate 4-byte length
                    # would be a packet of its own.
                    if not self._send(sock, b"".join((struct.pack(">I", len(chunk)), chunk)), deadline):
                        break
                else:
                    self._send(sock, _END_OF_STREAM, deadline)
            return parse_scan_reply(self._read_reply(sock, deadline))

    def _command(self, command: bytes) -> str:
        deadline = time.monotonic() + self.timeout
        with self._connect(deadline) as sock:
            self._send(sock, command, deadline)
            return self._read_reply(sock, deadline)

    def _connect(self, deadline: float) -> socket.socket:
        connect_timeout = min(self.connect_timeout, self._time_left(deadline))
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(connect_timeout)
            sock.connect(self.sockaddr)
        except OSError as exc:
            sock.close()
            raise self._cannot_connect(exc) from exc
        _no_delay(sock)
        return sock

    def _send(self, sock: socket.socket, data: Buffer, deadline: float) -> bool:
        """True when sent; False when clamd has closed the connection (its reply says why)."""
        sock.settimeout(self._time_left(deadline))
        try:
            sock.sendall(data)
        except TimeoutError as exc:
            raise ClamdUnavailable(f"clamd at {self.address} stopped reading for {self.timeout:g} s") from exc
        except OSError as exc:
            # A broken pipe is clamd closing after its size-limit reply, which is still
            # in our receive buffer; the caller reads it.
            if exc.errno in _PEER_CLOSED:
                return False
            raise ClamdUnavailable(f"sending to clamd at {self.address} failed: {exc}") from exc
        return True

    def _read_reply(self, sock: socket.socket, deadline: float) -> str:
        reply = bytearray()
        while b"\0" not in reply and len(reply) <= _MAX_REPLY:
            sock.settimeout(self._time_left(deadline))
            try:
                more = sock.recv(4096)
            except TimeoutError as exc:
                raise ClamdUnavailable(
                    f"clamd at {self.address} did not answer within {self.timeout:g} s"
                ) from exc
            except OSError as exc:
                raise ClamdUnavailable(f"reading clamd's reply failed: {exc}") from exc
            if not more:
                break
            reply += more
        return self._reply_text(bytes(reply))

    def _reply_text(self, reply: bytes) -> str:
        if b"\0" not in reply:
            if not reply:
                raise ClamdUnavailable(f"clamd at {self.address} closed the connection without a reply")
            raise ClamdUnavailable(f"clamd at {self.address} sent an unterminated reply: {reply[:200]!r}")
        return reply.split(b"\0", 1)[0].decode("utf-8", "replace").strip()

    def _time_left(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ClamdUnavailable(f"clamd at {self.address} did not finish within {self.timeout:g} s")
        return left

    def _cannot_connect(self, exc: BaseException) -> ClamdUnavailable:
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        return ClamdUnavailable(f"cannot connect to clamd at {self.address}: {reason}")

    def _over_max_stream(self, size: int) -> ClamdResult:
        return ClamdResult(
            "size_limit", detail=f"{size} bytes is over max_stream ({self.max_stream} bytes); not sent"
        )


class _OverMaxStream(Exception):
    """A file grew past max_stream while it was being sent."""


def _no_delay(sock: socket.socket) -> None:
    """Send each write at once on TCP: the 4-byte end-of-stream marker otherwise waits
    for an ACK that the receiver may delay by up to 40 ms (Nagle and delayed ACK)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _take_available(sock: socket.socket, reply: bytearray) -> bool:
    """Move whatever clamd has already sent into `reply` without waiting; True if any (or EOF)."""
    try:
        more = sock.recv(4096, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # the connection is gone; reading the reply will say how
    reply += more
    return True


def _remaining_size(fp: BinaryIO) -> int | None:
    """Bytes from the current position to the end, when the file can say so cheaply."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if fp.seekable():
            here = fp.tell()
            return os.fstat(fp.fileno()).st_size - here
    return None


# -- clamd.conf limits ---------------------------------------------------------------------

# The options that decide whether clamd scans a whole message, with clamd 1.x's defaults
# (what clamd uses when the file does not set them; confirmed from clamd 1.4's start-up log).
CLAMD_LIMIT_DEFAULTS: dict[str, int] = {
    "StreamMaxLength": 100 * 1024 * 1024,
    "MaxFileSize": 100 * 1024 * 1024,
    "MaxScanSize": 400 * 1024 * 1024,
    "MaxRecursion": 17,
    "MaxFiles": 10000,
}
# SIZE options take K, M or G (either case; 1024-based, as clamd counts); NUMBER options
# take digits only, and clamd refuses to start on anything else.
_SIZE_OPTIONS = frozenset({"StreamMaxLength", "MaxFileSize", "MaxScanSize"})
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SIZE_VALUE = re.compile(r"(\d+)([kKmMgG]?)")


def read_clamd_limits(path: Path) -> dict[str, int]:
    """StreamMaxLength, MaxFileSize, MaxScanSize (bytes), MaxRecursion and MaxFiles from a clamd.conf.

    Options the file does not set have clamd's defaults. Parsed as clamd parses them:
    option names are case-sensitive, the value follows whitespace, the first
    occurrence wins and a bad value is an error (clamd would refuse to start), raised
    as ClamdConfigError with file and line. 0 means "no limit" to clamd.
    """
    limits = dict(CLAMD_LIMIT_DEFAULTS)
    seen: set[str] = set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        fields = line.split(None, 1)
        if not fields or fields[0].startswith("#") or fields[0] not in limits or fields[0] in seen:
            continue
        name = fields[0]
        value = fields[1].strip() if len(fields) > 1 else ""
        match = _SIZE_VALUE.fullmatch(value)
        if match is None or (match[2] and name not in _SIZE_OPTIONS):
            kind = "a size such as 100M (units K, M, G)" if name in _SIZE_OPTIONS else "a whole number"
            raise ClamdConfigError(f"{path}:{number}: {name}: {value!r} is not {kind}")
        limits[name] = int(match[1]) * _UNITS[match[2].lower()]
        seen.add(name)
    return limits


def limit_warnings(limits: dict[str, int], max_message_bytes: int) -> list[str]:
    """Why clamd would not wholly scan some messages the gateway accepts; empty when none.

    Every accepted message must fit StreamMaxLength (else clamd refuses it: size_limit),
    MaxFileSize and MaxScanSize (else clamd skips it, reporting it clean unless
    AlertExceedsMax is on). 0 disables a limit in clamd.
    """
    problems = []
    for name in ("StreamMaxLength", "MaxFileSize", "MaxScanSize"):
        value = limits.get(name, CLAMD_LIMIT_DEFAULTS[name])
        if 0 < value < max_message_bytes:
            problems.append(
                f"clamd's {name} is {value} bytes, below the gateway's max_message_bytes "
                f"({max_message_bytes}): larger messages are not wholly virus-scanned"
            )
    return problems
