"""The OEM's store network as the shared, ordered list that store labels point into.

Store addresses are public, so the OEM shares its ``oem/stores`` table with the media
platform (and the dealer). Store labels (:mod:`parties.labels`) name stores by their
position in this list, as small integers, and carry a short tag of the list so a label
built against one version of the list is refused against another.

The list order is the order of rows in the OEM's table; ``tag`` is the first four bytes of
SHA-256 over a canonical text of every store's id and coordinates (6 decimals, about
0.1 m), in that order. This module computes only: it does no I/O except through
:func:`parties.schemas.load_table` in :meth:`StoreList.load`, and logs nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from cleanroom.errors import InputError
from parties.geo import StoreIndex
from parties.labels import ABSENT_STORE, TAG_SIZE

FloatArray = npt.NDArray[np.float64]

MAX_STORES = ABSENT_STORE  # positions are uint16 in labels; 0xFFFF itself means "absent"
_TAG_DOMAIN = b"cleanroom/store-list/v1\n"


@dataclass(frozen=True)
class StoreList:
    """Stores in a fixed order: ids, cities and coordinates; ``position`` maps id -> index."""

    store_ids: tuple[str, ...]
    cities: tuple[str, ...]
    lat: FloatArray
    lon: FloatArray
    position: dict[str, int] = field(init=False, repr=False, compare=False)
    tag: bytes = field(init=False, repr=False, compare=False)
    _index: StoreIndex = field(init=False, repr=False, compare=False)
    _by_city: dict[str, npt.NDArray[np.int64]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.store_ids)
        if n == 0:
            raise InputError("the store list is empty", column="store_id")
        if n > MAX_STORES:
            raise InputError(f"at most {MAX_STORES} stores fit the label format, got {n}",
                             column="store_id")
        if len(self.cities) != n or self.lat.shape != (n,) or self.lon.shape != (n,):
            raise InputError("store ids, cities and coordinates differ in length")
        lat = np.asarray(self.lat, dtype=np.float64)
        lon = np.asarray(self.lon, dtype=np.float64)
        for name, arr, bound in (("lat", lat, 90.0), ("lon", lon, 180.0)):
            bad = ~np.isfinite(arr) | (np.abs(arr) > bound)
            if bad.any():
                raise InputError(f"store coordinate missing or out of range (|{name}| <= "
                                 f"{bound:g})", column=name, row=int(np.flatnonzero(bad)[0]) + 1)
        position: dict[str, int] = {}
        for i, sid in enumerate(self.store_ids):
            if not sid:
                raise InputError("empty store id", column="store_id", row=i + 1)
            if sid in position:
                raise InputError("repeated store id", column="store_id", row=i + 1)
            position[sid] = i
        object.__setattr__(self, "lat", lat)
        object.__setattr__(self, "lon", lon)
        object.__setattr__(self, "position", position)
        object.__setattr__(self, "tag", _list_tag(self.store_ids, lat, lon))
        object.__setattr__(self, "_index", StoreIndex(lat, lon))
        cities = np.asarray(self.cities, dtype=object)
        object.__setattr__(self, "_by_city", {
            c: np.flatnonzero(cities == c).astype(np.int64) for c in dict.fromkeys(self.cities)})

    @property
    def size(self) -> int:
        return len(self.store_ids)

    @property
    def index(self) -> StoreIndex:
        """The k-d tree over the stores (built once)."""
        return self._index

    @classmethod
    def from_frame(cls, stores: pd.DataFrame) -> StoreList:
        """From an ``oem/stores`` frame (store_id, city, lat, lon), keeping the row order."""
        for col in ("store_id", "city", "lat", "lon"):
            if col not in stores.columns:
                raise InputError("missing column in the store list", column=col)
        return cls(
            store_ids=tuple(str(s) for s in stores["store_id"].tolist()),
            cities=tuple(str(c) for c in stores["city"].tolist()),
            lat=stores["lat"].to_numpy(dtype=np.float64, na_value=np.nan),
            lon=stores["lon"].to_numpy(dtype=np.float64, na_value=np.nan),
        )

    @classmethod
    def load(cls, path: Path | str) -> StoreList:
        """Load and validate ``oem/stores`` from a file or a dataset directory."""
        from parties.schemas import load_table

        return cls.from_frame(load_table(Path(path), "oem/stores"))

    def ids_at(self, positions: Sequence[int] | npt.NDArray[np.int64]) -> list[str | None]:
        """Store ids at ``positions``; ``None`` where a position is negative (absent)."""
        return [self.store_ids[int(p)] if int(p) >= 0 else None for p in positions]

    def city_stores(self, city: str) -> npt.NDArray[np.int64]:
        """Positions of the stores in ``city`` (exact name match)."""
        return np.asarray(self._by_city.get(city, np.zeros(0, dtype=np.int64)))


def _list_tag(store_ids: Sequence[str], lat: FloatArray, lon: FloatArray) -> bytes:
    h = hashlib.sha256(_TAG_DOMAIN)
    for sid, la, lo in zip(store_ids, lat.tolist(), lon.tolist(), strict=True):
        h.update(f"{sid}\t{la:.6f}\t{lo:.6f}\n".encode())
    return h.digest()[:TAG_SIZE]
