"""Shared metrics for worker processes: set up before prometheus_client is first imported."""

from __future__ import annotations

import os
from pathlib import Path


def prepare_multiprocess(directory: Path) -> None:
    """Before forking workers: every process then writes its metric values under `directory`.

    prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is imported, so this runs first.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
