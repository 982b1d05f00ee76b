#!/usr/bin/env python3
"""Benchmark ``cleanroom synth``: time one generation against the 60-second target.

    .venv/bin/python scripts/bench_synth.py                 # 1,000,000 leads, 3,000,000 users
    .venv/bin/python scripts/bench_synth.py --leads 100000  # a quicker look

Generates into a temporary directory (removed afterwards) and prints the wall time, the
throughput and the ratio of the time to the target (below 1.0 meets it). Writes nothing
else; the data is synthetic.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cleanroom.synth import SynthConfig, generate

TARGET_SECONDS = 60.0
TARGET_LEADS = 1_000_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--leads", type=int, default=TARGET_LEADS)
    parser.add_argument("--media-users", type=int, default=None,
                        help="default 3 x leads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", action="store_true")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write into this (new) directory and keep it")
    args = parser.parse_args(argv)
    config = SynthConfig(leads=args.leads, media_users=args.media_users, seed=args.seed,
                         csv=args.csv)
    scratch = Path(tempfile.mkdtemp(prefix="bench-synth-"))
    out = args.keep if args.keep is not None else scratch / "data"
    try:
        started = time.perf_counter()
        summary = generate(out, config)
        elapsed = time.perf_counter() - started
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # The 60 s target is stated for 1M leads; scale it linearly for other sizes.
    target = TARGET_SECONDS * config.leads / TARGET_LEADS
    print(f"cleanroom synth: {config.leads:,} leads, {config.n_media_users:,} media users, "
          f"{'csv' if config.csv else 'parquet'}, seed {config.seed}")
    print(f"  cpus available          {os.cpu_count()}")
    print(f"  rows written            {sum(summary.rows.values()):,}")
    print(f"  bytes written           {size / 1e6:,.1f} MB")
    print(f"  wall time               {elapsed:.2f} s")
    print(f"  leads per second        {config.leads / elapsed:,.0f}")
    print(f"  target                  {target:.2f} s "
          f"({TARGET_SECONDS:.0f} s per {TARGET_LEADS:,} leads)")
    print(f"  time / target           {elapsed / target:.3f}  (< 1 meets the target)")
    print(f"  joint AUC {summary.auc['joint']}, best single party "
          f"{max(v for k, v in summary.auc.items() if k in ('oem', 'media', 'dealer') and v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
