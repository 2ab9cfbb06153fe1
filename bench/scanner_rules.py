"""A copy of rules/ whose virus scanning goes to a private clamd (the test signature database),
so the benchmarks measure the whole scan without the system's clamd, or with it off when
clamd is not installed. Shared by engine_bench.py and postfix_bench.py."""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.clamd_harness import ClamdInstance, clamd_available  # noqa: E402


def rules_with_private_clamd(stack: contextlib.ExitStack, work: Path, source: Path) -> tuple[Path, str]:
    """(rules directory, what scans viruses); the clamd stops when `stack` closes."""
    rules_dir = work / "rules"
    shutil.copytree(source, rules_dir)
    policy = rules_dir / "policy.yaml"
    if clamd_available():
        clamd = stack.enter_context(ClamdInstance(work / "clamd"))
        text = policy.read_text().replace("clamd: unix:/run/clamav/clamd.ctl", f"clamd: {clamd.unix_address}")
        scanner = "a private clamd with the test signature database"
    else:
        text = policy.read_text().replace("\n  virus_scan:\n", "\n  virus_scan:\n    enabled: false\n", 1)
        scanner = "OFF (clamd is not installed)"
    policy.write_text(text)
    return rules_dir, scanner
