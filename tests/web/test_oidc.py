"""Single sign-on through OpenID Connect against a small local provider (discovery, JWKS and
token endpoints served by uvicorn on 127.0.0.1, ID tokens signed RS256): the verified
address must belong to an existing, enabled account; SSO never makes one."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import uvicorn
from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from milter.store import Store
from milter.web import auth
from milter.web.app import create_app
from milter.web.settings import OidcSettings
from tests.postfix_harness import free_port
from tests.web.conftest import browser

CLIENT_ID = "console-client"
CLIENT_SECRET = "console-secret"


@dataclass
class Provider:
    base: str
    key: RSAKey
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    token_requests: list[dict[str, str]] = field(default_factory=list)

    def issue(self, authorize_url: str, claims: dict[str, Any], *, nonce: str | None = None) -> str:
        """What the provider does when the person signs in: a code for these claims."""
        query = {k: v[0] for k, v in parse_qs(urlsplit(authorize_url).query).items()}
        code = f"code-{len(self.codes)}"
        self.codes[code] = {"query": query, "claims": claims, "nonce": nonce or query["nonce"]}
        return code


def provider_app(provider: Provider) -> Starlette:
    async def discovery(request: Request) -> JSONResponse:
        b = provider.base
        return JSONResponse(
            {
                "issuer": b,
                "authorization_endpoint": f"{b}/authorize",
                "token_endpoint": f"{b}/token",
                "jwks_uri": f"{b}/jwks",
                "response_types_supported": ["code"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
            }
        )

    async def jwks(request: Request) -> JSONResponse:
        return JSONResponse({"keys": [provider.key.as_dict(private=False)]})

    async def token(request: Request) -> JSONResponse:
        form = {k: str(v) for k, v in (await request.form()).items()}
        provider.token_requests.append(form | {"authorization": request.headers.get("authorization", "")})
        grant = provider.codes.pop(form.get("code", ""), None)
        expected_auth = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if grant is None or request.headers.get("authorization") != expected_auth:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if (
            challenge != grant["query"].get("code_challenge")
            or form.get("redirect_uri") != grant["query"]["redirect_uri"]
        ):
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        now = int(time.time())
        claims = {
            "iss": provider.base,
            "aud": CLIENT_ID,
            "sub": "subject-1",
            "iat": now,
            "exp": now + 300,
            "nonce": grant["nonce"],
            **grant["claims"],
        }
        id_token = jwt.encode({"alg": "RS256", "kid": provider.key.kid}, claims, provider.key)
        return JSONResponse(
            {"access_token": "access", "token_type": "Bearer", "expires_in": 300, "id_token": id_token}
        )

    return Starlette(
        routes=[
            Route("/.well-known/openid-configuration", discovery),
            Route("/jwks", jwks),
            Route("/token", token, methods=["POST"]),
        ]
    )


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    port = free_port()
    found = Provider(f"http://127.0.0.1:{port}", RSAKey.generate_key(2048, parameters={"kid": "test-key"}))
    server = uvicorn.Server(
        uvicorn.Config(provider_app(found), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the fake identity provider did not start"
        time.sleep(0.02)
    yield found
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def sso_app(settings: Any, store: Store, accounts: Any, provider: Provider) -> Any:
    oidc = OidcSettings(
        name="Google",
        discovery_url=f"{provider.base}/.well-known/openid-configuration",
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        allowed_domains=["redborne.example"],
    )
    return create_app(settings.model_copy(update={"oidc": oidc}), store)


def start(client: Any) -> str:
    response = client.get("/login/sso")
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith("http://127.0.0.1:")
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("__Host-console_sso="))
    assert "samesite=lax" in cookie.lower() and "httponly" in cookie.lower() and "secure" in cookie.lower()
    query = parse_qs(urlsplit(location).query)
    assert query["client_id"] == [CLIENT_ID]
    assert query["redirect_uri"] == ["https://testserver/login/sso/callback"]
    assert query["code_challenge_method"] == ["S256"]
    assert "openid" in query["scope"][0] and "email" in query["scope"][0]
    return location


def callback(client: Any, provider: Provider, claims: dict[str, Any], **kwargs: Any) -> Any:
    location = start(client)
    code = provider.issue(location, claims, **kwargs)
    state = parse_qs(urlsplit(location).query)["state"][0]
    # The provider's redirect is a cross-site navigation: no Origin of ours.
    return client.get(
        "/login/sso/callback",
        params={"code": code, "state": state},
        headers={"Origin": "https://idp.example"},
    )


def test_the_login_page_offers_sso(sso_app: Any) -> None:
    page = browser(sso_app).get("/login")
    assert '<a class="btn btn-block" href="/login/sso">Sign in with Google</a>' in page.text


def test_a_verified_address_of_an_existing_account_signs_in(
    sso_app: Any, provider: Provider, store: Store
) -> None:
    client = browser(sso_app)
    response = callback(client, provider, {"email": "Tech@Redborne.example", "email_verified": True})
    assert response.status_code == 200, response.text
    # A page, not a redirect: a SameSite=Strict cookie is not sent on a cross-site redirect chain.
    assert '<meta http-equiv="refresh" content="0;url=/">' in response.text
    cookies = response.headers.get_list("set-cookie")
    assert any(c.startswith("__Host-console_session=") and "samesite=strict" in c.lower() for c in cookies)
    page = client.get("/")
    assert page.status_code == 200 and "IT technician" in page.text
    entry = store.audit_entries(action="login")[0]
    assert (entry.actor, entry.details["method"]) == ("tech", "sso")
    assert provider.token_requests[-1]["grant_type"] == "authorization_code"


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        (
            {"email": "nobody@redborne.example", "email_verified": True},
            "no console account for nobody@redborne.example",
        ),
        (
            {"email": "tech@redborne.example", "email_verified": False},
            "has not verified tech@redborne.example",
        ),
        ({"email": "tech@redborne.example"}, "has not verified"),
        ({"email": "tech@redborne.example.evil.example", "email_verified": True}, "is not a domain allowed"),
        ({"email_verified": True}, "did not give a mail address"),
    ],
)
def test_sso_never_makes_an_account(
    sso_app: Any, provider: Provider, store: Store, claims: dict[str, Any], message: str
) -> None:
    client = browser(sso_app)
    before = len(auth.accounts(store))
    response = callback(client, provider, claims)
    assert response.status_code == 403
    assert message in response.text
    assert not any(c.startswith("__Host-console_session=") for c in response.headers.get_list("set-cookie"))
    assert client.get("/").status_code == 303
    assert len(auth.accounts(store)) == before
    entry = store.audit_entries(action="login_failed")[0]
    assert entry.details["method"] == "sso"


def test_microsoft_domain_verified_claim_counts(sso_app: Any, provider: Provider) -> None:
    response = callback(browser(sso_app), provider, {"email": "dsl@redborne.example", "xms_edov": True})
    assert response.status_code == 200


def test_a_disabled_account_does_not_sign_in(sso_app: Any, provider: Provider, store: Store) -> None:
    auth.disable_account(store, "tech")
    response = callback(
        browser(sso_app), provider, {"email": "tech@redborne.example", "email_verified": True}
    )
    assert response.status_code == 403


def test_a_token_for_another_sign_in_is_refused(sso_app: Any, provider: Provider) -> None:
    client = browser(sso_app)
    response = callback(
        client, provider, {"email": "tech@redborne.example", "email_verified": True}, nonce="replayed"
    )
    assert response.status_code == 403
    assert client.get("/").status_code == 303


def test_a_callback_without_its_browser_state_is_refused(sso_app: Any, provider: Provider) -> None:
    attacker = browser(sso_app)
    location = start(attacker)
    code = provider.issue(location, {"email": "tech@redborne.example", "email_verified": True})
    state = parse_qs(urlsplit(location).query)["state"][0]
    victim = browser(sso_app)  # login CSRF: the attacker's code in the victim's browser
    response = victim.get("/login/sso/callback", params={"code": code, "state": state})
    assert response.status_code == 400
    assert "expired or was started in another browser" in response.text
    # A wrong state in the right browser is refused too, and the attempt cannot be retried.
    response = attacker.get("/login/sso/callback", params={"code": code, "state": "forged"})
    assert response.status_code == 403
    assert attacker.get("/login/sso/callback", params={"code": code, "state": state}).status_code == 400


def test_an_unreachable_provider_is_a_clear_error(settings: Any, store: Store, accounts: Any) -> None:
    oidc = OidcSettings(
        discovery_url=f"http://127.0.0.1:{free_port()}/.well-known/openid-configuration",
        client_id="a",
        client_secret="b",
        allowed_domains=["redborne.example"],
    )
    app = create_app(settings.model_copy(update={"oidc": oidc}), store)
    response = browser(app).get("/login/sso")
    assert response.status_code == 502
    assert "could not be reached" in response.text


def test_without_oidc_there_are_no_sso_routes(app: Any) -> None:
    assert browser(app).get("/login/sso").status_code == 404
    assert "/login/sso" not in browser(app).get("/login").text
