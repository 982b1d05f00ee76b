"""``cleanroom audit verify`` and ``cleanroom audit report``.

- ``audit verify --dir NODE_DIR [--peers] [--json] [--deep] [--log-key VKEY]...``: verify
  the node's ledger read-only; with ``--peers`` also ask every pinned peer for its latest
  checkpoint and a consistency proof (over the node transport, :mod:`audits.peers`).
  Exit 0 only when everything holds; 1 when something does not (the first bad entry
  index and what is wrong are printed); 2 when the audit cannot run (CleanroomError,
  reported by :mod:`cleanroom.cli`).
- ``audit report --dir NODE_DIR --out report.html [--since T] [--until T]``: write the
  self-contained HTML report. It is written even when verification fails (the report says
  so on top), and the exit code follows verification as for ``verify``.

The output file is written to a temporary file next to it and renamed, so a failure never
leaves a half-written report. Nothing here writes to the node directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cleanroom.errors import InputError

if TYPE_CHECKING:
    from cleanroom.ledger import NoteVerifier

EXIT_OK = 0
EXIT_FAILED = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="verify the audit ledger and write compliance reports")
    asub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    p = asub.add_parser("verify", help="recompute the ledger tree, check every signature, "
                        "cosignature and (--peers) peer consistency; exit 0 only if all hold")
    p.add_argument("--dir", required=True, type=Path, help="node directory (NODE_DIR)")
    p.add_argument("--peers", action="store_true",
                   help="also fetch each pinned peer's checkpoint and check consistency")
    p.add_argument("--deep", action="store_true",
                   help="also re-parse every entry against the schema (about 10x slower)")
    p.add_argument("--log-key", action="append", default=[], metavar="VKEY",
                   help="a former key of this node's log (C2SP vkey), after a key rotation")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_verify)

    p = asub.add_parser("report", help="write a self-contained HTML report for a reviewer")
    p.add_argument("--dir", required=True, type=Path, help="node directory (NODE_DIR)")
    p.add_argument("--out", required=True, type=Path, help="the HTML file to write")
    p.add_argument("--since", help="start (inclusive): ISO 8601 or epoch milliseconds")
    p.add_argument("--until", help="end (exclusive; a date alone includes that day)")
    p.add_argument("--log-key", action="append", default=[], metavar="VKEY",
                   help="a former key of this node's log (C2SP vkey)")
    p.set_defaults(func=_report)


def _log_keys(values: list[str]) -> list[NoteVerifier]:
    from cleanroom.ledger import NoteVerifier, VerificationError

    out: list[NoteVerifier] = []
    for v in values:
        try:
            out.append(NoteVerifier.from_vkey(v))
        except VerificationError:
            raise InputError(f"--log-key {v!r}: not a verifier key name+hexid+base64") from None
    return out


def _verify(args: argparse.Namespace) -> int:
    from audits.verify import verify_node

    fetch = None
    if args.peers:
        from audits.peers import transport_fetcher
        from cleanroom.node.config import NodeConfig

        fetch = transport_fetcher(NodeConfig.load(args.dir))
    result = verify_node(args.dir, peers=args.peers, fetch_peer_checkpoint=fetch,
                         log_keys=_log_keys(args.log_key), deep=args.deep)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.summary())
    if result.ok:
        return EXIT_OK
    if args.json:
        print("cleanroom audit verify: FAILED: " + result.failure_lines()[0], file=sys.stderr)
    return EXIT_FAILED


def _report(args: argparse.Namespace) -> int:
    from audits.report import parse_time, report_for_node
    from audits.verify import verify_node

    since = None if args.since is None else parse_time(args.since, option="--since")
    until = None if args.until is None else parse_time(args.until, option="--until", end=True)
    if since is not None and until is not None and since >= until:
        raise InputError(f"--since {args.since!r} is not before --until {args.until!r}")
    out: Path = args.out
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory; give a file name such as report.html")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: directory {out.parent} does not exist")
    audit = verify_node(args.dir, log_keys=_log_keys(args.log_key))
    html, audit = report_for_node(args.dir, since_ms=since, until_ms=until, audit=audit)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(html)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write the report ({exc.strerror})", file=str(out)) from None
    print(f"report written to {out} ({len(html.encode('utf-8')):,} bytes)")
    if audit.ok:
        return EXIT_OK
    print("cleanroom audit report: ledger verification FAILED: " + audit.failure_lines()[0],
          file=sys.stderr)
    return EXIT_FAILED
