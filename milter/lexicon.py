"""Find offensive words and phrases in normalized text, defeating evasion without flagging Scunthorpe.

A `Lexicon` holds `Term`s (loaded from rules/lexicon/obscene.tsv) and allowlisted words and
phrases (rules/lexicon/allowlist.txt and the generated allowlist-generated.txt). It builds two
Aho-Corasick automata once, in `__init__` (ahocorasick_rs: the Rust aho-corasick crate, about
five times faster on a newsletter than pyahocorasick, which this used before):

- terms: whole-word terms are keyed with a space either side (" ass "), so they only match whole
  tokens of the space-padded streams; the few unambiguous stems marked `substring` in the TSV
  ("fuck", "cunt") are keyed bare and may match inside longer words ("motherfucking").
- allowlist: entries keyed the same way; a hit lying inside an allowlisted word or phrase
  ("spotted dick", "Scunthorpe") is dropped.

Disguised words come from `NormalizedText.variants` (see milter.normalize); masked words
("f**k") and stretched words ("assss") are resolved here because that needs the term list.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import ahocorasick_rs

from milter.errors import Problem, RulesError
from milter.findings import Severity
from milter.normalize import NormalizedText, normalize_cached, normalize_term, squeeze

__all__ = [
    "LEXICON_FILES",
    "Hit",
    "Lexicon",
    "Term",
    "load_allowlist",
    "load_lexicon",
    "load_terms",
    "mask",
]

# Files `load_lexicon` reads from a rules/lexicon directory (the allowlists may be absent).
LEXICON_FILES = ("obscene.tsv", "allowlist.txt", "allowlist-generated.txt")
# Substring stems must be long enough to be unambiguous inside other words.
MIN_SUBSTRING_LENGTH = 4
# A stem only counts inside a word-like token: letters only and no longer than this. Longer or
# mixed tokens are identifiers, hashes or encoded data ("r1xgwwkccuntb6lf" in base64).
MAX_STEM_TOKEN = 32
_SUBSTRING_FLAG = "substring"
_CATEGORY = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True, repr=False)
class Term:
    """One lexicon entry in normalized form, e.g. "fuck" or "two girls one cup"."""

    text: str
    category: str  # for obscene.tsv one of: profanity, sexual, slurs_hate, threats_abuse
    severity: Severity
    whole_word: bool = True  # False: may match inside a longer word (only for unambiguous stems)

    def __repr__(self) -> str:
        # Masked, so that logging a Term or a Hit (whose repr includes it) never writes the word.
        return f"Term({mask(self.text)!r}, {self.category!r}, {self.severity}, whole_word={self.whole_word})"


@dataclass(frozen=True)
class Hit:
    """Where a term was found: which stream, the offsets in it, and how the word had been written."""

    term: Term
    form: str  # "plain", "leetspeak", "confusable", "stretched", "spaced", "masked"
    start: int
    end: int
    stream: str  # "text" or "variants"


def mask(term: str) -> str:
    """Safe evidence for logs and reviewers: "fuck" -> "f***", "two girls one cup" -> "t** g**** o** c**"."""
    return " ".join(word[:1] + "*" * (len(word) - 1) for word in term.split(" "))


# A raw automaton match: (start, end, term index), offsets into the scanned stream.
_Match = tuple[int, int, int]


class Lexicon:
    """Terms and allowlist compiled into automata; `find` returns de-duplicated hits."""

    def __init__(self, terms: Iterable[Term], allow: Iterable[str] = ()) -> None:
        merged: dict[str, Term] = {}
        for term in terms:
            text = normalize_term(term.text)
            if not text:
                continue
            if text != term.text:
                term = Term(text, term.category, term.severity, term.whole_word)
            known = merged.get(text)
            # The same text twice (hand edits, two sources): keep the most severe reading.
            if known is None or term.severity > known.severity:
                merged[text] = term
        self.terms: tuple[Term, ...] = tuple(sorted(merged.values(), key=lambda t: t.text))
        self._texts = [t.text for t in self.terms]  # sorted: prefix counts by bisect (see _rank)

        # What each automaton pattern stands for: (term index, whole word).
        self._patterns: list[tuple[int, bool]] = []
        keys: list[str] = []
        # Indexes used to resolve disguised single words (masked, stretched) by shape.
        self._by_squeezed: dict[str, int] = {}
        self._by_shape: dict[tuple[int, str], list[int]] = {}
        self._stems = [i for i, t in enumerate(self.terms) if not t.whole_word]
        for index, term in enumerate(self.terms):
            keys.append(term.text if not term.whole_word else f" {term.text} ")
            self._patterns.append((index, term.whole_word))
            if " " in term.text:
                continue
            squeezed = squeeze(term.text)
            best = self._by_squeezed.get(squeezed)
            if best is None or self._rank(index) > self._rank(best):
                self._by_squeezed[squeezed] = index
            self._by_shape.setdefault((len(term.text), term.text[0]), []).append(index)
        self._squeezed_stems = [(squeeze(self.terms[i].text), i) for i in self._stems]
        self._mask_cache: dict[str, int | None] = {}
        self._has_terms = bool(self.terms)
        # Standard match kind: every match, overlapping ones included ("fuck" in "motherfucker").
        # A DFA: built once per rules load, searched per message, about 40% faster than the
        # crate's default choice for this lexicon.
        self._automaton = ahocorasick_rs.AhoCorasick(
            keys,
            matchkind=ahocorasick_rs.MatchKind.Standard,
            implementation=ahocorasick_rs.Implementation.DFA,
        )

        self.allow: tuple[str, ...] = tuple(sorted({e for e in map(normalize_term, allow) if e}))
        self._allow = ahocorasick_rs.AhoCorasick(
            [f" {entry} " for entry in self.allow],
            matchkind=ahocorasick_rs.MatchKind.Standard,
            implementation=ahocorasick_rs.Implementation.DFA,
        )
        self._has_allow = bool(self.allow)

    # --- public -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of terms."""
        return len(self.terms)

    def find_text(self, text: str) -> list[Hit]:
        """Normalize `text` and find every term in it."""
        return self.find(normalize_cached(text))

    def find(self, norm: NormalizedText) -> list[Hit]:
        """Every term in `norm`, once per term, first occurrence first (text stream before variants)."""
        return self._find(norm, first_only=True)

    def find_all(self, norm: NormalizedText) -> list[Hit]:
        """Every occurrence of every term (for callers that judge each one by its context)."""
        return self._find(norm, first_only=False)

    def _find(self, norm: NormalizedText, first_only: bool) -> list[Hit]:
        hits = self._find_in_text(norm, first_only)
        if norm.candidates:
            hits.extend(self._find_in_variants(norm))
        if not first_only:
            return hits
        seen: set[str] = set()
        unique: list[Hit] = []
        for hit in hits:
            if hit.term.text not in seen:
                seen.add(hit.term.text)
                unique.append(hit)
        return unique

    # --- streams ------------------------------------------------------------------------------

    def _find_in_text(self, norm: NormalizedText, first_only: bool) -> list[Hit]:
        matches = self._prune(self._allowed(self._scan(norm.text), norm.text))
        unfolded = ""
        if norm.folded and matches:
            # Would the term be there without Unicode folding? If not, it was disguised ("fück",
            # "fuсk"). Decided per term, not per occurrence: offsets do not survive folding.
            unfolded = f" {re.sub(r'[^a-z0-9]+', ' ', norm.source.casefold()).strip()} "
        hits = []
        forms: dict[int, str] = {}
        for start, end, index in sorted(matches):
            if first_only and index in forms:
                continue  # `find` keeps one hit per term: label only the first
            term = self.terms[index]
            form = forms.get(index)
            if form is None:
                form = "plain"
                if norm.folded:
                    key = f" {term.text} " if term.whole_word else term.text
                    form = "plain" if key in unfolded else "confusable"
                forms[index] = form
            hits.append(Hit(term, form, start, end, "text"))
        return hits

    def _find_in_variants(self, norm: NormalizedText) -> list[Hit]:
        stream = norm.variants
        candidates = norm.candidates
        starts = [c.start for c in candidates]
        found: list[tuple[int, int, int, str]] = []
        for start, end, index in self._scan(stream):
            # Only hits touching a de-evaded word count: context words were matched in `text`.
            # Candidates are emitted left to right without overlapping, so the last one starting
            # before the hit's end is the only one that can reach into it.
            at = bisect.bisect_right(starts, end - 1) - 1
            if at >= 0 and candidates[at].end > start:
                found.append((start, end, index, candidates[at].form))
        for cand in candidates:
            word = stream[cand.start : cand.end]
            if cand.form == "masked":
                resolved = self._resolve_mask(word)
                if resolved is not None:
                    found.append((cand.start, cand.end, resolved, cand.form))
            elif cand.squeezed:
                found.extend((cand.start, cand.end, i, cand.form) for i in self._resolve_squeezed(word))
        forms = {(s, e, i): f for s, e, i, f in found}
        kept = self._prune(self._allowed([(s, e, i) for s, e, i, _ in found], stream))
        return [Hit(self.terms[i], forms[(s, e, i)], s, e, "variants") for s, e, i in kept]

    def _scan(self, stream: str) -> list[_Match]:
        if not self._has_terms:
            return []
        matches: list[_Match] = []
        patterns = self._patterns
        for pattern, start, end in self._automaton.find_matches_as_indexes(stream, overlapping=True):
            index, whole_word = patterns[pattern]
            if whole_word:
                matches.append((start + 1, end - 1, index))  # drop the padding spaces
                continue
            token = stream[stream.rfind(" ", 0, start) + 1 : stream.find(" ", end)]
            if len(token) <= MAX_STEM_TOKEN and token.isalpha():
                matches.append((start, end, index))
        return matches

    def _allowed(self, matches: list[_Match], stream: str) -> list[_Match]:
        """Drop matches lying inside an allowlisted word or phrase."""
        if not matches or not self._has_allow:
            return matches
        covers = sorted(
            (start + 1, end - 1)
            for _, start, end in self._allow.find_matches_as_indexes(stream, overlapping=True)
        )
        if not covers:
            return matches
        # Sweep by start: a match is covered when some cover starting at or before it ends at or after it.
        kept: list[_Match] = []
        reach, at = -1, 0
        for match in sorted(matches):
            while at < len(covers) and covers[at][0] <= match[0]:
                reach = max(reach, covers[at][1])
                at += 1
            if reach < match[1]:
                kept.append(match)
        return kept

    def _prune(self, matches: list[_Match]) -> list[_Match]:
        """Drop a match inside a longer one at least as severe ("fuck" inside "motherfucker")."""
        if len(matches) < 2:
            return matches
        # Sweep by (start, longest first). For each severity, remember the furthest end reached
        # by a kept match at least that severe, and where that match started: a later match is
        # inside it if it ends before that, or ends there but starts later.
        reach: dict[Severity, tuple[int, int]] = {}
        kept: list[_Match] = []
        for match in sorted(set(matches), key=lambda m: (m[0], -m[1], m[2])):
            start, end, index = match
            severity = self.terms[index].severity
            best = reach.get(severity)
            if best is not None and (best[0] > end or (best[0] == end and best[1] < start)):
                continue
            kept.append(match)
            for level in Severity:
                if level <= severity:
                    known = reach.get(level)
                    if known is None or end > known[0]:
                        reach[level] = (end, start)
        return kept

    # --- disguised single words -----------------------------------------------------------------

    def _rank(self, index: int) -> tuple[bool, Severity, int]:
        """Preference among terms a disguised word could be: stems, then severity, then commonness.

        A stem ("fuck", "cunt") or a term containing one is what a masked word usually hides, so
        "f***" reads as "fuck" rather than another f-word. Commonness is how many terms start
        with this one ("fuck" heads dozens, "fack" one), so "sh*t" reads as "shit", not "shat".
        """
        term = self.terms[index]
        low = bisect.bisect_left(self._texts, term.text)
        high = bisect.bisect_left(self._texts, term.text + "\x7f")
        return (self._has_stem(term.text), term.severity, high - low)

    def _has_stem(self, text: str) -> bool:
        return any(self.terms[i].text in text for i in self._stems)

    def _resolve_mask(self, word: str) -> int | None:
        """The term a masked word stands for: same length and first letter, shown letters in place.

        Among the terms that fit, `_rank` picks (so the most severe among equally likely ones).
        Only if no whole term fits may a stem sit inside a longer masked word ("f**kwit"), as long
        as its first letter is shown and at least one of its letters is masked.
        """
        if word in self._mask_cache:
            return self._mask_cache[word]
        if len(self._mask_cache) > 4096:
            self._mask_cache.clear()  # bounded: the same few masked words recur ("f**k", "sh*t")
        best = self._shape_match(word)
        self._mask_cache[word] = best
        return best

    def _shape_match(self, word: str) -> int | None:
        best: int | None = None
        for index in self._by_shape.get((len(word), word[0]), ()):
            if _fits(word, self.terms[index].text) and (best is None or self._rank(index) > self._rank(best)):
                best = index
        if best is not None:
            return best
        for index in self._stems:
            stem = self.terms[index].text
            for offset in range(len(word) - len(stem) + 1):
                part = word[offset : offset + len(stem)]
                if part[0] == stem[0] and "*" in part and _fits(part, stem):
                    if best is None or self._rank(index) > self._rank(best):
                        best = index
                    break
        return best

    def _resolve_squeezed(self, word: str) -> list[int]:
        """Terms whose squeezed form is this squeezed word, or a squeezed stem inside it."""
        found = []
        best = self._by_squeezed.get(word)
        if best is not None:
            found.append(best)
        found.extend(i for stem, i in self._squeezed_stems if stem in word)
        return found


def _fits(masked: str, text: str) -> bool:
    return len(masked) == len(text) and all(m == "*" or m == t for m, t in zip(masked, text, strict=True))


# --- loading rules files ------------------------------------------------------------------------


def _read_lines(path: Path, problems: list[Problem]) -> list[str] | None:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        problems.append(Problem(path, None, "file not found"))
    except UnicodeDecodeError as exc:
        problems.append(Problem(path, None, f"not UTF-8 text (byte {exc.start}); save the file as UTF-8"))
    except OSError as exc:
        problems.append(Problem(path, None, f"cannot read file: {exc.strerror}"))
    return None


def _parse_terms(path: Path, problems: list[Problem]) -> list[Term]:
    lines = _read_lines(path, problems)
    if lines is None:
        return []
    terms: list[Term] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue

        def problem(reason: str, number: int = number) -> None:
            problems.append(Problem(path, number, reason))

        columns = [c.strip() for c in line.split("\t")]
        if len(columns) < 3:
            problem(
                f"expected term<TAB>category<TAB>severity, found {len(columns)} column(s);"
                " columns must be separated by tab characters"
            )
            continue
        if len(columns) > 4:
            problem(f"too many columns ({len(columns)}); expected at most 4: term, category, severity, flag")
            continue
        raw, category, severity_text = columns[:3]
        flag = columns[3] if len(columns) == 4 else ""
        if not raw:
            problem("empty term")
            continue
        text = normalize_term(raw)
        if not text:
            problem("term has no letters or digits")
            continue
        bad = False
        if not _CATEGORY.fullmatch(category):
            problem(f"category {category!r} must be a lowercase word such as 'profanity' or 'slurs_hate'")
            bad = True
        try:
            severity = Severity.parse(severity_text)
        except ValueError as exc:
            problem(str(exc))
            bad = True
        if flag not in ("", _SUBSTRING_FLAG):
            problem(f"unknown flag {flag!r} in column 4 (the only flag is {_SUBSTRING_FLAG!r})")
            bad = True
        if flag == _SUBSTRING_FLAG and (" " in text or len(text) < MIN_SUBSTRING_LENGTH):
            problem(
                f"only single words of {MIN_SUBSTRING_LENGTH}+ letters may be marked {_SUBSTRING_FLAG!r}"
                " (a short or multi-word stem would match inside innocent words)"
            )
            bad = True
        if text in first_line:
            problem(f"duplicate term (same as line {first_line[text]} once normalized)")
            bad = True
        else:
            first_line[text] = number
        if not bad:
            terms.append(Term(text, category, severity, whole_word=flag != _SUBSTRING_FLAG))
    return terms


def _parse_allowlist(path: Path, problems: list[Problem]) -> list[str]:
    lines = _read_lines(path, problems)
    if lines is None:
        return []
    entries = []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if not normalize_term(entry):
            problems.append(Problem(path, number, f"entry {entry!r} has no letters or digits"))
            continue
        entries.append(entry)
    return entries


def load_terms(path: Path) -> list[Term]:
    """Read a term TSV: term<TAB>category<TAB>severity[<TAB>substring]; '#' comments, blank lines.

    Raises RulesError listing every bad line (file, line number, reason), not just the first.
    """
    problems: list[Problem] = []
    terms = _parse_terms(path, problems)
    if problems:
        raise RulesError(problems)
    return terms


def load_allowlist(path: Path) -> list[str]:
    """Read an allowlist: one word or phrase a line, '#' comments and blank lines skipped."""
    problems: list[Problem] = []
    entries = _parse_allowlist(path, problems)
    if problems:
        raise RulesError(problems)
    return entries


def load_lexicon(directory: Path) -> Lexicon:
    """Build the Lexicon from a rules/lexicon directory: obscene.tsv plus both allowlists.

    The allowlist files are optional; problems in any of the files are reported together.
    """
    problems: list[Problem] = []
    terms = _parse_terms(directory / LEXICON_FILES[0], problems)
    allow: list[str] = []
    for name in LEXICON_FILES[1:]:
        if (directory / name).exists():
            allow.extend(_parse_allowlist(directory / name, problems))
    if problems:
        raise RulesError(problems)
    return Lexicon(terms, allow)
