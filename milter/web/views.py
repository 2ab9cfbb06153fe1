"""The console's pages and actions: dashboard, quarantine, message, lists, audit log.

Every look at a body and every change goes through the same Store calls as the
command line (with via="web" and the console username as actor), so the audit log
reads the same whichever tool was used (clauses 2.4-2.7).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import re
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import func, select
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from milter.config import host_port
from milter.quarantine_cli import parse_since
from milter.release import ReleaseFailed, release
from milter.store.models import AuditEntry, Authority, HeldMessage, utcnow
from milter.store.store import STATUSES, HeldFilter, HeldRecord, NotFound, Refused, check_id
from milter.web import auth, charts, display, health
from milter.web.auth import Viewer
from milter.web.console import (
    DASHBOARD_ROLES,
    DSL_CATEGORIES,
    OPEN_ROLES,
    Console,
    HttpError,
)
from milter.web.security import DOWNLOAD_CSP, MAIL_HTML_CSP

PAGE_SIZE = 50
DIRECTIONS = ("inbound", "outbound", "internal")
KINDS = ("quarantine", "report")
BULK_ACTIONS = {"release": "Release", "delete": "Delete", "block_sender": "Block sender"}
# How long after opening a message its HTML frame and attachments stay available.
OPEN_WINDOW = dt.timedelta(minutes=10)
PERSONAL = "(marked personal)"
MAX_REASON = 2000
_ADDRESS_SPLIT = re.compile(r"[\s,;]+")


# ------------------------------------------------------------------------- helpers


def in_dsl_queue(record: HeldRecord) -> bool:
    return any(c == p or c.startswith(p + "/") for c in record.categories for p in DSL_CATEGORIES)


def load(console: Console, viewer: Viewer, message_id: str) -> HeldRecord:
    """The message, if this viewer may know it exists: malformed, unknown or outside the
    DSL's queue are all the same 404."""
    check_id(message_id)
    record = console.store.get(message_id)
    if viewer.role == "dsl" and not in_dsl_queue(record):
        raise NotFound(message_id)
    return record


def authorized_ids(console: Console, viewer: Viewer, records: list[HeldRecord]) -> set[str]:
    """Ids of the personal-marked messages among these that this viewer has authority for."""
    personal = [r.id for r in records if r.personal]
    if not personal:
        return set()
    with console.store.session() as session:
        return set(
            session.scalars(
                select(Authority.message_id).where(
                    Authority.message_id.in_(personal), Authority.granted_to.in_(("*", viewer.username))
                )
            )
        )


def shown_subject(record: HeldRecord, authorized: set[str]) -> str:
    if record.personal and record.id not in authorized:
        return PERSONAL
    return display.printable(record.subject)


def raw_body(console: Console, message_id: str) -> bytes | None:
    """The stored bytes, for parsing metadata or the already-audited frame; never shown as is."""
    with console.store.session() as session:
        return session.scalar(select(HeldMessage.body).where(HeldMessage.id == message_id))


def recent_open(console: Console, viewer: Viewer, message_id: str) -> str | None:
    """The reason this viewer gave when opening the message in this session, in the last ten
    minutes; None when they did not."""
    since = max(utcnow() - OPEN_WINDOW, viewer.session_started)
    with console.store.session() as session:
        return session.scalar(
            select(AuditEntry.reason)
            .where(
                AuditEntry.actor == viewer.username,
                AuditEntry.action == "view_body",
                AuditEntry.target == message_id,
                AuditEntry.at >= since.astimezone(dt.UTC),
            )
            .order_by(AuditEntry.id.desc())
            .limit(1)
        )


def reason_of(form: FormData, field: str = "reason") -> str:
    value = form.get(field)
    return value.strip()[:MAX_REASON] if isinstance(value, str) else ""


def message_url(message_id: str) -> str:
    return f"/quarantine/{message_id}"


def _sender_of(record: HeldRecord) -> str:
    return record.sender or record.header_from


def _int(text: str, default: int, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        return default
    return min(max(value, low), high)


# ----------------------------------------------------------------------- dashboard


def dashboard(console: Console, request: Request, viewer: Viewer) -> Response:
    """Messages per day by action and category, top blocked senders, scanner health."""
    if viewer.role not in DASHBOARD_ROLES:
        # The DSL starts at its queue, the auditor at the log: "/" is everyone's home.
        return RedirectResponse("/quarantine" if viewer.role == "dsl" else "/audit", status_code=303)
    days = _int(request.query_params.get("days", "14"), 14, 1, 90)
    if days not in (7, 14, 30):
        days = 14
    today = utcnow().date()
    since = today - dt.timedelta(days=days - 1)
    counts = console.store.daily_counts(since)
    context = {
        "days": days,
        "per_day": charts.per_day_by_action(counts, since, today),
        "categories": charts.by_category(counts),
        "senders": charts.bars(console.store.top_senders(since, 10), "bar-sender"),
        "health": health.read_health(console.settings.metrics_url),
        "held_now": held_count(console),
    }
    return console.render(request, "dashboard.html", context, viewer=viewer)


def held_count(console: Console) -> int:
    with console.store.session() as session:
        return int(
            session.scalar(select(func.count()).select_from(HeldMessage).where(HeldMessage.status == "held"))
            or 0
        )


# ----------------------------------------------------------------------- quarantine


def quarantine(console: Console, request: Request, viewer: Viewer) -> Response:
    """Held messages with search and filters; the DSL sees safeguarding concerns only."""
    params = request.query_params
    text = params.get("q", "").strip()[:200]
    category = params.get("category", "").strip().lower()[:80]
    direction = params.get("direction", "")
    status = params.get("status", "")
    kind = params.get("kind", "")
    since_text = params.get("since", "").strip()[:40]
    page = _int(params.get("page", "1"), 1, 1, 100_000)
    problems = []
    since = None
    if since_text:
        try:
            since = parse_since(since_text)
        except argparse.ArgumentTypeError as exc:
            problems.append(f"Since: {exc}")
    filters = HeldFilter(
        since=since,
        category=category or None,
        direction=direction if direction in DIRECTIONS else None,
        status=status if status in STATUSES else None,
        kind=kind if kind in KINDS else None,
        text=text or None,
        only_categories=DSL_CATEGORIES if viewer.role == "dsl" else None,
    )
    records = console.store.find(filters, limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE)
    more = len(records) > PAGE_SIZE
    records = records[:PAGE_SIZE]
    authorized = authorized_ids(console, viewer, records)
    if text:
        # A search must not reveal words of a personal subject to someone without authority.
        needle = text.lower()
        records = [
            r
            for r in records
            if not (r.personal and r.id not in authorized)
            or needle in r.sender
            or any(needle in x for x in r.recipients)
            or text.upper() in r.id
        ]
    query = {k: v for k, v in params.items() if k != "page" and v}
    rows = [
        {
            "record": r,
            "subject": shown_subject(r, authorized),
            "worst": _worst(r),
        }
        for r in records
    ]
    context = {
        "rows": rows,
        "q": text,
        "category": category,
        "direction": direction,
        "status": status,
        "kind": kind,
        "since": since_text,
        "page": page,
        "prev_url": f"/quarantine?{urlencode({**query, 'page': page - 1})}" if page > 1 else None,
        "next_url": f"/quarantine?{urlencode({**query, 'page': page + 1})}" if more else None,
        "back": f"/quarantine?{urlencode({**query, 'page': page})}",
        "problems": problems,
        "directions": DIRECTIONS,
        "statuses": STATUSES,
        "bulk_actions": BULK_ACTIONS,
        "can_act": viewer.role in OPEN_ROLES,
        "detectors": _detector_names(),
    }
    return console.render(request, "quarantine.html", context, viewer=viewer)


def _worst(record: HeldRecord) -> str:
    order = {"mild": 1, "strong": 2, "severe": 3}
    worst = ""
    for f in record.findings:
        severity = str(f.get("severity", ""))
        if order.get(severity, 0) > order.get(worst, 0):
            worst = severity
    return worst


def _detector_names() -> list[str]:
    from milter.detectors.registry import DETECTORS

    return [str(m.NAME) for m in DETECTORS]


def message_context(
    console: Console,
    viewer: Viewer,
    record: HeldRecord,
    *,
    opened: bytes | None = None,
) -> dict[str, Any]:
    authorized = not record.personal or console.store.may_open(record.id, viewer.username)
    can_open = viewer.role in OPEN_ROLES
    attachments: list[display.AttachmentInfo] = []
    if can_open and authorized and record.has_body:
        raw = opened if opened is not None else raw_body(console, record.id)
        if raw is not None:
            attachments = display.attachments(raw, record.findings)
    proposals = []
    if viewer.role == "technician":
        proposals = [e for e in console.store.entries(status="proposed") if e.source == record.id]
    reviewers = auth.usernames_with_role(console.store, "technician", "dsl") if viewer.role == "slt" else []
    sender = _sender_of(record)
    return {
        "record": record,
        "subject": display.printable(record.subject) if authorized else PERSONAL,
        "authorized": authorized,
        "can_open": can_open,
        "can_act": can_open,
        "can_authorize": viewer.role == "slt",
        "opened": opened is not None,
        "view": display.text_view(opened) if opened is not None else None,
        "attachments": attachments,
        "report": record.verdict.get("report") if isinstance(record.verdict.get("report"), dict) else None,
        "proposals": proposals,
        "reviewers": reviewers,
        "sender": sender,
        "sender_domain": sender.rpartition("@")[2] if "@" in sender else "",
        "clauses": record.verdict.get("clauses", []),
    }


def message(console: Console, request: Request, viewer: Viewer) -> Response:
    """A held message: what the gateway found, without the body until a reason is given."""
    record = load(console, viewer, request.path_params["id"])
    return console.render(request, "message.html", message_context(console, viewer, record), viewer=viewer)


def open_message(console: Console, request: Request, viewer: Viewer, form: FormData) -> Response:
    """The body, after a reason: audited (view_body), refused (and audited) for personal mail
    without recorded authority."""
    record = load(console, viewer, request.path_params["id"])
    reason = reason_of(form)
    context = message_context(console, viewer, record)
    if not reason:
        context["flash"] = {
            "kind": "error",
            "text": "Give a reason to open the message; it is recorded in the audit log.",
        }
        return console.render(request, "message.html", context, viewer=viewer, status=400)
    if not record.has_body:
        context["flash"] = {
            "kind": "error",
            "text": f"The body of {record.id} was {record.status} and is gone.",
        }
        return console.render(request, "message.html", context, viewer=viewer, status=410)
    try:
        raw = console.store.body(record.id, viewer.username, reason, via="web")
    except Refused as exc:
        context["flash"] = {"kind": "error", "text": str(exc)}
        return console.render(request, "message.html", context, viewer=viewer, status=403)
    context = message_context(console, viewer, record, opened=raw)
    context["open_reason"] = reason
    return console.render(request, "message.html", context, viewer=viewer)


def message_html(console: Console, request: Request, viewer: Viewer) -> Response:
    """The message's HTML, sanitised, for the sandboxed frame of a message just opened."""
    record = load(console, viewer, request.path_params["id"])
    if recent_open(console, viewer, record.id) is None:
        raise HttpError(403, "Open the message with a reason first; the view lasts ten minutes.")
    raw = raw_body(console, record.id)
    if raw is None:
        raise HttpError(410, "The body of this message is gone.")
    document = display.html_document(raw) or (
        '<!doctype html><html><head><meta charset="utf-8"><title>Message</title></head>'
        "<body><p>This message has no HTML part.</p></body></html>"
    )
    return Response(
        document,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": MAIL_HTML_CSP,
            "X-Frame-Options": "SAMEORIGIN",
            "Cache-Control": "no-store",
        },
    )


def _attachment(
    console: Console, viewer: Viewer, request: Request
) -> tuple[HeldRecord, display.AttachmentInfo, bytes]:
    record = load(console, viewer, request.path_params["id"])
    number_text = request.path_params["n"]
    if not number_text.isdigit() or len(number_text) > 4:
        raise NotFound(number_text)
    if record.personal and not console.store.may_open(record.id, viewer.username):
        raise HttpError(
            403,
            f"{record.id} is marked personal: its attachments open only with authority recorded by the "
            "Principal or a nominee (clauses 2.6, 2.7).",
        )
    raw = raw_body(console, record.id)
    if raw is None:
        raise HttpError(410, "The body of this message is gone, with its attachments.")
    number = int(number_text)
    found = [a for a in display.attachments(raw, record.findings) if a.number == number]
    if not found:
        raise NotFound(number_text)
    return record, found[0], raw


def attachment(console: Console, request: Request, viewer: Viewer) -> Response:
    """What an attachment is (declared and detected type, size, findings), before any download."""
    from milter.filetypes import identify

    record, info, raw = _attachment(console, viewer, request)
    payload = display.attachment_payload(raw, info.number)
    detected = identify(payload[1], payload[0]) if payload else None
    context = {
        "record": record,
        "info": info,
        "detected": detected,
        "open_reason": recent_open(console, viewer, record.id),
    }
    return console.render(request, "attachment.html", context, viewer=viewer)


def download_attachment(console: Console, request: Request, viewer: Viewer, form: FormData) -> Response:
    """The attachment as received, after the warning: audited as a body view."""
    record, info, _ = _attachment(console, viewer, request)
    url = f"{message_url(record.id)}/attachments/{info.number}"
    if form.get("confirm") != "yes":
        return console.redirect(url, ("error", "Confirm that you understand the warning to download."))
    reason = reason_of(form) or recent_open(console, viewer, record.id) or ""
    if not reason:
        return console.redirect(
            url, ("error", "Give a reason for the download; it is recorded in the audit log.")
        )
    try:
        raw = console.store.body(
            record.id, viewer.username, f"attachment {info.number} download: {reason}", via="web"
        )
    except Refused as exc:
        raise HttpError(403, str(exc)) from None
    payload = display.attachment_payload(raw, info.number)
    if payload is None:
        raise NotFound(str(info.number))
    name = display.download_name(payload[0], info.number)
    return Response(
        payload[1],
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": display.content_disposition(name),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": DOWNLOAD_CSP,
            "Cache-Control": "no-store",
        },
    )


# ------------------------------------------------------------------------- actions


def _release(
    console: Console, viewer: Viewer, record: HeldRecord, reason: str, recipients: list[str] | None
) -> str:
    sent = release(
        console.store,
        record.id,
        viewer.username,
        reason,
        host_port(console.settings.reinject),
        recipients,
        via="web",
        timeout=30.0,
    )
    return f"{record.id} released to {', '.join(sent)}."


def release_message(console: Console, request: Request, viewer: Viewer, form: FormData) -> Response:
    """Deliver once, to the original recipients or to those named (one per line or comma-separated)."""
    record = load(console, viewer, request.path_params["id"])
    reason = reason_of(form)
    if not reason:
        return console.redirect(message_url(record.id), ("error", "Give a reason to release; it is audited."))
    recipients_text = form.get("recipients")
    recipients = (
        [r for r in _ADDRESS_SPLIT.split(recipients_text) if r] if isinstance(recipients_text, str) else []
    )
    try:
        done = _release(console, viewer, record, reason, recipients or None)
    except (Refused, ReleaseFailed) as exc:
        return console.redirect(message_url(record.id), ("error", str(exc)))
    return console.redirect(message_url(record.id), ("ok", done))


def delete_message(console: Console, request: Request, viewer: Viewer, form: FormData) -> Response:
    """Delete the body for good; the record (no content) stays until the retention purge."""
    record = load(console, viewer, request.path_params["id"])
    reason = reason_of(form)
    if not reason:
        return console.redirect(message_url(record.id), ("error", "Give a reason to delete; it is audited."))
    try:
        console.store.delete(record.id, viewer.username, reason, via="web")
    except Refused as exc:
        return console.redirect(message_url(record.id), ("error", str(exc)))
    return console.redirect(message_url(record.id), ("ok", f"{record.id}: body deleted."))


def _block(console: Console, viewer: Viewer, record: HeldRecord, kind: str, reason: str) -> str:
    sender = _sender_of(record)
    if "@" not in sender:
        raise Refused(f"{record.id} has no sender address to block")
    if kind == "domain" and record.direction != "inbound":
        # The sender of outbound or internal mail is the school's own: its domain is ours.
        raise Refused(f"{record.id} is {record.direction} mail: block the sender, not the school's domain")
    value = sender if kind == "sender" else sender.rpartition("@")[2]
    entry = console.store.add_entry(
        "block", kind, value, viewer.username, note=reason, source=record.id, via="web"
    )
    return f"Blocked {kind} {value} (entry {entry}); it applies to the next message."


def block(console: Console, request: Request, viewer: Viewer, form: FormData) -> Response:
    """Block the message's sender or the sender's domain at once."""
    record = load(console, viewer, request.path_params["id"])
    kind = form.get("kind")
    if kind not in ("sender", "domain"):
        return console.redirect(
            message_url(record.id), ("error", "Choose to block the sender or the domain.")
        )
    reason = reason_of(form)
    if not reason:
        return console.redirect(message_url(record.id), ("error", "Give a reason to block; it is audited."))
    try:
        done = _block(console, viewer, record, str(kind), reason)
    except Refused as exc:
        return console.redirect(message_url(record.id), ("error", str(exc)))
    return console.redirect(message_url(record.id), ("ok", done))


def false_positive(console: Console, request: Request, viewer: Viewer, form: FormData) -> Response:
    """Not offensive: propose an allow entry for the sender (a technician approves it on Lists)."""
    record = load(console, viewer, request.path_params["id"])
    reason = reason_of(form)
    if not reason:
        return console.redirect(message_url(record.id), ("error", "Give a reason; it is audited."))
    sender = _sender_of(record)
    try:
        if "@" not in sender:
            raise Refused(f"{record.id} has no sender address to allow")
        entry = console.store.add_entry(
            "allow",
            "sender",
            sender,
            viewer.username,
            status="proposed",
            note=reason,
            source=record.id,
            via="web",
        )
    except Refused as exc:
        return console.redirect(message_url(record.id), ("error", str(exc)))
    return console.redirect(
        message_url(record.id),
        (
            "ok",
            f"Marked as a false positive: allowing {sender} is proposed (entry {entry}), "
            "for approval on Lists.",
        ),
    )


def record_authority(console: Console, request: Request, viewer: Viewer, form: FormData) -> Response:
    """SLT: record authority to open a message marked personal (clause 2.7)."""
    record = load(console, viewer, request.path_params["id"])
    reason = reason_of(form)
    if not reason:
        return console.redirect(
            message_url(record.id), ("error", "Authority needs a recorded reason (clause 2.7).")
        )
    granted_to = form.get("granted_to")
    to = granted_to.strip().lower() if isinstance(granted_to, str) and granted_to.strip() else "*"
    if to != "*" and to not in auth.usernames_with_role(console.store, "technician", "dsl"):
        return console.redirect(message_url(record.id), ("error", f"{to!r} is not a reviewer's account."))
    console.store.grant_authority(record.id, viewer.username, reason, to, via="web")
    who = "any reviewer" if to == "*" else to
    return console.redirect(message_url(record.id), ("ok", f"{record.id}: authority recorded for {who}."))


def bulk(console: Console, request: Request, viewer: Viewer, form: FormData) -> Response:
    """One action on the selected messages; each one audited as if done alone."""
    back = form.get("back")
    back_url = (
        back if isinstance(back, str) and re.fullmatch(r"/quarantine(\?[^\s\\]*)?", back) else "/quarantine"
    )
    action = form.get("action")
    ids = [i for i in form.getlist("ids") if isinstance(i, str)][:500]
    reason = reason_of(form)
    if action not in BULK_ACTIONS:
        return console.redirect(back_url, ("error", "Choose an action for the selected messages."))
    if not ids:
        return console.redirect(back_url, ("error", "Select at least one message."))
    if not reason:
        return console.redirect(back_url, ("error", "Give a reason; it is recorded for each message."))
    done, failed = [], []
    for message_id in dict.fromkeys(ids):
        try:
            record = load(console, viewer, message_id)
            if action == "release":
                _release(console, viewer, record, reason, None)
            elif action == "delete":
                console.store.delete(record.id, viewer.username, reason, via="web")
            else:
                _block(console, viewer, record, "sender", reason)
            done.append(record.id)
        except NotFound:
            failed.append(f"{message_id[:40]}: not found")
        except (Refused, ReleaseFailed) as exc:
            failed.append(str(exc))
    verb = {"release": "released", "delete": "deleted", "block_sender": "sender blocked"}[str(action)]
    text = f"{len(done)} {verb}" + (f": {', '.join(done)}." if done else ".")
    if failed:
        text += f" {len(failed)} not done: " + "; ".join(failed[:5]) + ("…" if len(failed) > 5 else "")
    return console.redirect(back_url, ("error" if failed else "ok", text))


# --------------------------------------------------------------------------- lists


def lists(console: Console, request: Request, viewer: Viewer) -> Response:
    """Block and allow entries; proposals from the report address wait for a decision."""
    entries = console.store.entries()
    context = {
        "proposed": [e for e in entries if e.status == "proposed"],
        "approved": [e for e in entries if e.status == "approved"],
        "closed": sorted((e for e in entries if e.status in ("refused", "removed")), key=lambda e: -e.id)[
            :100
        ],
    }
    return console.render(request, "lists.html", context, viewer=viewer)


def _entry_id(request: Request) -> int:
    text = request.path_params["entry_id"]
    if not text.isdigit() or len(text) > 12:
        raise NotFound(text)
    return int(text)


def approve_entry(console: Console, request: Request, viewer: Viewer, form: FormData) -> Response:
    return _decide(console, request, viewer, form, "approve")


def refuse_entry(console: Console, request: Request, viewer: Viewer, form: FormData) -> Response:
    return _decide(console, request, viewer, form, "refuse")


def remove_entry(console: Console, request: Request, viewer: Viewer, form: FormData) -> Response:
    return _decide(console, request, viewer, form, "remove")


def _decide(console: Console, request: Request, viewer: Viewer, form: FormData, decision: str) -> Response:
    entry_id = _entry_id(request)
    reason = reason_of(form)
    try:
        if decision == "remove":
            console.store.remove_entry(entry_id, viewer.username, reason, via="web")
        else:
            console.store.decide_entry(entry_id, viewer.username, decision == "approve", reason, via="web")
    except Refused as exc:
        return console.redirect("/lists", ("error", str(exc)))
    past = {"approve": "approved", "refuse": "refused", "remove": "removed"}[decision]
    return console.redirect("/lists", ("ok", f"Entry {entry_id} {past}."))


# --------------------------------------------------------------------------- audit


def _audit_query(request: Request, viewer: Viewer) -> tuple[dict[str, str], dict[str, Any], list[str]]:
    params = request.query_params
    shown = {k: params.get(k, "").strip()[:200] for k in ("actor", "action", "target", "since")}
    if viewer.role in ("dsl", "slt"):
        # DSL and SLT read only what they did themselves.
        shown["actor"] = viewer.username
    problems = []
    since = None
    if shown["since"]:
        try:
            since = parse_since(shown["since"])
        except argparse.ArgumentTypeError as exc:
            problems.append(f"Since: {exc}")
    query: dict[str, Any] = {
        "since": since,
        "actor": shown["actor"] or None,
        "action": shown["action"] or None,
        "target": shown["target"] or None,
    }
    return shown, query, problems


def audit(console: Console, request: Request, viewer: Viewer) -> Response:
    """Who did what, when and why: the same log the command line writes."""
    shown, query, problems = _audit_query(request, viewer)
    entries = console.store.audit_entries(**query, limit=500)
    chosen = {k: v for k, v in shown.items() if v}
    context = {
        "export_url": "/audit.csv" + (f"?{urlencode(chosen)}" if chosen else ""),
        "entries": [(e, _details(e.details)) for e in entries],
        "filters": shown,
        "problems": problems,
        "own_only": viewer.role in ("dsl", "slt"),
    }
    return console.render(request, "audit.html", context, viewer=viewer)


def _details(details: dict[str, Any]) -> str:
    """`key: value` pairs for the page (the CSV keeps the JSON)."""
    parts = []
    for key, value in sorted(details.items()):
        if isinstance(value, list | tuple):
            value = ", ".join(str(v) for v in value) or "–"
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True, default=str)
        parts.append(f"{key}: {value}")
    return " · ".join(parts)


def _cell(value: object) -> str:
    text = str(value)
    # A spreadsheet runs a cell that starts with = + - @ as a formula; targets and reasons
    # can come from outside (a sender address), so such cells are quoted.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def audit_csv(console: Console, request: Request, viewer: Viewer) -> Response:
    """The audit log (same filters) as CSV; the export itself is audited."""
    shown, query, problems = _audit_query(request, viewer)
    if problems:
        raise HttpError(400, problems[0])
    entries = console.store.audit_entries(**query, limit=100_000)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "at", "actor", "action", "target", "reason", "details"])
    for e in entries:
        writer.writerow(
            [
                e.id,
                e.at.isoformat(),
                _cell(e.actor),
                _cell(e.action),
                _cell(e.target),
                _cell(e.reason),
                _cell(json.dumps(e.details, sort_keys=True, default=str)),
            ]
        )
    console.store.audit(
        viewer.username,
        "export_audit",
        "",
        "",
        via="web",
        rows=len(entries),
        filters={k: v for k, v in shown.items() if v},
    )
    name = f"audit-{utcnow():%Y%m%d-%H%M}.csv"
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"},
    )
