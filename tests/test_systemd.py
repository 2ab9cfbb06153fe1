"""The hardened unit passes systemd's own checks: `systemd-analyze verify` and `security`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

UNIT = REPO / "systemd" / "school-milter.service"
DAILY = REPO / "systemd" / "school-milter-daily.service"
WEB = REPO / "systemd" / "school-milter-web.service"
pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def installed_copy(tmp_path: Path, unit: Path = UNIT) -> Path:
    """The unit with its program path pointed at this checkout's interpreter, as an install would."""
    program = Path(sys.executable).with_name("school-milter")
    if not program.exists():
        program = Path(shutil.which("school-milter") or sys.executable)
    text = unit.read_text().replace("/opt/school-milter/.venv/bin/school-milter", str(program))
    copy = tmp_path / unit.name
    copy.write_text(text)
    if unit == DAILY:
        shutil.copy(REPO / "systemd" / "school-milter-daily.timer", tmp_path)
    return copy


@pytest.mark.parametrize("unit", [UNIT, DAILY, WEB], ids=["gateway", "daily", "web"])
def test_verify_is_clean(tmp_path: Path, unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(installed_copy(tmp_path, unit))],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "school-milter" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


@pytest.mark.parametrize("unit", [UNIT, DAILY, WEB], ids=["gateway", "daily", "web"])
def test_security_exposure_is_low(tmp_path: Path, unit: Path) -> None:
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            "--threshold=20",
            str(installed_copy(tmp_path, unit)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    overall = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert overall, result.stdout + result.stderr
    score = float(overall[0].split(":")[1].split()[0])
    # 0 is fully locked down, 10 fully exposed; "OK" is below 2.
    assert score < 2.0, overall[0]
    assert result.returncode == 0


def test_unit_keeps_its_promises() -> None:
    text = UNIT.read_text()
    for line in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/school-milter /run/school-milter",
        "Type=notify",
        "User=school-milter",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert line in text
