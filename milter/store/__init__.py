"""The quarantine store (SQLAlchemy 2, Alembic): held messages, audit log, lists, outbox."""

from milter.store.store import (
    HeldFilter,
    HeldRecord,
    NotFound,
    Refused,
    Store,
    StoreError,
)

__all__ = ["HeldFilter", "HeldRecord", "NotFound", "Refused", "Store", "StoreError"]
