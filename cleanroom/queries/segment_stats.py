"""The ``segment_stats`` query type: counts and sums over the population matched by PSI.

Requester side: load the requester's datasets (joined on their ``row_id`` column when
there are several), turn the values of its ``join_key`` columns into PSI items
(``kind tag || normalised identifier``, :mod:`protocols.psi.multikey`), run one bucketed
ECDH PSI session per counterparty in intersection mode (the requester learns which of
*its own* rows matched; the counterparty learns only the requester's item count per
bucket), keep the rows matched with every counterparty, and aggregate them: a count and
the sum of each requester ``aggregate`` column per combination of requester ``group_by``
columns. Fails with the rule's name if the matched rows are fewer than the effective
minimum intersection size; suppresses groups whose count is under the effective minimum
group size; adds Laplace or Gaussian noise when the spec asks for it.

With ``params.options.match_handle`` (the handle of an earlier ``match`` query of the
requester on the same dataset version and counterparties) no PSI session runs: the
handle's matched rows are the population.

Sessions are driven by :mod:`cleanroom.queries.psi_session` (streamed buckets, process
pool). Counterparty side: a :class:`~protocols.psi.PsiResponder` over the items of its
``join_key`` columns, restricted to the reveal modes its policy allows for the requester.
Counterparties contribute identifiers only; aggregating their columns needs another
protocol and is refused by :meth:`SegmentStatsRunner.validate`. No party's rows are
revealed to anyone (``params.reveal_counterparty_rows`` is still judged by the policies,
but nothing is revealed whatever it says).

Nothing leaves a node here except PSI protocol bytes (through the session channel). The
result never contains identifiers, only group labels (requester dimension values),
counts and sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cleanroom.errors import CleanroomError
from cleanroom.identity import ID_KINDS, infer_kind
from cleanroom.node.context import NodeContext
from cleanroom.node.datasets import dataset_summary, load_dataset
from cleanroom.policy import QuerySpec
from cleanroom.policy.spec import InputSpec
from cleanroom.queries.psi_session import PsiSessionResponder, new_requester, run_requester
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
from protocols.psi import Mode, PsiResponder
from protocols.psi.multikey import Kind, encode_item

PROTOCOL = "psi"
MISSING = "(missing)"
MAX_GROUPS = 10_000


def _rule(what: str) -> str:
    return f"spec.segment_stats.{what}"


class SegmentStatsRunner(Runner):
    query_type = "segment_stats"

    # --- both sides ----------------------------------------------------------------------------

    def validate(self, spec: QuerySpec, party: str) -> None:
        if spec.receiver != spec.requester:
            raise SpecRefused(
                _rule("receiver"),
                "receiver",
                "segment_stats is computed at the requester; the receiver must be the requester",
            )
        if spec.params.psi_reveal != "intersection":
            raise SpecRefused(
                _rule("psi_reveal"),
                "params.psi_reveal",
                "segment_stats needs PSI intersection mode (the requester groups its own "
                "matched rows)",
            )
        own = spec.inputs.get(spec.requester, [])
        if party != spec.requester:
            self._validate_counterparty(spec, party)
            return
        if not any("join_key" in i.columns.values() for i in own):
            raise SpecRefused(
                _rule("join_key"),
                f"inputs.{spec.requester}",
                "the requester must name at least one join_key column",
            )
        if len(own) > 1:
            for n, item in enumerate(own):
                if "row_id" not in item.columns.values():
                    raise SpecRefused(
                        _rule("row_id"),
                        f"inputs.{spec.requester}.{n}.columns",
                        "with several requester datasets each needs a row_id column to join on",
                    )
        noise = spec.params.noise
        clip = spec.params.options.get("clip", {})
        if noise is not None:
            if not isinstance(clip, dict):
                raise SpecRefused(_rule("clip"), "params.options.clip",
                                  "clip must map aggregate columns to [low, high]")
            for n, item in enumerate(own):
                for column, use in item.columns.items():
                    if use != "aggregate":
                        continue
                    bounds = clip.get(column)
                    if not _good_bounds(bounds):
                        raise SpecRefused(
                            _rule("clip"),
                            f"params.options.clip.{column}",
                            f"noisy sums need bounds [low, high] for aggregate column {column} "
                            f"(inputs.{spec.requester}.{n})",
                        )

    def _validate_counterparty(self, spec: QuerySpec, party: str) -> None:
        items = spec.inputs.get(party, [])
        if not any("join_key" in i.columns.values() for i in items):
            raise SpecRefused(
                _rule("join_key"),
                f"inputs.{party}",
                f"counterparty {party} must name at least one join_key column",
            )
        for n, item in enumerate(items):
            for column, use in item.columns.items():
                if use not in ("join_key", "row_id"):
                    raise SpecRefused(
                        _rule("counterparty_columns"),
                        f"inputs.{party}.{n}.columns.{column}",
                        "segment_stats groups and sums the requester's columns only; "
                        "a counterparty contributes join keys",
                    )

    # --- requester -----------------------------------------------------------------------------

    def run(self, run: RequesterRun) -> RunResult:
        spec = run.spec
        frame = _load_requester(run.ctx, spec)
        handle = spec.params.options.get("match_handle")
        if handle is not None:
            matched = _matched_by_handle(run, frame, str(handle))
            return self._finish(run, frame, matched)
        join_cols = _columns_with(spec.inputs[spec.requester], "join_key")
        kinds = _kinds(run.ctx, spec.inputs[spec.requester], "join_key")
        items, owners = _items_of(frame, join_cols, kinds)
        matched = np.ones(len(frame), dtype=bool)
        for peer in spec.counterparties:
            run.check_alive()
            rows = _psi_with(run, peer, items, owners)
            mask = np.zeros(len(frame), dtype=bool)
            if rows:
                mask[list(rows)] = True
            matched &= mask
        return self._finish(run, frame, matched)

    def _finish(self, run: RequesterRun, frame: pd.DataFrame, matched: np.ndarray) -> RunResult:
        spec = run.spec
        n_matched = int(matched.sum())
        if n_matched < run.min_intersection.value:
            raise QueryFailure(
                "min_intersection_size",
                f"the matched population is below the minimum intersection size "
                f"{run.min_intersection.value} set by {run.min_intersection.rule}",
                rule=run.min_intersection.rule,
                field="params.min_intersection_size",
                party=run.min_intersection.rule.split(":", 1)[0],
            )
        return _aggregate(spec, frame[matched], run.min_group.value, run.min_group.rule)

    # --- counterparty --------------------------------------------------------------------------

    def open_responder(
        self, run: CounterpartyRun, session_id: str, protocol: str, peer: str
    ) -> SessionResponder:
        if protocol != PROTOCOL:
            raise QueryFailure("bad_protocol", f"segment_stats runs {PROTOCOL}, not {protocol}")
        spec = run.spec
        mine = spec.inputs.get(run.me, [])
        items: list[bytes] = []
        for item in mine:
            cols = [c for c, u in item.columns.items() if u == "join_key"]
            if not cols:
                continue
            frame = _load(run.ctx, item.dataset, cols)
            kinds = _kinds(run.ctx, [item], "join_key")
            got, _ = _items_of(frame, cols, kinds)
            items.extend(got)
        rule = run.policy.partners.get(spec.requester)
        modes = frozenset(
            Mode.INTERSECTION if m == "intersection" else Mode.CARDINALITY
            for m in (rule.psi_reveal if rule else [])
        )
        role = PsiResponder(
            items,
            allowed_modes=modes,
            expected_session_id=protocol_session_id(run.query_id, session_id),
        )
        return PsiSessionResponder(role)


# --- helpers -------------------------------------------------------------------------------------


def _good_bounds(bounds: object) -> bool:
    if not isinstance(bounds, list | tuple) or len(bounds) != 2:
        return False
    lo, hi = bounds
    ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi))
    return ok and math.isfinite(float(lo)) and math.isfinite(float(hi)) and lo <= hi


def _columns_with(inputs: Sequence[InputSpec], use: str) -> list[str]:
    out: list[str] = []
    for item in inputs:
        out.extend(c for c, u in item.columns.items() if u == use and c not in out)
    return out


def _kinds(ctx: NodeContext, inputs: Sequence[InputSpec], use: str) -> dict[str, Kind]:
    kinds: dict[str, Kind] = {}
    for n, item in enumerate(inputs):
        info = dataset_summary(ctx, item.dataset)
        for column, u in item.columns.items():
            if u != use:
                continue
            kind = info.id_columns.get(column)
            if kind is None:
                try:
                    kind = infer_kind(column)
                except ValueError:
                    kind = None
            if kind not in ID_KINDS:
                raise QueryFailure(
                    "input_error",
                    f"column {column} of dataset {item.dataset} is not an identifier column "
                    "(add the dataset with --id-columns naming it)",
                    field=f"inputs.{ctx.config.name}.{n}.columns.{column}",
                )
            kinds[column] = kind
    return kinds


def _load(ctx: NodeContext, dataset: str, columns: list[str]) -> pd.DataFrame:
    try:
        return load_dataset(ctx, dataset, columns=columns)
    except CleanroomError as exc:
        raise QueryFailure("input_error", f"dataset {dataset}: {exc}") from None


def _load_requester(ctx: NodeContext, spec: QuerySpec) -> pd.DataFrame:
    inputs = spec.inputs[spec.requester]
    frames: list[pd.DataFrame] = []
    key: str | None = None
    for item in inputs:
        cols = list(item.columns)
        frames.append(_load(ctx, item.dataset, cols))
        if len(inputs) > 1:
            key = next(c for c, u in item.columns.items() if u == "row_id")
    frame = frames[0]
    if len(frames) > 1:
        assert key is not None
        for other in frames[1:]:
            other_key = next(c for c in other.columns if c == key) if key in other else None
            if other_key is None:
                raise QueryFailure("input_error", f"row_id column {key} is not in every dataset")
            other = other.drop_duplicates(subset=[key])
            frame = frame.merge(other, on=key, how="left", suffixes=("", "_dup"))
    return frame.reset_index(drop=True)


def _items_of(
    frame: pd.DataFrame, columns: list[str], kinds: dict[str, Kind]
) -> tuple[list[bytes], list[int]]:
    items: list[bytes] = []
    owners: list[int] = []
    for column in columns:
        values = frame[column]
        present = values.notna().to_numpy(dtype=bool)
        for row in np.flatnonzero(present):
            items.append(encode_item(kinds[column], str(values.iat[int(row)])))
            owners.append(int(row))
    return items, owners


def _psi_with(run: RequesterRun, peer: str, items: list[bytes], owners: list[int]) -> set[int]:
    with run.session(peer, PROTOCOL) as channel:
        role = new_requester(items, mode=Mode.INTERSECTION,
                             session_id=channel.protocol_session_id)
        result = run_requester(channel, role, check_alive=run.check_alive)
    assert result.matched_indices is not None
    return {owners[i] for i in result.matched_indices}


def _matched_by_handle(run: RequesterRun, frame: pd.DataFrame, handle: str) -> np.ndarray:
    """Rows matched by an earlier ``match`` query of this node (no PSI session runs)."""
    from cleanroom.queries.match import load_handle

    spec = run.spec
    field = "params.options.match_handle"
    try:
        manifest, rows = load_handle(run.ctx, handle)
    except CleanroomError as exc:
        raise QueryFailure("bad_match_handle", str(exc), field=field) from None
    first = spec.inputs[spec.requester][0].dataset
    info = dataset_summary(run.ctx, first)
    if manifest.get("requester") != spec.requester or manifest.get("dataset") != first:
        raise QueryFailure("bad_match_handle",
                           f"match handle {handle} was made on dataset "
                           f"{manifest.get('dataset')}, this query's first dataset is {first}",
                           field=field)
    if manifest.get("dataset_version") != info.version:
        raise QueryFailure("stale_match_handle",
                           f"dataset {first} changed since match handle {handle} was made "
                           f"(version {manifest.get('dataset_version')} -> {info.version})",
                           field=field)
    if sorted(manifest.get("counterparties", [])) != sorted(spec.counterparties):
        raise QueryFailure("bad_match_handle",
                           f"match handle {handle} matched with "
                           f"{manifest.get('counterparties')}, this query names "
                           f"{list(spec.counterparties)}", field=field)
    matched = np.zeros(len(frame), dtype=bool)
    idx = rows["_row"].to_numpy(dtype="int64")
    if len(idx) and (idx.min() < 0 or idx.max() >= len(frame)):
        raise QueryFailure("stale_match_handle", f"match handle {handle} names rows outside "
                           f"dataset {first}", field=field)
    matched[idx] = True
    return matched


def _aggregate(spec: QuerySpec, rows: pd.DataFrame, min_group: int, group_rule: str) -> RunResult:
    inputs = spec.inputs[spec.requester]
    dims = _columns_with(inputs, "group_by")
    measures = _columns_with(inputs, "aggregate")
    clip: dict[str, Any] = spec.params.options.get("clip", {}) or {}
    data = rows.copy()
    for m in measures:
        values = pd.to_numeric(data[m], errors="coerce")
        if values.notna().sum() < data[m].notna().sum():
            raise QueryFailure(
                "input_error",
                f"aggregate column {m} holds non-numeric values",
                field=f"inputs.{spec.requester}.columns.{m}",
            )
        if m in clip and _good_bounds(clip[m]):
            lo, hi = clip[m]
            values = values.clip(lower=float(lo), upper=float(hi))
        data[m] = values.astype("float64")
    for d in dims:
        data[d] = data[d].astype("string").fillna(MISSING)
    if dims:
        grouped = data.groupby(dims, dropna=False, sort=True)
        counts = grouped.size()
        sums = grouped[measures].sum() if measures else None
        keys = list(counts.index)
    else:
        counts = pd.Series([len(data)])
        sums = data[measures].sum().to_frame().T if measures else None
        keys = [()]
    if len(keys) > MAX_GROUPS:
        raise QueryFailure("too_many_groups",
                           f"more than {MAX_GROUPS} groups; use fewer dimensions")
    noise = spec.params.noise
    rng = np.random.default_rng()
    n_measures = 1 + len(measures)
    groups: list[dict[str, Any]] = []
    suppressed = 0
    for i, key in enumerate(keys):
        count = int(counts.iloc[i])
        if count < min_group:
            suppressed += 1
            continue
        key_tuple = key if isinstance(key, tuple) else (key,)
        entry: dict[str, Any] = {"key": {d: str(v) for d, v in zip(dims, key_tuple, strict=False)}}
        shown_count: float = float(count)
        if noise is not None:
            shown_count += _noise(rng, noise.mechanism, noise.epsilon / n_measures,
                                  noise.delta / n_measures, 1.0)
        entry["count"] = max(0, round(shown_count))
        if measures:
            assert sums is not None
            entry["sums"] = {}
            for m in measures:
                total = float(sums[m].iloc[i])
                if noise is not None:
                    lo, hi = clip[m]
                    sens = max(abs(float(lo)), abs(float(hi)))
                    total += _noise(rng, noise.mechanism, noise.epsilon / n_measures,
                                    noise.delta / n_measures, sens)
                entry["sums"][m] = round(total, 6)
        groups.append(entry)
    payload: dict[str, Any] = {
        "type": "segment_stats",
        "dimensions": dims,
        "measures": ["count", *(f"sum:{m}" for m in measures)],
        "groups": groups,
        "suppressed_groups": suppressed,
        "min_group_size": min_group,
        "min_group_rule": group_rule,
        "noise": None if noise is None else noise.model_dump(mode="json"),
    }
    if noise is None:
        payload["matched_rows"] = len(data)
    return RunResult(payload, rows=len(groups), epsilon=noise.epsilon if noise else 0.0)


def _noise(
    rng: np.random.Generator, mechanism: str, epsilon: float, delta: float, sensitivity: float
) -> float:
    if mechanism == "laplace":
        return float(rng.laplace(0.0, sensitivity / epsilon))
    sigma = math.sqrt(2.0 * math.log(1.25 / delta)) * sensitivity / epsilon
    return float(rng.normal(0.0, sigma))


register(SegmentStatsRunner())
