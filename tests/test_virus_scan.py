"""virus_scan through the engine against a real clamd with the project's own signature database."""

from __future__ import annotations

import io
import tarfile
import zipfile
from email.message import EmailMessage
from pathlib import Path

import pytest

from milter.engine import scan
from milter.envelope import Envelope
from milter.policy.loader import Rules, load_rules
from milter.policy.schema import Action
from tests.clamd_harness import ClamdInstance, clamd, clamd_available, clamd_small_limit  # noqa: F401 - fixtures
from tests.conftest import copy_rules
from tests.mail import build
from tests.test_clamd import EICAR, SIGNATURE

pytestmark = pytest.mark.skipif(not clamd_available(), reason="clamd is not installed (clamav-daemon)")

OUTSIDER = "someone@elsewhere.example"
STAFF = "j.hughes@redborne.example"
INBOUND = Envelope(mail_from=OUTSIDER, rcpt_to=(STAFF,), client_address="203.0.113.9")


def rules_for(tmp_path: Path, clamd_address: str, extra: str = "") -> Rules:
    root = copy_rules(tmp_path / "rules", virus_scan=True)
    policy = root / "policy.yaml"
    text = policy.read_text().replace("clamd: unix:/run/clamav/clamd.ctl", f"clamd: {clamd_address}")
    policy.write_text(text.replace("  virus_scan:\n", f"  virus_scan:\n{extra}", 1))
    return load_rules(root)


@pytest.fixture
def rules_clamd(tmp_path: Path, clamd: ClamdInstance) -> Rules:  # noqa: F811
    return rules_for(tmp_path, clamd.unix_address)


def zipped(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return out.getvalue()


def tar_gz(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def seven_zip(name: str, data: bytes) -> bytes:
    py7zr = pytest.importorskip("py7zr")
    out = io.BytesIO()
    with py7zr.SevenZipFile(out, "w") as archive:
        archive.writestr(data, name)
    return out.getvalue()


def plain_text_attachment() -> bytes:
    # 7bit text part: the test string travels as it is, not encoded.
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = OUTSIDER, STAFF, "note"
    msg.set_content("see attached")
    msg.add_attachment(EICAR.decode(), filename="note.txt", cte="7bit")
    return msg.as_bytes()


CARRIERS = {
    "plain": plain_text_attachment,
    "base64": lambda: build(
        OUTSIDER, STAFF, "x", "see", attachments=[("eicar.com", EICAR, "application/octet-stream")]
    ),
    "zip": lambda: build(
        OUTSIDER, STAFF, "x", "see", attachments=[("a.zip", zipped("eicar.com", EICAR), "application/zip")]
    ),
    "zip-in-zip": lambda: build(
        OUTSIDER,
        STAFF,
        "x",
        "see",
        attachments=[("outer.zip", zipped("inner.zip", zipped("eicar.com", EICAR)), "application/zip")],
    ),
    "7z": lambda: build(
        OUTSIDER,
        STAFF,
        "x",
        "see",
        attachments=[("a.7z", seven_zip("eicar.com", EICAR), "application/x-7z-compressed")],
    ),
    "tar.gz": lambda: build(
        OUTSIDER,
        STAFF,
        "x",
        "see",
        attachments=[("a.tar.gz", tar_gz("eicar.com", EICAR), "application/gzip")],
    ),
}


@pytest.mark.parametrize("carrier", list(CARRIERS))
def test_eicar_found_and_refused_naming_the_signature(carrier: str, rules_clamd: Rules) -> None:
    verdict = scan(CARRIERS[carrier](), INBOUND, rules_clamd).verdict
    malware = [f for f in verdict.findings if f.detector == "virus_scan"]
    assert malware and malware[0].category == "malware" and malware[0].evidence == (SIGNATURE,)
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None and verdict.reply.code == 550 and SIGNATURE in verdict.reply.text


def test_malware_from_the_school_alerts_it(rules_clamd: Rules) -> None:
    raw = build(STAFF, OUTSIDER, "x", "see", attachments=[("eicar.com", EICAR, "application/octet-stream")])
    verdict = scan(raw, Envelope(mail_from=STAFF, rcpt_to=(OUTSIDER,), auth_user=STAFF), rules_clamd).verdict
    assert verdict.action is Action.REJECT and "it" in verdict.alerts and "virus_scan" in verdict.guidance


def test_clean_attachment_passes(rules_clamd: Rules) -> None:
    raw = build(
        STAFF,
        "a.patel@redborne.example",
        "x",
        "minutes",
        attachments=[("m.pdf", b"%PDF-1.4\n%%EOF", "application/pdf")],
    )
    verdict = scan(raw, Envelope(), rules_clamd).verdict
    assert not [f for f in verdict.findings if f.detector == "virus_scan"]


def test_too_large_for_clamd_is_tagged_unscanned(tmp_path: Path, clamd_small_limit: ClamdInstance) -> None:  # noqa: F811
    rules = rules_for(tmp_path, clamd_small_limit.unix_address)
    raw = build(
        STAFF,
        "a.patel@redborne.example",
        "x",
        "video",
        attachments=[("v.bin", b"\1" * 2_000_000, "application/octet-stream")],
    )
    verdict = scan(raw, Envelope(), rules).verdict
    (unscanned,) = [f for f in verdict.findings if f.detector == "virus_scan"]
    assert unscanned.category == "unscanned" and verdict.action is Action.TAG


def test_clamd_down_tempfails_mail_with_attachments(tmp_path: Path) -> None:
    rules = rules_for(tmp_path, f"unix:{tmp_path}/no-clamd.sock")
    raw = build(OUTSIDER, STAFF, "x", "see", attachments=[("a.pdf", b"%PDF-1.4", "application/pdf")])
    verdict = scan(raw, INBOUND, rules).verdict
    assert verdict.action is Action.TEMPFAIL and verdict.failed_checks == ("virus_scan",)
    assert verdict.reply is not None and verdict.reply.code == 451


def test_clamd_down_tags_mail_without_attachments_when_scanning_all(tmp_path: Path) -> None:
    rules = rules_for(tmp_path, f"unix:{tmp_path}/no-clamd.sock", extra="    scan: all\n")
    verdict = scan(build(OUTSIDER, STAFF, "x", "hello"), INBOUND, rules).verdict
    assert verdict.action is Action.TAG
    assert [f.category for f in verdict.findings if f.detector == "virus_scan"] == ["unscanned"]
