"""Benchmark: PSI n x n, our fast mode between two real nodes vs. openmined-psi vs. the bound.

For each n (``--sizes``, default 10^4,10^5,10^6; ``--large`` adds 10^7), in one run:

1. **ours**: two node processes (OEM and media platform) on loopback with mutual TLS; each
   holds n phone numbers (half shared) ingested before the clock starts; the clock covers
   a ``match`` query in *cardinality* mode on the phone column (submit -> completed:
   proposal, approval, one streamed bucketed ECDH PSI session with both nodes' process
   pools, result). Peak memory = VmHWM of each node process and its PSI workers.
2. **openmined-psi** in this process on the same sets: server setup (GCS, fpr 1e-9),
   client request, server response, client intersection size.
3. **bound**: this machine's X25519 scalar-multiplication rate on all cores (one process
   per core, libsodium via PyNaCl); ours costs two multiplications per element at each
   party, and both parties share the cores here, so ``bound = 4 n / rate``.

Prints a table and the ratios ``bound / ours`` (target >= 0.8 at 10^6) and
``openmined / ours`` (target >= 3 at 10^6). Reads nothing of any node but its own
timing and memory counters; the sets are synthetic. Don't run it on a busy machine and
expect stable figures.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from cleanroom.node.launcher import NodeProcess, make_node, pin_each_other  # noqa: E402

POLICY = """
version = 1
[limits]
min_intersection_size = 1
min_group_size = 1
[partners.{peer}]
query_types = ["match"]
purposes = ["bench"]
psi_reveal = ["intersection", "cardinality"]
[datasets.ids.columns]
phone = ["join_key"]
"""


def _mults(seconds: float) -> int:
    from nacl.bindings import crypto_scalarmult

    k = secrets.token_bytes(32)
    p = bytes([9]) + bytes(31)
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(200):
            p = crypto_scalarmult(k, p)
        n += 200
    return n


def x25519_rate(seconds: float = 2.0) -> float:
    cores = os.cpu_count() or 1
    with ProcessPoolExecutor(cores) as pool:
        t0 = time.perf_counter()
        total = sum(pool.map(_mults, [seconds] * cores))
        elapsed = time.perf_counter() - t0
    return total / elapsed


def make_sets(n: int) -> tuple[list[str], list[str]]:
    shared = n // 2
    a = [f"+86138{i:08d}" for i in range(n)]
    b = [f"+86138{i:08d}" for i in range(n - shared, 2 * n - shared)]
    return a, b


def openmined(a: list[str], b: list[str]) -> tuple[float, int]:
    import private_set_intersection.python as psi

    t0 = time.perf_counter()
    server = psi.server.CreateWithNewKey(False)
    client = psi.client.CreateWithNewKey(False)
    setup = server.CreateSetupMessage(1e-9, len(a), b, psi.DataStructure.GCS)
    request = client.CreateRequest(a)
    response = server.ProcessRequest(request)
    size = int(client.GetIntersectionSize(setup, response))
    return time.perf_counter() - t0, size


def _hwm_kib(pid: int) -> int:
    total = 0
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def start_nodes(base: Path) -> dict[str, NodeProcess]:
    nodes = {p: make_node(base, p, p) for p in ("oem", "media")}
    pin_each_other(*nodes.values())
    for name, node in nodes.items():
        peer = "media" if name == "oem" else "oem"
        (node.dir / "policy.toml").write_text(POLICY.format(peer=peer), encoding="utf-8")
        node.start(env={"CLEANROOM_WITNESS_INTERVAL_SECONDS": "0"})
    return nodes


def ours(nodes: dict[str, NodeProcess], base: Path, a: list[str], b: list[str]
         ) -> tuple[float, int, dict[str, int]]:
    for name, items in (("oem", a), ("media", b)):
        path = base / f"{name}.parquet"
        pd.DataFrame({"phone": items}).to_parquet(path, index=False)
        with nodes[name].operator_client(timeout=600) as c:
            c.upload("/v1/datasets/ids/versions", path.read_bytes(),
                     params={"id_columns": "phone", "format": "parquet"})
    spec = {"version": 1, "type": "match", "requester": "oem", "counterparties": ["media"],
            "purpose": "bench", "receiver": "oem",
            "inputs": {"oem": [{"dataset": "ids", "columns": {"phone": "join_key"}}],
                       "media": [{"dataset": "ids", "columns": {"phone": "join_key"}}]},
            "params": {"psi_reveal": "cardinality", "timeout_seconds": 3600}}
    with nodes["oem"].operator_client(timeout=600) as c:
        t0 = time.perf_counter()
        qid = c.post_json("/v1/queries", spec)["id"]
        while True:
            q = c.get_json(f"/v1/queries/{qid}")
            if q["state"] in {"completed", "failed", "denied", "cancelled", "timed_out"}:
                break
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        if q["state"] != "completed":
            raise SystemExit(f"match query ended {q['state']}: {q.get('error')}")
        res = c.get_json(f"/v1/queries/{qid}/result")["result"]
    mem = {n: _hwm_kib(node.proc.pid) for n, node in nodes.items() if node.proc}
    return elapsed, int(res["per_key"]["phone"]), mem


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000",
                    help="comma-separated n values (default 10^4,10^5,10^6)")
    ap.add_argument("--large", action="store_true", help="add n = 10^7")
    ap.add_argument("--skip-openmined", action="store_true")
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    if args.large:
        sizes.append(10_000_000)
    rate = x25519_rate()
    print(f"X25519 scalar multiplications on {os.cpu_count()} cores: {rate:,.0f}/s")
    print(f"{'n':>10} {'ours s':>9} {'bound s':>9} {'bound/ours':>10} {'openmined s':>12} "
          f"{'om/ours':>8} {'peak MiB oem/media':>20}")
    with tempfile.TemporaryDirectory(prefix="bench_psi_") as tmp:
        base = Path(tmp)
        nodes = start_nodes(base)
        try:
            for n in sizes:
                a, b = make_sets(n)
                t_ours, card, mem = ours(nodes, base, a, b)
                if card != n // 2:
                    raise SystemExit(f"wrong cardinality {card} for n={n}")
                bound = 4 * n / rate
                om = "-"
                ratio_om = "-"
                if not args.skip_openmined:
                    t_om, size = openmined(a, b)
                    if size < n // 2:
                        raise SystemExit(f"openmined-psi size {size} for n={n}")
                    om = f"{t_om:.2f}"
                    ratio_om = f"{t_om / t_ours:.2f}"
                print(f"{n:>10} {t_ours:>9.2f} {bound:>9.2f} {bound / t_ours:>10.2f} "
                      f"{om:>12} {ratio_om:>8} "
                      f"{mem.get('oem', 0) / 1024:>9.0f}/{mem.get('media', 0) / 1024:<9.0f}",
                      flush=True)
        finally:
            for node in nodes.values():
                node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
