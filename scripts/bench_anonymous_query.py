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

- ``tls`` (not in the default set): a media node as a real process serving a
  ``--tls-keys`` table over mutual TLS on loopback (the table is built once and cached
  under ``--workdir``; identifiers are synthetic), then real-time lookup latency p50/p99
  and lookups/s with 1, 8 and 32 concurrent clients (``--clients``; each client a closed
  loop of one-identifier sessions with its own keep-alive connection, clients spread over
  ``--client-processes`` processes), the Little's-law check (concurrency = throughput x
  mean latency), and batch-mode leads/s (table download once, then evaluation sessions of
  ``--batch`` leads with blinding/unblinding in ``--processes`` worker processes).
  Also, at the highest concurrency, the *transport floor*: the same load generator sending
  a lookup's two POSTs (same sizes) to a bare uvloop TLS server that returns fixed replies
  with no cryptography, ledger or framework, so ours / floor says how much of the gap to a
  throughput target the Python TLS and HTTP stack alone accounts for (``--no-floor`` skips).

Usage: ``python scripts/bench_anonymous_query.py [--keys 100000] [--sections build,batch]``;
``python scripts/bench_anonymous_query.py --sections tls --tls-keys 1000000 --workdir DIR``.
Prints figures and ratios; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# --- tls: a real node over loopback TLS -------------------------------------------------

TLS_TABLE = "bench"


def _tls_item(i: int) -> bytes:
    return b"\x01+86139%08d" % i


def _tls_nodes(workdir: Path) -> tuple[Any, Path]:
    """The media node (created once under ``workdir``) and the OEM node directory."""
    from cleanroom.node.admin import add_peer
    from cleanroom.node.context import NodeContext
    from cleanroom.node.launcher import NodeProcess, make_node

    nodes = workdir / "nodes"
    media_dir, oem_dir = nodes / "media", nodes / "oem"
    if not media_dir.exists():
        nodes.mkdir(parents=True, exist_ok=True)
        media = make_node(nodes, "media", "media")
        oem = make_node(nodes, "oem", "oem")
        add_peer(media.dir, name="oem", url=oem.url, cert_file=oem.cert_path, party="oem")
        add_peer(oem.dir, name="media", url=media.url, cert_file=media.cert_path,
                 party="media")
        policy = media.dir / "policy.toml"
        policy.write_text(policy.read_text().replace(
            "rate_limit = { max_queries = 500, per_hours = 24 }",
            "rate_limit = { max_queries = 1000000000, per_hours = 24 }", 1))
    cfg = NodeContext.open(media_dir).config
    return NodeProcess(name="media", party="media", dir=media_dir,
                       port=cfg.listen_port), oem_dir


def _tls_table(args: argparse.Namespace, media_dir: Path) -> None:
    from cleanroom.anonq import tables

    folder = tables.table_dir(media_dir / "data", TLS_TABLE)
    if (folder / tables.META_FILE).is_file():
        meta = tables.read_meta(folder)
        if meta.entry_count == args.tls_keys:
            print(f"[tls] reusing the cached {meta.entry_count:,}-key table in {folder}")
            return
    users = {f"u{i}": ((_tls_item(i),), os.urandom(56)) for i in range(args.tls_keys)}
    t = time.perf_counter()
    report = tables.publish(media_dir / "data", TLS_TABLE, users, label_size=56,
                            min_bucket_size=args.min_bucket, evaluation_budget=1 << 40,
                            rebuild=True, processes=args.processes)
    dt = time.perf_counter() - t
    print(f"[tls] built and stored {report.entries:,} keys in {dt:.1f} s "
          f"({report.entries / dt:,.0f} keys/s with {args.processes} processes), "
          f"{report.buckets:,} buckets, smallest {report.min_bucket}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Floor:
    """The bare TLS server's port and the sizes of a real lookup's two requests and replies."""

    port: int
    eval_request: int
    eval_reply: int
    bucket_request: int
    bucket_reply: int


def _floor_server(cert: str, key: str, trust_pem: bytes, port: int, eval_reply: int,
                  bucket_reply: int, ready: Any) -> None:
    """The transport floor: the node's server stack minus the node (uvloop, TLS 1.3 with
    client certificates), answering ``/eval`` and ``/buckets`` POSTs with fixed replies of a
    real lookup's sizes, parsing no more HTTP than that takes. No cryptography, no ledger,
    no framework: what is left is the cost of moving the bytes."""
    import asyncio
    import ssl

    import uvloop

    sslctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sslctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sslctx.load_cert_chain(cert, key)
    sslctx.verify_mode = ssl.CERT_REQUIRED
    sslctx.load_verify_locations(cadata=trust_pem.decode("ascii"))
    replies = {name: b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
               b"content-length: %d\r\n\r\n" % size + os.urandom(size)
               for name, size in ((b"/eval", eval_reply), (b"/buckets", bucket_reply))}

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buf = bytearray()

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while (end := self.buf.find(b"\r\n\r\n")) >= 0:
                head = bytes(self.buf[:end]).lower()
                at = head.index(b"content-length:") + 15
                length = int(head[at:head.find(b"\r\n", at) if b"\r\n" in head[at:] else None])
                if len(self.buf) < end + 4 + length:
                    return
                del self.buf[:end + 4 + length]
                self.transport.write(replies[head.split(b" ", 2)[1]])

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", port,
                                                                ssl=sslctx)
        ready.set()
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def _tls_worker(oem_dir: str, keys: int, threads: int, seconds: float, warmup: float,
                min_anon: int, seed: int, floor: Floor | None = None
                ) -> tuple[list[float], float, int]:
    """One load-generator process: ``threads`` closed-loop clients; latencies in s, and
    this process's CPU seconds per finished lookup and the number of finished lookups
    (whole run, warm-up included). With ``floor``, a "lookup" is the same two POSTs of the
    same sizes to the bare TLS server of :func:`_floor_server`, with no cryptography."""
    import random
    import threading

    from cleanroom.anonq.client import lookup_realtime
    from cleanroom.node.context import NodeContext

    ctx = NodeContext.open(Path(oem_dir), init_database=False)

    def one_lookup(pc: Any, rnd: random.Random) -> None:
        if floor is None:
            got = lookup_realtime(ctx, "media", TLS_TABLE, [_tls_item(rnd.randrange(keys))],
                                  min_anonymity=min_anon, client=pc)
            assert len(got) == 1
        else:
            assert len(pc.exchange("/eval", b"e" * floor.eval_request)) == floor.eval_reply
            assert len(pc.exchange("/buckets", b"b" * floor.bucket_request)) == floor.bucket_reply

    def connect() -> Any:
        if floor is None:
            return ctx.peer_client("media", retries=0)
        from cleanroom.transport import PeerClient

        return PeerClient(peer_name="floor", base_url=f"https://127.0.0.1:{floor.port}",
                          peer_cert_pem=ctx.peer("media").cert_pem,
                          own_cert_path=ctx.identity.cert_path,
                          own_key_path=ctx.identity.key_path, retries=0)
    out: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter()
    cpu0 = time.process_time()
    done = [0]

    def client(k: int) -> None:
        rnd = random.Random(seed * 1000 + k)
        mine: list[float] = []
        with connect() as pc:
            while True:
                t0 = time.perf_counter()
                if t0 - start > warmup + seconds:
                    break
                one_lookup(pc, rnd)
                t1 = time.perf_counter()
                if t0 - start >= warmup and t1 - start <= warmup + seconds:
                    mine.append(t1 - t0)
                with lock:
                    done[0] += 1
        with lock:
            out.extend(mine)

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return out, (time.process_time() - cpu0) / max(1, done[0]), done[0]


def _load_level(args: argparse.Namespace, mp: Any, oem_dir: Path, conc: int, server_pid: int,
                min_anon: int, tag: str, floor: Floor | None = None) -> float:
    """``conc`` closed-loop clients against the server for ``--tls-seconds``: prints
    lookups/s, latency, the Little's-law check and CPU per lookup; returns lookups/s."""
    procs = max(1, min(args.client_processes, conc))
    per = [conc // procs + (1 if i < conc % procs else 0) for i in range(procs)]
    with ProcessPoolExecutor(procs, mp_context=mp) as pool:
        list(pool.map(_tls_batch_chunk, [[b"x"]] * procs))  # workers up before timing
        cpu0, w0 = _cpu_seconds(server_pid), time.perf_counter()
        futs = [pool.submit(_tls_worker, str(oem_dir), args.tls_keys, n, args.tls_seconds,
                            args.tls_warmup, min_anon, i, floor)
                for i, n in enumerate(per)]
        results = [f.result() for f in futs]
        server_cpu = _cpu_seconds(server_pid) - cpu0
        wall = time.perf_counter() - w0
        lat = sorted(x for r in results for x in r[0])
        client_cpu = statistics.fmean(r[1] for r in results)
    if not lat:
        print(f"[{tag}] {conc:>2} clients: no lookup finished in the window")
        return 0.0
    rate = len(lat) / args.tls_seconds
    mean = statistics.fmean(lat)
    p50 = statistics.median(lat) * 1e3
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3
    print(f"[{tag}] {conc:>2} clients ({procs} processes): {rate:,.0f} lookups/s, "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, mean {mean * 1e3:.1f} ms; "
          f"Little: throughput x mean latency = {rate * mean:.1f} (concurrency {conc})")
    total = max(1, sum(r[2] for r in results))
    cores = os.cpu_count() or 1
    print(f"[{tag}] {conc:>2} clients: CPU per lookup: server {server_cpu / total * 1e3:.2f} ms "
          f"(busy {server_cpu / wall:.0%} of one core), load generator "
          f"{client_cpu * 1e3:.2f} ms; {cores} cores shared cap at about "
          f"{cores / (server_cpu / total + client_cpu):,.0f} lookups/s")
    return rate


def _floor(args: argparse.Namespace, mp: Any, ctx: Any, media_dir: Path, oem_dir: Path,
           conc: int, min_anon: int) -> float:
    """The transport floor at ``conc`` clients: one real lookup's request and reply sizes,
    then the same load generator against :func:`_floor_server` instead of the node."""
    import socket

    from cleanroom.anonq.client import lookup_realtime
    from cleanroom.node.context import NodeContext

    sizes: list[tuple[int, int]] = []
    with ctx.peer_client("media", retries=0) as pc:
        real = pc.exchange

        def measured(path: str, body: bytes, **kw: Any) -> bytes:
            reply = real(path, body, **kw)
            sizes.append((len(body), len(reply)))
            return reply

        pc.exchange = measured
        lookup_realtime(ctx, "media", TLS_TABLE, [_tls_item(0)], min_anonymity=min_anon,
                        client=pc)
    (eq, er), (bq, br) = sizes
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    media = NodeContext.open(media_dir, init_database=False).identity
    ready = mp.Event()
    server = mp.Process(target=_floor_server, daemon=True,
                        args=(str(media.cert_path), str(media.key_path), ctx.identity.cert_pem,
                              port, er, br, ready))
    server.start()
    try:
        if not ready.wait(60):
            print("[floor] the bare TLS server did not start")
            return 0.0
        print(f"[floor] a lookup's two POSTs: {eq} B -> {er} B and {bq} B -> {br:,} B, "
              f"against a bare uvloop TLS server (no cryptography, ledger or framework)")
        return _load_level(args, mp, oem_dir, conc, server.pid or -1, min_anon, "floor",
                           Floor(port, eq, er, bq, br))
    finally:
        server.terminate()
        server.join(10)


def _tls_batch_chunk(ids: list[bytes]) -> int:
    return len(ids)


def section_tls(args: argparse.Namespace, state: dict[str, object]) -> None:
    import multiprocessing

    from cleanroom.anonq.client import lookup_batch, sync_table
    from cleanroom.node.context import NodeContext

    workdir = Path(args.workdir)
    media, oem_dir = _tls_nodes(workdir)
    _tls_table(args, media.dir)
    t = time.perf_counter()
    media.start(timeout=600)
    print(f"[tls] media node up in {time.perf_counter() - t:.1f} s (loads the table), "
          f"{media.url}")
    try:
        ctx = NodeContext.open(oem_dir)
        info = _tls_info(ctx)
        min_anon = min(args.min_bucket, int(info["min_bucket_size"]))
        print(f"[tls] table: {info['entry_count']:,} keys, {info['bucket_count']:,} buckets "
              f"(min size {info['min_bucket_size']}), label {info['label_size']} B")
        mp = multiprocessing.get_context("spawn")
        node_pid = media.proc.pid if media.proc is not None else -1
        levels = [int(c) for c in args.clients.split(",") if c]
        ours = {conc: _load_level(args, mp, oem_dir, conc, node_pid, min_anon, "tls")
                for conc in levels}
        top = max(levels, default=0)
        if top and args.floor:
            floor_rate = _floor(args, mp, ctx, media.dir, oem_dir, top, min_anon)
            if floor_rate and ours.get(top):
                print(f"[tls] {top:>2} clients: ours {ours[top]:,.0f} lookups/s = "
                      f"{ours[top] / floor_rate:.2f} of the transport floor "
                      f"({floor_rate:,.0f}/s)")
        n = args.tls_batch_leads
        leads = [_tls_item((i * 7919) % args.tls_keys) for i in range(n)]
        t = time.perf_counter()
        local = sync_table(ctx, "media", TLS_TABLE)
        dt_dl = time.perf_counter() - t
        size = len(local.to_bytes())
        print(f"[tls] batch: table download {size / 1e6:,.0f} MB in {dt_dl:.1f} s "
              f"({size / 1e6 / dt_dl:,.0f} MB/s; once per table version, deltas after)")
        with ProcessPoolExecutor(args.processes, mp_context=mp) as pool:
            list(pool.map(_tls_batch_chunk, [[b"x"]] * args.processes))
            t = time.perf_counter()
            got = lookup_batch(ctx, "media", TLS_TABLE, leads, chunk=args.batch, local=local,
                               executor=pool)
            dt = time.perf_counter() - t
        print(f"[tls] batch: {n:,} leads in {dt:.2f} s = {n / dt:,.0f} leads/s over TLS "
              f"({len(got):,} matched; sessions of {args.batch}, {args.processes} worker "
              f"processes for the querier, the node evaluating in threads)")
        # The physical ceiling with both parties on this machine: every lead costs three
        # X25519 multiplications (querier blinds, owner evaluates, querier unblinds).
        rate = _x25519_rate_pool(60_000, os.cpu_count() or 1)
        ceiling = rate / 3
        print(f"[tls] batch: X25519 on all {os.cpu_count()} cores {rate:,.0f} mults/s -> "
              f"ceiling {ceiling:,.0f} leads/s (3 multiplications per lead, both parties "
              f"here); ours {n / dt / ceiling:.2f} of it; the 20,000 leads/s target is "
              f"{20_000 / ceiling:.2f} x the ceiling")
    finally:
        media.stop()


def _tls_info(ctx: Any) -> dict[str, Any]:
    from cleanroom.anonq.client import table_info

    return table_info(ctx, "media", TLS_TABLE)


SECTIONS: dict[str, Callable[[argparse.Namespace, dict[str, object]], None]] = {
    "build": section_build,
    "lookup": section_lookup,
    "batch": section_batch,
    "tls": section_tls,
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
    p.add_argument("--workdir", default="bench-anonq", help="tls: node dirs and cached table")
    p.add_argument("--tls-keys", type=int, default=10_000_000, help="tls: table size in keys")
    p.add_argument("--clients", default="1,8,32", help="tls: concurrency levels")
    p.add_argument("--client-processes", type=int, default=4,
                   help="tls: load-generator processes (clients are threads in them)")
    p.add_argument("--tls-seconds", type=float, default=10.0, help="tls: window per level")
    p.add_argument("--tls-warmup", type=float, default=2.0, help="tls: warm-up per level")
    p.add_argument("--tls-batch-leads", type=int, default=100_000, help="tls: batch leads")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="tls: skip the transport floor (bare TLS server) measurement")
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
