#!/usr/bin/env python3
"""Benchmark: ingest of N rows (default 1,000,000) with three identifier columns.

Generates a messy CSV (phones with +86/spaces/dashes, mixed-case emails with whitespace,
device ids with dashes; a few invalid values), initialises a throw-away node and times
``cleanroom.storage.datasets.ingest_file`` (read, check, normalise, write Parquet, fsync,
commit). Prints the time and its ratio to the target (20 s for 1M rows).

    .venv/bin/python scripts/bench_ingest.py [--rows 1000000] [--format csv|parquet]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

TARGET_SECONDS = 20.0


def make_frame(rows: int, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    body = rng.integers(3_000_000_000, 9_999_999_999, rows).astype(str)
    style = rng.integers(0, 4, rows)
    phone = np.where(
        style == 0,
        np.char.add("+86 1", body),
        np.where(
            style == 1,
            np.char.add("1", body),
            np.where(style == 2, np.char.add("0086-1", body), np.char.add("86 1", body)),
        ),
    )
    idx = np.arange(rows).astype(str)
    email = np.char.add(np.char.add(" User", idx), "@Example.COM ")
    dev = np.char.add("AbCd-", np.char.zfill(idx, 16))
    bad = rng.random(rows) < 0.01
    phone = np.where(bad, "12345", phone)
    return pd.DataFrame(
        {
            "phone": phone,
            "email": email,
            "device_id": dev,
            "city": rng.choice(["shanghai", "beijing", "guangzhou", "chengdu"], rows),
            "views": rng.integers(0, 500, rows),
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--format", choices=["csv", "parquet"], default="csv")
    args = parser.parse_args()

    from cleanroom.node.admin import init_node
    from cleanroom.node.context import NodeContext
    from cleanroom.storage.datasets import ingest_file

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        base = Path(tmp)
        t0 = time.perf_counter()
        frame = make_frame(args.rows)
        src = base / f"leads.{args.format}"
        if args.format == "csv":
            frame.to_csv(src, index=False)
        else:
            frame.to_parquet(src, index=False)
        gen = time.perf_counter() - t0
        init_node(base / "node", name="bench", party="oem", listen="127.0.0.1:18999")
        ctx = NodeContext.open(base / "node")
        t0 = time.perf_counter()
        report = ingest_file(ctx.engine, ctx.data_dir, "leads", src, "phone,email,device_id")
        elapsed = time.perf_counter() - t0
        size_mb = src.stat().st_size / 1e6
    target = TARGET_SECONDS * args.rows / 1_000_000
    print(f"generated {args.rows} rows ({size_mb:.0f} MB {args.format}) in {gen:.1f} s")
    for r in report.id_report:
        print(f"  {r['column']:<10} valid {r['valid']}  invalid {r['invalid']}")
    print(
        f"ingest: {elapsed:.2f} s for {args.rows} rows, 3 id columns "
        f"({args.rows / elapsed:,.0f} rows/s)"
    )
    print(f"ratio to target ({target:.1f} s): {elapsed / target:.2f} (<= 1.00 meets it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
