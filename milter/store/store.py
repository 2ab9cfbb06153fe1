"""The quarantine store: held messages, authority for personal mail, the audit log, block and
allow lists, and the outbox of mail the gateway sends. SQLite by default, PostgreSQL by URL.

Every look at a body and every change is written to the audit log in the same
transaction as the change itself, so there is no action without its audit entry.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, create_engine, delete, event, func, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker, undefer

from milter.envelope import Envelope
from milter.lists import KINDS, Lists
from milter.store import migrate
from milter.store.models import (
    AuditEntry,
    Authority,
    DailyCount,
    HeldMessage,
    ListEntry,
    ListVersion,
    OutboxMail,
    PendingAlert,
    SenderCount,
    utcnow,
)

# Quarantine ids are the verdict's reference: letters, digits and dashes only, so an id
# taken from a command line or a URL can never be anything else (no traversal, no SQL).
ID_PATTERN = re.compile(r"^[A-Z0-9]{1,8}-[0-9A-Z]{4}-[0-9A-Z]{4}(?:-[0-9]+)?$")
STATUSES = ("held", "releasing", "released", "deleted")
# A release or an outbox mail claimed this long ago by a process that never finished it.
STALE_CLAIM = dt.timedelta(minutes=15)
# Outbox retries, like an MTA's queue: the wait after a failure doubles from the first to
# the longest, and mail still not taken this long after it was queued is given up on.
OUTBOX_FIRST_RETRY = dt.timedelta(minutes=1)
OUTBOX_LONGEST_RETRY = dt.timedelta(hours=1)
OUTBOX_LIFETIME = dt.timedelta(days=5)
_PERSONAL_SUBJECT = re.compile(r"\bpersonal\b", re.IGNORECASE)


class StoreError(Exception):
    """Something a user asked of the store that cannot be done; the text says why."""


class NotFound(StoreError):
    pass


class Refused(StoreError):
    pass


@dataclass(frozen=True)
class HeldRecord:
    """A held message without its body."""

    id: str
    kind: str
    received_at: dt.datetime
    status: str
    status_at: dt.datetime | None
    status_by: str | None
    direction: str
    sender_role: str
    sender: str
    header_from: str
    recipients: tuple[str, ...]
    subject: str
    message_id: str
    queue_id: str
    client_address: str
    auth_user: str
    action: str
    categories: tuple[str, ...]
    findings: tuple[dict[str, Any], ...]
    verdict: dict[str, Any]
    personal: bool
    size: int
    body_sha256: str
    has_body: bool
    linked_id: str | None

    def as_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for key in ("received_at", "status_at"):
            data[key] = data[key].isoformat() if data[key] else None
        data["recipients"] = list(self.recipients)
        data["categories"] = list(self.categories)
        data["findings"] = list(self.findings)
        return data


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: dt.datetime
    actor: str
    action: str
    target: str
    reason: str
    details: dict[str, Any]


@dataclass(frozen=True)
class ListRecord:
    id: int
    list: str
    kind: str
    value: str
    status: str
    note: str
    source: str
    created_at: dt.datetime
    created_by: str
    decided_at: dt.datetime | None
    decided_by: str | None


@dataclass(frozen=True)
class HeldFilter:
    since: dt.datetime | None = None
    category: str | None = None
    direction: str | None = None
    sender: str | None = None
    recipient: str | None = None
    status: str | None = None
    kind: str | None = None
    # Only these categories (the DSL's view): detector or detector/category prefixes.
    only_categories: tuple[str, ...] | None = None
    text: str | None = None


@dataclass(frozen=True)
class ReleaseJob:
    id: str
    raw: bytes
    mail_from: str
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class OutboxItem:
    id: int
    kind: str
    recipients: tuple[str, ...]
    data: bytes
    reference: str = ""
    # Tries so far, this one included.
    attempts: int = 0


def outbox_retry_delay(attempts: int) -> dt.timedelta:
    """How long an outbox mail waits after its `attempts`-th try failed."""
    doublings: int = min(max(attempts - 1, 0), 16)
    return min(OUTBOX_FIRST_RETRY * (1 << doublings), OUTBOX_LONGEST_RETRY)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite gives back naive datetimes; everything here is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def _utc(value: dt.datetime) -> dt.datetime:
    # A bound to compare stored times with, in UTC: SQLite keeps the wall clock without its
    # offset, so 09:00+01:00 must be compared as 08:00. Naive times are taken as UTC.
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _record(row: HeldMessage, has_body: bool) -> HeldRecord:
    received = _aware(row.received_at)
    assert received is not None
    return HeldRecord(
        id=row.id,
        kind=row.kind,
        received_at=received,
        status=row.status,
        status_at=_aware(row.status_at),
        status_by=row.status_by,
        direction=row.direction,
        sender_role=row.sender_role,
        sender=row.sender,
        header_from=row.header_from,
        recipients=tuple(row.recipients),
        subject=row.subject,
        message_id=row.message_id,
        queue_id=row.queue_id,
        client_address=row.client_address,
        auth_user=row.auth_user,
        action=row.action,
        categories=tuple(row.categories.split()),
        findings=tuple(row.findings),
        verdict=dict(row.verdict),
        personal=row.personal,
        size=row.size,
        body_sha256=row.body_sha256,
        has_body=has_body,
        linked_id=row.linked_id,
    )


def _audit_record(row: AuditEntry) -> AuditRecord:
    at = _aware(row.at)
    assert at is not None
    return AuditRecord(row.id, at, row.actor, row.action, row.target, row.reason, dict(row.details or {}))


def _list_record(row: ListEntry) -> ListRecord:
    created = _aware(row.created_at)
    assert created is not None
    return ListRecord(
        row.id,
        row.list,
        row.kind,
        row.value,
        row.status,
        row.note,
        row.source,
        created,
        row.created_by,
        _aware(row.decided_at),
        row.decided_by,
    )


def _changed(session: Session, statement: Any) -> int:
    """Rows an UPDATE changed: the compare-and-set that lets only one process claim a row."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def check_id(message_id: str) -> str:
    if not ID_PATTERN.match(message_id):
        raise NotFound(f"{message_id!r} is not a quarantine id (they look like RB-7K2M-9QXD)")
    return message_id


def is_personal(sensitivity: str | None, subject: str) -> bool:
    """Marked personal (clauses 2.6, 2.7): a Sensitivity: Personal header or 'personal' in the subject."""
    marked = (sensitivity or "").strip().lower() in ("personal", "private")
    return marked or bool(_PERSONAL_SUBJECT.search(subject))


def dedupe_key(raw: bytes, envelope: Envelope, message_id: str) -> str:
    """The same message from the same sender to the same recipients, whatever trace headers say.

    The body (after the first blank line) is hashed rather than the whole message:
    an MTA retrying after a lost reply adds a new Received line and queue id.
    """
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = raw.partition(b"\n\n")
    digest = hashlib.sha256()
    for part in (message_id, envelope.mail_from or "", *sorted(envelope.rcpt_to)):
        digest.update(part.lower().encode("utf-8", "surrogateescape") + b"\0")
    digest.update(body if sep else head)
    return digest.hexdigest()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own transaction handling is off: _sqlite_begin starts each transaction.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL: readers (the console) never block the daemons' writes. secure_delete: a purged
    # body is overwritten on disk, not left in free pages (a real deletion).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # A deferred transaction that reads and then writes can fail at once with "database is
    # locked" when another process wrote in between; IMMEDIATE takes the write lock first
    # and waits for it (busy_timeout) instead.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def open_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"database URL {url!r} is not valid: {exc}") from None
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
            event.listen(engine, "begin", _sqlite_begin)
            return engine
        return create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=5)
    except (NoSuchModuleError, ImportError) as exc:
        raise StoreError(f"database URL {parsed!r}: no driver ({exc})") from None


class Store:
    def __init__(self, url: str, *, upgrade: bool = True) -> None:
        self.url = url
        self.engine = open_engine(url)
        if upgrade:
            migrate.upgrade(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._session.begin() as session:
            yield session

    # ----------------------------------------------------------------- audit log

    def _audit(
        self,
        session: Session,
        actor: str,
        action: str,
        target: str = "",
        reason: str = "",
        **details: Any,
    ) -> None:
        session.add(AuditEntry(actor=actor, action=action, target=target, reason=reason, details=details))

    def audit(self, actor: str, action: str, target: str = "", reason: str = "", **details: Any) -> None:
        with self.session() as session:
            self._audit(session, actor, action, target, reason, **details)

    def audit_entries(
        self,
        *,
        since: dt.datetime | None = None,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        limit: int = 500,
    ) -> list[AuditRecord]:
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        if since:
            query = query.where(AuditEntry.at >= _utc(since))
        if actor:
            query = query.where(AuditEntry.actor == actor)
        if action:
            query = query.where(AuditEntry.action == action)
        if target:
            query = query.where(AuditEntry.target == target)
        with self.session() as session:
            return [_audit_record(row) for row in session.scalars(query)]

    # ---------------------------------------------------------------- quarantine

    def hold(
        self,
        raw: bytes,
        envelope: Envelope,
        verdict: dict[str, Any],
        *,
        subject: str = "",
        header_from: str = "",
        message_id: str = "",
        sensitivity: str | None = None,
        kind: str = "quarantine",
        linked_id: str | None = None,
    ) -> tuple[str, bool]:
        """Store a message durably; (id, True), or (id of the first copy, False) for a repeat."""
        key = dedupe_key(raw, envelope, message_id)
        findings = list(verdict.get("findings", []))
        categories = sorted({f"{f['detector']}/{f['category']}" for f in findings})
        recipients = [r.lower() for r in envelope.rcpt_to]
        row = HeldMessage(
            id=check_id(str(verdict["reference"])),
            kind=kind,
            status="held",
            direction=str(verdict.get("direction", "")),
            sender_role=str(verdict.get("sender_role", "")),
            sender=(envelope.mail_from or "").lower(),
            header_from=header_from.lower()[:320],
            recipients=recipients,
            recipients_text=" " + " ".join(recipients) + " ",
            subject=subject,
            message_id=message_id[:998],
            queue_id=envelope.queue_id or "",
            client_address=envelope.client_address or "",
            auth_user=envelope.auth_user or "",
            action=str(verdict.get("action", "quarantine")),
            categories=" " + " ".join(categories) + " ",
            findings=findings,
            verdict=verdict,
            personal=is_personal(sensitivity, subject),
            size=len(raw),
            body_sha256=hashlib.sha256(raw).hexdigest(),
            body=raw,
            dedupe_key=key,
            linked_id=linked_id,
        )
        try:
            with self.session() as session:
                session.add(row)
        except IntegrityError:
            with self.session() as session:
                first = session.scalar(select(HeldMessage.id).where(HeldMessage.dedupe_key == key))
            if first is None:
                raise
            return first, False
        return row.id, True

    def get(self, message_id: str) -> HeldRecord:
        query = select(HeldMessage, HeldMessage.body.is_not(None)).where(
            HeldMessage.id == check_id(message_id)
        )
        with self.session() as session:
            found = session.execute(query).first()
            if found is None:
                raise NotFound(f"no held message {message_id}")
            row, has_body = found
            return _record(row, bool(has_body))

    def find(self, filters: HeldFilter = HeldFilter(), limit: int = 100, offset: int = 0) -> list[HeldRecord]:
        query = select(HeldMessage, HeldMessage.body.is_not(None))
        if filters.since:
            query = query.where(HeldMessage.received_at >= _utc(filters.since))
        if filters.category:
            query = query.where(HeldMessage.categories.contains(filters.category.lower()))
        if filters.only_categories is not None:
            query = query.where(
                or_(*(HeldMessage.categories.contains(" " + c) for c in filters.only_categories))
                if filters.only_categories
                else HeldMessage.id.is_(None)
            )
        if filters.direction:
            query = query.where(HeldMessage.direction == filters.direction)
        if filters.sender:
            query = query.where(
                or_(
                    HeldMessage.sender.contains(filters.sender.lower()),
                    HeldMessage.header_from.contains(filters.sender.lower()),
                )
            )
        if filters.recipient:
            query = query.where(HeldMessage.recipients_text.contains(filters.recipient.lower()))
        if filters.status:
            query = query.where(HeldMessage.status == filters.status)
        if filters.kind:
            query = query.where(HeldMessage.kind == filters.kind)
        if filters.text:
            needle = filters.text.lower()
            query = query.where(
                or_(
                    func.lower(HeldMessage.subject).contains(needle),
                    HeldMessage.sender.contains(needle),
                    HeldMessage.recipients_text.contains(needle),
                    HeldMessage.id.contains(filters.text.upper()),
                )
            )
        query = query.order_by(HeldMessage.received_at.desc(), HeldMessage.id).limit(limit).offset(offset)
        with self.session() as session:
            return [_record(row, bool(has_body)) for row, has_body in session.execute(query)]

    def find_by_message_id(self, message_id: str) -> list[str]:
        """Held messages (not reports) with this Message-ID, newest first."""
        query = (
            select(HeldMessage.id)
            .where(HeldMessage.message_id == message_id.strip()[:998], HeldMessage.kind == "quarantine")
            .order_by(HeldMessage.received_at.desc())
        )
        with self.session() as session:
            return list(session.scalars(query))

    def may_open(self, message_id: str, actor: str) -> bool:
        """Whether `actor` may see the body: always, unless marked personal without authority."""
        record = self.get(message_id)
        if not record.personal:
            return True
        with self.session() as session:
            granted = session.scalar(
                select(func.count())
                .select_from(Authority)
                .where(Authority.message_id == message_id, Authority.granted_to.in_(("*", actor)))
            )
        return bool(granted)

    def body(self, message_id: str, actor: str, reason: str, *, via: str = "cli") -> bytes:
        """The message as received; audited, refused without a reason or, when personal, authority."""
        reason = reason.strip()
        if not reason:
            raise Refused("a reason is required to open a message body (clause 2.6); it is audited")
        record = self.get(message_id)
        if not self.may_open(message_id, actor):
            with self.session() as session:
                self._audit(session, actor, "view_refused", message_id, reason, via=via, personal=True)
            raise Refused(
                f"{message_id} is marked personal (clauses 2.6 and 2.7): opening it needs authority "
                "recorded by the Principal or a nominee first"
            )
        with self.session() as session:
            raw = session.scalar(select(HeldMessage.body).where(HeldMessage.id == record.id))
            if raw is None:
                raise NotFound(f"{message_id}: the body was {record.status} and is gone")
            self._audit(session, actor, "view_body", message_id, reason, via=via, personal=record.personal)
            return raw

    def grant_authority(
        self, message_id: str, granted_by: str, reason: str, granted_to: str = "*", *, via: str = "cli"
    ) -> None:
        if not reason.strip():
            raise Refused("authority needs a recorded reason (clause 2.7)")
        self.get(message_id)
        with self.session() as session:
            session.add(
                Authority(message_id=message_id, granted_by=granted_by, granted_to=granted_to, reason=reason)
            )
            self._audit(session, granted_by, "grant_authority", message_id, reason, to=granted_to, via=via)

    def claim_release(
        self,
        message_id: str,
        actor: str,
        reason: str,
        recipients: Sequence[str] | None = None,
        *,
        via: str = "cli",
    ) -> ReleaseJob:
        """Mark a held message as being released; only one caller ever gets it.

        A release whose process died mid-way (still "releasing" after STALE_CLAIM) can be
        claimed again: the relay may or may not have taken it, and a duplicate is better
        than a message stuck for ever; the audit log shows both attempts.
        """
        check_id(message_id)
        stale = _utc(utcnow() - STALE_CLAIM)
        with self.session() as session:
            claimed = _changed(
                session,
                update(HeldMessage)
                .where(
                    HeldMessage.id == message_id,
                    or_(
                        HeldMessage.status == "held",
                        (HeldMessage.status == "releasing") & (HeldMessage.status_at < stale),
                    ),
                )
                .values(status="releasing", status_at=utcnow(), status_by=actor),
            )
            if not claimed:
                current = session.scalar(select(HeldMessage.status).where(HeldMessage.id == message_id))
                if current is None:
                    raise NotFound(f"no held message {message_id}")
                raise Refused(f"{message_id} is {current}, not held: nothing to release")
            row = session.scalars(
                select(HeldMessage).where(HeldMessage.id == message_id).options(undefer(HeldMessage.body))
            ).one()
            if row.body is None:
                raise Refused(f"{message_id} has no body to release")
            targets = tuple(r.lower() for r in recipients) if recipients else tuple(row.recipients)
            return ReleaseJob(row.id, row.body, row.sender, targets)

    def finish_release(
        self, job: ReleaseJob, actor: str, reason: str, error: str | None = None, *, via: str = "cli"
    ) -> None:
        with self.session() as session:
            session.execute(
                update(HeldMessage)
                .where(HeldMessage.id == job.id)
                .values(status="held" if error else "released", status_at=utcnow(), status_by=actor)
            )
            if error:
                self._audit(
                    session,
                    actor,
                    "release_failed",
                    job.id,
                    reason,
                    error=error,
                    recipients=list(job.recipients),
                )
            else:
                self._audit(
                    session, actor, "release", job.id, reason, recipients=list(job.recipients), via=via
                )

    def delete(self, message_id: str, actor: str, reason: str, *, via: str = "cli") -> None:
        """Delete the body for good; the record (no content) stays until the retention purge."""
        record = self.get(message_id)
        if record.status == "releasing":
            raise Refused(f"{message_id} is being released right now")
        with self.session() as session:
            session.execute(
                update(HeldMessage)
                .where(HeldMessage.id == message_id)
                .values(body=None, status="deleted", status_at=utcnow(), status_by=actor)
            )
            self._audit(session, actor, "delete", message_id, reason, via=via)

    def purge(self, older_than: dt.timedelta, actor: str, *, now: dt.datetime | None = None) -> list[str]:
        """Delete every held message (body and record) received before the retention period."""
        cutoff = _utc(now or utcnow()) - older_than
        with self.session() as session:
            ids = list(
                session.scalars(
                    select(HeldMessage.id).where(
                        HeldMessage.received_at < cutoff, HeldMessage.status != "releasing"
                    )
                )
            )
            if ids:
                session.execute(delete(HeldMessage).where(HeldMessage.id.in_(ids)))
            self._audit(
                session,
                actor,
                "purge",
                "",
                f"retention {older_than.days} days",
                cutoff=cutoff.isoformat(),
                count=len(ids),
                ids=ids,
            )
        return ids

    def export_person(self, address: str, actor: str, reason: str) -> dict[str, Any]:
        """Every record that names this address, for a subject access request (audited)."""
        address = address.strip().lower()
        if "@" not in address:
            raise Refused(f"{address!r} is not a mail address")
        query = select(HeldMessage).where(
            or_(
                HeldMessage.sender == address,
                HeldMessage.header_from == address,
                HeldMessage.recipients_text.contains(f" {address} "),
            )
        )
        with self.session() as session:
            rows = list(session.scalars(query.order_by(HeldMessage.received_at)))
            messages = [_record(r, True).as_dict() | {"has_body": None} for r in rows]
            entries = session.scalars(
                select(ListEntry).where(ListEntry.kind == "sender", ListEntry.value == address)
            )
            lists = [
                {
                    k: v.isoformat() if isinstance(v, dt.datetime) else v
                    for k, v in vars(_list_record(e)).items()
                }
                for e in entries
            ]
            self._audit(session, actor, "export", address, reason, messages=len(messages))
        return {"subject": address, "exported_at": utcnow().isoformat(), "messages": messages, "lists": lists}

    # -------------------------------------------------------- block/allow lists

    def _bump(self, session: Session) -> None:
        session.execute(
            update(ListVersion).where(ListVersion.id == 1).values(version=ListVersion.version + 1)
        )

    def add_entry(
        self,
        list_name: str,
        kind: str,
        value: str,
        actor: str,
        *,
        status: str = "approved",
        note: str = "",
        source: str = "",
        via: str = "cli",
    ) -> int:
        if list_name not in ("block", "allow"):
            raise Refused(f"unknown list {list_name!r} (block or allow)")
        if kind not in KINDS:
            raise Refused(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
        value = value.strip()
        if kind in ("sender", "domain"):
            value = value.lower().strip(".")
        if not value or (kind == "sender" and "@" not in value) or (kind == "domain" and "." not in value):
            raise Refused(f"{value!r} is not a valid {kind}")
        with self.session() as session:
            same = session.scalar(
                select(ListEntry).where(
                    ListEntry.list == list_name,
                    ListEntry.kind == kind,
                    ListEntry.value == value,
                    ListEntry.status.in_(("approved", status)),
                )
            )
            if same is not None:
                return same.id
            entry = ListEntry(
                list=list_name,
                kind=kind,
                value=value,
                status=status,
                note=note,
                source=source,
                created_by=actor,
            )
            if status == "approved":
                entry.decided_at = utcnow()
                entry.decided_by = actor
            session.add(entry)
            session.flush()
            action = list_name if status == "approved" else f"propose_{list_name}"
            self._audit(
                session, actor, action, f"{kind}:{value}", note, entry=entry.id, source=source, via=via
            )
            if status == "approved":
                self._bump(session)
            return entry.id

    def decide_entry(
        self, entry_id: int, actor: str, approve: bool, reason: str = "", *, via: str = "cli"
    ) -> None:
        with self.session() as session:
            entry = session.get(ListEntry, entry_id)
            if entry is None:
                raise NotFound(f"no list entry {entry_id}")
            if entry.status != "proposed":
                raise Refused(f"entry {entry_id} is already {entry.status}")
            entry.status = "approved" if approve else "refused"
            entry.decided_at = utcnow()
            entry.decided_by = actor
            verb = "approve" if approve else "refuse"
            self._audit(
                session,
                actor,
                f"{verb}_{entry.list}",
                f"{entry.kind}:{entry.value}",
                reason,
                entry=entry_id,
                via=via,
            )
            if approve:
                self._bump(session)

    def remove_entry(self, entry_id: int, actor: str, reason: str = "", *, via: str = "cli") -> None:
        with self.session() as session:
            entry = session.get(ListEntry, entry_id)
            if entry is None:
                raise NotFound(f"no list entry {entry_id}")
            if entry.status == "removed":
                raise Refused(f"entry {entry_id} is already removed")
            was = entry.status
            entry.status = "removed"
            entry.decided_at = utcnow()
            entry.decided_by = actor
            self._audit(
                session,
                actor,
                f"remove_{entry.list}",
                f"{entry.kind}:{entry.value}",
                reason,
                entry=entry_id,
                via=via,
                was=was,
            )
            if was == "approved":
                # Only an approved entry applied to mail: daemons reload only for those.
                self._bump(session)

    def entries(self, list_name: str | None = None, status: str | None = None) -> list[ListRecord]:
        query = select(ListEntry).order_by(ListEntry.id)
        if list_name:
            query = query.where(ListEntry.list == list_name)
        if status:
            query = query.where(ListEntry.status == status)
        with self.session() as session:
            return [_list_record(e) for e in session.scalars(query)]

    def list_version(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.scalar(select(ListVersion.version).where(ListVersion.id == 1)) or 0)

    def lists(self) -> Lists:
        with self.session() as session:
            version = int(session.scalar(select(ListVersion.version).where(ListVersion.id == 1)) or 0)
            blocked: dict[str, set[str]] = {k: set() for k in KINDS}
            allowed: dict[str, set[str]] = {k: set() for k in KINDS}
            for name, kind, value in session.execute(
                select(ListEntry.list, ListEntry.kind, ListEntry.value).where(ListEntry.status == "approved")
            ):
                (blocked if name == "block" else allowed)[kind].add(value)
        return Lists(
            version,
            {k: frozenset(v) for k, v in blocked.items()},
            {k: frozenset(v) for k, v in allowed.items()},
        )

    # -------------------------------------------------------------------- outbox

    def queue_mail(
        self, kind: str, recipients: Sequence[str], data: bytes, *, about: str = "", reference: str = ""
    ) -> int:
        with self.session() as session:
            item = OutboxMail(
                kind=kind,
                about=about.lower(),
                reference=reference,
                recipients=list(recipients),
                data=data,
                next_attempt_at=utcnow(),
            )
            session.add(item)
            session.flush()
            return item.id

    def sent_recently(self, kind: str, about: str, since: dt.datetime) -> int:
        with self.session() as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(OutboxMail)
                    .where(
                        OutboxMail.kind == kind,
                        OutboxMail.about == about.lower(),
                        OutboxMail.created_at >= _utc(since),
                    )
                )
                or 0
            )

    def claim_outbox(self, limit: int = 20, now: dt.datetime | None = None) -> list[OutboxItem]:
        """Take pending mail whose time has come; a row claimed by one process is not taken by
        another. Each claim is an attempt."""
        items: list[OutboxItem] = []
        now = _utc(now or utcnow())
        with self.session() as session:
            # Mail waiting out its backoff is not due: waking the outbox for new mail must
            # not retry it (each retry costs an attempt and a connection to a relay that is down).
            due = OutboxMail.next_attempt_at.is_(None) | (OutboxMail.next_attempt_at <= now)
            # "sending" for longer than STALE_CLAIM: the process sending it died; try again.
            claimable = ((OutboxMail.status == "pending") & due) | (
                (OutboxMail.status == "sending") & (OutboxMail.claimed_at < now - STALE_CLAIM)
            )
            ids = list(
                session.scalars(select(OutboxMail.id).where(claimable).order_by(OutboxMail.id).limit(limit))
            )
            for item_id in ids:
                taken = _changed(
                    session,
                    update(OutboxMail)
                    .where(OutboxMail.id == item_id, claimable)
                    .values(status="sending", attempts=OutboxMail.attempts + 1, claimed_at=now),
                )
                if taken:
                    row = session.get(OutboxMail, item_id)
                    assert row is not None
                    to = tuple(row.recipients)
                    items.append(OutboxItem(row.id, row.kind, to, row.data, row.reference, row.attempts))
        return items

    def outbox_done(self, item_id: int) -> None:
        """The relay took it (for at least one recipient): never sent again."""
        with self.session() as session:
            session.execute(
                update(OutboxMail)
                .where(OutboxMail.id == item_id)
                .values(status="sent", sent_at=utcnow(), last_error="", next_attempt_at=None)
            )

    def outbox_failed(self, item_id: int, error: str, now: dt.datetime | None = None) -> bool:
        """The relay did not take it: wait longer before each retry, and give up (True) once it
        has been in the outbox for OUTBOX_LIFETIME."""
        now = _utc(now or utcnow())
        with self.session() as session:
            row = session.get(OutboxMail, item_id)
            if row is None or row.status != "sending":  # not ours any more (taken as stale)
                return False
            created = _aware(row.created_at)
            assert created is not None
            give_up = now - created >= OUTBOX_LIFETIME
            values: dict[str, Any] = (
                {"status": "failed", "next_attempt_at": None}
                if give_up
                else {"status": "pending", "next_attempt_at": now + outbox_retry_delay(row.attempts)}
            )
            changed = _changed(
                session,
                update(OutboxMail)
                .where(OutboxMail.id == item_id, OutboxMail.status == "sending")
                .values(last_error=error[:500], **values),
            )
            return give_up and changed == 1

    def outbox(self, status: str | None = None) -> list[tuple[int, str, str, tuple[str, ...]]]:
        query = select(OutboxMail.id, OutboxMail.kind, OutboxMail.status, OutboxMail.recipients)
        if status:
            query = query.where(OutboxMail.status == status)
        with self.session() as session:
            return [(i, k, s, tuple(r)) for i, k, s, r in session.execute(query.order_by(OutboxMail.id))]

    # --------------------------------------------------------- dashboard counts

    def add_counts(
        self, counts: dict[tuple[dt.date, str, str], int], senders: dict[tuple[dt.date, str], int]
    ) -> None:
        """Add a batch of per-day counts (daemons flush what they counted every minute)."""
        with self.session() as session:
            for (day, action, category), n in counts.items():
                row = session.get(DailyCount, (day, action, category))
                if row is None:
                    session.add(DailyCount(day=day, action=action, category=category, count=n))
                else:
                    row.count += n
            for (day, sender), n in senders.items():
                found = session.get(SenderCount, (day, sender))
                if found is None:
                    session.add(SenderCount(day=day, sender=sender, count=n))
                else:
                    found.count += n

    def daily_counts(self, since: dt.date) -> list[tuple[dt.date, str, str, int]]:
        """(day, action, category, count) from `since` on; category "" is the message count."""
        query = select(DailyCount.day, DailyCount.action, DailyCount.category, DailyCount.count).where(
            DailyCount.day >= since
        )
        with self.session() as session:
            return [(d, a, c, n) for d, a, c, n in session.execute(query.order_by(DailyCount.day))]

    def top_senders(self, since: dt.date, limit: int = 10) -> list[tuple[str, int]]:
        """Senders with the most refused or held messages since `since`."""
        total = func.sum(SenderCount.count).label("total")
        query = (
            select(SenderCount.sender, total)
            .where(SenderCount.day >= since)
            .group_by(SenderCount.sender)
            .order_by(total.desc(), SenderCount.sender)
            .limit(limit)
        )
        with self.session() as session:
            return [(sender, int(n)) for sender, n in session.execute(query)]

    # ------------------------------------------------------------------- digests

    def add_pending_alert(self, role: str, message_id: str) -> None:
        with self.session() as session:
            session.add(PendingAlert(role=role, message_id=message_id))

    def take_pending_alerts(self, role: str) -> list[HeldRecord]:
        """The held messages waiting for this role's digest; taken once."""
        with self.session() as session:
            rows = list(session.scalars(select(PendingAlert).where(PendingAlert.role == role)))
            ids = [r.message_id for r in rows]
            if rows:
                session.execute(delete(PendingAlert).where(PendingAlert.id.in_([r.id for r in rows])))
            if not ids:
                return []
            held = session.scalars(select(HeldMessage).where(HeldMessage.id.in_(ids)))
            return [_record(h, True) for h in held]
