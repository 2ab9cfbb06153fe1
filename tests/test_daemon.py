"""`school-milter serve` as a process: workers, reload on SIGHUP, metrics, SIGTERM, bad config."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter.store import Store
from tests.conftest import REPO, copy_rules
from tests.mail import build
from tests.test_milter_protocol import converse, negotiate


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    def __init__(
        self, rules: Path, tmp: Path, *extra: str, port: int | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.log_path = tmp / "daemon.log"
        self.log_file = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "milter",
                "--rules",
                str(rules),
                "serve",
                "--milter",
                f"inet:127.0.0.1:{self.port}",
                "--metrics",
                f"127.0.0.1:{self.metrics_port}",
                # The test's own store, never the repository's var/.
                *(
                    []
                    if any(a.startswith("--database") for a in extra)
                    else ["--database", f"sqlite:///{tmp}/q.db"]
                ),
                *extra,
            ],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        self.wait_for_log("worker ready")

    def log_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def wait_for_log(self, message: str, count: int = 1, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for e in self.log_lines() if e["message"] == message) >= count:
                return
            assert self.proc.poll() is None, self.log_path.read_text()
            time.sleep(0.05)
        raise AssertionError(f"no {message!r} in log:\n{self.log_path.read_text()}")

    def send(self, body: str, subject: str = "s") -> tuple[str, dict[str, object]]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            conn = negotiate(sock)
            raw = build("j.hughes@redborne.example", "a.patel@redborne.example", subject, body)
            return converse(conn, raw, "j.hughes@redborne.example", ["a.patel@redborne.example"])[-1]  # type: ignore[no-any-return]

    def metrics(self) -> str:
        return (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            self.log_file.close()


@pytest.fixture
def rules_copy(tmp_path: Path) -> Path:
    copy_rules(tmp_path / "rules")
    return tmp_path / "rules"


@pytest.fixture
def daemon(rules_copy: Path, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(rules_copy, tmp_path, "--workers", "2")
    d.wait_for_log("worker ready", count=2)
    yield d
    d.stop()


def test_workers_answer_and_log_decisions_without_content(daemon: Daemon) -> None:
    assert daemon.send("hello")[0] == "c"
    assert daemon.send("this is fucking late")[0] == "y"
    daemon.wait_for_log("decision", count=2)
    decisions = [e for e in daemon.log_lines() if e.get("event") == "decision"]
    assert [d["action"] for d in decisions] == ["accept", "reject"]
    assert decisions[1]["findings"] == ["obscene_language/profanity/strong"]
    assert str(decisions[1]["reference"]).startswith("RB-")
    text = daemon.log_path.read_text()
    assert "fucking" not in text and "f******" not in text and "a.patel" not in text


def test_metrics_add_up_across_workers(daemon: Daemon) -> None:
    for _ in range(4):
        daemon.send("this is shit")
    daemon.wait_for_log("decision", count=4)
    text = daemon.metrics()
    assert 'school_milter_messages_total{action="reject"} 4.0' in text
    assert 'school_milter_findings_total{category="profanity",detector="obscene_language"} 4.0' in text
    assert "school_milter_scan_seconds_count 4.0" in text
    assert 'school_milter_dependency_up{dependency="rules"} 1.0' in text


def test_reload_bad_rules_keeps_running_then_good_rules_apply(daemon: Daemon, rules_copy: Path) -> None:
    policy = rules_copy / "policy.yaml"
    good = policy.read_text()
    policy.write_text(good + "\nbroken: [\n")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for_log("rules reload failed; keeping the rules in force", count=2)
    assert daemon.send("this is shit")[0] == "y", "old rules still refuse obscene mail"
    assert 'school_milter_dependency_up{dependency="rules"} 0.0' in daemon.metrics()
    # A good change: shouting from staff is now refused instead of tagged.
    policy.write_text(
        good.replace("    action: tag\n    subject_prefix:", "    action: reject\n    subject_prefix:")
    )
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for_log("rules reloaded", count=2)
    assert daemon.send("fine", subject="WHO TOOK THE SCIENCE PROJECTOR AGAIN")[0] == "y"
    # The change of rules is in the audit log once (not once per worker); the failed reload is not.
    store = Store(f"sqlite:///{daemon.log_path.parent}/q.db")
    changes = store.audit_entries(action="rules_change")
    store.close()
    assert len(changes) == 1 and changes[0].target == str(rules_copy)


def test_sigterm_stops_cleanly(daemon: Daemon) -> None:
    assert daemon.stop() == 0
    assert any(e["message"] == "stopping: finishing messages in flight" for e in daemon.log_lines())


def test_refuses_to_start_on_broken_rules(rules_copy: Path, tmp_path: Path) -> None:
    (rules_copy / "directory.csv").write_text("address,role\nx@y.example,janitor\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "milter",
            "--rules",
            str(rules_copy),
            "serve",
            "--milter",
            "inet:127.0.0.1:0",
            "--metrics",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2
    assert "directory.csv:2" in result.stderr and "janitor" in result.stderr


def test_bad_config_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "gw.toml"
    config.write_text('[gateway]\nworkers = "many"\n')
    result = subprocess.run(
        [sys.executable, "-m", "milter", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2 and str(config) in result.stderr and "workers" in result.stderr
