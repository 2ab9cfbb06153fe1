"""Per-day counts of decisions for the console's dashboard, added up in memory and written to
the store once a minute (one small transaction, not one per message).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from milter.server import Decision
    from milter.store.store import Store

# Actions that keep a message from its recipients: their senders are "blocked senders".
_STOPPED = frozenset({"reject", "quarantine", "discard"})


class Tally:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[dt.date, str, str]] = Counter()
        self._senders: Counter[tuple[dt.date, str]] = Counter()

    def add(self, decision: Decision, day: dt.date | None = None) -> None:
        day = day or dt.datetime.now(dt.UTC).date()
        with self._lock:
            self._counts[(day, decision.action, "")] += 1
            if decision.result is None:
                return
            verdict = decision.result.verdict
            for category in {f"{f.detector}/{f.category}" for f in verdict.findings}:
                self._counts[(day, decision.action, category[:80])] += 1
            sender = decision.result.context.sender
            if decision.action in _STOPPED and sender:
                self._senders[(day, sender[:320])] += 1

    def flush(self, store: Store) -> None:
        """Write what was counted; kept for the next flush if the store is unreachable."""
        with self._lock:
            counts, senders = self._counts, self._senders
            self._counts, self._senders = Counter(), Counter()
        try:
            store.add_counts(dict(counts), dict(senders))
        except Exception:
            with self._lock:
                self._counts.update(counts)
                self._senders.update(senders)
            raise
