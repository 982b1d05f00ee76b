"""Ledger endpoints: proofs and cosignatures for pinned peers, entries for the operator.

Peer endpoints (mutual TLS, pinned peers only; the guard refuses everyone else):

- ``GET /v1/peer/ledger/checkpoint[?old=N]``: the latest signed checkpoint note (signed
  for the current size if needed, see :func:`cleanroom.node.audit.serve_checkpoint`) and,
  with ``old``, the consistency proof from ``N`` to it (``null`` if ``N`` is beyond it);
- ``GET /v1/peer/ledger/consistency?old=N&new=M``: RFC 9162 consistency proof;
- ``GET /v1/peer/ledger/inclusion?index=I&size=S``: RFC 9162 inclusion proof;
- ``POST /v1/peer/ledger/cosignature`` ``{"note": ...}``: a peer returns one of our
  checkpoints with its cosignature; only the *calling* peer's cosignature (checked with
  its pinned key) is stored.
- ``GET /v1/peer/ledger/witnessed[?origin=<caller's origin>]``: the last checkpoint of the
  *caller's* log this node cosigned, with our cosignature (``note: null`` if none), so
  ``audit verify --peers`` can compare what each witness was shown.

Hashes are standard base64 of 32 bytes; notes are their UTF-8 text. Peers never see
entries. Operator endpoints: ``GET /v1/ledger/entries`` (paged, filtered),
``GET /v1/ledger/checkpoint``, ``POST /v1/ledger/witness`` (one round now),
``GET /v1/ledger/witness`` (last round and witness memory), ``POST /v1/ledger/reconcile``
(record state changes made by CLI commands; used by :func:`audit.record_outside_node`).

Startup opens the ledger (this process becomes its only writer), records pending state
changes and starts the witnessing timer; shutdown stops the timer and releases the ledger.
Bad parameters are 4xx with a message naming the parameter.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from cleanroom.errors import CleanroomError
from cleanroom.ledger import EVENT_TYPES, Checkpoint, VerificationError
from cleanroom.ledger.note import find_cosignatures, parse_note
from cleanroom.node import audit
from cleanroom.node.config import NodeConfig
from cleanroom.node.context import NodeContext
from cleanroom.node.deps import CurrentPeer, NodeContextDep, OperatorAuth
from cleanroom.node.witness_service import WitnessTimer, last_round, wait_idle, witness_round

log = logging.getLogger("cleanroom.node.ledger")

MAX_PAGE = 1000
MAX_NOTE_CHARS = 64 * 1024
_timers: dict[int, WitnessTimer] = {}
_listening: set[int] = set()
_listen_lock = threading.Lock()


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode("ascii")


def _note_info(note: bytes) -> dict[str, Any]:
    cp = Checkpoint.from_text(parse_note(note).text)
    return {"origin": cp.origin, "size": cp.size, "root": _b64(cp.root),
            "note": note.decode("utf-8")}


def _bad(param: str, message: str) -> HTTPException:
    return HTTPException(400, f"parameter {param!r}: {message}")


def _time_ms(param: str, value: str | None) -> int | None:
    """Milliseconds since the epoch, or an ISO 8601 time (naive = UTC)."""
    if value is None or value == "":
        return None
    text = value.strip()
    if text.isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _bad(param, "expected milliseconds since the epoch or an ISO 8601 time "
                          "(e.g. 2025-01-31T12:00:00Z)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _event_types(value: str | None) -> list[str] | None:
    if value is None or value == "":
        return None
    types = [t.strip() for t in value.split(",") if t.strip()]
    for t in types:
        if t not in EVENT_TYPES:
            raise _bad("event_type", f"unknown event type {t!r}; expected one of "
                                     f"{', '.join(sorted(EVENT_TYPES))}")
    return types


class CosignatureIn(BaseModel):
    note: str = Field(..., min_length=1, max_length=MAX_NOTE_CHARS,
                      description="one of this node's checkpoints with the caller's cosignature")


def routers(ctx: NodeContext) -> list[APIRouter]:
    peer = APIRouter(prefix="/v1/peer/ledger", tags=["ledger (pinned peers)"])
    op = APIRouter(prefix="/v1/ledger", tags=["ledger (operator)"])

    # --- peers ---------------------------------------------------------------------------

    @peer.get("/checkpoint", summary="Latest signed checkpoint; with old=N also the "
                                     "consistency proof from N")
    def peer_checkpoint(
        _caller: CurrentPeer,
        ctx: NodeContextDep,
        old: int | None = Query(None, ge=0, description="size the caller last cosigned"),
    ) -> dict[str, Any]:
        lg = audit.ledger(ctx)
        note = audit.serve_checkpoint(ctx)
        info = _note_info(note)
        out: dict[str, Any] = {**info, "consistency": None}
        if old is not None:
            if old <= info["size"]:
                out["consistency"] = [_b64(h) for h in lg.consistency_proof(old, info["size"])]
            else:
                out["consistency_error"] = (
                    f"old size {old} is larger than this checkpoint's size {info['size']}"
                )
        return out

    @peer.get("/consistency", summary="Consistency proof between two tree sizes")
    def consistency(
        _caller: CurrentPeer,
        ctx: NodeContextDep,
        old: int = Query(..., ge=0),
        new: int = Query(..., ge=0),
    ) -> dict[str, Any]:
        lg = audit.ledger(ctx)
        size = lg.size
        if new > size:
            raise _bad("new", f"{new} is larger than the log ({size} entries)")
        if old > new:
            raise _bad("old", f"{old} is larger than new ({new})")
        return {"old": old, "new": new, "proof": [_b64(h) for h in lg.consistency_proof(old, new)]}

    @peer.get("/inclusion", summary="Inclusion proof of entry `index` in the tree of `size`")
    def inclusion(
        _caller: CurrentPeer,
        ctx: NodeContextDep,
        index: int = Query(..., ge=0),
        size: int = Query(..., ge=1),
    ) -> dict[str, Any]:
        lg = audit.ledger(ctx)
        have = lg.size
        if size > have:
            raise _bad("size", f"{size} is larger than the log ({have} entries)")
        if index >= size:
            raise _bad("index", f"{index} is not below size {size}")
        return {"index": index, "size": size,
                "proof": [_b64(h) for h in lg.inclusion_proof(index, size)]}

    @peer.post("/cosignature", summary="Store the caller's cosignature on our checkpoint")
    def cosignature(body: CosignatureIn, caller: CurrentPeer, ctx: NodeContextDep
                    ) -> dict[str, Any]:
        lg = audit.ledger(ctx)
        note = body.note.encode("utf-8")
        witness = audit.peer_witness_verifier(ctx, caller.name)
        try:
            parse_note(note)
        except VerificationError:
            raise HTTPException(400, "field 'note': not a signed note") from None
        try:
            found = find_cosignatures(note, [witness])
        except VerificationError:
            raise HTTPException(400, f"the note carries a cosignature line of "
                                     f"{witness.name} that does not verify") from None
        if not found:
            raise HTTPException(400, f"the note carries no cosignature of {witness.name} "
                                     "(cosignature/v1 with your pinned key)")
        try:
            new = lg.record_cosignatures(note, [witness])
        except VerificationError:
            raise HTTPException(
                400, "the note is not a checkpoint of this log signed by this node that "
                     "matches its tree"
            ) from None
        cp = Checkpoint.from_text(parse_note(note).text)
        return {"stored": new, "size": cp.size, "witness": witness.name}

    @peer.get("/witnessed", summary="The last checkpoint of the caller's log that this node "
                                    "cosigned, with that cosignature")
    def witnessed(
        caller: CurrentPeer,
        ctx: NodeContextDep,
        origin: str | None = Query(None, max_length=255,
                                   description="the caller's own log origin (default)"),
    ) -> dict[str, Any]:
        own = audit.peer_origin(ctx, caller.name)
        if origin is not None and origin != own:
            raise HTTPException(403, f"parameter 'origin': you may ask only about your own "
                                     f"log ({own})")
        st = audit.ledger(ctx).store.peer_state(own)
        if st is None:
            return {"origin": own, "note": None, "size": None}
        cosigned = st.note + st.cosignature.encode("utf-8")
        return {"origin": own, "note": cosigned.decode("utf-8"), "size": st.size,
                "cosigned_ms": st.cosigned_ms}

    # --- operator ------------------------------------------------------------------------

    @op.get("/entries", summary="Ledger entries in index order, paged and filtered")
    def entries(
        _op: OperatorAuth,
        ctx: NodeContextDep,
        offset: int = Query(0, ge=0, description="number of matching entries to skip"),
        limit: int = Query(100, ge=1, le=MAX_PAGE),
        query_id: str | None = Query(None, max_length=128),
        peer: str | None = Query(None, max_length=128),
        event_type: str | None = Query(None, max_length=2000,
                                       description="one type or a comma-separated list"),
        since: str | None = Query(None, description="ms since epoch or ISO 8601, inclusive"),
        until: str | None = Query(None, description="ms since epoch or ISO 8601, exclusive"),
    ) -> dict[str, Any]:
        types = _event_types(event_type)
        since_ms = _time_ms("since", since)
        until_ms = _time_ms("until", until)
        if since_ms is not None and until_ms is not None and until_ms < since_ms:
            raise _bad("until", "is before 'since'")
        lg = audit.ledger(ctx)
        page = lg.entries(offset, limit, query_id=query_id or None, peer=peer or None,
                          event_type=types, since_ms=since_ms, until_ms=until_ms)
        return {
            "origin": lg.origin,
            "size": lg.size,
            "offset": offset,
            "limit": limit,
            "next_offset": offset + len(page) if len(page) == limit else None,
            "entries": [{**e.to_dict(), "body": e.body.decode("utf-8")} for e in page],
        }

    @op.get("/checkpoint", summary="The checkpoint peers are shown, who cosigned it, and "
                                   "this node's verifier keys")
    def op_checkpoint(
        _op: OperatorAuth,
        ctx: NodeContextDep,
        fresh: bool = Query(False, description="sign a checkpoint of the whole log now"),
    ) -> dict[str, Any]:
        lg = audit.ledger(ctx)
        note = audit.serve_checkpoint(ctx, fresh=fresh)
        info = _note_info(note)
        root = base64.b64decode(info["root"])
        cosigned_by: list[dict[str, Any]] = []
        latest: dict[str, int] = {}
        for c in lg.store.cosignatures():
            latest[c.witness_name] = max(latest.get(c.witness_name, 0), c.size)
            if c.size == info["size"] and c.root_hash == root:
                cosigned_by.append({"witness": c.witness_name, "timestamp": c.timestamp})
        return {**info, "log_size": lg.size, "vkey": lg.verifier.vkey(),
                "witness_vkey": lg.witness_verifier.vkey(), "cosigned_by": cosigned_by,
                "latest_cosigned_size": latest}

    @op.post("/witness", summary="Run one witnessing round with every pinned peer now")
    def witness_now(_op: OperatorAuth, ctx: NodeContextDep) -> dict[str, Any]:
        statuses = witness_round(ctx)
        return {"peers": [s.as_dict() for s in statuses]}

    @op.get("/witness", summary="The last round's statuses and what this node last cosigned")
    def witness_state(_op: OperatorAuth, ctx: NodeContextDep) -> dict[str, Any]:
        lg = audit.ledger(ctx)
        return {
            "last_round": [s.as_dict() for s in last_round(ctx)],
            "cosigned": [
                {"peer": p.peer, "origin": p.peer_origin, "size": p.size,
                 "root": _b64(p.root_hash), "cosigned_ms": p.cosigned_ms}
                for p in lg.store.peer_states()
            ],
        }

    @op.post("/reconcile", summary="Record state changes made outside the node process "
                                   "(dataset versions, policy file)")
    def reconcile(_op: OperatorAuth, ctx: NodeContextDep) -> dict[str, Any]:
        return {"recorded": audit.reconcile(ctx)}

    return [peer, op]


# --- lifecycle ------------------------------------------------------------------------------------


def _on_config_change(ctx: NodeContext) -> Any:
    def listener(_old: NodeConfig, _new: NodeConfig) -> None:
        try:
            audit.reconcile(ctx)
        except CleanroomError as exc:
            log.warning("could not record the configuration change: %s", exc)

    return listener


async def on_startup(ctx: NodeContext) -> None:
    await asyncio.to_thread(audit.ledger, ctx, wait_seconds=30.0)
    await asyncio.to_thread(audit.reconcile, ctx)
    with _listen_lock:
        if id(ctx) not in _listening:
            _listening.add(id(ctx))
            ctx.on_config_change(_on_config_change(ctx))
    timer = WitnessTimer(ctx)
    _timers[id(ctx)] = timer
    timer.start()


async def on_shutdown(ctx: NodeContext) -> None:
    timer = _timers.pop(id(ctx), None)
    if timer is not None:
        await timer.stop()
    if not await asyncio.to_thread(wait_idle, ctx, 10.0):
        log.warning("a witnessing round is still running at shutdown")
    audit.close_ledger(ctx)
