"""The detectors the engine runs, in order. A new check is a new module here plus a rules entry."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

from milter.detectors import (
    advertising,
    blocklist,
    bulk_weight,
    dangerous_attachment,
    hidden_text,
    malformed_mime,
    missing_bcc,
    obscene_language,
    offensive_links,
    safeguarding_concern,
    shouting,
    virus_scan,
)

if TYPE_CHECKING:
    from milter.context import Context
    from milter.findings import Finding
    from milter.message import Message
    from milter.policy.loader import Rules

Check = Callable[["Message", "Context", "Rules"], list["Finding"]]

DETECTORS: tuple[ModuleType, ...] = (
    malformed_mime,
    blocklist,
    obscene_language,
    safeguarding_concern,
    offensive_links,
    missing_bcc,
    bulk_weight,
    shouting,
    advertising,
    hidden_text,
    dangerous_attachment,
    virus_scan,
)


def active(rules: Rules) -> list[tuple[str, Check]]:
    """(name, check) for each detector the rules enable."""
    out: list[tuple[str, Check]] = []
    for module in DETECTORS:
        name: str = module.NAME
        if getattr(rules.policy.detectors, name).enabled:
            out.append((name, module.check))
    return out
