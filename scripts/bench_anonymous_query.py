"""Benchmark the anonymous query (labeled PSI through an OPRF) against the X25519 bound.

Named sections, selectable with ``--sections`` (default: every in-process section):

- ``build``: table build rate (keys/s, one process) next to this machine's X25519 rate
  measured in the same run with the same primitive (libsodium via PyNaCl): the bound is
  one scalar multiplication per key. With ``--processes P > 1`` also a P-process build
  against the P-process X25519 rate.
- ``lookup``: in-process cost of one real-time lookup (a whole session: blind, evaluate,
  unblind, bucket request, bucket serialise/parse, decrypt), p50/p99 over ``--lookups``
  sessions, and the local lookup cost per tag in a downloaded table (batch mode).
- ``batch``: batch-mode throughput in leads per second (one identifier per lead, sessions of
  ``--batch`` leads): per-party cost per lead on one core (owner: 1 X25519; querier: hash
  to curve + 2 X25519 + KDF + lookup), and end-to-end leads/s with both parties sharing
  ``--processes`` worker processes.

The over-TLS latency measurement with 1, 8 and 32 concurrent clients against a node needs
the node endpoints for the anonymous query; it is not in this script yet.

Usage: ``python scripts/bench_anonymous_query.py [--keys 100000] [--sections build,batch]``.
Prints figures and ratios; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from protocols.labeled_psi import AnonymousQuerier, AnonymousQueryOwner, OwnerTable, Table, oprf
from protocols.psi import ecdh

LABEL_SIZE = 96


def _users(n_keys: int, ids_per_user: int = 2) -> dict[str, tuple[list[bytes], bytes]]:
    n_users = max(1, n_keys // ids_per_user)
    return {
        f"u{i}": ([b"\x01+86%011d" % i, b"\x02user%d@example.com" % i][:ids_per_user],
                  os.urandom(80))
        for i in range(n_users)
    }


def _x25519_rate(n: int) -> float:
    points = oprf.hash_to_curve([os.urandom(16) for _ in range(n)])
    key = oprf.new_oprf_key()
    t = time.perf_counter()
    ecdh.scalarmult_packed(key, points)
    return n / (time.perf_counter() - t)


def _mult_chunk(points: bytes) -> int:
    ecdh.scalarmult_packed(oprf.new_oprf_key(), points)
    return len(points) // 32


def _x25519_rate_pool(n: int, processes: int) -> float:
    points = oprf.hash_to_curve([os.urandom(16) for _ in range(n)])
    per = -(-n // processes) * 32
    chunks = [points[i : i + per] for i in range(0, len(points), per)]
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_mult_chunk, [points[:320]] * processes))
        t = time.perf_counter()
        done = sum(pool.map(_mult_chunk, chunks))
        return done / (time.perf_counter() - t)


def section_build(args: argparse.Namespace, state: dict[str, object]) -> None:
    users = _users(args.keys)
    n_keys = sum(len(ids) for ids, _ in users.values())
    bound = _x25519_rate(min(n_keys, 50_000))
    t = time.perf_counter()
    owner = OwnerTable.build(users, label_size=LABEL_SIZE, min_bucket_size=args.min_bucket)
    build_s = time.perf_counter() - t
    rate = n_keys / build_s
    table = owner.current
    print(f"[build] {n_keys} keys, label_size {LABEL_SIZE}, buckets {table.bucket_count} "
          f"(min {int(table.bucket_sizes().min())}, max {int(table.bucket_sizes().max())}), "
          f"{len(table.to_bytes()) / 1e6:.1f} MB")
    print(f"[build] one process: {rate:,.0f} keys/s; X25519 bound {bound:,.0f} mults/s; "
          f"ratio {rate / bound:.2f}")
    if args.processes > 1:
        pbound = _x25519_rate_pool(min(n_keys, 100_000), args.processes)
        with ProcessPoolExecutor(args.processes) as pool:
            t = time.perf_counter()
            OwnerTable.build(users, label_size=LABEL_SIZE, min_bucket_size=args.min_bucket,
                             map_fn=pool.map, chunk_size=4096)
            prate = n_keys / (time.perf_counter() - t)
        print(f"[build] {args.processes} processes: {prate:,.0f} keys/s; X25519 bound "
              f"{pbound:,.0f} mults/s; ratio {prate / pbound:.2f}")
    state["owner"] = owner
    state["users"] = users


def _owner(args: argparse.Namespace, state: dict[str, object]) -> OwnerTable:
    if "owner" not in state:
        users = _users(args.keys)
        state["users"] = users
        state["owner"] = OwnerTable.build(users, label_size=LABEL_SIZE,
                                          min_bucket_size=args.min_bucket)
    owner = state["owner"]
    assert isinstance(owner, OwnerTable)
    return owner


def _realtime_session(owner: OwnerTable, ids: list[bytes], min_anon: int) -> int:
    sid = os.urandom(16)
    q = AnonymousQuerier.realtime(ids, session_id=sid, min_anonymity=min_anon)
    o = AnonymousQueryOwner(owner, querier_id="bench", session_id=sid)
    breq = q.handle(o.handle(q.start()))  # type: ignore[arg-type]
    q.handle(o.handle(breq))  # type: ignore[arg-type]
    return len(q.result.labels)


def section_lookup(args: argparse.Namespace, state: dict[str, object]) -> None:
    owner = _owner(args, state)
    users = state["users"]
    assert isinstance(users, dict)
    refs = list(users)
    min_anon = min(args.min_bucket, owner.current.entry_count)
    times = []
    hits = 0
    for i in range(args.lookups):
        ids = [users[refs[i * 7919 % len(refs)]][0][0]]
        t = time.perf_counter()
        hits += _realtime_session(owner, ids, min_anon)
        times.append(time.perf_counter() - t)
    times.sort()
    p50 = statistics.median(times) * 1e3
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))] * 1e3
    print(f"[lookup] real-time session in-process (1 identifier, bucket of "
          f"~{owner.current.entry_count // owner.current.bucket_count} entries): "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms ({hits}/{args.lookups} matched)")
    table = Table.from_bytes(owner.current.to_bytes())
    ids = [users[refs[i * 31 % len(refs)]][0][0] for i in range(min(args.batch, len(refs)))]
    pairs = oprf.TagDeriver(table.table_id).derive_many(oprf.oprf_direct(owner.key, ids))
    t = time.perf_counter()
    got = table.open(pairs)
    per = (time.perf_counter() - t) / len(pairs) * 1e6
    assert all(g is not None for g in got)
    print(f"[lookup] local lookup + decrypt in a downloaded table of {table.entry_count} "
          f"entries: {per:.1f} us per tag")


_W: dict[str, object] = {}


def _init_worker(key: bytes, blob: bytes) -> None:
    _W["table"] = Table.from_bytes(blob)
    _W["key"] = key


def _batch_chunk(ids: list[bytes]) -> int:
    table = _W["table"]
    key = _W["key"]
    assert isinstance(table, Table) and isinstance(key, bytes)
    r, s = oprf.new_blinding_pair()
    evaluated = oprf.evaluate(key, oprf.blind(r, ids))  # owner's share of the work
    pairs = oprf.unblind_derive_job(s, table.table_id, evaluated)
    return sum(x is not None for x in table.open(pairs))


def section_batch(args: argparse.Namespace, state: dict[str, object]) -> None:
    owner = _owner(args, state)
    users = state["users"]
    assert isinstance(users, dict)
    refs = list(users)
    n = min(args.leads, 4 * len(refs))
    leads = [users[refs[i % len(refs)]][0][i // len(refs) % 2] for i in range(n)]
    table = Table.from_bytes(owner.current.to_bytes())
    # per-party costs on one core, over whole sessions of args.batch leads
    q_time = o_time = 0.0
    matched = 0
    for i in range(0, n, args.batch):
        chunk = leads[i : i + args.batch]
        sid = os.urandom(16)
        q = AnonymousQuerier.batch(chunk, table, session_id=sid)
        o = AnonymousQueryOwner(owner, querier_id="bench", session_id=sid)
        t0 = time.perf_counter()
        msg = q.start()
        t1 = time.perf_counter()
        reply = o.handle(msg)
        t2 = time.perf_counter()
        q.handle(reply)  # type: ignore[arg-type]
        t3 = time.perf_counter()
        q_time += (t1 - t0) + (t3 - t2)
        o_time += t2 - t1
        matched += len(q.result.labels)
    print(f"[batch] {n} leads (1 identifier each), sessions of {args.batch}: "
          f"{matched} matched")
    print(f"[batch] per lead on one core: owner {o_time / n * 1e6:.1f} us "
          f"({n / o_time:,.0f} leads/s), querier {q_time / n * 1e6:.1f} us "
          f"({n / q_time:,.0f} leads/s); serial both parties {n / (q_time + o_time):,.0f} leads/s")
    print(f"[batch] the querier bounds throughput: {q_time / o_time:.1f}x the owner's work "
          f"(2 X25519 + hash to curve + KDF + lookup vs 1 X25519)")
    chunks = [leads[i : i + args.batch] for i in range(0, n, args.batch)]
    with ProcessPoolExecutor(args.processes, initializer=_init_worker,
                             initargs=(owner.key, owner.current.to_bytes())) as pool:
        list(pool.map(_batch_chunk, [leads[:8]] * args.processes))
        t = time.perf_counter()
        got = sum(pool.map(_batch_chunk, chunks))
        dt = time.perf_counter() - t
    print(f"[batch] end to end, both parties sharing {args.processes} processes: "
          f"{n / dt:,.0f} leads/s ({got} matched); querier alone on {args.processes} cores "
          f"would reach about {args.processes * n / q_time:,.0f} leads/s")


SECTIONS: dict[str, Callable[[argparse.Namespace, dict[str, object]], None]] = {
    "build": section_build,
    "lookup": section_lookup,
    "batch": section_batch,
}
DEFAULT_SECTIONS = "build,lookup,batch"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--sections", default=DEFAULT_SECTIONS,
                   help=f"comma-separated from {', '.join(SECTIONS)} (default {DEFAULT_SECTIONS})")
    p.add_argument("--keys", type=int, default=100_000, help="table size in keys")
    p.add_argument("--min-bucket", type=int, default=1000, help="minimum bucket size")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--lookups", type=int, default=300, help="real-time sessions to time")
    p.add_argument("--leads", type=int, default=40_000, help="leads for the batch section")
    p.add_argument("--batch", type=int, default=2000, help="leads per batch session")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s): {', '.join(unknown)}")
    state: dict[str, object] = {}
    for name in names:
        SECTIONS[name](args, state)


if __name__ == "__main__":
    main()
