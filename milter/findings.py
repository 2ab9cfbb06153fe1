"""Finding: what one detector saw, safe to log and to show a reviewer (never raw content)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Severity(enum.IntEnum):
    """How serious a finding is; ordered so rules can say 'strong or worse'."""

    MILD = 1
    STRONG = 2
    SEVERE = 3

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(s.name.lower() for s in cls)
            raise ValueError(f"unknown severity {text!r} (expected one of: {names})") from None

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Finding:
    """One policy-relevant observation about a message.

    `evidence` holds only what is safe to show a reviewer: a masked term, a file
    name, a count, a domain. Never the offending text itself.
    """

    detector: str
    category: str
    severity: Severity
    clause: str
    summary: str
    evidence: tuple[str, ...] = field(default=())
    location: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "detector": self.detector,
            "category": self.category,
            "severity": str(self.severity),
            "clause": self.clause,
            "summary": self.summary,
            "evidence": list(self.evidence),
            "location": self.location,
        }
