"""Verdict: the one decision about a message, with everything needed to carry it out."""

from __future__ import annotations

from dataclasses import dataclass, field

from milter.findings import Finding
from milter.policy.schema import Action, Direction, Role


@dataclass(frozen=True)
class SmtpReply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


@dataclass(frozen=True)
class Verdict:
    action: Action
    reference: str
    findings: tuple[Finding, ...]
    direction: Direction
    sender_role: Role
    # The clauses the action rests on: those of the findings that moved it past accept.
    clauses: tuple[str, ...] = ()
    reply: SmtpReply | None = None
    headers: tuple[tuple[str, str], ...] = ()
    # Every header name the gateway writes results under: a sender's forged copies are
    # removed even when this verdict adds no such header (no findings header on clean mail).
    result_header_names: tuple[str, ...] = ()
    # A missing_bcc finding whose rule says fix: parents' addresses are hidden in whatever
    # copy goes on, also when a stronger finding holds the message (its release shows none).
    fix_recipients: bool = False
    subject_prefix: str | None = None
    # Guidance templates for the sender, empty unless the sender may be sent mail (trusted).
    guidance: tuple[str, ...] = ()
    # Roles (rules' school.contacts keys) to alert.
    alerts: tuple[str, ...] = ()
    # Checks that could not run; with fail-open rules they did not change the action.
    failed_checks: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, object]:
        return {
            "action": self.action.value,
            "reference": self.reference,
            "direction": self.direction.value,
            "sender_role": self.sender_role.value,
            "clauses": list(self.clauses),
            "reply": str(self.reply) if self.reply else None,
            "headers": [list(h) for h in self.headers],
            "subject_prefix": self.subject_prefix,
            "guidance": list(self.guidance),
            "alerts": list(self.alerts),
            "failed_checks": list(self.failed_checks),
            "findings": [f.as_dict() for f in self.findings],
        }
