"""A console over a real SQLite store with held messages made by Store.hold, and signed-in
browsers (Starlette's TestClient) for each role."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its TestClient; httpx is what is installed here.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from milter.envelope import Envelope
from milter.store import Store
from milter.web.app import create_app
from milter.web.auth import create_account
from milter.web.settings import WebSettings
from tests.mail import build
from tests.postfix_harness import SmtpSink

ORIGIN = "https://testserver"
PASSWORD = "correct horse battery staple"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')

OBSCENE = {
    "detector": "obscene_language",
    "category": "profanity",
    "severity": "strong",
    "clause": "5.5",
    "summary": "strong profanity in the body",
    "evidence": ["f***ing"],
    "location": "body",
}
SAFEGUARDING = {
    "detector": "safeguarding_concern",
    "category": "self_harm",
    "severity": "severe",
    "clause": "6.15",
    "summary": "possible self-harm concern for the designated safeguarding lead",
    "evidence": ['"want to disappear"'],
    "location": "body",
}
EXECUTABLE = {
    "detector": "dangerous_attachment",
    "category": "executable",
    "severity": "severe",
    "clause": "1.2",
    "summary": "a program (executable) is attached",
    "evidence": ["<img src=x onerror=alert(1)>.exe"],
    "location": "attachments",
}

HOSTILE_HTML = "\n".join(
    [
        "<html><head><script>alert('head')</script><style>body{background:url(https://evil.example/bg.png)}</style>",
        '<link rel="stylesheet" href="https://evil.example/x.css"></head>',
        '<body onload="alert(1)"><h1>Invoice</h1>',
        '<p style="color:red;background-image:url(https://evil.example/t.gif)">Pay now</p>',
        '<img src="https://evil.example/track.gif" onerror="alert(2)">',
        '<img src="data:image/png;base64,iVBORw0KGgo=">',
        '<a href="https://evil.example/phish" onclick="steal()">click here</a>',
        '<a href="javascript:alert(3)">js</a>',
        '<iframe src="https://evil.example/frame"></iframe>',
        '<form action="https://evil.example/post"><input name="pw"></form>',
        "<svg><script>alert(4)</script></svg>",
        '<object data="https://evil.example/o.swf"></object>',
        "<scr<script>ipt>alert(5)</script>",
        "</body></html>",
    ]
)
HOSTILE_SUBJECT = "<script>alert('subject')</script> Urgent \u202eexe.pdf"
HOSTILE_NAME = '<script>alert("name")</script>"onmouseover="x.exe'


@dataclass
class Held:
    plain: str
    hostile: str
    safeguarding: str
    personal: str
    released: str


def hold(
    store: Store,
    reference: str,
    raw: bytes,
    *,
    sender: str,
    rcpt: tuple[str, ...],
    findings: list[dict[str, Any]],
    direction: str = "inbound",
    subject: str = "",
    sensitivity: str | None = None,
    kind: str = "quarantine",
    verdict_extra: dict[str, Any] | None = None,
) -> str:
    verdict = {
        "action": "quarantine",
        "reference": reference,
        "direction": direction,
        "sender_role": "external" if direction == "inbound" else "staff",
        "clauses": sorted({f["clause"] for f in findings}),
        "findings": findings,
        **(verdict_extra or {}),
    }
    # As an MTA hands it over: CRLF line ends (tests/mail.py's build() gives LF).
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    held_id, new = store.hold(
        raw,
        Envelope(mail_from=sender, rcpt_to=rcpt, queue_id="Q" + reference[-4:]),
        verdict,
        subject=subject,
        header_from=sender,
        message_id=f"<{reference}@test.example>",
        sensitivity=sensitivity,
        kind=kind,
    )
    assert new
    return held_id


@pytest.fixture(autouse=True)
def quick_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2id still, with small costs: the tests sign in hundreds of times."""
    from argon2 import PasswordHasher

    from milter.web import auth

    monkeypatch.setattr(auth, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/quarantine.db")
    yield s
    s.close()


@pytest.fixture
def held(store: Store) -> Held:
    plain = hold(
        store,
        "RB-PLN1-0001",
        build(
            sender="troll@outside.example", to="pupil@redborne.example", subject="You lost", body="PLAIN-BODY"
        ),
        sender="troll@outside.example",
        rcpt=("pupil@redborne.example",),
        findings=[OBSCENE],
        subject="You lost",
    )
    hostile = hold(
        store,
        "RB-HOST-0002",
        build(
            sender="attacker@evil.example",
            to="bursar@redborne.example",
            subject=HOSTILE_SUBJECT,
            body="Hello <script>alert('text')</script> see below",
            html=HOSTILE_HTML,
            attachments=[(HOSTILE_NAME, b"MZ\x90\x00 not really a program", "application/octet-stream")],
            headers={
                "X-Evil": "<script>alert('header')</script>",
                "Reply-To": '"<b onmouseover=x>" <r@evil.example>',
            },
        ),
        sender="attacker@evil.example",
        rcpt=("bursar@redborne.example",),
        findings=[OBSCENE, {**EXECUTABLE, "evidence": [HOSTILE_NAME]}],
        subject=HOSTILE_SUBJECT,
    )
    safeguarding = hold(
        store,
        "RB-SAFE-0003",
        build(
            sender="pupil@redborne.example", to="friend@redborne.example", subject="tonight", body="SAFE-BODY"
        ),
        sender="pupil@redborne.example",
        rcpt=("friend@redborne.example",),
        findings=[SAFEGUARDING],
        direction="internal",
        subject="tonight",
    )
    personal = hold(
        store,
        "RB-PERS-0004",
        build(
            sender="j.hughes@redborne.example",
            to="gp@surgery.example",
            subject="Hospital appointment",
            body="PERSONAL-BODY my results",
            headers={"Sensitivity": "Personal"},
        ),
        sender="j.hughes@redborne.example",
        rcpt=("gp@surgery.example",),
        findings=[OBSCENE],
        direction="outbound",
        subject="Hospital appointment",
        sensitivity="Personal",
    )
    released = hold(
        store,
        "RB-GONE-0005",
        build(sender="old@outside.example", to="pupil@redborne.example", subject="old", body="OLD-BODY"),
        sender="old@outside.example",
        rcpt=("pupil@redborne.example",),
        findings=[OBSCENE],
        subject="old",
    )
    store.delete(released, "setup", "test fixture")
    return Held(plain, hostile, safeguarding, personal, released)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


@pytest.fixture
def settings(store: Store, sink: SmtpSink) -> WebSettings:
    return WebSettings(
        database=store.url,
        reinject=f"127.0.0.1:{sink.port}",
        metrics_url="http://127.0.0.1:9/metrics",  # nothing listens: health is "unknown"
    )


@pytest.fixture
def accounts(store: Store) -> dict[str, str]:
    names = {"technician": "tech", "dsl": "dsl", "slt": "head", "auditor": "audit"}
    for role, name in names.items():
        create_account(store, name, role, PASSWORD, f"{name}@redborne.example")
    create_account(store, "tech2", "technician", PASSWORD, "tech2@redborne.example")
    return names


@pytest.fixture
def app(settings: WebSettings, store: Store, accounts: dict[str, str]) -> Any:
    return create_app(settings, store)


def browser(app: Any) -> TestClient:
    return TestClient(app, base_url=ORIGIN, headers={"Origin": ORIGIN}, follow_redirects=False)


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def sign_in(client: TestClient, username: str, password: str = PASSWORD) -> Any:
    page = client.get("/login")
    assert page.status_code == 200
    return client.post(
        "/login", data={"username": username, "password": password, "csrf_token": csrf_of(page.text)}
    )


def signed_in(app: Any, username: str) -> TestClient:
    client = browser(app)
    response = sign_in(client, username)
    assert response.status_code == 303, response.text
    return client


def token(client: TestClient, path: str = "/audit") -> str:
    response = client.get(path)
    assert response.status_code == 200, response.text
    return csrf_of(response.text)


@pytest.fixture
def tech(app: Any, held: Held) -> TestClient:
    return signed_in(app, "tech")


@pytest.fixture
def dsl(app: Any, held: Held) -> TestClient:
    return signed_in(app, "dsl")


@pytest.fixture
def slt(app: Any, held: Held) -> TestClient:
    return signed_in(app, "head")


@pytest.fixture
def auditor(app: Any, held: Held) -> TestClient:
    return signed_in(app, "audit")
