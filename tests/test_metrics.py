"""The parent's /metrics with several workers: files written by real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from milter.metrics import WorkerFilesCollector
from tests.conftest import REPO

# A worker: counts one rejected message and reports the rules reload as failed.
WORKER = """
from milter.metrics import Metrics
m = Metrics()
m.messages.labels("reject").inc()
m.dependency_up.labels("rules").set(float(__import__("sys").argv[1]))
"""


def run_worker(directory: Path, rules_up: int) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(rules_up)],
        cwd=REPO,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        check=True,
    )
    assert proc.returncode == 0
    return len(list(directory.glob("*.db")))


def scrape(directory: Path) -> str:
    registry = CollectorRegistry()
    WorkerFilesCollector(registry, path=str(directory))
    return generate_latest(registry).decode()


def test_a_file_being_created_does_not_fail_the_scrape(tmp_path: Path) -> None:
    assert run_worker(tmp_path, 1) >= 2
    # The moment a worker has created its file but not yet sized it.
    (tmp_path / "counter_999999.db").touch()
    plain = CollectorRegistry()
    multiprocess.MultiProcessCollector(plain, path=str(tmp_path))  # type: ignore[no-untyped-call]
    with pytest.raises(Exception, match="unpack"):
        generate_latest(plain)  # the library's own collector: the whole scrape fails
    text = scrape(tmp_path)
    assert 'school_milter_messages_total{action="reject"} 1.0' in text
    assert 'school_milter_dependency_up{dependency="rules"} 1.0' in text


def test_a_dead_workers_rules_gauge_leaves_with_it(tmp_path: Path) -> None:
    run_worker(tmp_path, 0)
    assert 'school_milter_dependency_up{dependency="rules"} 0.0' in scrape(tmp_path)
    (dead_file,) = tmp_path.glob("gauge_livemin_*.db")
    dead_pid = int(dead_file.stem.rsplit("_", 1)[1])
    run_worker(tmp_path, 1)  # its replacement reloaded good rules
    multiprocess.mark_process_dead(dead_pid, path=str(tmp_path))  # type: ignore[no-untyped-call]
    text = scrape(tmp_path)
    assert 'school_milter_dependency_up{dependency="rules"} 1.0' in text
    # Counters of dead workers still count: mail they decided was decided.
    assert 'school_milter_messages_total{action="reject"} 2.0' in text
