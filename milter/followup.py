"""What happens after a verdict, beyond the reply to the MTA: the quarantine store, guidance
mail to the sender, alerts to the roles rules/ names, and reports sent to the report address.

Mail the gateway writes goes into the store's outbox first and is delivered from there
(to the re-injection listener, which skips the milter), so a relay that is down delays
a guidance mail or an alert rather than losing it: it is retried with a growing wait for
days, as an MTA retries, and only then given up on, logged and counted.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from milter import notify
from milter.context import is_local, trusted_client
from milter.engine import Scan
from milter.envelope import Envelope
from milter.faults import failpoint
from milter.message import Message
from milter.modify import apply_to_bytes, modifications
from milter.policy.loader import Rules
from milter.policy.schema import Action, Direction
from milter.report import parse_report
from milter.store.store import HeldFilter, HeldRecord, OutboxItem, Store

log = logging.getLogger("school_milter")


def held_item(record: HeldRecord) -> notify.HeldItem:
    return notify.HeldItem(
        id=record.id,
        reference=record.id,
        received_at=record.received_at,
        direction=record.direction,
        sender=record.sender,
        recipients=record.recipients,
        subject=record.subject,
        action=record.action,
        categories=record.categories,
        findings=record.findings,
        size=record.size,
    )


@dataclass(frozen=True)
class OutboxRound:
    """One delivery round of the outbox: what was sent, what waits for a retry, what was given up."""

    sent: int = 0
    retrying: int = 0
    given_up: tuple[OutboxItem, ...] = ()
    # The first thing that went wrong (the item's number and reply codes, no content).
    problem: str | None = None


@dataclass(frozen=True)
class ReportTaken:
    id: str
    proposals: int
    linked: str | None


def is_report(envelope: Envelope, rules: Rules) -> bool:
    """Mail for the report address alone, from a trusted school sender (5.7).

    An outsider writing to the address is scanned like any other mail: only staff
    reports may propose blocks.
    """
    address = (rules.policy.school.report_address or "").lower()
    if not address or not envelope.rcpt_to:
        return False
    if any(r.lower() != address for r in envelope.rcpt_to):
        return False
    return bool(envelope.auth_user) or trusted_client(envelope.client_address, rules)


class FollowUp:
    def __init__(
        self,
        store: Store,
        relay: tuple[str, int] | None,
        *,
        console_url: str | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.store = store
        self.relay = relay
        self.console_url = console_url
        self.now = now

    # ------------------------------------------------------------------ holding

    def hold(self, raw: bytes, envelope: Envelope, result: Scan) -> str:
        """Store a quarantined message durably; the MTA is told to drop it only after this returns."""
        message = result.message
        # Kept as it would be delivered: forged result headers out, ours in, parents hidden
        # where the rules fix that, so a release sends what an accept would have.
        held_id, _new = self.store.hold(
            apply_to_bytes(raw, modifications(result.verdict, message)),
            envelope,
            result.verdict.as_dict(),
            subject=message.subject,
            header_from=message.from_address or "",
            message_id=(message.header("Message-ID") or "").strip(),
            sensitivity=message.header("Sensitivity"),
        )
        failpoint("after-hold")
        return held_id

    # ------------------------------------------------------- guidance and alerts

    def after_verdict(self, result: Scan, rules: Rules, held_id: str | None) -> None:
        """Queue the guidance mail and alerts a verdict calls for (never raises for one failure)."""
        try:
            self._guidance(result, rules)
        except Exception as exc:
            log.error("guidance mail for %s failed: %s", result.verdict.reference, type(exc).__name__)
        try:
            self._alerts(result, rules, held_id)
        except Exception as exc:
            log.error("alerts for %s failed: %s", result.verdict.reference, type(exc).__name__)

    def _guidance(self, result: Scan, rules: Rules) -> None:
        verdict, ctx = result.verdict, result.context
        settings = rules.policy.notifications
        if not settings.guidance or verdict.action not in (Action.REJECT, Action.FIX) or not ctx.sender:
            return
        mail = notify.guidance_message(
            verdict,
            ctx,
            rules,
            sender=ctx.sender,
            from_address=settings.from_address,
            original_message_id=result.message.header("Message-ID"),
        )
        if mail is None:
            return
        since = self.now() - dt.timedelta(hours=1)
        if self.store.sent_recently("guidance", ctx.sender, since) >= settings.guidance_per_hour:
            log.info(
                "guidance mail not sent: rate limit",
                extra={"event": "guidance", "reference": verdict.reference, "sent": False},
            )
            return
        self.store.queue_mail(
            "guidance", [ctx.sender], notify.wire_bytes(mail), about=ctx.sender, reference=verdict.reference
        )

    def _alerts(self, result: Scan, rules: Rules, held_id: str | None) -> None:
        verdict = result.verdict
        if not verdict.alerts:
            return
        digest_roles = set(rules.policy.notifications.digest_roles)
        immediate = [r for r in verdict.alerts if r not in digest_roles]
        if held_id:
            for role in verdict.alerts:
                if role in digest_roles:
                    self.store.add_pending_alert(role, held_id)
        if not immediate:
            return
        item = held_item(self.store.get(held_id)) if held_id else self._unheld_item(result)
        mail = notify.alert_message(item, immediate, rules, console_url=self.console_url)
        if mail is not None:
            recipients = [
                rules.policy.school.contacts[r] for r in immediate if r in rules.policy.school.contacts
            ]
            self.store.queue_mail(
                "alert",
                recipients,
                notify.wire_bytes(mail),
                about=",".join(immediate),
                reference=verdict.reference,
            )

    def _unheld_item(self, result: Scan) -> notify.HeldItem:
        """An alert about a message that was delivered or refused, not held (nothing to open)."""
        verdict, message = result.verdict, result.message
        return notify.HeldItem(
            id="",
            reference=verdict.reference,
            received_at=self.now(),
            direction=verdict.direction.value,
            sender=result.context.sender or "",
            recipients=result.context.recipients,
            subject=message.subject,
            action=verdict.action.value,
            categories=tuple(sorted({f"{f.detector}/{f.category}" for f in verdict.findings})),
            findings=tuple(f.as_dict() for f in verdict.findings),
            size=message.size,
        )

    def send_digest(self, role: str, rules: Rules, hours: int = 24) -> int:
        """Mail one role its digest: alerts deferred to it, and for the technicians' role
        everything held in the period; how many messages it listed."""
        records = {r.id: r for r in self.store.take_pending_alerts(role)}
        if role == rules.policy.notifications.quarantine_digest:
            since = self.now() - dt.timedelta(hours=hours)
            for record in self.store.find(
                HeldFilter(since=since, kind="quarantine", status="held"), limit=1000
            ):
                records.setdefault(record.id, record)
        period = "the last day" if hours == 24 else f"the last {hours} hours"
        if not records:
            return 0
        mail = notify.digest_message(
            [held_item(r) for r in sorted(records.values(), key=lambda r: r.received_at)],
            rules,
            role=role,
            period=period,
            console_url=self.console_url,
        )
        address = rules.policy.school.contacts.get(role)
        if mail is None or not address:
            return 0
        self.store.queue_mail("digest", [address], notify.wire_bytes(mail), about=role)
        return len(records)

    # -------------------------------------------------------------------- outbox

    def deliver_outbox(self, timeout: float = 30.0) -> tuple[int, int]:
        """Send what the outbox holds to the relay; (sent, not sent). Failures are retried later."""
        done = self.outbox_round(timeout)
        return done.sent, done.retrying + len(done.given_up)

    def outbox_round(self, timeout: float = 30.0) -> OutboxRound:
        """Send the outbox mail that is due to the relay. What the relay did not take waits
        longer before each retry (Store.outbox_failed) and is given up on after days.

        A mail the relay took for some recipients and refused for others counts as sent:
        retrying it would deliver it twice to those who have it.
        """
        if self.relay is None:
            return OutboxRound()
        items = self.store.claim_outbox()
        if not items:
            return OutboxRound()
        outcomes = notify.deliver(
            ((f"outbox {i.id}", i.recipients, i.data) for i in items), self.relay, timeout=timeout
        )
        sent = retrying = 0
        given_up: list[OutboxItem] = []
        first_problem: str | None = None
        for item, (taken, problem) in zip(items, outcomes, strict=True):
            # Problems name the item and reply codes, never content; the round's caller logs
            # one line for them all (one per item per round grew with the queue).
            first_problem = first_problem or problem
            if taken:
                self.store.outbox_done(item.id)
                sent += 1
            elif self.store.outbox_failed(item.id, problem or "not sent"):
                given_up.append(item)
                # Once per item, for good: kind and reference say what was lost, not who or what.
                log.error(
                    "outbox: giving up on a %s mail after %d attempts",
                    item.kind,
                    item.attempts,
                    extra={
                        "event": "outbox_given_up",
                        "outbox_id": item.id,
                        "kind": item.kind,
                        "reference": item.reference,
                        "attempts": item.attempts,
                        "last_error": problem,
                    },
                )
            else:
                retrying += 1
        return OutboxRound(sent, retrying, tuple(given_up), first_problem)

    # ------------------------------------------------------------------ reports

    def take_report(self, raw: bytes, envelope: Envelope, rules: Rules, reference: str) -> ReportTaken:
        """Keep a report (5.7), link it to the reported message, and propose blocks for a technician."""
        school = frozenset(rules.policy.school.domains)
        report = parse_report(raw, reporter=envelope.auth_user or envelope.mail_from, school_domains=school)
        linked = None
        if report.original_message_id:
            matches = self.store.find_by_message_id(report.original_message_id)
            linked = matches[0] if matches else None
        message = Message(raw)
        verdict = {
            "reference": reference,
            "action": "report",
            "direction": Direction.INTERNAL.value,
            "sender_role": "staff",
            "findings": [],
            "report": {
                "reporter": report.reporter,
                "original_from": report.original_from,
                "original_subject": report.original_subject,
                "original_message_id": report.original_message_id,
                "indicators": [{"kind": i.kind, "value": i.value, "note": i.note} for i in report.indicators],
            },
        }
        held_id, _new = self.store.hold(
            raw,
            envelope,
            verdict,
            subject=message.subject,
            header_from=message.from_address or "",
            message_id=(message.header("Message-ID") or "").strip(),
            kind="report",
            linked_id=linked,
        )
        reporter = report.reporter or envelope.mail_from or "report"
        proposals = 0
        for indicator in report.indicators:
            if indicator.kind in ("sender", "domain") and is_local(indicator.value, rules):
                continue
            self.store.add_entry(
                "block",
                indicator.kind,
                indicator.value,
                reporter,
                status="proposed",
                note=indicator.note,
                source=held_id,
                via="report",
            )
            proposals += 1
        return ReportTaken(held_id, proposals, linked)
