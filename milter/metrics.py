"""Prometheus metrics: messages by action, findings by category, scan latency, errors, dependency
health, the TLS certificate's expiry, outbox mail given up on.

With several worker processes, prometheus_client's multiprocess mode adds up what
each worker wrote to a shared directory; the parent serves the sum.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)

from milter.server import Decision

# What the gateway mails (Store.queue_mail's kinds): the outbox_given_up label's values.
OUTBOX_KINDS = ("guidance", "alert", "digest")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _GaugeWhenSet:
    """A gauge with no sample until it is first set.

    An unlabelled Gauge exports 0 from the moment it is made, and in multiprocess mode it
    writes that 0 to the worker's file at once; for a timestamp 0 means 1970. Making the
    gauge on the first set() means a process that never sets it exports nothing.
    """

    def __init__(self, make: Callable[[], Gauge]) -> None:
        self._make = make
        self._gauge: Gauge | None = None

    def set(self, value: float) -> None:
        if self._gauge is None:
            self._gauge = self._make()
        self._gauge.set(value)


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.messages = Counter(
            "school_milter_messages", "Messages decided, by verdict action", ["action"], registry=registry
        )
        self.findings = Counter(
            "school_milter_findings",
            "Findings, by detector and category",
            ["detector", "category"],
            registry=registry,
        )
        self.scan_seconds = Histogram(
            "school_milter_scan_seconds",
            "Time from end of message to verdict",
            buckets=BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "school_milter_errors",
            "Messages that could not be scanned, by error (check_failed:<detector>: a check could not run)",
            ["kind"],
            registry=registry,
        )
        self.dependency_up = Gauge(
            "school_milter_dependency_up",
            "1 when a dependency is usable (rules: the last reload succeeded)",
            ["dependency"],
            # livemin: a dead worker's value leaves with it (a replaced worker that had
            # failed a reload must not hold the gauge at 0 for ever).
            multiprocess_mode="livemin",
            registry=registry,
        )

        # Only once there is a certificate: a gateway without one (milter only) must not
        # export 0, which reads as expired in 1970 and fires expiry alerts.
        self.tls_certificate_expiry = _GaugeWhenSet(
            lambda: Gauge(
                "school_milter_tls_certificate_expiry_timestamp_seconds",
                "When SMTP mode's TLS certificate expires, in Unix time (alert well before it)",
                multiprocess_mode="livemin",
                registry=registry,
            )
        )
        self.outbox_given_up = Counter(
            "school_milter_outbox_given_up",
            "Mail the gateway sends (guidance, alerts, digests) given up on after days of retries",
            ["kind"],
            registry=registry,
        )
        for kind in OUTBOX_KINDS:  # 0 from the start, so the first loss shows as an increase
            self.outbox_given_up.labels(kind)

    def observe(self, decision: Decision, virus_scanning: bool = False) -> None:
        self.messages.labels(decision.action).inc()
        self.scan_seconds.observe(decision.scan_seconds)
        if decision.error:
            self.errors.labels(decision.error).inc()
        if decision.result:
            verdict = decision.result.verdict
            # A check that could not run (clamd down, a detector that crashed) left the message
            # unscanned by it, whether the rules then tempfailed it or let it through. One
            # label value per detector: a fixed, small set.
            for name in verdict.failed_checks:
                self.errors.labels(f"check_failed:{name}").inc()
            for finding in verdict.findings:
                self.findings.labels(finding.detector, finding.category).inc()
            if virus_scanning:
                self._clamd_health(decision)

    def _clamd_health(self, decision: Decision) -> None:
        """clamd's health as the last message that needed it saw it (the console shows this)."""
        assert decision.result is not None
        verdict = decision.result.verdict
        down = "virus_scan" in verdict.failed_checks or any(
            f.detector == "virus_scan" and f.category == "unscanned" and "down" in f.evidence
            for f in verdict.findings
        )
        if down:
            self.dependency_up.labels("clamd").set(0)
        elif any(f.detector == "virus_scan" for f in verdict.findings) or decision.result.message.attachments:
            # Mail with attachments goes to clamd; scanned without a failure means clamd answered.
            self.dependency_up.labels("clamd").set(1)


class WorkerFilesCollector(multiprocess.MultiProcessCollector):
    """The workers' metric files added up, skipping a file a worker is creating right now.

    prometheus_client creates a worker's file before it sizes it, so a scrape at that moment
    reads 0 bytes and its collector fails the whole scrape with a 500
    (prometheus/client_python#1199, open in 0.26). A file that is empty has nothing in it yet.
    """

    def __init__(self, registry: CollectorRegistry | None, path: str | None = None) -> None:
        super().__init__(registry, path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[object]:
        files = []
        for name in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(name) > 0:
                    files.append(name)
            except FileNotFoundError:  # a dead worker's live gauge, removed since the glob
                continue
        return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call,no-any-return]


def serve_metrics(host: str, port: int, multiprocess_mode: bool) -> None:
    """Serve /metrics from a background thread (the parent's, with several workers)."""
    if multiprocess_mode:
        registry = CollectorRegistry()
        WorkerFilesCollector(registry)
        start_http_server(port, addr=host, registry=registry)
    else:
        start_http_server(port, addr=host)


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges so they do not count forever."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
