"""Mail the gateway writes to people: guidance to senders, alerts and digests to staff; and sending it.

What each mail may say is decided here, once. A sender is told what was found (category,
clause, masked evidence), never anything else of their message, and nothing at all when
the DSL was alerted about them. Staff alerts never carry the body; safeguarding alerts not
even the subject or the words matched. Sending is plain smtplib with an empty envelope
sender, so a notice that cannot be delivered never bounces back into the gateway.
"""

from __future__ import annotations

import email.policy
import logging
import re
import shlex
import smtplib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid
from typing import Any

import jinja2

from milter.context import Context, is_local
from milter.detectors.bulk_weight import human_size
from milter.detectors.safeguarding_concern import CATEGORIES as SAFEGUARDING_CATEGORIES
from milter.detectors.safeguarding_concern import CATEGORY_WORDS as SAFEGUARDING_WORDS
from milter.detectors.safeguarding_concern import NAME as SAFEGUARDING
from milter.lexicon import mask
from milter.policy.loader import Rules
from milter.verdict import Verdict

log = logging.getLogger(__name__)

__all__ = [
    "HeldItem",
    "alert_message",
    "default_from",
    "digest_message",
    "guidance_message",
    "safeguarding_roles",
    "send",
]

REFERENCE_HEADER = "X-School-Policy-Reference"
SUBJECT_TEMPLATE = "_subject.txt"
MAX_LISTED_RECIPIENTS = 10
MAX_SUBJECT_SHOWN = 200
# Mail system mailboxes (RFC 2142, RFC 3834): never sent guidance, whatever the verdict.
AUTOMATED_LOCAL_PARTS = frozenset({"postmaster", "mailer-daemon", "noreply", "no-reply"})
REVIEW_COMMAND = 'school-milter quarantine show {id} --reason "why you need to read it"'

# What happened to the message, in words for the people alerted.
ACTION_WORDS = {
    "accept": "delivered",
    "tag": "delivered with a warning tag",
    "fix": "delivered after the gateway changed it",
    "tempfail": "deferred (the sending server will retry)",
    "quarantine": "held for review (not delivered)",
    "discard": "discarded",
    "reject": "refused (returned to its sender)",
}
DIRECTION_WORDS = {
    "inbound": "received from outside the school",
    "outbound": "sent from the school to outside addresses",
    "internal": "sent within the school",
}
# A plain address: exactly one "@", no spaces, quotes, brackets or control characters.
_PLAIN_ADDRESS = re.compile(r"^[^\s@<>()\[\]\",;:\\]+@[A-Za-z0-9.-]+$")
_MESSAGE_ID = re.compile(r"^<[^<>\s]{1,250}>$")


@dataclass(frozen=True)
class HeldItem:
    """A message the gateway holds or alerted about, as the people alerted may see it (no content)."""

    id: str  # the quarantine id
    reference: str
    received_at: datetime
    direction: str
    sender: str
    recipients: tuple[str, ...]
    subject: str
    action: str
    categories: tuple[str, ...]
    findings: tuple[dict[str, Any], ...]  # Finding.as_dict(): evidence already masked
    size: int


# --- shared ------------------------------------------------------------------------------


def default_from(rules: Rules) -> str:
    """The no-reply address notices come from: postmaster at the school's first mail domain."""
    return f"postmaster@{next(iter(rules.policy.school.domains))}"


def _plain_address(address: str | None) -> bool:
    return bool(address) and _PLAIN_ADDRESS.match(address or "") is not None


def _one_line(text: str, limit: int = MAX_SUBJECT_SHOWN) -> str:
    """Whitespace folded to single spaces (no header injection), invisible characters shown, length capped.

    Control and format characters (a right-to-left override in "invoice\u202egpj.exe",
    zero-width spaces) are written as <U+202E>, so a file name cannot pose as another.
    """
    flat = "".join(c if c.isprintable() else f"<U+{ord(c):04X}>" for c in " ".join(text.split()))
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _new_message(rules: Rules, *, to: Sequence[str], subject: str, from_address: str | None) -> EmailMessage:
    msg = EmailMessage()
    sender = from_address or default_from(rules)
    if from_address:
        msg["From"] = sender
    else:
        name = f"{rules.policy.school.name} mail gateway"
        msg["From"] = Address(display_name=name, addr_spec=sender)
    msg["To"] = ", ".join(to)
    msg["Subject"] = _one_line(subject, 250)
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2].strip(">") or None)
    # Exchange and most vacation responders stay quiet for mail marked like this.
    msg["X-Auto-Response-Suppress"] = "All"
    return msg


def _addresses_for(roles: Iterable[str], rules: Rules) -> list[str]:
    contacts = rules.policy.school.contacts
    return list(dict.fromkeys(contacts[r] for r in roles if contacts.get(r)))


def _is_safeguarding(item: HeldItem) -> bool:
    return any(f.get("detector") == SAFEGUARDING for f in item.findings) or any(
        c == SAFEGUARDING or c.startswith(f"{SAFEGUARDING}/") or c in SAFEGUARDING_CATEGORIES
        for c in item.categories
    )


def safeguarding_roles(rules: Rules) -> set[str]:
    """The roles the rules alert about safeguarding findings: the only ones told a child's concern."""
    return {
        role
        for rule in rules.policy.actions
        if rule.detector and SAFEGUARDING in rule.detector
        for role in rule.alert
    }


def _category_words(detector: str, category: str) -> str:
    """A finding in words: "obscene language: profanity", "missing bcc", "possible self-harm concern"."""
    if detector == SAFEGUARDING or (not detector and category in SAFEGUARDING_CATEGORIES):
        return f"possible {SAFEGUARDING_WORDS.get(category, category.replace('_', ' '))} concern"
    words = detector.replace("_", " ")
    if category in ("", detector):
        return words
    return f"{words}: {category.replace('_', ' ')}" if words else category.replace("_", " ")


def _labels(item: HeldItem) -> list[str]:
    """What was found, in words: from the findings, else from the stored categories."""
    pairs: list[tuple[str, str]] = []
    if item.findings:
        pairs = [(str(f.get("detector", "")), str(f.get("category", ""))) for f in item.findings]
    else:
        for stored in item.categories:
            detector, _, category = stored.rpartition("/")
            pairs.append((detector, category))
    return list(dict.fromkeys(_category_words(d, c) for d, c in pairs))


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _recipients_line(recipients: Sequence[str]) -> str:
    shown = [_one_line(r, 120) for r in recipients[:MAX_LISTED_RECIPIENTS]]
    more = len(recipients) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "") if shown else "(none)"


def _shown_subject(subject: str, rules: Rules) -> str:
    """The held message's subject for staff, unless the obscene-language list matches it."""
    hits = rules.obscene.find_text(subject) if subject else []
    if hits:
        # The raw words would go round the mail system again (and trip the gateway itself).
        words = ", ".join(dict.fromkeys(mask(h.term.text) for h in hits))
        return f"(withheld: it contains {words})"
    return _one_line(subject) or "(no subject)"


def _review_lines(item: HeldItem, console_url: str | None) -> list[str]:
    lines: list[str] = []
    if item.action == "quarantine" and item.id:
        lines += [
            "To review it:",
            "  " + REVIEW_COMMAND.format(id=shlex.quote(item.id)),
            "  Every look at a held message is recorded with its reason (policy 2.4 to 2.7);",
            "  mail marked personal needs the authority of the Principal or a nominee first.",
        ]
    else:
        lines.append(
            f"The gateway did not keep this message: quote reference {item.reference} to find its "
            "decision in the gateway's logs."
        )
    if console_url:
        lines.append(f"Review console: {_console_link(console_url, item.id)}")
    return lines


def _console_link(console_url: str, item_id: str) -> str:
    # A console address may say where one item is shown: https://console.example/held/{id}
    return console_url.replace("{id}", item_id)


# --- guidance to senders -----------------------------------------------------------------


def _guidance_variables(verdict: Verdict, ctx: Context, rules: Rules) -> dict[str, Any]:
    # The same variables milter.guidance.render_guidance gives, so a template renders either way.
    school = rules.policy.school
    findings = [
        {
            **f.as_dict(),
            "evidence": [_one_line(e, 300) for e in f.evidence],
            "clause_title": rules.clause(f.clause).title,
            "clause_text": rules.clause(f.clause).text,
        }
        for f in verdict.findings
    ]
    return {
        "reference": verdict.reference,
        "action": verdict.action.value,
        "sender": ctx.sender or "",
        "school": school.name,
        "review_address": school.review_address or "",
        "findings": findings,
        "clauses": [rules.clause(c) for c in verdict.clauses],
        "guidance": list(verdict.guidance),
    }


def _render_guidance(variables: dict[str, Any], names: Sequence[str], rules: Rules, suffix: str) -> str:
    """One body from each named template; the greeting and footer once (first/last) for the whole mail."""
    findings: list[dict[str, Any]] = variables["findings"]
    parts = []
    for i, name in enumerate(names):
        template = rules.templates.get_template(f"{name}.{suffix}")
        mine = [f for f in findings if name in (f["detector"], f["category"])]
        parts.append(
            template.render(**variables, these=mine or findings, first=i == 0, last=i == len(names) - 1)
        )
    return "\n".join(parts)


def _guidance_subject(variables: dict[str, Any], rules: Rules) -> str:
    try:
        template = rules.templates.get_template(SUBJECT_TEMPLATE)
    except jinja2.TemplateNotFound:
        verb = "changed before delivery" if variables["action"] == "fix" else "not delivered"
        return f"Your message was {verb} (reference {variables['reference']})"
    return _one_line(template.render(**variables), 250)


def guidance_message(
    verdict: Verdict,
    ctx: Context,
    rules: Rules,
    *,
    sender: str,
    from_address: str | None = None,
    original_message_id: str | None = None,
) -> EmailMessage | None:
    """The mail that tells a school sender why their message was stopped and how to fix it.

    None (send nothing) unless the sender is trusted, is a plain school address, and the
    verdict names guidance; never when the DSL is alerted about the message, and never to
    the gateway's own address or another mail-system mailbox (postmaster, mailer-daemon).
    """
    if not ctx.sender_trusted or not verdict.guidance:
        return None
    if not _plain_address(sender) or not is_local(sender, rules):
        return None
    # Never answer the gateway's own notices (or any mail system address): no notice loops.
    own = (from_address or default_from(rules)).lower()
    if sender.lower() == own or sender.partition("@")[0].lower() in AUTOMATED_LOCAL_PARTS:
        return None
    # A child must never learn from a bounce that the safeguarding lead was told.
    if any(f.detector == SAFEGUARDING for f in verdict.findings):
        return None
    variables = {**_guidance_variables(verdict, ctx, rules), "sender": sender}
    names = list(verdict.guidance)
    text = _render_guidance(variables, names, rules, "txt")
    try:
        html: str | None = _render_guidance(variables, names, rules, "html")
    except jinja2.TemplateNotFound as exc:
        log.warning("guidance %s has no HTML template; sending plain text only", exc.name)
        html = None

    msg = _new_message(
        rules, to=[sender], subject=_guidance_subject(variables, rules), from_address=from_address
    )
    msg["Auto-Submitted"] = "auto-replied"
    msg[REFERENCE_HEADER] = verdict.reference
    if rules.policy.school.review_address:
        # The From is a no-reply address: a reply reaches the people who can review.
        msg["Reply-To"] = rules.policy.school.review_address
    if original_message_id and _MESSAGE_ID.match(original_message_id.strip()):
        msg["In-Reply-To"] = original_message_id.strip()
        msg["References"] = original_message_id.strip()
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return msg


# --- alerts and the digest ---------------------------------------------------------------


def _finding_lines(item: HeldItem, rules: Rules) -> list[str]:
    lines = []
    for f in item.findings:
        evidence = [str(e) for e in f.get("evidence", []) or []]
        clause = str(f.get("clause", ""))
        title = rules.clause(clause).title
        where = "Appendix 1" if clause == "appendix" else f"clause {clause}"
        shown = f" ({'; '.join(_one_line(e, 120) for e in evidence)})" if evidence else ""
        lines.append(f"  - {_one_line(str(f.get('summary', '')), 300)}{shown}")
        lines.append(f"    {f.get('detector')}/{f.get('category')}, {f.get('severity')}, {where}: {title}")
    if not lines:
        lines = [f"  - {label}" for label in _labels(item)]
    return lines


def alert_message(
    held: HeldItem,
    roles: list[str],
    rules: Rules,
    *,
    console_url: str | None = None,
    from_address: str | None = None,
) -> EmailMessage | None:
    """An alert to the people the rules name for these roles (unknown roles skipped); None if nobody.

    Never the body. A safeguarding alert carries only the concern, the reference, the
    sender and the recipients (plus when and what happened, and how to review).
    """
    to = _addresses_for(roles, rules)
    if not to:
        return None
    school = rules.policy.school.name
    happened = ACTION_WORDS.get(held.action, held.action)
    labels = _labels(held)
    lines: list[str]
    if _is_safeguarding(held):
        subject = f"Safeguarding alert for the designated safeguarding lead (reference {held.reference})"
        lines = [
            f"The {school} mail gateway found a possible safeguarding concern in a message.",
            "",
            f"Concern:    {'; '.join(labels)}",
            f"Reference:  {held.reference}",
            f"From:       {_one_line(held.sender, 120) or '(empty sender)'}",
            f"To:         {_recipients_line(held.recipients)}",
            f"Received:   {_when(held.received_at)}",
            f"Message:    {happened}",
            "",
            "This alert does not contain the message, its subject or the words that were matched.",
            "",
        ]
    else:
        verb = happened.split(" (")[0]
        shown = "; ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
        subject = f"Mail {verb}: {shown} (reference {held.reference})"
        lines = [
            f"The {school} mail gateway acted on a message under the Electronic Communications",
            "Policy, and its rules ask that you are told.",
            "",
            f"Reference:  {held.reference}",
            f"Message:    {happened}",
            f"Received:   {_when(held.received_at)}",
            f"Direction:  {DIRECTION_WORDS.get(held.direction, held.direction)}",
            f"From:       {_one_line(held.sender, 120) or '(empty sender)'}",
            f"To:         {_recipients_line(held.recipients)}",
            f"Subject:    {_shown_subject(held.subject, rules)}",
            f"Size:       {human_size(held.size)}",
            "",
            "What was found (words are masked):",
            *_finding_lines(held, rules),
            "",
            "This alert does not contain the message itself.",
            "",
        ]
    lines += _review_lines(held, console_url)
    msg = _new_message(rules, to=to, subject=subject, from_address=from_address)
    msg["Auto-Submitted"] = "auto-generated"
    msg[REFERENCE_HEADER] = held.reference
    msg.set_content("\n".join(lines) + "\n")
    return msg


def _digest_entry(item: HeldItem, rules: Rules, *, told_safeguarding: bool) -> list[str]:
    head = f"{item.reference}  (held as {item.id})" if item.id else item.reference
    lines = [head, f"  Received:  {_when(item.received_at)}, {item.direction}, {human_size(item.size)}"]
    if _is_safeguarding(item):
        if not told_safeguarding:
            return [
                *lines,
                "  A safeguarding matter for the designated safeguarding lead: no details here.",
                "",
            ]
        return [
            *lines,
            f"  Concern:   {'; '.join(_labels(item))}",
            f"  From:      {_one_line(item.sender, 120) or '(empty sender)'}",
            f"  To:        {_recipients_line(item.recipients)}",
            f"  Message:   {ACTION_WORDS.get(item.action, item.action)}",
            "",
        ]
    found = []
    for f in item.findings:
        evidence = "; ".join(_one_line(str(e), 80) for e in f.get("evidence", []) or [])
        label = _category_words(str(f.get("detector", "")), str(f.get("category", "")))
        found.append(f"{label} ({evidence})" if evidence else label)
    return [
        *lines,
        f"  From:      {_one_line(item.sender, 120) or '(empty sender)'}",
        f"  To:        {_recipients_line(item.recipients)}",
        f"  Subject:   {_shown_subject(item.subject, rules)}",
        f"  Found:     {'; '.join(found or _labels(item))}",
        f"  Message:   {ACTION_WORDS.get(item.action, item.action)}",
        "",
    ]


def digest_message(
    items: list[HeldItem],
    rules: Rules,
    *,
    role: str,
    period: str,
    console_url: str | None = None,
    from_address: str | None = None,
) -> EmailMessage | None:
    """The daily list of held mail for one role (technicians); None when nothing was held or nobody to tell.

    Safeguarding items are listed with their concern only for roles the rules alert about
    safeguarding; to anyone else they are a line saying the DSL has them.
    """
    to = _addresses_for([role], rules)
    if not items or not to:
        return None
    told_safeguarding = role in safeguarding_roles(rules)
    school = rules.policy.school.name
    counts: Counter[str] = Counter()
    for item in items:
        if _is_safeguarding(item) and not told_safeguarding:
            counts["safeguarding (for the designated safeguarding lead)"] += 1
        else:
            counts.update(_labels(item))
    width = max(len(k) for k in counts)
    lines = [
        f"Quarantine digest for {period}: {len(items)} message(s) held by the {school} mail gateway.",
        "",
        "By finding:",
        *(f"  {label.ljust(width)}  {n}" for label, n in counts.most_common()),
        "",
        "Held messages (no message content is included; words are masked):",
        "",
    ]
    for item in items:
        lines += _digest_entry(item, rules, told_safeguarding=told_safeguarding)
    lines += [
        "To review one:",
        "  " + REVIEW_COMMAND.format(id="ID"),
        "  Every look at a held message is recorded with its reason (policy 2.4 to 2.7);",
        "  mail marked personal needs the authority of the Principal or a nominee first.",
    ]
    if console_url:
        lines.append(f"Review console: {_console_link(console_url, '')}")
    subject = f"Quarantine digest, {_one_line(period, 60)}: {len(items)} message(s) held"
    msg = _new_message(rules, to=to, subject=subject, from_address=from_address)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content("\n".join(lines) + "\n")
    return msg


# --- sending -----------------------------------------------------------------------------


def _label(msg: EmailMessage, number: int) -> str:
    return str(msg.get(REFERENCE_HEADER) or msg.get("Message-ID") or f"message {number}")


def _envelope_recipients(msg: EmailMessage) -> list[str]:
    fields = [str(v) for name in ("To", "Cc", "Bcc") for v in msg.get_all(name, [])]
    return [addr for _, addr in getaddresses(fields) if addr]


def wire_bytes(mail: EmailMessage) -> bytes:
    """The mail as sent over SMTP: CRLF line ends (bytes() would give bare LFs)."""
    return mail.as_bytes(policy=email.policy.SMTP)


def send(messages: Iterable[EmailMessage], relay: tuple[str, int], *, timeout: float = 30) -> list[str]:
    """Deliver each message to the relay with MAIL FROM:<> (no bounce loops); the failures, briefly."""
    items = (
        (_label(msg, number), _envelope_recipients(msg), wire_bytes(msg))
        for number, msg in enumerate(messages, 1)
    )
    return [problem for _, problem in deliver(items, relay, timeout=timeout) if problem]


def deliver(
    items: Iterable[tuple[str, Sequence[str], bytes]], relay: tuple[str, int], *, timeout: float = 30
) -> list[tuple[bool, str | None]]:
    """Each (label, recipients, message bytes) to the relay with MAIL FROM:<>; per item, whether
    the relay took it (for at least one recipient) and what went wrong, briefly.

    One connection for them all. A message the relay refuses does not stop the others; once
    the relay cannot be reached, the rest are reported as not sent rather than each waiting
    out its own timeout. Problem strings name the label and the reply code, never the
    message's content or addresses.
    """
    host, port = relay
    outcomes: list[tuple[bool, str | None]] = []
    smtp: smtplib.SMTP | None = None
    unreachable: str | None = None
    try:
        for label, recipients, data in items:
            if not recipients:
                outcomes.append((False, f"{label}: no recipients"))
                continue
            if unreachable:
                outcomes.append((False, f"{label}: not sent, {unreachable}"))
                continue
            try:
                if smtp is None:
                    smtp = smtplib.SMTP(host, port, timeout=timeout)
            except (OSError, smtplib.SMTPException) as exc:
                unreachable = f"relay {host}:{port} unreachable ({type(exc).__name__})"
                outcomes.append((False, f"{label}: {unreachable}"))
                continue
            try:
                refused = smtp.sendmail("", list(recipients), data)
            except smtplib.SMTPRecipientsRefused as exc:
                codes = sorted({code for code, _ in exc.recipients.values()})
                outcomes.append(
                    (False, f"{label}: all {len(recipients)} recipient(s) refused ({_codes(codes)})")
                )
            except smtplib.SMTPResponseException as exc:
                # Sender or data refused: smtplib has reset the transaction; the connection is usable.
                outcomes.append((False, f"{label}: refused by the relay ({exc.smtp_code})"))
                if exc.smtp_code == 421:  # the relay is closing the connection
                    smtp.close()
                    smtp = None
            except (OSError, smtplib.SMTPException) as exc:
                outcomes.append((False, f"{label}: not sent ({type(exc).__name__})"))
                smtp.close()
                smtp = None
            else:
                problem = None
                if refused:
                    codes = sorted({code for code, _ in refused.values()})
                    problem = (
                        f"{label}: {len(refused)} of {len(recipients)} recipient(s) refused ({_codes(codes)})"
                    )
                outcomes.append((True, problem))
    finally:
        if smtp is not None:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                smtp.close()
    return outcomes


def _codes(codes: Iterable[int]) -> str:
    return ", ".join(str(c) for c in codes)
