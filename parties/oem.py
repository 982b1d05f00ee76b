"""OEM, at its own node: assemble each lead's candidates and write the recommendation table.

Input, all already at the OEM's node:

- its leads (``oem/leads``: ``lead_id``, ``city``, ``intended_series``) and its store list
  (:class:`parties.stores.StoreList`);
- for matched leads, the one nearest-stores label opened through the labeled-PSI
  query with the media platform (:func:`resolve_lead_labels` picks one when several
  identifiers of a lead opened labels);
- availability levels for (store, series) keys opened through the dealer's inventory
  table (:func:`decode_inventory_rows`); :func:`inventory_keys_needed` lists the keys
  to ask for.

It decodes and checks the labels (:mod:`parties.labels`), builds per-lead candidate lists
(:class:`LeadCandidates`; unmatched leads get the stores of their city, nearest the city
centre first), applies the scoring rule of :mod:`parties.recommend` and returns the
result table (:data:`RESULT_COLUMNS`), which :func:`write_recommendations` writes as
Parquet or CSV, atomically. The table is the query result at the OEM's node: it holds
store ids and distances, never another party's identifiers or coordinates.
This module logs nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cleanroom.errors import InputError
from parties.geo import great_circle_km, unit_xyz
from parties.labels import (
    HEADER_SIZE,
    INVENTORY_LEVELS,
    K_DEFAULT,
    KEY_SEPARATOR,
    LabelError,
    NearestLists,
    decode_inventory_label,
    decode_nearest_labels,
    inventory_key,
    nearest_label_size,
)
from parties.recommend import (
    DEFAULT_RULE,
    LEVEL_UNKNOWN,
    REASON_NONE,
    Choice,
    ScoringRule,
    choose,
    choose_fallback,
    reason_names,
)
from parties.stores import StoreList

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

LABEL_PRIORITY = ("phone", "email", "device_id")
LIST_SEPARATOR = ","
RESULT_COLUMNS = (
    "lead_id", "matched", "recommended_store", "reason", "recommended_km", "inventory",
    "home_top5", "home_km", "work_top5", "work_km", "fallback_top5", "fallback_km",
)


def resolve_lead_labels(
    found: Mapping[str, Mapping[str, bytes]],
) -> tuple[dict[str, bytes], int]:
    """One label per lead from the labels its identifiers opened.

    ``found[lead_id]`` maps an identifier column (``phone``, ``email``, ``device_id``) to
    the label it opened. The label of the first column in :data:`LABEL_PRIORITY` wins
    (a phone is the strongest identifier). Returns the labels and how many leads opened
    two different labels (their identifiers belong to different media users).
    """
    out: dict[str, bytes] = {}
    conflicts = 0
    for lead, by_col in found.items():
        unknown = set(by_col) - set(LABEL_PRIORITY)
        if unknown:
            raise InputError(f"unknown identifier column {sorted(unknown)[0]!r}; expected one "
                             f"of {', '.join(LABEL_PRIORITY)}")
        labels = [by_col[c] for c in LABEL_PRIORITY if c in by_col]
        if not labels:
            continue
        out[lead] = labels[0]
        if any(lab != labels[0] for lab in labels[1:]):
            conflicts += 1
    return out, conflicts


def decode_inventory_rows(rows: Mapping[str, bytes] | Iterable[tuple[str, bytes]]
                          ) -> dict[str, int]:
    """Availability level per ``"store_id|series"`` key from opened inventory labels."""
    items = rows.items() if isinstance(rows, Mapping) else rows
    return {key: decode_inventory_label(label) for key, label in items}


def _city_centres_from_stores(stores: StoreList) -> dict[str, tuple[float, float]]:
    """The spherical mean of each city's stores, as a stand-in for the city centre."""
    xyz = unit_xyz(stores.lat, stores.lon)
    out: dict[str, tuple[float, float]] = {}
    for city in dict.fromkeys(stores.cities):
        m = xyz[stores.city_stores(city)].mean(axis=0)
        norm = float(np.linalg.norm(m))
        if norm == 0.0:
            continue
        x, y, z = (m / norm).tolist()
        out[city] = (float(np.degrees(np.arcsin(z))), float(np.degrees(np.arctan2(y, x))))
    return out


def fallback_lists(
    cities: Iterable[str], stores: StoreList, *, k: int = K_DEFAULT,
    city_centres: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, tuple[IntArray, FloatArray]]:
    """Per city: up to ``k`` stores of that city, nearest the city centre first.

    The centre is ``city_centres[city]`` if given, else the mean position of the city's
    stores. A city without stores but with a known centre gets the ``k`` stores nearest
    that centre; a city with neither is left out. Lists shorter than ``k`` are padded with
    position -1 / km nan.
    """
    centres = dict(_city_centres_from_stores(stores))
    if city_centres is not None:
        centres.update(city_centres)
    out: dict[str, tuple[IntArray, FloatArray]] = {}
    for city in dict.fromkeys(cities):
        if city not in centres:
            continue
        clat, clon = centres[city]
        own = stores.city_stores(city)
        if own.size:
            km = great_circle_km(clat, clon, stores.lat[own], stores.lon[own])
            order = np.lexsort((own, km))[:k]
            pos, dist = own[order], km[order]
        else:
            kk = min(k, stores.size)
            found, dist2 = stores.index.query([clat], [clon], k=kk)
            pos, dist = found[0], dist2[0]
        idx = np.full(k, -1, dtype=np.int64)
        kmv = np.full(k, np.nan)
        idx[:pos.size], kmv[:pos.size] = pos, dist
        out[city] = (idx, kmv)
    return out


@dataclass(frozen=True)
class LeadCandidates:
    """Everything the rule needs for ``n`` leads (row ``i`` is lead ``lead_ids[i]``)."""

    lead_ids: tuple[str, ...]
    series: tuple[str, ...]
    matched: npt.NDArray[np.bool_]
    lists: NearestLists
    home_level: IntArray
    work_level: IntArray
    fallback_idx: IntArray
    fallback_km: FloatArray
    fallback_level: IntArray


def _check_leads(leads: pd.DataFrame) -> pd.DataFrame:
    for col in ("lead_id", "city", "intended_series"):
        if col not in leads.columns:
            raise InputError("missing column (table oem/leads)", column=col)
    frame = leads.reset_index(drop=True)
    for col in ("lead_id", "city", "intended_series"):
        empty = (frame[col].isna() | (frame[col].astype("string").str.strip() == "")
                 ).to_numpy(dtype=bool)
        if empty.any():
            raise InputError("empty value in a required column", column=col,
                             row=int(np.flatnonzero(empty)[0]) + 1)
    dup = frame["lead_id"].duplicated().to_numpy(dtype=bool)
    if dup.any():
        raise InputError("repeated key value", column="lead_id",
                         row=int(np.flatnonzero(dup)[0]) + 1)
    return frame


def _level_grid(series: list[str], stores: StoreList, availability: Mapping[str, int]
                ) -> tuple[IntArray, IntArray]:
    """``grid[store position, series code]`` of levels (-1 unknown) and each lead's code."""
    names = list(dict.fromkeys(series))
    code = {name: i for i, name in enumerate(names)}
    grid = np.full((stores.size, max(len(names), 1)), LEVEL_UNKNOWN, dtype=np.int64)
    for key, level in availability.items():
        store_id, sep, name = key.rpartition(KEY_SEPARATOR)
        pos = stores.position.get(store_id)
        if sep and pos is not None and name in code:
            grid[pos, code[name]] = int(level)
    return grid, np.array([code[s] for s in series], dtype=np.int64)


def _levels(idx: IntArray, grid: IntArray, lead_code: IntArray) -> IntArray:
    safe = np.maximum(idx, 0)
    levels = grid[safe, lead_code[:, None]] if idx.size else np.zeros(idx.shape, np.int64)
    return np.where(idx >= 0, levels, LEVEL_UNKNOWN).astype(np.int64)


def decode_lead_labels(
    lead_ids: Iterable[str], lead_labels: Mapping[str, bytes], stores: StoreList,
    *, k: int = K_DEFAULT,
) -> tuple[npt.NDArray[np.bool_], NearestLists]:
    """Decode the labels of ``lead_ids`` (absent lists for leads without a label).

    Raises :class:`parties.labels.LabelError` naming the field and the 1-based position
    (in ``lead_ids``) of the first bad label.
    """
    ids = list(lead_ids)
    n = len(ids)
    matched = np.array([lead in lead_labels for lead in ids], dtype=bool)
    rows = np.flatnonzero(matched)
    size = nearest_label_size(k)
    block = np.empty((n, size), dtype=np.uint8)
    # absent lists for unmatched rows: a valid label with both lists absent
    block[:, 0], block[:, 1] = 1, k
    block[:, 2:HEADER_SIZE] = np.frombuffer(stores.tag, dtype=np.uint8)
    block[:, HEADER_SIZE:] = 0xFF
    for r in rows:
        lab = lead_labels[ids[r]]
        if not isinstance(lab, bytes | bytearray) or len(lab) != size:
            raise LabelError(f"expected {size} bytes", field="length", row=int(r) + 1)
        block[r] = np.frombuffer(bytes(lab), dtype=np.uint8)
    lists = decode_nearest_labels(block, store_tag=stores.tag, n_stores=stores.size, k=k)
    return matched, lists


def build_candidates(
    leads: pd.DataFrame,
    stores: StoreList,
    lead_labels: Mapping[str, bytes],
    availability: Mapping[str, int],
    *,
    k: int = K_DEFAULT,
    city_centres: Mapping[str, tuple[float, float]] | None = None,
) -> LeadCandidates:
    """Decode labels, attach availability of each lead's series, add city fallback lists."""
    frame = _check_leads(leads)
    ids = [str(x) for x in frame["lead_id"].tolist()]
    series = [str(x) for x in frame["intended_series"].tolist()]
    cities = [str(x) for x in frame["city"].tolist()]
    for key, level in availability.items():
        if not (isinstance(level, int | np.integer) and 0 <= int(level) < len(INVENTORY_LEVELS)):
            raise InputError(f"availability level must be 0..{len(INVENTORY_LEVELS) - 1} "
                             f"(key {key!r})")
    matched, lists = decode_lead_labels(ids, lead_labels, stores, k=k)
    fb = fallback_lists(cities, stores, k=k, city_centres=city_centres)
    n = len(ids)
    f_idx = np.full((n, k), -1, dtype=np.int64)
    f_km = np.full((n, k), np.nan)
    for i, city in enumerate(cities):
        if city in fb:
            f_idx[i], f_km[i] = fb[city]
    grid, code = _level_grid(series, stores, availability)
    return LeadCandidates(
        lead_ids=tuple(ids), series=tuple(series), matched=matched, lists=lists,
        home_level=_levels(lists.home_idx, grid, code),
        work_level=_levels(lists.work_idx, grid, code),
        fallback_idx=f_idx, fallback_km=f_km,
        fallback_level=_levels(f_idx, grid, code),
    )


def inventory_keys_needed(
    leads: pd.DataFrame, stores: StoreList, lead_labels: Mapping[str, bytes], *,
    k: int = K_DEFAULT, city_centres: Mapping[str, tuple[float, float]] | None = None,
) -> list[str]:
    """The ``"store_id|series"`` keys the OEM must open to score its leads (sorted)."""
    c = build_candidates(leads, stores, lead_labels, {}, k=k, city_centres=city_centres)
    keys: set[str] = set()
    for arr in (c.lists.home_idx, c.lists.work_idx, c.fallback_idx):
        for (i, _), pos in np.ndenumerate(arr):
            if pos >= 0:
                keys.add(inventory_key(stores.store_ids[pos], c.series[i]))
    return sorted(keys)


def apply_rule(c: LeadCandidates, rule: ScoringRule = DEFAULT_RULE) -> Choice:
    """The rule on matched leads' lists; the city fallback where a lead has no list."""
    main = choose(c.lists.home_idx, c.lists.home_km, c.home_level,
                  c.lists.work_idx, c.lists.work_km, c.work_level, rule)
    fb = choose_fallback(c.fallback_idx, c.fallback_km, c.fallback_level, rule)
    use_fb = main.reason == REASON_NONE
    return Choice(
        store=np.where(use_fb, fb.store, main.store),
        reason=np.where(use_fb, fb.reason, main.reason).astype(np.int8),
        km=np.where(use_fb, fb.km, main.km),
        level=np.where(use_fb, fb.level, main.level),
    )


def _joined(stores: StoreList, idx: IntArray, km: FloatArray) -> tuple[list[str], list[str]]:
    """Comma-joined store ids and km (2 decimals) per row; absent entries (-1) left out."""
    n = idx.shape[0]
    names = np.asarray(stores.store_ids, dtype=object)
    ids_out = np.full(n, "", dtype=object)
    km_out = np.full(n, "", dtype=object)
    for j in range(idx.shape[1]):
        present = idx[:, j] >= 0
        sep = np.where(present & (j > 0), LIST_SEPARATOR, "")
        ids_out = ids_out + sep + np.where(present, names[np.maximum(idx[:, j], 0)], "")
        text = np.char.mod("%.2f", np.where(present, km[:, j], 0.0)).astype(object)
        km_out = km_out + sep + np.where(present, text, "")
    return [str(x) for x in ids_out], [str(x) for x in km_out]


def recommendation_table(c: LeadCandidates, choice: Choice, stores: StoreList) -> pd.DataFrame:
    """The result table, one row per lead, columns :data:`RESULT_COLUMNS`.

    Lists are comma-separated store ids, nearest first, with their km (2 decimals) in the
    matching ``*_km`` column; empty where not known. ``inventory`` is the availability of
    the lead's series at the recommended store (``unknown`` if the dealer had no row).
    """
    home_ids, home_km = _joined(stores, c.lists.home_idx, c.lists.home_km)
    work_ids, work_km = _joined(stores, c.lists.work_idx, c.lists.work_km)
    unmatched_fb = np.where(c.matched[:, None], -1, c.fallback_idx)
    fb_ids, fb_km = _joined(stores, unmatched_fb, c.fallback_km)
    level_names = [INVENTORY_LEVELS[v] if v >= 0 else "unknown" for v in choice.level.tolist()]
    rec = [stores.store_ids[p] if p >= 0 else None for p in choice.store.tolist()]
    return pd.DataFrame({
        "lead_id": pd.array(c.lead_ids, dtype="string"),
        "matched": c.matched,
        "recommended_store": pd.array(rec, dtype="string"),
        "reason": pd.array(reason_names(choice.reason), dtype="string"),
        "recommended_km": np.round(choice.km, 2),
        "inventory": pd.array(level_names, dtype="string"),
        "home_top5": pd.array(home_ids, dtype="string"),
        "home_km": pd.array(home_km, dtype="string"),
        "work_top5": pd.array(work_ids, dtype="string"),
        "work_km": pd.array(work_km, dtype="string"),
        "fallback_top5": pd.array(fb_ids, dtype="string"),
        "fallback_km": pd.array(fb_km, dtype="string"),
    })


def recommend(
    leads: pd.DataFrame,
    stores: StoreList,
    lead_labels: Mapping[str, bytes],
    availability: Mapping[str, int],
    *,
    rule: ScoringRule = DEFAULT_RULE,
    k: int = K_DEFAULT,
    city_centres: Mapping[str, tuple[float, float]] | None = None,
) -> pd.DataFrame:
    """The ``store_recommendation`` result for every lead (see :func:`recommendation_table`)."""
    c = build_candidates(leads, stores, lead_labels, availability, k=k,
                         city_centres=city_centres)
    return recommendation_table(c, apply_rule(c, rule), stores)


def write_recommendations(table: pd.DataFrame, path: Path | str) -> Path:
    """Write the result as ``.parquet`` or ``.csv`` (by suffix), atomically; return the path."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in {".parquet", ".csv"}:
        raise InputError("unsupported output type; expected .parquet or .csv", file=str(p))
    missing = [c for c in RESULT_COLUMNS if c not in table.columns]
    if missing:
        raise InputError("not a recommendation table", column=missing[0])
    arrow = pa.Table.from_pandas(table[list(RESULT_COLUMNS)], preserve_index=False)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        os.close(fd)
    except OSError as exc:
        raise InputError(f"cannot write the result: {exc.strerror}", file=str(p)) from None
    tmp = Path(tmp_name)
    try:
        if suffix == ".csv":
            pacsv.write_csv(arrow, tmp)
        else:
            pq.write_table(arrow, tmp)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p
