"""The scan command as a user runs it: files, directories, mbox, stdin, JSON, envelope options."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from milter.cli import main
from tests.conftest import REPO
from tests.mail import build

EXAMPLES = REPO / "rules" / "examples"
RULES = REPO / "rules"


@pytest.fixture(autouse=True)
def _rules_without_virus_scan(rules_dir: Path) -> None:
    # The example rules with virus scanning off: these tests are about the command.
    global RULES
    RULES = rules_dir


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, object]]:
    assert main(["--rules", str(RULES), "scan", "--json", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_scan_directory_json_has_required_fields(capsys: pytest.CaptureFixture[str]) -> None:
    records = run_json(capsys, str(EXAMPLES))
    assert len(records) == len(list(EXAMPLES.glob("*.eml")))
    by_name = {Path(str(r["source"])).name: r for r in records}
    abusive = by_name["02-staff-abusive-reply.eml"]
    assert abusive["action"] == "reject"
    assert str(abusive["reference"]).startswith("RB-")
    finding = abusive["findings"][0]  # type: ignore[index]
    for key in ("detector", "category", "severity", "clause", "summary"):
        assert key in finding
    assert "guidance_text" in abusive and "revised version" in str(abusive["guidance_text"])
    # Masked evidence only: the offending word never appears in the output.
    assert "fucking" not in json.dumps(abusive).lower()
    assert by_name["01-biology-homework.eml"]["action"] == "accept"


def test_scan_envelope_options_change_direction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msg = tmp_path / "m.eml"
    msg.write_bytes(build("j.hughes@redborne.example", "x@elsewhere.example", "hi", "this is shit"))
    (from_school,) = run_json(capsys, str(msg))
    assert from_school["action"] == "reject" and from_school["direction"] == "outbound"
    # The same message arriving from an untrusted client is inbound (a spoofed school address).
    (spoofed,) = run_json(capsys, str(msg), "--client-ip", "203.0.113.5")
    assert spoofed["direction"] == "inbound" and spoofed["action"] == "quarantine"
    # Authenticated: trusted, so guidance goes back.
    (authed,) = run_json(
        capsys, str(msg), "--client-ip", "203.0.113.5", "--auth-user", "j.hughes@redborne.example"
    )
    assert authed["direction"] == "outbound" and authed["guidance"] == ["obscene_language"]


def test_scan_rcpt_counts_for_bulk_weight(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msg = tmp_path / "big.eml"
    msg.write_bytes(build(attachments=[("a.bin", b"\0" * 600_000, "application/octet-stream")]))
    rcpts = [arg for i in range(200) for arg in ("--rcpt", f"s{i}@redborne.example")]
    (record,) = run_json(capsys, str(msg), *rcpts)
    assert record["action"] == "reject"
    assert any(f["detector"] == "bulk_weight" for f in record["findings"])  # type: ignore[union-attr]


def test_scan_mbox_splits_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    box = tmp_path / "box.mbox"
    one = build(subject="first", body="hello")
    two = build(subject="second", body="what the fuck")
    box.write_bytes(
        b"From a@b Mon Jan  1 00:00:00 2026\n" + one + b"\nFrom a@b Mon Jan  1 00:00:00 2026\n" + two
    )
    records = run_json(capsys, str(box))
    assert [r["source"] for r in records] == [f"{box}#1", f"{box}#2"]
    assert [r["action"] for r in records] == ["accept", "reject"]


def test_scan_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data = build(subject="WHO MOVED THE SCIENCE LAB KEYS AGAIN")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    (record,) = run_json(capsys, "-")
    assert record["action"] == "tag" and record["source"] == "-"


def test_scan_text_output_shows_verdict_and_guidance(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rules", str(RULES), "scan", str(EXAMPLES / "03-parents-without-bcc.eml")]) == 0
    out = capsys.readouterr().out
    assert "verdict:   REJECT" in out
    assert "550 5.7.1" in out and "Appendix 1" in out
    assert "missing_bcc/missing_bcc" in out
    assert "When emailing parents, put their addresses in Bcc" in out


def test_scan_missing_file_is_clear(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--rules", str(RULES), "scan", str(tmp_path / "nope.eml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_console_script_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "milter", "--rules", str(RULES), "check-rules"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
