"""`school-milter web` (serve the console) and `school-milter web-user` (console accounts).

Accounts are made here only: the console and single sign-on never create one. Errors a
user can make end in one clear line: status 2 for configuration, 3 for the store.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from milter.errors import RulesError
from milter.store.store import StoreError

ROLE_CHOICES = ("technician", "dsl", "slt", "auditor")


def _actor() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def _settings(args: argparse.Namespace) -> Any:
    from milter.web.settings import load_web_settings

    overrides: dict[str, Any] = {"database": getattr(args, "database", None)}
    if getattr(args, "listen", None):
        overrides["listen"] = args.listen
    if getattr(args, "insecure_http_loopback", False):
        overrides["secure_cookies"] = False
    return load_web_settings(getattr(args, "config", None), overrides)


@contextlib.contextmanager
def _store(args: argparse.Namespace) -> Iterator[Any]:
    """The store for one command, closed when it ends (with SQLite, the last connection to
    close checkpoints the write-ahead log into the database file)."""
    from milter.store.store import Store

    store = Store(_settings(args).database)
    try:
        yield store
    finally:
        store.close()


def _read_password(args: argparse.Namespace) -> str:
    if getattr(args, "password_stdin", False):
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    first = getpass.getpass("New password: ")
    second = getpass.getpass("Repeat it: ")
    if first != second:
        raise StoreError("the two passwords differ; nothing was changed")
    return first


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from milter.config import host_port
    from milter.web.app import create_app

    settings = _settings(args)
    host, port = host_port(settings.listen)
    app = create_app(settings)
    scheme = "http" if not settings.secure_cookies else "https (behind your TLS proxy)"
    print(f"school-milter web: console on {host}:{port}, {scheme}", file=sys.stderr)
    # No access log: query strings (searches) can name people; the audit log records actions.
    uvicorn.run(
        app,
        host=host,
        port=port,
        access_log=False,
        server_header=False,
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
        log_level="info",
    )
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    from milter.web.auth import create_account

    with _store(args) as store:
        password = None if args.sso_only else _read_password(args)
        account = create_account(store, args.username, args.role, password, args.email or "", actor=_actor())
    how = "single sign-on only" if password is None else "password"
    print(f"account {account.username} ({account.role}) created; signs in with {how}")
    return 0


def cmd_user_passwd(args: argparse.Namespace) -> int:
    from milter.web.auth import set_password

    with _store(args) as store:
        set_password(store, args.username, _read_password(args), actor=_actor())
    print(f"password of {args.username} changed; its sessions ended")
    return 0


def cmd_user_disable(args: argparse.Namespace) -> int:
    from milter.web.auth import disable_account

    with _store(args) as store:
        disable_account(store, args.username, actor=_actor())
    print(f"account {args.username} disabled; its sessions ended")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    from milter.web.auth import accounts

    with _store(args) as store:
        rows = accounts(store)
    if not rows:
        print("no console accounts (add one: school-milter web-user add NAME --role technician)")
        return 0
    print(f"{'USERNAME':<24} {'ROLE':<11} {'STATE':<9} {'SIGN-IN':<9} {'LAST LOGIN (UTC)':<17} EMAIL")
    for a in rows:
        state = "disabled" if a.disabled else "enabled"
        how = "password" if a.has_password else "sso only"
        last = a.last_login.strftime("%Y-%m-%d %H:%M") if a.last_login else "-"
        print(f"{a.username:<24} {a.role:<11} {state:<9} {how:<9} {last:<17} {a.email or '-'}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="the TOML config ([web], with [gateway] filling gaps)")
    p.add_argument("--database", help="SQLAlchemy URL of the quarantine store (overrides the config)")


def add_commands(sub: Any) -> None:
    p = sub.add_parser("web", help="serve the technicians' web console")
    _common(p)
    p.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:8080)")
    p.add_argument(
        "--insecure-http-loopback",
        action="store_true",
        help="plain http on 127.0.0.1 (cookies without Secure); only on a loopback address",
    )
    p.set_defaults(func=run, web_func=cmd_serve)

    u = sub.add_parser("web-user", help="console accounts: add, passwd, disable, list")
    us = u.add_subparsers(dest="web_user_command", required=True)

    p = us.add_parser("add", help="make an account (the only way accounts are made)")
    _common(p)
    p.add_argument("username")
    p.add_argument("--role", required=True, choices=ROLE_CHOICES)
    p.add_argument("--email", help="the address single sign-on vouches for")
    p.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    p.add_argument("--sso-only", action="store_true", help="no password: signs in through SSO only")
    p.set_defaults(func=run, web_func=cmd_user_add)

    p = us.add_parser("passwd", help="set a new password (ends the account's sessions)")
    _common(p)
    p.add_argument("username")
    p.add_argument("--password-stdin", action="store_true")
    p.set_defaults(func=run, web_func=cmd_user_passwd)

    p = us.add_parser("disable", help="stop an account signing in (ends its sessions)")
    _common(p)
    p.add_argument("username")
    p.set_defaults(func=run, web_func=cmd_user_disable)

    p = us.add_parser("list", help="every console account")
    _common(p)
    p.set_defaults(func=run, web_func=cmd_user_list)


def run(args: argparse.Namespace) -> int:
    """Run a web command; errors a user can make end in one clear line."""
    try:
        result: int = args.web_func(args)
        return result
    except RulesError as exc:
        for problem in exc.problems:
            print(f"school-milter: {problem}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"school-milter: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"school-milter: {exc.strerror or exc}", file=sys.stderr)
        return 3
