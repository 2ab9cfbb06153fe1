"""The technicians' web console (issue 6): a Starlette app with server-side Jinja2 templates.

    create_app(settings, store) -> Starlette

Routes (GET unless POST is said); every one but /login*, /static needs a session:

    /login (GET, POST)   /login/sso  /login/sso/callback (when OIDC is configured)
    /logout (POST)       /  (dashboard)
    /quarantine          /quarantine/bulk (POST)       /quarantine/{id}
    /quarantine/{id}/open (POST)       /quarantine/{id}/html
    /quarantine/{id}/release|delete|block|false-positive|authority (POST)
    /quarantine/{id}/attachments/{n}   /quarantine/{id}/attachments/{n}/download (POST)
    /lists               /lists/{entry_id}/approve|refuse|remove (POST)
    /audit               /audit.csv    /static/...
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from milter.store.store import Store
from milter.web import auth, login, views
from milter.web.console import (
    ALL_ROLES,
    AUDIT_ROLES,
    AUTHORITY_ROLES,
    HERE,
    LIST_ROLES,
    OPEN_ROLES,
    VIEW_ROLES,
    Console,
)
from milter.web.security import SecurityHeaders
from milter.web.settings import WebSettings


def routes(console: Console) -> list[BaseRoute]:
    page, action = console.page, console.action
    table: list[BaseRoute] = [
        Route("/login", login.login_form, methods=["GET"], name="login"),
        Route("/login", login.login_submit, methods=["POST"], name="login_submit"),
    ]
    if console.settings.oidc is not None:
        table += [
            Route("/login/sso", login.sso_start, methods=["GET"], name="sso_start"),
            Route("/login/sso/callback", login.sso_callback, methods=["GET"], name="sso_callback"),
        ]
    q = "/quarantine/{id}"
    table += [
        Route("/logout", action(ALL_ROLES, login.logout), methods=["POST"], name="logout"),
        Route("/", page(ALL_ROLES, views.dashboard), methods=["GET"], name="dashboard"),
        Route("/quarantine", page(VIEW_ROLES, views.quarantine), methods=["GET"], name="quarantine"),
        Route("/quarantine/bulk", action(OPEN_ROLES, views.bulk), methods=["POST"], name="bulk"),
        Route(q, page(VIEW_ROLES, views.message), methods=["GET"], name="message"),
        Route(f"{q}/open", action(OPEN_ROLES, views.open_message), methods=["POST"], name="open"),
        Route(f"{q}/html", page(OPEN_ROLES, views.message_html), methods=["GET"], name="message_html"),
        Route(f"{q}/release", action(OPEN_ROLES, views.release_message), methods=["POST"], name="release"),
        Route(f"{q}/delete", action(OPEN_ROLES, views.delete_message), methods=["POST"], name="delete"),
        Route(f"{q}/block", action(OPEN_ROLES, views.block), methods=["POST"], name="block"),
        Route(
            f"{q}/false-positive",
            action(OPEN_ROLES, views.false_positive),
            methods=["POST"],
            name="false_positive",
        ),
        Route(
            f"{q}/authority",
            action(AUTHORITY_ROLES, views.record_authority),
            methods=["POST"],
            name="authority",
        ),
        Route(
            f"{q}/attachments/{{n}}", page(OPEN_ROLES, views.attachment), methods=["GET"], name="attachment"
        ),
        Route(
            f"{q}/attachments/{{n}}/download",
            action(OPEN_ROLES, views.download_attachment),
            methods=["POST"],
            name="download",
        ),
        Route("/lists", page(LIST_ROLES, views.lists), methods=["GET"], name="lists"),
        Route(
            "/lists/{entry_id}/approve",
            action(LIST_ROLES, views.approve_entry),
            methods=["POST"],
            name="approve",
        ),
        Route(
            "/lists/{entry_id}/refuse",
            action(LIST_ROLES, views.refuse_entry),
            methods=["POST"],
            name="refuse",
        ),
        Route(
            "/lists/{entry_id}/remove",
            action(LIST_ROLES, views.remove_entry),
            methods=["POST"],
            name="remove",
        ),
        Route("/audit", page(AUDIT_ROLES, views.audit), methods=["GET"], name="audit"),
        Route("/audit.csv", page(AUDIT_ROLES, views.audit_csv), methods=["GET"], name="audit_csv"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return table


def create_app(settings: WebSettings, store: Store | None = None) -> Starlette:
    """The console over this store (opened from settings.database when not given)."""
    store = store if store is not None else Store(settings.database)
    console = Console(settings, store)
    if settings.oidc is not None:
        console.oauth_client = login.make_oauth_client(console)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        sentences = {
            404: "There is no such page.",
            405: "This page does not take that kind of request.",
        }
        sentence = sentences.get(exc.status_code, "The request could not be handled.")
        viewer = await run_in_threadpool(console.viewer, request)
        return console.error(request, exc.status_code, sentence, viewer)

    async def server_error(request: Request, exc: Exception) -> Response:
        # Never the exception text: it can carry message content.
        from milter.web.console import log

        log.error("console error on %s: %s", request.url.path, type(exc).__name__)
        return console.error(request, 500, "Something went wrong on the console; the error was logged.")

    app = Starlette(
        routes=routes(console),
        middleware=[Middleware(SecurityHeaders, hsts=settings.secure_cookies)],
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    app.state.console = console
    app.state.store = store
    auth.purge_sessions(store, console.idle, console.maximum)
    return app
