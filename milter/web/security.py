"""Security headers on every response, the same-origin check for changes, and cookie names.

The console shows hostile mail to people with privileges, so the page itself must not be
a way in: a strict Content-Security-Policy (no inline script or style at all), no framing,
no referrers leaving the console, and nothing that shows mail kept in a cache.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from milter.web.settings import WebSettings

PAGE_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "frame-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
)
# The sanitised HTML of a message, shown only inside <iframe sandbox> on a console page.
MAIL_HTML_CSP = (
    "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'"
)
# A downloaded attachment must never run as a page of the console's origin.
DOWNLOAD_CSP = "sandbox; default-src 'none'"

BASE_HEADERS = (
    (b"content-security-policy", PAGE_CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=(), usb=()"),
)


class SecurityHeaders:
    """Adds the console's headers to every response that has not set its own."""

    def __init__(self, app: ASGIApp, *, hsts: bool) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope.get("path", "").startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in BASE_HEADERS:
                    if name not in present:
                        headers.append((name, value))
                if b"cache-control" not in present:
                    # Every page can show mail or who did what: none of it may stay in a cache.
                    headers.append((b"cache-control", b"max-age=3600" if static else b"no-store"))
                if self.hsts:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def expected_origin(request: Request, settings: WebSettings) -> str:
    if settings.origin:
        return settings.origin
    return f"{request.url.scheme}://{request.url.netloc}".lower()


def _origin_of(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def same_origin(request: Request, settings: WebSettings) -> bool:
    """Whether a POST comes from the console's own pages.

    Origin first. With Referrer-Policy no-referrer, browsers send `Origin: null` on a
    same-origin form post, so then Fetch Metadata decides (Sec-Fetch-Site, which the
    referrer policy does not touch), then Referer. No evidence at all is a refusal.
    """
    expected = expected_origin(request, settings)
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        return origin.strip().lower() == expected
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    referer = request.headers.get("referer")
    if referer:
        return _origin_of(referer) == expected
    return False


class CookieNames:
    """__Host- names when Secure: such a cookie cannot be planted by another host or over http."""

    def __init__(self, secure: bool) -> None:
        prefix = "__Host-" if secure else ""
        self.session = f"{prefix}console_session"
        self.login = f"{prefix}console_login"
        self.flash = f"{prefix}console_flash"
        # Sent back by the identity provider's redirect (a cross-site navigation), so SameSite=Lax.
        self.sso = f"{prefix}console_sso"
