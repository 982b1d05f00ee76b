"""Benchmark the audit ledger: durable appends per second and full verification time.

Targets (issue 4): >= 5,000 durable appends/s (batched commits allowed, each batch
atomic) and full verification of 1M entries in <= 10 s. Prints measured figures and
their ratios to the targets. Uses a fresh SQLite database (WAL, synchronous=FULL) in a
temporary directory unless --db-url is given (e.g. a PostgreSQL URL).

    python scripts/bench_ledger.py                 # 1M entries
    python scripts/bench_ledger.py --entries 100000 --batch 500

This script writes only to its own temporary database and prints no entry contents.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine

from cleanroom.ledger import Event, Ledger, digest, event

APPEND_TARGET = 5_000.0  # entries per second
VERIFY_TARGET_S = 10.0  # seconds for 1M entries


def _events(start: int, n: int) -> list[Event]:
    return [
        event("message_sent", query_id=f"q-bench{(start + i) // 1000:06d}",
              session_id=f"s-{(start + i) // 100:07d}", protocol="ecdh_psi", peer="media",
              round=f"round{(start + i) % 4}", digest=digest((start + i).to_bytes(8, "big")),
              size=1000 + (start + i) % 5000, ts_ms=1_700_000_000_000 + start + i)
        for i in range(n)
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000, help="ledger size to verify")
    ap.add_argument("--batch", type=int, default=1000, help="entries per atomic commit")
    ap.add_argument("--single", type=int, default=500, help="unbatched appends to time")
    ap.add_argument("--deep-sample", type=int, default=50_000,
                    help="entries for the deep (JSON+schema) verification sample; 0 = skip")
    ap.add_argument("--db-url", default=None, help="SQLAlchemy URL (default: temp SQLite)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        url = args.db_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        engine = create_engine(url)
        key = Ed25519PrivateKey.generate()
        led = Ledger(engine, "cleanroom/bench", key)

        # 1. unbatched durable appends (one commit per entry)
        evs = _events(0, args.single)
        t0 = time.perf_counter()
        for ev in evs:
            led.append(ev)
        single_rate = args.single / (time.perf_counter() - t0)

        # 2. batched durable appends up to --entries (event building excluded)
        total = args.entries - led.size
        t_append = 0.0
        done = 0
        while done < total:
            n = min(args.batch, total - done)
            batch = _events(led.size, n)
            t0 = time.perf_counter()
            led.append_many(batch)
            t_append += time.perf_counter() - t0
            done += n
        batch_rate = done / t_append if t_append else float("nan")
        led.checkpoint()

        # 3. reopen (load leaf hashes, rebuild the tree) and full verification
        engine.dispose()
        engine = create_engine(url)
        t0 = time.perf_counter()
        led = Ledger(engine, "cleanroom/bench", key)
        t_open = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = led.verify()
        t_verify = time.perf_counter() - t0
        if not report.ok:
            print(report.summary())
            return 1
        scaled = t_verify * 1_000_000 / max(report.size, 1)

        deep_rate = None
        if args.deep_sample:
            deep_engine = create_engine(f"sqlite:///{Path(tmp) / 'deep.db'}")
            deep = Ledger(deep_engine, "cleanroom/deep", key)
            for s in range(0, args.deep_sample, 10_000):
                deep.append_many(_events(s, min(10_000, args.deep_sample - s)))
            t0 = time.perf_counter()
            assert deep.verify(deep=True).ok
            deep_rate = args.deep_sample / (time.perf_counter() - t0)

    print(f"ledger benchmark ({engine.dialect.name}, batch={args.batch})")
    print(f"  unbatched durable appends : {single_rate:10.0f} /s  "
          f"(ratio to 5,000/s target: {single_rate / APPEND_TARGET:.2f})")
    print(f"  batched durable appends   : {batch_rate:10.0f} /s  "
          f"(ratio to 5,000/s target: {batch_rate / APPEND_TARGET:.2f})")
    print(f"  open (load {report.size} leaf hashes, build tree): {t_open:.2f} s")
    print(f"  full verification of {report.size} entries: {t_verify:.2f} s "
          f"(scaled to 1M: {scaled:.2f} s; target/measured = {VERIFY_TARGET_S / scaled:.2f})")
    if deep_rate is not None:
        print(f"  deep verification (JSON+canonical+schema per entry): {deep_rate:.0f} entries/s "
              f"(1M would take {1_000_000 / deep_rate:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
