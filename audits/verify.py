"""``cleanroom audit verify``: check a node's audit ledger, and optionally its peers' logs.

:func:`verify_node` opens a node directory the way a compliance reviewer would: it reads
``node.toml`` and the node's *certificate* (never the private key), opens the node's
database **read-only** and runs :func:`cleanroom.ledger.verify.verify_store` with

- the node's own log key: the Ed25519 key in ``identity/node.pem`` (the node identity key
  signs the ledger checkpoints, see :mod:`cleanroom.node.identity`), under the origin
  ``cleanroom/<node name>`` (docs/ledger.md);
- the pinned peers' witness keys: the Ed25519 key in each pinned certificate, as C2SP
  cosignature/v1 (type 0x04) keys named by the peer's origin. By default a node cosigns
  with its ledger key (docs/ledger.md, "Cosignatures"). A peer's origin is
  ``cleanroom/<pinned name>``: peers are pinned under their own node name, as
  :func:`cleanroom.node.audit.peer_origin` has it.

The store is opened with ``LedgerStore(engine, read_only=True)`` (no pragma, no DDL, so
a read-only copy that is not in WAL mode opens), and every local read (entries,
checkpoints, cosignatures, witness memory) comes from one snapshot
(:meth:`~cleanroom.ledger.store.LedgerStore.snapshot`), so a node that keeps appending
and signing checkpoints while the audit runs never looks truncated.

Former log keys (after a ``key_rotated``) and separate witness keys are extra arguments.

With ``peers=True`` a caller-supplied function (:data:`FetchPeerCheckpoint`) asks each
pinned peer for its latest signed checkpoint, a consistency proof from the checkpoint of
that peer this node last cosigned, and (optionally) the peer's own record of the last
checkpoint of *this* node's log that it cosigned. The first proves the peer did not
rewrite its history since we cosigned; the second is an extra anchor for our own log
(split views and local rewrites show against it). The HTTP transport plugs in through
:mod:`audits.peers`; tests pass a function that reads another ledger directly.

This module never writes to the node's database or files and never needs the node's
private key; it prints nothing (the CLI does).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from cleanroom.errors import CleanroomError, ConfigError
from cleanroom.ledger import (
    SIG_COSIGNATURE_V1,
    SIG_ED25519,
    LedgerStore,
    NoteVerifier,
    Problem,
    VerificationError,
    VerifyReport,
    verify_store,
)
from cleanroom.ledger.merkle import MerkleTree, verify_consistency
from cleanroom.ledger.note import (
    Checkpoint,
    Cosignature,
    NoteSignature,
    open_checkpoint,
    verify_cosignature,
)
from cleanroom.node.config import NodeConfig, PeerConfig
from cleanroom.node.identity import NodeIdentity, ed25519_public_key, load_cert_pem

ORIGIN_PREFIX = "cleanroom/"


class AuditError(CleanroomError):
    """The audit could not run (missing database, no ledger tables, bad arguments)."""


# --- keys -----------------------------------------------------------------------------------


def origin_for(node_name: str) -> str:
    """The ledger origin (and note key name) of a node: ``cleanroom/<node name>``."""
    return ORIGIN_PREFIX + node_name


@dataclass(frozen=True)
class PeerKeys:
    """What this node trusts about one pinned peer's ledger."""

    peer: PeerConfig
    origin: str
    log_key: NoteVerifier  # type 0x01: signs the peer's checkpoints
    witness_key: NoteVerifier  # type 0x04: the peer's cosignatures on our checkpoints

    @property
    def name(self) -> str:
        return self.peer.name


@dataclass(frozen=True)
class NodeKeys:
    """The node's own log key and origin, and the pinned peers' keys."""

    node_name: str
    origin: str
    log_key: NoteVerifier
    peers: tuple[PeerKeys, ...]


def peer_keys(peer: PeerConfig, *, origin: str | None = None) -> PeerKeys:
    """Keys of a pinned peer, from its pinned certificate (see the module docstring)."""
    key = peer.public_key()
    origin = origin or origin_for(peer.name)
    return PeerKeys(peer, origin, NoteVerifier(origin, key, SIG_ED25519),
                    NoteVerifier(origin, key, SIG_COSIGNATURE_V1))


def node_keys(config: NodeConfig, *, peer_origins: dict[str, str] | None = None) -> NodeKeys:
    """The node's log key (from ``identity/node.pem``) and its pinned peers' keys."""
    _key_path, cert_path = NodeIdentity.paths(config.node_dir)
    try:
        pem = cert_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{cert_path}: cannot read the node certificate ({exc.strerror}); "
                          "run `cleanroom node init` for this directory") from None
    key: ed25519.Ed25519PublicKey = ed25519_public_key(
        load_cert_pem(pem, source=str(cert_path)), source=str(cert_path))
    origin = origin_for(config.name)
    overrides = peer_origins or {}
    return NodeKeys(
        node_name=config.name,
        origin=origin,
        log_key=NoteVerifier(origin, key, SIG_ED25519),
        peers=tuple(peer_keys(p, origin=overrides.get(p.name)) for p in config.peers),
    )


# --- the peer fetch interface -------------------------------------------------------------------


@dataclass(frozen=True)
class PeerLedgerRequest:
    """What to ask a peer: its latest checkpoint and a proof from ``old_size``."""

    peer: PeerConfig
    peer_origin: str
    old_size: int  # size of the peer checkpoint this node last cosigned (0: never)
    our_origin: str  # ask the peer for its record of our log under this origin


@dataclass(frozen=True)
class PeerLedgerReply:
    """A peer's answer. ``witnessed`` is the peer's copy of the last checkpoint of our
    log that it cosigned (``None`` if it holds none or does not say)."""

    checkpoint: bytes
    consistency_proof: Sequence[bytes]
    witnessed: bytes | None = None


#: ``fetch(request) -> reply``; raise :class:`~cleanroom.errors.CleanroomError` with a
#: clear message when the peer cannot be asked (unreachable, endpoint missing, bad reply).
FetchPeerCheckpoint = Callable[[PeerLedgerRequest], PeerLedgerReply]


# --- results ----------------------------------------------------------------------------------

#: Peer statuses that mean "consistency holds".
PEER_OK = ("consistent", "first_seen")


@dataclass(frozen=True)
class PeerResult:
    """Outcome of checking one peer's log against what this node cosigned.

    ``status``: ``consistent`` (the peer's latest checkpoint extends the one we cosigned),
    ``first_seen`` (we never cosigned one: nothing to compare, trust on first use),
    ``fork`` / ``rollback`` / ``inconsistent`` / ``bad_signature`` (the peer's log does
    not extend what we cosigned, or its checkpoint is not signed by its pinned key),
    ``local_state_invalid`` (our stored copy of its checkpoint does not verify),
    ``unavailable`` (the peer could not be asked).
    ``our_log``: what the peer's record of *our* log says: ``matches``, ``differs``,
    ``truncated`` (it covers more entries than we store), ``bad_signature``, or ``none``.
    """

    peer: str
    origin: str
    status: str
    detail: str
    last_cosigned_size: int | None = None
    latest_size: int | None = None
    our_log: str = "none"
    our_log_size: int | None = None

    @property
    def ok(self) -> bool:
        return self.status in PEER_OK and self.our_log in ("matches", "none")

    def to_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["ok"] = self.ok
        return d


@dataclass(frozen=True)
class WitnessInfo:
    """Verified cosignatures of one witness over this node's checkpoints."""

    witness: str
    peer: str | None
    count: int
    latest_size: int
    latest_time_s: int


@dataclass(frozen=True)
class CosignedPeer:
    """This node's witness memory for one peer log: the last checkpoint it cosigned."""

    peer: str
    origin: str
    size: int
    root_hex: str
    cosigned_ms: int


@dataclass(frozen=True)
class CheckpointInfo:
    size: int
    root_hex: str
    created_ms: int


@dataclass
class AuditResult:
    """Everything ``audit verify`` found. ``ok`` only if every check holds."""

    node_name: str
    origin: str
    database: str
    report: VerifyReport
    peers_checked: bool = False
    peers: list[PeerResult] = field(default_factory=list)
    latest_checkpoint: CheckpointInfo | None = None
    witnesses: list[WitnessInfo] = field(default_factory=list)
    cosigned_peers: list[CosignedPeer] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.report.ok and all(p.ok for p in self.peers)

    @property
    def first_problem(self) -> Problem | None:
        return self.report.first_problem

    def failure_lines(self) -> list[str]:
        """What is wrong, most important first (empty when ``ok``)."""
        out: list[str] = []
        first = self.report.first_problem
        if first is not None:
            where = (f"first bad entry index {first.index}" if first.index is not None
                     else "stored signatures")
            out.append(f"{where}: {first.kind.value}: {first.detail}")
            for p in self.report.problems:
                if p is not first:
                    at = f"entry {p.index}" if p.index is not None else "signatures"
                    out.append(f"also at {at}: {p.kind.value}: {p.detail}")
        for a in self.report.alarms:
            out.append(f"witness alarm recorded at entry {a.index}: peer {a.peer} "
                       f"({a.origin}) showed a {a.reason} checkpoint")
        for pr in self.peers:
            if not pr.ok:
                out.append(f"peer {pr.peer} ({pr.origin}): {pr.status}, our log per peer: "
                           f"{pr.our_log}: {pr.detail}")
        return out

    def problems_rows(self) -> list[tuple[str, str, str, str]]:
        """(kind, entry index, checkpoint size, detail) per problem, first problem first."""
        first = self.report.first_problem
        ordered = ([first] if first else []) + [p for p in self.report.problems
                                                 if p is not first]
        return [(p.kind.value, "-" if p.index is None else str(p.index),
                 "-" if p.checkpoint_size is None else str(p.checkpoint_size), p.detail)
                for p in ordered]

    def summary(self) -> str:
        r = self.report
        lines = [
            f"node {self.node_name}: ledger {self.origin} in {self.database}",
            f"  {r.size} entries, root {r.root.hex()}",
            f"  {r.checkpoints_checked} signed checkpoint(s), {r.cosignatures_checked} "
            f"cosignature(s) verified ({r.cosignatures_unknown_key} by unpinned witnesses), "
            f"largest matching signed size {r.largest_matching_anchor}",
        ]
        if self.latest_checkpoint is not None:
            lines.append(f"  latest checkpoint: size {self.latest_checkpoint.size}, root "
                         f"{self.latest_checkpoint.root_hex}")
        for w in self.witnesses:
            lines.append(f"  witnessed by {w.witness}: {w.count} cosignature(s), up to size "
                         f"{w.latest_size}")
        for pr in self.peers:
            mark = "ok" if pr.ok else "FAILED"
            lines.append(f"  peer {pr.peer}: {mark}: {pr.status} (cosigned size "
                         f"{pr.last_cosigned_size}, latest {pr.latest_size}); our log as the "
                         f"peer saw it: {pr.our_log}; {pr.detail}")
        if self.peers_checked and not self.peers:
            lines.append("  no pinned peers to check")
        if self.ok:
            lines.append("OK: every entry, signature and cosignature holds"
                         + ("; every peer's log is consistent" if self.peers_checked else ""))
        else:
            lines.append("FAILED: " + self.failure_lines()[0])
            lines.extend("  " + x for x in self.failure_lines()[1:])
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "node": self.node_name,
            "origin": self.origin,
            "database": self.database,
            "ledger": self.report.to_dict(),
            "peers_checked": self.peers_checked,
            "peers": [p.to_dict() for p in self.peers],
            "latest_checkpoint": None if self.latest_checkpoint is None
            else dict(self.latest_checkpoint.__dict__),
            "witnesses": [dict(w.__dict__) for w in self.witnesses],
            "cosigned_peers": [dict(c.__dict__) for c in self.cosigned_peers],
        }


# --- opening the database read-only -------------------------------------------------------------


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid database URL>"


def open_readonly(database_url: str) -> Engine:
    """An engine that cannot write: SQLite ``mode=ro``; PostgreSQL read-only transactions.

    Other backends are opened normally (this module only ever reads).
    """
    try:
        url = make_url(database_url)
    except ArgumentError as exc:
        raise AuditError(f"database URL is not valid: {exc}") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        db = url.database
        if not db or db == ":memory:" or db.startswith("file:"):
            raise AuditError(f"database {database_url}: an audit needs the node's database file")
        path = Path(db)
        if not path.is_file():
            raise AuditError(f"{path}: the node database does not exist (has the node run?)")
        uri = quote(path.resolve().as_posix(), safe="/")
        return create_engine(f"sqlite:///file:{uri}?mode=ro&uri=true")
    try:
        if backend == "postgresql":
            return create_engine(database_url,
                                 execution_options={"postgresql_readonly": True})
        return create_engine(database_url)
    except (ArgumentError, ImportError) as exc:
        raise AuditError(f"cannot open database {_redact(database_url)}: {exc}") from None


def open_store(engine: Engine, label: str) -> LedgerStore:
    """The ledger store on ``engine``, read-only (no pragma, no DDL: a copy that is not in
    WAL mode opens too); a clear error if the ledger tables are missing."""
    try:
        if not inspect(engine).has_table("ledger_entry"):
            raise AuditError(f"{label}: no audit ledger in this database (table ledger_entry "
                             "is missing: the node has not recorded any ledger entry yet)")
        return LedgerStore(engine, read_only=True)
    except OperationalError as exc:
        raise AuditError(f"{label}: cannot read the database read-only ({exc.orig})") from None


# --- peer checks --------------------------------------------------------------------------------


def _check_peer(
    pk: PeerKeys,
    store: LedgerStore,
    our: NodeKeys,
    fetch: FetchPeerCheckpoint,
) -> tuple[PeerResult, bytes | None]:
    """Check one peer; return its result and its verified record of our log (if any)."""
    st = store.peer_state(pk.origin)
    old_size, old_root = 0, b""
    if st is not None:
        try:
            cp_old, _ = open_checkpoint(st.note, [pk.log_key], origin=pk.origin)
        except VerificationError:
            return PeerResult(pk.name, pk.origin, "local_state_invalid",
                              "this node's stored copy of the last checkpoint it cosigned does "
                              "not verify with the pinned key", st.size), None
        if (cp_old.size, cp_old.root) != (st.size, st.root_hash):
            return PeerResult(pk.name, pk.origin, "local_state_invalid",
                              "this node's witness memory disagrees with the checkpoint it "
                              "stored", st.size), None
        old_size, old_root = cp_old.size, cp_old.root
    try:
        reply = fetch(PeerLedgerRequest(pk.peer, pk.origin, old_size, our.origin))
    except CleanroomError as exc:
        return PeerResult(pk.name, pk.origin, "unavailable", str(exc),
                          old_size if st else None), None
    base = PeerResult(pk.name, pk.origin, "unavailable", "",
                      old_size if st is not None else None)
    try:
        cp, _ = open_checkpoint(reply.checkpoint, [pk.log_key], origin=pk.origin)
    except VerificationError:
        res = replace(base, status="bad_signature",
                      detail="the peer's checkpoint is not signed by its pinned key for "
                             f"origin {pk.origin}")
        return _with_our_log(res, reply, our)
    if st is None:
        status, detail = "first_seen", ("no earlier checkpoint of this peer was cosigned "
                                        "here; nothing to compare (trust on first use)")
    elif cp.size < old_size:
        status, detail = "rollback", (f"the peer's latest checkpoint has {cp.size} entries, "
                                      f"fewer than the {old_size} this node cosigned")
    elif cp.size == old_size and cp.root != old_root:
        status, detail = "fork", (f"two different signed roots at size {cp.size}: the peer "
                                  "rewrote history this node had cosigned")
    else:
        try:
            verify_consistency(old_size, cp.size, old_root, cp.root,
                               list(reply.consistency_proof))
            status = "consistent"
            detail = (f"size {cp.size} extends the size {old_size} cosigned here "
                      "(consistency proof verified)")
        except VerificationError:
            status, detail = "inconsistent", (
                f"the consistency proof from size {old_size} to {cp.size} does not verify: "
                "the peer's log does not extend what this node cosigned (a fork)")
    res = replace(base, status=status, detail=detail, latest_size=cp.size)
    return _with_our_log(res, reply, our)


def _with_our_log(
    res: PeerResult, reply: PeerLedgerReply, our: NodeKeys
) -> tuple[PeerResult, bytes | None]:
    if reply.witnessed is None:
        return res, None
    try:
        cp, _ = open_checkpoint(reply.witnessed, [our.log_key], origin=our.origin)
    except VerificationError:
        return replace(res, our_log="bad_signature",
                       detail=res.detail + "; the checkpoint of our log the peer holds does "
                       "not verify with our key"), None
    return replace(res, our_log_size=cp.size), reply.witnessed


def _own_tree(store: LedgerStore) -> MerkleTree:
    """The tree recomputed from the stored entry bytes alone (leaf hashes not trusted)."""
    leaves = bytearray()
    for chunk in store.iter_raw():
        for _idx, _lh, body in chunk:
            leaves += hashlib.sha256(b"\x00" + bytes(body)).digest()
    return MerkleTree.from_leaf_hashes(leaves)


# --- the audit ----------------------------------------------------------------------------------


def verify_node(
    node_dir: Path | str,
    *,
    peers: bool = False,
    fetch_peer_checkpoint: FetchPeerCheckpoint | None = None,
    log_keys: Iterable[NoteVerifier] = (),
    witness_keys: Iterable[NoteVerifier] = (),
    peer_origins: dict[str, str] | None = None,
    deep: bool = False,
) -> AuditResult:
    """Verify the audit ledger of the node in ``node_dir`` (read-only).

    ``log_keys``: former keys of this node's log (after rotation); ``witness_keys``: extra
    trusted witness keys (type 0x04) beyond the pinned peers' keys; ``peer_origins``: peer
    name -> origin, where a peer's origin is not ``cleanroom/<its node name>``.
    With ``peers=True``, ``fetch_peer_checkpoint`` is required. Raises
    :class:`~cleanroom.errors.CleanroomError` (a clear message) if the audit cannot run;
    problems *found* are in the returned result.
    """
    config = NodeConfig.load(Path(node_dir))
    keys = node_keys(config, peer_origins=peer_origins)
    if peers and fetch_peer_checkpoint is None:
        raise AuditError("--peers needs a way to reach the peers (no fetch function given)")
    label = _redact(config.database_url)
    engine = open_readonly(config.database_url)
    try:
        store = open_store(engine, label)
        peer_results: list[PeerResult] = []
        known: list[bytes] = []
        if peers:
            assert fetch_peer_checkpoint is not None
            for pk in keys.peers:
                res, witnessed = _check_peer(pk, store, keys, fetch_peer_checkpoint)
                peer_results.append(res)
                if witnessed is not None:
                    known.append(witnessed)
        extra_log = list(log_keys)
        wkeys = [pk.witness_key for pk in keys.peers] + list(witness_keys)
        # Everything local is read from one snapshot, taken after the peers answered: a
        # checkpoint of ours a peer showed was signed over entries stored before it, so
        # the snapshot holds them, and one a running node signs now is not in it.
        with store.snapshot() as snap:
            report = verify_store(snap, keys.origin, [keys.log_key, *extra_log], wkeys,
                                  known_checkpoints=known, deep=deep)
            if known:
                tree = _own_tree(snap)
                peer_results = [_compare_our_log(r, tree, [keys.log_key, *extra_log],
                                                 keys.origin, known) for r in peer_results]
            latest = snap.latest_checkpoint()
            result = AuditResult(
                node_name=config.name,
                origin=keys.origin,
                database=label,
                report=report,
                peers_checked=peers,
                peers=peer_results,
                latest_checkpoint=None if latest is None else CheckpointInfo(
                    latest.size, latest.root_hash.hex(), latest.created_ms),
                witnesses=_witnesses(snap, keys, wkeys),
                cosigned_peers=[CosignedPeer(s.peer, s.peer_origin, s.size, s.root_hash.hex(),
                                             s.cosigned_ms) for s in snap.peer_states()],
            )
    except SQLAlchemyError as exc:
        raise AuditError(f"{label}: cannot read the ledger: {exc.__class__.__name__}: "
                         f"{getattr(exc, 'orig', exc)}") from None
    finally:
        engine.dispose()
    return result


def _compare_our_log(
    res: PeerResult,
    tree: MerkleTree,
    log_keys: Sequence[NoteVerifier],
    origin: str,
    known: Sequence[bytes],
) -> PeerResult:
    if res.our_log_size is None or res.our_log == "bad_signature":
        return res
    for note in known:
        cp, _ = open_checkpoint(note, log_keys, origin=origin)
        if cp.size != res.our_log_size:
            continue
        if cp.size > tree.size:
            state, more = "truncated", (f"the peer cosigned {cp.size} entries of our log but "
                                        f"only {tree.size} are stored here")
        elif tree.root(cp.size) != cp.root:
            state, more = "differs", (f"our stored log at size {cp.size} is not the one the "
                                      "peer cosigned (history rewritten here)")
        else:
            state, more = "matches", f"our log matches what the peer cosigned at {cp.size}"
        return replace(res, our_log=state, detail=f"{res.detail}; {more}")
    return res


def _witnesses(
    store: LedgerStore, keys: NodeKeys, wkeys: Sequence[NoteVerifier]
) -> list[WitnessInfo]:
    """Verified cosignatures on our checkpoints, per witness (unverifiable ones skipped)."""
    by_id = {(w.name, w.key_id): w for w in wkeys}
    peer_of = {pk.origin: pk.name for pk in keys.peers}
    acc: dict[str, list[int]] = {}
    for cs in store.cosignatures():
        w = by_id.get((cs.witness_name, cs.key_id))
        if w is None:
            continue
        try:
            cos = Cosignature.from_note_signature(NoteSignature(
                cs.witness_name, cs.key_id, cs.timestamp.to_bytes(8, "big") + cs.signature))
            verify_cosignature(cs.checkpoint_text, cos, w)
            if Checkpoint.from_text(cs.checkpoint_text).origin != keys.origin:
                continue
        except VerificationError:
            continue
        a = acc.setdefault(cs.witness_name, [0, 0, 0])
        a[0] += 1
        a[1] = max(a[1], cs.size)
        a[2] = max(a[2], cs.timestamp)
    return [WitnessInfo(name, peer_of.get(name), c, s, t)
            for name, (c, s, t) in sorted(acc.items())]
