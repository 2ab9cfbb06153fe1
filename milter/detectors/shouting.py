"""shouting: mostly capital letters in the subject or body, read as shouting (appendix). Tag, never block."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from milter.findings import Finding, Severity

if TYPE_CHECKING:
    from milter.context import Context
    from milter.message import Message
    from milter.policy.loader import Rules

NAME = "shouting"
_LETTER = re.compile(r"[^\W\d_]")
_UPPER = re.compile(r"[A-ZÀ-ÖØ-ÞĀ-Ž]")
_LOWER = re.compile(r"[a-zß-öø-ÿā-ž]")
# A run of all-capitals words (two letters or more each) separated by spaces and punctuation.
_CAPS_WORD = re.compile(r"\b[A-Z][A-Z'’]+\b")


_ASCII_UPPER = bytes(range(ord("A"), ord("Z") + 1))
_ASCII_LOWER = bytes(range(ord("a"), ord("z") + 1))


def capitals_ratio(text: str) -> tuple[float, int]:
    """Share of capitals among cased letters, and how many cased letters there are."""
    if text.isascii():
        # bytes.translate deletes in C: ten times faster than counting regex matches.
        data = text.encode("ascii")
        upper = len(data) - len(data.translate(None, _ASCII_UPPER))
        cased = upper + len(data) - len(data.translate(None, _ASCII_LOWER))
        return (upper / cased if cased else 0.0), cased
    upper = len(_UPPER.findall(text))
    cased = upper + len(_LOWER.findall(text))
    return (upper / cased if cased else 0.0), cased


# Two all-capitals words in a row: ordinary prose rarely has even that, so most bodies
# are settled by this one quick search instead of walking every capitalised word.
_TWO_CAPS_WORDS = re.compile(r"[A-Z][A-Z'’]+[^a-zA-Z]+[A-Z][A-Z'’]")
# The search actually run: the same pattern over the text turned into one byte a character,
# "U" a capital, "l" a small letter, "q" an apostrophe, "." anything else. Starting from a
# literal byte, it skips ahead at C speed; over the text itself the regex engine tests every
# character against a character set, five times slower, and bodies are long.
_CLASSES = bytes(
    ord("U") if 65 <= b <= 90 else ord("l") if 97 <= b <= 122 else ord("q") if b == 39 else ord(".")
    for b in range(256)
)
_TWO_CAPS_CLASSES = re.compile(rb"U[Uq]+[q.]+U[Uq]")


def _classes(text: str) -> bytes:
    # One byte per character: ’ is an apostrophe; other non-ASCII characters become "?" (".").
    return text.replace("’", "'").encode("ascii", "replace").translate(_CLASSES)


def _has_two_caps_words(text: str) -> bool:
    """Whether _TWO_CAPS_WORDS matches `text`."""
    return _TWO_CAPS_CLASSES.search(_classes(text)) is not None


def longest_caps_run(text: str) -> int:
    classes = _classes(text)
    if _TWO_CAPS_CLASSES.search(classes) is None:
        # _CAPS_WORD needs a capital followed by a capital or an apostrophe: without one
        # anywhere (most bodies) there is no need to run it, character by character, at all.
        if b"UU" not in classes and b"Uq" not in classes:
            return 0
        return 1 if _CAPS_WORD.search(text) else 0
    best = run = 0
    last_end = -1
    for m in _CAPS_WORD.finditer(text):
        gap = text[last_end : m.start()] if last_end >= 0 else ""
        run = run + 1 if last_end >= 0 and not _LETTER.search(gap) and "\n\n" not in gap else 1
        best = max(best, run)
        last_end = m.end()
    return best


def check(message: Message, ctx: Context, rules: Rules) -> list[Finding]:
    settings = rules.policy.detectors.shouting
    places = []
    ratio, letters = capitals_ratio(message.subject)
    if letters >= settings.min_subject_letters and ratio >= settings.capitals_ratio:
        places.append(("subject", f"subject {ratio:.0%} capitals"))
    body = message.visible_text
    ratio, letters = capitals_ratio(body)
    if letters >= settings.min_body_letters and ratio >= settings.capitals_ratio:
        places.append(("body", f"body {ratio:.0%} capitals"))
    elif (run := longest_caps_run(body)) >= settings.min_shouted_words:
        places.append(("body", f"{run} words in a row in capitals"))
    if not places:
        return []
    where = " and ".join(p for p, _ in places)
    return [
        Finding(
            NAME,
            "shouting",
            Severity.MILD,
            settings.clause,
            f"continuous capitals in the {where} read as shouting",
            tuple(e for _, e in places),
            where,
        )
    ]
