"""Every route refuses anonymous users; every POST refuses a missing or wrong CSRF token and a
request from another origin; malformed ids and traversal give 404; every response carries
the security headers. Routes are enumerated from the app, so a new one cannot be forgotten."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.routing import Mount, Route

from milter.store import Store
from milter.web.security import PAGE_CSP
from tests.web.conftest import ORIGIN, Held, browser, sign_in, token

PUBLIC = {"/login", "/login/sso", "/login/sso/callback"}


def app_routes(app: Any) -> list[tuple[str, str]]:
    out = []
    for route in app.routes:
        if isinstance(route, Mount):
            continue
        assert isinstance(route, Route)
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                out.append((method, route.path))
    return out


def concrete(path: str, held: Held, entry: int) -> str:
    return path.replace("{id}", held.plain).replace("{n}", "1").replace("{entry_id}", str(entry))


def audit_count(store: Store) -> int:
    return len(store.audit_entries(limit=100_000))


@pytest.fixture
def entry(store: Store) -> int:
    return store.add_entry("block", "sender", "spam@outside.example", "reporter", status="proposed")


def test_the_app_has_the_routes_of_the_contract(app: Any) -> None:
    routes = set(app_routes(app))
    expected = {
        ("GET", "/login"),
        ("POST", "/login"),
        ("POST", "/logout"),
        ("GET", "/"),
        ("GET", "/quarantine"),
        ("POST", "/quarantine/bulk"),
        ("GET", "/quarantine/{id}"),
        ("POST", "/quarantine/{id}/open"),
        ("GET", "/quarantine/{id}/html"),
        ("POST", "/quarantine/{id}/release"),
        ("POST", "/quarantine/{id}/delete"),
        ("POST", "/quarantine/{id}/block"),
        ("POST", "/quarantine/{id}/false-positive"),
        ("POST", "/quarantine/{id}/authority"),
        ("GET", "/quarantine/{id}/attachments/{n}"),
        ("POST", "/quarantine/{id}/attachments/{n}/download"),
        ("GET", "/lists"),
        ("POST", "/lists/{entry_id}/approve"),
        ("POST", "/lists/{entry_id}/refuse"),
        ("POST", "/lists/{entry_id}/remove"),
        ("GET", "/audit"),
        ("GET", "/audit.csv"),
    }
    assert routes == expected  # SSO routes exist only when OIDC is configured (test_oidc)


def test_every_route_refuses_an_anonymous_user(app: Any, held: Held, entry: int, store: Store) -> None:
    client = browser(app)
    before = audit_count(store)
    checked = 0
    for method, path in app_routes(app):
        if path in PUBLIC:
            continue
        url = concrete(path, held, entry)
        if method == "GET":
            response = client.get(url)
            assert response.status_code == 303, url
            assert response.headers["location"].startswith("/login?next="), url
        else:
            response = client.post(
                url, data={"reason": "x", "csrf_token": "x", "confirm": "yes", "kind": "sender"}
            )
            assert response.status_code == 403, url
            assert "Sign in first" in response.text
        checked += 1
    assert checked >= 20
    assert audit_count(store) == before
    # The static files need no session (the login page uses them).
    assert client.get("/static/console.css").status_code == 200


@pytest.mark.parametrize("case", ["missing", "wrong", "other session"])
def test_every_post_refuses_a_missing_or_wrong_csrf_token(
    app: Any, tech: Any, held: Held, entry: int, store: Store, case: str
) -> None:
    other = browser(app)
    sign_in(other, "tech2")
    tokens = {"missing": None, "wrong": "not-the-token", "other session": token(other)}
    before = audit_count(store)
    posts = [p for m, p in app_routes(app) if m == "POST" and p not in PUBLIC]
    assert len(posts) >= 12
    for path in posts:
        data = {
            "reason": "because",
            "confirm": "yes",
            "kind": "sender",
            "ids": [held.plain],
            "action": "delete",
        }
        if tokens[case] is not None:
            data["csrf_token"] = tokens[case]
        response = tech.post(concrete(path, held, entry), data=data)
        assert response.status_code == 403, path
        assert "out of date" in response.text
    assert audit_count(store) == before
    assert store.get(held.plain).status == "held"
    # And the session still works: the right token is accepted.
    ok = tech.post(
        f"/quarantine/{held.plain}/block", data={"csrf_token": token(tech), "kind": "sender", "reason": "r"}
    )
    assert ok.status_code == 303


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "http://testserver"},  # same host, other scheme: another origin
        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "null", "Sec-Fetch-Site": "same-site"},
        {"Origin": "", "Referer": "https://evil.example/page"},
        {"Origin": ""},  # no evidence at all (the header is removed below)
    ],
)
def test_every_post_refuses_another_origin(
    app: Any, tech: Any, held: Held, entry: int, store: Store, headers: dict[str, str]
) -> None:
    csrf = token(tech)
    before = audit_count(store)
    for method, path in app_routes(app):
        if method != "POST":
            continue
        request = tech.build_request(
            "POST",
            concrete(path, held, entry),
            data={"csrf_token": csrf, "reason": "r", "kind": "sender", "confirm": "yes", "username": "tech"},
        )
        for name, value in headers.items():
            if value:
                request.headers[name] = value
            else:
                del request.headers[name]
        response = tech.send(request)
        assert response.status_code == 403, (path, headers)
    assert audit_count(store) == before


def test_a_same_origin_post_with_origin_null_is_accepted_through_fetch_metadata(
    tech: Any, held: Held
) -> None:
    # Chromium sends `Origin: null` on same-origin form posts under Referrer-Policy no-referrer.
    response = tech.post(
        f"/quarantine/{held.plain}/block",
        data={"csrf_token": token(tech), "kind": "sender", "reason": "spam"},
        headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"},
    )
    assert response.status_code == 303


@pytest.mark.parametrize(
    "path",
    [
        "/quarantine/..%2F..%2Fetc%2Fpasswd",
        "/quarantine/%2e%2e",
        "/quarantine/rb-pln1-0001",
        "/quarantine/RB-PLN1-0001%00",
        "/quarantine/RB-PLN1-0001'--",
        "/quarantine/RB-NONE-9999",
        "/quarantine/RB-PLN1-0001/attachments/0",
        "/quarantine/RB-PLN1-0001/attachments/9",
        "/quarantine/RB-PLN1-0001/attachments/-1",
        "/quarantine/RB-PLN1-0001/attachments/..%2F..%2Fapp.py",
        "/quarantine/RB-PLN1-0001/attachments/1e3",
        "/quarantine/RB-NONE-9999/html",
        "/static/..%2Fapp.py",
        "/static/../app.py",
        "/nowhere",
    ],
)
def test_malformed_ids_and_traversal_give_404(tech: Any, path: str) -> None:
    response = tech.get(path)
    assert response.status_code == 404, response.text
    assert "import " not in response.text
    assert '<h1 class="error-sentence">' in response.text or path.startswith("/static")


@pytest.mark.parametrize(
    "path",
    [
        "/quarantine/RB-NONE-9999/open",
        "/quarantine/bad..id/release",
        "/quarantine/RB-NONE-9999/authority",
        "/lists/abc/approve",
        "/lists/99999/refuse",
        "/lists/-1/remove",
    ],
)
def test_actions_on_unknown_or_malformed_ids_give_404(tech: Any, slt: Any, path: str) -> None:
    client = slt if path.endswith("authority") else tech
    response = client.post(path, data={"csrf_token": token(client), "reason": "r"})
    assert response.status_code == 404


def test_security_headers_on_every_page(tech: Any, held: Held) -> None:
    pages = ["/", "/quarantine", f"/quarantine/{held.plain}", "/lists", "/audit", "/nowhere", "/login"]
    for path in pages:
        response = tech.get(path)
        headers = response.headers
        assert headers["content-security-policy"] == PAGE_CSP, path
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["x-frame-options"] == "DENY"
        assert headers["cache-control"] == "no-store"
        assert "strict-transport-security" in headers
    css = tech.get("/static/console.css")
    assert css.headers["content-security-policy"] == PAGE_CSP
    assert css.headers["x-content-type-options"] == "nosniff"


def test_pages_have_no_inline_script_or_style(app: Any, tech: Any, held: Held) -> None:
    import re

    anonymous = browser(app)
    for path in ["/", "/quarantine", f"/quarantine/{held.hostile}", "/lists", "/audit", "/login"]:
        text = (anonymous if path == "/login" else tech).get(path).text
        scripts = re.findall(r"<script\b[^>]*>", text, re.IGNORECASE)
        assert scripts == ['<script src="/static/console.js" defer>'], path
        assert not re.search(r"<style\b", text, re.IGNORECASE), path
        assert not re.search(r"\sstyle\s*=", text, re.IGNORECASE), path


def test_a_wrong_role_gets_a_403_page(auditor: Any, dsl: Any, held: Held) -> None:
    for path in ["/quarantine", f"/quarantine/{held.plain}", "/lists"]:
        response = auditor.get(path)
        assert response.status_code == 403
        assert "Your role does not give access to this page." in response.text
    assert dsl.get("/lists").status_code == 403


def test_origin_check_follows_base_url(settings: Any, store: Store, accounts: Any, held: Held) -> None:
    from milter.web.app import create_app

    app = create_app(settings.model_copy(update={"base_url": "https://console.school.example/"}), store)
    client = browser(app)
    page = client.get("/login")
    assert page.status_code == 200
    # The browser's origin is the configured one, not what the Host header says.
    from tests.web.conftest import PASSWORD, csrf_of

    refused = client.post(
        "/login", data={"username": "tech", "password": PASSWORD, "csrf_token": csrf_of(page.text)}
    )
    assert refused.status_code == 403
    accepted = client.post(
        "/login",
        data={"username": "tech", "password": PASSWORD, "csrf_token": csrf_of(page.text)},
        headers={"Origin": "https://console.school.example"},
    )
    assert accepted.status_code == 303
    assert ORIGIN != "https://console.school.example"
