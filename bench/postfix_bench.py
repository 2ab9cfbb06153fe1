"""Postfix benchmark: school mail per second through a real Postfix, without and with the gateway as milter.

One run measures two halves on loopback, each with a fresh private Postfix (see
tests/postfix_harness.py) that relays everything to Postfix's own `smtp-sink`:

  1. no milter: smtp-source -> Postfix -> smtp-sink
  2. the gateway as milter: the same, with `python -m milter --rules rules serve
     --milter inet:127.0.0.1:PORT` started by this script and wired in through
     smtpd_milters (milter_default_action = tempfail, as in deploy/postfix)

Each half sends the same realistic 22 KB message (an HTML newsletter from a member of
staff with a PDF attachment) `--count` times over `--sessions` parallel SMTP sessions,
and takes the wall time from the first connection until the sink has counted every
message (smtp-sink -c). It prints both throughputs and their ratio; the target is a
ratio of at least 0.5. When the daemon does not exist yet, the second half says so and
the first is still measured.

With each throughput it prints the CPU time each part used per message (read from
/proc: Postfix's master and every process under it, smtp-source, smtp-sink, the gateway
and its workers, the private clamd). On a machine where all of them share few cores the
ratio follows from these figures, so they say where the time goes.

    .venv/bin/python bench/postfix_bench.py [--count 2000] [--sessions 8] [--message FILE]
        [--milter-socket inet|unix] [--gateway-arg=--workers=2] [--split-cores]

--split-cores answers another question: what the gateway costs Postfix when each has a
core of its own. Postfix, smtp-source and smtp-sink run on CPU 0 in both halves, the
gateway and clamd on CPU 1; the default leaves every process on every core, as on a
small server where they all share.

Needs root, Postfix (apt-get install postfix: smtp-source and smtp-sink come with it)
and free loopback ports; it stops everything it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scanner_rules import rules_with_private_clamd  # noqa: E402
from school_words import WORDS  # noqa: E402

from tests.postfix_harness import (  # noqa: E402
    LOOPBACK,
    MilterSettings,
    PostfixInstance,
    free_port,
    postfix_available,
    wait_for_port,
)

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
SENDER = "j.hughes@redborne.example"
RECIPIENT = "parents.year9@example.org"
TARGET_RATIO = 0.5


def school_message(size: int = 22_000, seed: int = 9) -> bytes:
    """A realistic staff newsletter of about `size` bytes: text and HTML parts and a small PDF."""
    rng = random.Random(seed)
    text_paragraphs: list[str] = []
    html_paragraphs: list[str] = []
    pdf = b"%PDF-1.4\n" + bytes(rng.randrange(256) for _ in range(2500)) + b"\n%%EOF\n"
    # text + HTML (about 1.6x the text) + base64 PDF (4/3) + headers ~ size
    budget = (size - len(pdf) * 4 // 3 - 2200) / 2.6
    while sum(map(len, text_paragraphs)) < budget:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30))).capitalize() + "."
        text_paragraphs.append(sentence)
        html_paragraphs.append(
            f'<p style="font-family:Arial;color:#333">{sentence} '
            f'<a href="https://www.redborne.example/news/{len(html_paragraphs)}">Read more</a></p>'
        )
    msg = EmailMessage()
    msg["From"] = "Mr J Hughes <j.hughes@redborne.example>"
    msg["To"] = "Year 9 parents <parents.year9@example.org>"
    msg["Subject"] = "Year 9 newsletter: museum trip, sports day and parents' evening"
    msg["Date"] = formatdate(0)
    msg["Message-ID"] = make_msgid(domain="redborne.example")
    msg.set_content("Dear parents,\n\n" + "\n\n".join(text_paragraphs) + "\n\nMr Hughes\nHead of Year 9\n")
    msg.add_alternative(
        "<html><body><h1>Year 9 newsletter</h1>" + "\n".join(html_paragraphs) + "</body></html>",
        subtype="html",
    )
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="museum-trip-consent.pdf")
    return msg.as_bytes()


@dataclass(frozen=True)
class Result:
    label: str
    count: int
    seconds: float  # first connection until the sink has every message
    injection_seconds: float  # until smtp-source had every message accepted by Postfix
    cpu: dict[str, float]  # CPU seconds during the run, by part (Postfix, smtp-source, ...)
    machine_busy: float  # share of the machine's CPU time that was busy (anyone's), 0-1

    @property
    def rate(self) -> float:
        return self.count / self.seconds


class SmtpSinkProcess:
    """Postfix's smtp-sink on loopback, counting messages (-c) into a file we read back."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.output = workdir / "smtp-sink.out"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.output.open("wb") as out:
            # -u is required as root; postfix is an unprivileged user that exists here.
            self.process = subprocess.Popen(
                [SMTP_SINK, "-u", "postfix", "-c", f"{LOOPBACK}:{self.port}", "256"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(LOOPBACK, self.port, timeout=10)

    def received(self) -> int:
        """Messages received so far: the last `mesg=N` of smtp-sink's running counter."""
        counts = re.findall(rb"mesg=(\d+)", self.output.read_bytes()[-200:])
        return int(counts[-1]) if counts else 0

    def stop(self) -> None:
        if self.process is not None:
            _terminate(self.process)
            self.process = None


class GatewayDaemon:
    """The gateway's milter daemon, started as `python -m milter ... serve --milter inet:...`."""

    def __init__(
        self, workdir: Path, rules: Path, socket_name: str, extra_args: list[str] | None = None
    ) -> None:
        self.socket_name = socket_name
        self.command = [
            sys.executable,
            "-m",
            "milter",
            "--rules",
            str(rules),
            "serve",
            "--milter",
            socket_name,
            # No metrics listener: its fixed port would clash with a gateway already
            # running on this machine (the local stack). --gateway-arg can turn it on.
            "--metrics=",
            # Its own quarantine store, never the repository's var/.
            f"--database=sqlite:///{workdir}/quarantine.db",
            *(extra_args or []),
        ]
        self.log = workdir / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def missing_reason() -> str | None:
        """Why the daemon cannot be started, or None when `serve` exists."""
        probe = subprocess.run(
            [sys.executable, "-m", "milter", "serve", "--help"],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode == 0:
            return None
        last = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"`python -m milter serve` is not available yet ({last[0]})"

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.process.returncode}:\n{self.tail()}")
            try:
                _wait_for_socket(self.socket_name, timeout=0.5)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway is not listening after 30 s:\n{self.tail()}") from None
                continue
            kind, _, path = self.socket_name.partition(":")
            if kind == "unix":
                # The daemon makes its socket 0660 in its own group (root here); Postfix's
                # smtpd and cleanup run as postfix, as deploy/README.md's group set-up allows.
                # (No postfix group: no Postfix to connect either, as for milter_bench.py.)
                with contextlib.suppress(KeyError):
                    os.chown(path, -1, grp.getgrnam("postfix").gr_gid)
            return

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])

    def stop(self) -> None:
        if self.process is not None:
            _terminate(self.process)
            self.process = None


_TICK = os.sysconf("SC_CLK_TCK")


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of the process and of the children it has reaped)."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        # ppid, then utime stime cutime cstime (fields 4 and 14-17 of proc(5)).
        table[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / _TICK)
    return table


def machine_cpu() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / _TICK, idle / _TICK


def tree_cpu(roots: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each named group of process trees. A process that ended
    counts through its parent's reaped-children time, so Postfix's short-lived smtpd and
    cleanup processes are included as long as their master is alive."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    totals: dict[str, float] = {}
    for name, pids in roots.items():
        todo, total = [p for p in pids if p in table], 0.0
        while todo:
            pid = todo.pop()
            total += table[pid][1]
            todo.extend(children.get(pid, ()))
        totals[name] = total
    return totals


def pin_trees(pids: list[int], cpus: set[int]) -> None:
    """Every thread of these processes and of all their descendants onto `cpus`.

    A process is moved before its children are listed, so a child forked meanwhile
    inherits the new affinity; threads started later inherit it from their creator.
    """
    todo = list(pids)
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):  # gone meanwhile
            for task in os.scandir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpus)
            todo.extend(child for child, (parent, _) in _process_table().items() if parent == pid)


def _wait_for_socket(name: str, timeout: float) -> None:
    """Until the milter socket (inet:HOST:PORT or unix:/path) accepts a connection."""
    kind, _, where = name.partition(":")
    if kind == "inet":
        host, _, port = where.rpartition(":")
        wait_for_port(host, int(port), timeout=timeout)
        return
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(where)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing listens on {name}") from None
        time.sleep(0.05)


def _env() -> dict[str, str]:
    # The repository's package, whether or not it is installed in this interpreter.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s: only the process this script started."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure(
    label: str,
    workdir: Path,
    message: Path,
    count: int,
    sessions: int,
    milter: str | None,
    extra_main_cf: dict[str, str] | None = None,
    gateway: dict[str, list[int]] | None = None,
) -> Result:
    """Send `count` copies through a fresh Postfix; the time until the sink has them all."""
    workdir.mkdir(parents=True, exist_ok=True)
    sink = SmtpSinkProcess(workdir)
    sink.start()
    try:
        with PostfixInstance(
            workdir / "postfix",
            next_hop=(LOOPBACK, sink.port),
            milter=milter,
            milter_settings=MilterSettings(),
            extra_main_cf=extra_main_cf,
        ) as postfix:
            command = [
                SMTP_SOURCE,
                "-4",
                "-s",
                str(sessions),
                "-m",
                str(count),
                "-f",
                SENDER,
                "-t",
                RECIPIENT,
                "-F",
                str(message),
                f"{LOOPBACK}:{postfix.smtpd_port}",
            ]
            assert sink.process is not None
            roots = {
                "Postfix": [postfix.master_pid() or -1],
                "smtp-sink": [sink.process.pid],
                **(gateway or {}),
            }
            cpu_before = tree_cpu(roots)
            machine_before = machine_cpu()
            source_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            source = subprocess.run(command, capture_output=True, text=True, timeout=3600)
            injected = time.perf_counter() - start
            source_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if source.returncode != 0:
                raise RuntimeError(
                    f"smtp-source failed (exit {source.returncode}): {source.stderr.strip()}\n"
                    f"-- Postfix log --\n{postfix.log()[-2000:]}"
                )
            deadline = time.monotonic() + max(60.0, count / 10)
            while sink.received() < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the sink has {sink.received()} of {count} messages; queue: {len(postfix.queue())}"
                    )
                time.sleep(0.01)
            elapsed = time.perf_counter() - start
            cpu_after = tree_cpu(roots)
            machine_after = machine_cpu()
    finally:
        sink.stop()
    cpu = {name: cpu_after[name] - cpu_before[name] for name in roots}
    cpu["smtp-source"] = (source_after.ru_utime + source_after.ru_stime) - (
        source_before.ru_utime + source_before.ru_stime
    )
    busy, idle = (after - before for after, before in zip(machine_after, machine_before, strict=True))
    return Result(label, count, elapsed, injected, cpu, busy / (busy + idle) if busy + idle else 0.0)


def report(result: Result) -> str:
    parts = ", ".join(f"{name} {1000 * seconds / result.count:.2f}" for name, seconds in result.cpu.items())
    total = 1000 * sum(result.cpu.values()) / result.count
    cores = os.cpu_count() or 1
    ours = sum(result.cpu.values()) / (result.seconds * cores)
    return (
        f"  {result.label:<16} {result.count} messages in {result.seconds:6.2f} s: "
        f"{result.rate:7.1f} messages/s  (Postfix accepted them all after {result.injection_seconds:.2f} s)\n"
        f"  {'':<16} CPU ms per message: {parts}; total {total:.2f}\n"
        # When other work shares the machine the throughputs are not comparable: say so.
        f"  {'':<16} machine ({cores} cores) busy {result.machine_busy:.0%}: this benchmark {ours:.0%}, "
        f"other processes {max(result.machine_busy - ours, 0):.0%}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=2000, help="messages per half (default 2000)")
    parser.add_argument("--sessions", type=int, default=8, help="parallel SMTP sessions (default 8)")
    parser.add_argument("--message", type=Path, help="send this file instead of the generated 22 KB mail")
    parser.add_argument("--rules", type=Path, default=ROOT / "rules", help="the gateway's rules directory")
    parser.add_argument(
        "--postfix",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="an extra main.cf parameter for both halves (repeat it), e.g. milter_data_macros=",
    )
    parser.add_argument(
        "--gateway-arg",
        metavar="ARG",
        action="append",
        default=[],
        help="an extra argument for `serve` (repeat it), e.g. --gateway-arg=--workers=2",
    )
    parser.add_argument(
        "--milter-socket",
        choices=("inet", "unix"),
        default="inet",
        help="how Postfix reaches the gateway: a loopback TCP port or a UNIX socket (default inet)",
    )
    parser.add_argument(
        "--split-cores",
        action="store_true",
        help="Postfix, smtp-source and smtp-sink on CPU 0 in both halves, the gateway and clamd on CPU 1",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    args = parser.parse_args(argv)
    extra_main_cf = dict(item.partition("=")[::2] for item in args.postfix)

    problems = [tool for tool in (SMTP_SOURCE, SMTP_SINK) if not Path(tool).exists()]
    if not postfix_available() or problems:
        print("postfix_bench: Postfix is not installed (apt-get install postfix)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("postfix_bench: must run as root (it starts private Postfix instances)", file=sys.stderr)
        return 2

    if args.split_cores:
        if not {0, 1} <= os.sched_getaffinity(0):
            print("postfix_bench: --split-cores needs CPUs 0 and 1", file=sys.stderr)
            return 2
        # Inherited by everything this script starts; the gateway and clamd move to CPU 1 later.
        os.sched_setaffinity(0, {0})

    workdir = Path(tempfile.mkdtemp(prefix="postfix-bench-"))
    stack = contextlib.ExitStack()
    try:
        message = workdir / "school-mail.eml"
        if args.message:
            shutil.copyfile(args.message, message)
        else:
            message.write_bytes(school_message())
        size_kb = message.stat().st_size / 1000
        print(
            f"Postfix benchmark: {args.count} messages of {size_kb:.1f} KB, smtp-source -s {args.sessions} "
            f"-> private Postfix -> smtp-sink, all on {LOOPBACK}"
        )
        if args.split_cores:
            print(
                "  cores: Postfix, smtp-source, smtp-sink on CPU 0 in both halves; gateway and clamd on CPU 1"
            )

        plain = measure(
            "without milter", workdir / "plain", message, args.count, args.sessions, None, extra_main_cf
        )
        print(report(plain), flush=True)

        missing = GatewayDaemon.missing_reason()
        if missing:
            print(f"  with the gateway: not measured: {missing}. Run this script again once it exists.")
            return 0
        (workdir / "milter").mkdir(parents=True, exist_ok=True)
        if args.milter_socket == "unix":
            # Postfix (user postfix) must reach the socket through the private work directory.
            for directory in (workdir, workdir / "milter"):
                directory.chmod(0o711)
            socket_name = f"unix:{workdir / 'milter' / 'school-milter.sock'}"
        else:
            socket_name = f"inet:{LOOPBACK}:{free_port()}"
        rules, scanner = rules_with_private_clamd(stack, workdir / "milter", args.rules)
        print(f"  virus scanning: {scanner}")
        print(f"  milter socket: {args.milter_socket}")
        daemon = GatewayDaemon(workdir / "milter", rules, socket_name, args.gateway_arg)
        try:
            daemon.start()
            assert daemon.process is not None
            clamd_pid = [int(path.read_text().strip()) for path in (workdir / "milter").glob("**/clamd.pid")]
            if args.split_cores:
                pin_trees([daemon.process.pid, *clamd_pid], {1})
            gated = measure(
                "with the gateway",
                workdir / "milter",
                message,
                args.count,
                args.sessions,
                socket_name,
                extra_main_cf,
                gateway={"gateway": [daemon.process.pid], "clamd": clamd_pid},
            )
        except RuntimeError as exc:
            print(f"  with the gateway: failed: {exc}", file=sys.stderr)
            if daemon.log.exists():
                print(f"-- gateway log --\n{daemon.tail()}", file=sys.stderr)
            return 1
        finally:
            daemon.stop()
        print(report(gated))
        ratio = gated.rate / plain.rate
        verdict = "meets" if ratio >= TARGET_RATIO else "below"
        print(f"  ratio with/without: {ratio:.2f} ({verdict} the target of {TARGET_RATIO})")
        return 0
    finally:
        stack.close()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
