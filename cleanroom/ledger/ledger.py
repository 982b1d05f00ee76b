"""The ledger facade a node uses: append events, sign checkpoints, serve proofs, witness.

``Ledger(engine, origin, signing_key)`` opens (creating if needed) the ledger tables on
``engine``, loads every stored leaf hash into an in-memory :class:`MerkleTree` and is then
the *only* writer of that ledger: one ``Ledger`` object per database, shared by the
node's request handlers (appends are serialised by a lock). Appends are durable when
``append``/``append_many`` return.

It does not move bytes between nodes: the node layer calls :meth:`Ledger.witness` with a
peer's checkpoint and proof, and :meth:`Ledger.record_cosignatures` with what peers send
back. It never logs entry contents.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Connection, Engine

from cleanroom.ledger.entries import (
    Entry,
    Event,
    decode_entry,
    encode_entry,
    now_ms,
)
from cleanroom.ledger.errors import LedgerStateError, VerificationError
from cleanroom.ledger.merkle import MerkleTree, leaf_hash
from cleanroom.ledger.note import (
    SIG_COSIGNATURE_V1,
    Checkpoint,
    NoteSigner,
    NoteVerifier,
    find_cosignatures,
    open_checkpoint,
    sign_checkpoint,
)
from cleanroom.ledger.store import (
    CheckpointRecord,
    CosignatureRecord,
    EntryRow,
    LedgerStore,
    PeerState,
)
from cleanroom.ledger.verify import VerifyReport, verify_store
from cleanroom.ledger.witness import PeerCheckpoint, WitnessAlarm, witness_checkpoint


@dataclass(frozen=True)
class StoredEntry:
    """An entry as read back: index, leaf hash, canonical bytes and decoded form."""

    index: int
    leaf_hash: bytes
    body: bytes
    entry: Entry

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "leaf_hash": self.leaf_hash.hex(),
                "entry": self.entry.as_dict()}


class Ledger:
    """A node's append-only, signed, witnessed audit log."""

    def __init__(
        self,
        engine: Engine,
        origin: str,
        signing_key: Ed25519PrivateKey,
        *,
        witness_key: Ed25519PrivateKey | None = None,
        create_tables: bool = True,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.origin = origin
        self.store = LedgerStore(engine, create=create_tables)
        self.signer = NoteSigner(origin, signing_key)
        self.cosigner = NoteSigner(origin, witness_key or signing_key, SIG_COSIGNATURE_V1)
        self._clock_ms = clock_ms
        self._lock = threading.RLock()
        hashes, _n = self.store.leaf_hashes()
        self._tree = MerkleTree.from_leaf_hashes(hashes)

    # --- identity -----------------------------------------------------------------------

    @property
    def verifier(self) -> NoteVerifier:
        """This log's public key (type 0x01), for peers to pin; ``.vkey()`` encodes it."""
        return self.signer.verifier()

    @property
    def witness_verifier(self) -> NoteVerifier:
        """This node's witness public key (type 0x04), for peers to pin."""
        return self.cosigner.verifier()

    @property
    def size(self) -> int:
        return self._tree.size

    def root(self, size: int | None = None) -> bytes:
        with self._lock:
            return self._tree.root(size)

    # --- appends ------------------------------------------------------------------------

    def append(self, event: Event) -> int:
        """Append one event durably; return its index."""
        return self.append_many([event])[0]

    def append_many(
        self, events: Sequence[Event], *, _also: Callable[[Connection], None] | None = None
    ) -> list[int]:
        """Append events in one atomic transaction; return their indices."""
        if not events:
            return []
        with self._lock:
            start = self._tree.size
            rows: list[EntryRow] = []
            ts_default = self._clock_ms()
            for i, ev in enumerate(events):
                if not isinstance(ev, Event):
                    raise TypeError("append takes cleanroom.ledger.Event objects")
                ts = ev.ts_ms if ev.ts_ms is not None else ts_default
                body = encode_entry(ev, start + i, ts)
                entry = Entry(start + i, ev.type, ts, ev.fields)
                qid = ev.fields.get("query_id")
                rows.append(EntryRow(start + i, leaf_hash(body), body, ev.type, ts,
                                     qid if isinstance(qid, str) else None, entry.parties()))
            self.store.append_rows(rows, also=_also)
            for r in rows:
                self._tree.append_hash(r.leaf_hash)
            return list(range(start, start + len(rows)))

    # --- checkpoints & proofs ---------------------------------------------------------------

    def checkpoint(self) -> bytes:
        """Sign and store a checkpoint of the current tree; return the signed note."""
        with self._lock:
            cp = Checkpoint(self.origin, self._tree.size, self._tree.root())
            note = sign_checkpoint(cp, self.signer)
            self.store.add_checkpoint(
                CheckpointRecord(self.origin, cp.size, cp.root, note, self._clock_ms()))
            return note

    def latest_checkpoint(self) -> bytes | None:
        rec = self.store.latest_checkpoint()
        return None if rec is None else rec.note

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        with self._lock:
            return self._tree.inclusion_proof(index, size)

    def consistency_proof(self, old: int, new: int | None = None) -> list[bytes]:
        with self._lock:
            return self._tree.consistency_proof(old, new)

    # --- reading ------------------------------------------------------------------------

    def entry(self, index: int) -> StoredEntry:
        rec = self.store.get_entry(index)
        if rec is None:
            raise IndexError(f"no ledger entry {index}")
        return StoredEntry(rec.idx, rec.leaf_hash, rec.body, decode_entry(rec.body))

    def entries(
        self,
        offset: int = 0,
        limit: int = 100,
        *,
        query_id: str | None = None,
        peer: str | None = None,
        event_type: str | Sequence[str] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
    ) -> list[StoredEntry]:
        """A page of entries in index order; ``offset`` counts matching entries."""
        if limit < 0 or offset < 0:
            raise ValueError("offset and limit must be >= 0")
        recs = self.store.query_entries(offset=offset, limit=min(limit, 10_000),
                                        query_id=query_id, peer=peer, event_type=event_type,
                                        since_ms=since_ms, until_ms=until_ms)
        return [StoredEntry(r.idx, r.leaf_hash, r.body, decode_entry(r.body)) for r in recs]

    # --- cosignatures on our checkpoints ------------------------------------------------------

    def record_cosignatures(
        self, cosigned_note: bytes, witnesses: Sequence[NoteVerifier]
    ) -> int:
        """Store the verified cosignatures from ``witnesses`` found on one of our checkpoints.

        The checkpoint must verify with this log's key and match this log's tree at its
        size. Returns how many cosignatures were new. Raises ``VerificationError``.
        """
        cp, parsed = open_checkpoint(cosigned_note, [self.verifier], origin=self.origin)
        with self._lock:
            if cp.size > self._tree.size or self._tree.root(cp.size) != cp.root:
                raise VerificationError()
        cosigs = find_cosignatures(cosigned_note, witnesses)
        now = self._clock_ms()
        return self.store.add_cosignatures([
            CosignatureRecord(cp.origin, cp.size, cp.root, parsed.text, c.name, c.key_id,
                              c.timestamp, c.signature, now)
            for c in cosigs
        ])

    # --- witnessing peers -------------------------------------------------------------------

    def peer_checkpoint(self, peer_origin: str) -> bytes | None:
        """The last checkpoint of ``peer_origin`` this node cosigned (its signed note)."""
        st = self.store.peer_state(peer_origin)
        return None if st is None else st.note

    def peer_size(self, peer_origin: str) -> int:
        """Size to ask a peer's consistency proof from (0 if never cosigned)."""
        st = self.store.peer_state(peer_origin)
        return 0 if st is None else st.size

    def witness(
        self,
        peer: str,
        peer_verifier: NoteVerifier,
        note: bytes,
        proof: Sequence[bytes],
        *,
        timestamp: int | None = None,
    ) -> bytes:
        """Witness a peer's checkpoint; return the note with our cosignature appended.

        The proof must be from :meth:`peer_size` to the new size. On success the witness
        memory and a ``checkpoint_cosigned`` entry are committed together. On refusal a
        ``witness_alarm`` entry is appended and :class:`WitnessAlarm` is raised.
        """
        origin = peer_verifier.name
        with self._lock:
            st = self.store.peer_state(origin)
            last = None if st is None else PeerCheckpoint(st.peer_origin, st.size,
                                                          st.root_hash, st.note)
            ts = timestamp if timestamp is not None else int(time.time())
            try:
                res = witness_checkpoint(peer=peer, peer_verifier=peer_verifier,
                                         cosigner=self.cosigner, last=last, note=note,
                                         proof=proof, timestamp=ts)
            except WitnessAlarm as alarm:
                self.append(alarm.alarm.to_event())
                raise
            new_state = PeerState(origin, peer, res.checkpoint.size, res.checkpoint.root,
                                  res.checkpoint.note, res.cosignature.line(), ts * 1000)
            self.append_many([res.to_event()],
                             _also=lambda conn: self.store.put_peer_state(new_state, conn))
            return res.cosigned_note

    # --- verification -----------------------------------------------------------------------

    def verify(
        self,
        *,
        log_keys: Iterable[NoteVerifier] = (),
        witness_keys: Sequence[NoteVerifier] = (),
        known_checkpoints: Iterable[bytes] = (),
        deep: bool = False,
    ) -> VerifyReport:
        """Verify the stored ledger (see :func:`cleanroom.ledger.verify.verify_store`).

        This log's current key is always trusted; pass former keys in ``log_keys``.
        """
        keys = [self.verifier, *log_keys]
        with self._lock:
            report = verify_store(self.store, self.origin, keys, witness_keys,
                                  known_checkpoints=known_checkpoints, deep=deep)
        if report.integrity_ok and report.size != self._tree.size:
            raise LedgerStateError("the ledger grew under this object: another writer?")
        return report
