"""Console accounts, passwords, server-side sessions, sign-in limits and the SSO account match.

Accounts are made from the command line only (`school-milter web-user`); neither the
console nor single sign-on ever creates one or changes a role. Sessions live in the
database: the browser holds a random value, the table holds only its sha256.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, func, select

from milter.store.models import LoginFailure, WebSession, WebUser, utcnow
from milter.store.store import Store, StoreError

ROLES = ("technician", "dsl", "slt", "auditor")
ROLE_NAMES = {
    "technician": "IT technician",
    "dsl": "Designated safeguarding lead",
    "slt": "SLT / Principal",
    "auditor": "Auditor",
}
USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
MIN_PASSWORD = 12
# The actor of a failed sign-in to a name that is no account (see password_sign_in).
UNKNOWN = "(unknown account)"

# Sign-in limits: this many failures within LOCK_WINDOW lock further attempts.
MAX_FAILURES_PER_USER = 5
MAX_FAILURES_PER_CLIENT = 20
LOCK_WINDOW = dt.timedelta(minutes=15)

# argon2id with the library's current defaults (RFC 9106 low-memory profile).
_hasher = PasswordHasher()
_dummy: dict[int, str] = {}


def _dummy_hash() -> str:
    """Verified against for unknown usernames, with the same costs as real hashes, so the
    time a sign-in takes does not tell which accounts exist."""
    key = id(_hasher)
    if key not in _dummy:
        _dummy[key] = _hasher.hash(secrets.token_urlsafe(16))
    return _dummy[key]


class AccountError(StoreError):
    """A console account cannot be made or changed as asked; the text says why."""


@dataclass(frozen=True)
class Account:
    id: int
    username: str
    email: str
    role: str
    disabled: bool
    has_password: bool
    created_at: dt.datetime
    last_login: dt.datetime | None


@dataclass(frozen=True)
class Viewer:
    """The signed-in person behind a request."""

    user_id: int
    username: str
    role: str
    email: str
    session_id: str  # sha256 of the cookie value
    csrf_token: str
    session_started: dt.datetime

    @property
    def role_name(self) -> str:
        return ROLE_NAMES.get(self.role, self.role)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def _account(row: WebUser) -> Account:
    created = _aware(row.created_at)
    assert created is not None
    return Account(
        row.id,
        row.username,
        row.email,
        row.role,
        row.disabled,
        bool(row.password_hash),
        created,
        _aware(row.last_login),
    )


def digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()


def check_username(username: str) -> str:
    name = username.strip().lower()
    if not USERNAME.match(name):
        raise AccountError(
            f"{username!r} is not a valid username (letters, digits, . _ @ -, up to 64 characters)"
        )
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password must have at least {MIN_PASSWORD} characters")
    if password.strip() != password or "\n" in password:
        raise AccountError("the password must not start or end with spaces or contain line breaks")
    return password


def hash_password(password: str) -> str:
    return _hasher.hash(check_password(password))


# ------------------------------------------------------------------------ accounts


def create_account(
    store: Store, username: str, role: str, password: str | None, email: str = "", *, actor: str = "cli"
) -> Account:
    """A new account; password None makes an account that signs in only through SSO."""
    name = check_username(username)
    if role not in ROLES:
        raise AccountError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    email = email.strip().lower()
    if email and ("@" not in email or any(c.isspace() for c in email)):
        raise AccountError(f"{email!r} is not a mail address")
    if password is None and not email:
        raise AccountError("an account without a password needs --email (it signs in through SSO only)")
    hashed = hash_password(password) if password is not None else ""
    with store.session() as session:
        if session.scalar(select(WebUser.id).where(WebUser.username == name)) is not None:
            raise AccountError(f"an account {name!r} already exists")
        row = WebUser(username=name, role=role, email=email, password_hash=hashed, disabled=False)
        session.add(row)
        session.flush()
        account = _account(row)
    store.audit(actor, "web_user_add", name, "", role=role, email=email, sso_only=password is None)
    return account


def set_password(store: Store, username: str, password: str, *, actor: str = "cli") -> None:
    """A new password; every session of the account ends."""
    name = check_username(username)
    hashed = hash_password(password)
    with store.session() as session:
        row = session.scalar(select(WebUser).where(WebUser.username == name))
        if row is None:
            raise AccountError(f"no account {name!r}")
        row.password_hash = hashed
        session.execute(delete(WebSession).where(WebSession.user_id == row.id))
    store.audit(actor, "web_user_passwd", name)


def disable_account(store: Store, username: str, *, actor: str = "cli") -> None:
    """The account can no longer sign in; its sessions end at once."""
    name = check_username(username)
    with store.session() as session:
        row = session.scalar(select(WebUser).where(WebUser.username == name))
        if row is None:
            raise AccountError(f"no account {name!r}")
        row.disabled = True
        session.execute(delete(WebSession).where(WebSession.user_id == row.id))
    store.audit(actor, "web_user_disable", name)


def accounts(store: Store) -> list[Account]:
    with store.session() as session:
        return [_account(r) for r in session.scalars(select(WebUser).order_by(WebUser.username))]


def usernames_with_role(store: Store, *roles: str) -> list[str]:
    with store.session() as session:
        return list(
            session.scalars(
                select(WebUser.username)
                .where(WebUser.role.in_(roles), WebUser.disabled.is_(False))
                .order_by(WebUser.username)
            )
        )


# ------------------------------------------------------------------ sign-in limits


@dataclass(frozen=True)
class SignIn:
    """The outcome of a password sign-in: an account, or why not."""

    account: Account | None
    locked: bool = False


def is_locked(store: Store, username: str, client: str, now: dt.datetime | None = None) -> bool:
    since = (now or utcnow()) - LOCK_WINDOW
    with store.session() as session:
        by_user = session.scalar(
            select(func.count())
            .select_from(LoginFailure)
            .where(LoginFailure.username == username, LoginFailure.at >= since)
        )
        by_client = session.scalar(
            select(func.count())
            .select_from(LoginFailure)
            .where(LoginFailure.client == client, LoginFailure.at >= since)
        )
    return int(by_user or 0) >= MAX_FAILURES_PER_USER or int(by_client or 0) >= MAX_FAILURES_PER_CLIENT


def password_sign_in(store: Store, username: str, password: str, client: str) -> SignIn:
    """Check a password sign-in against the limits; failures and successes are audited."""
    name = username.strip().lower()[:255]
    client = client[:64]
    if is_locked(store, name, client):
        known = _exists(store, name)
        store.audit(
            name if known else UNKNOWN, "login_locked", name if known else "", via="web", client=client
        )
        return SignIn(None, locked=True)
    with store.session() as session:
        row = session.scalar(select(WebUser).where(WebUser.username == name))
        stored = row.password_hash if row is not None and row.password_hash else _dummy_hash()
        ok = False
        try:
            ok = _hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        if row is None or not row.password_hash or row.disabled or not ok:
            session.add(LoginFailure(username=name, client=client))
            account = None
        else:
            if _hasher.check_needs_rehash(row.password_hash):
                row.password_hash = _hasher.hash(password)
            row.last_login = utcnow()
            session.execute(delete(LoginFailure).where(LoginFailure.username == name))
            account = _account(row)
    if account is None:
        # A mistyped username can be a password typed in the wrong box: only a real account's
        # name is written to the audit log.
        store.audit(
            name if row is not None else UNKNOWN,
            "login_failed",
            name if row is not None else "",
            via="web",
            client=client,
            method="password",
            disabled=bool(row is not None and row.disabled),
        )
    else:
        store.audit(account.username, "login", account.username, via="web", client=client, method="password")
    return SignIn(account)


def _exists(store: Store, name: str) -> bool:
    with store.session() as session:
        return session.scalar(select(WebUser.id).where(WebUser.username == name)) is not None


# ---------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class NewSession:
    cookie_value: str
    viewer: Viewer


def start_session(store: Store, account: Account, previous_cookie: str | None = None) -> NewSession:
    """A fresh session id at every sign-in; the session the browser had before is discarded."""
    value = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = utcnow()
    with store.session() as session:
        if previous_cookie:
            session.execute(delete(WebSession).where(WebSession.id == digest(previous_cookie)))
        session.add(
            WebSession(id=digest(value), user_id=account.id, csrf_token=csrf, created_at=now, last_seen=now)
        )
    viewer = Viewer(account.id, account.username, account.role, account.email, digest(value), csrf, now)
    return NewSession(value, viewer)


def end_session(store: Store, cookie_value: str) -> None:
    with store.session() as session:
        session.execute(delete(WebSession).where(WebSession.id == digest(cookie_value)))


def session_viewer(
    store: Store,
    cookie_value: str | None,
    idle: dt.timedelta,
    maximum: dt.timedelta,
    now: dt.datetime | None = None,
) -> Viewer | None:
    """The signed-in account for this cookie, or None (expired sessions are deleted)."""
    if not cookie_value or len(cookie_value) > 200:
        return None
    now = now or utcnow()
    sid = digest(cookie_value)
    with store.session() as session:
        found = session.execute(
            select(WebSession, WebUser)
            .join(WebUser, WebUser.id == WebSession.user_id)
            .where(WebSession.id == sid)
        ).first()
        if found is None:
            return None
        row, user = found
        created = _aware(row.created_at)
        seen = _aware(row.last_seen)
        assert created is not None and seen is not None
        if user.disabled or now - seen > idle or now - created > maximum:
            session.delete(row)
            return None
        # Written at most once a minute: every page view need not be a database write.
        if now - seen > dt.timedelta(seconds=60):
            row.last_seen = now
        return Viewer(user.id, user.username, user.role, user.email, sid, row.csrf_token, created)


def purge_sessions(store: Store, idle: dt.timedelta, maximum: dt.timedelta) -> None:
    """Drop sessions nobody can use any more, and failures older than the lock window."""
    now = utcnow()
    with store.session() as session:
        session.execute(
            delete(WebSession).where(
                (WebSession.last_seen < now - idle) | (WebSession.created_at < now - maximum)
            )
        )
        session.execute(delete(LoginFailure).where(LoginFailure.at < now - LOCK_WINDOW))


def same_token(expected: str, given: object) -> bool:
    return isinstance(given, str) and bool(given) and hmac.compare_digest(expected.encode(), given.encode())


# ------------------------------------------------------------------ single sign-on


class SsoRefused(Exception):
    """An identity the provider vouched for that does not open the console; the text says why."""


def _verified(claims: Mapping[str, Any]) -> bool:
    value = claims.get("email_verified")
    if value is True or (isinstance(value, str) and value.lower() == "true"):
        return True
    # Microsoft Entra ID: the optional claim xms_edov says the domain owner verified the address.
    edov = claims.get("xms_edov")
    return edov is True or (isinstance(edov, str) and edov.lower() in ("true", "1"))


def account_for_identity(store: Store, claims: Mapping[str, Any], allowed_domains: list[str]) -> Account:
    """The existing, enabled account whose email is the identity's verified address.

    SSO never makes an account or a role: an identity without a matching account is refused.
    """
    email = claims.get("email")
    if not isinstance(email, str) or "@" not in email:
        raise SsoRefused("the identity provider did not give a mail address")
    email = email.strip().lower()
    if not _verified(claims):
        raise SsoRefused(f"the identity provider has not verified {email}")
    domain = email.rpartition("@")[2]
    if domain not in [d.lower() for d in allowed_domains]:
        raise SsoRefused(f"{domain} is not a domain allowed to sign in here")
    with store.session() as session:
        rows = list(session.scalars(select(WebUser).where(func.lower(WebUser.email) == email)))
        enabled = [r for r in rows if not r.disabled]
        if not enabled:
            raise SsoRefused(f"there is no console account for {email}; ask an administrator")
        if len(enabled) > 1:
            raise SsoRefused(f"more than one console account has the address {email}; ask an administrator")
        row = enabled[0]
        row.last_login = utcnow()
        return _account(row)
