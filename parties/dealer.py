"""Dealer group, at its own node: coarse inventory labels and per-customer visit features.

**Inventory availability.** The dealer's policy allows ``units`` to be used as
``inventory``, that is, published as *availability*, not as stock counts. Each
(store, series) row of ``dealer/inventory`` is coarsened to one of three levels::

    none       0 units
    low        1 .. LOW_MAX_UNITS (2) units
    available  more than LOW_MAX_UNITS units

and written as a 2-byte inventory label (:mod:`parties.labels`) keyed by
``"<store_id>|<series>"``, so the OEM can look availability up through the same
labeled-PSI machinery as the media labels: it opens only the keys it asks for (the
candidate stores of its leads and their intended series), and the dealer does not learn
which. Exact unit counts never leave the node.

**Visit features.** ``dealer/activity`` rows are summed per customer, keyed by the
normalised phone (:mod:`cleanroom.identity`); a customer split over several rows (phone
written in different formats) becomes one row. Rows with an invalid or missing phone are
skipped and counted. The derived columns are the dealer's model features
(``cleanroom.synth.model``): ``dealer_visits_log``, ``dealer_test_drives``,
``dealer_prior_order``, ``is_dealer_customer``. They stay at the dealer node and are only
used inside the Paillier-protected training and scoring protocols.

This module computes only; it does no network I/O and logs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from cleanroom.errors import InputError
from cleanroom.identity import ColumnReport, normalize_series
from parties.labels import (
    INVENTORY_LEVELS,
    KEY_SEPARATOR,
    encode_inventory_label,
    inventory_key,
)

LOW_MAX_UNITS = 2
LEVEL_NONE, LEVEL_LOW, LEVEL_AVAILABLE = 0, 1, 2
TEST_DRIVES_CAP = 3


def availability_level(units: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Coarsen unit counts to levels: 0 none (0), 1 low (1..2), 2 available (3 or more)."""
    u = np.asarray(units)
    if u.size and (not np.issubdtype(u.dtype, np.integer) or (u < 0).any()):
        raise ValueError("units must be whole numbers >= 0")
    return np.where(u <= 0, LEVEL_NONE,
                    np.where(u <= LOW_MAX_UNITS, LEVEL_LOW, LEVEL_AVAILABLE)).astype(np.int64)


def level_name(level: int) -> str:
    """``"none"``, ``"low"`` or ``"available"``."""
    return INVENTORY_LEVELS[level]


@dataclass(frozen=True)
class InventoryRows:
    """``"<store_id>|<series>"`` -> 2-byte inventory label, one row per store and series."""

    keys: tuple[str, ...]
    labels: tuple[bytes, ...]

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        return iter(zip(self.keys, self.labels, strict=True))

    def as_dict(self) -> dict[str, bytes]:
        return dict(zip(self.keys, self.labels, strict=True))


def inventory_rows(inventory: pd.DataFrame, *, file: str | None = None) -> InventoryRows:
    """Coarsened inventory labels from a ``dealer/inventory`` frame.

    Raises :class:`InputError` naming the column and 1-based row for a missing column, an
    empty or ``|``-holding store id or series, units that are not whole numbers >= 0, or
    a repeated (store_id, series) pair.
    """
    for col in ("store_id", "series", "units"):
        if col not in inventory.columns:
            raise InputError("missing column (table dealer/inventory)", file=file, column=col)
    frame = inventory.reset_index(drop=True)
    store = frame["store_id"].astype("string")
    series = frame["series"].astype("string")
    for name, values in (("store_id", store), ("series", series)):
        empty = (values.isna() | (values.str.strip() == "")).to_numpy(dtype=bool)
        if empty.any():
            raise InputError("empty value", file=file, column=name,
                             row=int(np.flatnonzero(empty)[0]) + 1)
        sep = values.str.contains(KEY_SEPARATOR, regex=False).to_numpy(dtype=bool)
        if sep.any():
            raise InputError(f"value must not contain {KEY_SEPARATOR!r}", file=file,
                             column=name, row=int(np.flatnonzero(sep)[0]) + 1)
    units = pd.to_numeric(frame["units"], errors="coerce").to_numpy(dtype=np.float64,
                                                                     na_value=np.nan)
    bad = ~np.isfinite(units) | (units < 0) | (units != np.round(units))
    if bad.any():
        raise InputError("units must be a whole number >= 0", file=file, column="units",
                         row=int(np.flatnonzero(bad)[0]) + 1)
    dup = pd.DataFrame({"s": store, "r": series}).duplicated().to_numpy(dtype=bool)
    if dup.any():
        raise InputError("repeated (store_id, series) pair", file=file, column="store_id",
                         row=int(np.flatnonzero(dup)[0]) + 1)
    levels = availability_level(units.astype(np.int64))
    keys = tuple(inventory_key(s, r) for s, r in zip(store.tolist(), series.tolist(),
                                                      strict=True))
    return InventoryRows(keys=keys, labels=tuple(encode_inventory_label(int(v))
                                                 for v in levels))


def inventory_rows_from_dir(root: Path | str) -> InventoryRows:
    """:func:`inventory_rows` over ``root/dealer/inventory`` (validated on load)."""
    from parties.schemas import load_table

    return inventory_rows(load_table(Path(root), "dealer/inventory"))


@dataclass(frozen=True)
class VisitReport:
    """Counts only: activity rows, rows skipped for their phone, customers out."""

    rows: int
    phone: ColumnReport
    customers: int
    merged_rows: int

    def as_dict(self) -> dict[str, object]:
        return {"rows": self.rows, "phone": self.phone.as_dict(), "customers": self.customers,
                "merged_rows": self.merged_rows}


VISIT_COLUMNS = ("phone", "rows", "visits", "test_drives", "prior_orders", "last_visit_at",
                 "is_dealer_customer", "dealer_visits_log", "dealer_test_drives",
                 "dealer_prior_order")


def visit_features(activity: pd.DataFrame, *,
                   file: str | None = None) -> tuple[pd.DataFrame, VisitReport]:
    """Per-customer sums of ``dealer/activity`` keyed by normalised phone, and model features.

    Returns a frame with :data:`VISIT_COLUMNS` (one row per valid phone, sorted by phone)
    and a :class:`VisitReport`. Counts must be whole numbers >= 0 (:class:`InputError`
    naming column and row otherwise).
    """
    for col in ("phone", "visits", "test_drives", "prior_orders", "last_visit_at"):
        if col not in activity.columns:
            raise InputError("missing column (table dealer/activity)", file=file, column=col)
    frame = activity.reset_index(drop=True)
    counts: dict[str, npt.NDArray[np.int64]] = {}
    for col in ("visits", "test_drives", "prior_orders"):
        v = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64,
                                                                na_value=np.nan)
        bad = ~np.isfinite(v) | (v < 0) | (v != np.round(v))
        if bad.any():
            raise InputError("expected a whole number >= 0", file=file, column=col,
                             row=int(np.flatnonzero(bad)[0]) + 1)
        counts[col] = v.astype(np.int64)
    phone, report = normalize_series("phone", frame["phone"], "phone")
    ok = phone.notna().to_numpy(dtype=bool)
    last = pd.to_datetime(frame["last_visit_at"], errors="coerce")
    data = pd.DataFrame({
        "phone": phone[ok].astype(str).to_numpy(),
        "rows": 1,
        **{c: v[ok] for c, v in counts.items()},
        "last_visit_at": last[ok].to_numpy(),
    })
    grouped = data.groupby("phone", sort=True).agg(
        rows=("rows", "sum"), visits=("visits", "sum"), test_drives=("test_drives", "sum"),
        prior_orders=("prior_orders", "sum"), last_visit_at=("last_visit_at", "max"),
    ).reset_index()
    grouped["is_dealer_customer"] = 1.0
    grouped["dealer_visits_log"] = np.log1p(grouped["visits"].to_numpy(dtype=np.float64))
    grouped["dealer_test_drives"] = np.minimum(grouped["test_drives"], TEST_DRIVES_CAP
                                               ).astype(np.float64)
    grouped["dealer_prior_order"] = (grouped["prior_orders"] > 0).astype(np.float64)
    out = grouped[list(VISIT_COLUMNS)]
    return out, VisitReport(rows=len(frame), phone=report, customers=len(out),
                            merged_rows=int(ok.sum()) - len(out))


def visit_features_from_dir(root: Path | str) -> tuple[pd.DataFrame, VisitReport]:
    """:func:`visit_features` over ``root/dealer/activity`` (validated on load)."""
    from parties.schemas import load_table

    return visit_features(load_table(Path(root), "dealer/activity"))
