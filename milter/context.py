"""Context: who is sending, to whom, from where: direction and sender role under the rules."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from milter.envelope import Envelope
from milter.message import Message
from milter.policy.loader import Rules
from milter.policy.schema import Direction, Role


@dataclass(frozen=True)
class Context:
    direction: Direction
    sender_role: Role
    sender: str | None
    # Authenticated or on a trusted network: only such senders may be sent guidance mail.
    sender_trusted: bool
    recipients: tuple[str, ...]


def domain_of(address: str | None) -> str:
    return address.rsplit("@", 1)[-1].lower().strip(".>") if address and "@" in address else ""


def school_role(address: str | None, rules: Rules) -> Role | None:
    """The role an address has at the school: from the directory, else from its domain."""
    person = rules.directory.get(address) if rules.directory else None
    if person:
        return person.role
    domain = domain_of(address)
    domains = rules.policy.school.domains
    while domain:
        if domain in domains:
            return domains[domain]
        domain = domain.partition(".")[2]
    return None


def is_local(address: str | None, rules: Rules) -> bool:
    role = school_role(address, rules)
    return role is not None and role is not Role.PARENT


def trusted_client(address: str | None, rules: Rules) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.strip("[]").removeprefix("IPv6:"))
    except ValueError:
        return False
    return any(ip in net for net in rules.policy.school.trusted_networks)


def derive_context(envelope: Envelope, message: Message, rules: Rules) -> Context:
    sender = (envelope.mail_from or message.from_address or "").lower() or None
    recipients = tuple(r.lower() for r in envelope.rcpt_to) or tuple(message.header_recipients)
    trusted = bool(envelope.auth_user) or trusted_client(envelope.client_address, rules)
    # With no wire facts at all (a `scan` of a file), the sender's address is taken at its
    # word, so a school can ask "what would happen if this staff member sent this?". Mail
    # from an MTA whose client address it did not say (a local socket, [UNAVAILABLE]) is not.
    no_wire_facts = not envelope.from_wire and envelope.client_address is None and envelope.auth_user is None
    from_school = trusted or (no_wire_facts and is_local(sender, rules))
    if from_school:
        login = envelope.auth_user if envelope.auth_user and "@" in envelope.auth_user else sender
        role = school_role(login, rules) or school_role(sender, rules) or Role.STAFF
        internal = bool(recipients) and all(is_local(r, rules) for r in recipients)
        direction = Direction.INTERNAL if internal else Direction.OUTBOUND
    else:
        # A parent is known from the directory; any other outsider, or a school address
        # arriving from outside untrusted, is external.
        known = school_role(sender, rules) if not is_local(sender, rules) else None
        role = known or Role.EXTERNAL
        direction = Direction.INBOUND
    return Context(direction, role, sender, from_school, recipients)
