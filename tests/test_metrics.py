"""The parent's /metrics with several workers: files written by real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from milter import engine
from milter.detectors import obscene_language, shouting
from milter.envelope import Envelope
from milter.metrics import Metrics, WorkerFilesCollector
from milter.policy.loader import Rules
from milter.server import Decision
from tests.conftest import REPO
from tests.mail import build

EXPIRY = "school_milter_tls_certificate_expiry_timestamp_seconds"

# A worker: counts one rejected message and reports the rules reload as failed; with a
# third argument, SMTP mode's certificate expiry as SMTP mode sets it.
WORKER = """
import sys
from milter.metrics import Metrics
m = Metrics()
m.messages.labels("reject").inc()
m.dependency_up.labels("rules").set(float(sys.argv[1]))
if len(sys.argv) > 2:
    m.tls_certificate_expiry.set(float(sys.argv[2]))
"""


def run_worker(directory: Path, rules_up: int, certificate_expires: float | None = None) -> int:
    expiry = [] if certificate_expires is None else [str(certificate_expires)]
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(rules_up), *expiry],
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


def expiry_samples(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(EXPIRY)]


def test_no_certificate_expiry_without_a_certificate() -> None:
    # A milter-only gateway has no certificate: a 0 would read as expired in 1970.
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert expiry_samples(generate_latest(registry).decode()) == []
    metrics.tls_certificate_expiry.set(1_900_000_000.0)
    assert expiry_samples(generate_latest(registry).decode()) == [f"{EXPIRY} 1.9e+09"]


def test_no_certificate_expiry_from_workers_without_a_certificate(tmp_path: Path) -> None:
    run_worker(tmp_path, 1)
    assert expiry_samples(scrape(tmp_path)) == []
    # A worker with one beside a worker without: its date, not the other's 0 (livemin).
    run_worker(tmp_path, 1, certificate_expires=1_900_000_000.0)
    assert expiry_samples(scrape(tmp_path)) == [f"{EXPIRY} 1.9e+09"]


def test_a_check_that_could_not_run_counts_as_an_error(rules: Rules, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*_args: object) -> list[object]:
        raise RuntimeError("detector bug")

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    raw = build("a.patel@redborne.example", "parent@example.org", "Trip", "See you on Monday.\n")
    envelope = Envelope(mail_from="a.patel@redborne.example", rcpt_to=("parent@example.org",))
    for module in (obscene_language, shouting):  # tempfail by rules/, and fail-open (shouting)
        with monkeypatch.context() as patch:
            patch.setattr(module, "check", crash)
            result = engine.scan(raw, envelope, rules)
        assert result.verdict.failed_checks == (module.NAME,)
        metrics.observe(
            Decision(result.verdict.reference, result.verdict.action.value, 0.01, "Q1", len(raw), 1, result)
        )

    def errors(kind: str) -> float | None:
        return registry.get_sample_value("school_milter_errors_total", {"kind": kind})

    assert registry.get_sample_value("school_milter_messages_total", {"action": "tempfail"}) == 1.0
    assert errors("check_failed:obscene_language") == 1.0
    assert errors("check_failed:shouting") == 1.0
