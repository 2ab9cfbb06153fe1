"""Block and allow lists from the quarantine store, as the scanning engine sees them.

Approved entries apply to the next message without a restart: the daemon installs a
source (the store) and each scan asks for the current snapshot, which is re-read from
the store only when the store's list version has changed. In the daemon a background
task does the asking (`refresh`), so a scan never waits on the database: a slow or
unreachable store delays new entries, never mail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

KINDS = ("sender", "domain", "url", "fingerprint")


@dataclass(frozen=True)
class Lists:
    version: int = -1
    blocked: dict[str, frozenset[str]] = field(default_factory=dict)
    allowed: dict[str, frozenset[str]] = field(default_factory=dict)

    def blocks(self, kind: str) -> frozenset[str]:
        return self.blocked.get(kind, frozenset())

    def allows(self, kind: str) -> frozenset[str]:
        return self.allowed.get(kind, frozenset())


EMPTY = Lists()


class ListsSource:
    """Caches the store's lists; asks the store for its version at most every `interval` seconds."""

    def __init__(
        self,
        version: Callable[[], int],
        load: Callable[[], Lists],
        interval: float = 0.0,
        *,
        refreshed_elsewhere: bool = False,
    ) -> None:
        self._version = version
        self._load = load
        self.interval = interval
        # True: `current` only reads the snapshot; someone calls `refresh` every interval.
        self.refreshed_elsewhere = refreshed_elsewhere
        self._lists = EMPTY
        self._checked = 0.0
        self._lock = threading.Lock()

    def refresh(self) -> Lists:
        """Ask the store for its list version; re-read the lists if they changed."""
        with self._lock:
            version = self._version()
            if version != self._lists.version:
                self._lists = self._load()
            self._checked = time.monotonic()
            return self._lists

    def current(self) -> Lists:
        if self.refreshed_elsewhere:
            return self._lists
        if self.interval and time.monotonic() - self._checked < self.interval:
            return self._lists
        return self.refresh()


_source: Callable[[], Lists] | None = None


def install(source: Callable[[], Lists] | None) -> None:
    """Where scans get their lists from (the daemon installs the store's); None for no lists."""
    global _source
    _source = source


def current() -> Lists:
    return _source() if _source else EMPTY
