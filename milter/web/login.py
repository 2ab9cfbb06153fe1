"""Signing in and out: passwords with limits, single sign-on through OpenID Connect.

A sign-in always makes a new session id and discards the session the browser had
(session fixation). The login form has its own CSRF token, bound to a short-lived
pre-session cookie, and the same same-origin check as every other form.
"""

from __future__ import annotations

import re
import secrets
import warnings
from typing import Any

import httpx
from authlib.common.errors import AuthlibBaseError  # type: ignore[import-untyped]
from joserfc.errors import JoseError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from milter.web import auth
from milter.web.auth import Account
from milter.web.console import Console, log
from milter.web.security import same_origin

LOGIN_COOKIE_AGE = 3600
_LOCAL_PATH = re.compile(r"^/(?![/\\])[^\s\\]*$")


def safe_next(value: object) -> str:
    """Where to go after signing in: a path on this console only (no open redirect)."""
    if isinstance(value, str) and _LOCAL_PATH.match(value) and not value.startswith("/login"):
        return value
    return "/"


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _login_page(
    console: Console, request: Request, *, error: str | None = None, status: int = 200, username: str = ""
) -> Response:
    token = request.cookies.get(console.cookies.login)
    fresh = not token or len(token) > 100
    if fresh:
        token = secrets.token_urlsafe(32)
    response = console.render(
        request,
        "login.html",
        {
            "csrf_token": token,
            "error": error,
            "username": username,
            "next": safe_next(request.query_params.get("next")),
        },
        status=status,
    )
    if fresh:
        console.set_cookie(response, console.cookies.login, str(token), max_age=LOGIN_COOKIE_AGE)
    return response


async def login_form(request: Request) -> Response:
    console: Console = request.app.state.console
    if await run_in_threadpool(console.viewer, request) is not None:
        return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
    return _login_page(console, request)


def _signed_in(console: Console, request: Request, account: Account, response: Response) -> Response:
    auth.purge_sessions(console.store, console.idle, console.maximum)
    new = auth.start_session(console.store, account, request.cookies.get(console.cookies.session))
    console.set_cookie(response, console.cookies.session, new.cookie_value)
    console.clear_cookie(response, console.cookies.login)
    return response


async def login_submit(request: Request) -> Response:
    console: Console = request.app.state.console
    if not same_origin(request, console.settings):
        return console.error(
            request, 403, "This sign-in did not come from the console's own page and was refused."
        )
    try:
        form = await request.form(max_files=0, max_fields=20, max_part_size=16 * 1024)
    except Exception:
        return console.error(request, 400, "The form could not be read.")
    try:
        username = form.get("username")
        password = form.get("password")
        given = form.get("csrf_token")
        next_url = safe_next(form.get("next"))
    finally:
        await form.close()
    cookie = request.cookies.get(console.cookies.login)
    if not cookie or not auth.same_token(cookie, given):
        return _login_page(console, request, error="The sign-in form expired: please try again.", status=403)
    if not isinstance(username, str) or not isinstance(password, str) or not username.strip() or not password:
        return _login_page(console, request, error="Enter your username and password.", status=400)
    if len(username) > 255 or len(password) > 1024:
        return _login_page(console, request, error="Wrong username or password.", status=400)
    result = await run_in_threadpool(
        auth.password_sign_in, console.store, username, password, client_address(request)
    )
    if result.locked:
        minutes = int(auth.LOCK_WINDOW.total_seconds() // 60)
        return _login_page(
            console,
            request,
            error=f"Too many failed sign-ins for this account or from this address. "
            f"Sign-in is locked for up to {minutes} minutes; try again later.",
            status=429,
            username=username[:100],
        )
    if result.account is None:
        return _login_page(
            console, request, error="Wrong username or password.", status=400, username=username[:100]
        )
    response = RedirectResponse(next_url, status_code=303)
    return await run_in_threadpool(_signed_in, console, request, result.account, response)


def logout(console: Console, request: Request, viewer: auth.Viewer, form: Any) -> Response:
    cookie = request.cookies.get(console.cookies.session)
    if cookie:
        auth.end_session(console.store, cookie)
    console.store.audit(viewer.username, "logout", viewer.username, via="web")
    response = RedirectResponse("/login", status_code=303)
    console.clear_cookie(response, console.cookies.session)
    return response


# ------------------------------------------------------------------ single sign-on


def make_oauth_client(console: Console) -> Any:
    import authlib.deprecate  # type: ignore[import-untyped]  # noqa: F401  (sets its own filter on import)

    with warnings.catch_warnings():
        # Authlib 1.9 announces its move to httpx2 on import; httpx is what this project uses.
        warnings.simplefilter("ignore")
        from authlib.integrations.starlette_client import OAuth  # type: ignore[import-untyped]

    oidc = console.settings.oidc
    assert oidc is not None
    oauth = OAuth()
    oauth.register(
        name="sso",
        server_metadata_url=oidc.discovery_url,
        client_id=oidc.client_id,
        client_secret=oidc.client_secret,
        client_kwargs={"scope": "openid email profile", "code_challenge_method": "S256", "timeout": 10.0},
    )
    return oauth.create_client("sso")


def _callback_url(console: Console, request: Request) -> str:
    if console.settings.base_url:
        return console.settings.base_url + "/login/sso/callback"
    return str(request.url_for("sso_callback"))


async def sso_start(request: Request) -> Response:
    """Send the browser to the identity provider; state, nonce and PKCE verifier stay here."""
    console: Console = request.app.state.console
    client = console.oauth_client
    if client is None:
        return console.error(request, 404, "Single sign-on is not configured.")
    state: dict[str, Any] = {}
    request.scope["session"] = state
    try:
        response: Response = await client.authorize_redirect(request, _callback_url(console, request))
    except (httpx.HTTPError, AuthlibBaseError, ValueError, KeyError, RuntimeError) as exc:
        log.warning("single sign-on: the identity provider could not be reached (%s)", type(exc).__name__)
        return console.error(request, 502, "The identity provider could not be reached; try again later.")
    key = secrets.token_urlsafe(32)
    console.sso_pending.put(auth.digest(key), state)
    console.set_cookie(response, console.cookies.sso, key, lax=True, max_age=600)
    return response


async def sso_callback(request: Request) -> Response:
    """Back from the identity provider: check the token, then find the existing account."""
    console: Console = request.app.state.console
    client = console.oauth_client
    oidc = console.settings.oidc
    if client is None or oidc is None:
        return console.error(request, 404, "Single sign-on is not configured.")
    key = request.cookies.get(console.cookies.sso)
    state = console.sso_pending.pop(auth.digest(key)) if key and len(key) < 100 else None
    if state is None:
        return console.error(
            request,
            400,
            "This sign-in expired or was started in another browser: start again from the sign-in page.",
        )
    request.scope["session"] = state
    client_ip = client_address(request)
    try:
        token = await client.authorize_access_token(request)
    except (AuthlibBaseError, JoseError) as exc:
        # A refused code, a bad signature, a wrong nonce, issuer or audience, an expired token.
        await run_in_threadpool(
            console.store.audit,
            auth.UNKNOWN,
            "login_failed",
            "",
            via="web",
            client=client_ip,
            method="sso",
            error=str(getattr(exc, "error", None) or type(exc).__name__)[:100],
        )
        return console.error(
            request, 403, "Single sign-on did not succeed; start again from the sign-in page."
        )
    except (httpx.HTTPError, ValueError, KeyError, RuntimeError) as exc:
        log.warning("single sign-on: token exchange failed (%s)", type(exc).__name__)
        return console.error(request, 502, "The identity provider could not be reached; try again later.")
    claims = dict(token.get("userinfo") or {})
    try:
        account = await run_in_threadpool(
            auth.account_for_identity, console.store, claims, oidc.allowed_domains
        )
    except auth.SsoRefused as exc:
        email = claims.get("email") if isinstance(claims.get("email"), str) else ""
        await run_in_threadpool(
            console.store.audit,
            auth.UNKNOWN,
            "login_failed",
            "",
            str(exc)[:300],
            via="web",
            client=client_ip,
            method="sso",
            email=str(email)[:320],
        )
        return console.error(request, 403, str(exc)[0].upper() + str(exc)[1:] + ".")
    await run_in_threadpool(
        console.store.audit,
        account.username,
        "login",
        account.username,
        via="web",
        client=client_ip,
        method="sso",
    )
    # A 200 page rather than a redirect: the session cookie is SameSite=Strict, and browsers
    # do not send it on a redirect chain that a cross-site navigation (the provider) started.
    response = console.render(request, "signed_in.html", {"next": "/"})
    response = await run_in_threadpool(_signed_in, console, request, account, response)
    console.clear_cookie(response, console.cookies.sso, lax=True)
    return response
