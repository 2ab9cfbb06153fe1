"""What is inside archives, found in memory within limits: real archives built in tests/samples.py."""

from __future__ import annotations

import bz2
import gzip
import lzma
import random
import time
import unicodedata

import pytest

from milter.archives import ArchiveLimits, ArchiveReport, Member, inspect_archive, is_archive
from milter.filetypes import identify
from tests import samples

EXE = samples.pe_exe()
FILES = [("letters/trip.txt", b"The coach leaves at 8.\n"), ("setup.exe", EXE)]


def _paths(report: ArchiveReport) -> list[str]:
    return [m.path for m in report.members]


def _member(report: ArchiveReport, path: str) -> Member:
    for member in report.members:
        if member.path == path:
            return member
    raise AssertionError(f"{path} not in {_paths(report)}")


# --- is_archive -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (samples.zip_of(FILES), "a.zip"),
        (samples.seven_zip(FILES), "a.7z"),
        (samples.rar4(FILES), "a.rar"),
        (samples.tar_gz(FILES), "a.tar.gz"),
        (samples.tar_gz(FILES, ""), "a.tar"),
        (gzip.compress(b"hello"), "a.txt.gz"),
        (bz2.compress(b"hello"), "a.txt.bz2"),
        (lzma.compress(b"hello"), "a.txt.xz"),
        (samples.iso_image(FILES[1:]), "a.iso"),
    ],
    ids=["zip", "7z", "rar", "tar.gz", "tar", "gz", "bz2", "xz", "iso"],
)
def test_is_archive(data: bytes, name: str) -> None:
    assert is_archive(data, name)
    assert is_archive(data, "no-name")  # from content, not from the name


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (samples.docx(), "a.docx"),
        (samples.odt(), "a.odt"),
        (samples.jar(), "a.jar"),
        (samples.apk(), "a.apk"),
        (samples.pdf(), "a.pdf"),
        (EXE, "a.zip"),
        (random.Random(3).randbytes(2000), "a.zip"),
        (b"", "a.zip"),
    ],
    ids=["docx", "odt", "jar", "apk", "pdf", "exe", "junk", "empty"],
)
def test_is_not_archive(data: bytes, name: str) -> None:
    assert not is_archive(data, name)


# --- every format -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (samples.zip_of(FILES), "a.zip"),
        (samples.zip_of(FILES, compression=0), "stored.zip"),
        (samples.seven_zip(FILES), "a.7z"),
        (samples.rar4(FILES), "a.rar"),
        (samples.tar_gz(FILES, ""), "a.tar"),
        (samples.tar_gz(FILES), "a.tar.gz"),
        (samples.tar_gz(FILES, "bz2"), "a.tar.bz2"),
        (samples.tar_gz(FILES, "xz"), "a.tar.xz"),
    ],
    ids=["zip", "zip-stored", "7z", "rar4", "tar", "tar.gz", "tar.bz2", "tar.xz"],
)
def test_each_format_lists_and_reads_its_files(data: bytes, name: str) -> None:
    report = inspect_archive(data, name)
    assert report.problems == ()
    assert _paths(report) == [f"{name}/letters/trip.txt", f"{name}/setup.exe"]
    exe = _member(report, f"{name}/setup.exe")
    assert exe.data == EXE
    assert exe.name == "setup.exe"
    assert exe.size == len(EXE)
    assert exe.depth == 1
    assert not exe.encrypted
    assert identify(exe.data, exe.name).kind == "executable"


def test_iso_image_contents() -> None:
    report = inspect_archive(samples.iso_image([("setup.exe", EXE), ("readme.txt", b"hi")]), "photos.iso")
    assert _member(report, "photos.iso/setup.exe").data == EXE
    assert report.problems == ()


@pytest.mark.parametrize(
    ("compress", "name", "member"),
    [
        (gzip.compress, "notes.txt.gz", "notes.txt"),
        (bz2.compress, "notes.txt.bz2", "notes.txt"),
        (lzma.compress, "notes.txt.xz", "notes.txt"),
        (gzip.compress, "attachment", "data"),
    ],
    ids=["gz", "bz2", "xz", "unnamed"],
)
def test_single_stream_file_is_one_member(compress: object, name: str, member: str) -> None:
    assert callable(compress)
    report = inspect_archive(compress(EXE), name)
    assert _paths(report) == [f"{name}/{member}"]
    assert report.members[0].data == EXE


def test_compressed_stream_that_starts_with_zeros_is_still_read() -> None:
    # Decompressed, it starts with what looks like an empty tar; what follows must not hide.
    report = inspect_archive(gzip.compress(bytes(4096) + EXE), "backup.img.gz")
    assert _paths(report) == ["backup.img.gz/backup.img"]
    data = report.members[0].data
    assert data is not None and data.endswith(EXE)


# --- nesting ------------------------------------------------------------------------------------------


def test_nested_zip_in_zip_in_zip() -> None:
    report = inspect_archive(samples.nested_zip(3), "outer.zip")
    assert report.problems == ()
    leaf = _member(report, "outer.zip/level2.zip/level3.zip/evil.exe")
    assert leaf.depth == 3
    assert leaf.data == EXE
    # Nested archives are members too, listed before what they hold.
    paths = _paths(report)
    assert paths.index("outer.zip/level2.zip") < paths.index("outer.zip/level2.zip/level3.zip")
    assert _member(report, "outer.zip/level2.zip").depth == 1


def test_nesting_across_formats() -> None:
    inner = samples.seven_zip([("payload.exe", EXE)])
    middle = samples.tar_gz([("inner.7z", inner)])
    outer = samples.zip_of([("middle.tar.gz", middle)])
    report = inspect_archive(outer, "outer.zip")
    assert _member(report, "outer.zip/middle.tar.gz/inner.7z/payload.exe").data == EXE


def test_too_deep() -> None:
    report = inspect_archive(samples.nested_zip(5), "outer.zip")
    assert any(p.startswith("too deep: level2.zip/level3.zip/level4.zip") for p in report.problems)
    assert max(m.depth for m in report.members) == 3
    assert not any(m.name == "evil.exe" for m in report.members)


def test_depth_limit_is_a_setting() -> None:
    report = inspect_archive(samples.nested_zip(2), "outer.zip", ArchiveLimits(max_depth=1))
    assert _paths(report) == ["outer.zip/level2.zip", "outer.zip/readme1.txt"]
    assert any(p.startswith("too deep") for p in report.problems)


def test_office_documents_inside_archives_are_not_unpacked() -> None:
    report = inspect_archive(samples.zip_of([("minutes.docx", samples.docx())]), "a.zip")
    assert _paths(report) == ["a.zip/minutes.docx"]


# --- limits ---------------------------------------------------------------------------------------------


def test_zip_bomb_is_found_without_inflating_it() -> None:
    bomb = samples.zip_bomb(100)
    start = time.perf_counter()
    report = inspect_archive(bomb, "bomb.zip")
    elapsed = time.perf_counter() - start
    assert len(report.problems) == 1
    assert report.problems[0].startswith("bomb: ratio ")
    assert report.problems[0].endswith(":1 in big.txt")
    ratio = int(report.problems[0].split()[2].split(":")[0])
    assert 900 < ratio < 1100
    member = report.members[0]
    assert member.data is None
    assert member.size == 100 << 20  # what it claims
    assert elapsed < 0.2  # about 1 MB inflated, not 100


def test_tar_gz_bomb_is_found_by_the_archive_ratio() -> None:
    start = time.perf_counter()
    report = inspect_archive(samples.gzip_bomb(100), "backup.tar.gz")
    assert time.perf_counter() - start < 0.2
    assert any(p.startswith("bomb:") and p.endswith("in big.txt") for p in report.problems)


def test_gzip_bomb_is_found() -> None:
    report = inspect_archive(samples.gzip_bomb(100, None), "log.txt.gz")
    assert any(p.startswith("bomb:") for p in report.problems)


def test_bomb_nested_in_an_ordinary_zip() -> None:
    outer = samples.zip_of([("readme.txt", b"hello"), ("inner.zip", samples.zip_bomb(100))])
    report = inspect_archive(outer, "outer.zip")
    assert any(p.startswith("bomb:") and "inner.zip/big.txt" in p for p in report.problems)


def test_ratio_limit_is_a_setting() -> None:
    rng = random.Random(6)
    words = ["pupil", "timetable", "governors", "trip", "coach", "permission", "maths"]
    text = " ".join(rng.choice(words) for _ in range(300_000)).encode()  # 2.5 MB, packs about 5:1
    data = samples.zip_of([("notes.txt", text)])
    assert inspect_archive(data, "a.zip").problems == ()
    strict = inspect_archive(data, "a.zip", ArchiveLimits(max_ratio=3))
    assert any(p.startswith("bomb:") for p in strict.problems)


def test_too_many_files() -> None:
    data = samples.zip_of([(f"f{i}.txt", b"x") for i in range(30)])
    report = inspect_archive(data, "many.zip", ArchiveLimits(max_members=10))
    assert "too many files: more than 10" in report.problems
    assert len(report.members) == 10


def test_members_are_counted_at_every_depth() -> None:
    inner = samples.zip_of([(f"f{i}.txt", b"x") for i in range(8)])
    data = samples.zip_of([("a.zip", inner), ("b.zip", inner)])
    report = inspect_archive(data, "outer.zip", ArchiveLimits(max_members=12))
    assert "too many files: more than 12" in report.problems


def test_total_size_limit() -> None:
    rng = random.Random(2)
    data = samples.zip_of([(f"photo{i}.jpg", rng.randbytes(300_000)) for i in range(5)])
    report = inspect_archive(data, "photos.zip", ArchiveLimits(max_total_bytes=1_000_000))
    assert "too big: more than 1000000 bytes unpacked in total" in report.problems
    assert [m.data is not None for m in report.members] == [True, True, True, False]


def test_member_size_limit_in_a_zip_goes_on_to_the_next_member() -> None:
    data = samples.zip_of([("video.mp4", random.Random(4).randbytes(2_000_000)), ("setup.exe", EXE)])
    report = inspect_archive(data, "a.zip", ArchiveLimits(max_member_bytes=1_000_000))
    assert "too big: video.mp4 unpacks to more than 1000000 bytes" in report.problems
    assert _member(report, "a.zip/video.mp4").data is None
    assert _member(report, "a.zip/setup.exe").data == EXE


def test_member_size_limit_in_a_stream_stops_there() -> None:
    # Skipping the rest of a tar.gz member means inflating it: the walk stops and says so.
    data = samples.tar_gz([("video.mp4", random.Random(4).randbytes(2_000_000)), ("setup.exe", EXE)])
    report = inspect_archive(data, "a.tar.gz", ArchiveLimits(max_member_bytes=1_000_000))
    assert report.problems == (
        "too big: video.mp4 unpacks to more than 1000000 bytes; the rest of a.tar.gz was not inspected",
    )


# --- encryption -----------------------------------------------------------------------------------------


def test_encrypted_zip() -> None:
    report = inspect_archive(samples.zip_encrypted("invoice.exe"), "invoice.zip")
    assert report.problems == ("encrypted: invoice.exe",)
    member = report.members[0]
    assert (member.name, member.encrypted, member.data, member.size) == ("invoice.exe", True, None, len(EXE))


def test_encrypted_7z() -> None:
    report = inspect_archive(samples.seven_zip(FILES, password="infected"), "a.7z")
    assert [m.encrypted for m in report.members] == [True, True]
    assert [m.name for m in report.members] == ["trip.txt", "setup.exe"]  # names are still visible
    assert "encrypted: setup.exe" in report.problems


def test_encrypted_7z_with_hidden_names() -> None:
    report = inspect_archive(samples.seven_zip(FILES, "infected", header_encryption=True), "a.7z")
    assert report.members == ()
    assert report.problems == ("encrypted: a.7z: the file list is encrypted too",)


def test_encrypted_rar() -> None:
    report = inspect_archive(samples.rar4(FILES, encrypted=True), "a.rar")
    assert all(m.encrypted and m.data is None for m in report.members)
    assert "encrypted: setup.exe" in report.problems


def test_encrypted_zip_nested_in_plain_zip() -> None:
    outer = samples.zip_of([("inner.zip", samples.zip_encrypted())])
    report = inspect_archive(outer, "outer.zip")
    assert report.problems == ("encrypted: inner.zip/payload.exe",)


# --- hostile and broken input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (random.Random(9).randbytes(5000), "invoice.zip"),
        (b"", "empty.zip"),
        (b"PK\x03\x04" + random.Random(9).randbytes(500), "junk.zip"),
        (b"7z\xbc\xaf\x27\x1c" + random.Random(9).randbytes(500), "junk.7z"),
        (b"Rar!\x1a\x07\x00" + random.Random(9).randbytes(500), "junk.rar"),
        (b"\x1f\x8b\x08\x00" + random.Random(9).randbytes(500), "junk.gz"),
    ],
    ids=["random", "empty", "zip-sig", "7z-sig", "rar-sig", "gz-sig"],
)
def test_junk_is_unreadable_not_a_crash(data: bytes, name: str) -> None:
    report = inspect_archive(data, name)
    assert any(p.startswith(("unreadable", "encrypted")) for p in report.problems) or report.members


def test_truncated_zip() -> None:
    data = samples.nested_zip(2)
    report = inspect_archive(data[: len(data) // 2], "cut.zip")
    assert any(p.startswith("unreadable") for p in report.problems)


def test_zip_with_absurd_header_sizes() -> None:
    report = inspect_archive(samples.zip_absurd_sizes(), "absurd.zip")
    assert _paths(report) == ["absurd.zip/a.txt"]
    assert report.members[0].data == b"hello"


def test_mutated_archives_never_raise() -> None:
    rng = random.Random(11)
    originals = [
        samples.nested_zip(3),
        samples.seven_zip(FILES),
        samples.rar4(FILES),
        samples.tar_gz(FILES),
        samples.iso_image(FILES[1:])[:40_000],
        samples.zip_encrypted(),
    ]
    for original in originals:
        for _ in range(40):
            data = bytearray(original)
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = data[: rng.randrange(1, len(data) + 1)]
            report = inspect_archive(bytes(data), "mutant.zip")
            assert isinstance(report, ArchiveReport)


def test_problems_are_safe_text() -> None:
    # Member names are the sender's; control and bidi characters in them are spelled out.
    data = samples.zip_encrypted("invoice\u202efdp\n.exe")
    report = inspect_archive(data, "a.zip")
    assert report.problems == ("encrypted: invoice<U+202E>fdp<U+000A>.exe",)
    assert report.members[0].name == "invoice\u202efdp\n.exe"  # the real name, for name checks
    for problem in report.problems:
        assert all(unicodedata.category(ch) not in ("Cc", "Cf") for ch in problem)


# --- speed -------------------------------------------------------------------------------------------------


def test_ordinary_5mb_zip_is_quick() -> None:
    data = samples.ordinary_files_zip()
    assert len(data) >= 5_000_000
    start = time.perf_counter()
    filetype = identify(data, "coursework.zip")
    report = inspect_archive(data, "coursework.zip")
    for member in report.members:
        assert member.data is not None
        identify(member.data, member.name)
    elapsed = time.perf_counter() - start
    assert filetype.kind == "archive"
    assert report.problems == ()
    assert elapsed < 0.5  # about 20 ms on the development machine
