"""Cross-party witnessing: this node cosigns its pinned peers' ledger checkpoints.

A *round* (:func:`witness_round`) does, for each pinned peer P:

1. fetch P's latest signed checkpoint together with a consistency proof from the size
   this node last cosigned for P (``GET /v1/peer/ledger/checkpoint?old=N``);
2. call :meth:`cleanroom.ledger.Ledger.witness`, which verifies the note against P's
   pinned key and the proof against the checkpoint we cosigned before, records
   ``checkpoint_cosigned`` (or refuses, records ``witness_alarm`` and raises);
3. return the cosigned note to P (``POST /v1/peer/ledger/cosignature``), which stores it.

A checkpoint identical to the one already cosigned is not cosigned again (no new entry);
the stored cosignature is sent back instead, so a cosignature lost on the way is
delivered on the next round. A refused note that comes back unchanged is not recorded
twice. An unreachable peer is a status (retried next round); nothing here raises for a
peer's failure. Rounds run on a timer in the node process (``witness_interval_seconds``;
0 disables), on demand (``POST /v1/ledger/witness``) and after each joint query (the
query lifecycle calls :func:`witness_round`). Rounds of one node never overlap.

:func:`fetch_peer_checkpoint` is the transport half alone, for ``audit verify --peers``.
This module moves checkpoints, proofs and cosignatures only: no entries, no data.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import threading
import weakref
from dataclasses import asdict, dataclass
from typing import Any

from cleanroom.errors import CleanroomError
from cleanroom.ledger import LedgerError, WitnessAlarm, digest
from cleanroom.node.audit import (
    ledger,
    peer_log_verifier,
    peer_origin,
    reconcile,
)
from cleanroom.node.context import NodeContext
from cleanroom.transport import PeerCallError

log = logging.getLogger("cleanroom.node.witness")

CHECKPOINT_PATH = "/v1/peer/ledger/checkpoint"
CONSISTENCY_PATH = "/v1/peer/ledger/consistency"
INCLUSION_PATH = "/v1/peer/ledger/inclusion"
COSIGNATURE_PATH = "/v1/peer/ledger/cosignature"
DEFAULT_INTERVAL_SECONDS = 300.0
INTERVAL_ENV = "CLEANROOM_WITNESS_INTERVAL_SECONDS"
MAX_PROOF_HASHES = 128

__all__ = [
    "PeerWitnessStatus",
    "WitnessTimer",
    "fetch_peer_checkpoint",
    "last_round",
    "schedule_round",
    "wait_idle",
    "witness_interval_seconds",
    "witness_peer",
    "witness_round",
]


class PeerReplyError(CleanroomError):
    """A peer's ledger reply is malformed (not a note, bad base64, wrong shape)."""


@dataclass(frozen=True)
class PeerWitnessStatus:
    """The outcome of witnessing one peer in one round.

    ``status``: ``cosigned`` (new checkpoint cosigned), ``up_to_date`` (same checkpoint as
    last time), ``alarm`` (refused; ``reason`` says why; the alarm is in our ledger),
    ``unreachable`` (the call failed; retried next round), ``bad_reply`` (the peer answered
    something that is not a checkpoint) or ``error``. ``delivered`` says whether the
    peer accepted our cosignature.
    """

    peer: str
    status: str
    size: int | None = None
    previous_size: int | None = None
    reason: str | None = None
    delivered: bool = False
    detail: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _State:
    def __init__(self) -> None:
        self.round_lock = threading.RLock()
        self.refused: dict[str, str] = {}  # peer -> digest of the last refused note
        self.last: list[PeerWitnessStatus] = []
        self.queued = False


_states: weakref.WeakKeyDictionary[NodeContext, _State] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def _state(ctx: NodeContext) -> _State:
    with _states_lock:
        st = _states.get(ctx)
        if st is None:
            st = _states[ctx] = _State()
        return st


# --- transport ----------------------------------------------------------------------------------


def _b64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise PeerReplyError(f"{what} is not a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PeerReplyError(f"{what} is not valid base64") from None
    if len(raw) != 32:
        raise PeerReplyError(f"{what} is not a 32-byte hash")
    return raw


def _proof(value: object, what: str) -> list[bytes]:
    if not isinstance(value, list) or len(value) > MAX_PROOF_HASHES:
        raise PeerReplyError(f"{what} is not a list of at most {MAX_PROOF_HASHES} hashes")
    return [_b64(h, f"{what}[{i}]") for i, h in enumerate(value)]


def fetch_peer_checkpoint(
    ctx: NodeContext, peer_name: str, old_size: int
) -> tuple[bytes, list[bytes]]:
    """Peer ``peer_name``'s latest signed checkpoint note and a consistency proof to it
    from ``old_size`` (empty if ``old_size`` is 0, equal to, or beyond the note's size).

    Nothing is verified here: the caller opens the note with the peer's pinned key
    (:func:`cleanroom.node.audit.peer_log_verifier`) and checks the proof. Raises
    :class:`~cleanroom.transport.PeerCallError` if the call fails and
    :class:`PeerReplyError` if the reply is malformed.
    """
    if old_size < 0:
        raise ValueError("old_size must be >= 0")
    with ctx.peer_client(peer_name, retries=1) as client:
        data = client.get_json(CHECKPOINT_PATH, params={"old": str(old_size)})
    if not isinstance(data, dict) or not isinstance(data.get("note"), str):
        raise PeerReplyError(f"peer {peer_name!r}: checkpoint reply has no note")
    note = data["note"].encode("utf-8")
    cons = data.get("consistency")
    proof = [] if cons is None else _proof(cons, f"peer {peer_name!r}: consistency proof")
    return note, proof


def _deliver(ctx: NodeContext, peer_name: str, cosigned_note: bytes) -> tuple[bool, str | None]:
    try:
        with ctx.peer_client(peer_name, retries=1) as client:
            client.post_json(
                COSIGNATURE_PATH, {"note": cosigned_note.decode("utf-8")}, idempotent=True
            )
        return True, None
    except CleanroomError as exc:
        return False, str(exc)


# --- a round ---------------------------------------------------------------------------


def witness_peer(ctx: NodeContext, peer_name: str) -> PeerWitnessStatus:
    """Witness one pinned peer now (see the module docstring). Never raises for peer
    failures; returns the status."""
    st = _state(ctx)
    lg = ledger(ctx)
    try:
        origin = peer_origin(ctx, peer_name)
        verifier = peer_log_verifier(ctx, peer_name)
    except CleanroomError as exc:
        return PeerWitnessStatus(peer_name, "error", detail=str(exc))
    previous = lg.store.peer_state(origin)
    old = 0 if previous is None else previous.size
    try:
        note, proof = fetch_peer_checkpoint(ctx, peer_name, old)
    except PeerCallError as exc:
        return PeerWitnessStatus(peer_name, "unreachable", previous_size=old, detail=str(exc))
    except PeerReplyError as exc:
        return PeerWitnessStatus(peer_name, "bad_reply", previous_size=old, detail=str(exc))
    except CleanroomError as exc:
        return PeerWitnessStatus(peer_name, "error", previous_size=old, detail=str(exc))

    if previous is not None and note == previous.note:
        cosigned = previous.note + previous.cosignature.encode("utf-8")
        delivered, why = _deliver(ctx, peer_name, cosigned)
        return PeerWitnessStatus(peer_name, "up_to_date", size=previous.size,
                                 previous_size=old, delivered=delivered, detail=why)
    note_digest = digest(note)
    if st.refused.get(peer_name) == note_digest:
        return PeerWitnessStatus(peer_name, "alarm", previous_size=old,
                                 detail="the same refused checkpoint again (alarm already "
                                        "recorded)")
    try:
        cosigned = lg.witness(peer_name, verifier, note, proof)
    except WitnessAlarm as alarm:
        st.refused[peer_name] = note_digest
        log.warning("witness alarm: %s", alarm)
        return PeerWitnessStatus(peer_name, "alarm", size=alarm.alarm.new_size,
                                 previous_size=old, reason=alarm.alarm.reason, detail=str(alarm))
    except (LedgerError, ValueError) as exc:
        return PeerWitnessStatus(peer_name, "error", previous_size=old, detail=str(exc))
    st.refused.pop(peer_name, None)
    now = lg.store.peer_state(origin)
    delivered, why = _deliver(ctx, peer_name, cosigned)
    return PeerWitnessStatus(peer_name, "cosigned", size=None if now is None else now.size,
                             previous_size=old, delivered=delivered, detail=why)


def witness_round(ctx: NodeContext) -> list[PeerWitnessStatus]:
    """One witnessing round with every pinned peer now; per-peer statuses.

    Safe to call from any thread of the node process (rounds are serialised). Also
    records pending state changes first (:func:`cleanroom.node.audit.reconcile`), so a
    policy file edited while the node runs is in the ledger before peers cosign it.
    """
    st = _state(ctx)
    with st.round_lock:
        try:
            reconcile(ctx)
        except CleanroomError as exc:
            log.warning("could not record pending state changes: %s", exc)
        out = [witness_peer(ctx, p.name) for p in ctx.peers()]
        st.last = out
    for s in out:
        if s.status not in ("cosigned", "up_to_date"):
            log.info("witness %s: %s", s.peer, s.status)
    return out


def schedule_round(ctx: NodeContext) -> bool:
    """Run :func:`witness_round` soon in a background thread and return at once.

    For callers that must not wait for peers (the end of a joint query). At most one
    round is queued behind a running one; returns False if one was already queued.
    """
    st = _state(ctx)
    with _states_lock:
        if st.queued:
            return False
        st.queued = True

    def run() -> None:
        try:
            with st.round_lock:  # re-entrant: witness_round takes it again
                with _states_lock:
                    st.queued = False
                witness_round(ctx)
        except Exception:
            log.exception("witness round failed")

    threading.Thread(target=run, name="witness-round", daemon=True).start()
    return True


def wait_idle(ctx: NodeContext, timeout: float) -> bool:
    """Wait until no round runs (at most ``timeout`` s); whether it is idle now."""
    lock = _state(ctx).round_lock
    if lock.acquire(timeout=max(0.0, timeout)):
        lock.release()
        return True
    return False


def last_round(ctx: NodeContext) -> list[PeerWitnessStatus]:
    """The statuses of this node's last completed round (empty before the first)."""
    return list(_state(ctx).last)


# --- the timer ----------------------------------------------------------------------------------


def witness_interval_seconds(ctx: NodeContext) -> float:
    """Seconds between timer rounds (0 = no timer).

    The ``CLEANROOM_WITNESS_INTERVAL_SECONDS`` environment variable of the node process
    wins when set (tests, one-off runs); otherwise ``[ledger] witness_interval_seconds``
    from ``node.toml`` when the configuration carries it; otherwise 300.
    """
    text = os.environ.get(INTERVAL_ENV)
    if text is not None and text.strip():
        try:
            seconds = float(text)
        except ValueError:
            log.warning("%s=%r is not a number; ignored", INTERVAL_ENV, text)
        else:
            return seconds if seconds > 0 else 0.0
    settings = getattr(ctx.config, "ledger", None)
    value = getattr(settings, "witness_interval_seconds", None)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return DEFAULT_INTERVAL_SECONDS
    return float(value) if value > 0 else 0.0


class WitnessTimer:
    """Runs :func:`witness_round` every ``witness_interval_seconds`` in the event loop's
    thread pool until stopped. The interval is re-read before each wait (config reloads
    apply); a failing round is logged and the timer goes on."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            interval = witness_interval_seconds(self.ctx)
            if interval <= 0:
                await asyncio.sleep(5.0)  # disabled: look again later (config may change)
                continue
            await asyncio.sleep(interval)
            if witness_interval_seconds(self.ctx) <= 0:
                continue
            try:
                await asyncio.to_thread(witness_round, self.ctx)
                self.rounds += 1
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("witness round failed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
