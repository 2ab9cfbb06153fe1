"""obscene_language: offensive, obscene or abusive words, however disguised (clauses 5.5 and 5.7)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from milter.findings import Finding
from milter.lexicon import Hit, mask
from milter.policy.schema import Direction

if TYPE_CHECKING:
    from milter.context import Context
    from milter.message import Message
    from milter.policy.loader import Rules

NAME = "obscene_language"
MAX_EVIDENCE = 5

CATEGORY_WORDS = {
    "profanity": "profanity",
    "sexual": "sexual language",
    "slurs_hate": "a slur or hateful language",
    "threats_abuse": "threatening or abusive language",
}


def _places(message: Message, scan_hidden: bool) -> list[tuple[str, str]]:
    places = [("subject", message.subject), ("body", message.visible_text)]
    if scan_hidden:
        places.append(("hidden text", message.hidden_text))
    names = "\n".join(a.filename for a in message.attachments if a.filename)
    places.append(("attachment name", names))
    return places


def check(message: Message, ctx: Context, rules: Rules) -> list[Finding]:
    settings = rules.policy.detectors.obscene_language
    clause = settings.clause_received if ctx.direction is Direction.INBOUND else settings.clause
    # category -> (hits, locations), so one finding per category however often it occurs.
    by_category: dict[str, tuple[list[Hit], list[str]]] = {}
    for location, text in _places(message, settings.scan_hidden_text):
        if not text:
            continue
        for hit in rules.obscene.find_text(text):
            hits, locations = by_category.setdefault(hit.term.category, ([], []))
            if all(h.term != hit.term for h in hits):
                hits.append(hit)
            if location not in locations:
                locations.append(location)
    findings = []
    for category, (hits, locations) in by_category.items():
        hits.sort(key=lambda h: -h.term.severity)
        severity = hits[0].term.severity
        evidence = []
        for hit in hits[:MAX_EVIDENCE]:
            disguise = "" if hit.form == "plain" else f" ({hit.form})"
            evidence.append(f"{mask(hit.term.text)}{disguise}")
        summary = f"{severity} {CATEGORY_WORDS.get(category, category)} in the {' and '.join(locations)}"
        findings.append(
            Finding(NAME, category, severity, clause, summary, tuple(evidence), ", ".join(locations))
        )
    return findings
