"""Behaviour of the bucketed ECDH PSI role objects: results, privacy properties, errors."""

from __future__ import annotations

import contextlib
import struct
from concurrent.futures import ProcessPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleanroom.identity import normalize_device_id, normalize_email, normalize_phone
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.psi import Mode, PsiRequester, PsiResponder
from protocols.psi.messages import HEADER, MsgType
from protocols.psi.roles import FinishJob
from protocols.psi.states import TRANSITIONS, State, state_table_markdown


def run(req: PsiRequester, resp: PsiResponder) -> list[bytes]:
    """Serial exchange; returns every message byte string, in order."""
    transcript = [req.start()]
    ack = resp.handle(transcript[0])
    assert ack is not None
    transcript.append(ack)
    assert req.handle(ack) is None
    for msg in req.requests():
        transcript.append(msg)
        reply = resp.handle(msg)
        assert reply is not None
        transcript.append(reply)
        assert req.handle(reply) is None
    assert req.finished and resp.finished
    return transcript


item_st = st.binary(min_size=0, max_size=3)  # tiny alphabet: many duplicates and overlaps


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    r=st.lists(item_st, max_size=25),
    s=st.lists(item_st, max_size=25),
    buckets=st.integers(1, 6),
)
def test_intersection_equals_plaintext_join(r: list[bytes], s: list[bytes], buckets: int) -> None:
    req = PsiRequester(r, mode=Mode.INTERSECTION, bucket_count=buckets)
    resp = PsiResponder(s)
    run(req, resp)
    sset = set(s)
    result = req.result
    assert result.matched_indices == tuple(i for i, x in enumerate(r) if x in sset)
    assert result.cardinality == len(set(r) & sset)
    assert result.responder_size == len(sset)
    assert resp.result.requester_size == len(set(r))
    assert sum(result.responder_bucket_sizes) == len(sset)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    r=st.lists(item_st, max_size=25),
    s=st.lists(item_st, max_size=25),
    buckets=st.integers(1, 4),
)
def test_cardinality_equals_plaintext_count(r: list[bytes], s: list[bytes], buckets: int) -> None:
    req = PsiRequester(r, mode=Mode.CARDINALITY, bucket_count=buckets)
    run(req, PsiResponder(s))
    assert req.result.cardinality == len(set(r) & set(s))
    assert req.result.matched_indices is None and req.result.labels is None


MESSY_PHONES = ["+86 138-1234-5678", "0086 139 0000 1111", "(86)15012345678", "13312341234"]
MESSY_EMAILS = ["  Alice.Wang@Example.COM ", "bob@example.cn", "carol@x.org"]
MESSY_DEVICES = ["AB:CD:EF:01:23:45:67:89", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"]


def _normalised_items() -> tuple[list[str], list[bytes]]:
    raw = MESSY_PHONES + MESSY_EMAILS + MESSY_DEVICES
    norm = (
        [normalize_phone(x) for x in MESSY_PHONES]
        + [normalize_email(x) for x in MESSY_EMAILS]
        + [normalize_device_id(x) for x in MESSY_DEVICES]
    )
    assert all(n is not None for n in norm)
    return raw, [n.encode() for n in norm if n is not None]


def test_messy_identifiers_match_after_normalisation_and_never_appear_in_transcript() -> None:
    raw, items = _normalised_items()
    # The responder holds the same people written differently, plus others.
    other = [normalize_phone("138 1234 5678"), normalize_email("ALICE.WANG@example.com"),
             normalize_device_id("abcdef0123456789"), normalize_phone("13700000000")]
    s_items = [x.encode() for x in other if x is not None]
    for mode in Mode:
        req = PsiRequester(items, mode=mode, bucket_count=3)
        resp = PsiResponder(s_items)
        transcript = b"".join(run(req, resp))
        assert req.result.cardinality == 3
        for value in raw + [x.decode() for x in items] + [x.decode() for x in s_items]:
            for form in {value, value.strip(), value.lower()}:
                assert form.encode() not in transcript, "raw identifier in transcript"


def test_cardinality_mode_output_order_is_unlinkable_and_intersection_keeps_it() -> None:
    """The single match sits at request position 0; cardinality mode must hide where."""
    r = [b"match"] + [f"r{i}".encode() for i in range(15)]
    s = [b"match", b"other"]
    positions: dict[Mode, set[int]] = {Mode.INTERSECTION: set(), Mode.CARDINALITY: set()}
    for mode in Mode:
        for _ in range(25):
            req = PsiRequester(r, mode=mode, bucket_count=1)
            resp = PsiResponder(s)
            ack = resp.handle(req.start())
            assert ack is not None
            req.handle(ack)
            (msg,) = list(req.requests())
            reply = resp.handle(msg)
            assert reply is not None
            step = req.receive(reply)
            assert isinstance(step.job, FinishJob)
            pairs = step.job.run()
            assert len(pairs) == 1
            positions[mode].add(pairs[0][0])
            req.complete(step, pairs)
            assert req.result.cardinality == 1
    assert positions[Mode.INTERSECTION] == {0}
    # 25 uniform draws from 16 positions: fewer than 5 distinct has negligible probability.
    assert len(positions[Mode.CARDINALITY]) >= 5


def _handshaken(bucket_count: int = 2) -> tuple[PsiRequester, PsiResponder, bytes]:
    req = PsiRequester([b"a", b"b", b"c"], bucket_count=bucket_count)
    resp = PsiResponder([b"b", b"c", b"d"])
    hello = req.start()
    ack = resp.handle(hello)
    assert ack is not None
    req.handle(ack)
    return req, resp, hello


def test_replayed_request_is_rejected_409() -> None:
    req, resp, _ = _handshaken()
    msg = next(req.requests())
    resp.handle(msg)
    with pytest.raises(RemoteProtocolError) as err:
        resp.handle(msg)
    assert err.value.status_hint == 409
    assert resp.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        resp.handle(msg)


def test_replayed_response_and_hello_are_rejected() -> None:
    req, resp, hello = _handshaken()
    msg = next(req.requests())
    reply = resp.handle(msg)
    assert reply is not None
    req.handle(reply)
    with pytest.raises(RemoteProtocolError) as err:
        req.handle(reply)
    assert err.value.status_hint == 409
    with pytest.raises(RemoteProtocolError) as err2:
        resp.handle(hello)  # HELLO again: wrong round
    assert err2.value.status_hint == 409


def test_wrong_round_messages_are_rejected() -> None:
    req = PsiRequester([b"a"])
    resp = PsiResponder([b"a"])
    hello = req.start()
    # A requester never accepts HELLO; a responder never accepts a REQUEST before HELLO.
    with pytest.raises(RemoteProtocolError) as err:
        req.handle(hello)
    assert err.value.status_hint == 409 and req.state is State.ERROR
    req3, resp3, _ = _handshaken()
    msg = next(req3.requests())
    with pytest.raises(RemoteProtocolError) as err3:
        resp.handle(msg)  # REQUEST in IDLE
    assert err3.value.status_hint == 409
    # A header whose round does not match its type.
    bad = bytearray(msg)
    bad[6] = 4
    with pytest.raises(RemoteProtocolError) as err4:
        resp3.handle(bytes(bad))
    assert err4.value.status_hint == 409


def test_response_for_unrequested_bucket_and_other_session_rejected() -> None:
    req, resp, _ = _handshaken(bucket_count=2)
    steps = [resp.receive(m) for m in req.requests()]
    replies = [resp.complete(s, s.job.run()) for s in steps if s.job is not None]
    other_req, _other_resp, _ = _handshaken(bucket_count=2)
    other_msg = next(other_req.requests())
    with pytest.raises(RemoteProtocolError) as err:
        resp.handle(other_msg)
    assert err.value.status_hint == 409
    fresh, _fresh_resp, _ = _handshaken(bucket_count=2)
    with pytest.raises(RemoteProtocolError) as err2:
        fresh.handle(replies[0] or b"")  # other session
    assert err2.value.status_hint == 409


@pytest.mark.parametrize("cut", [0, 5, 31, 32, 36, 40, -1, -32])
def test_truncated_messages_are_rejected_400(cut: int) -> None:
    req, resp, _ = _handshaken(bucket_count=1)
    msg = next(req.requests())
    with pytest.raises(RemoteProtocolError) as err:
        resp.handle(msg[:cut])
    assert err.value.status_hint == 400
    assert resp.state is State.ERROR


MUTATIONS = {
    "magic": lambda m: b"XXXX" + m[4:],
    "version": lambda m: m[:4] + b"\x02" + m[5:],
    "type": lambda m: m[:5] + b"\x09" + m[6:],
    "flags": lambda m: m[:7] + b"\x01" + m[8:],
    "trailing byte": lambda m: m + b"\x00",
    "count": lambda m: m[: HEADER.size] + struct.pack(">I", 999) + m[HEADER.size + 4 :],
    "body_len": lambda m: m[:28] + struct.pack(">I", 7) + m[32:],
    "bucket out of range": lambda m: m[:24] + struct.pack(">I", 5) + m[28:],
    "high bit point": lambda m: m[: HEADER.size + 35] + bytes([m[HEADER.size + 35] | 0x80])
    + m[HEADER.size + 36 :],
    "u >= p": lambda m: m[: HEADER.size + 4] + b"\xee" + b"\xff" * 30 + b"\x7f"
    + m[HEADER.size + 36 :],
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_malformed_fields_are_rejected_400(name: str) -> None:
    req, resp, _ = _handshaken(bucket_count=1)
    msg = next(req.requests())
    with pytest.raises(RemoteProtocolError) as err:
        resp.handle(MUTATIONS[name](msg))
    assert err.value.status_hint == 400
    assert resp.state is State.ERROR


def test_small_order_point_is_a_remote_error() -> None:
    req, resp, _ = _handshaken(bucket_count=1)
    msg = next(req.requests())
    head = msg[: HEADER.size + 4]
    n = (len(msg) - len(head)) // 32
    zero_points = bytes(32) * n  # u = 0 has order 1 / 2: X25519 output is zero
    with pytest.raises(RemoteProtocolError):
        resp.handle(head + zero_points)
    assert resp.state is State.ERROR


def test_policy_denies_mode_with_403() -> None:
    req = PsiRequester([b"a"], mode=Mode.INTERSECTION)
    resp = PsiResponder([b"a"], allowed_modes=frozenset({Mode.CARDINALITY}))
    with pytest.raises(RemoteProtocolError) as err:
        resp.handle(req.start())
    assert err.value.status_hint == 403


def test_expected_session_id_enforced() -> None:
    req = PsiRequester([b"a"])
    resp = PsiResponder([b"a"], expected_session_id=bytes(16))
    with pytest.raises(RemoteProtocolError) as err:
        resp.handle(req.start())
    assert err.value.status_hint == 409


def test_local_misuse_raises_local_error() -> None:
    req = PsiRequester([b"a"])
    with pytest.raises(LocalProtocolError):
        req.prepare_request(0)  # before the handshake
    with pytest.raises(LocalProtocolError):
        _ = req.result
    req.start()
    with pytest.raises(LocalProtocolError):
        req.start()
    with pytest.raises(LocalProtocolError):
        PsiRequester(["text"])  # type: ignore[list-item]
    with pytest.raises(LocalProtocolError):
        PsiRequester([b"a"], mode=Mode.CARDINALITY, want_labels=True)


def test_labels_returned_for_matches_only_in_intersection_mode() -> None:
    r = [b"a", b"b", b"c", b"a"]
    s = [b"b", b"a", b"z"]
    labels = [b"L-b-0001", b"L-a-0002", b"L-z-0003"]
    req = PsiRequester(r, want_labels=True, bucket_count=2)
    resp = PsiResponder(s, labels=labels)
    run(req, resp)
    assert req.result.labels == {0: b"L-a-0002", 1: b"L-b-0001", 3: b"L-a-0002"}


def test_parallel_driver_with_process_pool_matches_serial() -> None:
    r = [f"id{i}".encode() for i in range(300)]
    s = [f"id{i}".encode() for i in range(0, 600, 3)]
    req = PsiRequester(r, bucket_count=4)
    resp = PsiResponder(s)
    ack = resp.handle(req.start())
    assert ack is not None
    req.handle(ack)
    with ProcessPoolExecutor(max_workers=2) as pool:
        out_steps = [req.prepare_request(b) for b in range(4)]
        futures = [pool.submit(st.job.run) for st in out_steps if st.job is not None]
        requests = [req.complete(st, f.result()) for st, f in zip(out_steps, futures, strict=True)]
        in_steps = [resp.receive(m) for m in requests if m is not None]
        answers = [pool.submit(st.job.run) for st in in_steps if st.job is not None]
        replies = [resp.complete(st, f.result()) for st, f in zip(in_steps, answers, strict=True)]
        fin = [req.receive(m) for m in reversed(replies) if m is not None]  # any order
        done = [pool.submit(st.job.run) for st in fin if st.job is not None]
        for st, f in zip(fin, done, strict=True):
            req.complete(st, f.result())
    assert req.finished and resp.finished
    sset = set(s)
    assert req.result.matched_indices == tuple(i for i, x in enumerate(r) if x in sset)


def _states_reached(data: bytes, target: str) -> None:
    req, resp, _hello = _handshaken()
    if target == "responder-idle":
        fresh = PsiResponder([b"a"])
        fresh.handle(data)
    elif target == "responder-exchanging":
        resp.handle(data)
    elif target == "requester-await":
        r = PsiRequester([b"a"])
        r.start()
        r.handle(data)
    else:
        req.handle(data)


@settings(max_examples=150, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=40).map(lambda b: b"CRPS\x01" + b),
        st.tuples(st.sampled_from(list(MsgType)), st.binary(max_size=120)).map(
            lambda t: HEADER.pack(b"CRPS", 1, t[0], t[0], 0, bytes(16), 0, len(t[1])) + t[1]
        ),
    ),
    target=st.sampled_from(
        ["responder-idle", "responder-exchanging", "requester-await", "requester-exchanging"]
    ),
)
def test_fuzz_garbage_only_raises_remote_protocol_error(data: bytes, target: str) -> None:
    with contextlib.suppress(RemoteProtocolError):
        _states_reached(data, target)


@settings(max_examples=60, deadline=None)
@given(pos=st.integers(0, 10_000), bit=st.integers(0, 7), cut=st.integers(0, 10_000))
def test_fuzz_mutated_valid_messages(pos: int, bit: int, cut: int) -> None:
    req, resp, _ = _handshaken(bucket_count=1)
    msg = bytearray(next(req.requests()))
    msg[pos % len(msg)] ^= 1 << bit
    mutated = bytes(msg[: len(msg) - (cut % 4)])
    try:
        reply = resp.handle(mutated)
        if reply is not None:
            req.handle(reply)
    except RemoteProtocolError:
        assert resp.state is State.ERROR or req.state is State.ERROR


def test_state_table_renders_every_transition() -> None:
    table = state_table_markdown()
    assert table.count("\n") == len(TRANSITIONS) + 1
    for (_role, state, event), nxt in TRANSITIONS.items():
        assert f"| {state.value} | {event.value} | {nxt.value} |" in table
