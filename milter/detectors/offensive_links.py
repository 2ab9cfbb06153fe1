"""offensive_links: links to listed adult, hate or malware sites, and links that lie (5.5)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from milter.findings import Finding, Severity
from milter.urls import deceptive_link, extract_urls, url_host

if TYPE_CHECKING:
    from milter.context import Context
    from milter.message import Message
    from milter.policy.loader import Rules

NAME = "offensive_links"
MAX_EVIDENCE = 5
# The authority part of an ordinary web URL. Newsletters carry dozens of links to a few
# hosts; reading each authority once keeps url_host (which handles every trick) off the
# hot path. Anything unusual (no "//", backslashes) goes to url_host whole.
_AUTHORITY = re.compile(r"\s*(?:https?|ftp)://([^/?#\\\s]*)(?:[/?#]|\s*$)", re.IGNORECASE)


def hosts_of(urls: list[str]) -> list[str]:
    """Distinct hosts of the URLs, in order."""
    by_authority: dict[str, str | None] = {}
    hosts: dict[str, None] = {}
    for url in urls:
        match = _AUTHORITY.match(url)
        if match:
            authority = match.group(1)
            if authority not in by_authority:
                by_authority[authority] = url_host(f"http://{authority}/")
            host = by_authority[authority]
        else:
            host = url_host(url)
        if host:
            hosts[host] = None
    return list(hosts)


def check(message: Message, ctx: Context, rules: Rules) -> list[Finding]:
    settings = rules.policy.detectors.offensive_links
    urls = extract_urls(f"{message.subject}\n{message.visible_text}\n{message.hidden_text}")
    urls.extend(link.href for link in message.html_links)
    listed: dict[str, list[str]] = {}
    for host in hosts_of(urls):
        match = rules.domains.match(host)
        if match:
            domains = listed.setdefault(match.category, [])
            if match.domain not in domains:
                domains.append(match.domain)
    findings = [
        Finding(
            NAME,
            category,
            settings.severity.get(category, Severity.STRONG),
            settings.clause,
            f"links to {len(domains)} site(s) on the school's {category} list",
            tuple(domains[:MAX_EVIDENCE]),
            "links",
        )
        for category, domains in listed.items()
    ]
    if settings.deceptive_links:
        lies = list(
            dict.fromkeys(d for link in message.html_links if (d := deceptive_link(link.href, link.text)))
        )
        if lies:
            findings.append(
                Finding(
                    NAME,
                    "deceptive_link",
                    Severity.MILD,
                    settings.clause,
                    f"{len(lies)} link(s) show one site but lead to another",
                    tuple(f"shows {shown}, goes to {actual}" for shown, actual in lies[:MAX_EVIDENCE]),
                    "links",
                )
            )
    return findings
