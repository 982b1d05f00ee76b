"""Full verification of a stored ledger, with a report that names the first bad entry.

:func:`verify_store` re-reads every stored entry, recomputes every leaf hash and the
RFC 6962 tree from the entry bytes alone, and checks:

1. each entry's stored leaf hash and its ``seq`` field against its position
   (``edited``, ``deleted``, ``reordered``; ``malformed`` with ``deep=True``, which also
   re-parses every entry and checks its canonical form and schema);
2. every stored checkpoint's signature with the trusted log keys
   (``bad_checkpoint_signature``);
3. every stored cosignature with the trusted witness keys (``bad_cosignature``);
4. every *anchor* — a validly signed checkpoint, a verified cosignature, or a checkpoint a
   peer presents as the last one it cosigned — against the recomputed tree: an anchor
   larger than the log is ``truncated``; two anchors at one size with different roots are
   a ``fork``; an anchor whose root differs from the recomputed root at its size is a
   ``checkpoint_mismatch``. The reported index is the first entry not covered by a
   matching anchor (when an edit recomputed the stored leaf hash too, the tree cannot say
   which entry inside that range changed, only that one did).

It also lists the ``witness_alarm`` entries (alarms this node raised about peers).
Crypto-level checks are opaque (:class:`~cleanroom.ledger.errors.VerificationError`);
this module turns them into named problems. It reads the store, all of it in one
consistent snapshot, and never writes.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cleanroom.ledger.entries import decode_entry, peek_seq
from cleanroom.ledger.errors import EntrySchemaError, VerificationError
from cleanroom.ledger.merkle import EMPTY_ROOT, MerkleTree, _sha256
from cleanroom.ledger.note import (
    Checkpoint,
    Cosignature,
    NoteSignature,
    NoteVerifier,
    open_checkpoint,
    verify_cosignature,
)
from cleanroom.ledger.store import LedgerSnapshot, LedgerStore


class ProblemKind(StrEnum):
    EDITED = "edited"
    DELETED = "deleted"
    REORDERED = "reordered"
    MALFORMED = "malformed"
    TRUNCATED = "truncated"
    FORK = "fork"
    CHECKPOINT_MISMATCH = "checkpoint_mismatch"
    BAD_CHECKPOINT_SIGNATURE = "bad_checkpoint_signature"
    BAD_COSIGNATURE = "bad_cosignature"


@dataclass(frozen=True)
class Problem:
    """One thing that does not hold. ``index`` is the first entry it concerns, if known."""

    kind: ProblemKind
    index: int | None
    detail: str
    checkpoint_size: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind.value, "index": self.index, "detail": self.detail,
                "checkpoint_size": self.checkpoint_size}


@dataclass(frozen=True)
class AlarmRecord:
    """A ``witness_alarm`` entry found in this ledger."""

    index: int
    ts_ms: int
    peer: str
    origin: str
    reason: str

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_store`. ``ok`` only if no problem and no alarm."""

    origin: str
    size: int
    root: bytes
    checkpoints_checked: int = 0
    cosignatures_checked: int = 0
    cosignatures_unknown_key: int = 0
    anchors_matched: int = 0
    largest_matching_anchor: int = 0
    problems: list[Problem] = field(default_factory=list)
    alarms: list[AlarmRecord] = field(default_factory=list)

    @property
    def integrity_ok(self) -> bool:
        return not self.problems

    @property
    def ok(self) -> bool:
        return not self.problems and not self.alarms

    @property
    def first_problem(self) -> Problem | None:
        if not self.problems:
            return None
        return min(self.problems,
                   key=lambda p: (p.index is None, p.index if p.index is not None else 0))

    def summary(self) -> str:
        lines = [
            f"ledger {self.origin}: {self.size} entries, root {self.root.hex()}",
            f"checkpoints checked: {self.checkpoints_checked}, cosignatures checked: "
            f"{self.cosignatures_checked} (unknown witness key: "
            f"{self.cosignatures_unknown_key}), largest matching signed size: "
            f"{self.largest_matching_anchor}",
        ]
        first = self.first_problem
        if first is None:
            lines.append("integrity: OK")
        else:
            where = f"entry {first.index}" if first.index is not None else "checkpoints"
            lines.append(f"FIRST PROBLEM at {where}: {first.kind.value}: {first.detail}")
            for p in sorted(self.problems, key=lambda p: (p.index is None, p.index or 0)):
                if p is not first:
                    lines.append(f"  also: {p.kind.value} at {p.index}: {p.detail}")
        for a in self.alarms:
            lines.append(f"WITNESS ALARM at entry {a.index}: peer {a.peer} ({a.origin}): "
                         f"{a.reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        first = self.first_problem
        return {
            "origin": self.origin,
            "size": self.size,
            "root": self.root.hex(),
            "ok": self.ok,
            "integrity_ok": self.integrity_ok,
            "checkpoints_checked": self.checkpoints_checked,
            "cosignatures_checked": self.cosignatures_checked,
            "cosignatures_unknown_key": self.cosignatures_unknown_key,
            "largest_matching_anchor": self.largest_matching_anchor,
            "first_problem": None if first is None else first.to_dict(),
            "problems": [p.to_dict() for p in self.problems],
            "alarms": [a.to_dict() for a in self.alarms],
        }


_ENTRY_KINDS = (ProblemKind.EDITED, ProblemKind.DELETED, ProblemKind.REORDERED,
                ProblemKind.MALFORMED)
_ALARM_MARK = b'"type":"witness_alarm"'


@dataclass(frozen=True)
class _Anchor:
    size: int
    root: bytes
    source: str


def verify_store(
    store: LedgerStore,
    origin: str,
    log_keys: Sequence[NoteVerifier],
    witness_keys: Sequence[NoteVerifier] = (),
    *,
    known_checkpoints: Iterable[bytes] = (),
    deep: bool = False,
) -> VerifyReport:
    """Verify everything stored for ledger ``origin``; see the module docstring.

    ``log_keys``: trusted type-0x01 keys of this log (current and former keys).
    ``witness_keys``: trusted type-0x04 keys of the peers that cosign this log.
    ``known_checkpoints``: signed checkpoints of this log obtained elsewhere (e.g. each
    peer's record of the last one it cosigned); they are anchors like stored ones.

    Entries, checkpoints and cosignatures are read in one snapshot
    (:meth:`LedgerStore.snapshot`), so a checkpoint the node signs while this runs is
    not mistaken for a truncation. Pass a :class:`LedgerSnapshot` to verify inside a
    snapshot the caller holds (e.g. to read more from the same state afterwards).
    """
    with store.snapshot() as snap:
        return _verify(snap, origin, log_keys, witness_keys,
                       known_checkpoints=known_checkpoints, deep=deep)


def _verify(
    store: LedgerSnapshot,
    origin: str,
    log_keys: Sequence[NoteVerifier],
    witness_keys: Sequence[NoteVerifier],
    *,
    known_checkpoints: Iterable[bytes],
    deep: bool,
) -> VerifyReport:
    problems: list[Problem] = []
    leaf = bytearray()
    seqs = array("q")
    bad_leaf: list[int] = []
    alarms: list[AlarmRecord] = []
    sha = _sha256
    pos = 0
    for chunk in store.iter_raw():
        for idx, lh, body in chunk:
            body = bytes(body)
            h = sha(b"\x00" + body).digest()
            leaf += h
            s = peek_seq(body)
            seqs.append(-1 if s is None else s)
            if h != lh or idx != pos:
                bad_leaf.append(pos)
            if deep:
                try:
                    decode_entry(body)
                except EntrySchemaError as exc:
                    problems.append(Problem(ProblemKind.MALFORMED, pos, exc.detail))
            if _ALARM_MARK in body:
                try:
                    e = decode_entry(body)
                    alarms.append(AlarmRecord(pos, e.ts_ms, str(e.fields["peer"]),
                                              str(e.fields["origin"]),
                                              str(e.fields["reason"])))
                except EntrySchemaError:
                    problems.append(Problem(ProblemKind.MALFORMED, pos,
                                            "witness_alarm entry does not parse"))
            pos += 1
    n = pos
    tree = MerkleTree.from_leaf_hashes(leaf)
    del leaf

    # 1. entry-level problems: seq vs position first (it tells moves from edits)
    seq_set: set[int] | None = None
    for p in range(n):
        s = seqs[p]
        if s == p:
            continue
        if seq_set is None:
            seq_set = set(seqs)
        if s > p and p not in seq_set:
            problems.append(Problem(ProblemKind.DELETED, p,
                                    f"entry {p} is missing (position {p} holds entry {s})"))
        elif s < 0:
            problems.append(Problem(ProblemKind.MALFORMED, p, "entry has no seq field"))
        else:
            problems.append(Problem(ProblemKind.REORDERED, p,
                                    f"position {p} holds entry {s}"))
        break  # later positions are shifted by the same cause; report the first
    flagged = {pr.index for pr in problems}
    for p in bad_leaf:
        if p not in flagged and seqs[p] == p:
            problems.append(Problem(
                ProblemKind.EDITED, p,
                "entry bytes do not match the leaf hash stored when it was appended"))
            break

    # 2. checkpoints and cosignatures -> anchors
    report = VerifyReport(origin=origin, size=n, root=tree.root() if n else EMPTY_ROOT)
    anchors: list[_Anchor] = []
    for cp_rec in store.checkpoints():
        report.checkpoints_checked += 1
        try:
            cp, _ = open_checkpoint(cp_rec.note, log_keys, origin=origin)
        except VerificationError:
            problems.append(Problem(
                ProblemKind.BAD_CHECKPOINT_SIGNATURE, None,
                f"stored checkpoint at size {cp_rec.size} does not verify with the log key",
                cp_rec.size))
            continue
        anchors.append(_Anchor(cp.size, cp.root, "stored checkpoint"))
    wkeys = {(w.name, w.key_id): w for w in witness_keys}
    for cs in store.cosignatures():
        w = wkeys.get((cs.witness_name, cs.key_id))
        if w is None:
            report.cosignatures_unknown_key += 1
            continue
        report.cosignatures_checked += 1
        try:
            cos = Cosignature.from_note_signature(
                NoteSignature(cs.witness_name, cs.key_id,
                              cs.timestamp.to_bytes(8, "big") + cs.signature))
            verify_cosignature(cs.checkpoint_text, cos, w)
            cp = Checkpoint.from_text(cs.checkpoint_text)
            if cp.origin != origin:
                raise VerificationError()
        except VerificationError:
            problems.append(Problem(
                ProblemKind.BAD_COSIGNATURE, None,
                f"cosignature by {cs.witness_name} at size {cs.size} does not verify",
                cs.size))
            continue
        anchors.append(_Anchor(cp.size, cp.root, f"cosignature by {cs.witness_name}"))
    for note in known_checkpoints:
        try:
            cp, _ = open_checkpoint(note, log_keys, origin=origin)
        except VerificationError:
            problems.append(Problem(ProblemKind.BAD_CHECKPOINT_SIGNATURE, None,
                                    "a checkpoint presented by a peer does not verify"))
            continue
        anchors.append(_Anchor(cp.size, cp.root, "checkpoint held by a peer"))

    # 3. anchors against the recomputed tree
    matching = sorted({a.size for a in anchors if a.size <= n and a.root == tree.root(a.size)})
    report.anchors_matched = sum(
        1 for a in anchors if a.size <= n and a.root == tree.root(a.size))
    report.largest_matching_anchor = matching[-1] if matching else 0

    def lower_bound(size: int) -> int:
        lo = 0
        for m in matching:
            if m < size:
                lo = m
        return lo

    entry_problem_idx = sorted(p.index for p in problems
                               if p.kind in _ENTRY_KINDS and p.index is not None)
    by_size: dict[int, set[bytes]] = {}
    for a in anchors:
        by_size.setdefault(a.size, set()).add(a.root)
    reported: set[tuple[ProblemKind, int]] = set()
    for a in sorted(anchors, key=lambda a: a.size):
        if (ProblemKind.FORK, a.size) in reported:
            continue
        if len(by_size[a.size]) > 1:
            lo = lower_bound(a.size)
            problems.append(Problem(
                ProblemKind.FORK, lo,
                f"two different signed roots at size {a.size}; history diverges after "
                f"entry {lo}", a.size))
            reported.add((ProblemKind.FORK, a.size))
            continue
        if a.size > n:
            if (ProblemKind.TRUNCATED, a.size) not in reported:
                problems.append(Problem(
                    ProblemKind.TRUNCATED, n,
                    f"{a.source} covers {a.size} entries but only {n} are stored", a.size))
                reported.add((ProblemKind.TRUNCATED, a.size))
            continue
        if a.root != tree.root(a.size):
            lo = lower_bound(a.size)
            if any(lo <= i < a.size for i in entry_problem_idx):
                continue  # explained by an entry-level problem already reported
            if (ProblemKind.CHECKPOINT_MISMATCH, a.size) not in reported:
                problems.append(Problem(
                    ProblemKind.CHECKPOINT_MISMATCH, lo,
                    f"entries {lo}..{a.size - 1} do not match the root of the {a.source} at "
                    f"size {a.size} (an entry in that range was edited, removed or moved)",
                    a.size))
                reported.add((ProblemKind.CHECKPOINT_MISMATCH, a.size))
    report.problems = problems
    report.alarms = alarms
    return report
