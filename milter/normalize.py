"""Normalize message text into token streams for the lexicon, undoing common ways of hiding words.

`normalize` folds Unicode (compatibility forms, case, accents, invisible format characters,
look-alike letters from other scripts) to plain lowercase ASCII words and returns two streams:

- `text`: every word of the message, as written once folded. Plain matching runs here.
- `variants`: short segments around the rare spots where someone may be hiding a word
  (leetspeak `sh1t`, masks `f**k`, stretched `fuuuck`, spaced `f u c k` / `f.u.c.k`), with
  the de-evaded candidate word in place and up to three plain words of context either side,
  so phrases such as "i will k1ll you" still match. Segments are separated by a "|" token so
  a phrase never joins across two of them. `candidates` says where the de-evaded words are.

The common path (ordinary text) is a few whole-string C-level operations: `isascii` + `lower`
(or NFKD + `translate` + `casefold` when there is non-ASCII text), `translate` + `split` +
`join` for the stream, and a handful of regex scans for rare characters that find little.
Per-token Python runs only inside the small windows around rare spots (and at most
MAX_RARE_SPOTS of them, so a pathological message cannot make scanning slow).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import unicodedata
from dataclasses import dataclass, field
from importlib import resources

__all__ = [
    "FORMS",
    "Candidate",
    "NormalizedText",
    "leet_variants",
    "normalize",
    "normalize_term",
    "squeeze",
]

# Evasion forms a candidate word can come from ("plain" and "confusable" are decided by the lexicon).
FORMS = ("plain", "leetspeak", "confusable", "stretched", "spaced", "masked")

# How many plain words either side of a rare spot go into its variants segment: enough for the
# longest hand-listed threat phrase around one disguised word.
CONTEXT_WORDS = 3
# Chunks (whitespace-separated) longer than this are URLs, hashes or encoded data, not disguised words.
MAX_CHUNK = 64
# At most this many rare spots are de-evaded per call (a few microseconds each), so that a
# pathological message (a spreadsheet of "A1 B2 C3" cells) stays within the scan time budget.
# Past it, `NormalizedText.truncated` is set and the rest is matched as plain text only.
MAX_RARE_SPOTS = 2000


@dataclass(frozen=True)
class Candidate:
    """Where a de-evaded word sits in `NormalizedText.variants`, and how it had been disguised."""

    start: int
    end: int
    form: str  # one of "leetspeak", "stretched", "spaced", "masked"
    # True when repeated letters were collapsed: the lexicon then compares squeezed forms
    # ("assss" -> "as" matches squeeze("ass")), which it must never do for ordinary words.
    squeezed: bool = False


@dataclass(frozen=True, repr=False)
class NormalizedText:
    """Token streams to match on: lowercase ASCII-ish words, single-spaced, padded with a space."""

    text: str
    variants: str = " "
    candidates: tuple[Candidate, ...] = ()
    # True when Unicode folding (NFKD, confusables, invisible characters) changed the input, so the
    # lexicon should check whether a hit only exists because of folding (form "confusable").
    folded: bool = False
    # True when there were more than MAX_RARE_SPOTS rare spots and the later ones were not de-evaded.
    truncated: bool = False
    # The original text, kept only to label confusable hits; never compared.
    source: str = field(default="", compare=False)

    def __repr__(self) -> str:
        # Message content must never reach a log (policy 2.4): show sizes, not words.
        return (
            f"NormalizedText(text=<{len(self.text)} chars>, variants=<{len(self.variants)} chars>,"
            f" candidates={len(self.candidates)}, folded={self.folded}, truncated={self.truncated})"
        )


# --- Unicode folding ---------------------------------------------------------------------------

# Characters that stand for a hidden letter in masked words ("f**k", "f##k"); other look-alike
# stars are folded to "*" so the lexicon sees one mask character.
_MASK_LOOKALIKES = "\u2217\u204e\u2731\u2732\u2733\u273a\u2749\u274b\u2022\u00b7\u2219\u22c6"


def _build_confusable_table() -> dict[int, str]:
    """Map every single-character homoglyph of an ASCII letter or digit to that (lowercase) character.

    Data: confusables.json bundled with the `confusable-homoglyphs` package (Unicode TR39
    confusables): keys are characters, values list the characters that look like them.
    """
    raw = resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text("utf-8")
    data: dict[str, list[dict[str, str]]] = json.loads(raw)
    table: dict[int, str] = {}
    for key, glyphs in data.items():
        if len(key) != 1 or not key.isascii() or not key.isalnum():
            continue
        target = key.lower()
        for glyph in glyphs:
            # Right-to-left homoglyphs are stored wrapped in direction marks; the mark is not the glyph.
            char = glyph["c"].strip("\u200e\u200f")
            if len(char) != 1 or char.isascii():
                # ASCII look-alikes ("1" for "l", "0" for "o") are leetspeak: handled per token,
                # never folded globally, or every "2010" would become "2olo".
                continue
            previous = table.get(ord(char))
            if previous is None or (previous.isdigit() and target.isalpha()):
                table[ord(char)] = target
    # TR39 files capital I look-alikes (Greek Iota, Cyrillic I) under "l", because I and l look
    # alike; in running text they are capital I's, so fold them to "i" when their lowercase is one.
    for cp, target in list(table.items()):
        lower = chr(cp).casefold()
        if target == "l" and len(lower) == 1 and table.get(ord(lower)) == "i":
            table[cp] = "i"
    for char in _MASK_LOOKALIKES:
        table[ord(char)] = "*"
    return table


class _FoldTable(dict[int, "str | None"]):
    """`str.translate` table: confusables fold to ASCII; marks and format characters are deleted.

    The deletions are found lazily (one `unicodedata.category` call per distinct code point ever
    seen, then cached) rather than by walking all 1.1 million code points at import.
    """

    def __missing__(self, cp: int) -> str | None:
        # Mn/Me: combining accents ("fu\u0308ck"), Cf: zero-width joiners, soft hyphens, BOMs,
        # direction marks - all invisible, so all usable to split a word without showing it.
        value = None if unicodedata.category(chr(cp)) in ("Mn", "Me", "Cf") else chr(cp)
        self[cp] = value
        return value


_FOLD = _FoldTable(_build_confusable_table())
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _fold_run(match: re.Match[str]) -> str:
    run = match.group().translate(_FOLD).casefold()
    # What is still not ASCII is a letter of another script (or a symbol): a word separator here.
    return run if run.isascii() else _NON_ASCII.sub(" ", run)


def _fold(text: str) -> tuple[str, bool]:
    """Lowercase ASCII text (punctuation kept) and whether Unicode folding was needed."""
    if text.isascii():
        return text.lower(), False
    # NFKD turns fullwidth and mathematical letters into ASCII and splits accents off their letters;
    # translate then drops the accents and invisibles and folds look-alikes, before casefolding, so
    # that upper-case look-alikes fold by glyph (Greek capital Nu is "n", not lowercase nu's "v").
    # Only the non-ASCII runs go through translate: ASCII needs nothing but lower().
    decomposed = unicodedata.normalize("NFKD", text)
    return _NON_ASCII_RUN.sub(_fold_run, decomposed).lower(), True


# --- Tokens --------------------------------------------------------------------------------------

_NON_WORD = re.compile(r"[^a-z0-9]+")
# ASCII punctuation and controls -> space; with split/join this is ~3x faster than re.sub.
_WORD_ONLY = str.maketrans({chr(c): " " for c in range(128) if not chr(c).isalnum()})


def _stream(folded: str) -> str:
    """Single-spaced, space-padded words of an ASCII folded string."""
    body = " ".join(folded.translate(_WORD_ONLY).split())
    return f" {body} " if body else " "


def normalize_term(text: str) -> str:
    """A lexicon or allowlist entry in stream form, without padding: "Son-of-a-Bitch" -> "son of a bitch"."""
    return _stream(_fold(text)[0])[1:-1]


def squeeze(word: str) -> str:
    """Collapse every run of a repeated character: "fuuuck" -> "fuck", "assss" -> "as", "ass" -> "as"."""
    return "".join(char for char, _ in itertools.groupby(word))


_RUN3 = re.compile(r"([a-z])\1\1")

# Leetspeak digits and symbols. "1" is ambiguous (i or l): both readings are produced.
_LEET = {"4": "a", "@": "a", "3": "e", "0": "o", "$": "s", "5": "s", "7": "t", "+": "t",
         "|": "l", "8": "b", "9": "g", "!": "i", "#": "*", "%": "*"}  # fmt: skip
_LEET_I = str.maketrans({**_LEET, "1": "i"})
_LEET_L = str.maketrans({**_LEET, "1": "l"})
_LEET_CHARS = frozenset(_LEET) | {"1"}


def leet_variants(word: str) -> tuple[str, str]:
    """The word with leetspeak undone, reading "1" as i and as l: "sh1t" -> ("shit", "shlt")."""
    return word.translate(_LEET_I), word.translate(_LEET_L)


# Rare spots: leet or mask symbols, a "!" inside a word, digits touching letters, a letter
# repeated 3+ times. Separate patterns, each starting with a character set or literal, are much
# faster than one alternation (the regex engine can skip ahead to candidate characters).
_SYMBOL = re.compile(r"[@$|+*#%]")
_BANG = re.compile(r"![^\s!.?,;:)\]}'\"]")
_DIGIT_LETTER = re.compile(r"[0-9](?:(?<=[a-z][0-9])|(?=[a-z]))")
# _SYMBOL and _DIGIT_LETTER are run over the text's character classes, one byte a character:
# "a" a letter, "d" a digit, "s" a symbol of _SYMBOL (other bytes are left as they are, and
# none of them is "a", "d" or "s"). Patterns that start with a literal byte let the regex
# engine skip ahead at C speed; over the text itself it tests every character against a
# character set, several times slower on a long body with nothing to find.
_CLASSES = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz0123456789@$|+*#%", b"a" * 26 + b"d" * 10 + b"s" * 7)
_SYMBOL_CLASS = re.compile(rb"s")
_DIGIT_LETTER_CLASS = re.compile(rb"d(?:(?<=ad)|(?=a))")
_ANY_RUN3 = re.compile(r"(.)\1\1")  # pre-check on the stream, as run by _has_letter_run3
# 0 for an ASCII letter, 0xFF for any other byte.
_NOT_LETTER = bytes(0 if chr(b).isascii() and chr(b).isalpha() else 0xFF for b in range(256))
_RARE = re.compile(r"[@$|+*#%]|![^\s!.?,;:)\]}'\"]|[a-z][0-9]|[0-9][a-z]|([a-z])\1\1")
# Spaced letters: 3+ single characters, each separated by 1-3 spaces or punctuation marks
# ("f u c k", "f.u.c.k", "f-u-c-k", "f_u_c_k", "f*u*c*k", "s h 1 t").
_SPACED = re.compile(r"(?<![a-z0-9@$])[a-z0-9@$](?:[^a-z0-9@$\n]{1,3}[a-z0-9@$]){2,}(?![a-z0-9@$])")
_SPACED_ELEMENT = re.compile(r"[a-z0-9@$]")
# Pre-check on the stream: three single-character words, two of them letters ("1.1 a" is not).
_SPACED_HINT = re.compile(r" (?=[a-z0-9] [a-z0-9] [a-z0-9] )(?:[0-9] )?[a-z] (?:[0-9] )?[a-z] ")
_NON_SPACE = re.compile(r"\S*")
_LEFT_CONTEXT = re.compile(rf"(?<!\S)(?:\S+\s+){{1,{CONTEXT_WORDS}}}\Z")
_RIGHT_CONTEXT = re.compile(rf"(?:\s+\S+){{1,{CONTEXT_WORDS}}}")
# Pieces of a chunk: runs of letters, digits, leet and mask symbols (other punctuation splits).
_PIECE_SPLIT = re.compile(r"[^a-z0-9@$!|+*#%]+")
# Numbers with units and ordinals are not leetspeak: "10am", "3rd", "5kg", "2x".
_UNIT = re.compile(
    r"[0-9]+(?:st|nd|rd|th|am|pm|s|k|m|g|kg|mg|cm|mm|km|ml|l|kb|mb|gb|tb|x|p|h|hr|hrs|min|mins|yr|yrs|d|v)"
)
_NUMBERISH = re.compile(r"[$+]?[0-9]+")
_MASKED = re.compile(r"[a-z][a-z*]*\*[a-z*]*")
# Marks the words joined from spaced letters while a window is re-tokenised.
_JOINED = "\x01"

# A token of a variants segment: reading with 1->i, reading with 1->l, form (None = context), squeezed.
_Token = tuple[str, str, "str | None", bool]


def _join_spaced(match: re.Match[str]) -> str:
    run = match.group()
    letters = "".join(_SPACED_ELEMENT.findall(run))
    if sum(c.isalpha() for c in letters) < 2:
        return run  # "1 2 3", "9 a 5": numbers, not a hidden word
    if len(letters) > MAX_CHUNK:
        return run  # a page of single letters (a grid, an alphabet), not one hidden word
    chunks = run.split()
    if len(chunks) > 1 and any(len(_SPACED_ELEMENT.findall(c)) > 1 for c in chunks):
        return run  # "f**k f**k": masked words side by side, not letters spaced out
    return f" {_JOINED}{letters} "


@functools.lru_cache(maxsize=4096)  # pure, and the same few pieces recur ("10am", "f**k")
def _piece_tokens(piece: str) -> tuple[_Token, ...]:
    """De-evade one piece of a rare chunk (letters/digits/symbols between other punctuation)."""
    piece = piece.strip("!")  # "shit!" "!!!": shouting, not leetspeak
    piece = piece.lstrip("*")  # "*emphasis*"
    if piece.endswith("*") and not piece.endswith("**") and len(piece) > 2 and "*" not in piece[:-1]:
        piece = piece[:-1]  # "Speed*": a footnote mark, not a masked letter
    if not piece:
        return ()
    plain: tuple[_Token, ...] = tuple((t, t, None, False) for t in _NON_WORD.split(piece) if t)
    has_letter = any("a" <= c <= "z" for c in piece)
    if has_letter:
        if _UNIT.fullmatch(piece):
            return plain
    elif _NUMBERISH.fullmatch(piece) or not (set(piece) & _LEET_CHARS):
        return plain  # "2024", "$100", "+44": numbers, money, phone codes
    as_i, as_l = leet_variants(piece)
    if "*" in as_i:
        # The first letter must really be a letter: "@#$%" and "!@#$%^&*" are keyboard noise.
        if "a" <= piece[0] <= "z" and _MASKED.fullmatch(as_i) and len(as_i) >= 3:
            return ((as_i, as_l, "masked", False),)
        return plain
    if _RUN3.search(as_i):
        return ((squeeze(as_i), squeeze(as_l), "leetspeak" if as_i != piece else "stretched", True),)
    if as_i != piece or as_l != piece:
        return ((as_i, as_l, "leetspeak", False),)
    return plain


def _window_tokens(window: str) -> list[_Token]:
    """Re-tokenise one window around rare spots, de-evading what needs it."""
    tokens: list[_Token] = []
    for chunk in _SPACED.sub(_join_spaced, window).split():
        if chunk.startswith(_JOINED):
            letters = chunk[1:]
            as_i, as_l = leet_variants(letters)
            if _RUN3.search(as_i):
                tokens.append((squeeze(as_i), squeeze(as_l), "spaced", True))
            else:
                tokens.append((as_i, as_l, "spaced", False))
        elif len(chunk) <= MAX_CHUNK and _RARE.search(chunk):
            for piece in _PIECE_SPLIT.split(chunk):
                tokens.extend(_piece_tokens(piece))
        else:
            tokens.extend((t, t, None, False) for t in _NON_WORD.split(chunk) if t)
    return tokens


def _has_letter_run3(stream: str) -> bool:
    """Whether a letter of the stream (ASCII words) repeats the two before it, as a pre-check
    for _RUN3: `any(m.group(1).isalpha() for m in _ANY_RUN3.finditer(stream))` ("000" is common).

    A backreference pattern makes the regex engine start a match at every character. Here the
    stream is one big integer, a byte a character, compared with itself shifted by one and two
    characters: XOR is zero where characters are equal, so a zero byte in the OR of both XORs
    and a not-a-letter mask is a third letter in a row. A few C-speed passes, 3x faster.
    """
    data = stream.encode("ascii", "replace")
    x = int.from_bytes(data, "big")
    marks = (x ^ (x >> 8)) | (x ^ (x >> 16)) | int.from_bytes(data.translate(_NOT_LETTER), "big")
    return b"\x00" in marks.to_bytes(len(data), "big")


def _rare_positions(folded: str, stream: str) -> list[int]:
    # "replace" keeps one byte a character (folded text is ASCII anyway).
    classes = folded.encode("ascii", "replace").translate(_CLASSES)
    positions = [m.start() for m in _SYMBOL_CLASS.finditer(classes)]
    positions.extend(m.start() for m in _BANG.finditer(folded))
    positions.extend(m.start() for m in _DIGIT_LETTER_CLASS.finditer(classes))
    if _has_letter_run3(stream):
        positions.extend(m.start() for m in _RUN3.finditer(folded))
    positions.sort()
    return positions


def _rare_spans(folded: str, stream: str) -> tuple[list[tuple[int, int]], bool]:
    """Spans of `folded` that need the per-token path (rare chunks, spaced-letter runs), and
    whether there were more than MAX_RARE_SPOTS of them (only the first ones are returned)."""
    spans: list[tuple[int, int]] = []
    chunk_end = -1
    for pos in _rare_positions(folded, stream):
        if len(spans) >= MAX_RARE_SPOTS:
            return spans, True
        if pos < chunk_end:
            continue  # another rare mark inside a chunk already taken
        start, limit = pos, max(0, pos - MAX_CHUNK - 1)
        while start > limit and not folded[start - 1].isspace():
            start -= 1  # bounded: a chunk longer than MAX_CHUNK is skipped below anyway
        end = _NON_SPACE.match(folded, pos)
        chunk_end = end.end() if end else pos + 1
        if chunk_end - start <= MAX_CHUNK and (start == 0 or folded[start - 1].isspace()):
            spans.append((start, chunk_end))
    if _SPACED_HINT.search(stream):
        for match in _SPACED.finditer(folded):
            if len(spans) >= MAX_RARE_SPOTS:
                return spans, True
            spans.append(match.span())
    return spans, False


def _windows(folded: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Rare spans grouped when close together, each group widened by a few words of context."""
    reach = 40 * CONTEXT_WORDS  # characters searched for context words on each side
    groups: list[list[int]] = []
    for start, end in sorted(spans):
        if groups and start <= groups[-1][1] + 2 * reach:
            groups[-1][1] = max(end, groups[-1][1])  # the words between become context too
        else:
            groups.append([start, end])
    windows = []
    for start, end in groups:
        left = _LEFT_CONTEXT.search(folded, max(0, start - reach), start)
        right = _RIGHT_CONTEXT.match(folded, end, end + reach)
        windows.append((left.start() if left else start, right.end() if right else end))
    return windows


def _variants(folded: str, stream: str) -> tuple[str, tuple[Candidate, ...], bool]:
    spans, truncated = _rare_spans(folded, stream)
    if not spans:
        return " ", (), truncated
    words: list[str] = []
    candidates: list[Candidate] = []
    pos = 1  # offset of the next word in the variants stream (after the leading space)

    def emit(segment: list[tuple[str, str | None, bool]]) -> None:
        nonlocal pos
        if words:
            words.append("|")  # segment boundary: phrases must not join across windows
            pos += 2
        for word, form, squeezed in segment:
            if form is not None:
                candidates.append(Candidate(pos, pos + len(word), form, squeezed))
            words.append(word)
            pos += len(word) + 1

    for start, end in _windows(folded, spans):
        tokens = _window_tokens(folded[start:end])
        if not any(form for _, _, form, _ in tokens):
            continue  # e.g. "10am" or "!!!": nothing was disguised here
        emit([(as_i, form, squeezed) for as_i, _, form, squeezed in tokens])
        if any(as_l != as_i for as_i, as_l, _, _ in tokens):
            # "1" read as l instead of i ("1ick", "c1it"): a second copy of the window.
            emit([(as_l, form, squeezed) for _, as_l, form, squeezed in tokens])
    if not words:
        return " ", (), truncated
    return f" {' '.join(words)} ", tuple(candidates), truncated


def normalize(text: str) -> NormalizedText:
    """Fold `text` to lowercase ASCII words and collect de-evaded candidate words."""
    folded, changed = _fold(text)
    stream = _stream(folded)
    variants, candidates, truncated = _variants(folded, stream)
    return NormalizedText(
        text=stream,
        variants=variants,
        candidates=candidates,
        folded=changed,
        truncated=truncated,
        source=text if changed else "",
    )


@functools.lru_cache(maxsize=16)
def normalize_cached(text: str) -> NormalizedText:
    """normalize(), remembered for the last few texts: several detectors read the same body,
    and a string's hash is computed once, so a repeat costs a dictionary lookup.

    Emptied at the start of every scan (engine.scan): it is for detectors sharing one
    message's texts, not for messages sharing texts, which real mail rarely does and a
    benchmark sending one message again and again always does."""
    return normalize(text)
