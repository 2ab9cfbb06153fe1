from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from milter.policy.loader import Rules, load_rules

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def rules_without_virus_scan(root: Path) -> Path:
    """Turn virus scanning off in a copy of rules/ on disk.

    Tests about other checks must not depend on a clamd; virus scanning has its own
    tests against a real clamd (tests/test_virus_scan.py and the Postfix tests).
    """
    policy = root / "policy.yaml"
    text = policy.read_text()
    assert "\n  virus_scan:\n" in text
    policy.write_text(text.replace("\n  virus_scan:\n", "\n  virus_scan:\n    enabled: false\n", 1))
    return root


def copy_rules(target: Path, virus_scan: bool = False) -> Path:
    shutil.copytree(REPO / "rules", target)
    return target if virus_scan else rules_without_virus_scan(target)


@pytest.fixture(scope="session")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_rules(tmp_path_factory.mktemp("rules") / "rules")


@pytest.fixture(scope="session")
def rules(rules_dir: Path) -> Rules:
    return load_rules(rules_dir)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem of 512 KiB (tmpfs), so a spool or temporary files can really fill it up."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill_disk(disk: Path, leave: int) -> Path:
    """Fill `disk` but for about `leave` bytes; the filler file, to delete for room again."""
    stats = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - leave))
    return filler
