"""dangerous_attachment: programs, scripts, macros, disk images, lying names, unscannable archives (1.2).

Every attachment is judged by its content (libmagic), not by the name or type the
sender declared, and archives are opened (in memory, within limits) so the same rules
reach the files inside them. Which kinds are findings depends on the direction, with
exceptions per sender domain (say, encrypted zips from the local authority).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from milter.archives import ArchiveLimits, inspect_archive, is_archive
from milter.context import domain_of
from milter.filetypes import (
    FileType,
    html_has_script,
    identify,
    is_encrypted_document,
    name_problems,
)
from milter.findings import Finding, Severity
from milter.policy.schema import Direction

if TYPE_CHECKING:
    from milter.context import Context
    from milter.message import Message
    from milter.policy.loader import Rules

NAME = "dangerous_attachment"
MAX_EVIDENCE = 5

SEVERITY = {
    "executable": Severity.SEVERE,
    "script": Severity.SEVERE,
    "disk_image": Severity.STRONG,
    "office_macro": Severity.STRONG,
    "html_script": Severity.STRONG,
    # A name that lies about the content is a deliberate trick.
    "type_mismatch": Severity.SEVERE,
    "double_extension": Severity.SEVERE,
    "name_trick": Severity.SEVERE,
    "encrypted": Severity.STRONG,
    "archive_bomb": Severity.STRONG,
    "archive_unreadable": Severity.MILD,
}
SUMMARY = {
    "executable": "a program (executable) is attached",
    "script": "a script is attached",
    "disk_image": "a disk image is attached",
    "office_macro": "an Office document with macros is attached",
    "html_script": "an HTML attachment carries script",
    "type_mismatch": "an attachment's name hides what it really is",
    "double_extension": "an attachment has a double extension",
    "name_trick": "an attachment's name uses invisible or reversing characters",
    "encrypted": "an encrypted or password-protected attachment cannot be scanned",
    "archive_bomb": "an archive exceeds the unpacking limits (a possible archive bomb)",
    "archive_unreadable": "an archive could not be read",
}
NAME_KINDS = {
    "extension_mismatch": "type_mismatch",
    "double_extension": "double_extension",
    "bidi_override": "name_trick",
    "invisible_characters": "name_trick",
    "lookalike_characters": "name_trick",
}


def _content_kinds(data: bytes, filetype: FileType) -> list[str]:
    kinds = []
    # identify() already reads VBA projects: an Office file with macros is "office_macro".
    if filetype.kind in ("executable", "script", "disk_image", "office_macro"):
        kinds.append(filetype.kind)
    if filetype.kind == "html" and html_has_script(data):
        kinds.append("html_script")
    if is_encrypted_document(data, filetype):
        kinds.append("encrypted")
    return kinds


def _name_kinds(name: str, filetype: FileType) -> list[str]:
    kinds = []
    for problem in name_problems(name, filetype):
        if problem.kind in NAME_KINDS:
            kinds.append(NAME_KINDS[problem.kind])
        elif problem.kind == "dangerous_extension":
            # The extension alone says "run me" (.js, .vbs, .bat): libmagic sees only text.
            kinds.append(filetype.kind if filetype.kind in ("executable", "disk_image") else "script")
    return kinds


def _archive_kind(problem: str) -> str:
    if problem.startswith("encrypted"):
        return "encrypted"
    if problem.startswith("unreadable"):
        return "archive_unreadable"
    return "archive_bomb"


def attachment_kinds(name: str, data: bytes, limits: ArchiveLimits) -> dict[str, list[str]]:
    """kind -> the names (paths inside archives too) it was found in."""
    found: dict[str, list[str]] = {}

    def note(kind: str, where: str) -> None:
        places = found.setdefault(kind, [])
        if where not in places:
            places.append(where)

    filetype = identify(data, name)
    for kind in _content_kinds(data, filetype) + _name_kinds(name, filetype):
        note(kind, name or "(unnamed)")
    if is_archive(data, name):
        report = inspect_archive(data, name, limits)
        for problem in report.problems:
            note(_archive_kind(problem), name or "(unnamed)")
        for member in report.members:
            if member.encrypted:
                note("encrypted", member.path)
            if member.data is None:
                continue
            inner = identify(member.data, member.name)
            for kind in _content_kinds(member.data, inner) + _name_kinds(member.name, inner):
                note(kind, member.path)
    return found


def check(message: Message, ctx: Context, rules: Rules) -> list[Finding]:
    settings = rules.policy.detectors.dangerous_attachment
    attachments = message.attachments
    if not attachments:
        return []
    blocked = set(settings.blocked.get(ctx.direction, []))
    sender_domain = domain_of(ctx.sender)
    for exception in settings.exceptions:
        if any(sender_domain == d or sender_domain.endswith("." + d) for d in exception.sender_domains):
            blocked -= set(exception.kinds)
    limits = ArchiveLimits(
        max_depth=settings.max_depth,
        max_members=settings.max_members,
        max_total_bytes=int(settings.max_total),
        max_ratio=settings.max_ratio,
    )
    by_kind: dict[str, list[str]] = {}
    for attachment in attachments:
        for kind, places in attachment_kinds(attachment.filename, attachment.payload(), limits).items():
            by_kind.setdefault(kind, []).extend(p for p in places if p not in by_kind.get(kind, []))
    findings = [
        Finding(
            NAME,
            kind,
            SEVERITY[kind],
            settings.clause,
            SUMMARY[kind],
            tuple(places[:MAX_EVIDENCE]),
            "attachments",
        )
        for kind, places in by_kind.items()
        if kind in blocked
    ]
    if settings.tag_external and ctx.direction is Direction.INBOUND:
        findings.append(
            Finding(
                NAME,
                "external_attachment",
                Severity.MILD,
                settings.clause,
                "attachments from outside the school: do not open them unless you expect them",
                tuple(a.filename or "(unnamed)" for a in attachments[:MAX_EVIDENCE]),
                "attachments",
            )
        )
    return findings
