"""``lead_score`` standard mode through three real nodes: the hosts' ``partial_scores``
anonymous-query tables.

A short training (1,000 leads, three epochs: the model's quality is not under test here;
tests/test_lead_score.py checks it) gives each party a slice; the media platform and the
dealer publish their partial-score tables through the operator API; their policies then
stop listing the OEM in ``reveal_rows_to`` and the OEM grades every lead in standard mode
without ``params.reveal_counterparty_rows``. The host nodes run with the transcript hook
(``CLEANROOM_ANONQ_TRANSCRIPT``), which records every message they receive.

Checked: probabilities equal the plaintext computation (the three stored slices on the
parties' own features, joined phone > email > device id, first hit wins; the zero-row
score for leads a host lacks) within fixed-point error, and grades equal its grading; the
hosts received only table requests and blinded points, none of them a lead identifier or
its unblinded hash point; no ledger holds a lead identifier or a host's partial score; a
publish naming an unknown, foreign or unfinished model is refused with a 4xx naming
``model``; a missing table and a stale one fail the query naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import RunningNode, make_node, pin_each_other
from test_lead_model import _policy, _slice, train_spec
from test_queries_support import (
    ledger_bodies,
    ledger_entries,
    result,
    submit,
    upload,
    wait_state,
    write_policy,
)

from cleanroom.anonq import tables
from cleanroom.anonq.api import TRANSCRIPT_ENV, read_transcript
from cleanroom.policy import parse_spec
from cleanroom.queries.lead_model import _load_party, load_model
from cleanroom.synth import SynthConfig, generate
from cleanroom.transport import PeerCallError
from protocols.labeled_psi import oprf
from protocols.labeled_psi.messages import EvalRequest, TableRequest, decode
from protocols.psi.multikey import PRIORITY, encode_item
from protocols.vertical_lr import GradeSpec, encode_partial_label

LEADS = 1000
SEED = 31
HOSTS = ("media", "dealer")
UPLOADS = {"oem": [("leads", "oem/leads", "phone,email,device_id"), ("crm", "oem/crm", ""),
                   ("labels", "oem/labels", "")],
           "media": [("users", "media/users", "phone,email,device_id,device_id_2"),
                     ("behaviour", "media/behaviour", "")],
           "dealer": [("activity", "dealer/activity", "phone")]}
KINDS = {"phone": "phone", "email": "email", "device_id": "device_id",
         "device_id_2": "device_id"}


def score_spec(model: str, **options: Any) -> dict[str, Any]:
    spec = train_spec()
    spec["type"] = "lead_score"
    spec["params"]["reveal_counterparty_rows"] = False
    spec["params"]["options"] = {"model": model, "mode": "standard", **options}
    spec["inputs"]["oem"][2]["columns"] = {"lead_id": "row_id"}
    return spec


def _score(doc: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """A party's partial score in the clear from its stored slice: standardise, clip to
    +-8, round to the model's 2^-12 feature grid, add the intercept column, dot."""
    z = np.clip((x - np.asarray(doc["mean"])) / np.asarray(doc["scale"]), -8, 8)
    z = np.rint(z * 4096) / 4096
    if doc["intercept"]:
        z = np.column_stack([np.ones(len(z)), z])
    return np.asarray(z @ np.asarray(doc["weights"]))


def _publish(node: RunningNode, body: dict[str, Any]) -> dict[str, Any]:
    with node.operator_client(timeout=300.0) as c:
        out: dict[str, Any] = c.post_json("/v1/anonq/tables/partial_scores/publish", body)
    return out


def _captured(path: Path) -> list[tuple[str, bytes]]:
    """The (endpoint, body) records of a node's transcript hook file."""
    return read_transcript(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("lead_score_std")
    data = base / "synth"
    generate(data, SynthConfig(leads=LEADS, seed=SEED))
    nodes = {p: make_node(base, p, p) for p in ("oem", "media", "dealer")}
    pin_each_other(*nodes.values())
    captures = {h: base / f"capture-{h}" for h in HOSTS}
    try:
        for p, node in nodes.items():
            write_policy(node, _policy(p, reveal=True))
            env = {"CLEANROOM_WITNESS_INTERVAL_SECONDS": "0"}
            if p in captures:
                env[TRANSCRIPT_ENV] = str(captures[p])
            node.start(env=env)
        for p, items in UPLOADS.items():
            for name, table, ids in items:
                upload(nodes[p], name, data / f"{table}.parquet", ids)
        training = {"max_epochs": 3, "eval_every": 1, "max_checks": 3, "patience": 3}
        model = str(submit(nodes["oem"], train_spec(training=training))["id"])
        q = wait_state(nodes["oem"], model, timeout=240)
        assert q["state"] == "completed", q
        published = {}
        for h in HOSTS:
            assert wait_state(nodes[h], model)["state"] == "completed"
            published[h] = _publish(nodes[h], {"kind": "partial_scores", "model": model,
                                               "min_bucket_size": 1})
            # training needed reveal_rows_to; standard grading does not
            write_policy(nodes[h], _policy(h, reveal=False))
        for c in captures.values():
            (c / "received.bin").unlink(missing_ok=True)
        qid = str(submit(nodes["oem"], score_spec(model, include_probability=True))["id"])
        q = wait_state(nodes["oem"], qid, timeout=120)
        assert q["state"] == "completed", json.dumps(q)[:3000]
        res = result(nodes["oem"], qid)["result"]
        yield {"nodes": nodes, "data": data, "model": model, "qid": qid, "result": res,
               "table": pd.read_parquet(res["result_file"]), "published": published,
               "captured": {h: _captured(c) for h, c in captures.items()}}
    finally:
        for node in nodes.values():
            node.stop()


def _plaintext(world: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Every lead's probability computed in the clear from the stored slices and the
    parties' own features, joined phone > email > device id (first hit wins)."""
    nodes, model = world["nodes"], world["model"]
    spec = parse_spec(score_spec(model))
    ident, _, feats, _ = _load_party(nodes["oem"].context(), spec, "oem")
    oem_doc = _slice(nodes["oem"], model)
    s = _score(oem_doc, feats.values)
    matched: dict[str, int] = {}
    for host in HOSTS:
        h_ident, h_join, h_feats, _ = _load_party(nodes[host].context(), spec, host)
        doc = _slice(nodes[host], model)
        scores = _score(doc, h_feats.values)
        zero = float(_score(doc, np.zeros((1, len(h_feats.columns))))[0])
        owner: dict[tuple[str, str], int] = {}
        for row in range(len(h_ident)):
            for col in h_join:
                v = h_ident[col].iloc[row]
                if isinstance(v, str) and v:
                    owner.setdefault((KINDS[col], v), row)  # the first record holding it
        part = np.full(len(ident), zero)
        hits = 0
        for i in range(len(ident)):
            for kind in PRIORITY:
                v = ident[kind].iloc[i]
                rec = owner.get((kind, v)) if isinstance(v, str) and v else None
                if rec is not None:
                    part[i] = scores[rec]
                    hits += 1
                    break
        s = s + part
        matched[host] = hits
    a, b = oem_doc["platt"]
    return pd.DataFrame({"lead_id": feats.keys, "plain": 1 / (1 + np.exp(-(a * s + b))),
                         "logit": a * s + b}), matched


def test_standard_equals_the_plaintext_join(world: dict[str, Any]) -> None:
    res, table = world["result"], world["table"]
    plain, matched = _plaintext(world)
    assert res["mode"] == "standard" and res["leads"] == LEADS == len(table)
    assert res["matched"] == matched and all(m > 50 for m in matched.values())
    merged = table.merge(plain, on="lead_id", validate="one_to_one")
    assert len(merged) == LEADS
    diff = np.abs(merged.probability.to_numpy() - merged.plain.to_numpy())
    assert diff.max() < 1e-6, diff.max()  # two 2^-24 labels, rounding only
    spec = GradeSpec()
    t = np.log(np.asarray(spec.thresholds) / (1 - np.asarray(spec.thresholds)))
    near = (np.abs(merged.logit.to_numpy()[:, None] - t[None, :]) < 1e-5).any(axis=1)
    want = np.asarray(spec.grade(merged.plain.to_numpy()))
    assert (merged.grade.to_numpy()[~near] == want[~near]).all()
    for host in HOSTS:
        info = res["tables"][host]
        assert info["table"] == "partial_scores" and info["version"] >= 1
        assert info["entries"] == world["published"][host]["entries"]


def _lead_needles(world: dict[str, Any]) -> tuple[list[bytes], list[bytes]]:
    """Lead identifiers as stored raw, normalised and as table items; and the unblinded
    hash points H(item) of the items the OEM looked up."""
    raw = pd.read_parquet(world["data"] / "oem/leads.parquet")
    spec = parse_spec(score_spec(world["model"]))
    ident, _, _, _ = _load_party(world["nodes"]["oem"].context(), spec, "oem")
    words: set[bytes] = set()
    items: list[bytes] = []
    for kind in PRIORITY:
        for v in raw[kind].dropna():
            if len(str(v)) >= 6:
                words.add(str(v).encode())
        for v in ident[kind].dropna():
            words.add(str(v).encode())
            items.append(encode_item(kind, str(v)))
    words.update(items)
    points = oprf.hash_to_curve(items[:: max(1, len(items) // 400)])
    return sorted(words), [points[i:i + 32] for i in range(0, len(points), 32)]


def test_hosts_receive_only_blinded_points(world: dict[str, Any]) -> None:
    words, points = _lead_needles(world)
    assert len(words) > 2000 and len(points) > 300
    for host in HOSTS:
        captured = world["captured"][host]
        kinds = {type(decode(body)) for _, body in captured}
        assert kinds == {TableRequest, EvalRequest}, (host, kinds)
        evals = [m for m in (decode(b) for _, b in captured) if isinstance(m, EvalRequest)]
        # the host learns how many points were evaluated: the leads' distinct identifiers
        # plus the zero-row item, nothing about which of its users were hit
        assert sum(m.count for m in evals) == world["result"]["tables"][host]["evaluations"]
        blob = b"".join(body for _, body in captured)
        assert not any(w in blob for w in words), host
        sent = {m.points[i:i + 32] for m in evals for i in range(0, len(m.points), 32)}
        assert not sent & set(points), host  # blinded: r·H(x), never H(x)
        assert len(sent) == sum(m.count for m in evals)


def test_ledgers_hold_no_identifier_or_partial_score(world: dict[str, Any]) -> None:
    nodes, model, qid = world["nodes"], world["model"], world["qid"]
    words, _ = _lead_needles(world)
    spec = parse_spec(score_spec(model))
    labels: list[bytes] = []
    for host in HOSTS:
        ctx = nodes[host].context()
        _, _, feats, _ = _load_party(ctx, spec, host)
        slice_, _ = load_model(ctx, model)
        u = slice_.partial_scores(np.vstack([np.zeros((1, len(feats.columns))),
                                             feats.values[::5]]))
        mine = [encode_partial_label(float(v)) for v in u]
        # positive control: these are the host's exact labels (its zero-row entry, opened
        # with its own key, which no querier holds)
        src = tables.load_serving(nodes[host].dir / "data", "partial_scores")
        tag_key = oprf.TagDeriver(src.current.table_id).derive(
            oprf.oprf_direct(src.key, [tables.ZERO_ROW_ITEM]))
        assert src.current.open([tag_key])[0] == mine[0], host
        labels += mine
    needles = [w for w in words if len(w) >= 8] + labels
    for name, node in nodes.items():
        blob = b"\n".join(ledger_bodies(node))
        assert not any(n in blob for n in needles), name
    for host in HOSTS:  # every session at a host is recorded under the query id
        started = [e for e in ledger_entries(nodes[host], qid) if e["type"] == "session_started"]
        assert started and {e["protocol"] for e in started} == {"labeled_psi"}, host


def test_publish_refuses_an_unknown_foreign_or_unfinished_model(world: dict[str, Any]) -> None:
    nodes = world["nodes"]

    def refused(node: RunningNode, body: dict[str, Any]) -> tuple[int, str]:
        with pytest.raises(PeerCallError) as info:
            _publish(node, body)
        assert info.value.status is not None
        return info.value.status, str(info.value)

    status, text = refused(nodes["media"], {"kind": "partial_scores", "model": "q-nosuch"})
    assert status == 404 and "model: no train_lead_model query q-nosuch" in text
    status, text = refused(nodes["media"], {"kind": "partial_scores",
                                            "model": world["qid"]})  # a lead_score query
    assert status == 404 and "model: no train_lead_model query" in text
    status, text = refused(nodes["oem"], {"kind": "partial_scores", "model": world["model"]})
    assert status == 409 and "model: " in text and "not a host" in text
    status, text = refused(nodes["dealer"], {"kind": "partial_scores"})
    assert status == 422 and "model" in text
    status, text = refused(nodes["dealer"], {"kind": "inventory", "model": world["model"]})
    assert status == 422 and "model" in text
    # a training query the dealer denied (its policy no longer reveals rows to the OEM):
    # at the dealer it exists but did not complete
    denied = submit(nodes["oem"], train_spec())["id"]
    assert wait_state(nodes["oem"], denied)["state"] == "denied"
    assert wait_state(nodes["dealer"], denied)["state"] == "denied"
    status, text = refused(nodes["dealer"], {"kind": "partial_scores", "model": denied})
    assert status == 409 and "model: " in text and "denied, not completed" in text


def test_missing_or_stale_table_fails_naming_the_field(world: dict[str, Any]) -> None:
    nodes, model, data = world["nodes"], world["model"], world["data"]
    oem = nodes["oem"]
    # the host refuses the session naming the field; the OEM's query fails with its reason
    q = wait_state(oem, submit(oem, score_spec(model, tables={"media": "nosuch"}))["id"])
    assert q["state"] == "failed" and "publish it with kind partial_scores" in json.dumps(q), q
    at = wait_state(nodes["media"], q["id"])
    assert (at["state"], at["error"]["field"]) == ("failed", "params.options.tables.media"), at
    q = wait_state(oem, submit(oem, {**score_spec(model), "params": {
        "psi_reveal": "intersection", "options": {"model": model, "mode": "strict",
                                                  "tables": {"media": "x"}}}})["id"])
    assert (q["state"], q["error"]["field"]) == ("denied", "params.options.tables"), q
    # a new version of the dealer's activity: its table is stale until published again
    upload(nodes["dealer"], "activity", data / "dealer/activity.parquet", "phone")
    q = wait_state(oem, submit(oem, score_spec(model))["id"])
    assert q["state"] == "failed" and "publish the table again" in q["error"]["message"], q
    at = wait_state(nodes["dealer"], q["id"])
    assert (at["error"]["code"], at["error"]["field"]) == ("stale_table",
                                                           "inputs.dealer.0.dataset"), at
    again = _publish(nodes["dealer"], {"kind": "partial_scores", "model": model,
                                       "min_bucket_size": 1})
    assert again["version"] == world["published"]["dealer"]["version"]  # same rows
    q = wait_state(oem, submit(oem, score_spec(model))["id"], timeout=120)
    assert q["state"] == "completed", q
