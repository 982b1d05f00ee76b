"""Lead grading (protocols.vertical_lr.scoring): standard-mode labels and combination,
strict-mode blinded comparison against the plaintext grade, transcripts, replays, tampering
and wrong keys; the interleaved blinding exponentiation, jobs in worker processes, offline
randomiser pools and adaptive (two-comparison) grading."""

from __future__ import annotations

import json
import multiprocessing as mp
import secrets
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.paillier import PrivateKey, PublicKey, RandomizerPool, generate_keypair
from protocols.vertical_lr import (
    GradeSpec,
    StrictGrader,
    StrictKeyHolder,
    combine_standard,
    decode_partial_label,
    encode_partial_label,
    encrypt_partial_labels,
)
from protocols.vertical_lr.blinding import BlindJob, _windows, reference_packed, run_blind_job
from protocols.vertical_lr.messages import Message, decode, u32
from protocols.vertical_lr.model import sigmoid
from protocols.vertical_lr.scoring import GRADE_FRAC_BITS, ROUND_NEXT, SCORE_LIMIT

VECTORS = Path(__file__).parent / "vectors" / "paillier" / "djn_kat.json"
PLATT = (1.3, -0.4)
SPEC = GradeSpec((0.30, 0.15, 0.05))


@pytest.fixture(scope="module")
def key() -> tuple[PublicKey, PrivateKey]:
    doc = json.loads(VECTORS.read_text())
    n, p, q = (int(doc[k], 16) for k in ("n", "p", "q"))
    pub = PublicKey(n)
    return pub.precompute(), PrivateKey(pub, p, q)


def plaintext_grades(own: np.ndarray, parts: list[np.ndarray]) -> list[str]:
    # the strict mode compares fixed-point sums at GRADE_FRAC_BITS
    q = [np.rint(np.ldexp(a, GRADE_FRAC_BITS)) for a in (own, *parts)]
    s = np.ldexp(sum(q), -GRADE_FRAC_BITS)
    return SPEC.grade(sigmoid(PLATT[0] * s + PLATT[1]))


@settings(max_examples=50, deadline=None)
@given(st.floats(-1000, 1000, allow_nan=False))
def test_partial_label_round_trip(score: float) -> None:
    label = encode_partial_label(score)
    assert len(label) == 9
    assert decode_partial_label(label) == pytest.approx(score, abs=2**-24)


def test_bad_labels_raise_remote_error() -> None:
    for bad in (b"", b"\x02" + bytes(8), bytes(10)):
        with pytest.raises(RemoteProtocolError):
            decode_partial_label(bad)


def test_standard_combination_and_grades() -> None:
    rng = np.random.default_rng(1)
    own, m, d = (rng.normal(0, 1, 50) for _ in range(3))
    prob, grades = combine_standard(own, [m, d], PLATT, SPEC)
    np.testing.assert_allclose(prob, sigmoid(PLATT[0] * (own + m + d) + PLATT[1]))
    assert grades == SPEC.grade(prob)
    assert set(grades) <= {"A", "B", "C", "D"}
    assert SPEC.grade(np.array([0.9, 0.2, 0.1, 0.01])) == ["A", "B", "C", "D"]


def test_grade_spec_validation() -> None:
    for bad in ((0.1, 0.2, 0.05), (0.3, 0.3, 0.1), (1.2, 0.5, 0.1), (0.3, 0.1)):
        with pytest.raises(LocalProtocolError):
            GradeSpec(bad)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        SPEC.score_thresholds((-1.0, 0.0))


def _strict_batch(key: tuple[PublicKey, PrivateKey], n: int, seed: int) -> tuple:
    pub, priv = key
    rng = np.random.default_rng(seed)
    own, m, d = rng.normal(-1.5, 1.2, n), rng.normal(0, 1, n), rng.normal(0, 0.8, n)
    sid = secrets.token_bytes(16)
    grader = StrictGrader(sid, pub, SPEC, PLATT)
    holder = StrictKeyHolder(sid, priv)
    labels = [encrypt_partial_labels(m, pub), encrypt_partial_labels(d, pub)]
    return grader, holder, labels, own, m, d


def test_strict_grades_equal_plaintext_grades(key: tuple[PublicKey, PrivateKey]) -> None:
    grader, holder, labels, own, m, d = _strict_batch(key, 120, seed=2)
    blind = grader.blind_batch(1, own, labels)
    signs = holder.handle(blind)
    grades = grader.handle(signs)
    assert grades == plaintext_grades(own, [m, d])
    assert len(set(grades)) >= 3  # the batch exercises several grades


def test_strict_ties_count_as_passing(key: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = key
    sid = secrets.token_bytes(16)
    grader = StrictGrader(sid, pub, SPEC, PLATT)
    # scores exactly at the C threshold (on the fixed-point grid) grade C, just below D
    t_c = grader._t[2] / 2**GRADE_FRAC_BITS
    own = np.array([t_c, t_c - 2**-GRADE_FRAC_BITS])
    zeros = encrypt_partial_labels(np.zeros(2), pub)
    grades = grader.handle(StrictKeyHolder(sid, priv).handle(
        grader.blind_batch(7, own, [zeros])))
    assert grades == ["C", "D"]


def test_strict_transcript_has_no_plaintext_scores(key: tuple[PublicKey, PrivateKey]) -> None:
    grader, holder, labels, own, m, d = _strict_batch(key, 40, seed=3)
    blind = grader.blind_batch(2, own, labels)
    signs = holder.handle(blind)
    blob = blind + signs + b"".join(labels[0]) + b"".join(labels[1])
    for arr in (own, m, d, own + m + d):
        for v in arr[:10]:
            for f in (GRADE_FRAC_BITS, 24):
                i = int(np.rint(v * 2**f))
                for size in (4, 8):
                    try:
                        needle = i.to_bytes(size, "big", signed=True)
                    except OverflowError:
                        continue
                    assert needle not in blob
            assert np.float64(v).tobytes() not in blob
            assert np.array([v], dtype=">f8").tobytes() not in blob
    # the key holder's answer is one bit per comparison, nothing else
    assert len(decode(signs).parts[0]) == (40 * 3 + 7) // 8


def test_strict_signs_are_scrambled(key: tuple[PublicKey, PrivateKey]) -> None:
    # the same scores graded twice give unrelated sign patterns at the key holder
    grader, holder, labels, own, m, d = _strict_batch(key, 60, seed=4)
    labels2 = [encrypt_partial_labels(m, key[0]), encrypt_partial_labels(d, key[0])]
    s1 = decode(holder.handle(grader.blind_batch(10, own, labels))).parts[0]
    s2 = decode(holder.handle(grader.blind_batch(11, own, labels2))).parts[0]
    assert s1 != s2
    bits = np.unpackbits(np.frombuffer(s1 + s2, dtype=np.uint8))[: 2 * 180]
    assert 0.3 < bits.mean() < 0.7


def test_strict_replay_and_tamper(key: tuple[PublicKey, PrivateKey]) -> None:
    grader, holder, labels, own, _, _ = _strict_batch(key, 20, seed=5)
    blind = grader.blind_batch(3, own, labels)
    bad = bytearray(blind)
    bad[-100] ^= 0x40
    with pytest.raises(RemoteProtocolError):
        holder.handle(bytes(bad))
    signs = holder.handle(blind)
    with pytest.raises(RemoteProtocolError) as err:
        holder.handle(blind)  # replayed batch
    assert err.value.status_hint == 409
    grader.handle(signs)
    with pytest.raises(RemoteProtocolError):
        grader.handle(signs)  # replayed answer
    with pytest.raises(LocalProtocolError):
        grader.blind_batch(3, own, labels)  # batch ids are single-use


def test_strict_wrong_key(key: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = key
    other_pub, other_priv = generate_keypair(2048)
    sid = secrets.token_bytes(16)
    grader = StrictGrader(sid, pub, SPEC, PLATT)
    labels = [encrypt_partial_labels(np.zeros(5), pub)]
    blind = grader.blind_batch(1, np.zeros(5), labels)
    with pytest.raises(RemoteProtocolError, match="key"):
        StrictKeyHolder(sid, other_priv).handle(blind)
    # labels made under another key are not valid ciphertexts of this key's width/range
    wrong = encrypt_partial_labels(np.zeros(5), other_pub)
    bad = [b"\xff" * len(wrong[0])] * 5
    with pytest.raises(RemoteProtocolError):
        StrictGrader(sid, pub, SPEC, PLATT).blind_batch(2, np.zeros(5), [bad])


# -- faster blinding: interleaved exponentiation, jobs, adaptive comparisons ---------------
def test_blind_job_equals_plain_formula(key: tuple[PublicKey, PrivateKey]) -> None:
    # the interleaved (Straus-style) exponentiation gives the very same ciphertext as one
    # powmod per comparison followed by the 2^v shifts
    pub, _ = key
    rng = np.random.default_rng(11)
    bases = [int(c) for c in pub.encrypt(rng.normal(0, 3, 7), frac_bits=16).ciphertexts]
    cts = []
    for _ in range(3):
        cts.append(tuple((int(rng.integers(7)), bool(rng.integers(2)),
                          secrets.randbits(31) | 1 << 31, int(rng.integers(17)))
                         for _ in range(int(rng.integers(1, 25)))))
    consts = tuple(secrets.randbelow(pub.n) for _ in cts)
    job = BlindJob(pub.n, 82, tuple(bases), tuple(cts), consts)
    assert run_blind_job(job) == [reference_packed(pub.n, 82, bases, s, c)
                                  for s, c in zip(cts, consts, strict=True)]
    assert "m=" not in repr(job) and str(bases[0]) not in repr(job)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, (1 << 40) - 1), st.integers(1, 4))
def test_sliding_windows_reassemble(m: int, w: int) -> None:
    digits = _windows(m, w)
    assert sum((2 * d + 1) << pos for pos, d in digits) == m
    assert all(a[0] > b[0] for a, b in pairwise(digits))
    assert all(2 * d + 1 < 1 << w for _, d in digits)


def _run_adaptive(grader: StrictGrader, holder: StrictKeyHolder, batch: int,
                  own: np.ndarray, labels: list[list[bytes]]) -> tuple[list[str], list[bytes]]:
    sent = [grader.blind_batch(batch, own, labels)]
    first = grader.step(holder.handle(sent[0]))
    assert first.grades is None and first.reply is not None and first.batch_id == batch
    sent.append(first.reply)
    last = grader.step(holder.handle(first.reply))
    assert last.reply is None and last.grades is not None
    return last.grades, sent


def test_adaptive_grades_equal_plaintext_grades(key: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = key
    rng = np.random.default_rng(12)
    n = 150
    own, m, d = rng.normal(-1.5, 1.2, n), rng.normal(0, 1, n), rng.normal(0, 0.8, n)
    sid = secrets.token_bytes(16)
    grader = StrictGrader(sid, pub, SPEC, PLATT, adaptive=True, jobs_per_batch=3)
    holder = StrictKeyHolder(sid, priv)
    labels = [encrypt_partial_labels(m, pub), encrypt_partial_labels(d, pub)]
    grades, sent = _run_adaptive(grader, holder, 4, own, labels)
    assert grades == plaintext_grades(own, [m, d])
    assert set(grades) == {"A", "B", "C", "D"}
    # two values per lead in each of the two exchanges' counts, nothing else
    assert [u32(decode(b).parts[0], "count") for b in sent] == [n, n]
    assert not grader.pending
    with pytest.raises(LocalProtocolError):
        grader.handle(holder.handle(grader.blind_batch(5, own, labels)))


def test_adaptive_ties_and_transcript(key: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = key
    sid = secrets.token_bytes(16)
    grader = StrictGrader(sid, pub, SPEC, PLATT, adaptive=True)
    holder = StrictKeyHolder(sid, priv)
    step = 2.0**-GRADE_FRAC_BITS
    t_a, t_b, t_c = (t * step for t in grader._t)
    own = np.array([t_a, t_a - step, t_b, t_b - step, t_c, t_c - step])
    zeros = encrypt_partial_labels(np.zeros(6), pub)
    grades, sent = _run_adaptive(grader, holder, 1, own, [zeros])
    assert grades == ["A", "B", "B", "C", "C", "D"]
    blob = b"".join(sent)
    for v in own:
        for size in (4, 8):
            assert int(np.rint(v * 2**GRADE_FRAC_BITS)).to_bytes(size, "big",
                                                                 signed=True) not in blob


def test_adaptive_round_rules(key: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = key
    rng = np.random.default_rng(13)
    own = rng.normal(-1, 1, 30)
    labels = [encrypt_partial_labels(rng.normal(0, 1, 30), pub)]
    sid = secrets.token_bytes(16)
    grader = StrictGrader(sid, pub, SPEC, PLATT, adaptive=True)
    holder = StrictKeyHolder(sid, priv)
    first = grader.blind_batch(1, own, labels)
    signs1 = holder.handle(first)
    with pytest.raises(RemoteProtocolError) as err:
        holder.handle(first)  # replayed first round
    assert err.value.status_hint == 409
    second = grader.step(signs1).reply
    assert second is not None
    with pytest.raises(RemoteProtocolError):
        grader.step(signs1)  # the first round's answer again: wrong round now
    signs2 = holder.handle(second)
    with pytest.raises(RemoteProtocolError) as err:
        holder.handle(second)  # no third comparison per lead
    assert err.value.status_hint == 409
    assert grader.step(signs2).grades is not None
    # a second round whose ciphertexts were lifted from the first round is rejected
    other = StrictGrader(sid, pub, SPEC, PLATT, adaptive=True)
    blind = decode(other.blind_batch(2, own, labels))
    forged = Message(blind.type, blind.sender, blind.recipient, blind.session_id, blind.seq,
                     (*blind.parts[:3], bytes([ROUND_NEXT]))).to_bytes()
    with pytest.raises(RemoteProtocolError):
        StrictKeyHolder(sid, priv).handle(forged)
    holder2 = StrictKeyHolder(sid, priv)
    holder2.handle(other.blind_batch(3, own, labels))
    with pytest.raises(RemoteProtocolError, match="context"):
        holder2.handle(Message(blind.type, blind.sender, blind.recipient, blind.session_id,
                               3, (*blind.parts[:3], bytes([ROUND_NEXT]))).to_bytes())


def test_key_holder_refuses_partial_threshold_sets(key: tuple[PublicKey, PrivateKey]) -> None:
    # one exchange must carry exactly one value per lead and threshold (a multiple of 3)
    pub, priv = key
    sid = secrets.token_bytes(16)
    grader = StrictGrader(sid, pub, SPEC, PLATT)
    blind = decode(grader.blind_batch(1, np.zeros(4), [encrypt_partial_labels(np.zeros(4),
                                                                              pub)]))
    bad = Message(blind.type, blind.sender, blind.recipient, blind.session_id, blind.seq,
                  ((11).to_bytes(4, "big"), *blind.parts[1:])).to_bytes()
    with pytest.raises(RemoteProtocolError):
        StrictKeyHolder(sid, priv).handle(bad)


def test_process_pool_runner_and_offline_pool(key: tuple[PublicKey, PrivateKey]) -> None:
    # jobs are picklable and run in worker processes; randomisers come from the pool
    pub, priv = key
    rng = np.random.default_rng(14)
    own, m = rng.normal(-1.5, 1.2, 60), rng.normal(0, 1, 60)
    labels = [encrypt_partial_labels(m, pub)]
    pool = RandomizerPool(pub, 8, refill_on_empty=False)
    sid = secrets.token_bytes(16)
    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("fork")) as ex:
        grader = StrictGrader(sid, pub, SPEC, PLATT, jobs_per_batch=2, pool=pool,
                              runner=lambda jobs: list(ex.map(run_blind_job, jobs)))
        blind = grader.blind_batch(1, own, labels)
    assert len(pool) == 8 - (60 * 3 + grader.slots - 1) // grader.slots
    assert grader.handle(StrictKeyHolder(sid, priv).handle(blind)) == plaintext_grades(own,
                                                                                       [m])


def test_strict_range_checks(key: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = key
    sid = secrets.token_bytes(16)
    grader = StrictGrader(sid, pub, SPEC, PLATT)
    labels = [encrypt_partial_labels(np.zeros(2), pub)]
    for bad in (np.array([0.0, SCORE_LIMIT]), np.array([np.nan, 0.0])):
        with pytest.raises(LocalProtocolError) as err:
            grader.blind_batch(1, bad, labels)
        assert err.value.status_hint == 400
    with pytest.raises(LocalProtocolError):
        StrictGrader(sid, pub, SPEC, (1e-6, 0.0))  # thresholds far outside the slot range
    with pytest.raises(LocalProtocolError):
        StrictGrader(sid, pub, SPEC, PLATT, jobs_per_batch=0)
