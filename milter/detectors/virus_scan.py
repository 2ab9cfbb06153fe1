"""virus_scan: the whole message through clamd, which unpacks MIME and archives itself (clause 1.2).

clamd down or slow is not a verdict about the message: per rules it is a temporary
failure (the sending server retries; the default for mail with attachments) or a tag
saying the message went unscanned. clamd's size-limit reply is its own case: the
message is too large to scan, which is reported, not mistaken for clean or infected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from milter.clamd import ClamdClient, ClamdResult, ClamdUnavailable
from milter.findings import Finding, Severity

if TYPE_CHECKING:
    from milter.context import Context
    from milter.message import Message
    from milter.policy.loader import Rules
    from milter.policy.schema import VirusScan

NAME = "virus_scan"


class ScannerUnavailable(Exception):
    """clamd could not be asked and rules say such mail waits: the engine turns this into a tempfail."""


def _unscanned(rules: Rules, summary: str, evidence: str) -> Finding:
    clause = rules.policy.detectors.virus_scan.clause
    return Finding(NAME, "unscanned", Severity.MILD, clause, summary, (evidence,), "message")


def _when_unavailable(settings: VirusScan, has_attachments: bool) -> str:
    return (
        settings.unavailable_with_attachments if has_attachments else settings.unavailable_without_attachments
    )


def wanted(message: Message, rules: Rules) -> bool:
    """Whether the rules want clamd asked about this message."""
    return rules.policy.detectors.virus_scan.scan != "attachments" or bool(message.attachments)


def client(rules: Rules) -> ClamdClient:
    settings = rules.policy.detectors.virus_scan
    return ClamdClient(settings.clamd, timeout=settings.timeout, max_stream=int(settings.max_stream))


def check(message: Message, ctx: Context, rules: Rules) -> list[Finding]:
    if not wanted(message, rules):
        return []
    answer: ClamdResult | ClamdUnavailable
    try:
        answer = client(rules).scan_bytes(message.raw)
    except ClamdUnavailable as exc:
        answer = exc
    return judge(answer, message, rules)


def judge(answer: ClamdResult | ClamdUnavailable, message: Message, rules: Rules) -> list[Finding]:
    """The findings for clamd's answer (or for not getting one), whoever asked clamd."""
    settings = rules.policy.detectors.virus_scan
    has_attachments = bool(message.attachments)
    if isinstance(answer, ClamdUnavailable):
        mode = _when_unavailable(settings, has_attachments)
        if mode == "tempfail":
            raise ScannerUnavailable(str(answer))
        return [_unscanned(rules, "the virus scanner could not be reached: the message is unscanned", "down")]
    result = answer
    if result.status == "infected":
        signature = result.signature or "unknown"
        return [
            Finding(
                NAME,
                "malware",
                Severity.SEVERE,
                settings.clause,
                f"virus found: {signature}",
                (signature,),
                "attachments" if has_attachments else "body",
            )
        ]
    if result.status == "size_limit":
        return [
            _unscanned(rules, "the message is too large for the virus scanner: it is unscanned", "too large")
        ]
    if result.status == "error":
        mode = _when_unavailable(settings, has_attachments)
        if mode == "tempfail":
            raise ScannerUnavailable(f"clamd error: {result.detail}")
        return [_unscanned(rules, "the virus scanner failed on this message: it is unscanned", "clamd error")]
    return []
