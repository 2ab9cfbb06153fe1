"""The scanning engine: raw message + envelope -> Verdict. The milter, SMTP mode and `scan` all call it.

`scan` does everything in the calling thread. The milter daemon scans small mail on its
event loop's thread, where nothing may wait on another process: it calls `examine` with
the virus scan left out, asks clamd itself without blocking, then `conclude`s.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass
class Examination:
    """A message with the findings of the detectors run so far, before the decision."""

    message: Message
    context: Context
    findings: list[Finding] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def record(self, name: str, check: Callable[[], list[Finding]]) -> None:
        """One detector's findings; one that raises is a failed check, never a lost message."""
        try:
            self.findings.extend(check())
        except Exception as exc:
            # Only the exception type: its text may quote message content.
            log.error(
                "detector %s failed: %s", name, type(exc).__name__, exc_info=log.isEnabledFor(logging.DEBUG)
            )
            self.failed.append(name)


def examine(raw: bytes, envelope: Envelope, rules: Rules, skip: frozenset[str] = frozenset()) -> Examination:
    """Parse the message and run every enabled detector but those in `skip`."""
    # Each message pays for its own text normalisation (see normalize_cached). Another
    # thread's scan may lose its shared copies too: a recomputation, never a wrong result.
    normalize_cached.cache_clear()
    message = Message(raw)
    try:
        ctx = derive_context(envelope, message, rules)
    except Exception as exc:  # pragma: no cover - derive_context is defensive; this is the last guard
        log.error("context failed: %s", type(exc).__name__)
        raise
    exam = Examination(message, ctx)
    for name, check in active(rules):
        if name not in skip:
            exam.record(name, functools.partial(check, message, ctx, rules))
    return exam


def conclude(exam: Examination, rules: Rules, reference: str | None = None) -> Scan:
    """The verdict on what the detectors found."""
    return Scan(
        exam.message, exam.context, decide(exam.findings, exam.context, rules, exam.failed, reference)
    )


def scan(raw: bytes, envelope: Envelope, rules: Rules, reference: str | None = None) -> Scan:
    return conclude(examine(raw, envelope, rules), rules, reference)
