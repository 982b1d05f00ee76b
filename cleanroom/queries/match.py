"""The ``match`` query type: identity matching by PSI, two or three parties, multi-key.

Requester side (:meth:`MatchRunner.run`): the requester's one input dataset, its
``join_key`` columns (phone, email, device id; the kind comes from the dataset's
identifier columns) become PSI items ``kind tag || normalised value``
(:mod:`protocols.psi.multikey`). Every row contributes exactly one item per join column
(a missing or repeated identifier becomes a random dummy), so the counterparty learns the
row count, not which rows have which identifiers.

- ``params.psi_reveal = "intersection"``: one session per counterparty in intersection
  mode with labels: the counterparty labels each of its items with a fresh per-session
  pseudonym of the record it came from; the requester gets edges (own row, counterparty
  pseudonym, kind) and resolves them one-to-one with the priority phone > email >
  device_id (:func:`protocols.psi.multikey.resolve`). With two counterparties (OEM ∩
  media ∩ dealer) it is the star composition of :mod:`protocols.psi.threeparty`: a row is
  matched when it is matched with every counterparty. The requester keeps its own matched
  rows plus the key that matched in a *match handle* (files under
  ``<data_dir>/matches/``: ``<handle>.parquet`` and a ``<handle>.json`` manifest) that
  later queries name in ``params.options.match_handle``; the result holds the handle,
  counts (per key before and after resolution) and, up to ``params.options.inline_rows``
  rows (default 1000), the matched rows themselves.
- ``params.psi_reveal = "cardinality"``: one cardinality-mode session per identifier kind
  (two-party only); the result holds per-key counts of distinct matched identifiers and
  nothing else (no handle, no rows). Its items are read from the dataset's Arrow table
  straight into :class:`~protocols.psi.items.PackedItems` (no pandas frame, no Python
  object per identifier; the PSI role removes repeats per bucket), and the node returns
  freed heap pages to the OS once they are built and after each session, so a 10^7-row
  column stays a few hundred MiB per node.

The effective minimum intersection size is enforced on the matched row count
(cardinality mode: on the largest per-key count, a lower bound on matched records).

Counterparty side (:meth:`MatchRunner.open_responder`): a
:class:`~cleanroom.queries.psi_session.PsiSessionResponder` over its own items, restricted
to the reveal modes its policy allows the requester. It learns the requester's item count
per bucket and nothing about which of its rows matched: the result never leaves the
requester. The outcome sent to counterparties says ``rows = 1`` (one result document),
not the match count.

Nothing leaves a node here except PSI protocol bytes. Result payloads hold the
requester's *own* rows only and stay at the requester (the receiver must be the
requester). Nothing here logs.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cleanroom.errors import CleanroomError
from cleanroom.node.context import NodeContext
from cleanroom.node.datasets import dataset_summary, load_dataset_table, release_memory
from cleanroom.policy import QuerySpec
from cleanroom.queries.psi_session import PsiSessionResponder, new_requester, run_requester
from cleanroom.queries.runners import (
    CounterpartyRun,
    QueryFailure,
    RequesterRun,
    Runner,
    RunResult,
    SessionChannel,
    SessionResponder,
    SpecRefused,
    protocol_session_id,
    register,
)
from cleanroom.queries.segment_stats import _kinds, _load
from protocols.psi import Mode, PsiResponder
from protocols.psi.items import PackedItems, as_packed
from protocols.psi.multikey import (
    DUMMY_TAG,
    KIND_TAG,
    LABEL_BYTES,
    PRIORITY,
    Kind,
    Resolution,
    edges_from_result,
    encode_item,
    per_key_counts,
    resolve,
)

PROTOCOL = "psi"  # intersection mode, all kinds, labels
CARD_PROTOCOL = "psi.card."  # + kind: cardinality mode, one kind
MATCH_DIR = "matches"
HANDLE = re.compile(r"match-[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
INLINE_ROWS = 1000
ROW_COLUMN = "_row"


def _rule(what: str) -> str:
    return f"spec.match.{what}"


def _dummy() -> bytes:
    return DUMMY_TAG + secrets.token_bytes(32)


# --- items ---------------------------------------------------------------------------------------


def requester_items(
    frame: pd.DataFrame, columns: Sequence[str], kinds: dict[str, Kind]
) -> tuple[list[bytes], list[tuple[int, Kind] | None]]:
    """One item per (row, join column); missing or repeated-in-row values become dummies.

    A value repeated across rows stays (each row carrying it gets the edge; one-to-one
    resolution then keeps the first row)."""
    items: list[bytes] = []
    origins: list[tuple[int, Kind] | None] = []
    cols = [frame[c].to_numpy(dtype=object) for c in columns]
    for row in range(len(frame)):
        seen: set[bytes] = set()
        for c, values in zip(columns, cols, strict=True):
            value = values[row]
            item = None
            if value is not None and value is not pd.NA and not _isnan(value):
                item = encode_item(kinds[c], str(value))
            if item is None or item in seen:
                items.append(_dummy())
                origins.append(None)
            else:
                seen.add(item)
                items.append(item)
                origins.append((row, kinds[c]))
    return items, origins


def responder_items(
    frame: pd.DataFrame, columns: Sequence[str], kinds: dict[str, Kind]
) -> tuple[list[bytes], list[bytes]]:
    """Items and record pseudonyms (fresh per session). An identifier held by several
    records belongs to the first; others get dummies, so every record has one item per
    join column."""
    n = len(frame)
    pseudonyms: list[bytes] = []
    used: set[bytes] = set()
    while len(pseudonyms) < n:
        tag = secrets.token_bytes(LABEL_BYTES)
        if tag not in used:
            used.add(tag)
            pseudonyms.append(tag)
    items: list[bytes] = []
    labels: list[bytes] = []
    seen: set[bytes] = set()
    cols = [frame[c].to_numpy(dtype=object) for c in columns]
    for row in range(n):
        for c, values in zip(columns, cols, strict=True):
            value = values[row]
            item = None
            if value is not None and value is not pd.NA and not _isnan(value):
                item = encode_item(kinds[c], str(value))
            if item is None or item in seen:
                items.append(_dummy())
            else:
                seen.add(item)
                items.append(item)
            labels.append(pseudonyms[row])
    return items, labels


def kind_items(data: pd.DataFrame | pa.Table, columns: Sequence[str],
               kinds: dict[str, Kind], kind: Kind) -> PackedItems:
    """Items of one kind (cardinality mode): every non-missing value of the ``kind``
    columns, tagged, in column then row order.

    Packed (:class:`~protocols.psi.items.PackedItems`): the values stay in Arrow's
    layout (one buffer and offsets) and the kind tag is the packing's prefix, so no Python
    object exists per identifier (at 10^7 identifiers: ~20 bytes each, not ~110). Repeats
    are kept: the PSI role removes them per bucket (equal items share a bucket), so the
    session sees each distinct item once. Same items as
    :func:`~protocols.psi.multikey.encode_item` per value.
    """
    return _packed(_kind_arrays(data, columns, kinds, kind), KIND_TAG[kind])


def _kind_arrays(data: pd.DataFrame | pa.Table, columns: Sequence[str],
                 kinds: dict[str, Kind], kind: Kind) -> list[pa.Array]:
    """The non-missing values of the ``kind`` columns as Arrow string arrays."""
    parts: list[pa.Array] = []
    for c in columns:
        if kinds[c] != kind:
            continue
        column = data.column(c) if isinstance(data, pa.Table) else pa.chunked_array(
            [pa.array(data[c].to_numpy(dtype=object), from_pandas=True)])
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = column.cast(pa.string())
        if column.null_count:  # drop_null copies even when there is nothing to drop
            column = pc.drop_null(column)
        parts.extend(a for a in column.chunks if len(a))
    return parts


def _packed(parts: list[pa.Array], prefix: bytes) -> PackedItems:
    """Arrow string arrays as one :class:`PackedItems`: one array is wrapped without a
    copy; several (a table's row groups) are copied into one buffer one at a time, each
    dropped from ``parts`` once copied, so the peak is the values once plus one array."""
    if len(parts) == 1:
        return PackedItems(*_buffers(parts.pop()), prefix)
    n = sum(len(a) for a in parts)
    size = sum(_span(a) for a in parts)
    offsets = np.empty(n + 1, dtype=np.int32 if size < 2**31 else np.int64)
    data = np.empty(size, dtype=np.uint8)
    offsets[0] = 0
    row = at = 0
    pool = pa.default_memory_pool()
    while parts:
        values, offs = _buffers(parts.pop(0))
        lo, hi = int(offs[0]), int(offs[-1])
        data[at : at + hi - lo] = values[lo:hi]
        offsets[row + 1 : row + len(offs)] = offs[1:] - (lo - at)
        row += len(offs) - 1
        at += hi - lo
        del values, offs
        pool.release_unused()  # Arrow's pool keeps freed pages until asked
    return PackedItems(data, offsets, prefix)


def _span(arr: pa.Array) -> int:
    _, offs = _buffers(arr)
    return int(offs[-1]) - int(offs[0])


def _buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(value bytes, ``len + 1`` offsets) of an Arrow string array, as numpy views."""
    _, offsets_buf, data_buf = arr.buffers()
    wide = pa.types.is_large_string(arr.type)
    if offsets_buf is None:  # an empty array may have no buffers
        return np.empty(0, dtype=np.uint8), np.zeros(len(arr) + 1, dtype=np.int64)
    offsets = np.frombuffer(offsets_buf, dtype=np.int64 if wide else np.int32)
    offsets = offsets[arr.offset : arr.offset + len(arr) + 1]
    data = (np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None
            else np.empty(0, dtype=np.uint8))
    return data, offsets


class CompactOrigins(Sequence[tuple[int, Kind] | None]):
    """:func:`requester_items`' origins in two arrays (9 bytes per item instead of a
    tuple each): ``origins[i]`` is ``(row, kind)``, or ``None`` for a dummy."""

    def __init__(self, origins: Sequence[tuple[int, Kind] | None]) -> None:
        code = {k: i for i, k in enumerate(PRIORITY)}
        n = len(origins)
        self._rows = np.fromiter((o[0] if o is not None else -1 for o in origins),
                                 dtype=np.int64, count=n)
        self._kinds = np.fromiter((code[o[1]] if o is not None else -1 for o in origins),
                                  dtype=np.int8, count=n)

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> tuple[int, Kind] | None: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[int, Kind] | None]: ...

    def __getitem__(self, index: int | slice
                    ) -> tuple[int, Kind] | list[tuple[int, Kind] | None] | None:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        row = int(self._rows[index])
        return None if row < 0 else (row, PRIORITY[int(self._kinds[index])])


def _isnan(value: object) -> bool:
    return isinstance(value, float) and value != value


# --- match handles -------------------------------------------------------------------------------


def handle_paths(ctx: NodeContext, handle: str) -> tuple[Path, Path]:
    if not HANDLE.fullmatch(handle):
        raise CleanroomError(f"not a match handle: {handle!r}")
    base = ctx.data_dir / MATCH_DIR
    return base / f"{handle}.parquet", base / f"{handle}.json"


def load_handle(ctx: NodeContext, handle: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """The manifest and matched rows of a handle stored at this node."""
    rows_path, manifest_path = handle_paths(ctx, handle)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        rows = pd.read_parquet(rows_path)
    except (OSError, ValueError) as exc:
        raise CleanroomError(f"match handle {handle} is not available at this node: {exc}"
                             ) from None
    return manifest, rows


def _write_handle(ctx: NodeContext, handle: str, manifest: dict[str, Any],
                  rows: pd.DataFrame) -> Path:
    rows_path, manifest_path = handle_paths(ctx, handle)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_rows = rows_path.with_suffix(".parquet.tmp")
    tmp_manifest = manifest_path.with_suffix(".json.tmp")
    rows.to_parquet(tmp_rows, index=False)
    tmp_manifest.write_text(json.dumps(manifest, sort_keys=True, indent=1), encoding="utf-8")
    os.replace(tmp_rows, rows_path)
    os.replace(tmp_manifest, manifest_path)  # the manifest last: it marks the handle complete
    return rows_path


# --- the runner ----------------------------------------------------------------------------------


def require_min_intersection(run: RequesterRun, n: int, what: str = "the match") -> None:
    """Fail the query when ``n`` matched records are below the effective minimum."""
    if n < run.min_intersection.value:
        raise QueryFailure(
            "min_intersection_size",
            f"{what} is below the minimum intersection size "
            f"{run.min_intersection.value} set by {run.min_intersection.rule}",
            rule=run.min_intersection.rule, field="params.min_intersection_size",
            party=run.min_intersection.rule.split(":", 1)[0])


def align_with(run: RequesterRun, host: str, channel: SessionChannel, items: list[bytes],
               origins: Any) -> Resolution:
    """Multi-key intersection PSI with ``host`` on an open session, resolved one to one
    (phone > email > device_id), checked against the minimum intersection size."""
    run.check_alive()
    role = new_requester(items, mode=Mode.INTERSECTION, want_labels=True,
                         session_id=channel.protocol_session_id)
    res = run_requester(channel, role, check_alive=run.check_alive)
    resolution = resolve(edges_from_result(origins, res))
    what = f"the number of leads matched with {host}"
    require_min_intersection(run, len(resolution.pairs), what)
    return resolution


class MatchRunner(Runner):
    query_type = "match"

    def validate(self, spec: QuerySpec, party: str) -> None:
        if spec.receiver != spec.requester:
            raise SpecRefused(_rule("receiver"), "receiver",
                              "match results (the requester's own rows or counts) go to the "
                              "requester only; the receiver must be the requester")
        if spec.params.psi_reveal not in ("intersection", "cardinality"):
            raise SpecRefused(_rule("psi_reveal"), "params.psi_reveal",
                              "match needs psi_reveal intersection or cardinality")
        if spec.params.psi_reveal == "cardinality" and len(spec.counterparties) > 1:
            raise SpecRefused(_rule("three_party_cardinality"), "params.psi_reveal",
                              "three-party matching runs the star composition, which needs "
                              "intersection mode; ask each counterparty for counts separately")
        inline = spec.params.options.get("inline_rows", INLINE_ROWS)
        if not isinstance(inline, int) or isinstance(inline, bool) or not 0 <= inline <= 100_000:
            raise SpecRefused(_rule("inline_rows"), "params.options.inline_rows",
                              "inline_rows must be an integer 0..100000")
        items = spec.inputs.get(party, [])
        if len(items) != 1:
            raise SpecRefused(_rule("inputs"), f"inputs.{party}",
                              f"match takes exactly one dataset of {party}")
        if "join_key" not in items[0].columns.values():
            raise SpecRefused(_rule("join_key"), f"inputs.{party}.0.columns",
                              f"{party} must name at least one join_key column")
        if party != spec.requester:
            for column, use in items[0].columns.items():
                if use not in ("join_key", "row_id"):
                    raise SpecRefused(_rule("counterparty_columns"),
                                      f"inputs.{party}.0.columns.{column}",
                                      "a counterparty contributes join keys only")

    # --- requester -----------------------------------------------------------------------------

    def run(self, run: RequesterRun) -> RunResult:
        spec = run.spec
        item = spec.inputs[spec.requester][0]
        join_cols = [c for c, u in item.columns.items() if u == "join_key"]
        kinds = _kinds(run.ctx, [item], "join_key")
        if spec.params.psi_reveal == "cardinality":
            return self._cardinality(run, item.dataset, join_cols, kinds)
        frame = _load(run.ctx, item.dataset, list(item.columns))
        listed, where = requester_items(frame, join_cols, kinds)
        items = as_packed(listed)  # one buffer instead of a bytes object per item
        origins = CompactOrigins(where)
        del listed, where
        release_memory()
        matched = np.ones(len(frame), dtype=bool)
        per_cp: dict[str, dict[str, Any]] = {}
        resolutions: dict[str, Resolution] = {}
        for peer in spec.counterparties:
            run.check_alive()
            with run.session(peer, PROTOCOL) as channel:
                role = new_requester(items, mode=Mode.INTERSECTION, want_labels=True,
                                     session_id=channel.protocol_session_id)
                res = run_requester(channel, role, check_alive=run.check_alive)
            edges = edges_from_result(origins, res)
            resolution = resolve(edges)
            resolutions[peer] = resolution
            mask = np.zeros(len(frame), dtype=bool)
            mask[resolution.matched_rows] = True
            matched &= mask
            per_cp[peer] = {
                "matched_rows": len(resolution.pairs),
                "per_key_before_resolution": per_key_counts(edges),
                "per_key": resolution.per_key_counts,
                "counterparty_items": res.responder_size,
            }
        n = int(matched.sum())
        self._check_min(run, n)
        rows = frame[matched].copy()
        idx = np.flatnonzero(matched)
        rows.insert(0, ROW_COLUMN, idx.astype("int64"))
        for peer, resolution in resolutions.items():
            rows[f"match_key:{peer}"] = [resolution.pairs[int(i)][1] for i in idx]
        if len(spec.counterparties) == 1:
            rows["match_key"] = rows[f"match_key:{spec.counterparties[0]}"]
        else:  # star: the key that matched with the first counterparty, by priority
            rank = {k: i for i, k in enumerate(PRIORITY)}
            rows["match_key"] = [
                min((resolutions[p].pairs[int(i)][1] for p in spec.counterparties),
                    key=lambda k: rank[k]) for i in idx]
        info = dataset_summary(run.ctx, item.dataset)
        handle = f"match-{run.query_id}"
        manifest = {
            "handle": handle, "query_id": run.query_id, "requester": spec.requester,
            "counterparties": list(spec.counterparties), "dataset": item.dataset,
            "dataset_version": info.version, "dataset_digest": info.file_digest,
            "rows": n, "columns": list(rows.columns),
        }
        path = _write_handle(run.ctx, handle, manifest, rows)
        inline = int(spec.params.options.get("inline_rows", INLINE_ROWS))
        payload: dict[str, Any] = {
            "type": "match", "mode": "intersection",
            "composition": "star" if len(spec.counterparties) > 1 else "two_party",
            "key_priority": list(PRIORITY), "matched_rows": n,
            "per_counterparty": per_cp, "requester_rows": len(frame),
            "handle": handle, "rows_file": str(path),
            "rows": _jsonable(rows) if n <= inline else None,
            "rows_inline_limit": inline,
        }
        return RunResult(payload, rows=1)

    def _cardinality(self, run: RequesterRun, dataset: str, join_cols: list[str],
                     kinds: dict[str, Kind]) -> RunResult:
        peer = run.spec.counterparties[0]
        counts: dict[str, int] = {}
        their: dict[str, int] = {}
        for kind in PRIORITY:
            if kind not in kinds.values():
                continue
            run.check_alive()
            items = _load_kind_items(run.ctx, dataset, join_cols, kinds, kind)
            with run.session(peer, CARD_PROTOCOL + kind) as channel:
                role = new_requester(items, mode=Mode.CARDINALITY,
                                     session_id=channel.protocol_session_id)
                del items  # the role holds them until its last bucket is requested
                res = run_requester(channel, role, check_alive=run.check_alive)
                del role
            counts[kind] = res.cardinality
            their[kind] = res.responder_size
            release_memory()  # the session's buffers, before the next kind's items
        self._check_min(run, max(counts.values(), default=0))
        payload = {"type": "match", "mode": "cardinality", "counterparty": peer,
                   "per_key": counts, "counterparty_items": their,
                   "note": "counts of distinct matched identifiers per key; no rows, no handle"}
        return RunResult(payload, rows=1)

    @staticmethod
    def _check_min(run: RequesterRun, n: int) -> None:
        require_min_intersection(run, n)

    # --- counterparty --------------------------------------------------------------------------

    def open_responder(
        self, run: CounterpartyRun, session_id: str, protocol: str, peer: str
    ) -> SessionResponder:
        spec = run.spec
        reveal = spec.params.psi_reveal
        if reveal == "intersection" and protocol != PROTOCOL:
            raise QueryFailure("bad_protocol", f"match in intersection mode runs {PROTOCOL}")
        kind: str | None = None
        if reveal == "cardinality":
            kind = protocol.removeprefix(CARD_PROTOCOL)
            if not protocol.startswith(CARD_PROTOCOL) or kind not in PRIORITY:
                raise QueryFailure("bad_protocol",
                                   f"match in cardinality mode runs {CARD_PROTOCOL}<kind>")
        item = spec.inputs[run.me][0]
        cols = [c for c, u in item.columns.items() if u == "join_key"]
        kinds = _kinds(run.ctx, [item], "join_key")
        rule = run.policy.partners.get(spec.requester)
        allowed = set(rule.psi_reveal if rule else [])
        modes = frozenset(Mode.INTERSECTION if m == "intersection" else Mode.CARDINALITY
                          for m in allowed if m == reveal)
        sid = protocol_session_id(run.query_id, session_id)
        if kind is None:
            items, labels = responder_items(_load(run.ctx, item.dataset, cols), cols, kinds)
            role = PsiResponder(items, labels=labels, allowed_modes=modes,
                                expected_session_id=sid)
            del items, labels
        else:
            role = PsiResponder(
                _load_kind_items(run.ctx, item.dataset, cols, kinds, kind),  # type: ignore[arg-type]
                allowed_modes=modes, expected_session_id=sid)
        release_memory()  # the frame read for the items is gone
        return PsiSessionResponder(role)


def _load_kind_items(ctx: NodeContext, dataset: str, columns: Sequence[str],
                     kinds: dict[str, Kind], kind: Kind) -> PackedItems:
    """:func:`kind_items` read straight from the dataset's Arrow table (no pandas frame),
    only the columns of ``kind``."""
    wanted = [c for c in columns if kinds[c] == kind]
    try:
        table = load_dataset_table(ctx, dataset, columns=wanted)
    except CleanroomError as exc:
        raise QueryFailure("input_error", f"dataset {dataset}: {exc}") from None
    parts = _kind_arrays(table, wanted, kinds, kind)
    del table  # row groups are freed one by one as _packed copies them
    items = _packed(parts, KIND_TAG[kind])
    release_memory()  # the reader's buffers
    return items


def _jsonable(rows: pd.DataFrame) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(rows.to_json(orient="records", date_format="iso"))
    return out


register(MatchRunner())
