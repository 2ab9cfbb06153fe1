"""Direction and sender role, from the envelope, the school's domains, networks and directory."""

from __future__ import annotations

import pytest

from milter.context import derive_context
from milter.envelope import Envelope
from milter.message import Message
from milter.policy.loader import Rules
from milter.policy.schema import Direction, Role
from tests.mail import build

STAFF = "j.hughes@redborne.example"
STUDENT = "sam.taylor@students.redborne.example"
PARENT = "jane.taylor@gmail.example"
OUTSIDER = "x@elsewhere.example"


@pytest.mark.parametrize(
    ("sender", "rcpts", "envelope", "direction", "role", "trusted"),
    [
        (STAFF, [STUDENT], {}, Direction.INTERNAL, Role.STAFF, True),
        (STUDENT, [STAFF], {}, Direction.INTERNAL, Role.STUDENT, True),
        (STAFF, [STUDENT, OUTSIDER], {}, Direction.OUTBOUND, Role.STAFF, True),
        (STAFF, [PARENT], {}, Direction.OUTBOUND, Role.STAFF, True),
        (PARENT, [STAFF], {"client_address": "198.51.100.1"}, Direction.INBOUND, Role.PARENT, False),
        (OUTSIDER, [STAFF], {}, Direction.INBOUND, Role.EXTERNAL, False),
        # A school address from an untrusted client is not believed: inbound, external.
        (STAFF, [STUDENT], {"client_address": "198.51.100.1"}, Direction.INBOUND, Role.EXTERNAL, False),
        # Trusted network: the school's own systems.
        (STAFF, [OUTSIDER], {"client_address": "10.20.3.4"}, Direction.OUTBOUND, Role.STAFF, True),
        # Authenticated: the login decides the role, whatever the client address.
        (
            STUDENT,
            [OUTSIDER],
            {"client_address": "198.51.100.1", "auth_user": STUDENT},
            Direction.OUTBOUND,
            Role.STUDENT,
            True,
        ),
        # Subdomains of a school domain are the school's too.
        ("a@mail.redborne.example", [STAFF], {}, Direction.INTERNAL, Role.STAFF, True),
    ],
)
def test_direction_and_role(
    rules: Rules,
    sender: str,
    rcpts: list[str],
    envelope: dict[str, str],
    direction: Direction,
    role: Role,
    trusted: bool,
) -> None:
    message = Message(build(sender, rcpts))
    ctx = derive_context(Envelope(mail_from=sender, rcpt_to=tuple(rcpts), **envelope), message, rules)
    assert (ctx.direction, ctx.sender_role, ctx.sender_trusted) == (direction, role, trusted)


def test_header_recipients_used_when_envelope_has_none(rules: Rules) -> None:
    message = Message(build(STAFF, [STUDENT], bcc=[OUTSIDER]))
    ctx = derive_context(Envelope(), message, rules)
    assert ctx.direction is Direction.OUTBOUND
    assert OUTSIDER in ctx.recipients
