"""Benchmark: PSI n x n, our fast mode between two real nodes vs. openmined-psi vs. the bound.

For each n (``--sizes``, default 10^4,10^5,10^6; ``--large`` adds 10^7), in one run:

1. **bound**, measured right before each size so it sees the same machine load: this
   machine's X25519 rate on all cores (one process per core) through the exact primitive
   the protocol uses (``protocols.psi.ecdh.scalarmult_packed``: libsodium in a loop), as
   multiplications per wall second and CPU seconds per multiplication. Ours costs two
   multiplications per element at each party and both parties share the cores here, so
   ``bound = 4 n / rate``.
2. **ours**: two node processes (OEM and media platform) on loopback with mutual TLS; each
   holds n phone numbers (half shared) ingested before the clock starts; the clock covers
   a ``match`` query in *cardinality* mode on the phone column (submit -> completed, from
   the node's own timestamps: proposal, approval, one streamed bucketed ECDH PSI session
   with both nodes' process pools, result). While it runs, every node's CPU counters are
   sampled from /proc every 0.1 s: CPU seconds of the node process and of its worker
   processes (utime + stime, reaped children included), against the CPU the
   multiplications alone need (``2 n`` x CPU per multiplication) and the hash-to-curve
   (``n`` x its CPU, measured here); the rest is overhead (lifecycle, partition, framing,
   TLS, pickling, shuffles, comparisons). The samples also split the wall time into setup
   (no PSI worker busy yet), the PSI phase and a tail, with the share of the cores the two
   nodes used during the PSI phase and the share used by anything (other jobs). Peak
   memory: VmHWM (what ``ru_maxrss`` reports) of each node process and its largest
   worker, reset before the query so the dataset upload does not count, and the node's
   growth over its resident size before the query per element (``B/item``; at small n it
   is mostly the fixed cost of a node's first query: modules, threads, the worker pool).
3. **openmined-psi** in this process on the same sets: server setup (GCS, fpr 1e-9),
   client request, server response, client intersection size.

Prints per size the CPU breakdown and the ratios ``bound / ours`` (target >= 0.8 at
10^6) and ``openmined / ours`` (target >= 3 at 10^6), and a summary table. Reads nothing of
any node but its own timing, CPU and memory counters; the sets are synthetic. On a busy
machine the wall-time ratios mean little; the CPU columns still do.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
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


def _mults(seconds: float) -> tuple[int, float]:
    """X25519 multiplications for ``seconds`` of wall time, through the exact primitive the
    protocol uses (:func:`protocols.psi.ecdh.scalarmult_packed`: libsodium's
    ``crypto_scalarmult`` in a loop): (count, CPU seconds)."""
    from protocols.psi import ecdh, h2c

    k = ecdh.new_scalar()
    points = h2c.encode_many([secrets.token_bytes(12) for _ in range(500)], ecdh.h2c_dst(bytes(16)))
    n = 0
    c0 = time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        ecdh.scalarmult_packed(k, points)
        n += 500
    return n, time.process_time() - c0


@dataclass(frozen=True)
class Rate:
    """X25519 on all cores: multiplications per wall second, and CPU seconds per multiplication."""

    per_second: float
    cpu_per_mult: float


def x25519_rate(seconds: float = 2.0) -> Rate:
    cores = os.cpu_count() or 1
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(_mults, [0.05] * cores))  # start the workers before the clock
        t0 = time.perf_counter()
        runs = list(pool.map(_mults, [seconds] * cores))
        elapsed = time.perf_counter() - t0
    total = sum(n for n, _ in runs)
    return Rate(total / elapsed, sum(c for _, c in runs) / total)


def h2c_cpu_per_item(n: int = 20_000) -> float:
    """CPU seconds of one hash-to-curve (the protocol's fast path), in this process."""
    from protocols.psi import ecdh, h2c

    msgs = [f"+86139{i:08d}".encode() for i in range(n)]
    c0 = time.process_time()
    h2c.encode_many(msgs, ecdh.h2c_dst(bytes(16)))
    return (time.process_time() - c0) / n


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


_TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _stat_cpu(pid: int) -> tuple[float, float]:
    """(own utime + stime, reaped children's cutime + cstime) of ``pid`` in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    # fields[0] is the state (stat field 3): utime is field 14, so index 11 here
    own = (int(fields[11]) + int(fields[12])) / _TICK
    reaped = (int(fields[13]) + int(fields[14])) / _TICK
    return own, reaped


def cpu_of(pid: int) -> tuple[float, float]:
    """CPU seconds so far of a node process: (its own, its worker processes' incl. reaped)."""
    own, reaped = _stat_cpu(pid)
    workers = reaped
    for child in _children(pid):
        c_own, c_reaped = _stat_cpu(child)
        workers += c_own + c_reaped
    return own, workers


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM of a node process and its workers (``clear_refs`` 5), so the next
    reading is the peak of the query alone, not of the dataset upload before it."""
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_rss_mib(pid: int) -> tuple[float, float]:
    """Peak resident memory (VmHWM, what ``ru_maxrss`` reports) of the node process and of
    its largest worker, MiB."""
    workers = [_status_kib(c, "VmHWM:") for c in _children(pid)]
    return _status_kib(pid, "VmHWM:") / 1024, max(workers, default=0) / 1024


class Sampler:
    """Samples every node's CPU counters every ``period`` seconds while a query runs."""

    def __init__(self, pids: dict[str, int], period: float = 0.1) -> None:
        self.pids = pids
        self.period = period
        self.samples: list[tuple[float, dict[str, tuple[float, float]]]] = []
        self.machine: list[tuple[int, int]] = []  # /proc/stat: (all jiffies, idle jiffies)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _snap(self) -> None:
        self.samples.append((time.perf_counter(),
                             {n: cpu_of(pid) for n, pid in self.pids.items()}))
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        self.machine.append((sum(ticks), ticks[3] + ticks[4]))  # idle + iowait

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._snap()

    def __enter__(self) -> Sampler:
        self._snap()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._snap()

    def phases(self) -> dict[str, float]:
        """Wall seconds before any PSI worker ran (query setup), with workers running, and
        after; during the worker phase, the share of all cores our two nodes used
        (``busy``) and the share used by anything (``machine``: other jobs included)."""
        s = self.samples
        t0 = s[0][0]

        def workers(i: int) -> float:
            return sum(w for _, w in s[i][1].values())

        def total(i: int) -> float:
            return sum(o + w for o, w in s[i][1].values())

        active = [i for i in range(1, len(s)) if workers(i) - workers(i - 1) > 0.005]
        if not active:
            return {"setup": s[-1][0] - t0, "psi": 0.0, "tail": 0.0, "busy": 0.0,
                    "machine": 0.0}
        first, last = active[0] - 1, active[-1]
        psi = s[last][0] - s[first][0]
        cores = os.cpu_count() or 1
        (all0, idle0), (all1, idle1) = self.machine[first], self.machine[last]
        return {"setup": s[first][0] - t0, "psi": psi, "tail": s[-1][0] - s[last][0],
                "busy": (total(last) - total(first)) / (psi * cores) if psi else 0.0,
                "machine": 1 - (idle1 - idle0) / max(1, all1 - all0)}


def start_nodes(base: Path) -> dict[str, NodeProcess]:
    nodes = {p: make_node(base, p, p) for p in ("oem", "media")}
    pin_each_other(*nodes.values())
    for name, node in nodes.items():
        peer = "media" if name == "oem" else "oem"
        (node.dir / "policy.toml").write_text(POLICY.format(peer=peer), encoding="utf-8")
        node.start(env={"CLEANROOM_WITNESS_INTERVAL_SECONDS": "0"})
    return nodes


@dataclass
class Run:
    """One ``match`` query between the nodes: wall time, CPU per node, phases, memory."""

    seconds: float
    cardinality: int
    cpu: dict[str, tuple[float, float]] = field(default_factory=dict)  # node: (own, workers)
    phases: dict[str, float] = field(default_factory=dict)
    peak_mib: dict[str, tuple[float, float]] = field(default_factory=dict)  # node: (own, worker)
    base_mib: dict[str, float] = field(default_factory=dict)  # node process RSS before


def ours(nodes: dict[str, NodeProcess], base: Path, a: list[str], b: list[str]) -> Run:
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
    pids = {n: node.proc.pid for n, node in nodes.items() if node.proc}
    before = {n: _status_kib(pid, "VmRSS:") / 1024 for n, pid in pids.items()}
    for pid in pids.values():
        reset_peak_rss(pid)
    with nodes["oem"].operator_client(timeout=600) as c:
        with Sampler(pids) as sampler:
            t0 = time.perf_counter()
            qid = c.post_json("/v1/queries", spec)["id"]
            while True:
                q = c.get_json(f"/v1/queries/{qid}")
                if q["state"] in {"completed", "failed", "denied", "cancelled", "timed_out"}:
                    break
                # Polling costs the node CPU (TLS, database): poll slowly and take the
                # time from the node's own created/updated stamps instead.
                time.sleep(0.25)
            elapsed = time.perf_counter() - t0
            stamped = (datetime.fromisoformat(q["updated_at"])
                       - datetime.fromisoformat(q["created_at"])).total_seconds()
            if 0 < stamped <= elapsed:
                elapsed = stamped
        if q["state"] != "completed":
            raise SystemExit(f"match query ended {q['state']}: {q.get('error')}")
        res = c.get_json(f"/v1/queries/{qid}/result")["result"]
    first, last = sampler.samples[0][1], sampler.samples[-1][1]
    cpu = {n: (last[n][0] - first[n][0], last[n][1] - first[n][1]) for n in pids}
    return Run(elapsed, int(res["per_key"]["phone"]), cpu, sampler.phases(),
               {n: peak_rss_mib(pid) for n, pid in pids.items()}, before)


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
    h2c_cpu = h2c_cpu_per_item()
    cores = os.cpu_count() or 1
    summary: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_psi_") as tmp:
        base = Path(tmp)
        nodes = start_nodes(base)
        try:
            for n in sizes:
                a, b = make_sets(n)
                rate = x25519_rate()  # right before the run: same conditions as the run
                run = ours(nodes, base, a, b)
                if run.cardinality != n // 2:
                    raise SystemExit(f"wrong cardinality {run.cardinality} for n={n}")
                bound = 4 * n / rate.per_second
                om = ratio_om = "-"
                if not args.skip_openmined:
                    t_om, size = openmined(a, b)
                    if size < n // 2:
                        raise SystemExit(f"openmined-psi size {size} for n={n}")
                    om, ratio_om = f"{t_om:.2f}", f"{t_om / run.seconds:.2f}"
                mult = 2 * n * rate.cpu_per_mult  # each party: two multiplications per element
                h2c_s = n * h2c_cpu
                ph = run.phases
                print(f"\nn = {n:,}: X25519 on {cores} cores {rate.per_second:,.0f}/s "
                      f"({rate.cpu_per_mult * 1e6:.1f} us CPU each), hash-to-curve "
                      f"{h2c_cpu * 1e6:.1f} us CPU each")
                print(f"  wall {run.seconds:.2f} s = setup (no PSI worker busy) {ph['setup']:.2f}"
                      f" + PSI {ph['psi']:.2f} + tail {ph['tail']:.2f}; cores busy during PSI "
                      f"{ph['busy']:.0%} by the two nodes, {ph['machine']:.0%} by anything")
                print(f"  {'node':<6} {'node CPU s':>10} {'workers CPU s':>13} {'total':>7} "
                      f"{'mults CPU':>9} {'h2c CPU':>8} {'rest':>7} {'total/mults':>11} "
                      f"{'MiB node before/peak, worker peak':>34} {'B/item':>6}")
                for name, (own, workers) in run.cpu.items():
                    total = own + workers
                    pk, before = run.peak_mib[name], run.base_mib[name]
                    print(f"  {name:<6} {own:>10.2f} {workers:>13.2f} {total:>7.2f} "
                          f"{mult:>9.2f} {h2c_s:>8.2f} {total - mult - h2c_s:>7.2f} "
                          f"{total / mult:>11.2f} {before:>15.0f}/{pk[0]:<6.0f} {pk[1]:>11.0f} "
                          f"{(pk[0] - before) * 2**20 / n:>6.0f}")
                summary.append(f"{n:>10} {run.seconds:>9.2f} {bound:>9.2f} "
                               f"{bound / run.seconds:>10.2f} {om:>12} {ratio_om:>8}")
                print(f"  ours {run.seconds:.2f} s, bound {bound:.2f} s: bound/ours "
                      f"{bound / run.seconds:.2f}; openmined-psi {om} s: openmined/ours "
                      f"{ratio_om}", flush=True)
        finally:
            for node in nodes.values():
                node.stop()
    print(f"\n{'n':>10} {'ours s':>9} {'bound s':>9} {'bound/ours':>10} {'openmined s':>12} "
          f"{'om/ours':>8}")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
