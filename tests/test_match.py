"""The ``match`` query through real nodes: results equal a plaintext one-to-one join on the
normalised identifiers each node stored (two and three parties, duplicates, an empty set),
cardinality mode returns counts only, the counterparty's ledger and a captured session
transcript hold no raw identifier, malformed / truncated / replayed / wrong-round session
messages give 4xx, and a match handle feeds a later segment_stats."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_queries_support import (
    BASE_POLICIES,
    QueryNodes,
    ledger_bodies,
    policy_override,
    query_nodes,
    result,
    show,
    stats_spec,
    submit,
    upload,
    wait_state,
)

from cleanroom.node.datasets import load_dataset
from cleanroom.queries.match import CompactOrigins, kind_items
from cleanroom.queries.psi_session import encode_batch
from cleanroom.queries.runners import protocol_session_id
from cleanroom.transport import PeerCallError
from protocols.psi import Mode, PsiRequester
from protocols.psi.messages import Request
from protocols.psi.multikey import PRIORITY, Edge, encode_item, resolve

__all__ = ["query_nodes"]

KIND_OF = {"phone": "phone", "email": "email", "device_id": "device_id"}
CP_INPUTS = {
    "media": ("users", ("phone", "email", "device_id")),
    "dealer": ("activity", ("phone",)),
}


def match_spec(
    *,
    counterparties: tuple[str, ...] = ("media",),
    reveal: str = "intersection",
    dataset: str = "leads",
    cp_datasets: dict[str, str] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    own = {"phone": "join_key", "email": "join_key", "device_id": "join_key"}
    if dataset == "leads":
        own["lead_id"] = "row_id"
    inputs: dict[str, Any] = {"oem": [{"dataset": dataset, "columns": own}]}
    for cp in counterparties:
        name, cols = CP_INPUTS[cp]
        name = (cp_datasets or {}).get(cp, name)
        inputs[cp] = [{"dataset": name, "columns": {c: "join_key" for c in cols}}]
    return {"version": 1, "type": "match", "requester": "oem",
            "counterparties": list(counterparties), "purpose": "campaign_measurement",
            "receiver": "oem", "inputs": inputs,
            "params": {"psi_reveal": reveal, "options": options or {}}}


def stored(nodes: QueryNodes, party: str, dataset: str, cols: tuple[str, ...]) -> pd.DataFrame:
    """The normalised identifiers as the node stored them (what PSI matches on)."""
    return load_dataset(nodes[party].context(), dataset, columns=list(cols))


def plaintext_resolution(requester: pd.DataFrame, responder: pd.DataFrame,
                         req_cols: tuple[str, ...], resp_cols: tuple[str, ...]
                         ) -> dict[int, str]:
    """Trusted-third-party reference: row -> kind, one-to-one, phone > email > device_id.
    A responder identifier belongs to its first record (the documented rule)."""
    owner: dict[bytes, bytes] = {}
    for row, rec in enumerate(responder[list(resp_cols)].itertuples(index=False)):
        for col, value in zip(resp_cols, rec, strict=True):
            if isinstance(value, str) and value:
                owner.setdefault(encode_item(KIND_OF[col], value),  # type: ignore[arg-type]
                                 row.to_bytes(8, "big"))
    edges: list[Edge] = []
    for row, rec in enumerate(requester[list(req_cols)].itertuples(index=False)):
        for col, value in zip(req_cols, rec, strict=True):
            if isinstance(value, str) and value:
                item = encode_item(KIND_OF[col], value)  # type: ignore[arg-type]
                if item in owner:
                    edges.append(Edge(row, owner[item], KIND_OF[col]))  # type: ignore[arg-type]
    return {row: kind for row, (_, kind) in resolve(edges).pairs.items()}


def _completed(node: Any, spec: dict[str, Any]) -> dict[str, Any]:
    q = wait_state(node, submit(node, spec)["id"])
    assert q["state"] == "completed", (q["state"], q.get("error"), q.get("decisions"))
    out: dict[str, Any] = result(node, q["id"])["result"]
    out["_id"] = q["id"]
    return out


LEAD_COLS = ("phone", "email", "device_id")


def test_two_party_equals_plaintext_one_to_one_join(query_nodes: QueryNodes) -> None:
    res = _completed(query_nodes["oem"], match_spec(options={"inline_rows": 100000}))
    leads = stored(query_nodes, "oem", "leads", LEAD_COLS)
    users = stored(query_nodes, "media", "users", LEAD_COLS)
    truth = plaintext_resolution(leads, users, LEAD_COLS, LEAD_COLS)
    assert len(truth) >= 10  # the synthetic data overlap is not trivial
    got = {r["_row"]: r["match_key"] for r in res["rows"]}
    assert got == truth
    assert res["matched_rows"] == len(truth)
    counts = res["per_counterparty"]["media"]["per_key"]
    assert counts == {k: sum(1 for v in truth.values() if v == k) for k in PRIORITY}
    before = res["per_counterparty"]["media"]["per_key_before_resolution"]
    assert all(before[k] >= counts[k] for k in PRIORITY)
    # the rows are the requester's own rows, and the handle file holds the same ones
    rows_file = pd.read_parquet(res["rows_file"])
    assert sorted(rows_file["_row"]) == sorted(truth)
    lead_ids = load_dataset(query_nodes["oem"].context(), "leads", columns=["lead_id"])
    for r in res["rows"]:
        assert r["lead_id"] == lead_ids["lead_id"].iat[r["_row"]]


def test_three_party_star_equals_plaintext(query_nodes: QueryNodes) -> None:
    res = _completed(query_nodes["oem"],
                     match_spec(counterparties=("media", "dealer"),
                                options={"inline_rows": 100000}))
    leads = stored(query_nodes, "oem", "leads", LEAD_COLS)
    with_media = plaintext_resolution(
        leads, stored(query_nodes, "media", "users", LEAD_COLS), LEAD_COLS, LEAD_COLS)
    with_dealer = plaintext_resolution(
        leads, stored(query_nodes, "dealer", "activity", ("phone",)), LEAD_COLS, ("phone",))
    both = set(with_media) & set(with_dealer)
    assert {r["_row"] for r in res["rows"]} == both
    assert res["composition"] == "star"
    assert res["per_counterparty"]["dealer"]["matched_rows"] == len(with_dealer)
    for r in res["rows"]:
        assert r["match_key:media"] == with_media[r["_row"]]
        assert r["match_key:dealer"] == "phone"


def test_cardinality_returns_counts_only(query_nodes: QueryNodes) -> None:
    res = _completed(query_nodes["oem"], match_spec(reveal="cardinality"))
    leads = stored(query_nodes, "oem", "leads", LEAD_COLS)
    users = stored(query_nodes, "media", "users", LEAD_COLS)
    for kind in PRIORITY:
        want = len(set(leads[kind].dropna()) & set(users[kind].dropna()))
        assert res["per_key"][kind] == want
    assert set(res) == {"type", "mode", "counterparty", "per_key", "counterparty_items",
                        "note", "_id"}
    assert not (query_nodes["oem"].dir / "data" / "matches" / f"match-{res['_id']}.json"
                ).exists()


def test_duplicates_and_an_empty_set(query_nodes: QueryNodes, tmp_path: Path) -> None:
    oem, media = query_nodes["oem"], query_nodes["media"]
    base = pd.read_parquet(query_nodes.data / "tiny_leads.parquet")
    dup = pd.concat([base, base.head(8), base.head(3)], ignore_index=True)
    dup.loc[len(base), "phone"] = None  # a duplicate row that still matches by email
    path = tmp_path / "dup.parquet"
    dup.to_parquet(path, index=False)
    empty = tmp_path / "empty.parquet"
    base.head(0).to_parquet(empty, index=False)
    policy = BASE_POLICIES["oem"] + """
[datasets.dup_leads.columns]
phone = ["join_key"]
email = ["join_key"]
device_id = ["join_key"]
[datasets.empty_leads.columns]
phone = ["join_key"]
email = ["join_key"]
device_id = ["join_key"]
"""
    with policy_override(oem, policy):
        upload(oem, "dup_leads", path, "phone,email,device_id")
        res = _completed(oem, match_spec(dataset="dup_leads",
                                         cp_datasets={"media": "tiny_users"}))
        mine = stored(query_nodes, "oem", "dup_leads", LEAD_COLS)
        theirs = stored(query_nodes, "media", "tiny_users", LEAD_COLS)
        truth = plaintext_resolution(mine, theirs, LEAD_COLS, LEAD_COLS)
        assert {r["_row"]: r["match_key"] for r in res["rows"]} == truth
        assert not any(r >= len(base) for r in truth)  # a duplicate never matches twice
        try:
            upload(oem, "empty_leads", empty, "phone,email,device_id")
        except PeerCallError as exc:  # an empty upload may be refused outright: fine too
            assert exc.status is not None and 400 <= exc.status < 500
            return
        q = wait_state(oem, submit(oem, match_spec(dataset="empty_leads"))["id"])
    assert (q["state"], q["error"]["code"]) == ("failed", "min_intersection_size")
    assert wait_state(media, q["id"])["state"] in {"failed", "completed"}


def test_counterparty_ledger_and_logs_hold_no_identifier(query_nodes: QueryNodes) -> None:
    res = _completed(query_nodes["oem"], match_spec())
    media = query_nodes["media"]
    wait_state(media, res["_id"])
    leads = stored(query_nodes, "oem", "leads", LEAD_COLS)
    users = stored(query_nodes, "media", "users", LEAD_COLS)
    secrets_ = {v for frame in (leads, users) for c in LEAD_COLS for v in frame[c].dropna()
                if len(v) >= 6}
    blob = b"\n".join(ledger_bodies(media)) + media.log().encode()
    found = [v for v in secrets_ if v.encode() in blob]
    assert found == []
    assert "match-" not in media.log()  # the handle exists at the requester only


def test_match_handle_feeds_segment_stats(query_nodes: QueryNodes) -> None:
    oem = query_nodes["oem"]
    res = _completed(oem, match_spec())
    handle = res["handle"]
    rows = pd.read_parquet(res["rows_file"])
    spec = stats_spec(group_by=("city",), params={"options": {"match_handle": handle}})
    stats = _completed(oem, spec)
    assert stats["matched_rows"] == len(rows)
    cities = load_dataset(oem.context(), "leads", columns=["city"])["city"]
    truth = cities.iloc[rows["_row"].to_numpy()].groupby(cities).size()
    got = {g["key"]["city"]: g["count"] for g in stats["groups"]}
    assert got == {k: int(v) for k, v in truth.items() if v >= 5}
    # no PSI session ran for it
    q = show(oem, stats["_id"])
    assert q["state"] == "completed"
    # a handle made with other counterparties is refused naming the field
    bad = stats_spec(counterparties=("dealer",), params={"options": {"match_handle": handle}})
    q2 = wait_state(oem, submit(oem, bad)["id"])
    assert (q2["state"], q2["error"]["field"]) == ("failed", "params.options.match_handle")


def test_small_match_fails_naming_the_rule(query_nodes: QueryNodes) -> None:
    oem, media = query_nodes["oem"], query_nodes["media"]
    policy = BASE_POLICIES["media"].replace("min_intersection_size = 10",
                                            "min_intersection_size = 100000")
    with policy_override(media, policy):
        q = wait_state(oem, submit(oem, match_spec())["id"])
    assert (q["state"], q["error"]["rule"]) == ("failed", "media:limits.min_intersection_size")


# --- hostile session messages at a counterparty ------------------------------------------------

MEDIA_HOLDS = BASE_POLICIES["media"].replace(
    'psi_reveal = ["intersection", "cardinality"]',
    'psi_reveal = ["intersection", "cardinality"]\nmanual_approval = ["match"]')


def _held_query(nodes: QueryNodes) -> str:
    """A three-party match the dealer approved while the media platform holds it, so the
    OEM never starts its own sessions: the test plays the OEM's part towards the dealer."""
    oem = nodes["oem"]
    qid = str(submit(oem, match_spec(counterparties=("media", "dealer")))["id"])
    wait_state(nodes["media"], qid, {"held"})
    wait_state(nodes["dealer"], qid, {"approved"})
    return qid


def _post(nodes: QueryNodes, qid: str, sid: str, body: bytes, rnd: str = "x") -> bytes:
    with nodes["dealer"].client_from(nodes["oem"], retries=0) as c:
        r = c.request("POST", f"/v1/peer/queries/{qid}/sessions/{sid}/messages", content=body,
                      params={"protocol": "psi", "round": rnd},
                      headers={"Content-Type": "application/octet-stream"}, idempotent=False)
    return bytes(r.content)


def _status(nodes: QueryNodes, qid: str, sid: str, body: bytes) -> int:
    with pytest.raises(PeerCallError) as info:
        _post(nodes, qid, sid, body)
    assert info.value.status is not None
    return int(info.value.status)


def _requester(qid: str, sid: str, phones: list[str]) -> PsiRequester:
    items = [encode_item("phone", p) for p in phones]
    return PsiRequester(items, mode=Mode.INTERSECTION, bucket_count=2,
                        session_id=protocol_session_id(qid, sid))


def test_hostile_messages_get_4xx_and_the_transcript_holds_no_identifier(
    query_nodes: QueryNodes,
) -> None:
    oem = query_nodes["oem"]
    phones = [p for p in stored(query_nodes, "dealer", "activity", ("phone",))["phone"]
              .dropna().head(30)]
    assert phones
    transcript: list[bytes] = []
    with policy_override(query_nodes["media"], MEDIA_HOLDS):
        qids = [_held_query(query_nodes) for _ in range(4)]
        # 1. garbage as the first message
        assert _status(query_nodes, qids[0], "s-garbage", b"\x00garbage" * 9) == 400
        # 2. a truncated HELLO
        sid = "s-trunc"
        hello = _requester(qids[1], sid, phones).start()
        assert _status(query_nodes, qids[1], sid, hello[:-5]) == 400
        # 3. wrong round: a REQUEST before any HELLO
        sid = "s-round"
        request = Request(protocol_session_id(qids[2], sid), 0, bytes([9]) + bytes(31))
        assert _status(query_nodes, qids[2], sid, request.to_bytes()) == 409
        # 4. a replayed bucket batch, after an honest HELLO and first batch
        sid = "s-replay"
        role = _requester(qids[3], sid, phones)
        hello = role.start()
        ack = _post(query_nodes, qids[3], sid, hello)
        role.handle(ack)
        step = role.prepare_request(0)
        assert step.job is not None
        req = role.complete(step, step.job.run())
        assert req is not None
        batch = encode_batch([req])
        reply = _post(query_nodes, qids[3], sid, batch)
        transcript += [hello, ack, batch, reply]
        assert _status(query_nodes, qids[3], sid, batch) == 409
        for qid in qids:
            with oem.operator_client() as c, contextlib.suppress(PeerCallError):
                c.post_json(f"/v1/queries/{qid}/cancel", {})
    blob = b"".join(transcript)
    assert len(blob) > 32 * len(phones)
    assert [p for p in phones if p.encode() in blob] == []
    assert [p for p in phones if p.lstrip("+").encode() in blob] == []


@settings(max_examples=80, deadline=None)
@given(a=st.lists(st.one_of(st.none(), st.text(max_size=8)), max_size=30),
       b=st.lists(st.one_of(st.none(), st.text(max_size=8)), max_size=30))
def test_kind_items_are_the_distinct_encoded_values(a: list[str | None],
                                                    b: list[str | None]) -> None:
    """The packed items (Arrow buffers, kind tag as prefix) are exactly the per-value
    items in column then row order, repeats kept (the PSI role removes them per bucket),
    also for values holding NUL or non-ASCII characters; columns of another kind are left
    out. The same from a pandas frame and from an Arrow table."""
    n = max(len(a), len(b))
    frame = pd.DataFrame({"p1": a + [None] * (n - len(a)), "p2": b + [None] * (n - len(b)),
                          "e": ["x@y"] * n})
    kinds: dict[str, Any] = {"p1": "phone", "p2": "phone", "e": "email"}
    want = [encode_item("phone", v) for col in (a, b) for v in col if v is not None]
    for data in (frame, pa.Table.from_pandas(frame)):
        got = kind_items(data, ["p1", "p2", "e"], kinds, "phone")
        assert list(got) == want
        assert [got[i] for i in range(len(got))] == want


@settings(max_examples=50, deadline=None)
@given(origins=st.lists(st.one_of(st.none(), st.tuples(st.integers(0, 2**40),
                                                       st.sampled_from(["phone", "email",
                                                                        "device_id"]))),
                        max_size=30))
def test_compact_origins_read_back_as_given(origins: list[Any]) -> None:
    """The requester's origins in two arrays give back every (row, kind) and every dummy."""
    compact = CompactOrigins(origins)
    assert len(compact) == len(origins)
    assert [compact[i] for i in range(len(origins))] == origins
    assert compact[1:4] == origins[1:4]
