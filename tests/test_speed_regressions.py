"""The faster forms chosen for the scanning engine's hot paths give the same answers as the plain ones.

Each fast path here stands in for a simpler formulation (a stdlib call, a regular expression over
the text, an eager libmagic call); these tests hold them to that formulation on ordinary, hostile
and random input.
"""

from __future__ import annotations

import copy
import dataclasses
import email.feedparser
import pickle
import random
import re
import socket
import struct
import tempfile
import threading
from email import policy
from email.message import EmailMessage
from email.message import Message as StdMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from milter import filetypes, message, normalize, urls
from milter.clamd import ClamdClient, ClamdResult
from milter.detectors import shouting
from milter.filetypes import FileType, identify
from milter.policy.loader import Rules
from milter.textview import html_view
from tests import samples
from tests.conftest import SHARED
from tests.mail import build

# --- message: the stdlib parser without a regex compile per boundary ---------------------------


def shape(part: StdMessage) -> object:
    """Everything the parser decided about a message tree."""
    payload = part._payload  # type: ignore[attr-defined]
    return (
        list(part.raw_items()),
        [type(d).__name__ for d in part.defects],
        part.preamble,
        part.epilogue,
        [shape(p) for p in payload] if isinstance(payload, list) else payload,
    )


def multipart(boundary: str, nl: str, *, after_separator: str = "", close: str | None = "--") -> bytes:
    lines = [f'Content-Type: multipart/mixed; boundary="{boundary}"', "", "preamble"]
    for i in range(2):
        lines += [f"--{boundary}{after_separator}", "Content-Type: text/plain", "", f"part {i}", ""]
    lines += [f"--{boundary}-not-a-boundary", "still part 1"]
    if close is not None:
        lines += [f"--{boundary}{close}", "epilogue"]
    return nl.join(lines).encode("utf-8", "surrogateescape")


BOUNDARIES = [
    "simple",
    "=_Part_1.2",
    "a b c",
    "x.y+z(1)*?",
    "weird$^[]{}|\\",
    "--dash--",
    "tab\there",
    "é8bit",
]


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("nl", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize(
    ("after_separator", "close"),
    [("", "--"), ("  \t", "-- "), (" trailing words", "--"), ("", None), ("--", "--\t")],
)
def test_parse_gives_the_stdlib_tree(boundary: str, nl: str, after_separator: str, close: str | None) -> None:
    raw = multipart(boundary, nl, after_separator=after_separator, close=close)
    assert shape(message._parse(raw)) == shape(BytesParser(policy=policy.compat32).parsebytes(raw))


def test_parse_gives_the_stdlib_tree_for_nested_and_chunk_straddling_messages() -> None:
    nested = (
        b'Content-Type: multipart/mixed; boundary="outer"\n\n--outer\n'
        b'Content-Type: multipart/alternative; boundary="inner"\n\n--inner\n\ntext\n'
        b"--outer\n\nouter boundary closes the inner part\n--outer--\n"
    )
    raws = [nested]
    # A CRLF split across the stdlib's 8192-character feeds.
    for size in range(8170, 8200):
        raws.append(
            b'Content-Type: multipart/mixed; boundary="q"\r\n\r\n--q\r\n\r\n' + b"A" * size + b"\r\n--q--\r\n"
        )
    for raw in raws:
        assert shape(message._parse(raw)) == shape(BytesParser(policy=policy.compat32).parsebytes(raw))


NESTED_MESSAGES = [
    (
        b'From: a@b.example\nContent-Type: multipart/mixed; boundary="outer"\n\npreamble\n--outer\n'
        b'Content-Type: multipart/alternative; boundary="inner"\n\n--inner\nContent-Type: text/plain\n\n'
        b"plain\n--outer-looks-like-a-boundary\n--inner\nContent-Type: text/html\n\n<p>html</p>\n--inner--\n"
        b"inner epilogue\n--outer\nContent-Type: message/rfc822\n\nSubject: inner\n\nbody\n--outer\n"
        b'Content-Type: multipart/report; boundary="r"\n\n--r\nContent-Type: message/delivery-status\n\n'
        b"Reporting-MTA: dns; x\n\nFinal-Recipient: rfc822; y\n--r--\n--outer--\nepilogue\n"
    ),
    (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n--b\r\n\r\ndouble boundary\r\n'
        b"--b \t\r\nno headers\r\n--b--"
    ),
]


@pytest.mark.parametrize("base", NESTED_MESSAGES, ids=["nested", "crlf"])
def test_parse_gives_the_stdlib_tree_for_every_truncation(base: bytes) -> None:
    # A message cut short anywhere: an end of input inside a part, on a boundary line, or
    # just after one (where the stdlib pushes the end of input back and reads it again).
    cuts = sorted({i for i in range(len(base) + 1) if i in (0, len(base)) or base[i - 1 : i] in b"\r\n-"})
    for cut in cuts:
        raw = base[:cut]
        assert shape(message._parse(raw)) == shape(BytesParser(policy=policy.compat32).parsebytes(raw)), cut


def test_end_of_line_search_from_the_last_two_characters_finds_the_stdlibs_match() -> None:
    rng = random.Random(3)
    stdlib = email.feedparser.NLCRE_eol  # type: ignore[attr-defined]
    texts = ["", "\n", "\r", "\r\n", "\n\r", "x\r\n", "x\n\n", "\r\r", "x"]
    texts += ["".join(rng.choice("\r\nx ") for _ in range(rng.randint(0, 8))) for _ in range(5_000)]
    for text in texts:
        got, want = message._EolPattern().search(text), stdlib.search(text)
        assert (got and (got.group(0), got.span())) == (want and (want.group(0), want.span())), repr(text)


# --- message: a part's file name and attachment status worked out once --------------------------


def plain_attachments(msg: message.Message) -> list[tuple[str, str, int]]:
    """`Message.attachments` as it was written before the per-part facts were kept."""
    out = []
    for part in msg._leaves:
        filename = message.Message._filename(part)
        if not message.Message._is_attachment(part, filename):
            continue
        raw_payload = part.get_payload()
        size = len(raw_payload) if isinstance(raw_payload, str | bytes) else 0
        if part.get("content-transfer-encoding", "").strip().lower() == "base64":
            size = size * 3 // 4
        out.append((filename, part.get_content_type(), size))
    return out


def plain_text_part_types(msg: message.Message) -> list[str]:
    """The subtypes `_text_parts` keeps, chosen as before the per-part facts were kept."""
    kept = []
    for part in msg._leaves:
        if part.get_content_maintype() != "text" or message.Message._is_attachment(
            part, message.Message._filename(part)
        ):
            continue
        kept.append(part.get_content_subtype())
    return kept


def attachment_test_messages() -> list[bytes]:
    made = EmailMessage()
    made["Subject"] = "parts"
    made.set_content("body text")
    made.add_alternative("<p>html</p>", subtype="html")
    made.add_attachment(b"%PDF-1.4 x", maintype="application", subtype="pdf", filename="trip.pdf")
    made.add_attachment("notes", subtype="plain", filename="=?utf-8?q?n=C3=B6tes?=.txt")
    made.add_attachment(b"GIF89a", maintype="image", subtype="gif")  # no name: still an attachment
    inline = EmailMessage()
    inline.set_content("inline text, but a named part")
    inline.replace_header("Content-Type", 'text/plain; name="shown.txt"')
    raws = [made.as_bytes(), inline.as_bytes(), b"Subject: bare\n\nno MIME at all\n"]
    corpora = SHARED / "corpora"
    if corpora.is_dir():
        raws += [p.read_bytes() for p in sorted(corpora.rglob("*.eml"))[:80]]
    return raws


def test_attachments_and_text_parts_are_chosen_as_before() -> None:
    for raw in attachment_test_messages():
        msg = message.Message(raw)
        attachments = [(a.filename, a.content_type, a.size) for a in msg.attachments]
        assert attachments == plain_attachments(message.Message(raw))
        assert [subtype for subtype, _ in msg._text_parts] == plain_text_part_types(message.Message(raw))


def test_boundary_patterns_are_matched_without_compiling_and_others_are_compiled() -> None:
    separator = "--===============5474659626910129399=="
    stdlib_pattern = (
        "(?P<sep>" + re.escape(separator) + r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"
    )
    fast = message._compile(stdlib_pattern)
    slow = re.compile(stdlib_pattern)
    assert isinstance(fast, message._BoundaryPattern)
    for line in [
        separator,
        separator + "\n",
        separator + "--\r\n",
        separator + " \t\r",
        separator + "x\n",
        "x",
    ]:
        got, want = fast.match(line), slow.match(line)
        assert (got is None) == (want is None)
        if want is not None:
            assert got is not None
            assert (got.group("end"), got.group("linesep")) == (want.group("end"), want.group("linesep"))
    assert isinstance(message._compile(r"(?P<sep>a|b)"), re.Pattern)


# --- textview: per-render memo of element state, control characters -----------------------------


def test_same_attributes_under_different_parents_get_their_own_state() -> None:
    view = html_view(
        '<div style="display:none"><p style="color:red">gone</p></div><p style="color:red">shown</p>'
        '<div style="font-size:0"><a href="x">tiny link</a></div><a href="y">plain link</a>'
    )
    assert view.visible == "shown\nplain link"
    assert view.hidden == "gone\ntiny link"
    # A link's text is what the reader sees on it: none for the hidden one.
    assert [(link.href, link.text) for link in view.links] == [("x", ""), ("y", "plain link")]


def test_style_sheet_classes_and_ids_are_part_of_an_elements_state() -> None:
    view = html_view(
        "<style>.h{display:none} #v{visibility:hidden}</style>"
        '<p class="h" style="color:red">one</p><p class="k" style="color:red">two</p>'
        '<p id="v" style="color:red">three</p><p id="w" style="color:red">four</p>'
    )
    assert view.visible == "two\nfour"
    assert view.hidden == "one\nthree"


@pytest.mark.parametrize(
    ("html", "expected"),
    [("s\x00h\x0bi\x7ft", "shit"), ("é\x01x\x1f", "éx"), ("a\x0cb\rc", "a b c"), ("\x08", "")],
)
def test_control_characters_are_dropped_from_ascii_and_other_text_alike(html: str, expected: str) -> None:
    assert html_view(html).visible == expected


# --- shouting: the two-capitals-words search over letter classes ----------------------------------


def test_two_caps_words_search_over_classes_matches_the_regex() -> None:
    rng = random.Random(11)
    alphabet = ["A", "B", "Z", "a", "z", "'", "’", " ", ".", "\n", "1", "é", "É", "😀", "\udcff", "ß"]
    texts = ["", "HELLO WORLD", "HELLO world", "O'NEIL SAYS", "McDONALD SAID", "DON’T SHOUT", "A B C"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(20_000)]
    for text in texts:
        assert shouting._has_two_caps_words(text) == bool(shouting._TWO_CAPS_WORDS.search(text)), repr(text)


def reference_longest_caps_run(text: str) -> int:
    """longest_caps_run with its regular expressions over the text itself, as first written."""
    best = run = 0
    last_end = -1
    for m in shouting._CAPS_WORD.finditer(text):
        gap = text[last_end : m.start()] if last_end >= 0 else ""
        run = run + 1 if last_end >= 0 and not shouting._LETTER.search(gap) and "\n\n" not in gap else 1
        best = max(best, run)
        last_end = m.end()
    return best


def test_longest_caps_run_with_its_shortcuts_matches_the_plain_walk() -> None:
    rng = random.Random(13)
    alphabet = ["A", "B", "Z", "a", "z", "'", "’", " ", ".", "\n", "1", "_", "é", "É", "😀", "\udcff"]
    texts = ["", "A", "AB", "A'", "’A", "I am", "OK then", "HELLO WORLD AGAIN", "a\n\nNO WAY", "É'A", "_AB_"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(20_000)]
    for text in texts:
        assert shouting.longest_caps_run(text) == reference_longest_caps_run(text), repr(text)


# --- urls: text without "://" or "www." is not searched -------------------------------------------


def reference_extract_urls(text: str) -> list[str]:
    found: dict[str, None] = {}
    for match in urls._URL_RE.finditer(text):
        url = urls._trim_url(match.group())
        prefix = url.find("//") + 2 if url[:1] in "hHfF" else 4
        if len(url) > prefix and url not in found:
            found[url] = None
    return list(found)


def test_extract_urls_with_its_shortcut_matches_the_plain_search() -> None:
    rng = random.Random(17)
    pieces = [
        "http",
        "HTTPS",
        "ftp",
        "://",
        ":/",
        "www",
        "WwW",
        "ww",
        ".",
        "x",
        "example",
        "/",
        " ",
        "\n",
        "@",
    ]
    pieces += ["é", "İ", "ﬃ", "\u200b", ")", "("]
    texts = ["", "see www.example.org.", "HTTP://A.EXAMPLE/x", "awww.x", "wWw.x", "ftp://f", "no links"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 10))) for _ in range(20_000)]
    for text in texts:
        assert urls.extract_urls(text) == reference_extract_urls(text), repr(text)


# --- normalize: rare spots found over classes and a big-integer comparison ----------------------


def reference_rare_positions(folded: str, stream: str) -> list[int]:
    positions = [m.start() for m in normalize._SYMBOL.finditer(folded)]
    positions.extend(m.start() for m in normalize._BANG.finditer(folded))
    positions.extend(m.start() for m in normalize._DIGIT_LETTER.finditer(folded))
    if any(m.group(1).isalpha() for m in normalize._ANY_RUN3.finditer(stream)):
        positions.extend(m.start() for m in normalize._RUN3.finditer(folded))
    return sorted(positions)


def test_rare_positions_match_the_regular_expressions_over_the_text() -> None:
    rng = random.Random(5)
    pieces = [
        "a",
        "b",
        "s",
        "d",
        "1",
        "0",
        "9",
        "@",
        "$",
        "|",
        "+",
        "*",
        "#",
        "%",
        "!",
        " ",
        ".",
        "aaa",
        "000",
    ]
    texts = ["", "sh1t", "f**k", "fuuuck", "10am 3rd", "aa a", "$100", "f.u.c.k", "x" * 3]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 15))) for _ in range(20_000)]
    for text in texts:
        folded = normalize._fold(text)[0]
        stream = normalize._stream(folded)
        assert normalize._rare_positions(folded, stream) == reference_rare_positions(folded, stream), text


@pytest.mark.parametrize(
    ("stream", "expected"),
    [(" ", False), ("", False), (" aaa ", True), (" baaa ", True), (" 000 ", False), (" aa a ", False)],
)
def test_letter_run_of_three(stream: str, expected: bool) -> None:
    assert normalize._has_letter_run3(stream) is expected


def test_letter_runs_on_long_streams_are_found_anywhere() -> None:
    body = " ".join(["abc"] * 50_000)
    assert not normalize._has_letter_run3(f" {body} ")
    for at in (1, len(body) // 2, len(body) - 2):
        assert normalize._has_letter_run3(f" {body[:at]}zzz{body[at:]} ")


# --- filetypes: a description that cannot change the kind is looked up on first use -------------


def libmagic_description(data: bytes) -> str:
    return str(filetypes._magic_pair()[1].from_buffer(data[: filetypes.MAGIC_SAMPLE])).strip() or "data"


HOSTILE_WORDS = b" PE32 MS-DOS executable ELF MSI Installer ISO 9660 NTFS VMware DOS batch file /Count 12 "


@pytest.mark.parametrize(
    "data",
    [
        samples.pdf(),
        samples.pdf(password="secret"),
        samples.png(),
        b"%PDF-1.7\n" + HOSTILE_WORDS * 3 + b"\n%%EOF\n",
        samples.png()[:30] + HOSTILE_WORDS,
    ],
    ids=["pdf", "encrypted-pdf", "png", "pdf-with-words", "png-with-words"],
)
def test_a_description_left_for_later_could_not_have_changed_the_kind(data: bytes) -> None:
    filetype = identify(data, "file.dat")
    assert filetype.mime in filetypes._SELF_DESCRIBED_MIMES
    description = libmagic_description(data)
    assert filetypes._kind_from_content(filetype.mime, description, data) == filetype.kind
    assert filetype.description == description


SAMPLES = {
    "pe": samples.pe_exe(),
    "elf": samples.elf_exe(),
    "macho": samples.macho_exe(),
    "lnk": samples.lnk_shortcut(),
    "vhd": samples.vhd_image(),
    "vhdx": samples.vhdx_image(),
    "iso": samples.iso_image([("a.txt", b"hello")]),
    "msi": samples.msi_like(),
    "doc-macros": samples.doc_with_macros(),
    "docx": samples.docx(),
    "jar": samples.jar(),
    "zip": samples.zip_of([("a.txt", "hello")]),
    "pdf": samples.pdf(),
    "png": samples.png(),
    "batch": b"@echo off\r\ndel /q C:\\*\r\n",
    "registry": b"Windows Registry Editor Version 5.00\r\n\r\n[HKEY_CURRENT_USER\\X]\r\n",
    "text": b"Dear parents, the trip is on Friday.\n",
    # Known only by their descriptions: MIME types application/octet-stream and text/plain.
    "mbr": bytes(510) + b"\x55\xaa",
    "vmdk": b"KDMV" + bytes(600),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_identify_classifies_as_it_would_with_the_description_looked_up_first(name: str) -> None:
    data = SAMPLES[name]
    mime = str(filetypes._magic_pair()[0].from_buffer(data)).strip().lower()
    kind = filetypes._kind_from_content(mime, libmagic_description(data), data)
    for filename in ("file", "file.pdf", "file.exe", "file.iso", "file.js"):
        want = filetypes._refine_with_extension(kind, mime, filetypes._extension(filename))
        if want == "office" and (filetypes.has_vba_macros(data) or filetypes._odf_has_macros(data)):
            want = "office_macro"
        filetype = identify(data, filename)
        assert (filetype.mime, filetype.kind) == (mime, want)
        assert filetype.description == libmagic_description(data)


def test_filetype_is_a_value_whether_or_not_its_description_was_looked_up_late() -> None:
    late, eager = identify(samples.pdf(), "a.pdf"), identify(samples.pe_exe(), "a.exe")
    same = FileType(late.mime, libmagic_description(samples.pdf()), late.kind)
    assert late == same and hash(late) == hash(same) and repr(late) == repr(same)
    assert late != eager
    for filetype in (late, eager):
        assert pickle.loads(pickle.dumps(filetype)) == filetype
        assert copy.deepcopy(filetype) == filetype
        with pytest.raises(dataclasses.FrozenInstanceError):
            filetype.kind = "other"  # type: ignore[misc]


# --- clamd: a message of one chunk goes in one write ---------------------------------------------


class RecordingClamd:
    """A UNIX socket that reads one INSTREAM request to its end and answers it like clamd."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen()
        self.address = f"unix:{path}"
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not self.complete(data):
                    more = conn.recv(65536)
                    if not more:
                        break
                    data += more
                self.received.append(data)
                conn.sendall(b"stream: OK\0")

    @staticmethod
    def complete(data: bytes) -> bool:
        at = len(b"zINSTREAM\0")
        while len(data) >= at + 4:
            (size,) = struct.unpack(">I", data[at : at + 4])
            if size == 0:
                return True
            at += 4 + size
        return False


@pytest.mark.parametrize("size", [0, 1, 1000, 64 * 1024])
def test_one_chunk_is_sent_in_one_write_as_the_same_stream(size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fake = RecordingClamd(Path(tmp) / "clamd.sock")
        client = ClamdClient(fake.address, timeout=5)
        data = bytes(random.Random(size).randrange(256) for _ in range(size))
        assert client.scan_bytes(data) == ClamdResult("clean")  # the one-write path
        # The chunk loop, given the same chunks scan_bytes would have cut.
        assert client._instream(iter([data] if data else [])) == ClamdResult("clean")
        fake.server.close()
        first, second = fake.received
        assert (
            first == second == b"zINSTREAM\0" + (struct.pack(">I", size) + data if size else b"") + b"\0" * 4
        )


def test_a_scan_reuses_no_text_normalised_for_an_earlier_message(rules: Rules) -> None:
    """normalize_cached shares work between one message's detectors, never between messages:
    a benchmark sending the same message again and again must pay for each copy."""
    from milter.engine import scan
    from milter.envelope import Envelope

    raw = build("j.hughes@redborne.example", "parent@example.org", "Trip", "Dear parents, " * 200)
    envelope = Envelope(mail_from="j.hughes@redborne.example", rcpt_to=("parent@example.org",))
    normalize.normalize_cached.cache_clear()
    scan(raw, envelope, rules)
    first = normalize.normalize_cached.cache_info()
    assert first.misses >= 1, "the scan normalises the body"
    scan(raw, envelope, rules)
    second = normalize.normalize_cached.cache_info()
    # Each scan starts from an empty cache (counters included): the second copy's hits are
    # only its own detectors sharing texts, as the first's were; none came from the first.
    assert second.hits >= 1, "detectors of one message share the normalised body"
    assert (second.hits, second.misses) == (first.hits, first.misses)


# --- lexicon and advertising: the Rust Aho-Corasick automaton against str.find --------------------


def every_occurrence(patterns: list[str], text: str) -> set[tuple[int, int, int]]:
    """(pattern index, start, end) of every occurrence of every pattern, overlapping ones included."""
    found = set()
    for index, pattern in enumerate(patterns):
        at = text.find(pattern)
        while at >= 0:
            found.add((index, at, at + len(pattern)))
            at = text.find(pattern, at + 1)
    return found


def lexicon_streams(rules: Rules, count: int) -> list[str]:
    """Space-padded streams of lexicon terms, allowlisted words, ordinary words, stems inside
    longer words and non-ASCII letters, as normalize produces them (and some it would not)."""
    rng = random.Random(7)
    terms = [t.text for t in rules.obscene.terms]
    allowed = list(rules.obscene.allow)
    ordinary = ["the", "trip", "is", "on", "scunthorpe", "cocktail", "class", "é", "naïve", "ssh", "a"]
    streams = []
    for _ in range(count):
        words = []
        for _ in range(rng.randint(0, 40)):
            pick = rng.random()
            source = terms if pick < 0.3 else allowed if pick < 0.5 else ordinary
            word = rng.choice(source)
            if rng.random() < 0.1:
                word = rng.choice(ordinary) + word + rng.choice(["", "ing", "er", "1"])
            words.append(word)
        streams.append(f" {' '.join(words)} ")
    return streams


def test_lexicon_automata_find_every_occurrence_as_str_find_does(rules: Rules) -> None:
    lexicon = rules.obscene
    keys = [
        f" {lexicon.terms[i].text} " if whole else lexicon.terms[i].text for i, whole in lexicon._patterns
    ]
    allow_keys = [f" {entry} " for entry in lexicon.allow]
    hits = 0
    for stream in lexicon_streams(rules, 300):
        found = lexicon._automaton.find_matches_as_indexes(stream, overlapping=True)
        assert set(found) == every_occurrence(keys, stream)
        assert len(found) == len(set(found))
        hits += len(found)
        allowed = lexicon._allow.find_matches_as_indexes(stream, overlapping=True)
        assert set(allowed) == every_occurrence(allow_keys, stream)
    assert hits > 1000, "the streams hold many terms"


def test_lexicon_scan_keeps_whole_words_and_stems_inside_letters_only(rules: Rules) -> None:
    lexicon = rules.obscene
    for stream in lexicon_streams(rules, 200):
        expected = set()
        for term_index, term in enumerate(lexicon.terms):
            key = f" {term.text} " if term.whole_word else term.text
            for _, start, end in every_occurrence([key], stream):
                if term.whole_word:
                    expected.add((start + 1, end - 1, term_index))
                    continue
                token = stream[stream.rfind(" ", 0, start) + 1 : stream.find(" ", end)]
                if len(token) <= 32 and token.isalpha():
                    expected.add((start, end, term_index))
        assert set(lexicon._scan(stream)) == expected


def test_advertising_phrases_found_as_a_plain_search_finds_them(rules: Rules) -> None:
    phrases = rules.advertising
    rng = random.Random(11)
    words = [*phrases.weights, "the", "school", "trip", "sale", "now", "off", "%", "buy", "x"]
    for _ in range(300):
        text = " ".join(
            rng.choice(words) + rng.choice(["", "", "s", ".", "\n"]) for _ in range(rng.randint(0, 30))
        )
        flat = text.lower().replace("\n", " ")
        expected = {}
        for index, start, end in sorted(
            every_occurrence(list(phrases.weights), flat), key=lambda m: (m[2], m[0])
        ):
            phrase = list(phrases.weights)[index]
            if phrase[0].isalnum() and start > 0 and flat[start - 1].isalnum():
                continue
            if phrase[-1].isalnum() and end < len(flat) and flat[end].isalnum():
                continue
            expected[phrase] = None
        assert set(phrases.found(text)) == set(expected)
