"""advertising: unsolicited commercial or advertising mail sent out from school accounts (5.5).

Scored, because no single sign is enough: a school newsletter has an unsubscribe link,
a parent asking about a cake sale says "for sale". Commercial phrases from
rules/lexicon/advertising.txt score their weight; bulk-mail markers add to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ahocorasick_rs

from milter.errors import Problem, RulesError
from milter.findings import Finding, Severity
from milter.policy.schema import Direction

if TYPE_CHECKING:
    from milter.context import Context
    from milter.message import Message
    from milter.policy.loader import Rules

NAME = "advertising"
_UNSUBSCRIBE = re.compile(r"\bunsubscribe\b|\bopt[ -]out\b", re.IGNORECASE)


@dataclass(frozen=True)
class AdvertisingPhrase:
    phrase: str
    weight: int


class AdvertisingPhrases:
    """The phrase list compiled once into an Aho-Corasick automaton, at rules load time.

    One pass over the text whatever the number of phrases: a regex alternation of a few
    dozen phrases cost several milliseconds per newsletter.
    """

    def __init__(self, phrases: list[AdvertisingPhrase]) -> None:
        self.weights = {p.phrase: p.weight for p in phrases}
        self._phrases = list(self.weights)
        self._automaton = ahocorasick_rs.AhoCorasick(
            self._phrases,
            matchkind=ahocorasick_rs.MatchKind.Standard,
            implementation=ahocorasick_rs.Implementation.DFA,
        )

    def __len__(self) -> int:
        return len(self.weights)

    @classmethod
    def load(cls, path: Path) -> AdvertisingPhrases:
        return cls(load_phrases(path))

    def found(self, text: str) -> list[str]:
        """Distinct phrases in the text, whole words only where a phrase starts or ends with a letter."""
        if not self.weights:
            return []
        # Visible text is already whitespace-collapsed within lines; lines join with a space.
        flat = text.lower().replace("\n", " ")
        seen: dict[str, None] = {}
        for pattern, start, end in self._automaton.find_matches_as_indexes(flat, overlapping=True):
            phrase = self._phrases[pattern]
            if phrase[0].isalnum() and start > 0 and flat[start - 1].isalnum():
                continue
            if phrase[-1].isalnum() and end < len(flat) and flat[end].isalnum():
                continue
            seen[phrase] = None
        return list(seen)


def load_phrases(path: Path) -> list[AdvertisingPhrase]:
    """phrase[<TAB>weight] a line; '#' comments. Weight defaults to 1."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError([Problem(path, None, f"cannot read: {exc}")]) from None
    out: list[AdvertisingPhrase] = []
    problems: list[Problem] = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        phrase, _, weight = text.partition("\t")
        try:
            value = int(weight) if weight.strip() else 1
        except ValueError:
            problems.append(Problem(path, number, f"weight {weight.strip()!r} is not a whole number"))
            continue
        if not 1 <= value <= 10:
            problems.append(Problem(path, number, "weight must be between 1 and 10"))
            continue
        out.append(AdvertisingPhrase(" ".join(phrase.lower().split()), value))
    if problems:
        raise RulesError(problems)
    return out


def _mentions_unsubscribe(text: str) -> bool:
    # A substring test first: the regex over a whole newsletter cost more than the rest
    # of this detector, and most text mentions neither word.
    lowered = text.lower()
    if "unsubscribe" not in lowered and "opt" not in lowered:
        return False
    return _UNSUBSCRIBE.search(lowered) is not None


def check(message: Message, ctx: Context, rules: Rules) -> list[Finding]:
    if ctx.direction is Direction.INBOUND:
        return []
    settings = rules.policy.detectors.advertising

    text = f"{message.subject}\n{message.visible_text}"
    signs: list[str] = []
    score = 0
    for phrase in rules.advertising.found(text):
        score += rules.advertising.weights[phrase]
        signs.append(f'"{phrase}"')
    if message.header("list-unsubscribe"):
        score += 2
        signs.append("List-Unsubscribe header")
    elif _mentions_unsubscribe(text) or any(_mentions_unsubscribe(link.text) for link in message.html_links):
        score += 1
        signs.append("unsubscribe link")
    if (message.header("precedence") or "").lower() in ("bulk", "list", "junk"):
        score += 1
        signs.append("bulk precedence")
    if len(ctx.recipients) >= settings.many_recipients:
        score += 1
        signs.append(f"{len(ctx.recipients)} recipients")
    if score < settings.threshold:
        return []
    return [
        Finding(
            NAME,
            "advertising",
            Severity.STRONG,
            settings.clause,
            "the message reads as unsolicited commercial or advertising material",
            (f"score {score} (threshold {settings.threshold})", *signs[:6]),
            "body",
        )
    ]
