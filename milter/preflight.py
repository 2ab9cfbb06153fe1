"""`school-milter serve --check`: what a start would refuse or regret, found without starting.

For an operator before a restart or a reload (the systemd unit runs it as ExecStartPre and
before each ExecReload, so `systemctl reload` fails loudly instead of the workers keeping
the old rules in silence): the config (already parsed by the caller), the rules, the
milter socket's directory, SMTP mode's TLS files and spool, the quarantine store and
clamd. It binds no socket and changes nothing: the store is opened without migrating,
and a schema behind the code is reported as what the next start will do.

Each line is `ok`, `warning` (the gateway runs, but an operator should know) or
`problem` (a start would stop); the exit status is 2 when there is a problem, else 0.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from milter.config import Settings
from milter.errors import RulesError
from milter.policy.loader import Rules, load_rules


def describe_rules(rules: Rules) -> str:
    """What a rules directory holds, in one line (also check-rules' answer)."""
    return (
        f"{len(rules.policy.actions)} action rules, {len(rules.clauses)} clauses, "
        f"{len(rules.obscene)} lexicon terms, {len(rules.safeguarding.lexicon)} safeguarding terms, "
        f"{len(rules.domains)} listed domains, {len(rules.advertising)} advertising phrases, "
        f"{len(rules.directory) if rules.directory else 0} directory entries"
    )


class _Report:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.problems = 0

    def ok(self, what: str, detail: str) -> None:
        print(f"ok       {what}: {detail}", file=self.out)

    def warning(self, what: str, detail: str) -> None:
        print(f"warning  {what}: {detail}", file=self.out)

    def problem(self, what: str, detail: str) -> None:
        self.problems += 1
        print(f"problem  {what}: {detail}", file=self.out)


def preflight(settings: Settings, out: TextIO | None = None) -> int:
    """Check everything `serve` with these settings depends on; 0 when it would start, else 2."""
    out = out or sys.stdout
    report = _Report(out)
    rules = _rules(settings, report)
    _milter_socket(settings, report)
    if settings.smtp:
        _smtp_tls(settings, report)
        _spool(settings, report)
    if settings.database:
        _store(settings, report)
    else:
        report.ok("quarantine store", "none (database = ''): quarantined mail goes to the MTA's hold queue")
    if rules is not None:
        _clamd(rules, report)
    verdict = f"{report.problems} problem(s): the gateway would not start" if report.problems else "ready"
    print(verdict, file=out)
    return 2 if report.problems else 0


def _rules(settings: Settings, report: _Report) -> Rules | None:
    try:
        rules = load_rules(settings.rules)
    except RulesError as exc:
        for problem in exc.problems:
            report.problem("rules", str(problem))
        return None
    report.ok(f"rules {settings.rules}", describe_rules(rules))
    for warning in rules.warnings:
        report.warning("rules", warning)
    return rules


def _milter_socket(settings: Settings, report: _Report) -> None:
    if not settings.milter:
        if settings.smtp:
            report.ok("milter", "off (SMTP mode only)")
        else:
            report.problem("milter", "nothing to serve: neither milter nor smtp is set")
        return
    if settings.milter.startswith(("unix:", "local:")):
        path = Path(settings.milter.split(":", 1)[1])
        directory = path.parent
        if not directory.exists():
            report.problem("milter", f"the socket's directory {directory} does not exist")
            return
        if not directory.is_dir():
            report.problem("milter", f"the socket's directory {directory} is not a directory")
            return
        # The gateway creates (or replaces) its socket file there, as the user it runs as.
        if not os.access(directory, os.W_OK | os.X_OK):
            report.problem("milter", f"cannot create the socket in {directory}: permission denied")
            return
    # An inet port is not tried: before a reload the running gateway holds it.
    report.ok("milter", f"{settings.milter}, {settings.workers} worker(s)")


def _smtp_tls(settings: Settings, report: _Report) -> None:
    from milter.smtp_tls import (
        EXPIRY_WARNING_DAYS,
        TlsSetupError,
        certificate_expiry,
        relay_tls_context,
        server_tls_context,
    )

    try:
        if settings.smtp_tls_cert is not None and settings.smtp_tls_key is not None:
            server_tls_context(settings.smtp_tls_cert, settings.smtp_tls_key)
        relay_tls_context(settings.next_hop_tls, settings.next_hop_tls_ca)
    except TlsSetupError as exc:
        report.problem("SMTP mode TLS", str(exc))
        return
    if settings.smtp_tls_cert is None:
        report.ok("SMTP mode", f"{settings.smtp}, STARTTLS not offered; next hop TLS {settings.next_hop_tls}")
        return
    expires = certificate_expiry(settings.smtp_tls_cert)
    if expires is None:
        report.warning("SMTP mode TLS", f"the expiry date of {settings.smtp_tls_cert} could not be read")
        return
    days = (expires - datetime.now(UTC)).total_seconds() / 86400
    detail = f"{settings.smtp_tls_cert} expires on {expires.date().isoformat()}"
    if days < 0:
        report.warning("SMTP mode TLS", f"{detail}: expired; clients that check certificates refuse it")
    elif days < EXPIRY_WARNING_DAYS:
        report.warning("SMTP mode TLS", f"{detail}, in {int(days)} day(s): renew it")
    else:
        report.ok("SMTP mode TLS", f"{detail}; next hop TLS {settings.next_hop_tls}")


def _spool(settings: Settings, report: _Report) -> None:
    spool = settings.spool
    existing = next((p for p in (spool, *spool.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        report.problem("SMTP mode spool", f"{spool}: no directory to make it in")
        return
    stats = os.statvfs(existing)
    free = stats.f_bavail * stats.f_frsize
    where = str(spool) if existing == spool else f"{spool} (made at start)"
    if free < settings.spool_min_free:
        report.warning(
            "SMTP mode spool",
            f"{where}: {free // 1_000_000} MB free, under spool_min_free "
            f"({settings.spool_min_free // 1_000_000} MB): MAIL is answered 452 until there is room",
        )
    else:
        report.ok("SMTP mode spool", f"{where}, {free // 1_000_000} MB free")


def _store(settings: Settings, report: _Report) -> None:
    from milter.daemon import safe_url
    from milter.store import Store, migrate

    where = f"quarantine store {safe_url(settings.database)}"
    missing = _missing_sqlite_file(settings.database)
    if missing is not None:
        # Opening would create it: say what the start will do instead.
        report.ok(where, f"{missing} does not exist yet: it is made at the first start")
        return
    try:
        store = Store(settings.database, upgrade=False)
    except Exception as exc:  # a driver's own error types: name them, never the password
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        report.problem(where, f"cannot open: {type(exc).__name__}: {first_line}")
        return
    try:
        current, head = migrate.current(store.engine), migrate.head()
    except Exception as exc:
        report.problem(where, f"cannot read its schema version: {type(exc).__name__}")
        return
    finally:
        store.close()
    if current == head:
        report.ok(where, f"schema {head}, current")
    elif current is None:
        report.ok(where, "empty: its tables are made at the first start")
    else:
        report.warning(where, f"schema {current}: the next start upgrades it to {head}")


def _missing_sqlite_file(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


def _clamd(rules: Rules, report: _Report) -> None:
    from milter.clamd import ClamdClient, ClamdUnavailable

    virus_scan = rules.policy.detectors.virus_scan
    if not virus_scan.enabled:
        report.warning("clamd", "virus_scan is off in the rules: nothing is scanned for viruses")
        return
    try:
        version = ClamdClient(virus_scan.clamd, timeout=5).version()
    except ClamdUnavailable as exc:
        report.warning(
            f"clamd {virus_scan.clamd}",
            f"not answering ({exc}); until it does, mail with attachments gets "
            f"{virus_scan.unavailable_with_attachments}, "
            f"mail without {virus_scan.unavailable_without_attachments}",
        )
        return
    report.ok(f"clamd {virus_scan.clamd}", version)
