"""Virus scanning through a real, private clamd over its UNIX and TCP sockets (tests/clamd_harness.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter.clamd import (
    CLAMD_LIMIT_DEFAULTS,
    SIZE_LIMIT_REPLY,
    ClamdClient,
    ClamdConfigError,
    ClamdResult,
    ClamdUnavailable,
    limit_warnings,
    parse_address,
    parse_scan_reply,
    read_clamd_limits,
)
from tests.clamd_harness import (
    SKIP_REASON,
    ClamdInstance,
    clamd,  # noqa: F401  (pytest fixture)
    clamd_available,
    clamd_small_limit,  # noqa: F401  (pytest fixture)
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY_CONF = REPO / "deploy" / "clamd" / "clamd.conf"
SIGNATURE = "School.Test.EICAR.UNOFFICIAL"  # tests/data/clamav/test-signatures.ndb, as clamd names it
MiB = 1024 * 1024

# The EICAR anti-virus test string, put together here so that no file in the repository
# contains it (a developer's virus scanner would flag the file): the second half is
# stored reversed.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"*H+H$!ELIF-TSET-SURIVITNA-DRADNATS-RACIE"[::-1]

needs_clamd = pytest.mark.skipif(not clamd_available(), reason=SKIP_REASON)


def filler(size: int) -> bytes:
    """Harmless mail-like text of `size` bytes."""
    line = b"Dear parents, the Year 9 trip to the Science Museum leaves at 8.15 on Friday.\r\n"
    return (line * (size // len(line) + 1))[:size]


@pytest.fixture(params=["unix", "tcp"])
def address(request: pytest.FixtureRequest, clamd: ClamdInstance) -> str:  # noqa: F811
    """The session clamd's address, once over each socket."""
    return clamd.unix_address if request.param == "unix" else clamd.tcp_address


@pytest.fixture(params=["unix", "tcp"])
def small_limit_address(request: pytest.FixtureRequest, clamd_small_limit: ClamdInstance) -> str:  # noqa: F811
    """The small-limit clamd (StreamMaxLength 1M, MaxFileSize 512K) over each socket."""
    return clamd_small_limit.unix_address if request.param == "unix" else clamd_small_limit.tcp_address


# -- against the real clamd --------------------------------------------------------------


def test_the_test_string_is_eicar() -> None:
    assert len(EICAR) == 68 and EICAR.startswith(b"X5O!") and EICAR.endswith(b"$H+H*")


@needs_clamd
def test_ping_and_version(address: str) -> None:
    client = ClamdClient(address)
    assert client.ping() is True
    assert client.version().startswith("ClamAV ")


@needs_clamd
def test_clean_data_is_clean(address: str) -> None:
    assert ClamdClient(address).scan_bytes(filler(10_000)) == ClamdResult("clean")


@needs_clamd
def test_empty_data_is_clean(address: str) -> None:
    assert ClamdClient(address).scan_bytes(b"").status == "clean"


@needs_clamd
def test_eicar_is_infected_with_our_signature(address: str) -> None:
    result = ClamdClient(address).scan_bytes(EICAR)
    assert result.status == "infected" and result.infected
    assert result.signature == SIGNATURE
    assert result.signature.endswith(".UNOFFICIAL")


@needs_clamd
def test_eicar_in_the_middle_of_a_megabyte_across_chunks(address: str) -> None:
    # 16 KiB chunks and an odd offset: the string straddles a chunk boundary.
    data = filler(MiB // 2 - 30) + EICAR + filler(MiB // 2)
    result = ClamdClient(address, chunk_size=16 * 1024).scan_bytes(data)
    assert (result.status, result.signature) == ("infected", SIGNATURE)


@needs_clamd
def test_eicar_in_a_spooled_file(address: str) -> None:
    with tempfile.TemporaryFile() as spool:
        spool.write(filler(300_000) + EICAR + filler(1000))
        spool.seek(0)
        result = ClamdClient(address).scan_file(spool)
    assert (result.status, result.signature) == ("infected", SIGNATURE)


@needs_clamd
def test_async_scan(address: str) -> None:
    client = ClamdClient(address)

    async def both() -> tuple[ClamdResult, ClamdResult]:
        return await client.ascan(filler(200_000)), await client.ascan(filler(200_000) + EICAR)

    clean, infected = asyncio.run(both())
    assert clean.status == "clean"
    assert (infected.status, infected.signature) == ("infected", SIGNATURE)


@needs_clamd
def test_concurrent_scans_from_a_thread_pool(address: str) -> None:
    # How the engine uses it: one client shared by worker threads.
    client = ClamdClient(address)
    payloads = [filler(100_000 + i) + (EICAR if i % 2 else b"") for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(client.scan_bytes, payloads))
    assert [r.status for r in results] == ["clean", "infected"] * 4


@needs_clamd
def test_five_megabytes_scan_quickly(address: str) -> None:
    started = time.monotonic()
    result = ClamdClient(address).scan_bytes(filler(5 * MiB))
    assert result.status == "clean"
    assert time.monotonic() - started < 10


# -- clamd's limits ------------------------------------------------------------------------


@needs_clamd
@pytest.mark.parametrize("chunk_size", [64 * 1024, 4 * MiB])
def test_data_over_stream_max_length_is_size_limit(small_limit_address: str, chunk_size: int) -> None:
    # clamd replies and closes while we are still sending; the reply must still be read.
    client = ClamdClient(small_limit_address, timeout=10, chunk_size=chunk_size)
    result = client.scan_bytes(filler(2 * MiB))
    assert result == ClamdResult("size_limit", detail=SIZE_LIMIT_REPLY)
    assert client.ping()  # clamd itself is fine afterwards


@needs_clamd
def test_data_over_stream_max_length_is_size_limit_async(small_limit_address: str) -> None:
    result = asyncio.run(ClamdClient(small_limit_address, timeout=10).ascan(filler(2 * MiB)))
    assert result == ClamdResult("size_limit", detail=SIZE_LIMIT_REPLY)


@needs_clamd
def test_data_over_max_file_size_is_size_limit_not_infected(small_limit_address: str) -> None:
    # Under StreamMaxLength, over MaxFileSize: clamd cannot scan it and, with
    # AlertExceedsMax, says so with a heuristic "signature"; that is not malware.
    result = ClamdClient(small_limit_address).scan_bytes(filler(800 * 1024))
    assert result.status == "size_limit"
    assert result.signature == "Heuristics.Limits.Exceeded.MaxFileSize"


@needs_clamd
def test_data_within_the_small_limits_is_still_scanned(small_limit_address: str) -> None:
    result = ClamdClient(small_limit_address).scan_bytes(filler(100_000) + EICAR)
    assert (result.status, result.signature) == ("infected", SIGNATURE)


def test_over_max_stream_is_not_sent() -> None:
    # Nothing listens at this address: a size_limit result proves nothing was sent.
    client = ClamdClient("unix:/nonexistent/clamd.ctl", max_stream=1000)
    result = client.scan_bytes(filler(1001))
    assert result.status == "size_limit" and "max_stream" in result.detail
    assert asyncio.run(client.ascan(filler(1001))).status == "size_limit"
    with tempfile.TemporaryFile() as spool:
        spool.write(filler(1001))
        spool.seek(0)
        assert client.scan_file(spool).status == "size_limit"


# -- clamd down or hung ----------------------------------------------------------------------


@needs_clamd
def test_stopped_clamd_is_unavailable_at_once(tmp_path: Path) -> None:
    with ClamdInstance(tmp_path / "clamd") as instance:
        addresses = [instance.unix_address, instance.tcp_address]
        assert all(ClamdClient(a).ping() for a in addresses)
    for address in addresses:
        client = ClamdClient(address, timeout=30)
        started = time.monotonic()
        with pytest.raises(ClamdUnavailable, match="cannot connect"):
            client.scan_bytes(EICAR)
        with pytest.raises(ClamdUnavailable, match="cannot connect"):
            asyncio.run(client.ascan(EICAR))
        assert client.ping() is False
        assert time.monotonic() - started < 1.0


class HungServer:
    """Accepts connections, reads nothing, answers nothing: a wedged clamd."""

    def __init__(self, family: socket.AddressFamily, workdir: Path) -> None:
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_UNIX:
            path = workdir / "hung.sock"
            self.listener.bind(str(path))
            self.address = f"unix:{path}"
        else:
            self.listener.bind(("127.0.0.1", 0))
            self.address = f"inet:127.0.0.1:{self.listener.getsockname()[1]}"
        self.listener.listen(16)
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.accepted.append(conn)

    def close(self) -> None:
        # shutdown, not just close: on Linux only shutdown wakes a thread blocked in accept().
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(timeout=2)
        for conn in self.accepted:
            conn.close()


@pytest.fixture(params=[socket.AF_UNIX, socket.AF_INET], ids=["unix", "tcp"])
def hung_server(request: pytest.FixtureRequest) -> Iterator[HungServer]:
    # Not tmp_path: its path can be too long for a UNIX socket.
    with tempfile.TemporaryDirectory(prefix="clamd-hung-") as workdir:
        server = HungServer(request.param, Path(workdir))
        yield server
        server.close()


@pytest.mark.parametrize("size", [100, 8 * MiB])  # a reply never comes; a big stream is never read
def test_hung_clamd_is_unavailable_after_the_timeout(hung_server: HungServer, size: int) -> None:
    client = ClamdClient(hung_server.address, timeout=0.3)
    for scan in (client.scan_bytes, lambda data: asyncio.run(client.ascan(data))):
        started = time.monotonic()
        with pytest.raises(ClamdUnavailable, match=r"0\.3 s"):
            scan(filler(size))
        assert 0.25 < time.monotonic() - started < 1.5
    assert client.ping() is False


def test_connection_closed_without_reply_is_unavailable() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def close_after_command() -> None:
            conn, _ = listener.accept()
            conn.recv(100)
            conn.close()

        thread = threading.Thread(target=close_after_command)
        thread.start()
        with pytest.raises(ClamdUnavailable, match="without a reply"):
            ClamdClient(f"inet:127.0.0.1:{port}", timeout=5).version()
        thread.join()


# -- replies and addresses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("stream: OK", ClamdResult("clean")),
        ("stream: Eicar-Test-Signature FOUND", ClamdResult("infected", "Eicar-Test-Signature")),
        (
            # ExtendedDetectionInfo adds the hash and size of what matched.
            "stream: Win.Trojan.Agent-1(44d88612fea8a8f36de82e1278abb02f:68) FOUND",
            ClamdResult("infected", "Win.Trojan.Agent-1"),
        ),
        (SIZE_LIMIT_REPLY, ClamdResult("size_limit", detail=SIZE_LIMIT_REPLY)),
        (
            "stream: Heuristics.Limits.Exceeded.MaxScanSize FOUND",
            ClamdResult(
                "size_limit",
                "Heuristics.Limits.Exceeded.MaxScanSize",
                "stream: Heuristics.Limits.Exceeded.MaxScanSize FOUND",
            ),
        ),
        (
            "stream: Can't allocate memory ERROR",
            ClamdResult("error", detail="stream: Can't allocate memory ERROR"),
        ),
    ],
)
def test_replies_are_parsed_exactly(reply: str, expected: ClamdResult) -> None:
    assert parse_scan_reply(reply) == expected


@pytest.mark.parametrize("reply", ["", "UNKNOWN COMMAND", "stream: FOUND", "PONG", "stream: OK maybe"])
def test_unknown_replies_are_unavailable_not_clean(reply: str) -> None:
    with pytest.raises(ClamdUnavailable, match="unexpected reply"):
        parse_scan_reply(reply)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("unix:/run/clamav/clamd.ctl", (socket.AF_UNIX, "/run/clamav/clamd.ctl")),
        ("local:/tmp/c.sock", (socket.AF_UNIX, "/tmp/c.sock")),
        ("inet:127.0.0.1:3310", (socket.AF_INET, ("127.0.0.1", 3310))),
        ("inet:3310@127.0.0.1", (socket.AF_INET, ("127.0.0.1", 3310))),
        ("inet6:[::1]:3310", (socket.AF_INET6, ("::1", 3310))),
    ],
)
def test_addresses_are_spelled_like_milter_sockets(address: str, expected: object) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    "address", ["/run/clamav/clamd.ctl", "unix:", "inet:127.0.0.1:clamd", "tcp:1.2.3.4:3310"]
)
def test_bad_addresses_fail_when_the_client_is_made(address: str) -> None:
    with pytest.raises(ValueError, match="clamd address"):
        ClamdClient(address)


# -- clamd.conf ------------------------------------------------------------------------------


def test_deploy_clamd_conf_limits_cover_the_gateways_largest_message() -> None:
    limits = read_clamd_limits(DEPLOY_CONF)
    assert limits == {
        "StreamMaxLength": 100 * MiB,
        "MaxFileSize": 100 * MiB,
        "MaxScanSize": 400 * MiB,
        "MaxRecursion": 17,
        "MaxFiles": 10000,
    }
    assert limit_warnings(limits, max_message_bytes=100_000_000) == []
    assert DEPLOY_CONF.read_text().count("\nLocalSocket /run/clamav/clamd.ctl\n") == 1
    assert "#TCPSocket 3310" in DEPLOY_CONF.read_text()


@needs_clamd
def test_clamd_accepts_the_deploy_conf_with_the_limits_we_read(tmp_path: Path) -> None:
    # Our own sockets and files, every other option from deploy/clamd/clamd.conf.
    with ClamdInstance(tmp_path / "clamd", stream_max_length=None, base_config=DEPLOY_CONF) as instance:
        assert ClamdClient(instance.unix_address).scan_bytes(EICAR).signature == SIGNATURE
        output = instance.output_tail(200)
    logged = {
        "MaxScanSize": r"Global size limit set to (\d+) bytes",
        "MaxFileSize": r"File size limit set to (\d+) bytes",
        "MaxRecursion": r"Recursion level limit set to (\d+)",
        "MaxFiles": r"Files limit set to (\d+)",
    }
    limits = read_clamd_limits(DEPLOY_CONF)
    for name, pattern in logged.items():
        match = re.search(pattern, output)
        assert match, f"clamd did not log its {name}:\n{output}"
        assert int(match[1]) == limits[name], name


def test_limits_units_and_clamds_reading_rules(tmp_path: Path) -> None:
    conf = tmp_path / "clamd.conf"
    conf.write_text(
        "# StreamMaxLength 1K  (a comment)\n"
        "StreamMaxLength 25M\n"
        "StreamMaxLength 1G\n"  # a repeat: clamd keeps the first
        "MaxFileSize\t512k\n"
        "MaxScanSize 1G\n"
        "maxfiles 5\n"  # not the option's spelling: clamd refuses it, and it is not MaxFiles
        "MaxRecursion 0\n"
    )
    assert read_clamd_limits(conf) == {
        "StreamMaxLength": 25 * MiB,
        "MaxFileSize": 512 * 1024,
        "MaxScanSize": 1024 * MiB,
        "MaxRecursion": 0,
        "MaxFiles": CLAMD_LIMIT_DEFAULTS["MaxFiles"],
    }


@pytest.mark.parametrize(
    "line", ["MaxFileSize 1.5M", "MaxFileSize 25MB", "MaxScanSize 100M # comment", "MaxFiles 10k"]
)
def test_limits_clamd_would_refuse_are_errors_with_file_and_line(tmp_path: Path, line: str) -> None:
    conf = tmp_path / "clamd.conf"
    conf.write_text(f"LocalSocket /run/clamav/clamd.ctl\n{line}\n")
    with pytest.raises(ClamdConfigError, match=rf"clamd\.conf:2: {line.split()[0]}: "):
        read_clamd_limits(conf)


def test_limits_smaller_than_the_gateways_are_warned_about(tmp_path: Path) -> None:
    conf = tmp_path / "clamd.conf"
    conf.write_text("StreamMaxLength 25M\nMaxFileSize 0\n")  # Debian's old default; 0 = no limit
    [warning] = limit_warnings(read_clamd_limits(conf), max_message_bytes=100_000_000)
    assert "StreamMaxLength is 26214400 bytes" in warning and "100000000" in warning
