"""The quarantine store's tables (SQLAlchemy 2 declarative). Alembic migrations create them.

Bodies live in the database, not in a spool beside it: several daemons on several hosts
share one PostgreSQL store, and a body on one host's disk could not be released from
another; one transaction also stores body and verdict together, so no file is ever
orphaned or missing, and a purge is one DELETE.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import JSON, Boolean, Date, DateTime, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class HeldMessage(Base):
    """A message the gateway kept instead of delivering: quarantine or report."""

    __tablename__ = "held_message"

    # The verdict's reference id (RB-XXXX-XXXX): what the sender and the alerts quote.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # quarantine (held by the policy) or report (forwarded to the report address, 5.7).
    kind: Mapped[str] = mapped_column(String(16), default="quarantine")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    status: Mapped[str] = mapped_column(String(16), default="held", index=True)
    status_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    status_by: Mapped[str | None] = mapped_column(String(255))
    direction: Mapped[str] = mapped_column(String(16), index=True)
    sender_role: Mapped[str] = mapped_column(String(16))
    # Envelope sender (lower case), header From, envelope recipients.
    sender: Mapped[str] = mapped_column(String(320), index=True)
    header_from: Mapped[str] = mapped_column(String(320), default="")
    recipients: Mapped[list[Any]] = mapped_column(JSON)
    # Space-separated, lower case, surrounded by spaces: " a@x b@y ", for LIKE filters.
    recipients_text: Mapped[str] = mapped_column(Text)
    subject: Mapped[str] = mapped_column(Text, default="")
    message_id: Mapped[str] = mapped_column(String(998), default="", index=True)
    queue_id: Mapped[str] = mapped_column(String(64), default="")
    client_address: Mapped[str] = mapped_column(String(64), default="")
    auth_user: Mapped[str] = mapped_column(String(320), default="")
    action: Mapped[str] = mapped_column(String(16))
    # " obscene_language/profanity virus_scan/malware ": detector/category pairs for filters.
    categories: Mapped[str] = mapped_column(Text, default="")
    findings: Mapped[list[Any]] = mapped_column(JSON)
    verdict: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Sensitivity: Personal, or "personal" in the subject (clauses 2.6 and 2.7).
    personal: Mapped[bool] = mapped_column(Boolean, default=False)
    size: Mapped[int] = mapped_column(Integer)
    body_sha256: Mapped[str] = mapped_column(String(64))
    # Set NULL when the body is deleted or purged; the row keeps what the audit log needs.
    body: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    # The same message offered again (the MTA retried after the daemon died between
    # storing and replying) finds its first copy instead of making a second.
    dedupe_key: Mapped[str] = mapped_column(String(64), unique=True)
    # A report: the held message the reported mail was, when the store has it.
    linked_id: Mapped[str | None] = mapped_column(String(32))


class Authority(Base):
    """Authority to open one personal-marked message, recorded by the Principal or a nominee (2.7)."""

    __tablename__ = "authority"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("held_message.id", ondelete="CASCADE"), index=True)
    granted_by: Mapped[str] = mapped_column(String(255))
    # Who may open the body; "*" for any reviewer.
    granted_to: Mapped[str] = mapped_column(String(255), default="*")
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEntry(Base):
    """Append-only (database triggers refuse UPDATE and DELETE): who did what, when, why."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(255), index=True)
    action: Mapped[str] = mapped_column(String(32), index=True)
    target: Mapped[str] = mapped_column(String(998), default="", index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ListEntry(Base):
    """A block or allow entry: approved ones apply to the next message, proposed ones wait."""

    __tablename__ = "list_entry"
    __table_args__ = (Index("ix_list_entry_lookup", "list", "status", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    list: Mapped[str] = mapped_column(String(8))  # block | allow
    kind: Mapped[str] = mapped_column(String(16))  # sender | domain | url | fingerprint
    value: Mapped[str] = mapped_column(String(2048))
    status: Mapped[str] = mapped_column(String(16))  # proposed | approved | refused
    note: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(64), default="")  # report or message id
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(255))
    decided_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    decided_by: Mapped[str | None] = mapped_column(String(255))


class ListVersion(Base):
    """One row, bumped on every list change, so daemons reload lists only when they changed."""

    __tablename__ = "list_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=0)


class OutboxMail(Base):
    """Mail the gateway sends (guidance, alerts, digests), kept until the relay takes it."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(16))  # guidance | alert | digest
    # For guidance: the sender it went to (rate limit); for alerts: the role.
    about: Mapped[str] = mapped_column(String(320), default="", index=True)
    reference: Mapped[str] = mapped_column(String(32), default="")
    recipients: Mapped[list[Any]] = mapped_column(JSON)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    # pending | sending | sent | failed (given up after the outbox lifetime)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # When a process took it to send: one that died leaves it "sending" with an old time.
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Not claimed before this (a backoff after each failure); NULL: due now (rows from before 0003).
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class PendingAlert(Base):
    """A held message waiting for its role's digest (roles rules/ puts on digest)."""

    __tablename__ = "pending_alert"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    role: Mapped[str] = mapped_column(String(64), index=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("held_message.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebUser(Base):
    """A web console account. Roles: technician, dsl, slt, auditor (issue 6; clauses 2.6-2.7)."""

    __tablename__ = "web_user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(255), unique=True)
    # Where single sign-on finds the account: the address the identity provider vouches for.
    email: Mapped[str] = mapped_column(String(320), default="", index=True)
    role: Mapped[str] = mapped_column(String(16))
    # argon2id; empty for an account that signs in only through single sign-on.
    password_hash: Mapped[str] = mapped_column(String(255), default="")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_login: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class WebSession(Base):
    """A signed-in browser. The cookie holds only the random id; a new id at every sign-in."""

    __tablename__ = "web_session"

    # sha256 of the cookie value: a stolen database does not hand out live sessions.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("web_user.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LoginFailure(Base):
    """Failed sign-ins, for rate limits by account and by client address."""

    __tablename__ = "login_failure"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    username: Mapped[str] = mapped_column(String(255), index=True)
    client: Mapped[str] = mapped_column(String(64), index=True)


class DailyCount(Base):
    """Messages per day by action and category, added up by the daemons (for the dashboard)."""

    __tablename__ = "daily_count"

    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    action: Mapped[str] = mapped_column(String(16), primary_key=True)
    # detector/category, or "" for the message count itself.
    category: Mapped[str] = mapped_column(String(80), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)


class SenderCount(Base):
    """Refused or held messages per sender per day: the dashboard's top blocked senders."""

    __tablename__ = "sender_count"

    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    sender: Mapped[str] = mapped_column(String(320), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)
