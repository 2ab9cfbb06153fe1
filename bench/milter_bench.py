"""Milter benchmark: the gateway's CPU time per message on the milter path, without Postfix.

Client processes speak the milter protocol to `python -m milter serve` the way Postfix
does: a connection per message, option negotiation offering every "no reply" step and
the macro list, then the macros with MAIL FROM, RCPT, every header, end of headers, the
body in chunks of at most 64 KiB and end of message, each packet its own write, and
QUIT after the verdict. The figure is the daemon's CPU time (its workers' included, read
from /proc) divided by the messages it answered: unlike throughput on a shared machine
it hardly moves from run to run, so it shows what a change to the daemon costs or saves.

    .venv/bin/python bench/milter_bench.py [--count 3000] [--clients 4] [--workers 1]
        [--rules DIR | --no-detectors] [--milter-socket unix|inet] [--message FILE]

The message is postfix_bench.py's 22 KB staff newsletter with a PDF; virus scanning
goes to a private clamd with the test signature database (scanner_rules.py).
--no-detectors turns every detector off, leaving the protocol, the decision, the
header changes (which parse the message's headers), the log line and the metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from postfix_bench import GatewayDaemon, school_message, tree_cpu  # noqa: E402
from scanner_rules import rules_with_private_clamd  # noqa: E402

from milter import protocol as p  # noqa: E402

SENDER = "j.hughes@redborne.example"
RECIPIENT = "parents.year9@example.org"
# Postfix offers every action and step; the gateway picks what it wants.
OFFERED_ACTIONS = 0x1FF
OFFERED_PROTOCOL = 0x1FFFFF
FINAL_REPLIES = {b"a", b"c", b"d", b"r", b"t", b"y"}


def _packet(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + code + data


def conversation(raw: bytes) -> list[bytes]:
    """The packets Postfix sends for one message after negotiation, each written alone."""
    head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    headers: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + b"\n" + line)
        else:
            name, _, value = line.partition(b":")
            headers.append((name, value.lstrip()))
    body = body.replace(b"\n", b"\r\n")
    macros = b"M{client_addr}\0" + b"127.0.0.1\0{client_name}\0localhost\0{auth_authen}\0\0i\0" + b"4Bench1\0"
    packets = [
        _packet(b"D", macros),
        _packet(b"M", f"<{SENDER}>".encode() + b"\0"),
        _packet(b"R", f"<{RECIPIENT}>".encode() + b"\0"),
    ]
    packets += [_packet(b"L", name + b"\0" + value + b"\0") for name, value in headers]
    packets.append(_packet(b"N"))
    packets += [_packet(b"B", body[i : i + 65535]) for i in range(0, len(body), 65535)]
    packets += [_packet(b"D", b"Ei\0" + b"4Bench1\0"), _packet(b"E")]
    return packets


def _read_packet(sock: socket.socket) -> tuple[bytes, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the gateway closed the connection")
            data += chunk
        return data

    (length,) = struct.unpack("!I", exactly(4))
    data = exactly(length)
    return data[:1], data[1:]


def client(address: str | tuple[str, int], count: int, packets: list[bytes]) -> None:
    """`count` messages, one connection each, as Postfix's smtpd sends them."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    negotiation = _packet(b"O", struct.pack("!III", p.VERSION, OFFERED_ACTIONS, OFFERED_PROTOCOL))
    for _ in range(count):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.connect(address)
            sock.sendall(negotiation)
            _read_packet(sock)
            for packet in packets:
                sock.sendall(packet)
            while _read_packet(sock)[0] not in FINAL_REPLIES:
                pass
            sock.sendall(_packet(b"Q"))


def _no_detectors(rules: Path) -> None:
    """Every detector of the copy's policy.yaml off, the ones it does not list too."""
    from milter.detectors.registry import DETECTORS

    names = {module.NAME for module in DETECTORS}
    policy = rules / "policy.yaml"
    lines, seen, in_detectors = [], set(), False
    for line in policy.read_text().split("\n"):
        lines.append(line)
        if line.startswith("detectors:"):
            in_detectors = True
        elif line[:1].isalpha():
            in_detectors = False
        elif in_detectors and (found := re.fullmatch(r"  (\w+):", line)) and found[1] in names:
            lines.append("    enabled: false")
            seen.add(found[1])
    text = "\n".join(lines)
    unlisted = "".join(f"  {name}:\n    enabled: false\n" for name in sorted(names - seen))
    policy.write_text(text.replace("\ndetectors:\n", "\ndetectors:\n" + unlisted, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=3000, help="messages (default 3000)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--workers", type=int, default=1, help="the daemon's --workers (default 1)")
    parser.add_argument("--rules", type=Path, default=ROOT / "rules", help="the rules directory")
    parser.add_argument("--no-detectors", action="store_true", help="turn every detector off")
    parser.add_argument("--milter-socket", choices=("unix", "inet"), default="unix")
    parser.add_argument("--message", type=Path, help="send this file instead of the newsletter")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="milter-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            rules, scanner = rules_with_private_clamd(stack, work, args.rules)
            if args.no_detectors:
                _no_detectors(rules)
                scanner = "off (no detectors)"
            address: str | tuple[str, int]
            if args.milter_socket == "unix":
                address = str(work / "milter.sock")
                name = f"unix:{address}"
            else:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    address = ("127.0.0.1", probe.getsockname()[1])
                name = f"inet:127.0.0.1:{address[1]}"
            # The benchmark's own store and no metrics listener, as in postfix_bench.py.
            daemon = GatewayDaemon(work, rules, name, [f"--workers={args.workers}"])
            try:
                daemon.start()
            except RuntimeError as exc:
                raise SystemExit(f"milter_bench: {exc}") from None
            stack.callback(daemon.stop)
            assert daemon.process is not None
            pid = daemon.process.pid
            raw = args.message.read_bytes() if args.message else school_message()
            packets = conversation(raw)
            client(address, 50, packets)  # warm-up: imports, first allocations
            per_client = max(1, args.count // args.clients)
            before = tree_cpu({"gateway": [pid]})["gateway"]
            started = time.perf_counter()
            clients = [
                multiprocessing.Process(target=client, args=(address, per_client, packets))
                for _ in range(args.clients)
            ]
            for process in clients:
                process.start()
            for process in clients:
                process.join()
            elapsed = time.perf_counter() - started
            used = tree_cpu({"gateway": [pid]})["gateway"] - before
            if any(process.exitcode for process in clients):
                print("milter_bench: a client failed; see the gateway log", file=sys.stderr)
                print(daemon.tail(), file=sys.stderr)
                return 1
            total = per_client * args.clients
            print(
                f"Milter benchmark: {total} messages of {len(raw) / 1000:.1f} KB over {args.clients} "
                f"clients, {args.milter_socket} socket, {args.workers} worker(s), virus scanning: {scanner}"
            )
            print(
                f"  gateway CPU {1000 * used / total:.3f} ms per message; "
                f"{total / elapsed:.0f} messages/s wall-clock (clients on the same machine)"
            )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
