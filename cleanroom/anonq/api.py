"""The node's anonymous-query endpoints (registered in ``cleanroom.node.app.ROUTER_MODULES``).

Peer endpoints (pinned peers over mutual TLS; policy checked per request, see
:mod:`cleanroom.anonq.guard`)::

    GET  /v1/peer/public/{dataset}?columns=a,b      public columns as an Arrow IPC stream
    GET  /v1/peer/anonq/tables/{name}               table info (id, version, sizes, budget)
    POST /v1/peer/anonq/tables/{name}/eval          EVAL_REQUEST -> EVAL_RESPONSE
    POST /v1/peer/anonq/tables/{name}/buckets       BUCKET_REQUEST -> BUCKET_RESPONSE
    GET  /v1/peer/anonq/tables/{name}/download?message=<TABLE_REQUEST, base64url>
                                                    -> TABLE_RESPONSE (streamed)

Bodies are the protocol's bytes (:mod:`protocols.labeled_psi.messages`). A malformed,
truncated, oversized, replayed or wrong-round message gets the 4xx its
:class:`~protocols.errors.RemoteProtocolError` hints; policy refusals name the rule.
A real-time session's owner object waits (at most ``SESSION_TTL`` seconds) between its
EVAL and BUCKET requests. Every session is recorded in this node's ledger (digests and
sizes only) through the group-commit recorder, awaited on the event loop; a session's
opening entries are durable before the reply that lets the querier open labels (see
docs/protocols/anonymous-query.md, "Durability rule"). Evaluation of up to
``INLINE_EVAL_MAX`` points runs on the event loop (a thread hop costs more), larger ones
in worker threads (X25519 releases the GIL), split in two for large requests.

Operator endpoints::

    GET  /v1/anonq/tables                           published tables (metadata)
    POST /v1/anonq/tables/{name}/publish            build or update a table from datasets
                                                    (or, partial_scores, from a lead model)
    POST /v1/anonq/store-recommendations            run the querier pipeline (OEM)

Test hook: if the environment variable ``CLEANROOM_ANONQ_TRANSCRIPT`` names a directory
when the node starts, every request body received on the anonymous-query peer endpoints
is appended to ``received.bin`` there (length-prefixed). It exists for transcript tests
only; never set it in production.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import struct
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.ipc as ipc
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from cleanroom.anonq import QUERY_HEADER, guard, tables
from cleanroom.errors import CleanroomError, InputError
from cleanroom.ledger import Event, digest
from cleanroom.node.app import DirectRoute, error_body
from cleanroom.node.config import PeerConfig
from cleanroom.node.context import NodeContext
from cleanroom.node.deps import (
    REQUEST_ID_KEY,
    CurrentPeer,
    NodeContextDep,
    OperatorAuth,
)
from cleanroom.policy import Policy
from protocols.errors import RemoteProtocolError
from protocols.labeled_psi import AnonymousQueryOwner, EvaluationBudget, Mode, oprf
from protocols.labeled_psi.messages import (
    MAGIC,
    VERSION,
    BucketRequest,
    EvalRequest,
    MsgType,
    TableRequest,
    decode,
)
from protocols.psi.messages import HEADER, NO_BUCKET

log = logging.getLogger("cleanroom.anonq")

MAX_POINTS = 1 << 16
EVAL_BODY_LIMIT = HEADER.size + 8 + 32 * MAX_POINTS
BUCKET_BODY_LIMIT = HEADER.size + 8 + 4 * 4096
SMALL_BODY_LIMIT = 4096
SESSION_TTL = 120.0
SWEEP_SECONDS = 10.0
MAX_OPEN_SESSIONS = 20_000
PARALLEL_EVAL_MIN = 2048
INLINE_EVAL_MAX = 8  # up to this many points: evaluate on the event loop (no thread hop)
STREAM_CHUNK = 1 << 20
TRANSCRIPT_ENV = "CLEANROOM_ANONQ_TRANSCRIPT"
OCTET = "application/octet-stream"
ARROW_STREAM = "application/vnd.apache.arrow.stream"


@dataclass
class _Session:
    role: AnonymousQueryOwner
    query_id: str
    label: str
    table: str
    created: float
    bytes_in: int
    bytes_out: int
    pending: list[Event]  # entries not yet submitted (the eval response's)
    opening: Future[None]  # the session's opening entries, submitted at its EVAL


@dataclass
class _State:
    ctx: NodeContext
    recorder: guard.SessionRecorder
    sources: dict[str, tables.ServingSource] = field(default_factory=dict)
    limiter: guard.RateLimiter = field(default_factory=guard.RateLimiter)
    budgets: guard.Budgets = field(default_factory=guard.Budgets)
    sessions: dict[tuple[str, bytes], _Session] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    publish_lock: threading.Lock = field(default_factory=threading.Lock)
    transcript: Path | None = None
    swept: float = 0.0

    def source(self, name: str) -> tables.ServingSource:
        src = self.sources.get(name)
        if src is None:
            raise HTTPException(404, f"no published table named {name!r} on this node")
        return src

    def reload(self, name: str) -> None:
        src = tables.load_serving(self.ctx.data_dir, name)
        with self.lock:
            self.sources[name] = src

    def put_session(self, peer: str, sid: bytes, session: _Session) -> None:
        now = time.monotonic()
        with self.lock:
            if now - self.swept > SWEEP_SECONDS or len(self.sessions) >= MAX_OPEN_SESSIONS:
                self._sweep(now)
            if len(self.sessions) >= MAX_OPEN_SESSIONS:
                raise guard.Refused(429, "busy", "anonq.open_sessions",
                                    "too many open real-time sessions")
            if (peer, sid) in self.sessions:
                raise RemoteProtocolError("this session id is already in use", status_hint=409)
            self.sessions[(peer, sid)] = session

    def _sweep(self, now: float) -> None:
        """Drop real-time sessions whose bucket request never came; record them cancelled."""
        self.swept = now
        events: list[Event] = []
        for key in [k for k, s in self.sessions.items() if now - s.created > SESSION_TTL]:
            s = self.sessions.pop(key)
            events.extend(s.pending)
            events.append(guard.ended(s.query_id, s.label, key[0], "cancelled", received=1,
                                      sent=1, bytes_received=s.bytes_in,
                                      bytes_sent=s.bytes_out))
        if events:
            self.recorder.submit(events)

    def take_session(self, peer: str, sid: bytes) -> _Session | None:
        with self.lock:
            s = self.sessions.pop((peer, sid), None)
        if s is not None and time.monotonic() - s.created > SESSION_TTL:
            return None
        return s

    def capture(self, endpoint: str, body: bytes) -> None:
        if self.transcript is None:
            return
        name = endpoint.encode()
        with self.lock, (self.transcript / "received.bin").open("ab") as f:
            f.write(struct.pack(">BI", len(name), len(body)) + name + body)


def read_transcript(folder: Path) -> list[tuple[str, bytes]]:
    """The ``(endpoint, body)`` records the transcript test hook wrote under ``folder``
    (``[]`` if none): the reader of :meth:`_State.capture`'s format, for tests."""
    file = folder / "received.bin"
    data = file.read_bytes() if file.exists() else b""
    out: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        n, size = struct.unpack_from(">BI", data, pos)
        pos += 5
        out.append((data[pos:pos + n].decode(), data[pos + n:pos + n + size]))
        pos += n + size
    return out


_states: dict[int, _State] = {}


def state_of(ctx: NodeContext) -> _State:
    st = _states.get(id(ctx))
    if st is None:
        raise HTTPException(503, "the anonymous-query service is not running")
    return st


def lifecycle_source(ctx: NodeContext, name: str,
                     peer: str) -> tuple[tables.ServingSource, EvaluationBudget]:
    """Table ``name`` as this node serves it and ``peer``'s evaluation budget for it: the
    same objects the peer endpoints use, for labeled-PSI sessions run through the query
    lifecycle (:mod:`cleanroom.anonq.lifecycle`). Raises :class:`tables.TableError`."""
    st = _states.get(id(ctx))
    if st is None:
        raise tables.TableError("the anonymous-query service is not running on this node")
    tables.check_table_name(name)
    src = st.sources.get(name)
    if src is None:
        st.reload(name)  # published since startup by another process, or never: TableError
        src = st.sources[name]
    budget = st.budgets.get(guard.node_policy(ctx), name, peer, src.meta.evaluation_budget)
    return src, budget


async def on_startup(ctx: NodeContext) -> None:
    st = _State(ctx=ctx, recorder=guard.SessionRecorder(ctx))
    hook = os.environ.get(TRANSCRIPT_ENV)
    if hook:
        st.transcript = Path(hook)
        st.transcript.mkdir(parents=True, exist_ok=True)
        log.warning("%s is set: request bodies are captured for tests", TRANSCRIPT_ENV)
    _states[id(ctx)] = st
    for name in tables.published_tables(ctx.data_dir):
        try:
            await asyncio.to_thread(st.reload, name)
            log.info("anonymous-query table %s loaded (version %d)", name,
                     st.sources[name].version)
        except CleanroomError as exc:
            log.error("anonymous-query table %s not served: %s", name, exc)


async def on_shutdown(ctx: NodeContext) -> None:
    st = _states.pop(id(ctx), None)
    if st is not None:
        with st.lock:
            st._sweep(time.monotonic() + SESSION_TTL + 1)  # every open session ends here
        await asyncio.to_thread(st.recorder.close)


# --- helpers ---------------------------------------------------------------------------


def _error(request: Request, status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    rid = request.scope.get(REQUEST_ID_KEY, "")
    return JSONResponse(error_body(status, code, message, rid, **extra), status_code=status)


def _refused(request: Request, exc: guard.Refused) -> JSONResponse:
    return _error(request, exc.status, exc.code, str(exc), rule=exc.rule)


def _protocol(request: Request, exc: RemoteProtocolError) -> JSONResponse:
    status = exc.status_hint if 400 <= exc.status_hint < 500 else 400
    return _error(request, status, "protocol_error", str(exc))


def _admit(st: _State, peer: PeerConfig, name: str, *, charge: bool,
           policy: Policy | None = None) -> tables.ServingSource:
    src = st.source(name)
    policy = guard.node_policy(st.ctx) if policy is None else policy
    guard.check_partner(policy, peer.name, src.meta.query_type)
    if charge:
        st.limiter.charge(policy, peer.name)
    return src


def _budget(st: _State, peer: PeerConfig, src: tables.ServingSource,
            policy: Policy | None = None) -> Any:
    policy = guard.node_policy(st.ctx) if policy is None else policy
    return st.budgets.get(policy, src.meta.name, peer.name, src.meta.evaluation_budget)


async def _evaluate(key: bytes, points: bytes) -> bytes:
    n = len(points) // 32
    if n <= INLINE_EVAL_MAX:  # ~50 us per point: cheaper than handing it to a thread
        return oprf.evaluate_job(key, points)
    if n < PARALLEL_EVAL_MIN:
        return await asyncio.to_thread(oprf.evaluate_job, key, points)
    half = (n // 2) * 32
    a, b = await asyncio.gather(asyncio.to_thread(oprf.evaluate_job, key, points[:half]),
                                asyncio.to_thread(oprf.evaluate_job, key, points[half:]))
    return a + b


def _table_response_header(session_id: bytes, body_len: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, MsgType.TABLE_RESPONSE, 2, 0, session_id, NO_BUCKET,
                       body_len)


class PublishSpec(BaseModel):
    """What to publish. ``nearest_stores`` (media) or ``inventory`` (dealer) for
    ``store_recommendation``; ``partial_scores`` (media or dealer) for ``lead_score``
    standard mode, which needs ``model`` (a ``train_lead_model`` query completed at this
    node) and serves ``lead_score`` only."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field(pattern="^(nearest_stores|inventory|partial_scores)$")
    query_type: str | None = Field(None, pattern="^(store_recommendation|lead_score)$")
    model: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    stores_peer: str | None = None
    stores_dataset: str = "stores"
    users_dataset: str = "users"
    locations_dataset: str = "locations"
    inventory_dataset: str = "inventory"
    min_bucket_size: int = Field(1000, ge=1, le=1 << 20)
    evaluation_budget: int = Field(tables.DEFAULT_EVALUATION_BUDGET, ge=1)
    rebuild: bool = False
    processes: int = Field(tables.DEFAULT_PROCESSES, ge=1, le=64)

    @model_validator(mode="after")
    def _kind_fields(self) -> PublishSpec:
        if self.kind == tables.PARTIAL_SCORES:
            if self.model is None:
                raise ValueError("model: a partial_scores table needs the id of a completed "
                                 "train_lead_model query")
            if self.query_type not in (None, "lead_score"):
                raise ValueError("query_type: a partial_scores table serves lead_score only")
            self.query_type = "lead_score"
        else:
            if self.model is not None:
                raise ValueError(f"model: only partial_scores tables name a model, not "
                                 f"{self.kind}")
            if self.query_type is None:
                self.query_type = "store_recommendation"
        return self


_TABLE_PATTERN = f"^{tables.NAME_RE.pattern}$"


class RecommendSpec(BaseModel):
    """Run ``store_recommendation`` at this (OEM) node."""

    model_config = ConfigDict(extra="forbid")
    media_peer: str
    dealer_peer: str
    leads_dataset: str = "leads"
    stores_dataset: str = "stores"
    media_table: str = Field("nearest_stores", pattern=_TABLE_PATTERN)
    dealer_table: str = Field("inventory", pattern=_TABLE_PATTERN)
    mode: str = Field("batch", pattern="^(batch|realtime)$")
    min_anonymity: int = Field(1000, ge=1)
    output: str = Field("store_recommendation.parquet", pattern=r"^[A-Za-z0-9._-]{1,128}$")
    query_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")


# --- routers ---------------------------------------------------------------------------


def routers(ctx: NodeContext) -> list[APIRouter]:
    peer_router = APIRouter(prefix="/v1/peer", tags=["anonymous query (peer)"])
    operator = APIRouter(prefix="/v1/anonq", tags=["anonymous query (operator)"])

    @peer_router.get("/public/{dataset}",
                     summary="Columns of a dataset the policy marks public (Arrow IPC stream)")
    async def public_columns(dataset: str, request: Request, caller: CurrentPeer,
                             ctx: NodeContextDep,
                             columns: str = Query("", max_length=2000)) -> Response:
        from cleanroom.node.datasets import dataset_summary, load_dataset_table

        st = state_of(ctx)
        try:
            info = await run_in_threadpool(dataset_summary, ctx, dataset)
        except InputError as exc:
            return _error(request, 404, "not_found", str(exc))
        names = [c["name"] for c in info.columns]
        wanted = [c for c in columns.split(",") if c] or names
        try:
            guard.check_public_columns(guard.node_policy(ctx), caller.name, dataset, wanted)
        except guard.Refused as exc:
            return _refused(request, exc)
        unknown = [c for c in wanted if c not in names]
        if unknown:
            return _error(request, 404, "not_found",
                          f"dataset {dataset!r} has no column {unknown[0]!r}")
        table = await run_in_threadpool(load_dataset_table, ctx, dataset, columns=wanted)
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        data = sink.getvalue().to_pybytes()
        qid = guard.query_label(request.headers.get(QUERY_HEADER))
        sess = guard.session_label(os.urandom(16))
        events = [
            Event("session_started", {"query_id": qid, "session_id": sess,
                                      "protocol": "public_columns", "peer": caller.name,
                                      "role": "owner"}),
            Event("message_sent", {"query_id": qid, "session_id": sess,
                                   "protocol": "public_columns", "peer": caller.name,
                                   "round": "columns", "digest": digest(data),
                                   "size": len(data)}),
            Event("session_ended", {"query_id": qid, "session_id": sess,
                                    "protocol": "public_columns", "peer": caller.name,
                                    "outcome": "ok", "messages_sent": 1,
                                    "bytes_sent": len(data)}),
        ]
        await st.recorder.record_async(events)
        return Response(data, media_type=ARROW_STREAM,
                        headers={"X-Dataset-Version": str(info.version)})

    @peer_router.get("/anonq/tables/{name}", summary="Public metadata of a labeled table")
    async def table_info(name: str, request: Request, caller: CurrentPeer,
                         ctx: NodeContextDep) -> Any:
        st = state_of(ctx)
        try:
            src = _admit(st, caller, name, charge=False)
        except guard.Refused as exc:
            return _refused(request, exc)
        cur = src.current
        left = _budget(st, caller, src).remaining(caller.name, b"")
        return {
            "name": name, "table_id": cur.table_id.hex(), "version": cur.version,
            "bucket_count": cur.bucket_count, "entry_count": cur.entry_count,
            "min_bucket_size": cur.min_bucket_size, "label_size": cur.label_size,
            "query_type": src.meta.query_type, "evaluations_left": left,
            "max_points_per_request": MAX_POINTS,
        }

    @peer_router.get("/anonq/tables/{name}/download",
                     summary="The whole table, or a delta from the version the caller holds")
    async def download(name: str, request: Request, caller: CurrentPeer,
                       ctx: NodeContextDep,
                       message: str = Query(..., max_length=4 * SMALL_BODY_LIMIT,
                                            description="TABLE_REQUEST, base64url"),
                       query: str | None = Query(None, max_length=64)) -> Response:
        st = state_of(ctx)
        try:
            src = _admit(st, caller, name, charge=True)
        except guard.Refused as exc:
            return _refused(request, exc)
        try:
            body = base64.urlsafe_b64decode(message.encode("ascii") + b"=" * (-len(message) % 4))
        except (ValueError, UnicodeEncodeError):
            return _protocol(request, RemoteProtocolError("the message is not base64url"))
        st.capture("download", body)
        qid = guard.query_label(query)
        label = guard.session_label(os.urandom(16))
        try:
            msg = decode(body, max_bytes=SMALL_BODY_LIMIT)
            if not isinstance(msg, TableRequest):
                raise RemoteProtocolError(
                    f"{type(msg).__name__} sent to the download endpoint", status_hint=409)
            label = guard.session_label(msg.session_id)
            cur = src.current
            same = msg.table_id == cur.table_id and msg.have_version >= 1
            if same and msg.have_version > cur.version:
                raise RemoteProtocolError(f"querier claims version {msg.have_version}, newest "
                                          f"is {cur.version}", status_hint=409)
            blob = (await asyncio.to_thread(src.delta_since, msg.have_version)).to_bytes() \
                if same else None
        except RemoteProtocolError as exc:
            await _record_failed(st, qid, label, caller.name, "table_request", body)
            return _protocol(request, exc)
        head_events = [guard.started(qid, label, caller.name),
                       *guard.message_events(qid, label, caller.name, ("table_request", body),
                                             None)]
        if blob is not None:
            reply = _table_response_header(msg.session_id, len(blob)) + blob
            await st.recorder.record_async([
                *head_events,
                *guard.message_events(qid, label, caller.name, None, ("table_delta", reply)),
                guard.ended(qid, label, caller.name, "ok", received=1, sent=1,
                            bytes_received=len(body), bytes_sent=len(reply))])
            return Response(reply, media_type=OCTET)
        path = src.folder / f"v{cur.version:08d}.table"
        f = path.open("rb")  # held open: a later version may replace the name meanwhile
        size = os.fstat(f.fileno()).st_size
        await st.recorder.record_async(head_events)
        header = _table_response_header(msg.session_id, size)
        peer_name = caller.name

        async def stream() -> AsyncIterator[bytes]:
            h = hashlib.sha256(header)
            sent = len(header)
            ok = False
            try:
                yield header
                while True:
                    chunk = await asyncio.to_thread(f.read, STREAM_CHUNK)
                    if not chunk:
                        break
                    h.update(chunk)
                    sent += len(chunk)
                    yield chunk
                ok = True
            finally:
                f.close()
                # The client may close the stream as soon as it holds Content-Length bytes,
                # before the last empty read: every byte handed out counts as delivered.
                ok = ok or sent == len(header) + size
                events = []
                if ok:
                    events.append(Event("message_sent", {
                        "query_id": qid, "session_id": label, "protocol": "labeled_psi",
                        "peer": peer_name, "round": "table_full",
                        "digest": "sha256:" + h.hexdigest(), "size": sent}))
                events.append(guard.ended(qid, label, peer_name, "ok" if ok else "failed",
                                          received=1, sent=1 if ok else 0,
                                          bytes_received=len(body), bytes_sent=sent))
                try:
                    # Shielded: a disconnect cancels this generator, not the ledger write.
                    await asyncio.shield(st.recorder.record_async(events))
                except CleanroomError as exc:
                    log.error("download session not recorded: %s", exc)

        return StreamingResponse(stream(), media_type=OCTET,
                                 headers={"Content-Length": str(len(header) + size)})

    @operator.get("/tables", summary="Published labeled tables")
    def list_tables(_op: OperatorAuth, ctx: NodeContextDep) -> list[dict[str, Any]]:
        st = state_of(ctx)
        return [src.meta.as_dict() for src in st.sources.values()]

    @operator.post("/tables/{name}/publish", summary="Build or update a labeled table")
    async def publish(name: str, spec: PublishSpec, request: Request, _op: OperatorAuth,
                      ctx: NodeContextDep) -> Any:
        from cleanroom.anonq.client import publish_from_datasets
        from cleanroom.queries.lead_score import ModelUnavailable

        st = state_of(ctx)
        tables.check_table_name(name)

        def run() -> dict[str, Any]:
            with st.publish_lock:
                report = publish_from_datasets(ctx, name, **spec.model_dump())
                st.reload(name)
                return report.as_dict()

        try:
            return await run_in_threadpool(run)
        except ModelUnavailable as exc:
            return _error(request, exc.status, "model_unavailable", str(exc), field=exc.field)

    @operator.post("/store-recommendations", summary="Run store_recommendation (OEM node)")
    async def store_recommendations(spec: RecommendSpec, _op: OperatorAuth,
                                    ctx: NodeContextDep) -> dict[str, Any]:
        from cleanroom.anonq.client import store_recommendations as run_pipeline

        def run() -> dict[str, Any]:
            return run_pipeline(ctx, **spec.model_dump()).as_dict()

        return await run_in_threadpool(run)

    return [peer_router, operator]


_Request = TypeVar("_Request", EvalRequest, BucketRequest)


async def _open_request(st: _State, request: Request, caller: PeerConfig, name: str,
                        kind: type[_Request], endpoint: str, capture: str, round_name: str,
                        *, charge: bool, policy: Policy | None = None
                        ) -> tuple[tables.ServingSource, bytes, str, _Request] | Response:
    """The common start of the real-time endpoints: admit the caller (policy, rate), read
    and capture the body, decode it as ``kind``; a refusal or a malformed message is the
    reply to send (a malformed one recorded as a failed session)."""
    try:
        src = _admit(st, caller, name, charge=charge, policy=policy)
    except guard.Refused as exc:
        return _refused(request, exc)
    body = await request.body()
    st.capture(capture, body)
    qid = guard.query_label(request.headers.get(QUERY_HEADER))
    limit = EVAL_BODY_LIMIT if kind is EvalRequest else BUCKET_BODY_LIMIT
    try:
        msg = decode(body, max_bytes=limit)
        if not isinstance(msg, kind):
            raise RemoteProtocolError(
                f"{type(msg).__name__} sent to the {endpoint} endpoint", status_hint=409)
    except RemoteProtocolError as exc:
        await _record_failed(st, qid, guard.session_label(os.urandom(16)), caller.name,
                             round_name, body)
        return _protocol(request, exc)
    return src, body, qid, msg


def direct_routes(ctx: NodeContext) -> list[DirectRoute]:
    """The two real-time hot paths, served by the node's guard without FastAPI routing
    (:class:`cleanroom.node.app.DirectRoute`): a lookup is two small requests."""

    async def evaluate(request: Request, caller: PeerConfig, name: str) -> Response:
        st = state_of(ctx)
        policy = guard.node_policy(ctx)
        opened = await _open_request(st, request, caller, name, EvalRequest, "evaluation",
                                     "eval", "eval_request", charge=True, policy=policy)
        if isinstance(opened, Response):
            return opened
        src, body, qid, msg = opened
        label = guard.session_label(msg.session_id)
        role = AnonymousQueryOwner(src, querier_id=caller.name, session_id=msg.session_id,
                                   budget=_budget(st, caller, src, policy),
                                   max_points=MAX_POINTS,
                                   allowed_modes=frozenset({Mode.BATCH, Mode.REALTIME}))
        try:
            step = role.receive(body)
            assert step.job is not None
        except RemoteProtocolError as exc:
            await _record_failed(st, qid, label, caller.name, "eval_request", body)
            return _protocol(request, exc)
        except guard.Refused as exc:
            await _record_failed(st, qid, label, caller.name, "eval_request", body)
            return _refused(request, exc)
        # The session's opening entries go to the group commit now, so the commit runs
        # while the points are evaluated (durability rule: docs/protocols/anonymous-query.md).
        opening = st.recorder.submit([
            guard.started(qid, label, caller.name),
            *guard.message_events(qid, label, caller.name, ("eval_request", body), None)])
        try:
            try:
                output = await _evaluate(src.key, msg.points)
            except RemoteProtocolError as exc:
                role.fail(exc)
            reply = role.complete(step, output)
            assert reply is not None
            sent = guard.message_events(qid, label, caller.name, None, ("eval_response", reply))
            if msg.mode is Mode.REALTIME:
                # The bucket request closes the session (or, if it never comes, its expiry).
                st.put_session(caller.name, msg.session_id, _Session(
                    role, qid, label, name, time.monotonic(), len(body), len(reply), sent,
                    opening))
        except (RemoteProtocolError, guard.Refused) as exc:
            await _record_failed(st, qid, label, caller.name, "eval_request", body,
                                 started=False, received=False)
            return (_protocol(request, exc) if isinstance(exc, RemoteProtocolError)
                    else _refused(request, exc))
        if msg.mode is not Mode.BATCH:
            return Response(reply, media_type=OCTET)
        # Batch: the querier holds the table, so this reply opens labels: it waits until
        # the session's opening entries are durable; its closing entries follow them.
        await _closing(st, opening, [*sent, guard.ended(
            qid, label, caller.name, "ok", received=1, sent=1, bytes_received=len(body),
            bytes_sent=len(reply))])
        return Response(reply, media_type=OCTET)

    async def buckets(request: Request, caller: PeerConfig, name: str) -> Response:
        st = state_of(ctx)
        opened = await _open_request(st, request, caller, name, BucketRequest, "bucket",
                                     "buckets", "bucket_request", charge=False)
        if isinstance(opened, Response):
            return opened
        _src, body, qid, msg = opened
        session = st.take_session(caller.name, msg.session_id)
        if session is None or session.table != name:
            return _protocol(request, RemoteProtocolError(
                "no open real-time session with this id (expired, finished or never "
                "evaluated)", status_hint=409))
        qid = session.query_id
        try:
            step = session.role.receive(body)
            reply = step.reply
            assert reply is not None
        except RemoteProtocolError as exc:
            st.recorder.submit(session.pending)
            await _record_failed(st, qid, session.label, caller.name, "bucket_request", body,
                                 started=False)
            return _protocol(request, exc)
        # The bucket opens labels: the session's opening entries (submitted at its EVAL,
        # usually durable by now) must be durable first; the rest follows them.
        await _closing(st, session.opening, [
            *session.pending,
            *guard.message_events(qid, session.label, caller.name, ("bucket_request", body),
                                  ("bucket_response", reply)),
            guard.ended(qid, session.label, caller.name, "ok", received=2, sent=2,
                        bytes_received=session.bytes_in + len(body),
                        bytes_sent=session.bytes_out + len(reply)),
        ])
        return Response(reply, media_type=OCTET)

    return [
        DirectRoute("POST", "/v1/peer/anonq/tables/{name}/eval", evaluate, EVAL_BODY_LIMIT,
                    "Blinded OPRF evaluation"),
        DirectRoute("POST", "/v1/peer/anonq/tables/{name}/buckets", buckets,
                    BUCKET_BODY_LIMIT, "Buckets of a real-time session"),
    ]


async def _closing(st: _State, opening: Future[None], events: list[Event]) -> None:
    """Wait until a session's opening entries are durable, then queue its closing
    ``events`` behind them; wait for those too only when the recorder is backlogged."""
    await guard.durable(opening)
    closing = st.recorder.submit(events)
    if st.recorder.backlogged:
        await guard.durable(closing)
    else:
        closing.add_done_callback(_log_unrecorded)


def _log_unrecorded(fut: Future[None]) -> None:
    exc = fut.exception()
    if exc is not None:
        log.error("closing entries of a session not recorded: %s", exc)


async def _record_failed(st: _State, qid: str, label: str, peer: str, round_name: str,
                         body: bytes, *, started: bool = True, received: bool = True) -> None:
    events: list[Event] = [guard.started(qid, label, peer)] if started else []
    if received:
        events += guard.message_events(qid, label, peer, (round_name, body), None)
    events.append(guard.ended(qid, label, peer, "failed", received=1,
                              bytes_received=len(body)))
    try:
        await st.recorder.record_async(events)
    except CleanroomError as exc:
        log.error("failed session not recorded: %s", exc)
