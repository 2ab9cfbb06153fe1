"""missing_bcc: school mail that shows parents' addresses to each other instead of using Bcc (appendix)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from milter.findings import Finding, Severity
from milter.policy.schema import Direction, Role

if TYPE_CHECKING:
    from milter.context import Context
    from milter.message import Message
    from milter.policy.loader import Rules

NAME = "missing_bcc"


def check(message: Message, ctx: Context, rules: Rules) -> list[Finding]:
    if ctx.direction is Direction.INBOUND:
        return []
    from milter.context import is_local

    settings = rules.policy.detectors.missing_bcc
    visible = message.visible_recipients
    if rules.directory is not None:
        exposed = [a for a in visible if (p := rules.directory.get(a)) is not None and p.role is Role.PARENT]
        limit, who = settings.max_visible_parents, "parent"
    else:
        # No directory: every outside address stands in for a parent's.
        exposed = [a for a in visible if not is_local(a, rules)]
        limit, who = settings.max_visible_external, "external"
    if len(exposed) <= limit:
        return []
    return [
        Finding(
            NAME,
            "missing_bcc",
            Severity.STRONG,
            settings.clause,
            f"{len(exposed)} {who} addresses are visible to every recipient in To/Cc; use Bcc",
            (f"{len(exposed)} {who} addresses in To/Cc (limit {limit})",),
            "headers",
        )
    ]
