"""The audit ledger: an append-only RFC 6962 Merkle log of canonical JSON entries, with
C2SP signed checkpoints and cross-party cosignatures (witnessing).

Public API (what the node, the ``audit`` CLI and the HTML report build on):

- :class:`Ledger` — the facade: append events, sign checkpoints, proofs, entries, witness,
  verify; :func:`create_tables` for the ledger's tables alone.
- :class:`Event`, :func:`event`, :func:`digest`, :func:`new_id` — building entries;
  :func:`find_raw_looking` / :func:`scan_entries` — raw-data scanners for tests.
- :mod:`cleanroom.ledger.merkle`, :mod:`cleanroom.ledger.note` — the crypto layer.
- :func:`verify_store` / :class:`VerifyReport` — verification with named problems.
- :func:`witness_checkpoint` / :class:`WitnessAlarm` — pure witness logic.

Nothing in this package sends anything over a network; no entry holds raw data.
"""

from cleanroom.ledger.entries import (
    EVENT_SCHEMAS,
    EVENT_TYPES,
    SCHEMA_VERSION,
    Entry,
    Event,
    canonical_json,
    decode_entry,
    digest,
    digest_of_hash,
    event,
    find_raw_looking,
    new_id,
    now_ms,
    scan_entries,
)
from cleanroom.ledger.errors import (
    EntrySchemaError,
    LedgerError,
    LedgerStateError,
    VerificationError,
)
from cleanroom.ledger.ledger import Ledger, StoredEntry
from cleanroom.ledger.note import (
    SIG_COSIGNATURE_V1,
    SIG_ED25519,
    Checkpoint,
    Cosignature,
    NoteSigner,
    NoteVerifier,
)
from cleanroom.ledger.store import (
    LedgerCheckpointRow,
    LedgerCosignatureRow,
    LedgerEntryRow,
    LedgerPeerStateRow,
    LedgerStore,
    create_tables,
)
from cleanroom.ledger.verify import AlarmRecord, Problem, ProblemKind, VerifyReport, verify_store
from cleanroom.ledger.witness import Alarm, PeerCheckpoint, WitnessAlarm, witness_checkpoint

__all__ = [
    "EVENT_SCHEMAS",
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "SIG_COSIGNATURE_V1",
    "SIG_ED25519",
    "Alarm",
    "AlarmRecord",
    "Checkpoint",
    "Cosignature",
    "Entry",
    "EntrySchemaError",
    "Event",
    "Ledger",
    "LedgerCheckpointRow",
    "LedgerCosignatureRow",
    "LedgerEntryRow",
    "LedgerError",
    "LedgerPeerStateRow",
    "LedgerStateError",
    "LedgerStore",
    "NoteSigner",
    "NoteVerifier",
    "PeerCheckpoint",
    "Problem",
    "ProblemKind",
    "StoredEntry",
    "VerificationError",
    "VerifyReport",
    "WitnessAlarm",
    "canonical_json",
    "create_tables",
    "decode_entry",
    "digest",
    "digest_of_hash",
    "event",
    "find_raw_looking",
    "new_id",
    "now_ms",
    "scan_entries",
    "verify_store",
    "witness_checkpoint",
]
