"""The benchmarks still run: a short smoke run of bench/milter_bench.py (the others need
Postfix and minutes; they are run by hand, see README "Speed")."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_milter_bench_reports_the_gateways_cpu_per_message() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "milter_bench.py"),
            "--count",
            "200",
            "--clients",
            "2",
            "--no-detectors",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"gateway CPU (\d+\.\d+) ms per message", done.stdout)
    assert found, done.stdout
    assert 0 < float(found[1]) < 100
    assert "200 messages" in done.stdout
