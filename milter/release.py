"""Release: deliver a held message once, to its original recipients or to those named.

The message is re-injected at the MTA's re-injection listener, which runs no milter, so
it is not scanned (and held) again. Only one release of a message can be in progress:
the store hands the message to one caller, and marks it released only after the relay
took it; a refused or failed delivery leaves it held, with the error in the audit log.
"""

from __future__ import annotations

import smtplib
from collections.abc import Sequence

from milter.store.store import Refused, Store


class ReleaseFailed(Exception):
    pass


def _released_header(held_id: str, actor: str) -> bytes:
    # Says in the delivered copy that a person let it through, and who: recipients and IT
    # can tell a released message from one that passed the scan.
    return f"X-School-Policy-Released: {held_id} by {actor}\r\n".encode("utf-8", "replace")


def release(
    store: Store,
    held_id: str,
    actor: str,
    reason: str,
    relay: tuple[str, int],
    recipients: Sequence[str] | None = None,
    *,
    via: str = "cli",
    timeout: float = 60.0,
) -> tuple[str, ...]:
    """Deliver the message; the recipients it went to. Raises Refused or ReleaseFailed."""
    if not reason.strip():
        raise Refused("a reason is required to release a message; it is audited")
    for address in recipients or ():
        if "@" not in address or any(c in address for c in "\r\n <>"):
            raise Refused(f"{address!r} is not a mail address")
    job = store.claim_release(held_id, actor, reason, recipients, via=via)
    try:
        with smtplib.SMTP(relay[0], relay[1], timeout=timeout) as client:
            refused = client.sendmail(
                job.mail_from, list(job.recipients), _released_header(job.id, actor) + job.raw
            )
    except (smtplib.SMTPException, OSError) as exc:
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
        store.finish_release(job, actor, reason, error, via=via)
        raise ReleaseFailed(f"{held_id} was not released (still held): {error}") from None
    if refused:
        # Some recipients took it: it counts as released (a second release would duplicate
        # it for them); the audit entry names who refused.
        store.audit(actor, "release_partial", job.id, reason, refused=sorted(refused))
    store.finish_release(job, actor, reason, via=via)
    return tuple(r for r in job.recipients if r not in refused)
