"""The ``store_recommendation`` query type: one recommended store per OEM lead.

Parties and inputs (the spec names every column and its use; each party's policy judges
them before anything runs):

- requester (the OEM, also the receiver): its leads (a ``row_id`` column = the lead id,
  ``join_key`` columns = the identifiers, ``city`` and ``intended_series`` as
  ``group_by``) and its store list (``store_id``, ``city``, ``lat``, ``lon`` as
  ``public``);
- the *nearest-stores owner* (the media platform: the counterparty whose inputs have
  ``location`` columns): its ``users`` identifier columns as ``join_key`` and its
  ``locations`` (``home_lat``, ``home_lon``, ``work_lat``, ``work_lon``) as ``location``.
  They are used through the labeled table it published from exactly these datasets
  (:mod:`cleanroom.anonq.tables`, kind ``nearest_stores``);
- the *inventory owner* (the dealer: the counterparty with an ``inventory`` column): its
  ``inventory`` (``store_id``, ``series``, ``units`` as ``inventory``), used through its
  published ``inventory`` table.

Requester side (:meth:`StoreRecommendationRunner.run`), every byte through the lifecycle's
session channel (:mod:`cleanroom.anonq.lifecycle`; one lifecycle session per labeled-PSI
session): with the media platform, batch mode (default) = a download session (a delta
onto the copy cached under ``DATA_DIR/anonq/remote/`` when it is current enough) then
one EVAL session per 8,192 identifiers, lookups local; or real-time mode
(``params.options.mode = "realtime"``) = EVAL + BUCKETS sessions, each refusing buckets
smaller than ``params.options.min_anonymity`` (default 1,000). Each lead's label is
chosen phone > email > device id; the ``store|series`` keys its candidates need are
opened the same way (batch) at the dealer; :func:`parties.oem.recommend` scores
(docs/store-recommendation.md); unmatched leads fall back to their city's stores.
Fails naming the rule when fewer leads matched than the effective minimum intersection
size.

The result, at the OEM only: the recommendation table written atomically to
``DATA_DIR/results/<query id>.parquet`` (or ``.csv``, ``params.options.format``) and a
payload with a reference to that file (name, SHA-256, size), summary counts and, up to
``params.options.inline_rows`` rows (default 10,000), the table itself (column list plus
rows), so ``cleanroom query result ID --out FILE`` returns it; larger tables stay in the
file only.

Counterparty side (:meth:`StoreRecommendationRunner.open_responder`): an
:class:`~cleanroom.anonq.lifecycle.OwnerSessionResponder` over the table it published,
after checking that the table is of the right kind and query type, was built from the
current versions of exactly the datasets the spec names (so the approved columns are
the ones used), and allowing only the modes the spec asks for. The owner learns the
number of evaluations (and, real-time, bucket ids); its ledger gets digests and sizes.

No identifier, location, label or stock count leaves a node in the clear; nothing here
logs. Runners must not open sockets: every exchange is ``channel.exchange``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cleanroom.anonq import lifecycle, tables
from cleanroom.errors import CleanroomError, InputError
from cleanroom.node.context import NodeContext
from cleanroom.node.datasets import dataset_summary
from cleanroom.policy import QuerySpec
from cleanroom.policy.spec import InputSpec
from cleanroom.queries import anonq_sessions
from cleanroom.queries.runners import (
    CounterpartyRun,
    QueryFailure,
    RequesterRun,
    Runner,
    RunResult,
    SessionResponder,
    SpecRefused,
    protocol_session_id,
    register,
)
from cleanroom.queries.segment_stats import _kinds, _load
from protocols.labeled_psi import Mode
from protocols.psi.multikey import encode_item

PROTOCOL = anonq_sessions.PROTOCOL
NEAREST = "nearest_stores"
INVENTORY = "inventory"
DEFAULT_TABLES = {NEAREST: "nearest_stores", INVENTORY: "inventory"}
RESULTS_SUBDIR = "results"
DEFAULT_INLINE_ROWS = 10_000
MAX_INLINE_ROWS = 100_000
LEAD_COLUMNS = ("city", "intended_series")
STORE_COLUMNS = ("store_id", "city", "lat", "lon")
LOCATION_COLUMNS = ("home_lat", "home_lon", "work_lat", "work_lon")
INVENTORY_COLUMNS = ("store_id", "series", "units")
OPTIONS = ("mode", "min_anonymity", "format", "inline_rows", "tables")


def _rule(what: str) -> str:
    return f"spec.store_recommendation.{what}"


def _uses(spec: QuerySpec, party: str) -> set[str]:
    return {u for item in spec.inputs.get(party, []) for u in item.columns.values()}


def owner_role(spec: QuerySpec, party: str) -> str | None:
    """``nearest_stores`` for the party with location columns, ``inventory`` for the one
    with an inventory column, else ``None``."""
    uses = _uses(spec, party)
    if "location" in uses:
        return NEAREST
    if "inventory" in uses:
        return INVENTORY
    return None


def _owners(spec: QuerySpec) -> dict[str, str]:
    """role -> counterparty (validated specs have exactly one of each)."""
    out: dict[str, str] = {}
    for peer in spec.counterparties:
        role = owner_role(spec, peer)
        if role is not None:
            out[role] = peer
    return out


def table_name(spec: QuerySpec, party: str, role: str) -> str:
    names = spec.params.options.get("tables") or {}
    return str(names.get(party, DEFAULT_TABLES[role]))


def _option(spec: QuerySpec, name: str, default: Any) -> Any:
    return spec.params.options.get(name, default)


class StoreRecommendationRunner(Runner):
    query_type = "store_recommendation"

    # --- both sides ----------------------------------------------------------------------------

    def validate(self, spec: QuerySpec, party: str) -> None:
        if spec.receiver != spec.requester:
            raise SpecRefused(_rule("receiver"), "receiver",
                              "store_recommendation is computed at the requester; the "
                              "receiver must be the requester")
        if spec.params.psi_reveal != "intersection":
            raise SpecRefused(_rule("psi_reveal"), "params.psi_reveal",
                              "store_recommendation opens one label per matched lead: it "
                              "needs intersection mode")
        if spec.params.noise is not None:
            raise SpecRefused(_rule("noise"), "params.noise",
                              "store_recommendation returns per-lead stores; it adds no noise")
        self._validate_options(spec)
        roles: dict[str, list[str]] = {NEAREST: [], INVENTORY: []}
        for n, peer in enumerate(spec.counterparties):
            uses = _uses(spec, peer)
            if {"location", "inventory"} <= uses:
                raise SpecRefused(_rule("owners"), f"inputs.{peer}",
                                  f"{peer} names both location and inventory columns; one "
                                  "counterparty holds locations, the other inventory")
            role = owner_role(spec, peer)
            if role is None:
                raise SpecRefused(_rule("owners"), f"counterparties.{n}",
                                  f"{peer} names neither location nor inventory columns")
            roles[role].append(peer)
        for role, what in ((NEAREST, "location"), (INVENTORY, "inventory")):
            if len(roles[role]) != 1:
                raise SpecRefused(_rule("owners"), "counterparties",
                                  f"exactly one counterparty must contribute {what} columns "
                                  f"({len(roles[role])} do)")
        if party == spec.requester:
            self._validate_requester(spec)
        elif owner_role(spec, party) == NEAREST:
            self._validate_nearest(spec, party)
        else:
            self._validate_inventory(spec, party)

    def _validate_options(self, spec: QuerySpec) -> None:
        opts = spec.params.options
        for key in opts:
            if key not in OPTIONS:
                raise SpecRefused(_rule("options"), f"params.options.{key}",
                                  f"unknown option {key!r}; known: {', '.join(OPTIONS)}")
        if _option(spec, "mode", "batch") not in ("batch", "realtime"):
            raise SpecRefused(_rule("mode"), "params.options.mode",
                              "mode must be batch or realtime")
        if _option(spec, "format", "parquet") not in ("parquet", "csv"):
            raise SpecRefused(_rule("format"), "params.options.format",
                              "format must be parquet or csv")
        for name, default, top in (("min_anonymity", 1000, 1 << 20),
                                   ("inline_rows", DEFAULT_INLINE_ROWS, MAX_INLINE_ROWS)):
            value = _option(spec, name, default)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
                raise SpecRefused(_rule(name), f"params.options.{name}",
                                  f"{name} must be a whole number 0..{top}")
        anonq_sessions.check_table_names(_option(spec, "tables", {}), spec.counterparties,
                                         _rule("tables"))

    def _validate_requester(self, spec: QuerySpec) -> None:
        me = spec.requester
        leads = [(n, i) for n, i in enumerate(spec.inputs.get(me, []))
                 if "join_key" in i.columns.values()]
        stores = [(n, i) for n, i in enumerate(spec.inputs.get(me, []))
                  if "public" in i.columns.values()]
        if len(leads) != 1:
            raise SpecRefused(_rule("leads"), f"inputs.{me}",
                              "the requester names exactly one leads dataset with join_key "
                              f"columns ({len(leads)} given)")
        if len(stores) != 1:
            raise SpecRefused(_rule("stores"), f"inputs.{me}",
                              "the requester names exactly one store list with public "
                              f"columns ({len(stores)} given)")
        if len(spec.inputs[me]) != 2 or leads[0][0] == stores[0][0]:
            raise SpecRefused(_rule("inputs"), f"inputs.{me}",
                              "the requester's inputs are its leads and its store list")
        n, item = leads[0]
        where = f"inputs.{me}.{n}.columns"
        if sum(1 for u in item.columns.values() if u == "row_id") != 1:
            raise SpecRefused(_rule("lead_id"), where,
                              "the leads need exactly one row_id column (the lead id)")
        for column in LEAD_COLUMNS:
            if item.columns.get(column) != "group_by":
                raise SpecRefused(_rule("lead_columns"), f"{where}.{column}",
                                  f"the leads need column {column} as group_by")
        for column, use in item.columns.items():
            if use not in ("join_key", "row_id", "group_by"):
                raise SpecRefused(_rule("lead_columns"), f"{where}.{column}",
                                  f"leads columns are join_key, row_id or group_by, not {use}")
        n, item = stores[0]
        where = f"inputs.{me}.{n}.columns"
        for column in STORE_COLUMNS:
            if item.columns.get(column) != "public":
                raise SpecRefused(_rule("store_columns"), f"{where}.{column}",
                                  f"the store list needs column {column} as public")

    def _validate_nearest(self, spec: QuerySpec, party: str) -> None:
        items = spec.inputs.get(party, [])
        ids = [n for n, i in enumerate(items) if "join_key" in i.columns.values()]
        locs = [n for n, i in enumerate(items) if "location" in i.columns.values()]
        if len(ids) != 1 or len(locs) != 1 or len(items) != 2 or ids == locs:
            raise SpecRefused(_rule("nearest_inputs"), f"inputs.{party}",
                              f"{party} names one dataset of identifiers (join_key) and one "
                              "of locations (location)")
        for n, item in enumerate(items):
            allowed = ("join_key", "row_id") if n in ids else ("location", "row_id")
            for column, use in item.columns.items():
                if use not in allowed:
                    raise SpecRefused(_rule("nearest_inputs"),
                                      f"inputs.{party}.{n}.columns.{column}",
                                      f"{column} cannot be used as {use} here")
        loc = items[locs[0]]
        for column in LOCATION_COLUMNS:
            if loc.columns.get(column) != "location":
                raise SpecRefused(_rule("location_columns"),
                                  f"inputs.{party}.{locs[0]}.columns.{column}",
                                  f"the nearest stores are computed from {column}: name it "
                                  "as location")

    def _validate_inventory(self, spec: QuerySpec, party: str) -> None:
        items = spec.inputs.get(party, [])
        if len(items) != 1:
            raise SpecRefused(_rule("inventory_inputs"), f"inputs.{party}",
                              f"{party} names exactly one inventory dataset")
        cols = items[0].columns
        where = f"inputs.{party}.0.columns"
        for column in INVENTORY_COLUMNS:
            if column not in cols:
                raise SpecRefused(_rule("inventory_columns"), f"{where}.{column}",
                                  f"the inventory table is keyed by store_id and series and "
                                  f"labelled from units: name {column}")
        if cols["units"] != "inventory":
            raise SpecRefused(_rule("inventory_columns"), f"{where}.units",
                              "units must be used as inventory (availability only)")
        for column, use in cols.items():
            if column not in INVENTORY_COLUMNS or use not in ("row_id", "group_by", "inventory"):
                raise SpecRefused(_rule("inventory_columns"), f"{where}.{column}",
                                  f"{column} cannot be used as {use} here")

    # --- requester -----------------------------------------------------------------------------

    def run(self, run: RequesterRun) -> RunResult:
        from parties.labels import LabelError
        from parties.oem import (
            RESULT_COLUMNS,
            decode_inventory_rows,
            inventory_keys_needed,
            recommend,
            resolve_lead_labels,
            write_recommendations,
        )

        spec, ctx = run.spec, run.ctx
        owners = _owners(spec)
        media, dealer = owners[NEAREST], owners[INVENTORY]
        leads_in, stores_in, leads_at = _requester_inputs(spec)
        leads = _load_leads(ctx, leads_in, f"inputs.{spec.requester}.{leads_at}")
        stores = _load_stores(ctx, stores_in)
        join_cols = [c for c, u in leads_in.columns.items() if u == "join_key"]
        kinds = _kinds(ctx, [leads_in], "join_key")
        items, origin = _lead_items(leads, join_cols, kinds)
        mode = _option(spec, "mode", "batch")
        media_table = table_name(spec, media, NEAREST)
        info: dict[str, Any] = {"mode": mode}
        with anonq_sessions.session_errors(media, media_table):
            if mode == "batch":
                table = anonq_sessions.sync_table(run, media, media_table)
                found_pos = lifecycle.lookup_batch_sessions(
                    anonq_sessions.opener(run, media), items, table, check_alive=run.check_alive) \
                    if items else {}
                info[media] = {"table": media_table, "version": table.version,
                               "entries": table.entry_count}
            else:
                found_pos, smallest = lifecycle.lookup_realtime_sessions(
                    anonq_sessions.opener(run, media), items,
                    min_anonymity=int(_option(spec, "min_anonymity", 1000)),
                    check_alive=run.check_alive) if items else ({}, 0)
                info[media] = {"table": media_table, "smallest_bucket": smallest}
        found: dict[str, dict[str, bytes]] = {}
        for pos, label in found_pos.items():
            lead, kind = origin[pos]
            found.setdefault(lead, {}).setdefault(kind, label)
        try:
            lead_labels, conflicts = resolve_lead_labels(found)
        except InputError as exc:
            raise QueryFailure("input_error", str(exc)) from None
        if len(lead_labels) < run.min_intersection.value:
            raise QueryFailure(
                "min_intersection_size",
                f"{len(lead_labels)} leads matched, below the minimum intersection size "
                f"{run.min_intersection.value} set by {run.min_intersection.rule}",
                rule=run.min_intersection.rule, field="params.min_intersection_size",
                party=run.min_intersection.rule.split(":", 1)[0])
        try:
            keys = inventory_keys_needed(leads, stores, lead_labels)
        except LabelError as exc:
            raise QueryFailure(
                "stale_table",
                f"a label of {media}'s table {media_table} does not fit this store list "
                f"({exc}); {media} must publish the table again from the current store list",
                field=f"inputs.{spec.requester}.{_index_of(spec, stores_in)}.dataset",
                peer=media) from None
        dealer_table = table_name(spec, dealer, INVENTORY)
        with anonq_sessions.session_errors(dealer, dealer_table):
            inv_table = anonq_sessions.sync_table(run, dealer, dealer_table)
            inv_pos = lifecycle.lookup_batch_sessions(
                anonq_sessions.opener(run, dealer), [tables.inventory_item(k) for k in keys],
                inv_table,
                check_alive=run.check_alive) if keys else {}
        info[dealer] = {"table": dealer_table, "version": inv_table.version,
                        "entries": inv_table.entry_count}
        try:
            availability = decode_inventory_rows({keys[p]: lab for p, lab in inv_pos.items()})
            result = recommend(leads, stores, lead_labels, availability)
        except (LabelError, InputError) as exc:
            raise QueryFailure("input_error", str(exc)) from None
        run.check_alive()
        fmt = _option(spec, "format", "parquet")
        name = f"{RESULTS_SUBDIR}/{run.query_id}.{fmt}"
        path = write_recommendations(result, ctx.data_dir / name)
        payload = _payload(result, list(RESULT_COLUMNS), path, name, fmt,
                           int(_option(spec, "inline_rows", DEFAULT_INLINE_ROWS)))
        payload["summary"] = {
            "leads": len(result), "identifiers_asked": len(items),
            "matched_leads": len(lead_labels), "conflicting_leads": conflicts,
            "inventory_keys": len(keys), "inventory_found": len(availability),
            "by_reason": {str(k): int(v) for k, v in
                          result["reason"].value_counts(sort=False).sort_index().items()},
            "by_inventory": {str(k): int(v) for k, v in
                             result["inventory"].value_counts(sort=False).sort_index().items()},
            "sessions": info,
        }
        return RunResult(payload, rows=len(result))

    # --- counterparty --------------------------------------------------------------------------

    def open_responder(
        self, run: CounterpartyRun, session_id: str, protocol: str, peer: str
    ) -> SessionResponder:
        from cleanroom.anonq.api import lifecycle_source

        if protocol != PROTOCOL:
            raise QueryFailure("bad_protocol",
                               f"store_recommendation runs {PROTOCOL}, not {protocol}")
        spec, me = run.spec, run.me
        role = owner_role(spec, me)
        if role is None:
            raise QueryFailure("bad_session", f"{me} holds no table in this query")
        name = table_name(spec, me, role)
        field = f"params.options.tables.{me}"
        try:
            source, budget = lifecycle_source(run.ctx, name, peer)
        except CleanroomError as exc:
            raise QueryFailure("no_table", f"table {name!r} at {me}: {exc}",
                               field=field) from None
        meta = source.meta
        if meta.kind != role or meta.query_type != self.query_type:
            raise QueryFailure("wrong_table",
                               f"table {name!r} at {me} is a {meta.kind} table for "
                               f"{meta.query_type}, not a {role} table for {self.query_type}",
                               field=field)
        _check_sources(run.ctx, spec, me, role, name, meta.sources)
        if role == NEAREST and _option(spec, "mode", "batch") == "realtime":
            modes = frozenset({Mode.REALTIME})
        else:
            modes = frozenset({Mode.BATCH, Mode.DOWNLOAD})
        return lifecycle.open_owner_session(
            source, peer=peer, session_id=protocol_session_id(run.query_id, session_id),
            modes=modes, budget=budget)


# --- helpers -------------------------------------------------------------------------------------


def _index_of(spec: QuerySpec, item: InputSpec) -> int:
    return spec.inputs[spec.requester].index(item)


def _requester_inputs(spec: QuerySpec) -> tuple[InputSpec, InputSpec, int]:
    mine = spec.inputs[spec.requester]
    n = next(i for i, item in enumerate(mine) if "join_key" in item.columns.values())
    stores = next(item for item in mine if "public" in item.columns.values())
    return mine[n], stores, n


def _load_leads(ctx: NodeContext, item: InputSpec, where: str) -> pd.DataFrame:
    frame = _load(ctx, item.dataset, list(item.columns))
    row_id = next(c for c, u in item.columns.items() if u == "row_id")
    if row_id != "lead_id":
        if "lead_id" in frame.columns:
            frame = frame.drop(columns=["lead_id"])
        frame = frame.rename(columns={row_id: "lead_id"})
    for column in ("lead_id", *LEAD_COLUMNS):
        values = frame[column]
        empty = values.isna() | (values.astype("string").str.strip() == "")
        if bool(empty.any()):
            row = int(empty.to_numpy(dtype=bool).argmax()) + 1
            name = row_id if column == "lead_id" else column
            raise QueryFailure("input_error",
                               f"dataset {item.dataset}, column {name}, row {row}: empty value",
                               field=f"{where}.columns.{name}")
    dup = frame["lead_id"].astype("string").duplicated()
    if bool(dup.any()):
        row = int(dup.to_numpy(dtype=bool).argmax()) + 1
        raise QueryFailure("input_error",
                           f"dataset {item.dataset}, column {row_id}, row {row}: repeated "
                           "lead id", field=f"{where}.columns.{row_id}")
    frame["lead_id"] = frame["lead_id"].astype(str)
    return frame.reset_index(drop=True)


def _load_stores(ctx: NodeContext, item: InputSpec) -> Any:
    from parties.stores import StoreList

    frame = _load(ctx, item.dataset, list(STORE_COLUMNS))
    try:
        return StoreList.from_frame(frame)
    except InputError as exc:
        raise QueryFailure("input_error", f"store list {item.dataset}: {exc}") from None


def _lead_items(frame: pd.DataFrame, columns: Sequence[str], kinds: dict[str, Any]
                ) -> tuple[list[bytes], list[tuple[str, str]]]:
    """Table items of the leads' identifiers and their origin ``(lead_id, kind)``."""
    items: list[bytes] = []
    origin: list[tuple[str, str]] = []
    lead_ids = frame["lead_id"].tolist()
    for column in columns:
        kind = kinds[column]
        for lead, value in zip(lead_ids, frame[column].tolist(), strict=True):
            if value is None or value is pd.NA or value != value or not str(value):
                continue
            items.append(encode_item(kind, str(value)))
            origin.append((lead, str(kind)))
    return items, origin


def _check_sources(ctx: NodeContext, spec: QuerySpec, me: str, role: str, name: str,
                   sources: dict[str, str]) -> None:
    """The table must come from the current versions of the datasets the spec names, and
    (nearest stores) every identifier column it is keyed by must be an approved join key."""
    from parties.media import ID_COLUMNS

    for n, item in enumerate(spec.inputs.get(me, [])):
        field = f"inputs.{me}.{n}.dataset"
        built = sources.get(item.dataset)
        if built is None:
            raise QueryFailure("wrong_table", f"table {name!r} at {me} was not built from "
                               f"dataset {item.dataset}", field=field)
        try:
            current = str(dataset_summary(ctx, item.dataset).version)
        except CleanroomError as exc:
            raise QueryFailure("input_error", str(exc), field=field) from None
        if built != current:
            raise QueryFailure("stale_table",
                               f"table {name!r} at {me} was built from version {built} of "
                               f"{item.dataset}; version {current} is current: publish the "
                               "table again", field=field)
        if role == NEAREST and "join_key" in item.columns.values():
            info = dataset_summary(ctx, item.dataset)
            present = {c["name"] for c in info.columns}
            for column in ID_COLUMNS:
                if column in present and item.columns.get(column) != "join_key":
                    raise QueryFailure(
                        "unapproved_column",
                        f"table {name!r} at {me} is keyed by {item.dataset}.{column} too; "
                        "the spec must name it as join_key",
                        field=f"inputs.{me}.{n}.columns.{column}")


def _json_value(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if hasattr(value, "item"):  # numpy scalars
        return _json_value(value.item())
    return value


def _payload(table: pd.DataFrame, columns: list[str], path: Path, name: str, fmt: str,
             inline_rows: int) -> dict[str, Any]:
    from cleanroom.ledger import digest

    data = path.read_bytes()
    inline = len(table) <= inline_rows
    rows: list[list[Any]] | None = None
    if inline:
        rows = [[_json_value(v) for v in t]
                for t in table[columns].itertuples(index=False, name=None)]
    return {
        "type": "store_recommendation",
        "file": {"name": name, "format": fmt, "digest": digest(data), "size": len(data),
                 "rows": len(table)},
        "columns": columns,
        "rows_inline": inline,
        "rows": rows,
    }


register(StoreRecommendationRunner())
