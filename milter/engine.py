"""The scanning engine: raw message + envelope -> Verdict. The milter, SMTP mode and `scan` all call it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from milter.context import Context, derive_context
from milter.decide import decide
from milter.detectors.registry import active
from milter.envelope import Envelope
from milter.findings import Finding
from milter.message import Message
from milter.normalize import normalize_cached
from milter.policy.loader import Rules
from milter.verdict import Verdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scan:
    message: Message
    context: Context
    verdict: Verdict


def run_detectors(message: Message, ctx: Context, rules: Rules) -> tuple[list[Finding], list[str]]:
    """All enabled detectors; one that raises is recorded as a failed check, never a lost message."""
    findings: list[Finding] = []
    failed: list[str] = []
    for name, check in active(rules):
        try:
            findings.extend(check(message, ctx, rules))
        except Exception as exc:
            # Only the exception type: its text may quote message content.
            log.error(
                "detector %s failed: %s", name, type(exc).__name__, exc_info=log.isEnabledFor(logging.DEBUG)
            )
            failed.append(name)
    return findings, failed


def scan(raw: bytes, envelope: Envelope, rules: Rules, reference: str | None = None) -> Scan:
    # Each message pays for its own text normalisation (see normalize_cached). Another
    # thread's scan may lose its shared copies too: a recomputation, never a wrong result.
    normalize_cached.cache_clear()
    message = Message(raw)
    try:
        ctx = derive_context(envelope, message, rules)
    except Exception as exc:  # pragma: no cover - derive_context is defensive; this is the last guard
        log.error("context failed: %s", type(exc).__name__)
        raise
    findings, failed = run_detectors(message, ctx, rules)
    return Scan(message, ctx, decide(findings, ctx, rules, failed, reference))
