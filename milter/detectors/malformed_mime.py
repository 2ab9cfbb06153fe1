"""malformed_mime: structural faults in the message; recorded, never a crash (clause 2.2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from milter.findings import Finding, Severity

if TYPE_CHECKING:
    from milter.context import Context
    from milter.message import Message
    from milter.policy.loader import Rules

NAME = "malformed_mime"


def check(message: Message, ctx: Context, rules: Rules) -> list[Finding]:
    defects = message.defects
    if not defects:
        return []
    names = list(dict.fromkeys(d.name for d in defects))
    return [
        Finding(
            NAME,
            "malformed_mime",
            Severity.MILD,
            rules.policy.detectors.malformed_mime.clause,
            f"the message is not well-formed MIME ({len(defects)} fault(s))",
            tuple(names[:5]),
            ", ".join(dict.fromkeys(d.where for d in defects[:5])),
        )
    ]
