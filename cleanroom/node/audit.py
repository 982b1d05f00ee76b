"""The node's audit ledger: one :class:`~cleanroom.ledger.Ledger` per node, one writer.

Other subsystems record events with::

    from cleanroom.node.audit import record
    from cleanroom.ledger import event
    record(ctx, event("query_proposed", query_id=q, ...), event(...))   # one atomic batch

:func:`ledger` gives the node's ``Ledger`` (origin ``cleanroom/<node name>``, signed with
the node identity's Ed25519 key, cached per :class:`NodeContext`).

Single writer across processes
    A ``Ledger`` keeps the Merkle tree in memory and must be the only writer of its
    database. The writer holds an exclusive ``flock`` on ``NODE_DIR/ledger.lock`` for as
    long as it is open: the running node takes it at startup and keeps it until it stops
    (a second node process on the same directory is refused). A CLI command that changed
    state (``dataset add`` straight into the database) does not append while a node runs:
    :func:`record_outside_node` takes the lock if it is free (no node running) and records
    itself; if the lock is held it asks the running node through the operator API
    (``POST /v1/ledger/reconcile``) to record the events from the database. State-change
    events are *derived* from durable state (dataset versions in the database, the policy
    file's digest) by :func:`reconcile`, which the node also runs at startup, so an event
    whose recording was interrupted (a crash between ingest and append, an unreachable
    node) is recorded the next time any writer reconciles, exactly once.

This module never puts raw data in entries (names, digests and counts only) and never
logs entry contents.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

from sqlmodel import Session, select

from cleanroom.errors import CleanroomError
from cleanroom.ledger import (
    SIG_COSIGNATURE_V1,
    SIG_ED25519,
    Event,
    Ledger,
    NoteVerifier,
    digest,
    event,
)
from cleanroom.node.context import NodeContext

log = logging.getLogger("cleanroom.node.audit")

LOCK_FILE = "ledger.lock"
ORIGIN_PREFIX = "cleanroom/"
DEFAULT_WAIT_SECONDS = 10.0

__all__ = [
    "LedgerBusyError",
    "close_ledger",
    "ledger",
    "log_origin",
    "peer_log_verifier",
    "peer_origin",
    "peer_witness_verifier",
    "reconcile",
    "record",
    "record_outside_node",
]


class LedgerBusyError(CleanroomError):
    """Another process (normally the running node) is the ledger's writer."""


@dataclass
class _Handle:
    ledger: Ledger
    lock_fd: int
    mutex: threading.RLock = field(default_factory=threading.RLock)
    recorded_datasets: set[tuple[str, str]] | None = None
    policy_digest: str | None = None
    policy_digest_known: bool = False
    finalizer: weakref.finalize[[int], NodeContext] | None = None


_handles: weakref.WeakKeyDictionary[NodeContext, _Handle] = weakref.WeakKeyDictionary()
_handles_lock = threading.Lock()


def log_origin(node_name: str) -> str:
    """The origin line of a node's checkpoints: ``cleanroom/<node name>``."""
    return ORIGIN_PREFIX + node_name


def peer_origin(ctx: NodeContext, peer_name: str) -> str:
    """The log origin of pinned peer ``peer_name``.

    Peers are pinned under their own node name (``node init --name`` is "the name partners
    pin"), so their log is ``cleanroom/<pinned name>``.
    """
    return log_origin(ctx.peer(peer_name).name)


def peer_log_verifier(ctx: NodeContext, peer_name: str) -> NoteVerifier:
    """Verifier of a pinned peer's checkpoints (its certificate's Ed25519 key, type 0x01)."""
    return NoteVerifier(peer_origin(ctx, peer_name), ctx.peer_public_key(peer_name), SIG_ED25519)


def peer_witness_verifier(ctx: NodeContext, peer_name: str) -> NoteVerifier:
    """Verifier of a pinned peer's cosignatures (same key, cosignature/v1 type 0x04)."""
    return NoteVerifier(
        peer_origin(ctx, peer_name), ctx.peer_public_key(peer_name), SIG_COSIGNATURE_V1
    )


# --- the writer lock ------------------------------------------------------------------------


def _lock_path(ctx: NodeContext) -> Path:
    return ctx.node_dir / LOCK_FILE


def _try_lock(path: Path, wait_seconds: float) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None if still busy after waiting."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + max(0.0, wait_seconds)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        if time.monotonic() >= deadline:
            os.close(fd)
            return None
        time.sleep(0.05)


def _open(ctx: NodeContext, wait_seconds: float) -> _Handle:
    with _handles_lock:
        h = _handles.get(ctx)
        if h is not None:
            return h
        fd = _try_lock(_lock_path(ctx), wait_seconds)
        if fd is None:
            raise LedgerBusyError(
                f"the audit ledger of node {ctx.config.name} is held by another process "
                f"(a running node, or another command on {ctx.node_dir}); "
                "record through the running node's operator API, or stop it first"
            )
        try:
            lg = Ledger(ctx.engine, log_origin(ctx.config.name), ctx.identity.signing_key())
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        h = _Handle(lg, fd)
        # A context dropped without close_ledger still releases the lock when collected.
        h.finalizer = weakref.finalize(ctx, _release, fd)
        _handles[ctx] = h
        return h


def _release(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


def ledger(ctx: NodeContext, *, wait_seconds: float = DEFAULT_WAIT_SECONDS) -> Ledger:
    """This node's ledger; the first call makes this process its writer.

    Raises :class:`LedgerBusyError` if another process holds the writer lock for longer
    than ``wait_seconds``.
    """
    return _open(ctx, wait_seconds).ledger


def close_ledger(ctx: NodeContext) -> None:
    """Drop the cached ledger and release the writer lock (node shutdown, end of a CLI)."""
    with _handles_lock:
        h = _handles.pop(ctx, None)
    if h is not None:
        if h.finalizer is not None:
            h.finalizer()  # releases the lock once
        else:
            _release(h.lock_fd)


def is_writer(ctx: NodeContext) -> bool:
    """Whether this process holds ``ctx``'s ledger open (and so its writer lock)."""
    with _handles_lock:
        return ctx in _handles


def record(ctx: NodeContext, *events: Event) -> list[int]:
    """Append ``events`` to this node's ledger in one atomic, durable batch; their indices."""
    return ledger(ctx).append_many(list(events))


# --- events derived from durable state --------------------------------------------------------


def _recorded_datasets(h: _Handle) -> set[tuple[str, str]]:
    if h.recorded_datasets is None:
        seen: set[tuple[str, str]] = set()
        offset = 0
        while True:
            page = h.ledger.entries(offset, 1000, event_type="dataset_registered")
            for e in page:
                seen.add((str(e.entry.fields["dataset"]), str(e.entry.fields["version"])))
            if len(page) < 1000:
                break
            offset += len(page)
        h.recorded_datasets = seen
    return h.recorded_datasets


def _last_policy_digest(h: _Handle) -> str | None:
    if not h.policy_digest_known:
        last: str | None = None
        offset = 0
        while True:
            page = h.ledger.entries(offset, 1000, event_type="policy_changed")
            if page:
                last = str(page[-1].entry.fields["digest"])
            if len(page) < 1000:
                break
            offset += len(page)
        h.policy_digest = last
        h.policy_digest_known = True
    return h.policy_digest


def _dataset_events(ctx: NodeContext, h: _Handle) -> list[tuple[tuple[str, str], Event]]:
    from cleanroom.storage.datasets import Dataset, DatasetVersion

    done = _recorded_datasets(h)
    out: list[tuple[tuple[str, str], Event]] = []
    with Session(ctx.engine) as s:
        rows = s.exec(
            select(Dataset.name, DatasetVersion)
            .where(Dataset.id == DatasetVersion.dataset_id)
            .order_by(DatasetVersion.id)  # type: ignore[arg-type]
        ).all()
    for name, v in rows:
        key = (name, str(v.version))
        if key in done:
            continue
        created = v.created_at if v.created_at.tzinfo else v.created_at.replace(tzinfo=UTC)
        ts_ms = int(created.timestamp() * 1000)
        out.append((
            key,
            event(
                "dataset_registered",
                ts_ms=ts_ms,
                dataset=name,
                version=str(v.version),
                digest="sha256:" + v.file_digest,
                rows=int(v.row_count),
                columns=len(v.columns),
            ),
        ))
    return out


def policy_digest(ctx: NodeContext) -> str | None:
    """``sha256:`` digest of the node's policy file bytes, or None without a policy."""
    path = ctx.config.policy_file
    if path is None:
        return None
    try:
        return digest(path.read_bytes())
    except OSError as exc:
        log.warning("cannot read the policy file %s: %s", path, exc.strerror or exc)
        return None


def reconcile(ctx: NodeContext) -> list[int]:
    """Record the state changes not yet in the ledger, in one atomic batch.

    - ``dataset_registered`` for every stored dataset version without one (name, version,
      file digest, row and column counts; timestamped with the version's creation time);
    - ``policy_changed`` if the policy file's digest differs from the last recorded one.

    Idempotent; this process becomes (or already is) the ledger's writer. Returns the new
    entry indices.
    """
    h = _open(ctx, DEFAULT_WAIT_SECONDS)
    with h.mutex:
        ds = _dataset_events(ctx, h)
        events = [e for _k, e in ds]
        current = policy_digest(ctx)
        previous = _last_policy_digest(h)
        if current is not None and current != previous:
            fields: dict[str, object] = {"digest": current}
            if previous is not None:
                fields["previous_digest"] = previous
            events.append(Event("policy_changed", fields))
        if not events:
            return []
        idx = h.ledger.append_many(events)
        _recorded_datasets(h).update(k for k, _e in ds)
        if current is not None and current != previous:
            h.policy_digest = current
        return idx


@contextlib.contextmanager
def _writer_if_free(ctx: NodeContext, wait_seconds: float) -> Iterator[bool]:
    """Become the writer for the block if nobody else is; yields whether we are."""
    already = is_writer(ctx)
    if already:
        yield True
        return
    try:
        _open(ctx, wait_seconds)
    except LedgerBusyError:
        yield False
        return
    try:
        yield True
    finally:
        close_ledger(ctx)


def record_outside_node(ctx: NodeContext) -> str:
    """Get state changes made by a CLI command recorded without a second writer.

    Returns ``"recorded"`` (no node was running: recorded here under the writer lock),
    ``"node"`` (the running node recorded them, via ``POST /v1/ledger/reconcile``), or
    ``"deferred"`` (neither was possible now; the node records them when it next starts
    or reconciles). Never raises for an unreachable node.
    """
    with _writer_if_free(ctx, 0.0) as mine:
        if mine:
            reconcile(ctx)
            return "recorded"
    try:
        with ctx.operator_client(retries=1, timeout=30.0) as client:
            client.post_json("/v1/ledger/reconcile", {}, idempotent=True)
        return "node"
    except CleanroomError as exc:
        log.info("running node not reachable for reconcile: %s", exc)
    with _writer_if_free(ctx, DEFAULT_WAIT_SECONDS) as mine:
        if mine:
            reconcile(ctx)
            return "recorded"
    return "deferred"


# --- checkpoints served to peers and the operator -------------------------------------------------

#: Entries that a served checkpoint may leave uncovered (see :func:`serve_checkpoint`).
BOOKKEEPING_EVENTS = frozenset({"checkpoint_cosigned"})
_TAIL_SCAN_LIMIT = 1000


def serve_checkpoint(ctx: NodeContext, *, fresh: bool = False) -> bytes:
    """The signed checkpoint note to show: the latest stored one if it still describes the
    log, else a new one signed for the current size.

    Unless ``fresh``, a stored checkpoint is still served when the only entries appended
    after it are ``checkpoint_cosigned`` bookkeeping. Without this, every witnessing round
    would grow every log (each cosigning is an entry) and give peers something new to
    cosign in the next round, forever; with it, witnessing settles when nothing else
    happens. Those bookkeeping entries are covered by the next checkpoint that any other
    event causes. A stored checkpoint whose root differs from the tree at its size is never
    served (a new one is signed, which peers that cosigned the old one see as a fork).
    """
    h = _open(ctx, DEFAULT_WAIT_SECONDS)
    lg = h.ledger
    with h.mutex:
        latest = lg.store.latest_checkpoint()
        size = lg.size
        if latest is not None and latest.size <= size and lg.root(latest.size) == latest.root_hash:
            if latest.size == size:
                return latest.note
            tail = size - latest.size
            if not fresh and tail <= _TAIL_SCAN_LIMIT:
                page = lg.entries(latest.size, tail)
                if len(page) == tail and all(e.entry.type in BOOKKEEPING_EVENTS for e in page):
                    return latest.note
        return lg.checkpoint()
