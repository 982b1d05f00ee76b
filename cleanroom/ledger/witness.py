"""Witnessing a peer's log: cosign a new checkpoint only if it extends what we cosigned.

Pure logic, no network and no database: given the last checkpoint of peer P that this
node cosigned (or ``None`` the first time), P's new signed checkpoint and a consistency
proof from the old size to the new one, :func:`witness_checkpoint` either returns a
C2SP cosignature/v1 over the new checkpoint, or raises :class:`WitnessAlarm` carrying an
:class:`Alarm` that the caller records as a ``witness_alarm`` entry in its own ledger
(``alarm.to_event()``). The node layer moves the bytes and keeps the state
(:class:`~cleanroom.ledger.ledger.Ledger.witness` does both).

Refusals:

- ``bad_signature``: the note is not validly signed by P's pinned key, or names another
  origin;
- ``rollback``: the new tree is smaller than the one already cosigned;
- ``fork``: same size, different root (two signed views of one history);
- ``inconsistent`` / ``bad_proof``: larger tree whose consistency proof does not verify.

The first checkpoint seen for a peer is trusted on first use (nothing to be consistent
with); this is stated in docs/ledger.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cleanroom.ledger.entries import Event, digest, digest_of_hash, event
from cleanroom.ledger.errors import LedgerError, VerificationError
from cleanroom.ledger.merkle import verify_consistency
from cleanroom.ledger.note import (
    Cosignature,
    NoteSigner,
    NoteVerifier,
    add_signatures,
    cosign_checkpoint,
    open_checkpoint,
)


@dataclass(frozen=True)
class PeerCheckpoint:
    """A verified checkpoint of a peer log and the note it came in."""

    origin: str
    size: int
    root: bytes
    note: bytes


@dataclass(frozen=True)
class Alarm:
    """Evidence that a peer showed an inconsistent view of its log."""

    peer: str
    origin: str
    reason: str  # inconsistent | fork | bad_signature | rollback | bad_proof
    old_size: int | None = None
    old_root: bytes | None = None
    new_size: int | None = None
    new_root: bytes | None = None
    evidence: str | None = None  # digest of the offending note bytes

    def to_event(self) -> Event:
        """The ``witness_alarm`` entry to append to this node's own ledger."""
        return event(
            "witness_alarm",
            peer=self.peer,
            origin=self.origin,
            reason=self.reason,
            old_size=self.old_size,
            old_root=None if self.old_root is None else digest_of_hash(self.old_root),
            new_size=self.new_size,
            new_root=None if self.new_root is None else digest_of_hash(self.new_root),
            evidence=self.evidence,
        )


class WitnessAlarm(LedgerError):
    """Raised when this node refuses to cosign; ``.alarm`` must be recorded."""

    def __init__(self, alarm: Alarm) -> None:
        self.alarm = alarm
        super().__init__(
            f"refused to cosign checkpoint of {alarm.origin} (peer {alarm.peer}): "
            f"{alarm.reason}"
        )


@dataclass(frozen=True)
class WitnessResult:
    """A successful witnessing: the new peer state, the cosignature, the cosigned note."""

    peer: str
    checkpoint: PeerCheckpoint
    cosignature: Cosignature
    cosigned_note: bytes

    def to_event(self) -> Event:
        """The ``checkpoint_cosigned`` entry for this node's own ledger."""
        return event(
            "checkpoint_cosigned",
            peer=self.peer,
            origin=self.checkpoint.origin,
            size=self.checkpoint.size,
            root=digest_of_hash(self.checkpoint.root),
            cosigned_at=self.cosignature.timestamp * 1000,
        )


def witness_checkpoint(
    *,
    peer: str,
    peer_verifier: NoteVerifier,
    cosigner: NoteSigner,
    last: PeerCheckpoint | None,
    note: bytes,
    proof: Sequence[bytes],
    timestamp: int,
    origin: str | None = None,
) -> WitnessResult:
    """Verify ``note`` (signature, then consistency with ``last``) and cosign it.

    ``peer_verifier`` is the peer's pinned log key (type 0x01); ``origin`` (default: the
    verifier's key name) is the origin the checkpoint must carry; ``cosigner`` is this
    node's witness key (type 0x04); ``timestamp`` is POSIX seconds. Raises
    :class:`WitnessAlarm` on any refusal.
    """
    want_origin = origin if origin is not None else peer_verifier.name
    if last is not None and last.origin != want_origin:
        raise ValueError("the stored peer state belongs to another origin")
    try:
        cp, parsed = open_checkpoint(note, [peer_verifier], origin=want_origin)
    except VerificationError:
        raise WitnessAlarm(
            Alarm(peer, want_origin, "bad_signature", evidence=digest(note))
        ) from None
    new = PeerCheckpoint(cp.origin, cp.size, cp.root, note)
    if last is not None:

        def alarm(reason: str) -> WitnessAlarm:
            return WitnessAlarm(Alarm(peer, cp.origin, reason, last.size, last.root, cp.size,
                                      cp.root, digest(note)))

        if cp.size < last.size:
            raise alarm("rollback")
        if cp.size == last.size and cp.root != last.root:
            raise alarm("fork")
        try:
            verify_consistency(last.size, cp.size, last.root, cp.root, proof)
        except VerificationError:
            raise alarm("inconsistent") from None
    cos = cosign_checkpoint(parsed.text, cosigner, timestamp)
    return WitnessResult(peer, new, cos, add_signatures(note, [cos.note_signature()]))


__all__ = [
    "Alarm",
    "PeerCheckpoint",
    "WitnessAlarm",
    "WitnessResult",
    "witness_checkpoint",
]
