"""Model features per party, prepared at the party's own node from its own tables.

Each function turns one party's tables (the columns of :mod:`parties.schemas`) into a
:class:`PartyFeatures`: one row per record the party can match on (the OEM: per lead; the
media platform: per account; the dealer: per customer, i.e. per normalised phone), the
feature columns of :func:`cleanroom.synth.model.fit_features` for that party, as a finite
float64 matrix of bounded values (what :mod:`protocols.vertical_lr.fixedpoint` standardises
and quantises; every value lies within +-:data:`MAX_ABS`, checked).

- :func:`oem_features`: ``oem/leads`` (source channel, intended series) and ``oem/crm``
  (previous owner, service visits capped at 10, prior brand, household cars). A lead
  without a CRM row gets zeros for the CRM columns.
- :func:`media_features`: ``media/users`` and ``media/behaviour`` (log views over all
  series, log price checks, test-drive form opens capped at 3, recency, presence flag,
  log comparisons, log forum posts). An account without behaviour keeps the presence flag
  and zeros elsewhere.
- :func:`dealer_features`: ``dealer/activity`` aggregated per customer by
  :func:`parties.dealer.visit_features`.
- :func:`oem_labels`: the conversion label per lead (``oem/labels``).

A lead that a host does not know gets an all-zero raw row for that host (the presence
flags ``in_media`` / ``is_dealer_customer`` are then 0 too): the node that aligns rows
does that, not this module.

What this module must not do: no I/O, no network, no logging; it sees one party's data
only and never combines parties' tables. Bad input raises
:class:`~cleanroom.errors.InputError` naming the table, the column and the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from cleanroom.errors import InputError
from cleanroom.synth.model import fit_features
from parties.catalog import PRIOR_BRANDS, SERIES, SOURCE_CHANNELS
from parties.dealer import visit_features

FloatArray = npt.NDArray[np.float64]

#: bound on every prepared raw feature value (fixed-point ready: far inside 2^15)
MAX_ABS = 1000.0
SERVICE_VISITS_CAP = 10
TESTDRIVE_OPENS_CAP = 3
RECENCY_DAYS = 14.0

OEM_COLUMNS: tuple[str, ...] = fit_features("oem")
MEDIA_COLUMNS: tuple[str, ...] = fit_features("media")
DEALER_COLUMNS: tuple[str, ...] = fit_features("dealer")


@dataclass(frozen=True)
class PartyFeatures:
    """One row per record: ``keys[i]`` (the party's own record key) and ``values[i]``."""

    keys: list[str]
    columns: tuple[str, ...]
    values: FloatArray

    def __post_init__(self) -> None:
        if self.values.shape != (len(self.keys), len(self.columns)):
            raise ValueError("features: keys, columns and values disagree in shape")

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.values, columns=list(self.columns), index=self.keys)


def _require(frame: pd.DataFrame, columns: Sequence[str], table: str) -> None:
    for col in columns:
        if col not in frame.columns:
            raise InputError(f"missing column (table {table})", column=col)


def _counts(frame: pd.DataFrame, col: str, table: str) -> FloatArray:
    """A whole-number count >= 0 per row (missing values count as 0)."""
    v = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    present = frame[col].notna().to_numpy(dtype=bool)
    bad = present & (~np.isfinite(v) | (v < 0) | (v != np.round(v)))
    if bad.any():
        raise InputError(f"expected a whole number >= 0 (table {table})", column=col,
                         row=int(np.flatnonzero(bad)[0]) + 1)
    return np.where(present, v, 0.0)


def _bool(frame: pd.DataFrame, col: str, table: str) -> FloatArray:
    values = frame[col]
    out = np.zeros(len(frame))
    for i, v in enumerate(values.to_numpy(dtype=object)):
        if v is None or v is pd.NA or (isinstance(v, float) and v != v):
            continue
        if isinstance(v, bool | np.bool_) or (
                isinstance(v, int | float | np.integer | np.floating) and v in (0, 1)):
            out[i] = float(v)
        elif isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
            out[i] = float(v.strip().lower() in ("true", "1"))
        else:
            raise InputError(f"expected true/false (table {table})", column=col, row=i + 1)
    return out


def _keys(frame: pd.DataFrame, col: str, table: str) -> list[str]:
    keys = frame[col]
    missing = keys.isna().to_numpy(dtype=bool)
    if missing.any():
        raise InputError(f"missing key (table {table})", column=col,
                         row=int(np.flatnonzero(missing)[0]) + 1)
    dup = keys.duplicated().to_numpy(dtype=bool)
    if dup.any():
        raise InputError(f"duplicate key (table {table})", column=col,
                         row=int(np.flatnonzero(dup)[0]) + 1)
    return [str(k) for k in keys]


def _finish(keys: list[str], columns: tuple[str, ...], data: dict[str, FloatArray]
            ) -> PartyFeatures:
    values = np.column_stack([np.asarray(data[c], dtype=np.float64) for c in columns]) if keys \
        else np.zeros((0, len(columns)))
    bad = ~np.isfinite(values) | (np.abs(values) > MAX_ABS)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise InputError(f"feature out of range (|x| <= {MAX_ABS:g})", column=columns[c],
                         row=r + 1)
    return PartyFeatures(keys, columns, values)


def _one_hot(values: pd.Series, choices: Sequence[str], col: str, table: str
             ) -> dict[str, FloatArray]:
    arr = values.astype("string").to_numpy(dtype=object)
    allowed = set(choices)
    for i, v in enumerate(arr):
        if v is not None and v is not pd.NA and v not in allowed:
            raise InputError(f"unknown value (table {table}; allowed: {', '.join(choices)})",
                             column=col, row=i + 1)
    return {c: np.asarray([float(v == c) for v in arr]) for c in choices}


def oem_features(leads: pd.DataFrame, crm: pd.DataFrame) -> PartyFeatures:
    """Per lead of ``leads`` (in its order): the OEM's columns :data:`OEM_COLUMNS`."""
    _require(leads, ("lead_id", "source_channel", "intended_series"), "oem/leads")
    _require(crm, ("lead_id", "previous_owner", "service_visits", "prior_brand",
                   "household_cars"), "oem/crm")
    keys = _keys(leads, "lead_id", "oem/leads")
    _keys(crm, "lead_id", "oem/crm")
    joined = leads[["lead_id", "source_channel", "intended_series"]].merge(
        crm, on="lead_id", how="left", validate="one_to_one")
    data: dict[str, FloatArray] = {}
    data["previous_owner"] = _bool(joined, "previous_owner", "oem/crm")
    data["service_visits"] = np.minimum(_counts(joined, "service_visits", "oem/crm"),
                                        SERVICE_VISITS_CAP)
    data["household_cars"] = _counts(joined, "household_cars", "oem/crm")
    channels = _one_hot(joined["source_channel"], SOURCE_CHANNELS, "source_channel",
                        "oem/leads")
    for name in SOURCE_CHANNELS:
        data[f"channel_{name}"] = channels[name]
    brands = _one_hot(joined["prior_brand"], PRIOR_BRANDS, "prior_brand", "oem/crm")
    for name in PRIOR_BRANDS:
        data[f"prior_brand_{name}"] = brands[name]
    series = _one_hot(joined["intended_series"], SERIES, "intended_series", "oem/leads")
    for name in SERIES:
        data[f"series_{name.lower()}"] = series[name]
    return _finish(keys, OEM_COLUMNS, data)


def media_features(users: pd.DataFrame, behaviour: pd.DataFrame) -> PartyFeatures:
    """Per account of ``users`` (in its order): the media platform's :data:`MEDIA_COLUMNS`."""
    views = [f"views_{s.lower()}" for s in SERIES]
    needed = (*views, "comparisons", "price_checks", "forum_posts", "testdrive_form_opens",
              "days_since_active")
    _require(users, ("user_id",), "media/users")
    _require(behaviour, ("user_id", *needed), "media/behaviour")
    keys = _keys(users, "user_id", "media/users")
    _keys(behaviour, "user_id", "media/behaviour")
    beh = behaviour[["user_id", *needed]].copy()
    beh["_has"] = 1.0
    joined = users[["user_id"]].merge(beh, on="user_id", how="left", validate="one_to_one")
    has = joined["_has"].notna().to_numpy(dtype=bool)
    c = {col: _counts(joined, col, "media/behaviour") for col in needed}
    total_views = np.sum([c[v] for v in views], axis=0) if len(joined) else np.zeros(0)
    data: dict[str, FloatArray] = {
        "in_media": np.ones(len(joined)),
        "media_views_log": np.log1p(total_views),
        "media_price_checks_log": np.log1p(c["price_checks"]),
        "media_testdrive_opens": np.minimum(c["testdrive_form_opens"], TESTDRIVE_OPENS_CAP),
        "media_recency": np.where(has, np.exp(-c["days_since_active"] / RECENCY_DAYS), 0.0),
        "media_comparisons_log": np.log1p(c["comparisons"]),
        "media_forum_posts_log": np.log1p(c["forum_posts"]),
    }
    return _finish(keys, MEDIA_COLUMNS, data)


def dealer_features(activity: pd.DataFrame) -> PartyFeatures:
    """Per customer (normalised phone, sorted): the dealer's :data:`DEALER_COLUMNS`."""
    frame, _ = visit_features(activity, file="dealer/activity")
    keys = [str(p) for p in frame["phone"]]
    data = {c: frame[c].to_numpy(dtype=np.float64) for c in DEALER_COLUMNS}
    return _finish(keys, DEALER_COLUMNS, data)


def oem_labels(leads: pd.DataFrame, labels: pd.DataFrame, *, label: str = "converted"
               ) -> pd.Series:
    """The 0/1 label of each lead of ``leads`` that has one, indexed by lead_id."""
    _require(labels, ("lead_id", label), "oem/labels")
    _keys(labels, "lead_id", "oem/labels")
    values = _bool(labels, label, "oem/labels")
    missing = labels[label].isna().to_numpy(dtype=bool)
    if missing.any():
        raise InputError("missing label (table oem/labels)", column=label,
                         row=int(np.flatnonzero(missing)[0]) + 1)
    out = pd.Series(values, index=labels["lead_id"].astype(str).to_numpy())
    known = set(str(k) for k in leads["lead_id"])
    return out[[k in known for k in out.index]]


def detect(columns: Sequence[str]) -> str:
    """Which preparation a party's columns call for: ``oem``, ``media`` or ``dealer``."""
    cols = set(columns)
    if {"visits", "test_drives", "prior_orders"} <= cols:
        return "dealer"
    if {"price_checks", "days_since_active"} <= cols:
        return "media"
    if {"source_channel", "previous_owner"} <= cols:
        return "oem"
    raise InputError("these columns match no known feature source (OEM leads+CRM, media "
                     "behaviour or dealer activity)", column=",".join(sorted(cols))[:200])
