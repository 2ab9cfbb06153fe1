"""Reference ids: short, unique, unguessable, quotable over the phone ("RB-7KQ2-M9XD")."""

from __future__ import annotations

import secrets

# Crockford's base32: no I, L, O or U, so a reference read aloud is not misheard.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_reference(prefix: str) -> str:
    chars = "".join(secrets.choice(_ALPHABET) for _ in range(8))
    return f"{prefix}-{chars[:4]}-{chars[4:]}"
