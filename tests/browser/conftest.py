"""Harness for the browser tests of the technicians' web console (milter/web).

A real headless Chromium (Debian's /usr/bin/chromium) driven by Playwright's sync API;
the console runs under uvicorn in a background thread on a free loopback port, over a
fresh SQLite store seeded with held messages of several kinds, and releases mail to an
in-memory SMTP sink. One browser per session; a new browser context (so a new cookie
jar) per signed-in user.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from sqlalchemy import update

from milter.envelope import Envelope
from milter.store.models import HeldMessage
from milter.store.store import Store
from tests.mail import build
from tests.postfix_harness import SmtpSink, free_port

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

# Every account has the same (long enough for any password rule) password.
PASSWORD = "correct horse battery staple 1987"
USERS = {
    "tech": ("technician", "it.support@redborne.example"),
    "dsl": ("dsl", "safeguarding@redborne.example"),
    "slt": ("slt", "head@redborne.example"),
    "auditor": ("auditor", "governors@redborne.example"),
}

# Held messages (ids are verdict references: Crockford base32, no I, L, O or U).
OBSCENE = "RB-0B5C-3N3A"  # inbound from a parent, strong profanity
OBSCENE_2 = "RB-0B5C-3N3B"  # outbound from a student, strong profanity
SAFEGUARDING = "RB-5AFE-6RD1"  # bullying, for the DSL
MALWARE = "RB-MA1W-4RE1"  # a virus in an attachment
PERSONAL = "RB-PER5-0NA1"  # Sensitivity: Personal
HOSTILE = "RB-X555-0001"  # script in every field a page might show

HOSTILE_SUBJECT = "<script>alert(1)</script>"
HOSTILE_FILENAME = '"><img src=x onerror=alert(2)>.pdf'
HOSTILE_HTML = (
    "<html><head><script>alert(3)</script>"
    '<meta http-equiv="refresh" content="0;url=javascript:alert(4)"></head>'
    '<body onload="alert(5)"><p>Invoice attached.</p>'
    '<img src="x" onerror="alert(6)">'
    '<a href="javascript:alert(7)">click</a>'
    '<iframe src="javascript:alert(8)"></iframe>'
    "<svg><script>alert(9)</script></svg>"
    '<form action="javascript:alert(10)"><button>Go</button></form>'
    '<div style="background:url(javascript:alert(11))">styled</div>'
    "</body></html>"
)


def screenshot_dir() -> Path:
    path = Path(os.environ.get("SCREENSHOT_DIR") or REPO / "var" / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _finding(
    detector: str,
    category: str,
    severity: str,
    clause: str,
    summary: str,
    evidence: list[str],
    location: str = "body",
) -> dict[str, Any]:
    return {
        "detector": detector,
        "category": category,
        "severity": severity,
        "clause": clause,
        "summary": summary,
        "evidence": evidence,
        "location": location,
    }


def _verdict(
    reference: str, direction: str, sender_role: str, findings: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "reference": reference,
        "action": "quarantine",
        "direction": direction,
        "sender_role": sender_role,
        "clauses": sorted({f["clause"] for f in findings}),
        "findings": findings,
    }


# Minutes before now each message was received, newest first, as a real queue would be.
_AGE_MINUTES = {
    OBSCENE: 7,
    PERSONAL: 290,
    SAFEGUARDING: 573,
    OBSCENE_2: 856,
    MALWARE: 1139,
    HOSTILE: 1422,
}


def _received(reference: str) -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=_AGE_MINUTES[reference])


def _sent_date(reference: str) -> str:
    return format_datetime(_received(reference) - dt.timedelta(seconds=42))


def _hold(
    store: Store,
    reference: str,
    raw: bytes,
    sender: str,
    rcpts: list[str],
    verdict: dict[str, Any],
    *,
    subject: str,
    header_from: str = "",
    sensitivity: str | None = None,
) -> str:
    # tests.mail.build() dates every message 1 January 1970; a held message reads better
    # with the date it was sent (seed() puts the received times in the last day and a half).
    raw = raw.replace(b"Date: Thu, 01 Jan 1970 00:00:00 -0000", b"Date: " + _sent_date(reference).encode(), 1)
    held, new = store.hold(
        raw,
        Envelope(mail_from=sender, rcpt_to=tuple(rcpts), client_address="192.0.2.25", queue_id="4XyZ1abc"),
        verdict,
        subject=subject,
        header_from=header_from or sender,
        message_id=f"<{reference.lower()}@test.example>",
        sensitivity=sensitivity,
    )
    assert new and held == reference
    return held


def seed(store: Store) -> None:
    """Held messages of several kinds, a proposed block, some dashboard counts."""
    profanity = _finding(
        "obscene_language",
        "profanity",
        "strong",
        "5.7",
        "strong profanity in the message body",
        ["f***ing", "s**t"],
    )
    _hold(
        store,
        OBSCENE,
        build(
            sender="Angry Parent <angry.parent@example.org>",
            to="j.hughes@redborne.example",
            subject="About Friday's match",
            body="Mr Hughes,\n\nThis is f***ing ridiculous. My son was left on the bench again.\n"
            "Sort this s**t out before Friday.\n\nD. Parent\n",
            html="<p>Mr Hughes,</p><p>This is <b>f***ing ridiculous</b>. My son was left on the "
            "bench again.</p><p>Sort this s**t out before Friday.</p><p>D. Parent</p>",
        ),
        "angry.parent@example.org",
        ["j.hughes@redborne.example"],
        _verdict(OBSCENE, "inbound", "external", [profanity]),
        subject="About Friday's match",
    )
    _hold(
        store,
        OBSCENE_2,
        build(
            sender="k.smith@students.redborne.example",
            to="mate@example.net",
            subject="lol",
            body="you're a f***ing legend, see you at 4\n",
        ),
        "k.smith@students.redborne.example",
        ["mate@example.net"],
        _verdict(OBSCENE_2, "outbound", "student", [profanity]),
        subject="lol",
    )
    _hold(
        store,
        SAFEGUARDING,
        build(
            sender="anon.account@example.net",
            to="t.brown@students.redborne.example",
            subject="nobody wants you here",
            body="Everyone in 8B thinks you should just leave. Nobody wants you here.\n",
        ),
        "anon.account@example.net",
        ["t.brown@students.redborne.example"],
        _verdict(
            SAFEGUARDING,
            "inbound",
            "external",
            [
                _finding(
                    "safeguarding_concern",
                    "bullying",
                    "severe",
                    "6.15",
                    "possible bullying concern for the designated safeguarding lead",
                    ['"nobody wants you"'],
                )
            ],
        ),
        subject="nobody wants you here",
    )
    _hold(
        store,
        MALWARE,
        build(
            sender="accounts@supplier.example.com",
            to="finance@redborne.example",
            subject="Overdue invoice 4471",
            body="Please find the overdue invoice attached.\n",
            attachments=[
                ("invoice-4471.pdf.exe", b"MZ\x90\x00not really a program\x00", "application/x-msdownload")
            ],
        ),
        "accounts@supplier.example.com",
        ["finance@redborne.example"],
        _verdict(
            MALWARE,
            "inbound",
            "external",
            [
                _finding(
                    "virus_scan",
                    "malware",
                    "severe",
                    "1.2",
                    "virus found: Win.Trojan.Agent-123",
                    ["Win.Trojan.Agent-123"],
                    "attachments",
                )
            ],
        ),
        subject="Overdue invoice 4471",
    )
    _hold(
        store,
        PERSONAL,
        build(
            sender="r.jones@redborne.example",
            to="union.rep@example.org",
            subject="Meeting on Thursday",
            body="PERSONAL-BODY-MARKER: about my grievance, this is a f***ing mess.\n",
            headers={"Sensitivity": "Personal"},
        ),
        "r.jones@redborne.example",
        ["union.rep@example.org"],
        _verdict(PERSONAL, "outbound", "staff", [profanity]),
        subject="Meeting on Thursday",
        sensitivity="Personal",
    )
    _hold(
        store,
        HOSTILE,
        build(
            sender='"<script>alert(12)</script>" <evil@attacker.example>',
            to="office@redborne.example",
            subject=HOSTILE_SUBJECT,
            body="<script>alert(13)</script> plain text part\n",
            html=HOSTILE_HTML,
            attachments=[(HOSTILE_FILENAME, b"%PDF-1.4 not really\n", "application/pdf")],
            headers={
                "X-Hostile": "<img src=x onerror=alert(14)>",
                "Reply-To": '"><svg onload=alert(15)>@attacker.example',
            },
        ),
        "evil@attacker.example",
        ["office@redborne.example"],
        _verdict(
            HOSTILE,
            "inbound",
            "external",
            [
                _finding(
                    "obscene_language",
                    "profanity",
                    "strong",
                    "5.7",
                    "<img src=x onerror=alert(16)> in the summary",
                    ["<script>alert(17)</script>", '"><b onmouseover=alert(18)>x'],
                )
            ],
        ),
        subject=HOSTILE_SUBJECT,
        header_from='"><img src=x onerror=alert(19)>@attacker.example',
    )
    with store.session() as session:
        for held_id in _AGE_MINUTES:
            session.execute(
                update(HeldMessage).where(HeldMessage.id == held_id).values(received_at=_received(held_id))
            )
    store.add_entry(
        "block",
        "domain",
        "spammy-newsletters.example",
        "reports@redborne.example",
        status="proposed",
        note="reported as spam by three staff",
        source="report",
    )
    store.add_entry("block", "sender", "nuisance@example.net", "tech", note="repeated abuse of the office")
    today = dt.datetime.now(dt.UTC).date()
    counts: dict[tuple[dt.date, str, str], int] = {}
    senders: dict[tuple[dt.date, str], int] = {}
    for back in range(14):
        day = today - dt.timedelta(days=back)
        counts[(day, "accept", "")] = 900 + 37 * (back % 5)
        counts[(day, "quarantine", "")] = 6 + back % 4
        counts[(day, "quarantine", "obscene_language/profanity")] = 4 + back % 3
        counts[(day, "quarantine", "safeguarding_concern/bullying")] = back % 2
        counts[(day, "reject", "")] = 20 + back % 7
        counts[(day, "reject", "virus_scan/malware")] = 3 + back % 2
        senders[(day, "angry.parent@example.org")] = 1
        senders[(day, "accounts@supplier.example.com")] = 2
    store.add_counts(counts, senders)


def _web_user_cli(argv: list[str]) -> int:
    """`school-milter ARGV`; through milter.web.cli's own parser while milter/cli.py does not
    list the web commands yet (the same code runs either way)."""
    import argparse

    from milter import cli

    if "web-user" in cli.build_parser().format_help():
        return cli.main(argv)
    from milter.web import cli as web_cli

    parser = argparse.ArgumentParser(prog="school-milter")
    web_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def add_user(database: str, username: str, role: str, email: str = "", password: str = PASSWORD) -> None:
    """A console account, made the way an administrator makes one: with the CLI."""
    argv = ["web-user", "add", username, "--role", role, "--password-stdin", "--database", database]
    if email:
        argv += ["--email", email]
    stdin = io.TextIOWrapper(io.BytesIO(password.encode() + b"\n"), encoding="utf-8")
    with mock.patch.object(sys, "stdin", stdin), mock.patch.object(sys, "stdout", io.StringIO()) as out:
        code = _web_user_cli(argv)
    assert code == 0, f"school-milter {' '.join(argv)} exited {code}"
    assert f"account {username}" in out.getvalue(), out.getvalue()


@dataclass
class Console:
    """A running console: its address, its store and the sink released mail goes to."""

    url: str
    database: str
    store: Store
    sink: SmtpSink


class _Server:
    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="auto")
        )
        self.thread = threading.Thread(target=self.server.run, name="console-uvicorn", daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn stopped before it was serving (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start within 15 s")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "uvicorn did not stop within 15 s"


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


@pytest.fixture(scope="session")
def seeded_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded store with its accounts, made once (password hashing is slow on purpose);
    each test works on its own copy."""
    path = tmp_path_factory.mktemp("seeded") / "console.db"
    database = f"sqlite:///{path}"
    store = Store(database)
    try:
        seed(store)
    finally:
        store.close()  # the last connection closed: the WAL is checkpointed into the file
    for username, (role, email) in USERS.items():
        add_user(database, username, role, email)
    # The CLI closes its store, so everything is in the main file: the copies each test makes
    # are of that file alone. A -wal file left here would be a connection left open.
    wal = path.with_name(path.name + "-wal")
    assert not wal.exists(), f"{wal.name} left behind: a connection to the seeded store is still open"
    return path


@pytest.fixture
def console(tmp_path: Path, sink: SmtpSink, seeded_database: Path) -> Iterator[Console]:
    from milter.web.app import create_app
    from milter.web.settings import WebSettings

    shutil.copyfile(seeded_database, tmp_path / "console.db")
    database = f"sqlite:///{tmp_path}/console.db"
    store = Store(database)
    host, port = sink.address
    settings = WebSettings(
        database=database,
        reinject=f"{host}:{port}",
        metrics_url="",
        secure_cookies=False,
    )
    app = create_app(settings, store)
    server = _Server(app)
    url = f"http://127.0.0.1:{server.port}"
    server.start()
    try:
        yield Console(url, database, store, sink)
    finally:
        server.stop()
        store.close()


# ------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium); CI is set, so this is a failure")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


_CSP = re.compile(r"content security policy", re.IGNORECASE)
_HTML_VIEW = re.compile(r"/quarantine/[^/]+/html")


@dataclass
class Watch:
    """What a page did that it should not: dialogs, script errors, CSP violations."""

    base_url: str
    dialogs: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    csp: list[tuple[str, str]] = field(default_factory=list)  # (text, document URL)
    console_errors: list[str] = field(default_factory=list)

    def own_csp_violations(self) -> list[str]:
        """CSP reports from the console's own pages (not the sandboxed view of a message).

        In a message's /html view a report is the CSP doing its job on the message's
        content. Anywhere else it is either the console's CSP blocking the console's own
        stylesheet, script or inline code, or hostile content that was not escaped and was
        only stopped by the CSP: both are bugs.
        """
        return [
            f"{text} (in {where})"
            for text, where in self.csp
            if where.startswith(self.base_url) and not _HTML_VIEW.search(where)
        ]


class Browser:
    """Opens contexts (one cookie jar each) with a watched page."""

    def __init__(self, browser: Any, console: Console) -> None:
        self.browser = browser
        self.console = console
        self.contexts: list[Any] = []
        self.watches: list[Watch] = []

    def page(self, viewport: dict[str, int] = DESKTOP, *, phone: bool = False) -> tuple[Any, Watch]:
        context = self.browser.new_context(
            base_url=self.console.url,
            viewport=viewport,
            is_mobile=phone,
            has_touch=phone,
            device_scale_factor=2 if phone else 1,
            locale="en-GB",
            timezone_id="Europe/London",
            accept_downloads=True,
        )
        context.set_default_timeout(10_000)
        self.contexts.append(context)
        page = context.new_page()
        watch = Watch(self.console.url)
        self.watches.append(watch)

        def on_dialog(dialog: Any) -> None:
            watch.dialogs.append(f"{dialog.type}: {dialog.message} (on {page.url})")
            dialog.dismiss()

        def on_console(message: Any) -> None:
            if message.type == "error":
                text = message.text
                watch.console_errors.append(text)
                if _CSP.search(text):
                    watch.csp.append((text, str(message.location.get("url") or page.url)))

        page.on("dialog", on_dialog)
        page.on("console", on_console)
        page.on("pageerror", lambda error: watch.page_errors.append(f"{error} (on {page.url})"))
        return page, watch

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def web(browser: Any, console: Console) -> Iterator[Browser]:
    opened = Browser(browser, console)
    try:
        yield opened
    finally:
        opened.close()
    for watch in opened.watches:
        assert not watch.page_errors, f"uncaught script errors: {watch.page_errors}"
        assert not watch.own_csp_violations(), (
            f"CSP reports on the console's own pages: {watch.own_csp_violations()}"
        )


# ---------------------------------------------------------------------- helpers


def login(page: Any, username: str, password: str = PASSWORD) -> None:
    from playwright.sync_api import expect

    page.goto("/login")
    page.get_by_label(re.compile("user ?name", re.IGNORECASE)).fill(username)
    page.get_by_label(re.compile("password", re.IGNORECASE)).fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def status_text(page: Any) -> str:
    """The text of the flash messages (role=status), or "" when there are none."""
    flashes = page.get_by_role("status")
    return " ".join(flashes.all_inner_texts()) if flashes.count() else ""
