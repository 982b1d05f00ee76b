"""Benchmark: the media platform's nearest stores (home and work) and label encoding.

Run: ``.venv/bin/python scripts/bench_nearest_stores.py --users 1000000 --stores 2000``

Draws users and stores around the generator's cities (seeded), then measures, in one run:

- the k-d tree path (:func:`parties.media.nearest_store_labels`: spatial index, chunked,
  both lists, encoded into 56-byte labels) over all users;
- the named peer: a brute-force, vectorised, chunked haversine over every store
  (numpy ``argpartition``), on a subsample, extrapolated per user;
- agreement of the two on the subsample (they must be equal);

and prints users per second, the ratio to the brute force, the projection for 3M users,
and the peak resident memory. The issue's target: 3M users x 2,000 stores in minutes.
Figures depend on the machine and its load; no assertion is made on time.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import pandas as pd

from cleanroom.synth import CITIES
from parties.geo import great_circle_km
from parties.labels import decode_nearest_labels
from parties.media import DEFAULT_CHUNK, nearest_store_labels
from parties.stores import StoreList


def _points(rng: np.random.Generator, n: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    lat0 = np.array([c[1] for c in CITIES])
    lon0 = np.array([c[2] for c in CITIES])
    rad = np.array([c[3] for c in CITIES])
    w = np.array([c[4] for c in CITIES])
    city = rng.choice(len(CITIES), size=n, p=w / w.sum())
    dn = rng.normal(0, 1, n) * spread * rad[city]
    de = rng.normal(0, 1, n) * spread * rad[city]
    lat = lat0[city] + dn / 111.195
    lon = lon0[city] + de / (111.195 * np.cos(np.radians(lat0[city])))
    return lat, lon


def brute_force(lat: np.ndarray, lon: np.ndarray, s_lat: np.ndarray, s_lon: np.ndarray,
                k: int, chunk: int = 2_000) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest by computing every user-store haversine distance."""
    idx = np.empty((lat.size, k), dtype=np.int64)
    km = np.empty((lat.size, k))
    for a in range(0, lat.size, chunk):
        d = great_circle_km(lat[a:a + chunk, None], lon[a:a + chunk, None], s_lat[None, :],
                            s_lon[None, :])
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        dk = np.take_along_axis(d, part, axis=1)
        order = np.argsort(dk, axis=1, kind="stable")
        idx[a:a + chunk] = np.take_along_axis(part, order, axis=1)
        km[a:a + chunk] = np.take_along_axis(dk, order, axis=1)
    return idx, km


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--stores", type=int, default=2_000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    ap.add_argument("--sample", type=int, default=20_000,
                    help="users for the brute-force peer and the equality check")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    s_lat, s_lon = _points(rng, args.stores, 0.5)
    stores = StoreList(store_ids=tuple(f"S{i:05d}" for i in range(args.stores)),
                       cities=("x",) * args.stores, lat=s_lat, lon=s_lon)
    h_lat, h_lon = _points(rng, args.users, 0.45)
    w_lat, w_lon = _points(rng, args.users, 0.3)
    locations = pd.DataFrame({"home_lat": h_lat, "home_lon": h_lon,
                              "work_lat": w_lat, "work_lon": w_lon})

    t0 = time.perf_counter()
    labels = nearest_store_labels(locations, stores, k=args.k, chunk=args.chunk)
    tree_s = time.perf_counter() - t0

    m = min(args.sample, args.users)
    t0 = time.perf_counter()
    bi_h, bk_h = brute_force(h_lat[:m], h_lon[:m], s_lat, s_lon, args.k)
    bi_w, bk_w = brute_force(w_lat[:m], w_lon[:m], s_lat, s_lon, args.k)
    brute_s = time.perf_counter() - t0

    dec = decode_nearest_labels(labels[:m], store_tag=stores.tag, n_stores=stores.size, k=args.k)
    same = bool((dec.home_idx == bi_h).all() and (dec.work_idx == bi_w).all())
    err = float(max(np.abs(dec.home_km - bk_h).max(), np.abs(dec.work_km - bk_w).max()))

    tree_rate = args.users / tree_s
    brute_rate = m / brute_s
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"users {args.users:,}  stores {args.stores:,}  k {args.k}  chunk {args.chunk:,}")
    print(f"k-d tree + labels (home and work): {tree_s:8.2f} s  {tree_rate:12,.0f} users/s")
    print(f"brute-force haversine ({m:,} users): {brute_s:8.2f} s  {brute_rate:12,.0f} users/s")
    print(f"speed-up over brute force: {tree_rate / brute_rate:.1f}x")
    print(f"projected for 3,000,000 users: {3_000_000 / tree_rate:.1f} s "
          f"(brute force: {3_000_000 / brute_rate:.0f} s)")
    print(f"labels: {labels.shape[0]:,} x {labels.shape[1]} bytes = "
          f"{labels.nbytes / 2**20:.0f} MiB; peak RSS {peak_mb:,.0f} MiB")
    print(f"subsample equal to brute force: {same}; max km error {err:.4f} (10 m units)")
    if not same:
        raise SystemExit("nearest stores differ from the brute force")


if __name__ == "__main__":
    main()
