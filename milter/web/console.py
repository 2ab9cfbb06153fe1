"""What every console route shares: the signed-in viewer, role checks, CSRF, pages and flashes.

Routes are declared through `page` (GET) and `action` (POST). `action` checks, in this
order and before the handler runs: a signed-in session, a same-origin request, the
session's CSRF token in the form, and the role. A POST route cannot skip these checks.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from milter.store.store import ID_PATTERN, NotFound, Refused, Store, StoreError
from milter.web import auth, display
from milter.web.auth import Viewer
from milter.web.security import CookieNames, same_origin
from milter.web.settings import WebSettings

log = logging.getLogger("milter.web")
HERE = Path(__file__).resolve().parent

# Who may do what (the README's table says the same in words).
VIEW_ROLES = ("technician", "dsl", "slt")  # the quarantine list and message records
OPEN_ROLES = ("technician", "dsl")  # message bodies, attachments, actions on messages
LIST_ROLES = ("technician",)  # block/allow lists and proposals
AUTHORITY_ROLES = ("slt",)  # authority to open mail marked personal (2.7)
AUDIT_ROLES = ("technician", "dsl", "slt", "auditor")  # dsl and slt: their own entries only
DASHBOARD_ROLES = ("technician", "slt")  # the DSL is sent to its queue, the auditor to the log
ALL_ROLES = auth.ROLES
# The DSL's queue: safeguarding concerns only.
DSL_CATEGORIES = ("safeguarding_concern",)

PageHandler = Callable[["Console", Request, Viewer], Response]
ActionHandler = Callable[["Console", Request, Viewer, FormData], Response]
Endpoint = Callable[[Request], Awaitable[Response]]


MAX_FORM_BYTES = 2 * 1024 * 1024


def too_large(request: Request, limit: int = MAX_FORM_BYTES) -> bool:
    length = request.headers.get("content-length", "")
    return length.isdigit() and int(length) > limit


class HttpError(Exception):
    """Ends a request with an error page: a status and one plain sentence."""

    def __init__(self, status: int, sentence: str) -> None:
        super().__init__(sentence)
        self.status = status
        self.sentence = sentence


class Pending:
    """Single sign-on attempts in flight, kept in memory for ten minutes (one console process)."""

    def __init__(self, ttl: float = 600.0, limit: int = 10_000) -> None:
        self._items: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.ttl = ttl
        self.limit = limit

    def put(self, key: str, data: dict[str, Any]) -> None:
        now = time.monotonic()
        with self._lock:
            for k in [k for k, (t, _) in self._items.items() if t < now]:
                del self._items[k]
            while len(self._items) >= self.limit:
                del self._items[next(iter(self._items))]
            self._items[key] = (now + self.ttl, data)

    def pop(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._items.pop(key, None)
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]


def _when(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M") if value else "–"


class Console:
    def __init__(self, settings: WebSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.cookies = CookieNames(settings.secure_cookies)
        self.idle = dt.timedelta(minutes=settings.session_idle_minutes)
        self.maximum = dt.timedelta(hours=settings.session_max_hours)
        self.sso_pending = Pending()
        self.oauth_client: Any = None
        env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(("html", "svg"), default_for_string=True, default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters["when"] = _when
        env.filters["size"] = display.human_size
        env.filters["breakable"] = display.breakable
        env.globals["role_names"] = auth.ROLE_NAMES
        env.tests["message_id"] = lambda value: bool(ID_PATTERN.match(str(value)))
        self.templates = Jinja2Templates(env=env)

    # ------------------------------------------------------------------ viewer

    def viewer(self, request: Request) -> Viewer | None:
        cached = request.scope.get("console.viewer", False)
        if cached is not False:
            return cached  # type: ignore[no-any-return]
        found = auth.session_viewer(
            self.store, request.cookies.get(self.cookies.session), self.idle, self.maximum
        )
        request.scope["console.viewer"] = found
        return found

    def set_cookie(
        self, response: Response, name: str, value: str, *, lax: bool = False, max_age: int | None = None
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            secure=self.settings.secure_cookies,
            httponly=True,
            samesite="lax" if lax else "strict",
        )

    def clear_cookie(self, response: Response, name: str, *, lax: bool = False) -> None:
        response.delete_cookie(
            name,
            path="/",
            secure=self.settings.secure_cookies,
            httponly=True,
            samesite="lax" if lax else "strict",
        )

    # ------------------------------------------------------------------- pages

    def render(
        self,
        request: Request,
        template: str,
        context: dict[str, Any] | None = None,
        *,
        viewer: Viewer | None = None,
        status: int = 200,
    ) -> Response:
        data = dict(context or {})
        data.setdefault("viewer", viewer)
        data.setdefault("sso_name", self.settings.oidc.name if self.settings.oidc else None)
        flash = self.take_flash(request)
        if flash and "flash" not in data:
            data["flash"] = flash
        response = self.templates.TemplateResponse(request, template, data, status_code=status)
        if flash:
            self.clear_cookie(response, self.cookies.flash)
        return response

    def error(self, request: Request, status: int, sentence: str, viewer: Viewer | None = None) -> Response:
        return self.render(
            request, "error.html", {"status": status, "sentence": sentence}, viewer=viewer, status=status
        )

    def redirect(self, url: str, flash: tuple[str, str] | None = None) -> Response:
        response = RedirectResponse(url, status_code=303)
        if flash:
            kind, text = flash
            payload = json.dumps({"kind": kind, "text": text[:600]}).encode()
            self.set_cookie(
                response, self.cookies.flash, base64.urlsafe_b64encode(payload).decode(), max_age=120
            )
        return response

    def take_flash(self, request: Request) -> dict[str, str] | None:
        raw = request.cookies.get(self.cookies.flash)
        if not raw:
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(raw.encode()))
            kind, text = str(data["kind"]), str(data["text"])
        except (ValueError, KeyError, TypeError):
            return None
        return {"kind": "error" if kind == "error" else "ok", "text": text[:600]}

    # ------------------------------------------------------------------- routes

    def page(self, roles: tuple[str, ...], handler: PageHandler) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            viewer = await run_in_threadpool(self.viewer, request)
            if viewer is None:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
            if viewer.role not in roles:
                return self.error(request, 403, "Your role does not give access to this page.", viewer)
            return await run_in_threadpool(self._run, handler, request, viewer, None)

        endpoint.__name__ = handler.__name__
        endpoint.__doc__ = handler.__doc__
        endpoint.roles = roles  # type: ignore[attr-defined]
        return endpoint

    def action(self, roles: tuple[str, ...], handler: ActionHandler) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            viewer = await run_in_threadpool(self.viewer, request)
            if viewer is None:
                return self.error(request, 403, "Sign in first: this change needs a signed-in session.")
            if not same_origin(request, self.settings):
                return self.error(
                    request,
                    403,
                    "This request did not come from the console's own pages and was refused.",
                    viewer,
                )
            if too_large(request):
                return self.error(request, 413, "The form is too large.", viewer)
            try:
                form = await request.form(max_files=0, max_fields=5000, max_part_size=1024 * 1024)
            except Exception:
                return self.error(request, 400, "The form could not be read.", viewer)
            try:
                if not auth.same_token(viewer.csrf_token, form.get("csrf_token")):
                    return self.error(
                        request,
                        403,
                        "The form is out of date or did not come from this console: "
                        "reload the page and try again.",
                        viewer,
                    )
                if viewer.role not in roles:
                    return self.error(request, 403, "Your role does not allow this action.", viewer)
                return await run_in_threadpool(self._run, handler, request, viewer, form)
            finally:
                await form.close()

        endpoint.__name__ = handler.__name__
        endpoint.__doc__ = handler.__doc__
        endpoint.roles = roles  # type: ignore[attr-defined]
        return endpoint

    def _run(
        self, handler: Callable[..., Response], request: Request, viewer: Viewer, form: FormData | None
    ) -> Response:
        try:
            if form is None:
                return handler(self, request, viewer)
            return handler(self, request, viewer, form)
        except HttpError as exc:
            return self.error(request, exc.status, exc.sentence, viewer)
        except NotFound:
            return self.error(request, 404, "There is no such message or entry.", viewer)
        except Refused as exc:
            return self.error(request, 409, str(exc), viewer)
        except StoreError as exc:
            log.warning("store error on %s: %s", request.url.path, type(exc).__name__)
            return self.error(request, 500, "The quarantine store could not do this; try again.", viewer)
