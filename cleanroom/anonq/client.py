"""The querier side of the anonymous query, and the node-side pipelines that use it.

Run inside a node (or with a :class:`~cleanroom.node.context.NodeContext` on its
directory); every call to another node goes through
:meth:`NodeContext.peer_client` (mutual TLS, pinned certificate):

- :func:`lookup_realtime`: one real-time session per ``session_size`` identifiers
  (EVAL, then the buckets of the tags); the owner learns the bucket ids only;
- :func:`lookup_batch`: download the owner's table (or a delta to the copy cached under
  ``DATA_DIR/anonq/remote/<peer>/``), then evaluation sessions; lookups are local and the
  owner learns the number of evaluations only. Blinding and unblinding run in a process
  pool for large inputs;
- :func:`fetch_public`: public columns of a peer's dataset (e.g. the OEM's store list);
- :func:`publish_from_datasets`: the owner builds its table from its own datasets (the
  media platform's nearest-stores table, the dealer's inventory table, a host's
  partial-scores table of a trained lead model);
- :func:`store_recommendations`: the OEM's ``store_recommendation`` pipeline, leads ->
  nearest-stores labels -> inventory labels -> :func:`parties.oem.recommend` -> result
  table under ``DATA_DIR/results/``.

Identifiers enter the protocol's querier objects only; nothing here sends, logs or
records an identifier, a label or a location.
"""

from __future__ import annotations

import base64
import contextlib
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from cleanroom.anonq import QUERY_HEADER, tables
from cleanroom.errors import CleanroomError, InputError
from cleanroom.node.context import NodeContext
from cleanroom.transport import PeerCallError, PeerClient
from protocols.errors import RemoteProtocolError
from protocols.labeled_psi import AnonymousQuerier, Table
from protocols.labeled_psi.messages import MAX_BUCKETS_PER_REQUEST
from protocols.psi.messages import HEADER
from protocols.psi.multikey import encode_item

REMOTE_SUBDIR = "remote"
RESULTS_SUBDIR = "results"
DEFAULT_SESSION_SIZE = 1024
DEFAULT_BATCH_CHUNK = 8192
POOL_MIN_IDENTIFIERS = 20_000
DEFAULT_IN_FLIGHT = 2
MAX_TABLE_BYTES = 1 << 34


class AnonQueryError(CleanroomError):
    """A lookup failed: names the peer, the table and the reason."""


def _peer_client(ctx: NodeContext, peer: str, client: PeerClient | None,
                 **overrides: Any) -> tuple[PeerClient, bool]:
    if client is not None:
        return client, False
    return ctx.peer_client(peer, **overrides), True


def _headers(query_id: str | None) -> dict[str, str]:
    return {QUERY_HEADER: query_id} if query_id else {}


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


# --- public columns --------------------------------------------------------------------


def fetch_public(ctx: NodeContext, peer: str, dataset: str,
                 columns: Sequence[str] = ()) -> tuple[pa.Table, str]:
    """Public columns of ``peer``'s ``dataset`` and that dataset's version."""
    with ctx.peer_client(peer) as client:
        resp = client.request("GET", f"/v1/peer/public/{dataset}",
                              params={"columns": ",".join(columns)} if columns else None)
    try:
        table = ipc.open_stream(pa.BufferReader(resp.content)).read_all()
    except pa.ArrowInvalid as exc:
        raise AnonQueryError(f"peer {peer!r}: public dataset {dataset!r} is not a valid "
                             f"Arrow stream ({exc})") from None
    return table, resp.headers.get("X-Dataset-Version", "")


# --- real-time -------------------------------------------------------------------------


def lookup_realtime(
    ctx: NodeContext,
    peer: str,
    table: str,
    identifiers: Sequence[bytes],
    *,
    min_anonymity: int = 1000,
    session_size: int = DEFAULT_SESSION_SIZE,
    pad_to: int | None = None,
    query_id: str | None = None,
    client: PeerClient | None = None,
) -> dict[int, bytes]:
    """Labels of ``identifiers`` (position -> label, present ones only), real-time mode.

    One session per ``session_size`` identifiers; each refuses an owner whose buckets are
    smaller than ``min_anonymity`` entries.
    """
    if not 1 <= session_size <= MAX_BUCKETS_PER_REQUEST:
        raise InputError(f"session_size must be 1..{MAX_BUCKETS_PER_REQUEST}")
    pc, own = _peer_client(ctx, peer, client)
    base = f"/v1/peer/anonq/tables/{table}"
    out: dict[int, bytes] = {}
    try:
        for start, stop in _chunks(len(identifiers), session_size):
            q = AnonymousQuerier.realtime(identifiers[start:stop], min_anonymity=min_anonymity,
                                          pad_to=pad_to)
            reply = _post(pc, f"{base}/eval", q.start(), query_id)
            breq = q.handle(reply)
            if breq is None:
                raise AnonQueryError(f"peer {peer!r}: real-time session ended early")
            q.handle(_post(pc, f"{base}/buckets", breq, query_id))
            for pos, label in q.result.labels.items():
                out[start + pos] = label
    except RemoteProtocolError as exc:
        raise AnonQueryError(f"peer {peer!r}, table {table!r}: {exc}") from None
    finally:
        if own:
            pc.close()
    return out


def _post(client: PeerClient, path: str, body: bytes, query_id: str | None) -> bytes:
    return client.exchange(path, body, headers={"Content-Type": "application/octet-stream",
                                                **_headers(query_id)})


# --- batch -----------------------------------------------------------------------------


def _remote_path(ctx: NodeContext, peer: str, table: str) -> Path:
    return ctx.data_dir / tables.ANONQ_SUBDIR / REMOTE_SUBDIR / peer / f"{table}.table"


def _request_download(client: PeerClient, table: str, have: Table | None,
                      query_id: str | None) -> Table:
    q = AnonymousQuerier.download(have, max_entries=1 << 31)
    message = base64.urlsafe_b64encode(q.start()).rstrip(b"=").decode("ascii")
    params = {"message": message, **({"query": query_id} if query_id else {})}
    parts: list[bytes] = []
    with client.download(f"/v1/peer/anonq/tables/{table}/download", params=params,
                         chunk_size=1 << 20) as chunks:
        for chunk in chunks:
            parts.append(chunk)
    q.handle(b"".join(parts))
    return q.table


def sync_table(ctx: NodeContext, peer: str, table: str, *, query_id: str | None = None,
               client: PeerClient | None = None) -> Table:
    """The owner's current table: a delta onto the cached copy, else a full download.

    The copy is cached (written atomically) under ``DATA_DIR/anonq/remote/<peer>/``.
    """
    have = cached_table(ctx, peer, table)
    pc, own = _peer_client(ctx, peer, client, max_response_bytes=MAX_TABLE_BYTES,
                           timeout=600.0)
    try:
        try:
            fresh = _request_download(pc, table, have, query_id)
        except PeerCallError as exc:
            if have is None or exc.status != 409:
                raise
            fresh = _request_download(pc, table, None, query_id)  # version no longer kept
    except RemoteProtocolError as exc:
        raise AnonQueryError(f"peer {peer!r}, table {table!r}: {exc}") from None
    finally:
        if own:
            pc.close()
    if have is None or fresh.version != have.version or fresh.table_id != have.table_id:
        save_cached_table(ctx, peer, table, fresh)
    return fresh


def cached_table(ctx: NodeContext, peer: str, table: str) -> Table | None:
    """The copy of ``peer``'s table cached at this node, or ``None`` (none, or damaged)."""
    path = _remote_path(ctx, peer, table)
    if not path.is_file():
        return None
    try:
        return Table.from_bytes(path.read_bytes(), max_entries=1 << 31)
    except (OSError, RemoteProtocolError):
        return None  # a damaged cache: the caller downloads the whole table


def save_cached_table(ctx: NodeContext, peer: str, table: str, fresh: Table) -> None:
    """Cache ``fresh`` as this node's copy of ``peer``'s table (atomically)."""
    path = _remote_path(ctx, peer, table)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(fresh.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _run_job(job: Any) -> Any:
    return job.run()


def lookup_batch(
    ctx: NodeContext,
    peer: str,
    table: str,
    identifiers: Sequence[bytes],
    *,
    chunk: int = DEFAULT_BATCH_CHUNK,
    processes: int = 2,
    local: Table | None = None,
    query_id: str | None = None,
    client: PeerClient | None = None,
    executor: Executor | None = None,
    in_flight: int = DEFAULT_IN_FLIGHT,
) -> dict[int, bytes]:
    """Labels of ``identifiers`` in batch mode (position -> label, present ones only).

    ``local`` is a table already downloaded (default: :func:`sync_table`). Sessions of
    ``chunk`` identifiers; with more than ``POOL_MIN_IDENTIFIERS`` identifiers the
    blinding and unblinding jobs run in ``processes`` worker processes (or ``executor``)
    and up to ``in_flight`` evaluation requests are outstanding at once (each on its own
    keep-alive connection), so the owner evaluates one session while the next is sent.
    """
    pc, own = _peer_client(ctx, peer, client)
    pool: ProcessPoolExecutor | None = None
    try:
        tbl = local if local is not None else sync_table(ctx, peer, table, query_id=query_id)
        run: Callable[[Any], Any] = _run_job
        if executor is None and processes > 1 and len(identifiers) >= POOL_MIN_IDENTIFIERS:
            pool = ProcessPoolExecutor(processes,
                                       mp_context=multiprocessing.get_context("spawn"))
            executor = pool
        out: dict[int, bytes] = {}
        path = f"/v1/peer/anonq/tables/{table}/eval"
        if executor is None:
            for start, stop in _chunks(len(identifiers), chunk):
                q = AnonymousQuerier.batch(identifiers[start:stop], tbl)
                q.handle(_post(pc, path, q.start(), query_id))
                out.update({start + p: lab for p, lab in q.result.labels.items()})
            return out
        # Pipeline: blind the next chunks in the pool while the owner evaluates this one.
        sessions = [(start, AnonymousQuerier.batch(identifiers[start:stop], tbl))
                    for start, stop in _chunks(len(identifiers), chunk)]
        steps = [q.prepare_start() for _, q in sessions]
        blinded = [executor.submit(run, s.job) for s in steps]
        pool_exec = executor

        def send(start: int, q: AnonymousQuerier, step: Any,
                 fut: Any) -> tuple[int, AnonymousQuerier, Any, Any]:
            msg = q.complete(step, fut.result())
            assert msg is not None
            rstep = q.receive(_post(pc, path, msg, query_id))
            return start, q, rstep, pool_exec.submit(run, rstep.job)

        with ThreadPoolExecutor(max(1, in_flight), thread_name_prefix="anonq-eval") as senders:
            unblind = list(senders.map(send, [s for s, _ in sessions],
                                       [q for _, q in sessions], steps, blinded))
        for start, q, rstep, fut in unblind:
            try:
                q.complete(rstep, fut.result())
            except RemoteProtocolError as exc:
                q.fail(exc)
            out.update({start + p: lab for p, lab in q.result.labels.items()})
        return out
    except RemoteProtocolError as exc:
        raise AnonQueryError(f"peer {peer!r}, table {table!r}: {exc}") from None
    finally:
        if pool is not None:
            pool.shutdown()
        if own:
            pc.close()


def table_info(ctx: NodeContext, peer: str, table: str) -> dict[str, Any]:
    with ctx.peer_client(peer) as client:
        info: dict[str, Any] = client.get_json(f"/v1/peer/anonq/tables/{table}")
    return info


# --- owner: publish from the node's datasets -------------------------------------------


def publish_from_datasets(
    ctx: NodeContext,
    name: str,
    *,
    kind: str,
    query_type: str = "store_recommendation",
    stores_peer: str | None = None,
    stores_dataset: str = "stores",
    users_dataset: str = "users",
    locations_dataset: str = "locations",
    inventory_dataset: str = "inventory",
    min_bucket_size: int = 1000,
    evaluation_budget: int = tables.DEFAULT_EVALUATION_BUDGET,
    rebuild: bool = False,
    processes: int = tables.DEFAULT_PROCESSES,
    model: str | None = None,
) -> tables.PublishReport:
    """Build (or update) table ``name`` at this node from its own datasets.

    ``nearest_stores`` (media platform): ``users`` and ``locations`` here, the store list
    fetched from ``stores_peer`` over mutual TLS (public columns only). ``inventory``
    (dealer): the ``inventory`` dataset here. ``partial_scores`` (media platform or dealer,
    for ``lead_score`` standard mode): this node's partial scores under its slice of the
    completed ``train_lead_model`` query ``model``, from the datasets that query named
    (:func:`cleanroom.queries.lead_score.partial_score_records`; raises its
    ``ModelUnavailable`` naming ``model``).
    """
    from cleanroom.node.datasets import dataset_summary, load_dataset
    from parties.labels import INVENTORY_LABEL_SIZE, K_DEFAULT, nearest_label_size
    from parties.stores import StoreList

    if kind == "nearest_stores":
        if not stores_peer:
            raise InputError("a nearest_stores table needs stores_peer (the OEM's node name)")
        store_table, store_version = fetch_public(ctx, stores_peer, stores_dataset,
                                                  ("store_id", "city", "lat", "lon"))
        stores = StoreList.from_frame(store_table.to_pandas())
        users = load_dataset(ctx, users_dataset)
        locations = load_dataset(ctx, locations_dataset)
        records = tables.nearest_store_users(users, locations, stores)
        label_size = nearest_label_size(K_DEFAULT)
        sources = {
            users_dataset: str(dataset_summary(ctx, users_dataset).version),
            locations_dataset: str(dataset_summary(ctx, locations_dataset).version),
            f"{stores_peer}/{stores_dataset}": store_version,
            "store_list_tag": stores.tag.hex(),
        }
    elif kind == "inventory":
        records = tables.inventory_users(load_dataset(ctx, inventory_dataset))
        label_size = INVENTORY_LABEL_SIZE
        sources = {inventory_dataset: str(dataset_summary(ctx, inventory_dataset).version)}
    elif kind == tables.PARTIAL_SCORES:
        from cleanroom.queries.lead_score import (
            PARTIAL_LABEL_SIZE,
            ModelUnavailable,
            partial_score_records,
        )

        if not model:
            raise ModelUnavailable("a partial_scores table needs the id of a completed "
                                   "train_lead_model query", status=422)
        records, sources = partial_score_records(ctx, model)
        label_size = PARTIAL_LABEL_SIZE
    else:
        raise InputError(f"table kind {kind!r}: must be nearest_stores, inventory or "
                         "partial_scores")
    return tables.publish(ctx.data_dir, name, records, kind=kind, query_type=query_type,
                          label_size=label_size, min_bucket_size=min_bucket_size,
                          evaluation_budget=evaluation_budget, sources=sources,
                          rebuild=rebuild, processes=processes)


def publish_via_operator(client: PeerClient, name: str, **spec: Any) -> dict[str, Any]:
    """Ask a running node (through its operator API client) to publish table ``name``."""
    result: dict[str, Any] = client.post_json(f"/v1/anonq/tables/{name}/publish", spec)
    return result


# --- the OEM's store_recommendation ------------------------------------------------------


@dataclass(frozen=True)
class RecommendReport:
    """Counts, the result file and its digest; no identifier, label or location."""

    query_id: str | None
    leads: int
    identifiers_asked: int
    matched_leads: int
    conflicting_leads: int
    inventory_keys: int
    inventory_found: int
    mode: str
    path: str
    digest: str
    rows: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lead_items(leads: Any) -> tuple[list[bytes], list[tuple[str, str]]]:
    """Table items of every lead's normalised phone, email and device id, and their origin
    ``(lead_id, column)``."""
    from parties.oem import LABEL_PRIORITY

    items: list[bytes] = []
    origin: list[tuple[str, str]] = []
    lead_ids = [str(x) for x in leads["lead_id"].tolist()]
    for column in LABEL_PRIORITY:
        if column not in leads.columns:
            continue
        for lead, value in zip(lead_ids, leads[column].tolist(), strict=True):
            if value is None or value != value or not str(value):  # None / NA / NaN / ""
                continue
            items.append(encode_item(column, str(value)))  # type: ignore[arg-type]
            origin.append((lead, column))
    return items, origin


def store_recommendations(
    ctx: NodeContext,
    *,
    media_peer: str,
    dealer_peer: str,
    leads_dataset: str = "leads",
    stores_dataset: str = "stores",
    media_table: str = "nearest_stores",
    dealer_table: str = "inventory",
    mode: str = "batch",
    min_anonymity: int = 1000,
    output: str = "store_recommendation.parquet",
    query_id: str | None = None,
    city_centres: dict[str, tuple[float, float]] | None = None,
) -> RecommendReport:
    """The ``store_recommendation`` query at the OEM's node; writes the result table.

    Leads' identifiers open nearest-stores labels at ``media_peer`` (``mode`` batch or
    realtime); a lead's label is chosen phone > email > device id; the needed
    ``store|series`` keys open availability labels at ``dealer_peer`` (batch mode: the
    inventory table is small); :func:`parties.oem.recommend` scores; the table is
    written to ``DATA_DIR/results/<output>`` (Parquet or CSV by suffix).
    """
    from cleanroom.ledger import digest as ledger_digest
    from cleanroom.node.datasets import load_dataset
    from parties.oem import (
        decode_inventory_rows,
        inventory_keys_needed,
        recommend,
        resolve_lead_labels,
        write_recommendations,
    )
    from parties.stores import StoreList

    if mode not in ("batch", "realtime"):
        raise InputError(f"mode {mode!r}: must be batch or realtime")
    started = time.perf_counter()
    leads = load_dataset(ctx, leads_dataset)
    stores = StoreList.from_frame(load_dataset(ctx, stores_dataset))
    items, origin = lead_items(leads)
    if mode == "batch":
        found_pos = lookup_batch(ctx, media_peer, media_table, items, query_id=query_id)
    else:
        found_pos = lookup_realtime(ctx, media_peer, media_table, items,
                                    min_anonymity=min_anonymity, query_id=query_id)
    found: dict[str, dict[str, bytes]] = {}
    for pos, label in found_pos.items():
        lead, column = origin[pos]
        found.setdefault(lead, {})[column] = label
    lead_labels, conflicts = resolve_lead_labels(found)
    keys = inventory_keys_needed(leads, stores, lead_labels, city_centres=city_centres)
    inv_pos = lookup_batch(ctx, dealer_peer, dealer_table,
                           [tables.inventory_item(k) for k in keys], query_id=query_id) \
        if keys else {}
    availability = decode_inventory_rows({keys[p]: lab for p, lab in inv_pos.items()})
    result = recommend(leads, stores, lead_labels, availability, city_centres=city_centres)
    path = write_recommendations(result, ctx.data_dir / RESULTS_SUBDIR / output)
    return RecommendReport(
        query_id=query_id, leads=len(leads), identifiers_asked=len(items),
        matched_leads=len(lead_labels), conflicting_leads=conflicts,
        inventory_keys=len(keys), inventory_found=len(availability), mode=mode,
        path=str(path), digest=ledger_digest(path.read_bytes()), rows=len(result),
        seconds=round(time.perf_counter() - started, 3),
    )


def read_message_header(data: bytes) -> tuple[int, int]:
    """``(type, round)`` of a protocol message (for diagnostics and tests)."""
    if len(data) < HEADER.size:
        raise InputError("message shorter than the protocol header")
    fields = HEADER.unpack_from(data)
    return int(fields[2]), int(fields[3])

