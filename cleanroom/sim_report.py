"""The simulation's summary table and its self-contained HTML report.

Input: the result dictionary that :func:`cleanroom.simulate.run_simulation` builds (query
results as the OEM's operator received them, ground-truth checks made by the simulation as
an evaluator, ledger verification per node) plus the nodes' ledgers, read read-only for
the bytes that crossed each domain. Output: lines for the terminal and one HTML file with
inline CSS and SVG (no script, no external reference), viewable offline. This module
reads no party data and sends nothing anywhere.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from audits.charts import fmt_bytes, hbar_chart

PARTIES = ("oem", "media", "dealer")


def domain_flows(nodes_dir: Path) -> dict[str, dict[str, int]]:
    """Per node: protocol bytes and messages it sent to peers, from its own ledger."""
    from audits.report import load_entries
    from audits.verify import open_store
    from cleanroom.node.config import NodeConfig
    from cleanroom.storage.db import engine_for

    flows: dict[str, dict[str, int]] = {}
    for party in PARTIES:
        config = NodeConfig.load(nodes_dir / party)
        engine = engine_for(config.database_url)
        try:
            entries, _bad = load_entries(open_store(engine, party))
        finally:
            engine.dispose()
        sent = [e for e in entries if e.type == "message_sent"]
        flows[party] = {
            "messages_sent": len(sent),
            "bytes_sent": sum(int(str(e.fields.get("size", 0))) for e in sent),
            "ledger_entries": len(entries),
        }
    return flows


def summary_rows(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The summary table: (what, value) rows, in the order a reader wants them."""
    rows: list[tuple[str, str]] = []
    for name, m in result.get("match", {}).items():
        keys = "; ".join(
            f"{cp}: " + ", ".join(f"{k} {v}" for k, v in per.items())
            for cp, per in m["per_key"].items()
        )
        rows.append((f"match {name}", f"{m['matched']:,} leads ({m['rate']:.1%}); by key {keys}"))
    train = result.get("train", {}).get("result", {})
    if train:
        lift = (train.get("lift_by_decile") or [{}])[0].get("lift", float("nan"))
        auc = result.get("data", {}).get("auc", {})
        single = max((v for k, v in auc.items() if k in PARTIES and v is not None), default=0.0)
        rows.append(
            (
                "lead model (federated)",
                f"validation AUC {train.get('validation_auc', float('nan')):.3f} "
                f"(best single party {single:.3f}); top-decile lift {lift:.1f}x",
            )
        )
    score = result.get("lead_score")
    if score and "eval_auc" in score:
        auc = result.get("data", {}).get("auc", {})
        single = max((v for k, v in auc.items() if k in PARTIES and v is not None), default=0.0)
        rows.append(
            (
                "lead model AUC on the evaluation split (ground truth)",
                f"federated {score['eval_auc']:.3f}; centralised plaintext "
                f"{auc.get('joint') or float('nan'):.3f}; best single party {single:.3f}",
            )
        )
    if score:
        dist = ", ".join(f"{g} {n:,}" for g, n in score.get("grades", {}).items())
        rows.append(("grade distribution", dist))
        for mode, lift in score.get("lift_vs_truth", {}).items():
            rows.append((f"grade A conversion vs average ({mode})", f"{lift:.1f}x"))
    rec = result.get("store_recommendation")
    if rec:
        agree = rec["agreement"]
        rows.append(
            (
                "store recommendation",
                f"{rec['matched']:,} of {rec['leads']:,} leads matched; top-5 lists equal "
                f"ground truth: {'yes' if rec['nearest_all_equal'] else 'NO'}; recommended = "
                f"chosen store {agree['rate_matched']:.1%} (matched), {agree['rate_all']:.1%} "
                "(all converting leads, evaluation split)",
            )
        )
    for party, flow in result.get("flows", {}).items():
        rows.append(
            (
                f"bytes out of {party}'s domain",
                f"{fmt_bytes(flow['bytes_sent'])} in {flow['messages_sent']:,} protocol messages",
            )
        )
    for party, audit in result.get("audit", {}).items():
        state = "verified; peers consistent" if audit["ok"] else "FAILED"
        size = result.get("flows", {}).get(party, {}).get("ledger_entries")
        shown = f"{size:,} entries, " if size is not None else ""
        rows.append((f"ledger {party}", f"{shown}{state}"))
    for step, seconds in result.get("step_seconds", {}).items():
        rows.append((f"time: {step}", f"{seconds:.1f} s"))
    return rows


def print_summary(result: Mapping[str, Any]) -> None:
    rows = summary_rows(result)
    width = max((len(k) for k, _ in rows), default=10)
    print("\nSummary")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _scatter(points: Sequence[tuple[float, float, float, str]], title: str) -> str:
    """Stores on a lon/lat plane, circle area ~ the number of leads recommended there."""
    if not points:
        return f"<p>{_e(title)}: no data</p>"
    w, h, pad = 640, 420, 30
    lons = [p[0] for p in points]
    lats = [p[1] for p in points]
    lo_x, hi_x = min(lons) - 0.5, max(lons) + 0.5
    lo_y, hi_y = min(lats) - 0.5, max(lats) + 0.5
    top = max(p[2] for p in points) or 1.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
        f'aria-label="{_e(title)}"><rect width="{w}" height="{h}" fill="#f7f7f7"/>'
    ]
    for lon, lat, count, label in points:
        x = pad + (lon - lo_x) / (hi_x - lo_x) * (w - 2 * pad)
        y = h - pad - (lat - lo_y) / (hi_y - lo_y) * (h - 2 * pad)
        r = 2.0 + 14.0 * math.sqrt(count / top)
        out.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="#0072b2" fill-opacity="0.55">'
            f"<title>{_e(label)}: {int(count)} leads</title></circle>"
        )
    out.append(
        f'<text x="{pad}" y="{h - 8}" font-size="11">longitude {lo_x:.1f} to {hi_x:.1f}, '
        f"latitude {lo_y:.1f} to {hi_y:.1f}</text></svg>"
    )
    return "".join(out)


def _table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def build_html(
    result: Mapping[str, Any], store_points: Sequence[tuple[float, float, float, str]]
) -> str:
    """One self-contained HTML page for the simulation."""
    parts: list[str] = []
    leads = int(result.get("data", {}).get("rows", {}).get("oem/leads", 0))
    funnel = [("OEM leads", float(leads))]
    funnel += [(name, float(m["matched"])) for name, m in result.get("match", {}).items()]
    parts.append("<h2>Match funnel</h2>" + hbar_chart(funnel, title="leads matched"))
    train = result.get("train", {}).get("result", {})
    if train.get("lift_by_decile"):
        lift = [(f"decile {int(d['decile'])}", float(d["lift"])) for d in train["lift_by_decile"]]
        parts.append(
            "<h2>Lift chart (federated model, validation split)</h2>"
            + hbar_chart(lift, title="lift by decile", fmt=lambda v: f"{v:.1f}x")
        )
    score = result.get("lead_score")
    if score and score.get("grades"):
        grades = [(g, float(n)) for g, n in score["grades"].items()]
        parts.append("<h2>Grade distribution</h2>" + hbar_chart(grades, title="leads per grade"))
    if store_points:
        parts.append(
            "<h2>Recommended stores</h2><p>Each circle is a store of the OEM's network (public "
            "addresses); its area is the number of leads recommended to it.</p>"
            + _scatter(store_points, "recommended stores")
        )
    flows = result.get("flows", {})
    if flows:
        parts.append(
            "<h2>What crossed each domain</h2>"
            + hbar_chart(
                [(p, float(f["bytes_sent"])) for p, f in flows.items()],
                title="protocol bytes sent",
                fmt=fmt_bytes,
            )
        )
    steps = [(k, float(v)) for k, v in result.get("step_seconds", {}).items()]
    parts.append(
        "<h2>Time per step</h2>" + hbar_chart(steps, title="seconds", fmt=lambda v: f"{v:.1f} s")
    )
    css = (
        "body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;"
        "padding:4px 8px;text-align:left;vertical-align:top}th{width:30%;font-weight:600}"
        "h2{border-bottom:1px solid #ccc;margin-top:1.6em}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; img-src data:\">"
        f"<title>Clean-room simulation</title><style>{css}</style></head><body>"
        "<h1>Clean-room simulation: OEM, media platform, dealer</h1>"
        "<p>Three nodes ran as separate processes over mutual TLS; every number below was "
        "received by the OEM's operator through its node's API, except the ground-truth "
        "comparisons, which the simulation makes as an evaluator.</p>"
        "<h2>Summary</h2>" + _table(summary_rows(result)) + "".join(parts) + "</body></html>"
    )


def store_points(table_path: Path, stores_path: Path) -> list[tuple[float, float, float, str]]:
    """(lon, lat, leads recommended, store id) for every store in the OEM's network."""
    import pandas as pd

    table = pd.read_parquet(table_path, columns=["recommended_store"])
    counts = table["recommended_store"].dropna().astype(str).value_counts()
    stores = pd.read_parquet(stores_path, columns=["store_id", "lat", "lon"])
    return [
        (float(r.lon), float(r.lat), float(counts.get(str(r.store_id), 0)), str(r.store_id))
        for r in stores.itertuples()
    ]
