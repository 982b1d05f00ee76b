"""``cleanroom query ...``: submit, list, show, result, approve, deny, cancel.

Every command talks to the running node's operator API with the node's own certificate
and operator token (``--dir NODE_DIR``); nothing here touches the database directly.
Output shows states, rule names, fields and counts; the result only at the receiver.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cleanroom.errors import CleanroomError, InputError

TERMINAL = {"completed", "denied", "failed", "cancelled", "timed_out"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("query", help="submit joint queries and manage their lifecycle")
    qsub = q.add_subparsers(dest="query_command", metavar="ACTION", required=True)

    p = qsub.add_parser("submit", help="submit a query spec (JSON) to this node")
    p.add_argument("--dir", required=True, type=Path, help="node directory (NODE_DIR)")
    p.add_argument("--spec", required=True, type=Path, help="query spec file (JSON)")
    p.add_argument("--dry-run", action="store_true",
                   help="only ask whether every party's policy would allow it")
    p.add_argument("--wait", action="store_true", help="wait until the query ends")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to --wait at most")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_submit)

    p = qsub.add_parser("list", help="queries at this node")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--state", help="only queries in this state")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)

    p = qsub.add_parser("show", help="one query: state, decisions, error, history")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_show)

    p = qsub.add_parser("result", help="the result of a completed query (at its receiver)")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("id")
    p.add_argument("--out", type=Path, help="write the result JSON to this file")
    p.set_defaults(func=_result)

    for name, text in (("approve", "approve a query held for this node's operator"),
                       ("deny", "deny a query held for this node's operator"),
                       ("cancel", "cancel a query this node requested")):
        p = qsub.add_parser(name, help=text)
        p.add_argument("--dir", required=True, type=Path)
        p.add_argument("id")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_action, action=name)


def _client(node_dir: Path) -> Any:
    from cleanroom.node.context import NodeContext

    ctx = NodeContext.open(node_dir, init_database=False)
    return ctx.operator_client(retries=1)


def _print_query(q: dict[str, Any]) -> None:
    print(f"query {q['id']}  {q['state']}")
    print(f"  type {q['type']}, requester {q['requester']}, counterparties "
          f"{', '.join(q['counterparties'])}, receiver {q['receiver']}, purpose {q['purpose']}")
    print(f"  role here: {q['role']}; created {q['created_at']}; deadline {q['deadline_at']}")
    for d in q.get("decisions", []):
        why = f" by rule {d['rule']} on field {d['field']}" if d["outcome"] != "approved" else ""
        print(f"  decision of {d['party']}: {d['outcome']}{why} ({d['decided_by']})")
    err = q.get("error")
    if err:
        where = ""
        if err.get("rule"):
            where = f" rule {err['rule']}" + (f", field {err['field']}" if err.get("field") else "")
        print(f"  {q['state']}: {err.get('code')}{where}: {err.get('message')}")
    if q.get("result"):
        r = q["result"]
        print(f"  result: {r['rows']} row(s), digest {r['digest']}"
              + ("" if r.get("here") else f" (held by {q['receiver']})"))


def _submit(args: argparse.Namespace) -> int:
    try:
        text = args.spec.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read the spec: {exc.strerror}", file=str(args.spec)) from None
    from cleanroom.policy import parse_spec

    spec = parse_spec(text, source=str(args.spec))  # clear errors before any network call
    with _client(args.dir) as client:
        if args.dry_run:
            body = json.loads(spec.canonical_bytes())
            report = client.post_json("/v1/queries?dry_run=true", body)
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                verdict = "would pass" if report["would_pass"] else "would NOT pass"
                print(f"dry run: the spec {verdict} every party's policy")
                for d in report["decisions"]:
                    why = "" if d["outcome"] == "approved" else (
                        f": rule {d['rule']}, field {d['field']}: {d['reason']}")
                    print(f"  {d['party']}: {d['outcome']}{why}")
            return 0 if report["would_pass"] else 1
        q = client.post_json("/v1/queries", json.loads(spec.canonical_bytes()))
        if args.wait:
            deadline = time.monotonic() + args.timeout
            while q["state"] not in TERMINAL and time.monotonic() < deadline:
                time.sleep(0.3)
                q = client.get_json(f"/v1/queries/{q['id']}")
        if args.json:
            print(json.dumps(q, indent=2))
        else:
            _print_query(q)
    if args.wait and q["state"] != "completed":
        return 1
    return 0


def _list(args: argparse.Namespace) -> int:
    params = {"limit": str(args.limit)}
    if args.state:
        params["state"] = args.state
    with _client(args.dir) as client:
        rows = client.get_json("/v1/queries", params=params)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no queries")
    for q in rows:
        err = q.get("error") or {}
        why = f"  [{err.get('rule') or err.get('code')}]" if err else ""
        print(f"{q['id']}  {q['state']:<10} {q['type']:<16} {q['role']:<12} "
              f"{q['requester']} -> {', '.join(q['counterparties'])}{why}")
    return 0


def _show(args: argparse.Namespace) -> int:
    with _client(args.dir) as client:
        q = client.get_json(f"/v1/queries/{args.id}")
    if args.json:
        print(json.dumps(q, indent=2))
    else:
        _print_query(q)
    return 0


def _result(args: argparse.Namespace) -> int:
    with _client(args.dir) as client:
        res = client.get_json(f"/v1/queries/{args.id}/result")
    text = json.dumps(res, indent=2)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        try:
            tmp.write_text(text + "\n", encoding="utf-8")
            tmp.replace(args.out)
        except OSError as exc:
            raise CleanroomError(f"cannot write {args.out}: {exc.strerror}") from None
        print(f"result of {args.id} written to {args.out} ({res['rows']} row(s))",
              file=sys.stderr)
    else:
        print(text)
    return 0


def _action(args: argparse.Namespace) -> int:
    with _client(args.dir) as client:
        q = client.post_json(f"/v1/queries/{args.id}/{args.action}", {})
    if args.json:
        print(json.dumps(q, indent=2))
    else:
        _print_query(q)
    return 0
