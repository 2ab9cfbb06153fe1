"""blocklist: received mail matching a block entry a technician approved (clause 5.7).

Entries come from the quarantine store (proposed by the report address or added with
`school-milter block`), not from rules/: they change at run time and apply to the next
message. An allow entry for the sender or its domain beats every block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from milter import lists
from milter.context import domain_of
from milter.findings import Finding, Severity
from milter.report import normal_url, text_fingerprint
from milter.urls import extract_urls

if TYPE_CHECKING:
    from milter.context import Context
    from milter.message import Message
    from milter.policy.loader import Rules

NAME = "blocklist"


def _domains_of(address: str) -> list[str]:
    """The address's domain and each parent: mail.evil.example, evil.example, example."""
    domain = domain_of(address)
    out = []
    while "." in domain:
        out.append(domain)
        domain = domain.partition(".")[2]
    return out


def check(message: Message, ctx: Context, rules: Rules) -> list[Finding]:
    settings = rules.policy.detectors.blocklist
    current = lists.current()
    if ctx.direction not in settings.directions or not any(current.blocked.values()):
        return []
    senders = {a for a in (ctx.sender, (message.from_address or "").lower()) if a}
    domains = {d for s in senders for d in _domains_of(s)}
    if senders & current.allows("sender") or domains & current.allows("domain"):
        return []
    found: list[Finding] = []

    def finding(kind: str, summary: str, evidence: str) -> None:
        found.append(Finding(NAME, kind, Severity.STRONG, settings.clause, summary, (evidence,)))

    for sender in sorted(senders & current.blocks("sender")):
        finding("sender", "The sender is on the school's block list", sender)
    for domain in sorted(domains & current.blocks("domain")):
        finding("domain", "The sender's domain is on the school's block list", domain)
    if current.blocks("url"):
        urls = extract_urls(f"{message.visible_text}\n{message.hidden_text}")
        urls.extend(link.href for link in message.html_links)
        seen = {n[0] for n in map(normal_url, urls) if n}
        for url in sorted(seen & current.blocks("url")):
            finding("url", "The message links to an address on the school's block list", url)
    fingerprints = current.blocks("fingerprint")
    if fingerprints:
        fingerprint = text_fingerprint(message)
        if fingerprint in fingerprints:
            finding("fingerprint", "The message's text matches reported offensive mail", fingerprint)
    return found
