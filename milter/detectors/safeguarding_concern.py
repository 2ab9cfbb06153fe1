"""safeguarding_concern: signs of self-harm, bullying or grooming, routed to the DSL (KCSIE; 6.15).

A safeguarding signal is never bounced back to the sender: a child who writes that they
want to hurt themselves must not get a rejection. Rules deliver or hold, and alert the
designated safeguarding lead. Each term carries exclusion contexts ("suicide prevention",
"killed myself laughing") that silence it when found nearby.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from milter.errors import Problem, RulesError
from milter.findings import Finding, Severity
from milter.lexicon import Hit, Lexicon, Term
from milter.normalize import NormalizedText, normalize, normalize_cached

if TYPE_CHECKING:
    from milter.context import Context
    from milter.message import Message
    from milter.policy.loader import Rules

NAME = "safeguarding_concern"
CATEGORIES = ("self_harm", "bullying", "grooming")
CATEGORY_WORDS = {"self_harm": "self-harm", "bullying": "bullying", "grooming": "grooming"}


def _phrase(text: str) -> str:
    return normalize(text).text.strip()


@dataclass(frozen=True)
class SafeguardingLexicon:
    lexicon: Lexicon
    # term text -> normalised exclusion phrases
    exclusions: dict[str, tuple[str, ...]]

    @classmethod
    def load(cls, path: Path) -> SafeguardingLexicon:
        """TSV: term, category, severity, exclusions separated by '|'. '#' comments."""
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise RulesError([Problem(path, None, f"cannot read: {exc}")]) from None
        terms: list[Term] = []
        exclusions: dict[str, tuple[str, ...]] = {}
        problems: list[Problem] = []
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            cols = [c.strip() for c in line.split("\t")]
            if len(cols) < 3:
                problems.append(
                    Problem(path, number, "expected term, category and severity separated by tabs")
                )
                continue
            term, category, severity = cols[:3]
            if category not in CATEGORIES:
                problems.append(
                    Problem(path, number, f"unknown category {category!r} (expected {', '.join(CATEGORIES)})")
                )
                continue
            try:
                level = Severity.parse(severity)
            except ValueError as exc:
                problems.append(Problem(path, number, str(exc)))
                continue
            text = _phrase(term)
            if not text:
                problems.append(Problem(path, number, "empty term"))
                continue
            terms.append(Term(text, category, level))
            if len(cols) > 3 and cols[3]:
                exclusions[text] = tuple(p for p in (_phrase(x) for x in cols[3].split("|")) if p)
        if problems:
            raise RulesError(problems)
        return cls(Lexicon(terms), exclusions)

    def find(self, text: str, window_words: int) -> list[Hit]:
        norm = normalize_cached(text)
        return [hit for hit in self.lexicon.find(norm) if not self._excluded(hit, norm, window_words)]

    def _excluded(self, hit: Hit, norm: NormalizedText, window_words: int) -> bool:
        phrases = self.exclusions.get(hit.term.text)
        if not phrases:
            return False
        stream = norm.text if hit.stream == "text" else norm.variants
        before = stream[: hit.start].split()[-window_words:] if window_words else []
        after = stream[hit.end :].split()[:window_words] if window_words else []
        window = " " + " ".join([*before, hit.term.text, *after]) + " "
        return any(f" {p} " in window for p in phrases)


def check(message: Message, ctx: Context, rules: Rules) -> list[Finding]:
    settings = rules.policy.detectors.safeguarding_concern
    by_category: dict[str, list[Hit]] = {}
    # Each text on its own, the same strings obscene_language reads: normalised once.
    for text in (message.subject, message.visible_text, message.hidden_text):
        for hit in rules.safeguarding.find(text, settings.context_words) if text else []:
            by_category.setdefault(hit.term.category, []).append(hit)
    findings = []
    for category, hits in by_category.items():
        worst = max(h.term.severity for h in hits)
        findings.append(
            Finding(
                NAME,
                category,
                worst,
                settings.category_clauses.get(category, settings.clause),
                f"possible {CATEGORY_WORDS[category]} concern for the designated safeguarding lead",
                # Safeguarding phrases are shown as the rule that matched, not masked: the
                # DSL needs to know which signal fired, and these are not obscene.
                tuple(dict.fromkeys(f'"{h.term.text}"' for h in hits))[:5],
                "body",
            )
        )
    return findings
