"""Signing in and out: cookies, session fixation, timeouts, rate limits, disabled accounts,
and the `web-user` commands that make accounts."""

from __future__ import annotations

import argparse
import datetime as dt
import io
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from milter.store import Store
from milter.store.models import WebSession, WebUser
from milter.web import auth, cli
from milter.web.app import create_app
from milter.web.auth import AccountError, create_account
from milter.web.settings import WebSettings
from tests.web.conftest import PASSWORD, browser, csrf_of, sign_in, token

SESSION = "__Host-console_session"


def actions(store: Store) -> list[tuple[str, str, str]]:
    return [(e.actor, e.action, e.target) for e in reversed(store.audit_entries(limit=1000))]


def test_sign_in_sets_a_strict_secure_session_cookie(app: Any, store: Store) -> None:
    client = browser(app)
    response = sign_in(client, "tech")
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION + "="))
    attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= attributes
    assert not any(a.startswith(("domain", "max-age", "expires")) for a in attributes)
    # Only a hash of the cookie value is stored.
    value = cookie.split(";")[0].split("=", 1)[1]
    with store.session() as session:
        ids = list(session.scalars(select(WebSession.id)))
    assert ids == [auth.digest(value)]
    assert value not in ids
    page = client.get("/")
    assert page.status_code == 200
    assert "tech" in page.text and "IT technician" in page.text
    assert ("tech", "login", "tech") in actions(store)


def test_wrong_password_is_refused_and_audited(app: Any, store: Store) -> None:
    client = browser(app)
    response = sign_in(client, "tech", "not the password at all")
    assert response.status_code == 400
    assert "Wrong username or password." in response.text
    assert client.get("/").status_code == 303
    entry = store.audit_entries(action="login_failed")[0]
    assert (entry.actor, entry.target, entry.details["method"]) == ("tech", "tech", "password")
    # A name that is no account (perhaps a password typed in the wrong box) is not recorded.
    sign_in(client, "hunter2-oops", "whatever")
    assert store.audit_entries(action="login_failed")[0].actor == auth.UNKNOWN
    assert all("hunter2" not in str(e) for e in store.audit_entries())


def test_a_new_session_id_at_every_sign_in_and_the_old_one_is_worthless(app: Any, store: Store) -> None:
    client = browser(app)
    # A value planted before sign-in (session fixation) is never adopted.
    client.cookies.set(SESSION, "planted-by-an-attacker", domain="testserver.local")
    sign_in(client, "tech")
    first = client.cookies.get(SESSION)
    assert first and first != "planted-by-an-attacker"

    # Signing in again in the same browser (a login form left open in another tab).
    client.cookies.set("__Host-console_login", "form-token", domain="testserver.local")
    again = client.post("/login", data={"username": "tech", "password": PASSWORD, "csrf_token": "form-token"})
    assert again.status_code == 303
    second = client.cookies.get(SESSION)
    assert second and second != first

    stale = browser(app)
    stale.cookies.set(SESSION, first, domain="testserver.local")
    assert stale.get("/").status_code == 303  # the first session was discarded at the second sign-in
    with store.session() as session:
        assert list(session.scalars(select(WebSession.id))) == [auth.digest(second)]
    assert client.get("/").status_code == 200


def test_sign_out_ends_the_session(app: Any, store: Store) -> None:
    client = browser(app)
    sign_in(client, "tech")
    value = client.cookies.get(SESSION)
    response = client.post("/logout", data={"csrf_token": token(client)})
    assert response.status_code == 303
    assert response.headers["location"] == "/login"
    replay = browser(app)
    replay.cookies.set(SESSION, value, domain="testserver.local")
    assert replay.get("/quarantine").status_code == 303
    assert ("tech", "logout", "tech") in actions(store)


def test_the_login_form_needs_its_csrf_token(app: Any) -> None:
    client = browser(app)
    client.get("/login")
    for data in (
        {"username": "tech", "password": PASSWORD},
        {"username": "tech", "password": PASSWORD, "csrf_token": "forged"},
    ):
        response = client.post("/login", data=data)
        assert response.status_code == 403
        assert "expired" in response.text
    # No cookie at all (a cross-site form): refused too.
    assert (
        browser(app)
        .post("/login", data={"username": "tech", "password": PASSWORD, "csrf_token": "x"})
        .status_code
        == 403
    )
    assert client.get("/").status_code == 303


def test_after_sign_in_only_local_paths_are_followed(app: Any) -> None:
    for target, expected in (
        ("/quarantine?status=held", "/quarantine?status=held"),
        ("//evil.example/x", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
    ):
        client = browser(app)
        page = client.get("/login", params={"next": target})
        response = client.post(
            "/login",
            data={"username": "tech", "password": PASSWORD, "csrf_token": csrf_of(page.text), "next": target},
        )
        assert response.headers["location"] == expected


def test_anonymous_get_goes_to_login_and_comes_back(app: Any) -> None:
    client = browser(app)
    response = client.get("/audit?actor=tech")
    assert response.headers["location"] == "/login?next=%2Faudit%3Factor%3Dtech"
    page = client.get(response.headers["location"])
    assert 'name="next" value="/audit?actor=tech"' in page.text


def test_five_failures_lock_the_account(app: Any, store: Store) -> None:
    client = browser(app)
    for _ in range(auth.MAX_FAILURES_PER_USER):
        assert sign_in(client, "tech", "wrong password!!").status_code == 400
    locked = sign_in(client, "tech")  # even the right password now
    assert locked.status_code == 429
    assert "Too many failed sign-ins" in locked.text
    assert client.get("/").status_code == 303
    assert store.audit_entries(action="login_locked")[0].actor == "tech"
    # Another account from elsewhere is not locked by it.
    assert sign_in(browser(app), "tech2").status_code == 303


def test_twenty_failures_from_one_address_lock_it(app: Any, store: Store) -> None:
    client = browser(app)
    for i in range(auth.MAX_FAILURES_PER_CLIENT):
        assert sign_in(client, f"nobody{i}", "wrong password!!").status_code == 400
    assert sign_in(client, "tech2").status_code == 429


def test_the_lock_ends_after_the_window(app: Any, store: Store) -> None:
    from milter.store.models import LoginFailure

    client = browser(app)
    for _ in range(auth.MAX_FAILURES_PER_USER):
        sign_in(client, "tech", "wrong password!!")
    assert sign_in(client, "tech").status_code == 429
    with store.session() as session:
        session.execute(update(LoginFailure).values(at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=16)))
    assert sign_in(client, "tech").status_code == 303


@pytest.mark.parametrize(
    "change",
    [
        {"last_seen": dt.timedelta(minutes=31)},
        {"created_at": dt.timedelta(hours=12, minutes=1), "last_seen": dt.timedelta(minutes=1)},
    ],
    ids=["idle 30 minutes", "absolute 12 hours"],
)
def test_sessions_expire(app: Any, store: Store, change: dict[str, dt.timedelta]) -> None:
    client = browser(app)
    sign_in(client, "tech")
    assert client.get("/").status_code == 200
    now = dt.datetime.now(dt.UTC)
    with store.session() as session:
        session.execute(update(WebSession).values(**{k: now - v for k, v in change.items()}))
    assert client.get("/").status_code == 303
    with store.session() as session:
        assert list(session.scalars(select(WebSession.id))) == []


def test_a_disabled_account_loses_its_session_and_cannot_sign_in(app: Any, store: Store) -> None:
    client = browser(app)
    sign_in(client, "tech")
    auth.disable_account(store, "tech")
    assert client.get("/").status_code == 303
    assert sign_in(browser(app), "tech").status_code == 400


def test_plain_http_cookies_only_on_loopback(store: Store, accounts: Any) -> None:
    with pytest.raises(ValueError, match="loopback"):
        WebSettings(database=store.url, secure_cookies=False, listen="0.0.0.0:8080")
    settings = WebSettings(database=store.url, secure_cookies=False, listen="127.0.0.1:8080", metrics_url="")
    from starlette.testclient import TestClient

    client = TestClient(
        create_app(settings, store), headers={"Origin": "http://testserver"}, follow_redirects=False
    )
    response = sign_in(client, "tech")
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("console_session="))
    assert "secure" not in cookie.lower()
    assert "samesite=strict" in cookie.lower() and "httponly" in cookie.lower()
    assert "strict-transport-security" not in response.headers


def test_accounts_and_passwords(store: Store) -> None:
    account = create_account(store, "Alice", "dsl", "a long enough password")
    assert (account.username, account.role, account.has_password) == ("alice", "dsl", True)
    with store.session() as session:
        stored = session.scalar(select(WebUser.password_hash).where(WebUser.username == "alice"))
    assert stored and stored.startswith("$argon2id$")
    with pytest.raises(AccountError, match="already exists"):
        create_account(store, "alice", "dsl", "a long enough password")
    with pytest.raises(AccountError, match="at least 12"):
        create_account(store, "bob", "dsl", "short")
    with pytest.raises(AccountError, match="unknown role"):
        create_account(store, "bob", "admin", "a long enough password")
    with pytest.raises(AccountError, match="needs --email"):
        create_account(store, "bob", "slt", None)


def parser() -> argparse.ArgumentParser:
    """What `school-milter` has once milter/cli.py calls milter.web.cli.add_commands."""
    top = argparse.ArgumentParser(prog="school-milter")
    cli.add_commands(top.add_subparsers(dest="command", required=True))
    return top


def run_cli(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    import contextlib
    import sys

    out, err = io.StringIO(), io.StringIO()
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser().parse_args(argv)
            code = int(args.func(args))
    finally:
        sys.stdin = old
    return code, out.getvalue(), err.getvalue()


def test_web_user_commands(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path}/q.db"
    code, out, _ = run_cli(
        [
            "web-user",
            "add",
            "carol",
            "--role",
            "technician",
            "--email",
            "Carol@Redborne.example",
            "--password-stdin",
            "--database",
            database,
        ],
        stdin="a long enough password\n",
    )
    assert code == 0 and "carol (technician) created" in out
    code, out, _ = run_cli(
        [
            "web-user",
            "add",
            "sso",
            "--role",
            "auditor",
            "--email",
            "a@redborne.example",
            "--sso-only",
            "--database",
            database,
        ]
    )
    assert code == 0 and "single sign-on only" in out
    code, out, _ = run_cli(["web-user", "list", "--database", database])
    assert "carol" in out and "carol@redborne.example" in out and "sso only" in out
    code, _, err = run_cli(
        ["web-user", "add", "carol", "--role", "dsl", "--password-stdin", "--database", database],
        stdin="a long enough password\n",
    )
    assert code == 3 and err.strip() == "school-milter: an account 'carol' already exists"
    code, _, err = run_cli(
        ["web-user", "passwd", "carol", "--password-stdin", "--database", database], stdin="short\n"
    )
    assert code == 3 and "at least 12" in err and err.count("\n") == 1
    code, out, _ = run_cli(
        ["web-user", "passwd", "carol", "--password-stdin", "--database", database],
        stdin="another long password\n",
    )
    assert code == 0
    code, out, _ = run_cli(["web-user", "disable", "carol", "--database", database])
    assert code == 0 and "disabled" in out
    code, _, err = run_cli(["web-user", "disable", "nobody", "--database", database])
    assert code == 3 and "no account 'nobody'" in err
    store = Store(database)
    assert [a.username for a in auth.accounts(store) if a.disabled] == ["carol"]
    assert {e.action for e in store.audit_entries()} >= {
        "web_user_add",
        "web_user_passwd",
        "web_user_disable",
    }
    code, _, err = run_cli(["web-user", "list", "--config", str(tmp_path / "missing.toml")])
    assert code == 2 and "cannot read" in err


def test_web_user_commands_close_the_store(tmp_path: Path) -> None:
    """Each command closes what it opened: with SQLite the last connection to close writes the
    log into the database file, so no -wal file is left behind (and no connection stays open)."""
    database = f"sqlite:///{tmp_path}/q.db"
    wal = tmp_path / "q.db-wal"
    commands: list[tuple[list[str], str]] = [
        (["add", "dave", "--role", "technician", "--password-stdin"], "a long enough password\n"),
        (["passwd", "dave", "--password-stdin"], "another long password\n"),
        (["list"], ""),
        (["disable", "dave"], ""),
        (["disable", "nobody"], ""),  # an error a user can make closes the store too
    ]
    for argv, stdin in commands:
        run_cli(["web-user", *argv, "--database", database], stdin=stdin)
        assert not wal.exists(), f"web-user {argv[0]} left {wal.name} behind"
