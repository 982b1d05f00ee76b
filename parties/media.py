"""Media platform, at its own node: nearest stores per user and the labeled-PSI rows.

For ``store_recommendation`` the media platform answers, for each of its users, "which
five stores of the OEM's (public) store list are nearest to this user's home, and to
their work, and how far". It computes that here from ``media/locations`` with the k-d
tree of :mod:`parties.geo`, in chunks of users so memory stays bounded, and packs the
answer into the fixed-size nearest-stores label of :mod:`parties.labels` (store positions
and distances in 10 m units only).

It then lists one row per (identifier kind, normalised identifier) of every user, each
pointing to that user's label: the labeled-PSI table builder (protocols/labeled_psi)
keys its table by these identifiers, so the OEM opens a user's label with any identifier
of that user it already holds. Identifiers are normalised with
:mod:`cleanroom.identity`; invalid ones are skipped and counted. When two users hold the
same identifier, one row is kept (the user holding more valid identifiers, then the
earlier row) and the collision is counted.

Coordinates and identifiers never leave this module except as those labels and rows,
which stay at the media node until the protocol blinds them. Nothing is logged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa

from cleanroom.errors import InputError
from cleanroom.identity import ColumnReport, IdKind, normalize_series
from parties.labels import (
    K_DEFAULT,
    NearestLists,
    U8Array,
    encode_nearest_labels,
    nearest_label_size,
)
from parties.stores import StoreList

DEFAULT_CHUNK = 200_000
ID_COLUMNS: dict[str, IdKind] = {
    "phone": "phone",
    "email": "email",
    "device_id": "device_id",
    "device_id_2": "device_id",
}
LOCATION_COLUMNS = ("home_lat", "home_lon", "work_lat", "work_lon")


def _require(frame: pd.DataFrame, columns: tuple[str, ...], table: str) -> None:
    for col in columns:
        if col not in frame.columns:
            raise InputError(f"missing column (table {table})", column=col)


def _coords(frame: pd.DataFrame, lat: str, lon: str) -> tuple[np.ndarray, np.ndarray]:
    la = pd.to_numeric(frame[lat], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    lo = pd.to_numeric(frame[lon], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    for name, arr, bound in ((lat, la, 90.0), (lon, lo, 180.0)):
        bad = np.isfinite(arr) & (np.abs(arr) > bound)
        if bad.any():
            raise InputError(f"coordinate out of range (|value| <= {bound:g})", column=name,
                             row=int(np.flatnonzero(bad)[0]) + 1)
    return la, lo


def iter_nearest(
    locations: pd.DataFrame,
    stores: StoreList,
    *,
    k: int = K_DEFAULT,
    chunk: int = DEFAULT_CHUNK,
) -> Iterator[tuple[int, NearestLists]]:
    """Nearest ``k`` stores to home and to work, ``chunk`` users at a time.

    ``locations`` has ``home_lat, home_lon, work_lat, work_lon`` (missing values allowed:
    that list comes back absent, position -1 and km nan). Yields ``(first_row, lists)``
    with positions into ``stores`` and great-circle km, nearest first.
    """
    _require(locations, LOCATION_COLUMNS, "media/locations")
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    if not 1 <= k <= stores.size:
        raise InputError(f"k must be between 1 and the number of stores ({stores.size})")
    hla, hlo = _coords(locations, "home_lat", "home_lon")
    wla, wlo = _coords(locations, "work_lat", "work_lon")
    index = stores.index
    for start in range(0, len(locations), chunk):
        stop = min(start + chunk, len(locations))
        hi, hk = index.query(hla[start:stop], hlo[start:stop], k=k)
        wi, wk = index.query(wla[start:stop], wlo[start:stop], k=k)
        yield start, NearestLists(home_idx=hi, home_km=hk, work_idx=wi, work_km=wk)


def nearest_for_users(
    locations: pd.DataFrame, stores: StoreList, *, k: int = K_DEFAULT,
    chunk: int = DEFAULT_CHUNK,
) -> NearestLists:
    """All rows of :func:`iter_nearest` in one :class:`NearestLists` (row order kept)."""
    parts = [lists for _, lists in iter_nearest(locations, stores, k=k, chunk=chunk)]
    if not parts:
        empty_i = np.zeros((0, k), dtype=np.int64)
        empty_f = np.zeros((0, k), dtype=np.float64)
        return NearestLists(empty_i, empty_f, empty_i, empty_f)
    return NearestLists(
        home_idx=np.concatenate([p.home_idx for p in parts]),
        home_km=np.concatenate([p.home_km for p in parts]),
        work_idx=np.concatenate([p.work_idx for p in parts]),
        work_km=np.concatenate([p.work_km for p in parts]),
    )


def nearest_store_labels(
    locations: pd.DataFrame, stores: StoreList, *, k: int = K_DEFAULT,
    chunk: int = DEFAULT_CHUNK,
) -> U8Array:
    """One nearest-stores label per row of ``locations``: a ``(n, 6 + 10k)`` uint8 array."""
    out = np.empty((len(locations), nearest_label_size(k)), dtype=np.uint8)
    for start, lists in iter_nearest(locations, stores, k=k, chunk=chunk):
        out[start:start + len(lists)] = encode_nearest_labels(
            lists.home_idx, lists.home_km, lists.work_idx, lists.work_km,
            store_tag=stores.tag, n_stores=stores.size)
    return out


def align_locations(users: pd.DataFrame, locations: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """``locations`` in the order of ``users`` (missing users get empty coordinates).

    Returns the aligned frame and how many users had no location row. Raises
    :class:`InputError` for a repeated user id in either table.
    """
    _require(users, ("user_id",), "media/users")
    _require(locations, ("user_id", *LOCATION_COLUMNS), "media/locations")
    for name, frame in (("media/users", users), ("media/locations", locations)):
        dup = frame["user_id"].duplicated().to_numpy(dtype=bool)
        if dup.any():
            raise InputError(f"repeated key value (table {name})", column="user_id",
                             row=int(np.flatnonzero(dup)[0]) + 1)
    u_ids = users["user_id"].to_numpy(dtype=object)
    if len(locations) == len(users) and (locations["user_id"].to_numpy(dtype=object)
                                         == u_ids).all():
        return locations[["user_id", *LOCATION_COLUMNS]].reset_index(drop=True), 0
    loc = locations.set_index("user_id")[list(LOCATION_COLUMNS)]
    aligned = loc.reindex(users["user_id"]).reset_index()
    missing = int((~users["user_id"].isin(locations["user_id"])).sum())
    return aligned, missing


@dataclass(frozen=True)
class IdentifierReport:
    """Counts only (never values): identifiers per column, rows emitted, collisions."""

    users: int
    columns: tuple[ColumnReport, ...]
    rows: int
    users_without_identifier: int
    users_without_location: int
    duplicate_same_label: int
    duplicate_conflicting: int

    def as_dict(self) -> dict[str, object]:
        return {
            "users": self.users,
            "columns": [c.as_dict() for c in self.columns],
            "rows": self.rows,
            "users_without_identifier": self.users_without_identifier,
            "users_without_location": self.users_without_location,
            "duplicate_same_label": self.duplicate_same_label,
            "duplicate_conflicting": self.duplicate_conflicting,
        }


@dataclass(frozen=True)
class LabelRows:
    """(kind, normalised identifier) -> label rows, for the labeled-PSI table builder.

    ``labels`` holds one label per user, ``(n_users, size)`` uint8; row ``i`` of this
    table carries ``kinds[i]``, ``identifiers[i]`` (Arrow string arrays, compact at
    millions of rows) and the label ``labels[label_index[i]]``.
    Rows are sorted by kind, then identifier (their order says nothing about users).
    """

    kinds: pa.Array
    identifiers: pa.Array
    label_index: npt.NDArray[np.int64]
    labels: U8Array
    report: IdentifierReport = field(compare=False)

    def __len__(self) -> int:
        return len(self.identifiers)

    def label(self, i: int) -> bytes:
        return self.labels[int(self.label_index[i])].tobytes()

    def __iter__(self) -> Iterator[tuple[IdKind, str, bytes]]:
        step = 65_536
        for start in range(0, len(self), step):
            kinds = self.kinds.slice(start, step).to_pylist()
            idents = self.identifiers.slice(start, step).to_pylist()
            for j, (kind, ident) in enumerate(zip(kinds, idents, strict=True)):
                yield kind, ident, self.label(start + j)

    def to_arrow(self) -> pa.Table:
        """``kind`` (string), ``identifier`` (string), ``label`` (fixed-size binary)."""
        size = self.labels.shape[1]
        flat = np.ascontiguousarray(self.labels[self.label_index]).reshape(-1)
        label = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(size), len(self), [None, pa.py_buffer(flat.tobytes())])
        return pa.table({
            "kind": self.kinds,
            "identifier": self.identifiers,
            "label": label,
        })


def identifier_rows(
    users: pd.DataFrame, labels: U8Array, *, users_without_location: int = 0
) -> LabelRows:
    """Rows ``(kind, normalised identifier) -> labels[user row]`` for every valid identifier.

    ``users`` is a ``media/users`` frame (``phone``, ``email``, ``device_id``,
    ``device_id_2``); ``labels[i]`` is the label of ``users`` row ``i``.
    """
    _require(users, tuple(ID_COLUMNS), "media/users")
    if labels.ndim != 2 or labels.shape[0] != len(users):
        raise ValueError("labels must hold one row per user")
    parts: list[pd.DataFrame] = []
    reports: list[ColumnReport] = []
    valid_per_user = np.zeros(len(users), dtype=np.int64)
    for column, kind in ID_COLUMNS.items():
        norm, report = normalize_series(kind, users[column].reset_index(drop=True), column)
        reports.append(report)
        ok = norm.notna().to_numpy(dtype=bool)
        valid_per_user += ok
        rows = np.flatnonzero(ok)
        parts.append(pd.DataFrame({
            "kind": kind, "identifier": norm.to_numpy(dtype=object)[rows], "user": rows,
        }))
    table = pd.concat(parts, ignore_index=True)
    table["n_valid"] = valid_per_user[table["user"].to_numpy()]
    # one user's two device columns may hold the same device: that is not a collision
    table = table.drop_duplicates(subset=["kind", "identifier", "user"])
    table = table.sort_values(["kind", "identifier", "n_valid", "user"],
                              ascending=[True, True, False, True], kind="mergesort")
    dup = table.duplicated(subset=["kind", "identifier"], keep="first").to_numpy(dtype=bool)
    kept = table[~dup]
    same = conflicting = 0
    if dup.any():
        first_user = table.groupby(["kind", "identifier"], sort=False)["user"].transform("first")
        losers = table["user"].to_numpy()[dup]
        winners = first_user.to_numpy()[dup]
        differs = (labels[losers] != labels[winners]).any(axis=1)
        conflicting = int(differs.sum())
        same = int(dup.sum()) - conflicting
    summary = IdentifierReport(
        users=len(users),
        columns=tuple(reports),
        rows=len(kept),
        users_without_identifier=int((valid_per_user == 0).sum()),
        users_without_location=users_without_location,
        duplicate_same_label=same,
        duplicate_conflicting=conflicting,
    )
    return LabelRows(
        kinds=pa.array(kept["kind"].to_numpy(dtype=object), type=pa.string()),
        identifiers=pa.array(kept["identifier"].to_numpy(dtype=object), type=pa.string()),
        label_index=kept["user"].to_numpy(dtype=np.int64),
        labels=labels,
        report=summary,
    )


def build_label_rows(
    users: pd.DataFrame, locations: pd.DataFrame, stores: StoreList, *,
    k: int = K_DEFAULT, chunk: int = DEFAULT_CHUNK,
) -> LabelRows:
    """The media platform's whole step: labels for every user, then identifier rows."""
    aligned, missing = align_locations(users, locations)
    labels = nearest_store_labels(aligned, stores, k=k, chunk=chunk)
    return identifier_rows(users, labels, users_without_location=missing)


def build_label_rows_from_dir(root: Path | str, stores: StoreList, *,
                              k: int = K_DEFAULT) -> LabelRows:
    """:func:`build_label_rows` over ``root/media/{users,locations}`` (validated on load)."""
    from parties.schemas import load_table

    users = load_table(Path(root), "media/users")
    locations = load_table(Path(root), "media/locations")
    return build_label_rows(users, locations, stores, k=k)
