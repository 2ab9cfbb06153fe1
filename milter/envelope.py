"""Envelope: what the wire tells us about a message, apart from its content."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Envelope:
    """SMTP-level facts. Empty fields mean the wire did not say (for example a `scan` of a file)."""

    mail_from: str | None = None
    rcpt_to: tuple[str, ...] = ()
    client_address: str | None = None
    client_name: str | None = None
    helo: str | None = None
    auth_user: str | None = None
    queue_id: str | None = None
    macros: dict[str, str] = field(default_factory=dict)
    # The message came over the wire (milter or SMTP mode), not from a file given to `scan`.
    # A client address missing then means unknown, so it is not trusted; only a `scan` of a
    # file takes the sender's address at its word.
    from_wire: bool = False
