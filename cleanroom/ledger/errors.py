"""Errors raised by the audit ledger.

Two families, kept apart on purpose:

- :class:`EntrySchemaError` is *our* mistake (or the caller's): an event that does not fit
  the entry schema. It names the event type, the field and the rule that refused it.
- :class:`VerificationError` is raised by the cryptographic layer (signed notes, Merkle
  proofs, cosignatures). It is deliberately opaque: one type, one message, no hint which
  check failed, so a forger learns nothing from it. The ledger *verifier*
  (:mod:`cleanroom.ledger.verify`) is the place that names the first bad entry and why.

This module must not import anything heavier than :mod:`cleanroom.errors`.
"""

from __future__ import annotations

from cleanroom.errors import CleanroomError


class LedgerError(CleanroomError):
    """Base class for ledger errors shown to the operator."""


class EntrySchemaError(LedgerError):
    """An event does not fit the ledger schema: names the event type, the field and the rule."""

    def __init__(self, message: str, *, event_type: str | None = None, field: str | None = None):
        self.event_type = event_type
        self.field = field
        self.detail = message
        where = []
        if event_type is not None:
            where.append(f"event {event_type!r}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = ", ".join(where)
        text = f"{prefix}: {message}" if prefix else message
        super().__init__(f"ledger entry: {text}")


class VerificationError(LedgerError):
    """A signature, note or proof failed to verify. Opaque by design."""

    def __init__(self) -> None:
        super().__init__("verification failed")


class LedgerStateError(LedgerError):
    """The ledger database is not in a state this operation accepts (e.g. a second writer)."""
