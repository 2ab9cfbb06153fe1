"""The technicians' commands: `quarantine`, `block`, `allow` and `lists` (clauses 2.4-2.7, 5.7).

Who ran a command is the login that ran it (sudo's original user when run through
sudo), or --as; every body view and every change is written to the audit log.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import getpass
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from milter.config import Settings, host_port, load_settings
from milter.errors import RulesError
from milter.policy.loader import Rules, load_rules
from milter.store.store import HeldFilter, HeldRecord, Store, StoreError

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str) -> dt.datetime:
    """'7d', '12h', '30m', or an ISO date/time (UTC when no zone is given)."""
    match = _DURATION.match(text.strip())
    if match:
        return dt.datetime.now(dt.UTC) - dt.timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use 7d, 12h, 30m or an ISO date such as 2026-11-01"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def actor(args: argparse.Namespace) -> str:
    if getattr(args, "as_user", None):
        return str(args.as_user)
    return os.environ.get("SUDO_USER") or getpass.getuser()


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {"database": args.database, "reinject": getattr(args, "reinject", None)}
    return load_settings(args.config, overrides)


def _open(args: argparse.Namespace) -> Store:
    settings = _settings(args)
    if not settings.database:
        raise StoreError("no database configured (database = ... in the config, or --database)")
    return Store(settings.database)


def _rules(args: argparse.Namespace) -> Rules:
    if args.rules:
        return load_rules(Path(args.rules))
    from milter.cli import default_rules_dir  # the command line module imports this one

    return load_rules(_settings(args).rules if args.config else default_rules_dir())


def _when(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M") if value else "-"


def _print_record(record: HeldRecord) -> None:
    print(f"id:          {record.id}  ({record.kind}, {record.status})")
    print(f"received:    {_when(record.received_at)} UTC")
    print(f"direction:   {record.direction} (sender role {record.sender_role})")
    print(f"sender:      {record.sender or '<>'}  From: {record.header_from or '-'}")
    print(f"recipients:  {', '.join(record.recipients)}")
    print(f"subject:     {record.subject}")
    print(f"message-id:  {record.message_id or '-'}  queue id: {record.queue_id or '-'}")
    print(f"client:      {record.client_address or '-'}  authenticated: {record.auth_user or 'no'}")
    print(f"size:        {record.size} bytes  sha256 {record.body_sha256[:16]}...")
    print(f"verdict:     {record.action}; clauses {', '.join(record.verdict.get('clauses', [])) or '-'}")
    if record.personal:
        print("personal:    yes: the body opens only with authority recorded (clauses 2.6, 2.7)")
    if record.status_by:
        print(f"last action: {record.status} by {record.status_by} at {_when(record.status_at)}")
    if record.linked_id:
        print(f"reported:    {record.linked_id}")
    print("findings:")
    for f in record.findings:
        evidence = "; ".join(f.get("evidence", []))
        print(f"  - {f['detector']}/{f['category']} ({f['severity']}, clause {f['clause']}): {f['summary']}")
        if evidence:
            print(f"      evidence: {evidence}")
    report = record.verdict.get("report")
    if report:
        print(f"report from: {report.get('reporter')}; original sender {report.get('original_from') or '-'}")
        for i in report.get("indicators", []):
            print(f"  - {i['kind']}: {i['value']}")


def cmd_list(args: argparse.Namespace) -> int:
    store = _open(args)
    filters = HeldFilter(
        since=args.since,
        category=args.category,
        direction=args.direction,
        sender=args.sender,
        recipient=args.recipient,
        status=args.status,
        kind=args.kind,
    )
    records = store.find(filters, limit=args.limit)
    if args.json:
        for record in records:
            print(json.dumps(record.as_dict(), sort_keys=True))
        return 0
    if not records:
        print("nothing held matches")
        return 0
    print(f"{'ID':<14} {'RECEIVED (UTC)':<16} {'STATUS':<9} {'DIR':<8} {'SENDER':<30} CATEGORIES")
    for r in records:
        categories = " ".join(r.categories) or r.kind
        print(
            f"{r.id:<14} {_when(r.received_at):<16} {r.status:<9} {r.direction:<8} "
            f"{r.sender[:30]:<30} {categories}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = _open(args)
    record = store.get(args.id)
    if args.json:
        print(json.dumps(record.as_dict(), sort_keys=True, indent=2))
    else:
        _print_record(record)
    if args.reason is None:
        if not args.json:
            print("\n(body not shown: add --reason '...' to open it; the view is audited)")
        return 0
    body = store.body(args.id, actor(args), args.reason)
    print("\n----- message as received -----")
    sys.stdout.flush()
    sys.stdout.buffer.write(body)
    if not body.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from milter.release import ReleaseFailed, release

    settings = _settings(args)
    if not settings.reinject:
        raise StoreError("no reinject listener configured (reinject = HOST:PORT)")
    store = _open(args)
    try:
        sent_to = release(
            store, args.id, actor(args), args.reason, host_port(settings.reinject), args.to or None
        )
    except ReleaseFailed as exc:
        # The relay refused or could not be reached: still held, the error is in the audit log.
        print(f"school-milter: {exc}", file=sys.stderr)
        return 1
    print(f"{args.id} released to {', '.join(sent_to)}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _open(args).delete(args.id, actor(args), args.reason)
    print(f"{args.id}: body deleted")
    return 0


def cmd_authorize(args: argparse.Namespace) -> int:
    rules = _rules(args)
    who = actor(args)
    allowed = {a.lower() for a in rules.policy.quarantine.personal_authority}
    if who.lower() not in allowed:
        print(
            f"school-milter: {who} may not grant authority to open personal mail; "
            "rules/policy.yaml quarantine.personal_authority names who may (the Principal and nominees)",
            file=sys.stderr,
        )
        return 3
    _open(args).grant_authority(args.id, who, args.reason, args.for_user or "*")
    print(f"{args.id}: authority recorded by {who} for {args.for_user or 'any reviewer'}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    days = args.days if args.days is not None else _rules(args).policy.quarantine.retention_days
    ids = _open(args).purge(dt.timedelta(days=days), actor(args))
    print(f"purged {len(ids)} message(s) older than {days} days")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    data = _open(args).export_person(args.address, actor(args), args.reason)
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"{len(data['messages'])} record(s) written to {args.output}")
    else:
        print(text)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    entries = _open(args).audit_entries(
        since=args.since, actor=args.actor, action=args.action, target=args.target, limit=args.limit
    )
    if args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["id", "at", "actor", "action", "target", "reason", "details"])
        for e in entries:
            writer.writerow(
                [e.id, e.at.isoformat(), e.actor, e.action, e.target, e.reason, json.dumps(e.details)]
            )
        return 0
    for e in entries:
        reason = f" reason={e.reason!r}" if e.reason else ""
        print(f"{e.id:>6} {_when(e.at)} {e.actor:<16} {e.action:<16} {e.target}{reason}")
    return 0


def cmd_digest(args: argparse.Namespace) -> int:
    from milter.followup import FollowUp

    settings = _settings(args)
    rules = _rules(args)
    store = _open(args)
    followup = FollowUp(
        store,
        host_port(settings.reinject) if settings.reinject else None,
        console_url=settings.console_url or None,
    )
    roles = args.role or rules.policy.notifications.digest_roles or ["it"]
    for role in roles:
        count = followup.send_digest(role, rules)
        print(f"digest for {role}: {count} held message(s)")
    sent, failed = followup.deliver_outbox()
    print(f"outbox: {sent} sent, {failed} failed (failures are retried)")
    return 1 if failed else 0


def cmd_list_add(args: argparse.Namespace) -> int:
    entry = _open(args).add_entry(args.list_name, args.kind, args.value, actor(args), note=args.reason or "")
    print(f"{args.list_name} entry {entry}: {args.kind} {args.value} (applies to the next message)")
    return 0


def cmd_lists(args: argparse.Namespace) -> int:
    store = _open(args)
    if args.decision:
        if not (args.entry or "").isdigit():
            raise StoreError(f"lists {args.decision} needs the entry's number (see `school-milter lists`)")
        entry_id = int(args.entry)
        if args.decision == "remove":
            store.remove_entry(entry_id, actor(args), args.reason or "")
        else:
            store.decide_entry(entry_id, actor(args), args.decision == "approve", args.reason or "")
        print(f"entry {entry_id}: {args.decision}d")
        return 0
    for e in store.entries(args.list_name, args.status):
        decided = f" by {e.decided_by}" if e.decided_by else ""
        print(f"{e.id:>5} {e.list:<5} {e.status:<8}{decided:<14} {e.kind:<11} {e.value}  {e.note}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="the daemon's TOML config (for database and reinject)")
    p.add_argument("--database", help="SQLAlchemy URL of the store (overrides the config)")
    p.add_argument("--as", dest="as_user", metavar="NAME", help="who is acting (default: your login)")


def add_commands(sub: Any) -> None:
    q = sub.add_parser("quarantine", help="review held messages (list, show, release, delete, purge, ...)")
    qs = q.add_subparsers(dest="quarantine_command", required=True)

    p = qs.add_parser("list", help="held messages, newest first")
    _common(p)
    p.add_argument("--since", type=parse_since, help="7d, 12h or an ISO date")
    p.add_argument("--category", help="detector or detector/category, e.g. obscene_language")
    p.add_argument("--direction", choices=["inbound", "outbound", "internal"])
    p.add_argument("--sender")
    p.add_argument("--recipient")
    p.add_argument("--status", choices=["held", "releasing", "released", "deleted"])
    p.add_argument("--kind", choices=["quarantine", "report"])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = qs.add_parser("show", help="headers, findings and verdict; the body only with --reason (audited)")
    _common(p)
    p.add_argument("id")
    p.add_argument("--reason", help="why you open the body; recorded in the audit log")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = qs.add_parser("release", help="deliver once, to the original recipients or to --to")
    _common(p)
    p.add_argument("id")
    p.add_argument("--to", action="append", metavar="ADDRESS", help="deliver to this address instead; repeat")
    p.add_argument("--reason", required=True)
    p.add_argument("--reinject", help="HOST:PORT of the MTA listener without milter")
    p.set_defaults(func=cmd_release)

    p = qs.add_parser("delete", help="delete a held message's body for good")
    _common(p)
    p.add_argument("id")
    p.add_argument("--reason", required=True)
    p.set_defaults(func=cmd_delete)

    p = qs.add_parser("authorize", help="record authority to open a message marked personal (2.7)")
    _common(p)
    p.add_argument("id")
    p.add_argument("--reason", required=True)
    p.add_argument("--for", dest="for_user", help="the reviewer it is granted to (default: any)")
    p.set_defaults(func=cmd_authorize)

    p = qs.add_parser("purge", help="delete everything older than the retention period in rules/")
    _common(p)
    p.add_argument("--days", type=int, help="override rules' quarantine.retention_days")
    p.set_defaults(func=cmd_purge)

    p = qs.add_parser("export", help="one person's records, for a subject access request")
    _common(p)
    p.add_argument("address")
    p.add_argument("--reason", required=True)
    p.add_argument("--output", help="write the JSON here instead of standard output")
    p.set_defaults(func=cmd_export)

    p = qs.add_parser("audit", help="the audit log, newest first")
    _common(p)
    p.add_argument("--since", type=parse_since)
    p.add_argument("--actor")
    p.add_argument("--action")
    p.add_argument("--target")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_audit)

    p = qs.add_parser("digest", help="mail the daily quarantine digest and send pending mail")
    _common(p)
    p.add_argument("--role", action="append", help="contact role (default: rules' digest_roles)")
    p.add_argument("--reinject", help="HOST:PORT of the MTA listener without milter")
    p.set_defaults(func=cmd_digest)

    for name in ("block", "allow"):
        p = sub.add_parser(name, help=f"{name} a sender, domain, URL or text fingerprint at once")
        _common(p)
        p.add_argument("kind", choices=["sender", "domain", "url", "fingerprint"])
        p.add_argument("value")
        p.add_argument("--reason")
        p.set_defaults(func=cmd_list_add, list_name=name)

    p = sub.add_parser("lists", help="block/allow entries and proposals from the report address")
    _common(p)
    p.add_argument("decision", nargs="?", choices=["approve", "refuse", "remove"])
    p.add_argument("entry", nargs="?")
    p.add_argument("--list", dest="list_name", choices=["block", "allow"])
    p.add_argument("--status", choices=["proposed", "approved", "refused", "removed"])
    p.add_argument("--reason")
    p.set_defaults(func=cmd_lists)


def run(args: argparse.Namespace) -> int:
    """Run a store command; errors a user can make end in one clear line and status 2 or 3."""
    try:
        result: int = args.func(args)
        return result
    except StoreError as exc:
        print(f"school-milter: {exc}", file=sys.stderr)
        return 3
    except RulesError as exc:
        for problem in exc.problems:
            print(f"school-milter: {problem}", file=sys.stderr)
        return 2
