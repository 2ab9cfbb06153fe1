"""Reference ids: short, unique, unguessable, quotable over the phone ("RB-7KQ2-M9XD")."""

from __future__ import annotations

import secrets

# Crockford's base32: no I, L, O or U, so a reference read aloud is not misheard.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_reference(prefix: str) -> str:
    # 40 random bits, five per character: one call for randomness instead of eight.
    bits = int.from_bytes(secrets.token_bytes(5), "big")
    chars = "".join(_ALPHABET[(bits >> shift) & 31] for shift in range(35, -1, -5))
    return f"{prefix}-{chars[:4]}-{chars[4:]}"
