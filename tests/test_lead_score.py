"""``lead_score`` through three real nodes, on a model trained once (module scope) with
``train_lead_model`` (the nodes, policies and data of tests/test_lead_model.py, imported).

Checks: strict grades equal the grading of the standard-mode probabilities (both through the
nodes) except within fixed-point error of a threshold; standard probabilities equal the
plaintext sum of the stored slices on the ground-truth features for the leads the PSI
aligned like the ground truth; grade A and the top decile convert above average on the
generator's held-out labels; in strict mode no message of either session (captured by
driving the same runner in-process against the nodes' own contexts) and no ledger holds a
host's plaintext partial score (positive control: the needles equal the zero-row labels the
hosts published for standard mode); a missing or unfinished model fails naming
``params.options.model``; a tampered ciphertext at the key holder gives a 4xx and fails
the query there. Standard mode reads the hosts' ``partial_scores`` tables (published once
at module scope); tests/test_lead_score_standard.py checks it in detail."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import RunningNode
from test_lead_model import _policy, _score, _slice, lm_nodes, train_spec
from test_queries_support import ledger_bodies, result, submit, wait_state, write_policy

from cleanroom.anonq import tables
from cleanroom.identity import infer_kind, normalize_series
from cleanroom.policy import parse_spec
from cleanroom.queries import lead_score as ls
from cleanroom.queries.lead_model import _load_party
from cleanroom.queries.runners import CounterpartyRun, RequesterRun, Threshold, get_runner
from cleanroom.queries.store import node_policy
from cleanroom.synth.model import fit_features
from cleanroom.transport import PeerCallError
from protocols.labeled_psi import oprf
from protocols.vertical_lr import GradeSpec, StrictGrader, encode_partial_label
from protocols.vertical_lr.fixedpoint import encode_scores
from protocols.vertical_lr.scoring import GRADE_FRAC_BITS

__all__ = ["lm_nodes"]  # the imported fixture, module-scoped here

Nodes = tuple[dict[str, RunningNode], Path]


def score_spec(model: str, **options: Any) -> dict[str, Any]:
    spec = train_spec()
    spec["type"] = "lead_score"
    spec["params"]["reveal_counterparty_rows"] = False  # neither mode reveals a host's rows
    spec["params"]["options"] = {"model": model, "subset": "unlabelled", **options}
    spec["inputs"]["oem"][2]["columns"] = {"lead_id": "row_id"}  # which leads are labelled
    return spec


@pytest.fixture(scope="module")
def trained(lm_nodes: Nodes) -> str:
    nodes, _ = lm_nodes
    qid = str(submit(nodes["oem"], train_spec())["id"])
    q = wait_state(nodes["oem"], qid, timeout=240)
    assert q["state"] == "completed", q
    for p in ("media", "dealer"):
        assert wait_state(nodes[p], qid)["state"] == "completed"
    return qid


def _run(node: RunningNode, spec: dict[str, Any]) -> tuple[dict[str, Any], pd.DataFrame]:
    qid = submit(node, spec)["id"]
    q = wait_state(node, qid, timeout=120)
    assert q["state"] == "completed", json.dumps(q)[:3000]
    res: dict[str, Any] = result(node, qid)["result"]
    return res, pd.read_parquet(res["result_file"])


@pytest.fixture(scope="module")
def published(lm_nodes: Nodes, trained: str) -> dict[str, dict[str, Any]]:
    """The hosts' partial_scores tables of the trained model (standard mode reads them)."""
    nodes, _ = lm_nodes
    out: dict[str, dict[str, Any]] = {}
    for host in ("media", "dealer"):
        with nodes[host].operator_client(timeout=300.0) as c:
            out[host] = c.post_json("/v1/anonq/tables/partial_scores/publish",
                                    {"kind": "partial_scores", "model": trained,
                                     "min_bucket_size": 1})
    return out


@pytest.fixture(scope="module")
def graded(lm_nodes: Nodes, trained: str, published: dict[str, dict[str, Any]]
           ) -> dict[str, tuple[dict[str, Any], pd.DataFrame]]:
    nodes, _ = lm_nodes
    return {
        "strict": _run(nodes["oem"], score_spec(trained)),
        "standard": _run(nodes["oem"], score_spec(trained, mode="standard",
                                                  include_probability=True)),
    }


def _leads_sharing_an_identifier(data: Path) -> set[str]:
    leads = pd.read_parquet(data / "oem/leads.parquet")
    out: set[str] = set()
    for column in ("phone", "email", "device_id"):
        ids, _report = normalize_series(infer_kind(column), leads[column], column)
        dup = ids.notna() & ids.duplicated(keep=False)
        out.update(leads.lead_id[dup])
    return out


def _logit(p: np.ndarray) -> np.ndarray:
    return np.asarray(np.log(p / (1 - p)))


def test_grades_match_plaintext_and_convert(lm_nodes: Nodes, trained: str,
                                            graded: dict[str, Any]) -> None:
    nodes, data = lm_nodes
    (s_res, strict), (_, std) = graded["strict"], graded["standard"]
    eval_ids = pd.read_parquet(data / "ground_truth/eval_labels.parquet")
    assert sorted(strict.lead_id) == sorted(eval_ids.lead_id) == sorted(std.lead_id)
    assert s_res["leads"] == len(eval_ids) and sum(s_res["grades"].values()) == len(eval_ids)
    assert "probability" not in strict.columns and "probability" in std.columns
    merged = strict.merge(std, on="lead_id", suffixes=("_strict", "_std"))
    # strict (2^-16 fixed point, blinded) equals standard (2^-24) away from the thresholds
    spec = GradeSpec()
    p = merged.probability.to_numpy(float)
    near = np.zeros(len(p), dtype=bool)
    for t in spec.thresholds:
        near |= np.abs(_logit(p) - _logit(np.asarray(t))) < 1e-3
    assert (merged.grade_std.to_numpy() == np.asarray(spec.grade(p))).all()
    agree = merged.grade_strict.to_numpy() == merged.grade_std.to_numpy()
    # Leads that share an identifier with another lead (a person who left two leads) are
    # where the modes differ by design: strict matching is one-to-one (the host record
    # goes to one of the leads, the other gets the zero-row score), standard lookups give
    # every lead its first hit (docs/protocols/lead-scoring.md).
    shared = merged.lead_id.isin(_leads_sharing_an_identifier(data)).to_numpy()
    assert shared.mean() < 0.1
    assert agree[~near & ~shared].all(), merged[~agree & ~near & ~shared].head()
    # standard probabilities = plaintext sum of the stored slices on ground-truth features
    slices = {q: _slice(nodes[q], trained) for q in nodes}
    gt = pd.read_parquet(data / "ground_truth/lead_features.parquet").set_index("lead_id")
    gt = gt.loc[merged.lead_id]
    s = np.sum([_score(slices[q], gt[list(fit_features(q))].to_numpy(float))
                for q in ("oem", "media", "dealer")], axis=0)
    a, b = slices["oem"]["platt"]
    plain = 1 / (1 + np.exp(-(a * s + b)))
    close = np.abs(plain - p) < 1e-3  # quantised features; PSI vs ground-truth joins
    print(f"standard vs plaintext: {close.mean():.3f} of leads within 1e-3")
    assert close.mean() > 0.9
    # quality on the generator's held-out labels
    y = eval_ids.set_index("lead_id").loc[merged.lead_id].converted.to_numpy(bool)
    base = y.mean()
    grade_a = merged.grade_strict.to_numpy() == "A"
    top = np.argsort(-p)[: max(1, len(p) // 10)]
    print(f"base {base:.3f} grade A {y[grade_a].mean():.3f} ({grade_a.sum()}) "
          f"top decile {y[top].mean():.3f} grades {s_res['grades']}")
    assert grade_a.sum() > 0 and y[grade_a].mean() > 1.5 * base
    assert y[top].mean() > 2.0 * base
    # no ledger holds a plaintext partial score of a host (9-byte label or 2^-16 word)
    needles = _partial_needles(slices, gt)
    for node in nodes.values():
        blob = b"\n".join(ledger_bodies(node))
        assert not any(n in blob for n in needles)


def _partial_needles(slices: dict[str, Any], gt: pd.DataFrame) -> list[bytes]:
    out: list[bytes] = []
    for q in ("media", "dealer"):
        u = _score(slices[q], gt[list(fit_features(q))].to_numpy(float))
        for v in u[np.abs(u) > 1e-3][:300]:
            out.append(encode_partial_label(float(v)))
            out.append(int(np.rint(v * 2**GRADE_FRAC_BITS)).to_bytes(8, "big", signed=True))
            out.append(int(encode_scores(np.asarray([v]))[0]).to_bytes(8, "big", signed=True))
    return out


class _Loopback:
    """A requester channel that hands each message to a counterparty responder in this
    process (built from the node's own context) and keeps every body both ways."""

    def __init__(self, runner: Any, crun: CounterpartyRun, peer: str, protocol: str,
                 name: str, bodies: list[bytes]) -> None:
        self.peer, self.protocol, self.session_id = peer, protocol, f"s-{name}-{peer}"
        self.qid = crun.query_id
        self.responder = runner.open_responder(crun, self.session_id, protocol, "oem")
        self.bodies = bodies

    @property
    def protocol_session_id(self) -> bytes:
        return ls.protocol_session_id(self.qid, self.session_id)

    def exchange(self, message: bytes, *, round: str) -> bytes:
        reply: bytes = self.responder.handle(message)
        self.bodies += [message, reply]
        return reply

    def __enter__(self) -> _Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _transcript(nodes: dict[str, RunningNode], spec_doc: dict[str, Any], qid: str
                ) -> list[bytes]:
    spec = parse_spec(spec_doc)
    runner = get_runner("lead_score")
    ctxs = {p: n.context() for p, n in nodes.items()}
    bodies: list[bytes] = []

    def session(peer: str, protocol: str, name: str) -> _Loopback:
        crun = CounterpartyRun(ctxs[peer], qid, spec, node_policy(ctxs[peer]))
        return _Loopback(runner, crun, peer, protocol, name, bodies)

    run = RequesterRun(ctxs["oem"], qid, spec, node_policy(ctxs["oem"]),
                       Threshold(10, "spec:test"), Threshold(5, "spec:test"), session,
                       lambda: None)
    assert runner is not None
    runner.run(run)
    return bodies


def _host_needles(nodes: dict[str, RunningNode], spec_doc: dict[str, Any]
                  ) -> dict[str, list[bytes]]:
    """Exact plaintext encodings of the hosts' partial scores, as each host computes them:
    its zero-row score first, then a sample of its records (all are in its strict table)."""
    spec = parse_spec(spec_doc)
    out: dict[str, list[bytes]] = {}
    for host in ("media", "dealer"):
        ctx = nodes[host].context()
        _, _, feats, _ = _load_party(ctx, spec, host)
        model, _ = ls.load_own_slice(ctx, spec, host, feats.columns)
        u = model.partial_scores(np.vstack([np.zeros((1, len(feats.columns))),
                                            feats.values[::max(1, len(feats.keys) // 300)]]))
        out[host] = [w for v in u for w in (
            encode_partial_label(float(v)),
            int(np.rint(v * 2**GRADE_FRAC_BITS)).to_bytes(8, "big", signed=True))]
    return out


def _open_own_label(node: RunningNode, item: bytes) -> bytes | None:
    """The label of ``item`` in the node's published partial_scores table, opened with the
    owner's own key (test-only: no querier can do this without the owner's evaluation)."""
    src = tables.load_serving(node.dir / "data", "partial_scores")
    tag_key = oprf.TagDeriver(src.current.table_id).derive(oprf.oprf_direct(src.key, [item]))
    return src.current.open([tag_key])[0]


def test_strict_transcript_holds_no_partial_score(lm_nodes: Nodes, trained: str,
                                                  published: dict[str, dict[str, Any]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEANROOM_PSI_WORKERS", "0")
    nodes, _ = lm_nodes
    needles = _host_needles(nodes, score_spec(trained))
    strict = b"".join(_transcript(nodes, score_spec(trained), "q-transcript-strict"))
    assert len(strict) > 1_000_000  # the hosts' encrypted tables went through
    for host, words in needles.items():
        assert not any(w in strict for w in words), host
    # positive control: the needles are the hosts' exact encodings (the zero-row label each
    # host published for standard mode, opened with its own key, is the first needle)
    for host, words in needles.items():
        assert _open_own_label(nodes[host], tables.ZERO_ROW_ITEM) == words[0], host


def test_missing_or_unfinished_model_fails_naming_the_option(lm_nodes: Nodes,
                                                             trained: str) -> None:
    nodes, _ = lm_nodes
    oem = nodes["oem"]
    q = wait_state(oem, submit(oem, score_spec("q-nosuchmodel"))["id"])
    assert (q["state"], q["error"]["field"]) == ("failed", "params.options.model"), q
    bad_train = train_spec(validation_fraction=0.9)  # refused: not a finished model
    denied = wait_state(oem, submit(oem, bad_train)["id"])
    assert denied["state"] == "denied"
    q = wait_state(oem, submit(oem, score_spec(denied["id"]))["id"])
    assert (q["state"], q["error"]["field"]) == ("failed", "params.options.model"), q
    assert "denied, not completed" in json.dumps(q)
    # thresholds that do not decrease are refused naming the option
    q = wait_state(oem, submit(oem, score_spec(trained, thresholds=[0.1, 0.2, 0.3]))["id"])
    assert (q["state"], q["error"]["field"]) == ("denied", "params.options.thresholds"), q


def test_tampered_ciphertext_gets_4xx_and_fails_the_query(lm_nodes: Nodes,
                                                          trained: str) -> None:
    """The dealer holds the query, so the OEM never runs: the test plays the OEM towards
    the media platform (the key holder) and tampers with a blinded-comparison ciphertext."""
    from cleanroom.queries.psi_session import new_requester, run_requester
    from protocols.psi import Mode
    from protocols.psi.multikey import encode_item

    nodes, data = lm_nodes
    oem, media = nodes["oem"], nodes["media"]
    holds = _policy("dealer", reveal=True).replace(
        'psi_reveal = ["intersection"]',
        'psi_reveal = ["intersection"]\nmanual_approval = ["lead_score"]')
    write_policy(nodes["dealer"], holds)
    try:
        qid = str(submit(oem, score_spec(trained))["id"])
        wait_state(nodes["dealer"], qid, {"held"})
        wait_state(media, qid, {"approved"})
    finally:
        write_policy(nodes["dealer"], _policy("dealer", reveal=True))
    sid = "s-tamper"
    phones = list(pd.read_parquet(data / "oem/leads.parquet").phone.dropna().head(40))

    class _Post:
        peer, protocol, session_id = "media", ls.PROTOCOL, sid

        @property
        def protocol_session_id(self) -> bytes:
            return ls.protocol_session_id(qid, sid)

        def exchange(self, message: bytes, *, round: str) -> bytes:
            with media.client_from(oem, retries=0) as c:
                r = c.request("POST", f"/v1/peer/queries/{qid}/sessions/{sid}/messages",
                              content=message, params={"protocol": ls.PROTOCOL, "round": round},
                              headers={"Content-Type": "application/octet-stream"},
                              idempotent=False)
            return bytes(r.content)

    ch = _Post()
    role = new_requester([encode_item("phone", str(p)) for p in phones],
                         mode=Mode.INTERSECTION, want_labels=True,
                         session_id=ch.protocol_session_id)
    run_requester(ch, role, check_alive=lambda: None)
    kind, blob = ls.unframe(ch.exchange(ls.frame(ls.SETUP, b""), round="setup"))
    assert kind == ls.READY
    pub = ls.decode_key_blob(qid, blob, oem.context().peer_public_key("media"))
    kind, rows = ls.unframe(ch.exchange(ls.frame(ls.TABLE, (0).to_bytes(4, "big")),
                                        round="table"))
    width = (pub.nsquare.bit_length() + 7) // 8
    zero = rows[12:12 + width]
    grader = StrictGrader(ls.protocol_session_id(qid, "grade"), pub, GradeSpec(), (1.0, 0.0))
    msg = bytearray(grader.blind_batch(0, np.zeros(4), [[zero] * 4]))
    msg[-40] ^= 0x01
    with pytest.raises(PeerCallError) as info:
        ch.exchange(ls.frame(ls.GRADE, bytes(msg)), round="grade")
    assert info.value.status is not None and 400 <= info.value.status < 500
    q = wait_state(media, qid, {"failed"})
    assert q["error"]["code"] == "protocol_error", q
    with oem.operator_client() as c:
        c.post_json(f"/v1/queries/{qid}/cancel", {})
    assert wait_state(oem, qid)["state"] in {"cancelled", "failed"}


@pytest.fixture(autouse=True)
def _no_leftover_policy(lm_nodes: Nodes) -> Iterator[None]:
    yield
    nodes, _ = lm_nodes
    write_policy(nodes["dealer"], _policy("dealer", reveal=True))
