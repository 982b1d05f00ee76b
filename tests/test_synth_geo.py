"""parties.geo: k-nearest stores by great-circle distance equal a brute-force search."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parties.geo import StoreIndex, great_circle_km, nearest_stores


def test_known_distance() -> None:
    # Beijing to Shanghai centres: about 1,067 km
    km = great_circle_km(39.9042, 116.4074, 31.2304, 121.4737)
    assert 1060 < float(km) < 1075
    assert float(great_circle_km(10.0, 20.0, 10.0, 20.0)) == 0.0


@given(seed=st.integers(0, 10_000), k=st.integers(1, 8))
@settings(max_examples=25, deadline=None)
def test_nearest_equals_brute_force(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    s_lat, s_lon = rng.uniform(18, 45, 40), rng.uniform(100, 125, 40)
    lat, lon = rng.uniform(18, 45, 200), rng.uniform(100, 125, 200)
    idx, km = nearest_stores(lat, lon, s_lat, s_lon, k=k)
    dist = great_circle_km(lat[:, None], lon[:, None], s_lat[None, :], s_lon[None, :])
    order = np.argsort(dist, axis=1)[:, :k]
    assert idx.shape == km.shape == (200, k)
    assert (idx == order).all()
    assert np.allclose(km, np.take_along_axis(dist, order, axis=1), atol=1e-6)
    assert (np.diff(km, axis=1) >= 0).all()


def test_missing_points_and_bad_k() -> None:
    index = StoreIndex([30.0, 31.0], [120.0, 121.0])
    idx, km = index.query([30.1, np.nan], [120.1, 121.0], k=2)
    assert idx[1].tolist() == [-1, -1] and np.isnan(km[1]).all()
    assert idx[0].tolist() == [0, 1]
    with pytest.raises(ValueError, match="k must be between"):
        index.query([30.0], [120.0], k=3)
    with pytest.raises(ValueError, match="at least one store"):
        StoreIndex([], [])
