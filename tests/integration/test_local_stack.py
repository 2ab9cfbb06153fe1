"""deploy/local-stack.sh as `make run` runs it: Postfix, sink, the stack's own clamd and the gateway.

The stack runs in a temporary LOCAL_STACK_DIR on free 127.0.0.1 ports, so it never meets
a `make run` stack (var/local-stack, ports 2525-2527, 8894, 9464) running beside it, and
with CLAMD_SIGNATURES=test, so the answer is the same with or without an official ClamAV
database on the machine. What a developer does after `make run`: mail with a harmless
attachment is delivered (clamd answered), mail carrying the EICAR test file is refused
with a 5xx naming the signature, and `stop` leaves no clamd behind.
"""

from __future__ import annotations

import base64
import os
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from milter.clamd import read_clamd_limits
from tests.clamd_harness import SKIP_REASON, clamd_available
from tests.mail import build
from tests.postfix_harness import LOOPBACK, free_port, port_open
from tests.test_clamd import EICAR, SIGNATURE

pytestmark = pytest.mark.postfix

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "local-stack.sh"
GATEWAY = REPO / ".venv" / "bin" / "school-milter"
STAFF = "j.hughes@redborne.example"
PARENT = "parent@example.org"


@dataclass
class Stack:
    """One local stack in its own directory; `run("status")` runs the script on it."""

    directory: Path
    env: dict[str, str]
    smtp_port: int
    daemon_command: str

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO,
        )

    def start(self) -> subprocess.CompletedProcess[str]:
        return self.run("start", "--with-daemon", self.daemon_command)

    def stop(self) -> subprocess.CompletedProcess[str]:
        return self.run("stop", timeout=120)

    def delivered(self) -> list[bytes]:
        return [path.read_bytes() for path in sorted((self.directory / "delivered").glob("*"))]


def new_stack(directory: Path) -> Stack:
    """The stack with five fresh free ports: SMTP, sink, re-injection, milter, metrics."""
    ports: set[int] = set()
    while len(ports) < 5:
        ports.add(free_port())
    smtp, sink, reinject, milter, metrics = sorted(ports)
    env = {
        **os.environ,
        "LOCAL_STACK_DIR": str(directory),
        "SMTP_PORT": str(smtp),
        "SINK_PORT": str(sink),
        "REINJECT_PORT": str(reinject),
        "MILTER": f"inet:{LOOPBACK}:{milter}",
        "CLAMD_SIGNATURES": "test",
    }
    # The Makefile's daemon command, on this stack's rules copy, ports and database.
    command = (
        f"{GATEWAY} --rules {directory}/rules serve --milter inet:{LOOPBACK}:{milter}"
        f" --metrics {LOOPBACK}:{metrics} --database sqlite:///{directory}/quarantine.db"
        f" --reinject {LOOPBACK}:{reinject}"
    )
    return Stack(directory, env, smtp, command)


@pytest.fixture
def stack() -> Iterator[Stack]:
    if os.geteuid() != 0:
        pytest.skip("deploy/local-stack.sh needs root (Postfix)")
    if not clamd_available():
        pytest.skip(SKIP_REASON)
    if not GATEWAY.exists():
        pytest.skip(f"{GATEWAY} is missing: make run creates .venv")
    # Under /tmp and searchable by all, like a checkout: Postfix keeps its data directory
    # inside the stack directory, and Debian's AppArmor profile for clamd allows /tmp.
    directory = Path(tempfile.mkdtemp(prefix="local-stack-", dir="/tmp"))
    directory.chmod(0o755)
    instance = new_stack(directory)
    try:
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(directory, ignore_errors=True)


def start(stack: Stack) -> tuple[Stack, str]:
    """Start it; a port a kernel-picked free port lost to another program gets new ports."""
    for _attempt in range(3):
        result = stack.start()
        if result.returncode == 0 or "is taken by another program" not in result.stderr:
            break
        stack.stop()
        stack = new_stack(stack.directory)
    assert result.returncode == 0, f"start failed:\n{result.stdout}\n{result.stderr}"
    return stack, result.stdout


def send(stack: Stack, raw: bytes) -> None:
    with smtplib.SMTP(LOOPBACK, stack.smtp_port, timeout=60) as smtp:
        smtp.sendmail(STAFF, [PARENT], raw)


def wait_for_delivery(stack: Stack, marker: bytes, timeout: float = 30) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for data in stack.delivered():
            if marker in data:
                return data
        time.sleep(0.2)
    raise AssertionError(f"no message with {marker!r} in {stack.directory / 'delivered'} after {timeout} s")


def alive(pid: int) -> bool:
    """True for a running process; gone or a zombie (exited, not yet reaped) is False."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_make_run_stack_scans_attachments_with_its_own_clamd(stack: Stack) -> None:
    stack, output = start(stack)
    clamd_dir = stack.directory / "clamd"
    assert "test signatures only" in output and "answers PING" in output, output

    # Its clamd: deploy/clamd/clamd.conf with private sockets and files, same limits.
    conf = clamd_dir / "clamd.conf"
    assert read_clamd_limits(conf) == read_clamd_limits(REPO / "deploy" / "clamd" / "clamd.conf")
    assert "/run/clamav" not in conf.read_text() and "\nUser " not in conf.read_text()
    # The gateway's rules: rules/ with only virus_scan's clamd and clamd_conf changed.
    original = (REPO / "rules" / "policy.yaml").read_text().splitlines()
    copy = (stack.directory / "rules" / "policy.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(original, copy, strict=True) if a != b]
    assert changed == [
        ("    clamd: unix:/run/clamav/clamd.ctl", f"    clamd: unix:{clamd_dir / 'clamd.ctl'}"),
        ("    clamd_conf: /etc/clamav/clamd.conf", f"    clamd_conf: {conf}"),
    ]
    status = stack.run("status").stdout
    assert f"clamd: running on unix:{clamd_dir / 'clamd.ctl'}" in status, status

    # A harmless attachment: scanned (clamd answers, so no 451) and delivered.
    letter = build(
        STAFF,
        PARENT,
        "Trip letter",
        "The letter is attached.",
        attachments=[("trip-letter.txt", b"Please sign and return by Friday.\n", "text/plain")],
    )
    send(stack, letter)
    delivered = wait_for_delivery(stack, b"Subject: Trip letter")
    assert b'filename="trip-letter.txt"' in delivered
    assert b"X-School-Policy: accept" in delivered

    # The EICAR test file: refused at SMTP time, the signature named, nothing delivered.
    worksheet = build(
        STAFF,
        PARENT,
        "Worksheet",
        "The worksheet is attached.",
        attachments=[("worksheet.com", EICAR, "application/octet-stream")],
    )
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(stack, worksheet)
    assert refused.value.smtp_code == 550, refused.value
    assert SIGNATURE.encode() in refused.value.smtp_error, refused.value.smtp_error
    time.sleep(2)  # time enough for a wrongly accepted message to reach the sink
    assert not [data for data in stack.delivered() if base64.b64encode(EICAR)[:40] in data]

    # stop: clamd goes with the rest.
    clamd_pid = int((stack.directory / "clamd.pid").read_text().split()[0])
    stopped = stack.stop()
    assert stopped.returncode == 0, stopped.stderr
    assert "clamd stopped" in stopped.stdout, stopped.stdout
    assert not alive(clamd_pid)
    assert not (clamd_dir / "clamd.ctl").exists()
    assert not port_open(LOOPBACK, stack.smtp_port)
    assert "clamd: stopped" in stack.run("status").stdout
