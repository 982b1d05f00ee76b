"""Vertical federated LR (protocols.vertical_lr.training): the three roles driven in-process
by passing bytes, against the plaintext Taylor reference; transcripts; tampering, replays,
wrong keys; the full-size quality run is marked slow."""

from __future__ import annotations

import collections
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cleanroom.synth import SynthConfig, generate
from cleanroom.synth.model import fit_features, fit_logistic, predict_logit
from protocols.errors import RemoteProtocolError
from protocols.paillier import PrivateKey, PublicKey, generate_keypair
from protocols.vertical_lr import (
    Party,
    State,
    TrainingConfig,
    TrainingGuest,
    TrainingHost,
    auc,
    session_shape,
    train_plaintext,
)
from protocols.vertical_lr.messages import MsgType, decode

VECTORS = Path(__file__).parent / "vectors" / "paillier" / "djn_kat.json"
Keys = tuple[PublicKey, PrivateKey]


def _test_key() -> Keys:
    import json

    doc = json.loads(VECTORS.read_text())
    n, p, q = (int(doc[k], 16) for k in ("n", "p", "q"))
    pub = PublicKey(n)
    return pub, PrivateKey(pub, p, q)


@pytest.fixture(scope="session")
def three_keys() -> list[Keys]:
    return [_test_key(), generate_keypair(2048), generate_keypair(2048)]


@dataclass
class Data:
    x: dict[str, np.ndarray]
    y: np.ndarray
    train: np.ndarray  # protocol training rows
    val: np.ndarray  # protocol validation rows
    test: np.ndarray  # the generator's held-out evaluation split


def load_data(leads: int, seed: int) -> Data:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "synth"
        generate(out, SynthConfig(leads=leads, seed=seed))
        # rows joined by ground-truth identity (the PSI wiring is the node's job)
        tab = pq.read_table(out / "ground_truth" / "lead_features.parquet").to_pandas()
    is_train = (tab["split"] == "train").to_numpy()
    idx = np.flatnonzero(is_train)
    n_val = len(idx) // 5
    return Data(
        x={p: tab[list(fit_features(p))].to_numpy(dtype=np.float64)
           for p in ("oem", "media", "dealer")},
        y=tab["converted"].to_numpy().astype(np.float64),
        train=idx[:-n_val], val=idx[-n_val:], test=np.flatnonzero(~is_train))


def make_roles(data: Data, cfg: TrainingConfig, keys: list[Keys],
               sid: bytes | None = None) -> dict[Party, TrainingGuest | TrainingHost]:
    sid = sid or secrets.token_bytes(16)
    x, tr, va = data.x, data.train, data.val
    shape = session_shape(len(tr), len(va), x["oem"].shape[1], x["media"].shape[1],
                          x["dealer"].shape[1])
    return {
        Party.GUEST: TrainingGuest(sid, cfg, x["oem"][tr], data.y[tr], x["oem"][va],
                                   data.y[va], shape=shape, keys=keys[0]),
        Party.MEDIA: TrainingHost(Party.MEDIA, sid, cfg, x["media"][tr], x["media"][va],
                                  shape=shape, keys=keys[1]),
        Party.DEALER: TrainingHost(Party.DEALER, sid, cfg, x["dealer"][tr],
                                   x["dealer"][va], shape=shape, keys=keys[2]),
    }


def run(roles: dict[Party, TrainingGuest | TrainingHost],
        transcript: list[tuple[Party, bytes]] | None = None) -> None:
    queue: collections.deque[tuple[Party, bytes]] = collections.deque()
    for role in roles.values():
        queue.extend(role.start())
    while queue:
        to, data = queue.popleft()
        if transcript is not None:
            transcript.append((to, data))
        queue.extend(roles[to].handle(data))


FAST = TrainingConfig(max_epochs=12, eval_every=4, max_checks=3, patience=2)


@pytest.fixture(scope="session")
def small() -> Data:
    return load_data(2400, seed=11)


@pytest.fixture(scope="session")
def trained(small: Data, three_keys: list[Keys]) -> tuple[dict[Party, object], list]:
    roles = make_roles(small, FAST, three_keys)
    transcript: list[tuple[Party, bytes]] = []
    run(roles, transcript)
    return roles, transcript  # type: ignore[return-value]


def test_roles_finish_and_match_plaintext_reference(trained: tuple, small: Data) -> None:
    roles, _ = trained
    g, m, d = roles[Party.GUEST], roles[Party.MEDIA], roles[Party.DEALER]
    assert all(r.state == State.DONE for r in roles.values())
    rep = g.report
    assert rep.epochs >= FAST.eval_every and len(rep.check_auc) >= 1
    epochs = rep.check_epochs[rep.best_check] + 1
    ref = train_plaintext([g.x, m.x, d.x], small.y[small.train], FAST, epochs)
    for ours, want in zip((g.w, m.w, d.w), ref, strict=True):
        # fixed-point error only: weights are encoded at 2^-24 for the encrypted products
        np.testing.assert_allclose(ours, want, atol=1e-6, rtol=0)
    assert m.best_check == d.best_check == rep.best_check
    # the guest's validation AUC is the AUC of the joint scores
    scores = sum(r.model().partial_scores(small.x[k][small.val]) for k, r in
                 zip(("oem", "media", "dealer"), (g, m, d), strict=True))
    assert rep.validation_auc == pytest.approx(auc(small.y[small.val], scores), abs=1e-9)
    assert rep.platt[0] > 0 and len(rep.lift) == 10


def test_transcript_holds_no_plaintext_features_or_scores(trained: tuple, small: Data) -> None:
    roles, transcript = trained
    blob = b"".join(data for _, data in transcript)
    for party, key in ((Party.MEDIA, "media"), (Party.DEALER, "dealer")):
        role = roles[party]
        # quantised feature integers as they would be written by a careless encoder
        for col in role.xq.T[:3]:
            needle = np.asarray(col[:4], dtype=">i8").tobytes()
            assert needle not in blob
            assert np.asarray(col[:4], dtype=">f8").tobytes() not in blob
        val_scores = role.model().partial_scores(small.x[key][small.val])
        from protocols.vertical_lr.fixedpoint import encode_scores

        assert np.asarray(encode_scores(val_scores[:4]), dtype=">i8").tobytes() not in blob
    # the guest's labels never leave it: no message to a host carries a raw label column
    labels = np.asarray(small.y[small.train][:64], dtype=np.uint8).tobytes()
    assert labels not in blob
    kinds = collections.Counter(decode(d).type for _, d in transcript)
    assert kinds[MsgType.ROWS] == 3 and kinds[MsgType.SHARE] == 3


def _setup_roles(small: Data, keys: list[Keys]) -> tuple[dict, list[tuple[Party, bytes]]]:
    roles = make_roles(small, FAST, keys)
    first: list[tuple[Party, bytes]] = []
    for r in roles.values():
        first.extend(r.start())
    return roles, first


def test_replayed_message_is_rejected(small: Data, three_keys: list[Keys]) -> None:
    roles, first = _setup_roles(small, three_keys)
    to, keys_msg = next((t, m) for t, m in first if decode(m).type == MsgType.KEYS)
    roles[to].handle(keys_msg)
    with pytest.raises(RemoteProtocolError) as err:
        roles[to].handle(keys_msg)
    assert err.value.status_hint == 409
    assert roles[to].state == State.ERROR


def test_tampered_ciphertext_is_rejected(small: Data, three_keys: list[Keys]) -> None:
    roles, first = _setup_roles(small, three_keys)
    for to, data in first:
        if decode(data).type == MsgType.KEYS:
            roles[to].handle(data)
    to, rows = next((t, m) for t, m in first if decode(m).type == MsgType.ROWS)
    bad = bytearray(rows)
    bad[len(bad) // 2] ^= 0x01
    with pytest.raises(RemoteProtocolError):
        roles[to].handle(bytes(bad))
    assert roles[to].state == State.ERROR


def test_wrong_key_is_rejected(small: Data, three_keys: list[Keys]) -> None:
    # the media host announces one key but encrypts its rows under another
    keys = list(three_keys)
    roles = make_roles(small, FAST, keys)
    other = make_roles(small, FAST, [keys[0], keys[2], keys[1]],
                       sid=roles[Party.GUEST].session_id)
    keys_msgs = [x for x in roles[Party.MEDIA].start() if decode(x[1]).type == MsgType.KEYS]
    rows_msgs = [x for x in other[Party.MEDIA].start() if decode(x[1]).type == MsgType.ROWS]
    guest = roles[Party.GUEST]
    guest.start()
    for to, data in keys_msgs:
        if to == Party.GUEST:
            guest.handle(data)
    to, data = next(x for x in rows_msgs if x[0] == Party.GUEST)
    with pytest.raises(RemoteProtocolError, match="key"):
        guest.handle(data)


def test_garbage_only_raises_remote_error(small: Data, three_keys: list[Keys]) -> None:
    rng = np.random.default_rng(5)
    for blob in (b"", b"CRVL", rng.bytes(40), b"CRVL\x01\x06\x02\x01" + bytes(30)):
        roles, _ = _setup_roles(small, three_keys)
        with pytest.raises(RemoteProtocolError):
            roles[Party.GUEST].handle(blob)


def test_mismatched_config_is_rejected(small: Data, three_keys: list[Keys]) -> None:
    sid = secrets.token_bytes(16)
    a = make_roles(small, FAST, three_keys, sid=sid)
    b = make_roles(small, TrainingConfig(max_epochs=13, eval_every=4), three_keys, sid=sid)
    msg = next(d for t, d in b[Party.MEDIA].start() if t == Party.GUEST)
    a[Party.GUEST].start()
    with pytest.raises(RemoteProtocolError, match="configuration"):
        a[Party.GUEST].handle(msg)


@pytest.mark.slow
def test_quality_full_size(three_keys: list[Keys]) -> None:
    data = load_data(20_000, seed=3)
    cfg = TrainingConfig()
    roles = make_roles(data, cfg, three_keys)
    run(roles)
    slices = {k: roles[p].model() for k, p in (("oem", Party.GUEST), ("media", Party.MEDIA),
                                                ("dealer", Party.DEALER))}
    test = data.test
    fed = sum(s.partial_scores(data.x[k][test]) for k, s in slices.items())
    fed_auc = auc(data.y[test], fed)
    fit_rows = np.concatenate([data.train, data.val])
    xj = np.column_stack([data.x[k] for k in ("oem", "media", "dealer")])
    beta = fit_logistic(xj[fit_rows], data.y[fit_rows])
    central = auc(data.y[test], predict_logit(beta, xj[test]))
    assert fed_auc >= central - 0.01
    for k in ("oem", "media", "dealer"):
        b = fit_logistic(data.x[k][fit_rows], data.y[fit_rows])
        assert fed_auc > auc(data.y[test], predict_logit(b, data.x[k][test])) + 0.02
    from protocols.vertical_lr import lift_by_decile

    lift = lift_by_decile(data.y[test], fed)
    print("federated AUC", fed_auc, "centralised", central)
    print("lift by decile", [round(r["lift"], 2) for r in lift])
    assert lift[0]["lift"] >= 3.0


def test_worker_dot_jobs_equal_inline_products(trained: tuple) -> None:
    import pickle

    from protocols.vertical_lr.training import run_dot_job

    roles, _ = trained
    g = roles[Party.GUEST]
    pub = roles[Party.MEDIA].pub
    rows = pub.encrypt_encoded(list(range(40)))
    expo = np.random.default_rng(5).integers(0, 1 << 16, size=(40, 3))
    expo[:, 2] = 4096  # a constant column takes the grouped path
    inline = [int(c) for c in rows.dot(expo).ciphertexts]
    seen: list[int] = []

    def runner(jobs: list) -> list[list[int]]:
        seen.append(len(jobs))  # jobs cross a process boundary: they must pickle
        return [run_dot_job(pickle.loads(pickle.dumps(j))) for j in jobs]

    old = g.runner, g.jobs
    try:
        g.runner, g.jobs = runner, 3
        assert g._column_products(rows, expo).ciphertexts == inline
        assert seen == [3] and "rows=" in repr(pickle.loads(pickle.dumps(
            __import__("protocols.vertical_lr.training", fromlist=["DotJob"]).DotJob(
                pub.nsquare, (1, 2), np.ones((2, 1), dtype=np.int64)))))
    finally:
        g.runner, g.jobs = old
