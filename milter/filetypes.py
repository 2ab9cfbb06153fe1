"""What an attachment really is, from its content, and what about its name should worry a reviewer.

`identify` asks libmagic (through python-magic) for the MIME type and description of the
first bytes, then sorts the result into the classes policy rules talk about ("executable",
"script", "disk_image", "archive", "office", "office_macro", "pdf", "html", "image",
"text", "other"). Content decides wherever it can; the file name only fills in where
content cannot tell: a JScript or PowerShell file is plain text to libmagic, but Windows
runs it because of its extension, so the extension is what makes it dangerous.

`name_problems` looks at the decoded file name (Message already undoes RFC 2047/2231):
double extensions, right-to-left overrides, invisible and look-alike characters, a name
that contradicts the content, a dangerous extension, a name long enough to push the
extension out of sight.

`has_vba_macros` (oletools), `is_encrypted_document` (pypdf, msoffcrypto-tool) and
`html_has_script` (lxml) answer the document questions. Every function here takes
hostile bytes: each bounds its input, and none raises on junk.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import threading
import unicodedata
import warnings
import zipfile
from dataclasses import FrozenInstanceError, dataclass
from typing import Any

import magic
from lxml import etree

__all__ = [
    "FileType",
    "NameProblem",
    "has_vba_macros",
    "html_has_script",
    "identify",
    "is_encrypted_document",
    "name_problems",
    "zip_flavour",
]

KINDS = (
    "executable",
    "script",
    "disk_image",
    "archive",
    "office",
    "office_macro",
    "pdf",
    "html",
    "image",
    "text",
    "other",
)

# libmagic reads at most this much; every format it knows announces itself well within it
# (ISO 9660 at 32 KB is the furthest), and text checks cost time in proportion to length.
MAGIC_SAMPLE = 256 * 1024
# Macro and encryption checks parse whole containers; larger documents are not parsed
# (they are still identified; the policy's size rules see them).
MAX_DOCUMENT_BYTES = 30_000_000
# At most this much of an HTML attachment is parsed; beyond it a plain pattern search runs.
MAX_HTML_PARSE = 10_000_000
# Names longer than this hide their extension in mail clients and Explorer alike.
VERY_LONG_NAME = 150

OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# --- what content says ------------------------------------------------------------------------

_EXECUTABLE_MIMES = frozenset(
    {
        "application/vnd.microsoft.portable-executable",
        "application/x-dosexec",
        "application/x-msdownload",
        "application/x-ms-ne-executable",
        "application/x-executable",
        "application/x-sharedlib",
        "application/x-pie-executable",
        "application/x-mach-binary",
        "application/x-java-applet",
        "application/java-archive",
        "application/x-java-archive",
        "application/vnd.android.package-archive",
        "application/x-ms-shortcut",
        "application/x-msi",
        "application/x-ms-installer",
        "application/vnd.ms-htmlhelp",
        "application/x-chm",
    }
)
_SCRIPT_MIMES = frozenset(
    {
        "text/x-shellscript",
        "application/x-shellscript",
        "text/x-msdos-batch",
        "text/x-python",
        "text/x-script.python",
        "text/x-perl",
        "text/x-ruby",
        "text/x-php",
        "text/x-tcl",
        "text/x-lua",
        "text/x-awk",
        "application/javascript",
        "text/javascript",
        "application/x-powershell",
        "text/x-ms-regedit",
    }
)
_ARCHIVE_MIMES = frozenset(
    {
        "application/zip",
        "application/x-zip-compressed",
        "application/x-7z-compressed",
        "application/x-rar",
        "application/vnd.rar",
        "application/x-rar-compressed",
        "application/x-tar",
        "application/x-gtar",
        "application/gzip",
        "application/x-gzip",
        "application/x-bzip2",
        "application/x-xz",
        "application/x-lzma",
        "application/x-lzip",
        "application/x-lz4",
        "application/zstd",
        "application/x-zstd",
        "application/x-compress",
        "application/vnd.ms-cab-compressed",
        "application/x-cpio",
        "application/x-arj",
        "application/x-lha",
        "application/x-lzh-compressed",
        "application/x-ace-compressed",
        "application/x-archive",
        "application/x-xar",
        "application/x-stuffit",
    }
)
_DISK_IMAGE_MIMES = frozenset(
    {
        "application/x-iso9660-image",
        "application/x-cd-image",
        "application/x-apple-diskimage",
        "application/x-raw-disk-image",
        "application/x-virtualbox-vhd",
        "application/x-virtualbox-vhdx",
        "application/x-vhd",
        "application/x-qemu-disk",
        "application/x-vmdk",
    }
)
# libmagic names file systems and disk images in its description, often with a generic MIME type.
_DISK_IMAGE_WORDS = (
    "ISO 9660",
    "UDF filesystem",
    "Disk Image",
    "DOS/MBR boot sector",
    "FAT (12 bit)",
    "FAT (16 bit)",
    "FAT (32 bit)",
    "NTFS",
    "QEMU QCOW",
    "VMware",
    "VirtualBox Disk Image",
)
# Generic OLE compound files: Office documents, but also installers and other containers.
_OLE_MIMES = frozenset({"application/x-ole-storage", "application/cdfv2", "application/vnd.ms-office"})
_OFFICE_MIMES = frozenset(
    {
        "application/msword",
        "application/vnd.ms-excel",
        "application/vnd.ms-powerpoint",
        "application/vnd.ms-outlook",
        "application/vnd.ms-publisher",
        "application/x-mspublisher",
        "application/vnd.ms-project",
        "application/vnd.visio",
        "application/vnd.ms-onenote",
        "application/rtf",
        "text/rtf",
        "application/encrypted",  # "CDFV2 Encrypted": a password-protected Office 2007+ file
    }
)
_OFFICE_PREFIXES = (
    "application/vnd.openxmlformats-officedocument.",
    "application/vnd.ms-word",
    "application/vnd.ms-excel",
    "application/vnd.ms-powerpoint",
    "application/vnd.oasis.opendocument.",
)
# Installer CLSIDs in an OLE root entry: MSI, patch (MSP), transform (MST).
_INSTALLER_CLSIDS = frozenset(
    bytes.fromhex(h)
    for h in (
        "84100c0000000000c000000000000046",
        "86100c0000000000c000000000000046",
        "82100c0000000000c000000000000046",
    )
)

# --- what names say -----------------------------------------------------------------------------

# Windows runs these (or hands them to something that runs code) when opened.
EXECUTABLE_EXTENSIONS = _words(
    "exe dll scr pif com cpl sys drv ocx efi xll msi msp mst msu jar class apk xapk ipa appx appxbundle "
    "msix msixbundle gadget lnk chm hlp pkg mpkg deb rpm run"
)
# Text (often XML) that Windows hands to an interpreter or launcher: scripts, registry files,
# shortcuts to commands, ClickOnce and XBAP manifests, search connectors.
SCRIPT_EXTENSIONS = _words(
    "js jse vbs vbe vb wsf wsh wsc ws sct ps1 ps1xml ps2 ps2xml psc1 psc2 psm1 psd1 bat cmd hta htc reg "
    "inf ins isp msc url website jnlp py pyw pyc pyz pl sh bash csh ksh command applescript scpt "
    "settingcontent-ms library-ms searchconnector-ms search-ms vsmacros application appref-ms xbap scf"
)
DISK_IMAGE_EXTENSIONS = _words("iso img vhd vhdx dmg udf vmdk qcow2 toast")
DANGEROUS_EXTENSIONS = EXECUTABLE_EXTENSIONS | SCRIPT_EXTENSIONS | DISK_IMAGE_EXTENSIONS
# Extensions that make a reader expect something harmless: the bait in "report.pdf.exe".
DECOY_EXTENSIONS = _words(
    "pdf doc docx docm dot dotx xls xlsx xlsm xlsb csv ppt pptx pptm pps ppsx rtf txt odt ods odp "
    "jpg jpeg png gif bmp tif tiff heic webp svg mp3 mp4 m4a mov avi wav wma wmv mkv "
    "zip rar 7z htm html xml eml msg ics vcf"
)
# Containers whose content is a zip: a zip named like this is no mismatch.
_ZIP_BASED_EXTENSIONS = _words(
    "zip docx docm dotx dotm xlsx xlsm xltx xltm xlsb pptx pptm potx ppsx ppsm odt ods odp odg "
    "epub jar apk xapk appx appxbundle msix msixbundle gadget xpi crx vsdx xps oxps nupkg kmz 3mf"
)
_PE_EXTENSIONS = _words("exe dll scr pif com cpl sys drv ocx efi xll mui ax tlb")
_ARCHIVE_EXTENSIONS = _words(
    "zip 7z rar tar gz tgz bz2 tbz tbz2 xz txz zst lz lzma z cab arj lzh lha ace cpio"
)

_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
# Blank-looking characters that are not Unicode format (Cf) or control (Cc) characters.
_BLANK_LOOKING = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f\u2028\u2029\u180e")
# Scripts with letters that pass for Latin ones (а/a, е/e, о/o, р/p, ѕ/s, Ι/I ...).
_LOOKALIKE_SCRIPTS = ("CYRILLIC", "GREEK", "ARMENIAN", "CHEROKEE", "COPTIC", "LISU")


class FileType:
    """What a blob is, from its content. A value, as a frozen dataclass of the three would be.

    mime: from content, e.g. "application/x-dosexec"
    description: libmagic's text, e.g. "PE32 executable (GUI) Intel 80386, for MS Windows"
    kind: one of KINDS

    `identify` may leave the description for libmagic to work out on first use, when the kind
    does not depend on it: it is a second pass over libmagic's database, as costly as the MIME
    type, and the scan itself seldom reads it.
    """

    __slots__ = ("_description", "_sample", "kind", "mime")
    mime: str
    kind: str
    _description: str | None  # None: not looked up yet
    _sample: bytes  # what it is looked up from

    def __init__(self, mime: str, description: str, kind: str) -> None:
        object.__setattr__(self, "mime", mime)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "_description", description)
        object.__setattr__(self, "_sample", b"")

    @classmethod
    def _described_later(cls, mime: str, kind: str, sample: bytes) -> FileType:
        filetype = cls(mime, "", kind)
        object.__setattr__(filetype, "_description", None)
        object.__setattr__(filetype, "_sample", sample)
        return filetype

    @property
    def description(self) -> str:
        description = self._description
        if description is None:
            description = _describe(self._sample)
            object.__setattr__(self, "_description", description)
            object.__setattr__(self, "_sample", b"")
        return description

    def _fields(self) -> tuple[str, str, str]:
        return self.mime, self.description, self.kind

    def __eq__(self, other: object) -> bool:
        return self._fields() == other._fields() if isinstance(other, FileType) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return f"FileType(mime={self.mime!r}, description={self.description!r}, kind={self.kind!r})"

    def __reduce__(self) -> tuple[type[FileType], tuple[str, str, str]]:
        return FileType, self._fields()

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")


@dataclass(frozen=True)
class NameProblem:
    """Something about a file name that misleads the person who sees it."""

    kind: str  # double_extension, bidi_override, invisible_characters, extension_mismatch,
    # dangerous_extension, lookalike_characters, very_long_name
    detail: str  # safe to show a reviewer: control characters are spelled <U+202E>


# --- libmagic -----------------------------------------------------------------------------------

# python-magic's Magic objects wrap one libmagic cookie, which is not safe to share across
# threads (python-magic serialises calls with a lock instead); one pair per thread avoids both.
_local = threading.local()


def _magic_pair() -> tuple[magic.Magic, magic.Magic]:
    pair: tuple[magic.Magic, magic.Magic] | None = getattr(_local, "pair", None)
    if pair is None:
        pair = (magic.Magic(mime=True), magic.Magic())
        _local.pair = pair
    return pair


# MIME types whose description cannot change the kind, so that `identify` leaves it to be
# looked up only if read. In libmagic's database (checked against file 5.44) each entry that
# gives one of these types has both on its first line ("PDF document", "PNG image data"), so
# both lookups stop at that entry, and its description adds nothing from the file but numbers:
# none of the description tests in _kind_from_content can succeed on it.
_SELF_DESCRIBED_MIMES = frozenset({"application/pdf", "image/png"})


def _libmagic(data: bytes) -> tuple[str, str | None]:
    """The MIME type and description of `data`; None for a description left for later."""
    if not data:
        return "application/x-empty", "empty"
    sample = data[:MAGIC_SAMPLE]
    mime_magic, text_magic = _magic_pair()
    try:
        mime = mime_magic.from_buffer(sample).strip().lower() or "application/octet-stream"
        if mime in _SELF_DESCRIBED_MIMES:
            return mime, None
        description = text_magic.from_buffer(sample)
    except Exception:
        # libmagic reports its own failures as exceptions (e.g. a corrupt magic database);
        # "unknown" is the honest answer and keeps the scan going.
        return "application/octet-stream", "data"
    return mime, description.strip() or "data"


def _describe(sample: bytes) -> str:
    """libmagic's description, looked up late (see FileType)."""
    try:
        description = _magic_pair()[1].from_buffer(sample)
    except Exception:
        return "data"  # as in _libmagic
    return description.strip() or "data"


# --- classification -----------------------------------------------------------------------------


# zipfile reads the whole central directory up front; a zip that declares more entries than
# any document has is left to the archive walker, which stops at its own member limit.
MAX_ZIP_ENTRIES = 10_000


def _open_zip(data: bytes) -> zipfile.ZipFile:
    """A ZipFile over `data`, refused (ValueError) when its end record declares too many entries."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_557))
    if end < 0 or end + 22 > len(data):
        raise ValueError("no end of central directory")
    (entries,) = struct.unpack_from("<H", data, end + 10)
    # 0xFFFF means the count is in a zip64 record: possibly millions; not a document's shape.
    if entries >= min(MAX_ZIP_ENTRIES, 0xFFFF):
        raise ValueError("too many entries")
    return zipfile.ZipFile(io.BytesIO(data))


def zip_flavour(data: bytes) -> str | None:
    """What a zip-based file is for, from its member names: "ooxml", "odf", "epub", "jar", "apk",
    "appx", or None for a plain zip archive (or not a readable zip)."""
    if not data.startswith(b"PK"):
        return None
    try:
        with _open_zip(data) as zf:
            infos = zf.infolist()
            names = {info.filename for info in infos}
            if "AppxManifest.xml" in names or "AppxMetadata/AppxBundleManifest.xml" in names:
                return "appx"
            if "AndroidManifest.xml" in names:
                return "apk"
            if "META-INF/MANIFEST.MF" in names and any(n.endswith(".class") for n in names):
                return "jar"
            if "[Content_Types].xml" in names:
                return "ooxml"
            if infos and infos[0].filename == "mimetype" and infos[0].file_size < 200:
                declared = zf.read(infos[0])
                if declared.startswith(b"application/vnd.oasis.opendocument."):
                    return "odf"
                if declared.startswith(b"application/epub+zip"):
                    return "epub"
    except Exception:
        return None
    return None


def _ole_root_clsid(data: bytes) -> bytes | None:
    """The CLSID of an OLE file's root entry (MS-CFB 2.2 and 2.6), read from the header alone."""
    if not data.startswith(OLE_MAGIC) or len(data) < 512:
        return None
    (shift,) = struct.unpack_from("<H", data, 30)
    (first_dir,) = struct.unpack_from("<I", data, 48)
    if shift not in (9, 12) or first_dir >= 0xFFFFFFFA:
        return None
    offset = (first_dir + 1) << shift
    if offset + 96 > len(data):
        return None
    return data[offset + 80 : offset + 96]


def _kind_from_content(mime: str, description: str, data: bytes) -> str:
    if mime in _EXECUTABLE_MIMES or description.startswith(("PE32", "MS-DOS executable", "ELF ", "Mach-O")):
        return "executable"
    if "MSI Installer" in description:
        return "executable"
    if mime in _DISK_IMAGE_MIMES or any(word in description for word in _DISK_IMAGE_WORDS):
        return "disk_image"
    if mime in _SCRIPT_MIMES or description.startswith(("DOS batch file", "Windows Registry")):
        return "script"
    if mime in ("application/zip", "application/x-zip-compressed") or data.startswith(b"PK\x03\x04"):
        flavour = zip_flavour(data)
        if flavour in ("jar", "apk", "appx"):
            return "executable"
        if flavour in ("ooxml", "odf"):
            return "office"
        if flavour == "epub":
            return "other"
        if mime.startswith(_OFFICE_PREFIXES):
            return "office"  # libmagic recognised the package though zipfile could not read it
        return "archive"
    if mime in _OLE_MIMES:
        return "executable" if _ole_root_clsid(data) in _INSTALLER_CLSIDS else "office"
    if mime in _OFFICE_MIMES or mime.startswith(_OFFICE_PREFIXES):
        return "office"
    if mime in _ARCHIVE_MIMES:
        return "archive"
    if mime == "application/pdf":
        return "pdf"
    # SVG opens in the browser from a mail client and runs its scripts there, like HTML.
    if mime in ("text/html", "application/xhtml+xml", "image/svg+xml"):
        return "html"
    if mime.startswith("image/"):
        return "image"
    if mime.startswith("text/") or mime in ("application/json", "application/xml"):
        return "text"
    return "other"


def _refine_with_extension(kind: str, mime: str, extension: str) -> str:
    """Where content cannot tell, the extension decides what Windows will do with the file."""
    if extension in SCRIPT_EXTENSIONS and kind in ("text", "html", "other"):
        return "script"  # .js, .vbs, .ps1, .hta, .wsf ... are text (or HTML) that Windows runs
    if extension in EXECUTABLE_EXTENSIONS and (kind in ("other", "archive") or mime in _OLE_MIMES):
        return "executable"  # a raw .com, a .gadget or .appx zip, an .msi whose CLSID we missed
    if extension in DISK_IMAGE_EXTENSIONS and kind in ("other", "archive"):
        return "disk_image"  # raw .img, compressed .dmg: nothing for libmagic to recognise
    return kind


def identify(data: bytes, filename: str = "") -> FileType:
    """The true type of `data`, from its content; `filename` only fills in what content cannot tell."""
    mime, description = _libmagic(data)
    # No description: one that cannot change the kind (see _SELF_DESCRIBED_MIMES).
    kind = _kind_from_content(mime, description or "", data)
    kind = _refine_with_extension(kind, mime, _extension(_basename(filename)))
    if kind == "office" and (has_vba_macros(data) or _odf_has_macros(data)):
        kind = "office_macro"
    if description is None:
        return FileType._described_later(mime, kind, data[:MAGIC_SAMPLE])
    return FileType(mime=mime, description=description, kind=kind)


# --- names ----------------------------------------------------------------------------------------


def _basename(filename: str) -> str:
    # Some clients send a path ("C:\\fakepath\\x.pdf"); what the reader sees is the last part.
    return re.split(r"[\\/]", filename)[-1]


def _extension(name: str) -> str:
    """The extension Windows acts on: trailing dots and spaces are ignored by Windows, so here too."""
    stripped = name.rstrip(". \t")
    if "." not in stripped:
        return ""
    return stripped.rsplit(".", 1)[1].lower()


def _visible(text: str) -> str:
    """The name with every invisible or control character spelled out, so a reviewer sees it."""
    out = []
    for ch in text:
        if (
            ch in _BIDI_CONTROLS
            or ch in _BLANK_LOOKING
            or unicodedata.category(ch) in ("Cf", "Cc", "Co", "Cn")
        ):
            out.append(f"<U+{ord(ch):04X}>")
        else:
            out.append(ch)
    return "".join(out)


def _as_displayed(name: str) -> str:
    """Roughly how a right-to-left override shows the name: the text after U+202E (up to U+202C) reversed."""
    out: list[str] = []
    reversed_run: list[str] | None = None
    for ch in name:
        if ch == "\u202e":
            reversed_run = []
        elif ch in ("\u202c", "\u2069") and reversed_run is not None:
            out.extend(reversed(reversed_run))
            reversed_run = None
        elif ch in _BIDI_CONTROLS:
            continue
        elif reversed_run is not None:
            reversed_run.append(ch)
        else:
            out.append(ch)
    if reversed_run is not None:
        out.extend(reversed(reversed_run))
    return "".join(out)


def _content_phrase(filetype: FileType) -> str:
    """A few plain words for what the content is, for a mismatch detail."""
    mime, description = filetype.mime, filetype.description
    if description.startswith(("PE32", "MS-DOS executable")) or mime in (
        "application/vnd.microsoft.portable-executable",
        "application/x-dosexec",
        "application/x-msdownload",
    ):
        return "a Windows executable"
    if description.startswith("ELF") or mime in ("application/x-executable", "application/x-sharedlib"):
        return "a Linux executable"
    if mime == "application/x-mach-binary":
        return "a macOS executable"
    if mime == "application/x-ms-shortcut":
        return "a Windows shortcut"
    if mime in ("application/x-java-applet", "application/java-archive", "application/x-java-archive"):
        return "a Java program"
    phrases = {
        "executable": "a program",
        "script": "a script",
        "disk_image": "a disk image",
        "archive": "an archive",
        "html": "a web page",
        "office": "an Office document",
        "office_macro": "an Office document with macros",
        "pdf": "a PDF",
        "image": "an image",
        "text": "text",
    }
    return phrases.get(filetype.kind, "something else")


def _danger(extension: str) -> str:
    if extension in DISK_IMAGE_EXTENSIONS:
        return f".{extension} files open as a drive, where programs hide from mail scanners"
    if extension in SCRIPT_EXTENSIONS:
        return f".{extension} files are scripts that Windows runs when opened"
    return f".{extension} files run a program when opened"


def _mismatch(extension: str, filetype: FileType) -> bool:
    kind = filetype.kind
    if not extension:
        return False
    if kind == "executable":
        if (
            filetype.mime == "application/vnd.microsoft.portable-executable"
            or filetype.description.startswith("PE32")
        ):
            return extension not in _PE_EXTENSIONS
        return extension not in EXECUTABLE_EXTENSIONS | SCRIPT_EXTENSIONS | {"so", "dylib", "bin", "out", "o"}
    if kind == "disk_image":
        return extension not in DISK_IMAGE_EXTENSIONS | {"bin", "raw", "cdr", "vdi"}
    if kind == "script":
        return extension in DECOY_EXTENSIONS
    if kind == "archive":
        # A zip named .pdf or .jpg hides its members from anyone trusting the name.
        return extension in DECOY_EXTENSIONS and extension not in _ZIP_BASED_EXTENSIONS | _ARCHIVE_EXTENSIONS
    if kind == "html":
        # A web page dressed as a PDF or a picture (HTML smuggling). Spreadsheets exported as
        # HTML with an .xls name are common and harmless, so Office extensions are left alone.
        return extension in ("pdf", "jpg", "jpeg", "png", "gif", "bmp", "tif", "tiff", "txt")
    return False


def name_problems(filename: str, filetype: FileType) -> list[NameProblem]:
    """What about `filename` (already RFC 2047/2231-decoded) misleads, given what the content is."""
    problems: list[NameProblem] = []
    name = _basename(filename)
    if not name:
        return problems
    shown = _visible(name)
    extension = _extension(name)

    if any(ch in _BIDI_CONTROLS for ch in name):
        displayed = _as_displayed(name)
        detail = shown if displayed == name else f"{shown} (shows as {_visible(displayed)})"
        problems.append(NameProblem("bidi_override", detail))

    invisible = sorted(
        {
            ch
            for ch in name
            if ch not in _BIDI_CONTROLS and (ch in _BLANK_LOOKING or unicodedata.category(ch) in ("Cf", "Cc"))
        }
    )
    if invisible:
        problems.append(NameProblem("invisible_characters", shown))

    lookalikes = _lookalike_characters(name)
    if lookalikes:
        listing = ", ".join(f"{ch} (U+{ord(ch):04X} {unicodedata.name(ch, '?')})" for ch in lookalikes[:5])
        problems.append(NameProblem("lookalike_characters", f"{shown}: {listing}"))

    if extension in DANGEROUS_EXTENSIONS:
        stem = name.rstrip(". \t").rsplit(".", 1)[0]
        # Spaces before the last dot push the real extension out of view ("a.pdf      .exe").
        inner = _extension(stem.rstrip())
        if inner in DECOY_EXTENSIONS:
            problems.append(NameProblem("double_extension", shown))
        problems.append(NameProblem("dangerous_extension", f"{shown}: {_danger(extension)}"))

    if _mismatch(extension, filetype):
        problems.append(
            NameProblem("extension_mismatch", f"named .{extension} but is {_content_phrase(filetype)}")
        )

    if len(name) > VERY_LONG_NAME:
        problems.append(
            NameProblem("very_long_name", f"{len(name)} characters, ending ...{_visible(name[-40:])}")
        )
    return problems


def _lookalike_characters(name: str) -> list[str]:
    """Characters that pass for Latin letters, digits or dots where Latin is expected."""
    if name.isascii():
        return []  # only non-ASCII characters are ever reported; most names have none
    found: list[str] = []
    extension = _extension(name)
    for word in re.findall(r"\w+|[^\w\s]", name):
        has_ascii = any(ch.isascii() and ch.isalpha() for ch in word)
        in_extension = word.lower() == extension or (extension and word.lower().endswith(extension))
        scripts = {_script(ch) for ch in word if ch.isalpha()}
        # Latin mixed with Cyrillic or Greek inside one word ("pаypal", "invoice.рdf"); a word
        # wholly in one script is someone's language, not a disguise.
        mixed = "LATIN" in scripts and bool(scripts & set(_LOOKALIKE_SCRIPTS))
        for ch in word:
            if ch.isascii() or ch in found:
                continue
            folded = unicodedata.normalize("NFKC", ch)
            # Fullwidth and mathematical letters fold to ASCII; they disguise a word only among
            # ASCII letters (a fullwidth word alone is ordinary in Japanese text). Dot look-alikes
            # such as U+2024 ONE DOT LEADER fake an extension wherever they are.
            disguise = folded != ch and (
                folded == "." or (folded.isascii() and folded.isalnum() and (has_ascii or in_extension))
            )
            if disguise or (mixed and _script(ch) in _LOOKALIKE_SCRIPTS):
                found.append(ch)
    return found


def _script(ch: str) -> str:
    if ch.isascii():
        return "LATIN" if ch.isalpha() else ""
    return unicodedata.name(ch, "").split(" ", 1)[0]


# --- macros -----------------------------------------------------------------------------------

# oletools logs through its own loggers; what it would log describes attachment content, which
# must not reach our logs (policy 2.4), and its warnings about odd files are noise here.
for _name in ("olevba", "olefile", "oletools", "ftguess", "msoffcrypto", "pypdf"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


def _olevba() -> Any:
    """oletools.olevba, imported on first use (it takes 0.1 s) without its pyparsing deprecation noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from oletools import olevba
    return olevba


def _ole_has_vba(data: bytes) -> bool:
    parser = _olevba().VBA_Parser("attachment", data=data)
    try:
        return bool(parser.detect_vba_macros())
    finally:
        parser.close()


def has_vba_macros(data: bytes) -> bool:
    """True when `data` carries a VBA project: an OLE document (.doc, .xls, .ppt), an Office 2007+
    package (its vbaProject.bin or an embedded OLE object), or Word 2003 XML / MHT forms."""
    if not data or len(data) > MAX_DOCUMENT_BYTES:
        return False
    try:
        if data.startswith(OLE_MAGIC):
            return _ole_has_vba(data)
        if data.startswith(b"PK\x03\x04"):
            return _zip_has_vba(data)
        head = data[:MAGIC_SAMPLE].lower()
        # olevba takes any other input for VBA source text and says "macros" for it, so it only
        # sees the XML and MHT forms of Office documents that can hold a VBA project.
        if (
            b"http://schemas.microsoft.com/office/word/2003/wordml" in data
            or b"http://schemas.microsoft.com/office/2006/xmlpackage" in head
            or (b"mime-version" in head and b"multipart" in head)
        ):
            olevba = _olevba()
            parser = olevba.VBA_Parser("attachment", data=data)
            try:
                return parser.type != olevba.TYPE_TEXT and bool(parser.detect_vba_macros())
            finally:
                parser.close()
    except Exception:
        # oletools raises on malformed input in many ways; a file it cannot parse is reported
        # by what identify says about it, not as a crash here.
        return False
    return False


def _zip_has_vba(data: bytes) -> bool:
    # olevba would walk the zip itself, reading every OLE-looking member whole; reading
    # each member here with a bound keeps a zip bomb dressed as a .docm harmless.
    budget = MAX_DOCUMENT_BYTES
    with _open_zip(data) as zf:
        for info in zf.infolist():
            if info.is_dir() or info.file_size > budget or info.flag_bits & 0x1:
                continue
            with zf.open(info) as member:
                if member.read(8) != OLE_MAGIC:
                    continue
                blob = OLE_MAGIC + member.read(budget + 1)
            budget -= len(blob)
            if budget < 0:
                return False
            if _ole_has_vba(blob):
                return True
    return False


def _odf_has_macros(data: bytes) -> bool:
    """OpenDocument files keep Basic macros under Basic/ (script-lc.xml alone is an empty library list)."""
    if zip_flavour(data) != "odf":
        return False
    try:
        with _open_zip(data) as zf:
            return any(
                n.startswith(("Basic/", "Scripts/"))
                and not n.endswith(("script-lc.xml", "script-lb.xml", "/"))
                for n in zf.namelist()
            )
    except Exception:
        return False


# --- encryption -----------------------------------------------------------------------------------

# The trailer (or cross-reference stream dictionary) of an encrypted PDF names its /Encrypt
# dictionary; both are always stored uncompressed, so a byte search never misses one.
_PDF_ENCRYPT_REF = re.compile(rb"/Encrypt\s*(?:\d+\s+\d+\s+R|<<)")


def is_encrypted_document(data: bytes, filetype: FileType) -> bool:
    """True for a password-protected PDF, Office document (97-2003 or 2007+) or OpenDocument file."""
    try:
        if filetype.kind == "pdf" or b"%PDF-" in data[:1024]:  # readers allow junk before the header
            return _pdf_encrypted(data)
        if filetype.mime == "application/encrypted":
            return True  # libmagic saw the EncryptionInfo/EncryptedPackage container
        if data.startswith(OLE_MAGIC) and filetype.kind in ("office", "office_macro"):
            return _ole_office_encrypted(data)
        if zip_flavour(data) == "odf":
            with _open_zip(data) as zf:
                info = zf.getinfo("META-INF/manifest.xml")
                if info.file_size > 5_000_000:
                    return False
                return b"encryption-data" in zf.read(info)
    except Exception:
        return False
    return False


def _pdf_encrypted(data: bytes) -> bool:
    if b"/Encrypt" not in data:
        return False
    if len(data) <= MAX_DOCUMENT_BYTES:
        try:
            from pypdf import PdfReader

            return bool(PdfReader(io.BytesIO(data), strict=False).is_encrypted)
        except Exception:
            pass  # a PDF too broken for pypdf: fall back to the trailer's own words
    return _PDF_ENCRYPT_REF.search(data) is not None


def _ole_office_encrypted(data: bytes) -> bool:
    if len(data) > MAX_DOCUMENT_BYTES:
        return False
    import msoffcrypto

    try:
        office = msoffcrypto.OfficeFile(io.BytesIO(data))
        return bool(office.is_encrypted())
    except Exception:
        return False  # not a format msoffcrypto knows (an MSI, a .msg): not an encrypted document


# --- HTML -----------------------------------------------------------------------------------------

_URL_ATTRIBUTES = _words(
    "href src action formaction data background lowsrc dynsrc poster codebase cite to from values"
)
_SCRIPT_SCHEMES = (
    "javascript:",
    "vbscript:",
    "livescript:",
    "data:text/html",
    "data:text/javascript",
    "data:application/javascript",
    "data:application/x-javascript",
    "data:image/svg+xml",
)
_SCRIPT_PATTERN = re.compile(
    rb"<script\b|<[a-z][^>]*\son[a-z]+\s*=|(?:java|vb)\s*script\s*:",
    re.IGNORECASE,
)
_CONTROLS = re.compile(r"[\x00-\x20\x7f]+")


def _is_script_url(value: str) -> bool:
    # Browsers ignore whitespace and control characters inside a URL scheme ("java\tscript:").
    folded = _CONTROLS.sub("", value).lower()
    return folded.startswith(_SCRIPT_SCHEMES)


def html_has_script(data: bytes) -> bool:
    """True when HTML (or SVG) carries code: <script>, on* event handlers, javascript:/vbscript: URLs."""
    if not data:
        return False
    if len(data) > MAX_HTML_PARSE:
        return _SCRIPT_PATTERN.search(data) is not None
    try:
        return _html_tree_has_script(data, nested=0)
    except Exception:
        return _SCRIPT_PATTERN.search(data) is not None


def _html_tree_has_script(data: bytes, nested: int) -> bool:
    parser = etree.HTMLParser(recover=True, no_network=True, remove_comments=True)
    root = etree.fromstring(data, parser)
    if root is None:
        return _SCRIPT_PATTERN.search(data) is not None
    for element in root.iter():
        tag = element.tag
        if not isinstance(tag, str):
            continue  # processing instructions, entities
        if tag.rsplit("}", 1)[-1].lower() == "script":
            return True
        for raw_name, value in element.attrib.items():
            name = str(raw_name).rsplit("}", 1)[-1].rsplit(":", 1)[-1].lower()
            text = str(value)
            if name.startswith("on"):
                return True
            if name in _URL_ATTRIBUTES and _is_script_url(text):
                return True
            if name == "content" and "script:" in _CONTROLS.sub("", text).lower():
                return True  # <meta http-equiv="refresh" content="0;url=javascript:...">
            if name == "srcdoc" and nested < 2 and _html_tree_has_script(text.encode("utf-8"), nested + 1):
                return True
    return False
