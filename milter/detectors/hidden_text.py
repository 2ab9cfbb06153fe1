"""hidden_text: HTML text a reader cannot see, a common way to smuggle words past filters (5.5)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from milter.findings import Finding, Severity

if TYPE_CHECKING:
    from milter.context import Context
    from milter.message import Message
    from milter.policy.loader import Rules

NAME = "hidden_text"


def check(message: Message, ctx: Context, rules: Rules) -> list[Finding]:
    settings = rules.policy.detectors.hidden_text
    size = len("".join(message.hidden_text.split()))
    if size < settings.min_chars:
        return []
    return [
        Finding(
            NAME,
            "hidden_text",
            Severity.MILD,
            settings.clause,
            f"the HTML hides {size} characters of text from the reader",
            (f"{size} hidden characters",),
            "body",
        )
    ]
