"""The main job: a three-party clean-room simulation on one machine.

``cleanroom simulate --out DIR`` generates synthetic data for the OEM, the media platform
and the dealer, and runs the workflow that exists so far end to end, printing a summary
per step. It only drives the engine through its public entry points (the same ones an
operator uses); it holds no protocol or policy logic of its own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cleanroom import sim_report
from cleanroom.errors import CleanroomError, InputError
from cleanroom.node.launcher import NodeProcess, make_node, pin_each_other
from cleanroom.queries.states import TERMINAL
from cleanroom.synth import SynthConfig, generate
from parties.schemas import PARTY_TABLES, get_schema, table_file

DEFAULT_LEADS = 20_000
MARKER = ".cleanroom-simulation"


@dataclass
class StepTimer:
    """Runs named steps, prints progress, and keeps the time each one took."""

    times: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"==> {name} ...", flush=True)
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        self.times[name] = elapsed
        print(f"    {name}: done in {elapsed:.1f} s", flush=True)
        return result


PARTIES: tuple[str, ...] = ("oem", "media", "dealer")


def _upload(node: NodeProcess, table: str, path: Path) -> dict[str, Any]:
    """Ingest one party table at its own node through the operator API (streamed upload)."""
    name = table.split("/", 1)[1]
    id_columns = ",".join(f"{c}:{k}" for c, k in get_schema(table).id_columns.items())
    fmt = path.suffix.lstrip(".")

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    with node.operator_client(timeout=600.0) as client:
        report: dict[str, Any] = client.upload(
            f"/v1/datasets/{name}/versions",
            chunks(),
            params={"id_columns": id_columns, "format": fmt, "filename": path.name},
        )
    return report


def _ingest_all(nodes: dict[str, NodeProcess], data_dir: Path) -> dict[str, dict[str, Any]]:
    reports: dict[str, dict[str, Any]] = {}
    for table in PARTY_TABLES:
        party = table.split("/", 1)[0]
        reports[table] = _upload(nodes[party], table, table_file(data_dir, table))
    return reports


def _print_ingest(reports: dict[str, dict[str, Any]]) -> None:
    print("  datasets ingested at their owners' nodes (rows; invalid identifiers per column):")
    for table, report in reports.items():
        invalid = ", ".join(
            f"{r['column']} {r['invalid']}" for r in report.get("id_report", []) if r["invalid"]
        )
        print(f"    {table:<20} {report['rows']:>9,}  {invalid}")


def _run_query(node: NodeProcess, spec: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
    """Submit a query spec at ``node`` through its operator API and wait for its end."""
    with node.operator_client(timeout=120.0) as client:
        submitted: dict[str, Any] = client.post_json("/v1/queries", spec)
        qid = submitted["id"]
        deadline = time.monotonic() + timeout
        while True:
            query: dict[str, Any] = client.get_json(f"/v1/queries/{qid}")
            if query["state"] in TERMINAL:
                break
            if time.monotonic() > deadline:
                raise CleanroomError(f"query {qid} did not finish within {timeout:g} s")
            time.sleep(0.2)
        if query["state"] != "completed":
            raise CleanroomError(f"query {qid} ended {query['state']}: {query.get('error')}")
        result: dict[str, Any] = client.get_json(f"/v1/queries/{qid}/result")
    return {"id": qid, "query": query, "result": result}


def segment_stats_spec() -> dict[str, Any]:
    """Matched leads per city and intended series, OEM x media, matched on all three keys."""
    join = {"phone": "join_key", "email": "join_key", "device_id": "join_key"}
    return {
        "version": 1,
        "type": "segment_stats",
        "requester": "oem",
        "counterparties": ["media"],
        "purpose": "campaign_measurement",
        "receiver": "oem",
        "inputs": {
            "oem": [
                {
                    "dataset": "leads",
                    "columns": {**join, "city": "group_by", "intended_series": "group_by"},
                }
            ],
            "media": [{"dataset": "users", "columns": dict(join)}],
        },
        "params": {"psi_reveal": "intersection"},
    }


def _print_segments(outcome: dict[str, Any]) -> None:
    body = outcome["result"].get("result", {})
    groups = body.get("groups", [])
    print(
        f"  segment_stats {outcome['id']}: {len(groups)} groups released, "
        f"{body.get('suppressed_groups', 0)} suppressed (below the minimum group size)"
    )
    for group in sorted(groups, key=lambda g: -int(g.get("count", 0)))[:5]:
        print(f"    {group}")


MATCH_INPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "media": ("users", ("phone", "email", "device_id", "device_id_2")),
    "dealer": ("activity", ("phone",)),
}


def match_spec(counterparties: tuple[str, ...]) -> dict[str, Any]:
    """Multi-key match of the OEM's leads with one or two counterparties."""
    own = {"phone": "join_key", "email": "join_key", "device_id": "join_key", "lead_id": "row_id"}
    inputs: dict[str, Any] = {"oem": [{"dataset": "leads", "columns": own}]}
    for cp in counterparties:
        dataset, columns = MATCH_INPUTS[cp]
        inputs[cp] = [{"dataset": dataset, "columns": dict.fromkeys(columns, "join_key")}]
    return {
        "version": 1,
        "type": "match",
        "requester": "oem",
        "counterparties": list(counterparties),
        "purpose": "campaign_measurement",
        "receiver": "oem",
        "inputs": inputs,
        "params": {"psi_reveal": "intersection"},
    }


def reachable_overlaps(data_dir: Path) -> dict[str, float]:
    """Share of leads that share at least one normalised identifier with each party's
    records, from the generator's ground truth: the best any identifier matching can do
    (some people use different identifiers at different parties)."""
    import pandas as pd

    im = pd.read_parquet(data_dir / "ground_truth" / "identity_map.parquet")
    cols = ["phone", "email", "device_id", "device_id_2"]

    def ids_of(party: str) -> set[str]:
        part = im[im["party"] == party]
        return {v for c in cols for v in part[c].dropna()}

    leads = im[im["party"] == "oem"]
    lead_ids = [
        {v for v in (r.phone, r.email, r.device_id) if isinstance(v, str)}
        for r in leads.itertuples()
    ]
    media, dealer = ids_of("media"), ids_of("dealer")
    in_media = [bool(ids & media) for ids in lead_ids]
    in_dealer = [bool(ids & dealer) for ids in lead_ids]
    n = max(1, len(lead_ids))
    return {
        "oem x media": sum(in_media) / n,
        "oem x dealer": sum(in_dealer) / n,
        "oem x media x dealer": sum(a and b for a, b in zip(in_media, in_dealer, strict=True)) / n,
    }


def _run_matches(
    nodes: dict[str, NodeProcess], leads: int, truth: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cps in (("media",), ("dealer",), ("media", "dealer")):
        name = " x ".join(("oem", *cps))
        outcome = _run_query(nodes["oem"], match_spec(cps))
        body = outcome["result"].get("result", {})
        matched = int(body.get("matched_rows", 0))
        per_key = {cp: body["per_counterparty"][cp]["per_key"] for cp in cps}
        out[name] = {
            "id": outcome["id"],
            "matched": matched,
            "rate": matched / leads,
            "per_key": per_key,
            "handle": body.get("handle"),
        }
        expected = truth.get(name)
        shown = f" (reachable by identifiers: {expected:.1%})" if expected is not None else ""
        print(
            f"  match {name:<20} {matched:>8,} leads = {matched / leads:6.1%}{shown}  "
            f"per key: {per_key}"
        )
    return out


def train_spec() -> dict[str, Any]:
    """Vertical LR over the OEM's CRM, the media platform's behaviour and dealer visits."""
    from parties.catalog import SERIES

    behaviour = [f"views_{s.lower()}" for s in SERIES] + [
        "comparisons",
        "price_checks",
        "forum_posts",
        "testdrive_form_opens",
        "days_since_active",
    ]
    join = {"phone": "join_key", "email": "join_key", "device_id": "join_key"}
    return {
        "version": 1,
        "type": "train_lead_model",
        "requester": "oem",
        "counterparties": ["media", "dealer"],
        "purpose": "lead_grading",
        "receiver": "oem",
        "inputs": {
            "oem": [
                {
                    "dataset": "leads",
                    "columns": {
                        "lead_id": "row_id",
                        **join,
                        "source_channel": "model_feature",
                        "intended_series": "model_feature",
                    },
                },
                {
                    "dataset": "crm",
                    "columns": {
                        "lead_id": "row_id",
                        **dict.fromkeys(
                            ("previous_owner", "service_visits", "prior_brand", "household_cars"),
                            "model_feature",
                        ),
                    },
                },
                {"dataset": "labels", "columns": {"lead_id": "row_id", "converted": "label"}},
            ],
            "media": [
                {
                    "dataset": "users",
                    "columns": {"user_id": "row_id", **join, "device_id_2": "join_key"},
                },
                {
                    "dataset": "behaviour",
                    "columns": {"user_id": "row_id", **dict.fromkeys(behaviour, "model_feature")},
                },
            ],
            "dealer": [
                {
                    "dataset": "activity",
                    "columns": {
                        "phone": "join_key",
                        **dict.fromkeys(
                            ("visits", "test_drives", "prior_orders", "last_visit_at"),
                            "model_feature",
                        ),
                    },
                }
            ],
        },
        "params": {"psi_reveal": "intersection", "reveal_counterparty_rows": True},
    }


def store_recommendation_spec() -> dict[str, Any]:
    join = {"phone": "join_key", "email": "join_key", "device_id": "join_key"}
    return {
        "version": 1,
        "type": "store_recommendation",
        "requester": "oem",
        "counterparties": ["media", "dealer"],
        "purpose": "store_recommendation",
        "receiver": "oem",
        "inputs": {
            "oem": [
                {
                    "dataset": "leads",
                    "columns": {
                        "lead_id": "row_id",
                        **join,
                        "city": "group_by",
                        "intended_series": "group_by",
                    },
                },
                {
                    "dataset": "stores",
                    "columns": dict.fromkeys(("store_id", "city", "lat", "lon"), "public"),
                },
            ],
            "media": [
                {
                    "dataset": "users",
                    "columns": {"user_id": "row_id", **join, "device_id_2": "join_key"},
                },
                {
                    "dataset": "locations",
                    "columns": {
                        "user_id": "row_id",
                        **dict.fromkeys(
                            ("home_lat", "home_lon", "work_lat", "work_lon"), "location"
                        ),
                    },
                },
            ],
            "dealer": [
                {
                    "dataset": "inventory",
                    "columns": {"store_id": "row_id", "series": "group_by", "units": "inventory"},
                }
            ],
        },
        "params": {"options": {"inline_rows": 0}},
    }


def _train(nodes: dict[str, NodeProcess]) -> dict[str, Any]:
    outcome = _run_query(nodes["oem"], train_spec(), timeout=1800.0)
    body = outcome["result"].get("result", {})
    lift = body.get("lift_by_decile") or [{}]
    print(
        f"  train_lead_model {outcome['id']}: {body.get('epochs')} epochs, validation AUC "
        f"{body.get('validation_auc', float('nan')):.3f}, top-decile lift "
        f"{lift[0].get('lift', float('nan')):.1f}x"
    )
    return {"id": outcome["id"], "result": body}


def _publish_tables(nodes: dict[str, NodeProcess], model: str) -> dict[str, Any]:
    """The owners publish their labeled tables (what their operators do once per update):
    the media platform's nearest stores and the dealer's inventory (store_recommendation),
    and each host's partial scores under its slice of the trained ``model`` (lead_score
    standard mode, which looks leads up in them)."""
    with nodes["media"].operator_client(timeout=1800.0) as client:
        media = client.post_json(
            "/v1/anonq/tables/nearest_stores/publish",
            {"kind": "nearest_stores", "stores_peer": "oem"},
        )
    with nodes["dealer"].operator_client(timeout=600.0) as client:
        dealer = client.post_json(
            "/v1/anonq/tables/inventory/publish", {"kind": "inventory", "min_bucket_size": 50}
        )
    scores: dict[str, Any] = {}
    for host, min_bucket in (("media", 1000), ("dealer", 50)):
        with nodes[host].operator_client(timeout=1800.0) as client:
            scores[host] = client.post_json(
                "/v1/anonq/tables/partial_scores/publish",
                {"kind": "partial_scores", "model": model, "min_bucket_size": min_bucket},
            )
    print(
        "  partial_scores tables: "
        + ", ".join(
            f"{h} {r['users']:,} records / {r['entries']:,} identifiers, v{r['version']}"
            for h, r in scores.items()
        )
    )
    return {"media": media, "dealer": dealer, "partial_scores": scores}


def _recommend(nodes: dict[str, NodeProcess], data_dir: Path) -> dict[str, Any]:
    import pandas as pd

    from parties.recommend_eval import check_nearest, store_choice_agreement

    outcome = _run_query(nodes["oem"], store_recommendation_spec(), timeout=1800.0)
    body = outcome["result"].get("result", {})
    table = pd.read_parquet(nodes["oem"].dir / "data" / body["file"]["name"])
    truth = data_dir / "ground_truth"
    nearest = check_nearest(
        table,
        pd.read_parquet(truth / "nearest_stores.parquet"),
        pd.read_parquet(truth / "identity_map.parquet"),
    )
    choice = pd.read_parquet(truth / "store_choice.parquet")
    agreement = store_choice_agreement(table, choice, "eval").as_dict()
    matched = int(table["matched"].sum())
    print(
        f"  store_recommendation {outcome['id']}: {len(table):,} leads, {matched:,} matched; "
        f"top-5 lists equal ground truth for {nearest.lists_equal:,} of {nearest.checked:,}"
    )
    print(
        f"    recommended store = chosen store for {agreement['rate_matched']:.1%} of matched "
        f"converting leads ({agreement['rate_all']:.1%} of all) on the evaluation split"
    )
    return {
        "id": outcome["id"],
        "summary": {k: v for k, v in body.items() if k != "rows"},
        "nearest_check": nearest.as_dict(),
        "nearest_all_equal": nearest.all_equal,
        "agreement": agreement,
        "matched": matched,
        "leads": len(table),
        "table": str(nodes["oem"].dir / "data" / body["file"]["name"]),
    }


def score_spec(model: str, mode: str) -> dict[str, Any]:
    """Grade the leads without a label (the evaluation split) with a trained model. Neither
    mode reveals a host's rows (standard mode looks the leads up in the hosts'
    partial_scores tables), so the spec does not ask for reveal_counterparty_rows."""
    spec = train_spec()
    spec["type"] = "lead_score"
    spec["inputs"]["oem"][2]["columns"] = {"lead_id": "row_id"}  # which leads are labelled
    options: dict[str, Any] = {"model": model, "mode": mode, "subset": "unlabelled"}
    if mode == "standard":
        options["include_probability"] = True
    spec["params"]["options"] = options
    spec["params"]["reveal_counterparty_rows"] = False
    return spec


def _score(nodes: dict[str, NodeProcess], model: str, data_dir: Path) -> dict[str, Any]:
    import pandas as pd

    labels = pd.read_parquet(data_dir / "ground_truth" / "eval_labels.parquet")
    base = float(labels["converted"].mean())
    out: dict[str, Any] = {"lift_vs_truth": {}}
    for mode in ("strict", "standard"):
        outcome = _run_query(nodes["oem"], score_spec(model, mode), timeout=1800.0)
        body = outcome["result"].get("result", {})
        table = pd.read_parquet(body["result_file"]).merge(labels, on="lead_id")
        grade_a = table[table["grade"] == "A"]
        lift = float(grade_a["converted"].mean()) / base if len(grade_a) and base else 0.0
        out["lift_vs_truth"][mode] = lift
        if "probability" in table.columns:
            from cleanroom.synth.model import auc

            out["eval_auc"] = auc(
                table["converted"].to_numpy(dtype=bool), table["probability"].to_numpy()
            )
        out[mode] = {"id": outcome["id"], "grades": body.get("grades", {}), "leads": len(table)}
        print(
            f"  lead_score {mode:<8} {outcome['id']}: grades {body.get('grades')}; grade A "
            f"converts at {lift:.1f}x the average (ground truth, {len(table):,} leads)"
        )
    out["grades"] = out["strict"]["grades"]
    return out


def _witness_all(nodes: dict[str, NodeProcess]) -> dict[str, Any]:
    rounds: dict[str, Any] = {}
    for party, node in nodes.items():
        with node.operator_client(timeout=120.0) as client:
            rounds[party] = client.post_json("/v1/ledger/witness", {})
    return rounds


def _audit_all(nodes: dict[str, NodeProcess], out: Path) -> dict[str, Any]:
    """``audit verify --peers`` at every node, then one compliance report per node."""
    from audits.peers import transport_fetcher
    from audits.report import report_for_node
    from audits.verify import verify_node
    from cleanroom.node.config import NodeConfig

    reports_dir = out / "reports"
    reports_dir.mkdir(exist_ok=True)
    audits: dict[str, Any] = {}
    for party, node in nodes.items():
        config = NodeConfig.load(node.dir)
        audit = verify_node(node.dir, peers=True, fetch_peer_checkpoint=transport_fetcher(config))
        html, _ = report_for_node(node.dir, audit=audit)
        path = reports_dir / f"compliance-{party}.html"
        path.write_text(html, encoding="utf-8")
        audits[party] = {"ok": audit.ok, "summary": audit.summary(), "report": str(path)}
        status = "verified, peers consistent" if audit.ok else "FAILED"
        print(f"  {party:<7} ledger {status}: {audit.summary().splitlines()[1].strip()}")
        print(f"          compliance report: {path}")
    return audits


def run_simulation(out: Path, leads: int, seed: int, *, overwrite: bool = False) -> dict[str, Any]:
    """Run the simulation into ``out`` and return its summary as a dict."""
    if leads < 100:
        raise InputError(f"--leads must be at least 100, got {leads}")
    if out.exists() and any(out.iterdir()):
        if not (overwrite or (out / MARKER).exists()):
            raise InputError(
                f"output directory {out} is not empty and holds no earlier simulation; "
                "pass --overwrite or choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by cleanroom simulate; rerunning replaces this folder\n")
    timer = StepTimer()
    data_dir = out / "data"
    summary = timer.run(
        "generate synthetic data",
        lambda: generate(data_dir, SynthConfig(leads=leads, seed=seed)),
    )
    print(summary.format())
    result: dict[str, Any] = {"data": summary.as_dict()}

    nodes_dir = out / "nodes"
    nodes_dir.mkdir()

    def init_nodes() -> dict[str, NodeProcess]:
        made = {party: make_node(nodes_dir, party, party) for party in PARTIES}
        pin_each_other(*made.values())
        return made

    nodes: dict[str, NodeProcess] = timer.run("initialise three nodes and pin peers", init_nodes)
    try:
        timer.run("start nodes", lambda: [n.start() for n in nodes.values()])
        for node in nodes.values():
            print(f"    {node.name:<7} {node.url}  (log: {node.log_path})")
        reports = timer.run(
            "ingest each party's data at its node", lambda: _ingest_all(nodes, data_dir)
        )
        _print_ingest(reports)
        result["ingest"] = reports
        truth = reachable_overlaps(data_dir)
        result["match"] = timer.run(
            "match (PSI, multi-key; two- and three-party)",
            lambda: _run_matches(nodes, leads, truth),
        )
        seg = timer.run(
            "segment_stats (OEM x media)", lambda: _run_query(nodes["oem"], segment_stats_spec())
        )
        _print_segments(seg)
        result["segment_stats"] = seg
        result["train"] = timer.run(
            "train_lead_model (vertical LR, Paillier)", lambda: _train(nodes)
        )
        result["tables"] = timer.run(
            "publish anonymous-query tables (media, dealer; partial scores of the model)",
            lambda: _publish_tables(nodes, result["train"]["id"]),
        )
        result["lead_score"] = timer.run(
            "lead_score (strict and standard)",
            lambda: _score(nodes, result["train"]["id"], data_dir),
        )
        result["store_recommendation"] = timer.run(
            "store_recommendation", lambda: _recommend(nodes, data_dir)
        )
        result["witness"] = timer.run("witness each other's ledgers", lambda: _witness_all(nodes))
        audits = timer.run(
            "audit verify --peers and compliance reports", lambda: _audit_all(nodes, out)
        )
        result["audit"] = audits
        if not all(a["ok"] for a in audits.values()):
            raise CleanroomError("a ledger failed verification; see the compliance reports")
    finally:
        timer.run("stop nodes", lambda: [n.stop() for n in nodes.values()])
    result["step_seconds"] = timer.times
    result["flows"] = sim_report.domain_flows(nodes_dir)
    points: list[tuple[float, float, float, str]] = []
    if "store_recommendation" in result:
        points = sim_report.store_points(
            Path(result["store_recommendation"]["table"]), table_file(data_dir, "oem/stores")
        )
    report = out / "report.html"
    report.write_text(sim_report.build_html(result, points), encoding="utf-8")
    sim_report.print_summary(result)
    print(f"\nreport: {report}")
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\nsummary written to {out / 'summary.json'}")
    return result


def _cmd(args: argparse.Namespace) -> int:
    run_simulation(Path(args.out), args.leads, args.seed, overwrite=args.overwrite)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate",
        help="run the three-party clean-room simulation end to end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="sim-out", help="output directory (default: sim-out)")
    p.add_argument("--leads", type=int, default=DEFAULT_LEADS, help="number of OEM leads")
    p.add_argument("--seed", type=int, default=7, help="random seed")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the output directory if it has files"
    )
    p.set_defaults(func=_cmd)
