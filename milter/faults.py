"""Failpoints for tests that must kill the daemon at an exact moment (never set in production).

SCHOOL_MILTER_FAULTS="after-hold" makes the process exit right after a quarantined message
is stored and before the MTA hears anything: the integration tests prove that such a
crash loses nothing. With the variable unset (always, outside tests) this does nothing.
"""

from __future__ import annotations

import os

_ACTIVE = frozenset(filter(None, os.environ.get("SCHOOL_MILTER_FAULTS", "").split(",")))


def failpoint(name: str) -> None:
    if name in _ACTIVE:
        os._exit(70)
