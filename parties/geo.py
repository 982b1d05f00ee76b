"""Great-circle distances and k-nearest stores, vectorised.

Used by the synthetic-data generator for its ground truth and by the media platform's
store recommendation at its own node: the locations handled here are raw and must stay
with their owner. This module only computes; it does no I/O and never logs coordinates.

Nearest neighbours are found with a k-d tree over points on the unit sphere (straight-line
chord distance orders points exactly as great-circle distance does), and the distances
returned are exact great-circle kilometres on a sphere of radius ``EARTH_RADIUS_KM``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.spatial import cKDTree

EARTH_RADIUS_KM = 6371.0088  # mean Earth radius (IUGG)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _as_float(values: npt.ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def unit_xyz(lat: npt.ArrayLike, lon: npt.ArrayLike) -> FloatArray:
    """Points on the unit sphere, shape ``(n, 3)``, from degrees of latitude and longitude."""
    la = np.radians(np.asarray(lat, dtype=np.float64))
    lo = np.radians(np.asarray(lon, dtype=np.float64))
    cos_la = np.cos(la)
    return np.stack([cos_la * np.cos(lo), cos_la * np.sin(lo), np.sin(la)], axis=-1)


def great_circle_km(
    lat1: npt.ArrayLike, lon1: npt.ArrayLike, lat2: npt.ArrayLike, lon2: npt.ArrayLike
) -> FloatArray:
    """Haversine great-circle distance in km; arguments broadcast like numpy arrays."""
    p1 = np.radians(np.asarray(lat1, dtype=np.float64))
    p2 = np.radians(np.asarray(lat2, dtype=np.float64))
    dp = p2 - p1
    dl = np.radians(np.asarray(lon2, dtype=np.float64) - np.asarray(lon1, dtype=np.float64))
    h = np.sin(dp / 2.0) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2.0) ** 2
    return np.asarray(2.0 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def chord_to_km(chord: npt.ArrayLike) -> FloatArray:
    """Great-circle km for a straight-line distance between two points on the unit sphere."""
    c = np.asarray(chord, dtype=np.float64)
    return np.asarray(2.0 * EARTH_RADIUS_KM * np.arcsin(np.clip(c / 2.0, 0.0, 1.0)))


class StoreIndex:
    """A k-d tree over store locations, built once and queried for many points."""

    def __init__(self, store_lat: npt.ArrayLike, store_lon: npt.ArrayLike) -> None:
        lat = _as_float(store_lat, "store_lat")
        lon = _as_float(store_lon, "store_lon")
        if lat.shape != lon.shape:
            raise ValueError("store_lat and store_lon must have the same length")
        if lat.size == 0:
            raise ValueError("at least one store is needed")
        if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
            raise ValueError("store coordinates must be finite numbers")
        self.size = int(lat.size)
        self._tree = cKDTree(unit_xyz(lat, lon))

    def query(
        self, lat: npt.ArrayLike, lon: npt.ArrayLike, k: int = 5
    ) -> tuple[IntArray, FloatArray]:
        """The ``k`` nearest stores to each point, nearest first.

        Returns ``(indices, km)``, both of shape ``(n, k)``: positions into the store
        arrays and great-circle km. Rows whose point is not finite get index ``-1`` and
        distance ``nan``.
        """
        if not 1 <= k <= self.size:
            raise ValueError(f"k must be between 1 and the number of stores ({self.size}), got {k}")
        la = _as_float(lat, "lat")
        lo = _as_float(lon, "lon")
        if la.shape != lo.shape:
            raise ValueError("lat and lon must have the same length")
        n = la.size
        idx = np.full((n, k), -1, dtype=np.int64)
        km = np.full((n, k), np.nan, dtype=np.float64)
        ok = np.isfinite(la) & np.isfinite(lo)
        if ok.any():
            chord, found = self._tree.query(unit_xyz(la[ok], lo[ok]), k=k)
            chord = np.asarray(chord, dtype=np.float64).reshape(-1, k)
            found = np.asarray(found, dtype=np.int64).reshape(-1, k)
            idx[ok] = found
            km[ok] = chord_to_km(chord)
        return idx, km


def nearest_stores(
    lat: npt.ArrayLike,
    lon: npt.ArrayLike,
    store_lat: npt.ArrayLike,
    store_lon: npt.ArrayLike,
    k: int = 5,
) -> tuple[IntArray, FloatArray]:
    """The ``k`` nearest stores to each point: ``(indices, km)``, each of shape ``(n, k)``.

    Indices are positions into ``store_lat``/``store_lon``; distances are great-circle km,
    nearest first. See :class:`StoreIndex` to reuse one tree for several queries.
    """
    return StoreIndex(store_lat, store_lon).query(lat, lon, k)
