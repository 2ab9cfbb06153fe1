"""bulk_weight: large mail sent to many people, and single huge attachments (appendix; clause 1.2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from milter.findings import Finding, Severity

if TYPE_CHECKING:
    from milter.context import Context
    from milter.message import Message
    from milter.policy.loader import Rules

NAME = "bulk_weight"


def human_size(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def check(message: Message, ctx: Context, rules: Rules) -> list[Finding]:
    settings = rules.policy.detectors.bulk_weight
    findings = []
    count = max(len(ctx.recipients), 1)
    total = message.size * count
    if total > settings.max_total:
        findings.append(
            Finding(
                NAME,
                "bulk_weight",
                Severity.STRONG,
                settings.clause,
                f"a {human_size(message.size)} message to {count} recipients puts {human_size(total)} "
                "on the mail system; share a Drive link instead",
                (f"{human_size(message.size)} x {count} recipients = {human_size(total)}",),
                "size",
            )
        )
    large = [a for a in message.attachments if a.size > settings.max_attachment]
    if large:
        findings.append(
            Finding(
                NAME,
                "large_attachment",
                Severity.STRONG,
                settings.clause,
                f"{len(large)} attachment(s) over {human_size(settings.max_attachment)}; "
                "share a Drive link instead",
                tuple(f"{a.filename or '(unnamed)'}: {human_size(a.size)}" for a in large[:5]),
                "attachments",
            )
        )
    return findings
