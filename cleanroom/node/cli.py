"""``cleanroom node ...`` and ``cleanroom dataset ...`` subcommands.

``node init|show|start``, ``node peer add|list|remove|check``, ``dataset add|list``. The
dataset commands work on the node's database and data directory directly (the running
node, if any, sees the new version at once); the same operations exist in the operator
API. Output names files, columns and counts, never identifier values.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cleanroom.node.config import PARTIES


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = sub.add_parser("node", help="set up, inspect and run this organisation's node")
    nsub = node.add_subparsers(dest="node_command", metavar="ACTION", required=True)

    p = nsub.add_parser("init", help="create identity, config, operator token and policy")
    p.add_argument("--party", required=True, choices=PARTIES)
    p.add_argument("--name", required=True, help="this node's name, as partners will pin it")
    p.add_argument("--dir", required=True, type=Path, help="node directory (NODE_DIR)")
    p.add_argument("--listen", default="0.0.0.0:8443", help="HOST:PORT (default 0.0.0.0:8443)")
    p.add_argument("--public-url", help="https://HOST:PORT partners use to reach this node")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in NODE_DIR)")
    p.set_defaults(func=_init)

    p = nsub.add_parser("show", help="print certificate path, fingerprint and settings")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_show)

    p = nsub.add_parser("start", help="run the node's HTTPS service (stop with SIGTERM)")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_start)

    peer = nsub.add_parser("peer", help="pin, list, remove and check partner nodes")
    psub = peer.add_subparsers(dest="peer_command", metavar="ACTION", required=True)
    p = psub.add_parser("add", help="pin a partner's certificate")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--url", required=True, help="https://HOST:PORT of the partner's node")
    p.add_argument("--cert", required=True, type=Path, help="the partner's node.pem")
    p.add_argument("--party", choices=PARTIES, help="default: taken from the certificate")
    p.add_argument(
        "--fingerprint", help="fingerprint the partner gave you out of band; checked if given"
    )
    p.set_defaults(func=_peer_add)
    p = psub.add_parser("list", help="list pinned peers")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_peer_list)
    p = psub.add_parser("remove", help="unpin a peer (a running node refuses it at once)")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--name", required=True)
    p.set_defaults(func=_peer_remove)
    p = psub.add_parser("check", help="connect to a peer: identity, latency and throughput")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--bytes", type=int, default=4 * 1024 * 1024, help="probe size")
    p.set_defaults(func=_peer_check)

    ds = sub.add_parser("dataset", help="add and list this node's datasets")
    dsub = ds.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    p = dsub.add_parser("add", help="validate, normalise and store a CSV or Parquet file")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--file", required=True, type=Path)
    p.add_argument(
        "--id-columns",
        default="",
        help="identifier columns, e.g. phone,email,device_id or mobile:phone (default: none)",
    )
    p.add_argument("--format", choices=["csv", "tsv", "parquet"], help="default: from suffix")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_dataset_add)
    p = dsub.add_parser("list", help="datasets with schema and counts")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_dataset_list)


# --- node ----------------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    from cleanroom.node.admin import init_node
    from cleanroom.node.context import NodeContext
    from cleanroom.node.identity import format_fingerprint

    config = init_node(
        args.dir,
        name=args.name,
        party=args.party,
        listen=args.listen,
        public_url=args.public_url,
        database_url=args.database_url,
    )
    ctx = NodeContext.open(config.node_dir)
    print(f"node {config.name} ({config.party}) created in {config.node_dir}")
    print(f"  config:      {config.path}")
    print(f"  certificate: {ctx.identity.cert_path}   (give this file to your partners)")
    print(f"  fingerprint: {format_fingerprint(ctx.identity.fingerprint)}")
    print("               (read it to partners over a separate channel)")
    print(f"  private key: {ctx.identity.key_path}   (mode 0600, never share)")
    print(f"  operator token: {config.operator_token_file}   (mode 0600)")
    if config.policy_file is not None:
        print(f"  policy:      {config.policy_file}")
    else:
        print(f"  policy:      none (no default policy for {config.party} was found)")
    print(
        f"next: cleanroom node peer add --dir {args.dir} --name PEER --url https://HOST:PORT "
        "--cert PEER.pem; then cleanroom node start --dir " + str(args.dir)
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    from cleanroom.node.api_core import node_summary
    from cleanroom.node.context import NodeContext

    ctx = NodeContext.open(args.dir, init_database=False)
    info = node_summary(ctx)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"node         {info['name']} ({info['party']})")
    print(
        f"listen       {info['listen']}"
        + (f"  public {info['public_url']}" if info["public_url"] else "")
    )
    print(f"certificate  {info['certificate']}")
    print(f"fingerprint  {info['fingerprint_grouped']}")
    print(f"sha256       {info['fingerprint']}")
    print(f"signing key  ed25519 {info['public_key_ed25519']}")
    print(f"database     {info['database_url']}")
    print(f"data dir     {info['data_dir']}")
    print(f"policy       {info['policy_file'] or 'none'}")
    print(f"peers        {len(info['peers'])}")
    for p in info["peers"]:
        print(f"  {p['name']:<12} {p['party'] or '?':<7} {p['url']}  {p['fingerprint']}")
    return 0


def _start(args: argparse.Namespace) -> int:
    from cleanroom.node.server import serve

    return serve(args.dir, log_level=args.log_level)


def _peer_add(args: argparse.Namespace) -> int:
    from cleanroom.node.admin import add_peer
    from cleanroom.node.identity import format_fingerprint

    peer = add_peer(
        args.dir,
        name=args.name,
        url=args.url,
        cert_file=args.cert,
        party=args.party,
        fingerprint=args.fingerprint,
    )
    print(f"pinned peer {peer.name} ({peer.party or 'party unknown'}) at {peer.url}")
    print(f"  fingerprint {format_fingerprint(peer.fingerprint)}")
    if args.fingerprint is None:
        print("  compare it with the fingerprint the partner gave you out of band")
    return 0


def _peer_list(args: argparse.Namespace) -> int:
    from cleanroom.node.api_core import peer_summary
    from cleanroom.node.config import NodeConfig

    config = NodeConfig.load(args.dir)
    rows = [peer_summary(p) for p in config.peers]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no pinned peers")
    for p in rows:
        print(f"{p['name']:<12} {p['party'] or '?':<7} {p['url']}  {p['fingerprint']}")
    return 0


def _peer_remove(args: argparse.Namespace) -> int:
    from cleanroom.node.admin import remove_peer

    remove_peer(args.dir, args.name)
    print(f"removed peer {args.name}; a running node refuses it from its next request")
    return 0


def _peer_check(args: argparse.Namespace) -> int:
    import hashlib

    from cleanroom.node.context import NodeContext

    ctx = NodeContext.open(args.dir, init_database=False)
    with ctx.peer_client(args.name) as client:
        t0 = time.perf_counter()
        who = client.get_json("/v1/peer/whoami")
        rtt = time.perf_counter() - t0
        ident = client.get_json("/v1/peer/identity")
        block = bytes(64 * 1024)
        n = max(0, args.bytes)

        def chunks() -> Any:
            left = n
            while left > 0:
                yield block[: min(left, len(block))]
                left -= min(left, len(block))

        t0 = time.perf_counter()
        up = client.upload("/v1/peer/probe", chunks())
        t_up = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = 0
        h = hashlib.sha256()
        with client.download("/v1/peer/probe", params={"bytes": str(n)}) as stream:
            for c in stream:
                got += len(c)
                h.update(c)
        t_down = time.perf_counter() - t0
    print(f"peer {args.name}: node {who['node']} ({who['party']}) knows us as {who['you']!r}")
    print(f"  certificate fingerprint {ident['fingerprint']} (pinned: matches)")
    print(f"  round trip {rtt * 1000:.1f} ms (first call, includes TLS handshake)")
    mb = n / 1e6
    ok_up = up["bytes"] == n
    print(
        f"  upload   {mb:.1f} MB in {t_up:.2f} s ({mb / max(t_up, 1e-9):.1f} MB/s)"
        + ("" if ok_up else "  SIZE MISMATCH")
    )
    print(
        f"  download {got / 1e6:.1f} MB in {t_down:.2f} s ({got / 1e6 / max(t_down, 1e-9):.1f} "
        "MB/s)" + ("" if got == n else "  SIZE MISMATCH")
    )
    return 0 if ok_up and got == n else 1


# --- datasets ----------------------------------------------------------------------------------


def _dataset_add(args: argparse.Namespace) -> int:
    from cleanroom.node.context import NodeContext
    from cleanroom.node.datasets import add_dataset

    ctx = NodeContext.open(args.dir)
    t0 = time.perf_counter()
    report = add_dataset(ctx, args.name, args.file, args.id_columns, fmt=args.format)
    elapsed = time.perf_counter() - t0
    ledger_how = _record_dataset_event(ctx)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    prev = f" (replaces version {report.previous_version})" if report.previous_version else ""
    print(
        f"dataset {report.dataset} version {report.version}{prev}: {report.rows} rows, "
        f"{len(report.columns)} columns, stored in {elapsed:.1f} s"
    )
    for r in report.id_report:
        print(
            f"  {r['column']:<16} {r['kind']:<9} valid {r['valid']:>9}  missing "
            f"{r['missing']:>9}  invalid {r['invalid']:>9}"
        )
    if ledger_how == "node":
        print("  recorded in the audit ledger by the running node")
    elif ledger_how == "recorded":
        print("  recorded in the audit ledger")
    return 0


def _record_dataset_event(ctx: Any) -> str:
    """Record ``dataset_registered`` without a second ledger writer (see
    :func:`cleanroom.node.audit.record_outside_node`); warn on stderr if deferred."""
    import sys

    from cleanroom.node.audit import record_outside_node

    how = record_outside_node(ctx)
    if how == "deferred":
        print(
            "warning: the dataset is stored, but its audit-ledger entry could not be written "
            "now (the ledger is busy and the node's operator API did not answer); the node "
            "records it when it next starts",
            file=sys.stderr,
        )
    return how


def _dataset_list(args: argparse.Namespace) -> int:
    from cleanroom.node.context import NodeContext
    from cleanroom.node.datasets import datasets

    ctx = NodeContext.open(args.dir)
    infos = datasets(ctx)
    if args.json:
        print(json.dumps([d.as_dict() for d in infos], indent=2))
        return 0
    if not infos:
        print("no datasets")
    for d in infos:
        print(
            f"{d.name}  version {d.version} of {d.versions}  {d.rows} rows  "
            f"added {d.created_at:%Y-%m-%d %H:%M} UTC from {d.source_name}"
        )
        for c in d.columns:
            kind = f"  id:{c['id_kind']}" if c["id_kind"] else ""
            print(f"    {c['name']:<20} {c['type']}{kind}")
        for r in d.id_report:
            print(
                f"    {r['column']:<20} valid {r['valid']}  missing {r['missing']}  "
                f"invalid {r['invalid']}"
            )
    return 0
