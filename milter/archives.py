"""Walk archives in memory, nested to a depth limit, and report what is inside and what is wrong.

`inspect_archive` lists every file in a zip, 7z, RAR (4 and 5), tar (plain or compressed),
single-stream gzip/bzip2/xz/zstd file, CAB or ISO 9660 image, descending into archives
inside archives down to `ArchiveLimits.max_depth`. Nothing is written to disk: each member
is streamed out of the archive in memory, reading at most the limit + 1 bytes of it, so a
bomb is recognised after a bounded amount of work rather than inflated whole. Encrypted
members are listed (their names are usually visible) and never read. It never raises:
whatever cannot be read becomes a problem in the report.

Why libarchive (through libarchive-c) rather than zipfile + tarfile + py7zr + rarfile:

- One reader for every format, including RAR, which otherwise needs a non-free `unrar` or a
  subprocess per member (rarfile with bsdtar) and a temporary copy of the archive on disk.
  7z through py7zr would add eight compiled dependencies and extracts whole members only.
- libarchive (Debian's libarchive13, already the engine behind bsdtar, CMake and pacman) is
  maintained upstream and by Debian's security team, and is continuously fuzzed by OSS-Fuzz;
  libarchive-c is a small pure-ctypes binding maintained since 2014 (5.3, May 2025).
- It reports encryption per entry for zip (ZipCrypto and AES), 7z and RAR, so "encrypted"
  needs no format-specific code; only the flag query is called through ctypes here, as
  libarchive-c does not wrap it.
- Only the formats and filters listed in `_FORMATS`/`_FILTERS` are enabled, never "all":
  "all" includes mtree, whose reader opens files named in the archive from the local disk,
  and filters that fall back to running external programs.

What libarchive does not give is a per-member compressed size, so the ratio check uses the
input consumed while a member is read (exact for zip, whose members are compressed one by
one) and, for every format, the unpacked total of an archive against its packed size.
"""

from __future__ import annotations

import ctypes
import logging
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from libarchive import ffi
from libarchive.entry import ArchiveEntry
from libarchive.exception import ArchiveError
from libarchive.read import ArchiveRead

from milter.filetypes import zip_flavour

__all__ = ["ArchiveLimits", "ArchiveReport", "Member", "inspect_archive", "is_archive"]

# libarchive-c logs libarchive's warnings, which quote member names from the attachment;
# names are content and stay out of the logs (policy 2.4). Problems carry what matters.
logging.getLogger("libarchive").setLevel(logging.ERROR)

_FILTERS = ("gzip", "bzip2", "xz", "lzma", "zstd", "lz4", "compress")
# "raw" turns a single compressed stream (foo.txt.gz) into one member; it bids lowest, so a
# real archive format always wins, and raw without a filter means "not an archive at all".
_FORMATS = ("zip", "7zip", "rar", "rar5", "tar", "cab", "iso9660", "raw")
# Member data is pulled out this much at a time; limits are checked between pulls.
_BLOCK = 64 * 1024
# A compression ratio counts only once this much has come out: small, very compressible files
# (a blank form, a log of zeros) are common and harmless, and a bomb's harm is in its size.
RATIO_FLOOR = 1_000_000
# Single-stream compressed files: the member is named after the file less its suffix.
_STREAM_SUFFIXES = {
    ".gz": "",
    ".gzip": "",
    ".z": "",
    ".bz2": "",
    ".bzip2": "",
    ".xz": "",
    ".lzma": "",
    ".zst": "",
    ".zstd": "",
    ".lz4": "",
    ".tgz": ".tar",
    ".tbz": ".tar",
    ".tbz2": ".tar",
    ".txz": ".tar",
}

try:
    _entry_is_encrypted = ffi.libarchive.archive_entry_is_encrypted
    _entry_is_encrypted.argtypes = [ctypes.c_void_p]
    _entry_is_encrypted.restype = ctypes.c_int
except AttributeError:  # libarchive older than 3.2: read errors still reveal encryption
    _entry_is_encrypted = None


@dataclass(frozen=True)
class ArchiveLimits:
    max_depth: int = 3
    max_members: int = 1000
    max_total_bytes: int = 200_000_000
    max_ratio: float = 100.0  # unpacked/packed for a member or the whole archive
    max_member_bytes: int = 50_000_000


@dataclass(frozen=True)
class Member:
    path: str  # "outer.zip/inner.zip/evil.exe"
    name: str  # last component
    data: bytes | None  # None when not read (encrypted, over a limit, unreadable)
    size: int
    depth: int
    encrypted: bool


@dataclass(frozen=True)
class ArchiveReport:
    members: tuple[Member, ...]  # every file found at every depth (the leaves and the nested archives)
    # Safe text, no content. Each starts with one of: "encrypted", "bomb", "too deep",
    # "too many files", "too big", "unreadable".
    problems: tuple[str, ...]


# --- recognising archives ---------------------------------------------------------------------


def _looks_like_tar(data: bytes) -> bool:
    """A tar header's checksum (the sum of its bytes, the checksum field counted as spaces) matches."""
    if len(data) < 512:
        return False
    field_ = data[148:156].replace(b"\0", b" ").strip()
    try:
        stored = int(field_, 8)
    except ValueError:
        return False
    return stored == sum(data[:148]) + 8 * 32 + sum(data[156:512])


def _format_of(data: bytes, filename: str = "") -> str | None:
    if data.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return "zip"
    if data.startswith(b"7z\xbc\xaf\x27\x1c"):
        return "7z"
    if data.startswith((b"Rar!\x1a\x07\x00", b"Rar!\x1a\x07\x01\x00")):
        return "rar"
    if data.startswith(b"\x1f\x8b"):
        return "gzip"
    if data.startswith(b"BZh") and data[3:4].isdigit():
        return "bzip2"
    if data.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if data.startswith(b"MSCF\0\0\0\0"):
        return "cab"
    if data[257:262] == b"ustar":
        return "tar"
    if data[0x8001:0x8006] == b"CD001":
        return "iso9660"
    # Pre-POSIX tar has no magic; the name earns it the checksum test.
    if filename.lower().endswith(".tar") and _looks_like_tar(data):
        return "tar"
    return None


def is_archive(data: bytes, filename: str = "") -> bool:
    """True when `inspect_archive` can open `data`: an archive, compressed file or ISO 9660 image.

    Zip-based documents and programs (.docx, .odt, .jar, .apk, .appx) are not archives here:
    they are judged as what they are.
    """
    found = _format_of(data, filename)
    if found == "zip":
        return zip_flavour(data) is None
    return found is not None


# --- walking ------------------------------------------------------------------------------------


def _printable(text: str, limit: int = 200) -> str:
    """Text safe for a reviewer and a log line: control and format characters spelled out."""
    out = "".join(f"<U+{ord(c):04X}>" if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _reason(exc: BaseException) -> str:
    message = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    if "Unrecognized archive format" in str(message):
        return "not a recognised archive"
    return _printable(str(message), 100)


def _mentions_encryption(exc: BaseException) -> bool:
    text = str(getattr(exc, "msg", "") or exc).lower()
    return "encrypt" in text or "passphrase" in text or "password" in text


@contextmanager
def _open(data: bytes, formats: tuple[str, ...]) -> Iterator[tuple[ctypes.c_void_p, ArchiveRead]]:
    archive_p = ffi.read_new()
    try:
        # A ValueError means this libarchive was built without that filter or format.
        for name in _FILTERS:
            with suppress(ValueError):
                ffi.get_read_filter_function(name)(archive_p)
        for name in formats:
            with suppress(ValueError):
                ffi.get_read_format_function(name)(archive_p)
        # libarchive reads straight from the bytes object (no copy), which `data` keeps alive.
        ffi.read_open_memory(archive_p, ctypes.c_char_p(data), len(data))
        yield archive_p, ArchiveRead(archive_p)
    finally:
        ffi.read_free(archive_p)


def _entry_name(entry: ArchiveEntry) -> str:
    try:
        name = entry.pathname
    except Exception:
        name = None
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    name = str(name or "").replace("\\", "/").lstrip("/")
    return name or "(unnamed)"


def _is_encrypted(entry: ArchiveEntry) -> bool:
    pointer = getattr(entry, "_entry_p", None)
    if _entry_is_encrypted is None or pointer is None:
        return False
    return bool(_entry_is_encrypted(pointer) > 0)


def _stream_member_name(container: str) -> str:
    base = container.rsplit("/", 1)[-1]
    lower = base.lower()
    for suffix, replacement in _STREAM_SUFFIXES.items():
        if lower.endswith(suffix) and len(base) > len(suffix):
            return base[: -len(suffix)] + replacement
    return "data"


@dataclass
class _Walk:
    limits: ArchiveLimits
    top: str
    members: list[Member] = field(default_factory=list)
    problems: dict[str, None] = field(default_factory=dict)  # ordered, without repeats
    files: int = 0
    total: int = 0
    stopped: bool = False  # a limit on the whole walk was reached

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems[text] = None

    def label(self, path: str) -> str:
        """`path` as a reviewer reads it: inside the attachment, whose name the finding already gives."""
        inner = path[len(self.top) + 1 :] if path.startswith(self.top + "/") else path
        return _printable(inner)


def inspect_archive(data: bytes, filename: str, limits: ArchiveLimits = ArchiveLimits()) -> ArchiveReport:
    """Every file in the archive `data`, at every depth, and what is wrong with it. Never raises."""
    top = filename or "attachment"
    walk = _Walk(limits, top)
    try:
        _walk_archive(data, top, 0, walk)
    except Exception as exc:
        # Nothing above should raise; if libarchive-c or ctypes does, the report says so.
        walk.problem(f"unreadable: {walk.label(top)}: {_reason(exc)}")
    return ArchiveReport(tuple(walk.members), tuple(walk.problems))


def _walk_archive(
    data: bytes, path: str, depth: int, walk: _Walk, formats: tuple[str, ...] = _FORMATS
) -> None:
    """List and read the members of the archive `data` found at `path`, `depth` levels down."""
    limits = walk.limits
    unpacked = 0  # from this archive alone, for its overall ratio
    entries = 0
    compressed = False
    try:
        with _open(data, formats) as (archive_p, reader):
            for entry in reader:
                entries += 1
                if walk.stopped:
                    return
                fmt = reader.format_name
                if fmt == b"raw":
                    if not reader.filter_names:
                        walk.problem(f"unreadable: {walk.label(path)}: not a recognised archive")
                        return
                    name = _stream_member_name(path)
                elif not entry.isfile:
                    continue  # directories, links, devices: nothing to scan
                else:
                    name = _entry_name(entry)
                walk.files += 1
                if walk.files > limits.max_members:
                    walk.problem(f"too many files: more than {limits.max_members}")
                    walk.stopped = True
                    return
                member_path = f"{path}/{name}"
                last = name.rsplit("/", 1)[-1]
                declared = entry.size if isinstance(entry.size, int) and entry.size > 0 else 0

                if _is_encrypted(entry):
                    walk.members.append(Member(member_path, last, None, declared, depth + 1, True))
                    walk.problem(f"encrypted: {walk.label(member_path)}")
                    continue

                outcome, content, read = _read_member(archive_p, fmt, len(data), unpacked, walk)
                unpacked += read
                if outcome == "ok":
                    assert content is not None
                    walk.members.append(Member(member_path, last, content, len(content), depth + 1, False))
                    if is_archive(content, last):
                        if depth + 1 < limits.max_depth:
                            _walk_archive(content, member_path, depth + 1, walk)
                        else:
                            walk.problem(
                                f"too deep: {walk.label(member_path)} is an archive nested deeper than "
                                f"{limits.max_depth} levels, not opened"
                            )
                    continue

                encrypted = outcome == "encrypted"
                walk.members.append(
                    Member(member_path, last, None, max(declared, read), depth + 1, encrypted)
                )
                label = walk.label(member_path)
                if encrypted:
                    walk.problem(f"encrypted: {label}")
                elif outcome.startswith("bomb"):
                    # Reading stopped just past the limit; what the member claims to unpack to
                    # (when it claims more) says better how far past it the bomb goes.
                    ratio = max(float(outcome.split(" ", 1)[1]), declared / max(1, len(data)))
                    walk.problem(f"bomb: ratio {ratio:.0f}:1 in {label}")
                    return  # a bomb is hostile: the rest of this archive is not worth the work
                elif outcome == "total":
                    walk.problem(f"too big: more than {limits.max_total_bytes} bytes unpacked in total")
                    walk.stopped = True
                    return
                elif outcome == "member":
                    # Skipping the rest of a zip member is a seek; in a compressed stream (tar.gz,
                    # solid 7z) it means inflating all of it, which is what the limit prevents.
                    if fmt.startswith(b"ZIP"):
                        walk.problem(f"too big: {label} unpacks to more than {limits.max_member_bytes} bytes")
                        continue
                    walk.problem(
                        f"too big: {label} unpacks to more than {limits.max_member_bytes} bytes; "
                        f"the rest of {walk.label(path)} was not inspected"
                    )
                    return
                else:
                    walk.problem(f"unreadable: {label}: {outcome.split(' ', 1)[1]}")
            compressed = bool(reader.filter_names)
    except ArchiveError as exc:
        if _mentions_encryption(exc):
            walk.problem(f"encrypted: {walk.label(path)}: the file list is encrypted too")
        else:
            walk.problem(f"unreadable: {walk.label(path)}: {_reason(exc)}")
        return
    if entries == 0 and compressed and formats != ("raw",):
        # A compressed stream that starts with zero blocks reads as an empty tar; whatever
        # follows the zeros would go unseen, so the stream is taken as one file instead.
        _walk_archive(data, path, depth, walk, ("raw",))


def _read_member(
    archive_p: ctypes.c_void_p, fmt: bytes, packed_size: int, unpacked_before: int, walk: _Walk
) -> tuple[str, bytes | None, int]:
    """Stream the current member out, stopping one byte past the first limit it reaches.

    Returns (outcome, content, bytes read): outcome is "ok", "encrypted", "member", "total",
    "bomb <ratio>" or "unreadable <reason>"; content is set only when "ok".
    """
    limits = walk.limits
    cap = min(limits.max_member_bytes, limits.max_total_bytes - walk.total)
    per_member_ratio = fmt.startswith(b"ZIP")  # zip members are compressed one by one
    start = ffi.filter_bytes(archive_p, -1)
    buffer = ctypes.create_string_buffer(_BLOCK)
    chunks: list[bytes] = []
    read = 0
    try:
        while True:
            n = ffi.read_data(archive_p, buffer, min(_BLOCK, cap + 1 - read))
            if n <= 0:
                break
            read += n
            walk.total += n
            if read > cap:
                return ("total" if walk.total > limits.max_total_bytes else "member"), None, read
            chunks.append(buffer.raw[:n])
            if read > RATIO_FLOOR and per_member_ratio:
                ratio = read / max(1, ffi.filter_bytes(archive_p, -1) - start)
                if ratio > limits.max_ratio:
                    return f"bomb {ratio:.0f}", None, read
            so_far = unpacked_before + read
            if so_far > RATIO_FLOOR and so_far / max(1, packed_size) > limits.max_ratio:
                return f"bomb {so_far / max(1, packed_size):.0f}", None, read
    except ArchiveError as exc:
        if _mentions_encryption(exc):
            return "encrypted", None, read
        return f"unreadable {_reason(exc)}", None, read
    return "ok", b"".join(chunks), read
