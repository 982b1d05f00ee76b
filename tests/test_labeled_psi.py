"""Behaviour of the anonymous query (labeled PSI): round trips, privacy properties,
incremental updates, strict parsing, rate limits."""

from __future__ import annotations

import os
import struct
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.labeled_psi import (
    AnonymousQuerier,
    AnonymousQueryOwner,
    Bucket,
    Delta,
    EvaluationBudget,
    Mode,
    OwnerTable,
    Table,
    oprf,
)
from protocols.labeled_psi import messages as m
from protocols.labeled_psi.states import TRANSITIONS, State, state_table_markdown
from protocols.labeled_psi.table import bucket_of, choose_bucket_count
from protocols.psi.messages import HEADER

N_USERS = 1500
MIN_BUCKET = 100


def phone(i: int) -> bytes:
    return b"\x01+86138%08d" % i


def email(i: int) -> bytes:
    return b"\x02user%d@example.com" % i


def device(i: int) -> bytes:
    return b"\x03dev-%06x" % i


def label(i: int, gen: int = 0) -> bytes:
    return b"stores:%d:%d" % (i, gen)


def users(n: int = N_USERS) -> dict[str, tuple[list[bytes], bytes]]:
    out = {}
    for i in range(n):
        ids = [phone(i), email(i)] + ([device(i)] if i % 3 == 0 else [])
        out[f"user-{i}"] = (ids, label(i))
    return out


@pytest.fixture(scope="module")
def owner_table() -> OwnerTable:
    return OwnerTable.build(users(), label_size=32, min_bucket_size=MIN_BUCKET)


def sid() -> bytes:
    return os.urandom(16)


def run_realtime(
    source: OwnerTable, ids: list[bytes], **kw: object
) -> tuple[AnonymousQuerier, AnonymousQueryOwner, list[bytes]]:
    s = sid()
    q = AnonymousQuerier.realtime(ids, session_id=s, min_anonymity=MIN_BUCKET)
    o = AnonymousQueryOwner(source, querier_id="oem", session_id=s, **kw)  # type: ignore[arg-type]
    received = []
    msg = q.start()
    received.append(msg)
    reply = o.handle(msg)
    assert reply is not None
    msg2 = q.handle(reply)
    assert msg2 is not None
    received.append(msg2)
    reply2 = o.handle(msg2)
    assert reply2 is not None
    assert q.handle(reply2) is None
    assert q.finished and o.finished
    return q, o, received


def download(source: OwnerTable, have: Table | None = None) -> Table:
    s = sid()
    q = AnonymousQuerier.download(have, session_id=s)
    o = AnonymousQueryOwner(source, querier_id="oem", session_id=s)
    reply = o.handle(q.start())
    assert reply is not None
    assert q.handle(reply) is None
    return q.table


def run_batch(
    source: OwnerTable, table: Table, ids: list[bytes], budget: EvaluationBudget | None = None,
    querier_id: str = "oem",
) -> tuple[AnonymousQuerier, AnonymousQueryOwner, list[bytes]]:
    s = sid()
    q = AnonymousQuerier.batch(ids, table, session_id=s)
    o = AnonymousQueryOwner(source, querier_id=querier_id, session_id=s, budget=budget)
    msg = q.start()
    reply = o.handle(msg)
    assert reply is not None
    assert q.handle(reply) is None
    return q, o, [msg]


# --- round trips -----------------------------------------------------------------------


def test_realtime_round_trip(owner_table: OwnerTable) -> None:
    ids = [phone(5), b"\x01+8600000000000", email(7), device(9), phone(5)]
    q, o, _ = run_realtime(owner_table, ids)
    assert q.result.labels == {0: label(5), 2: label(7), 3: label(9), 4: label(5)}
    assert o.observed.evaluations == 4  # distinct identifiers only
    assert o.observed.buckets == q.result.buckets
    assert all(size >= MIN_BUCKET for size in q.result.bucket_sizes)


def test_batch_round_trip_with_downloaded_table(owner_table: OwnerTable) -> None:
    table = download(owner_table)
    assert table.to_bytes() == owner_table.current.to_bytes()
    ids = [email(i) for i in range(0, 40)] + [b"\x02nobody@example.com"]
    q, o, _ = run_batch(owner_table, table, ids)
    assert q.result.labels == {i: label(i) for i in range(40)}
    assert not q.result.stale
    assert o.observed.evaluations == 41 and o.observed.buckets == ()


def test_every_identifier_of_a_user_opens_the_same_label(owner_table: OwnerTable) -> None:
    ids = [phone(3), email(3), device(3)]
    q, _, _ = run_realtime(owner_table, ids)
    assert q.result.labels == {0: label(3), 1: label(3), 2: label(3)}
    # the three entries are distinct rows with distinct ciphertexts
    key = owner_table.key
    tags = [t for t, _ in oprf.TagDeriver(owner_table.table_id).derive_many(
        oprf.oprf_direct(key, ids))]
    rows = [owner_table.current.rows[i].tobytes() for i in owner_table.current.find(tags)]
    assert len({r[20:] for r in rows}) == 3


def test_querier_cannot_open_labels_without_the_oprf_output(owner_table: OwnerTable) -> None:
    table = owner_table.current
    tid = table.table_id
    x = phone(11)
    # a wrong identifier: no match
    q, _, _ = run_realtime(owner_table, [b"\x01+8613899999999"])
    assert q.result.labels == {}
    # the hash of the identifier, or an OPRF under another key, gives no tag in the table
    h = oprf.hash_to_curve([x])
    other_key = oprf.oprf_direct(oprf.new_oprf_key(), [x])
    for guess in (h, other_key, x.ljust(32, b"\x00")):
        assert table.open(oprf.TagDeriver(tid).derive_many(guess)) == [None]
    # the right tag (e.g. seen in the table) with a key not derived from F(x): no label
    right_tag, right_key = oprf.TagDeriver(tid).derive(oprf.oprf_direct(owner_table.key, [x]))
    with pytest.raises(RemoteProtocolError):
        table.open([(right_tag, os.urandom(32))])
    assert table.open([(right_tag, right_key)]) == [label(11)]


def test_split_driving_with_a_process_pool(owner_table: OwnerTable) -> None:
    s = sid()
    q = AnonymousQuerier.realtime([phone(1), email(2)], session_id=s, min_anonymity=MIN_BUCKET)
    o = AnonymousQueryOwner(owner_table, querier_id="oem", session_id=s)
    with ProcessPoolExecutor(2) as pool:
        step = q.prepare_start()
        assert step.job is not None
        msg = q.complete(step, pool.submit(step.job.run).result())
        assert msg is not None
        ostep = o.receive(msg)
        assert ostep.job is not None
        reply = o.complete(ostep, pool.submit(ostep.job.run).result())
        assert reply is not None
        qstep = q.receive(reply)
        assert qstep.job is not None
        breq = q.complete(qstep, pool.submit(qstep.job.run).result())
    assert breq is not None
    bresp = o.handle(breq)
    assert bresp is not None
    q.handle(bresp)
    assert q.result.labels == {0: label(1), 1: label(2)}


def test_parallel_build_equals_serial_build() -> None:
    u = users(300)
    key, tid = oprf.new_oprf_key(), os.urandom(16)
    serial = OwnerTable.build(u, label_size=24, min_bucket_size=50, key=key, table_id=tid)
    with ProcessPoolExecutor(2) as pool:
        par = OwnerTable.build(u, label_size=24, min_bucket_size=50, key=key, table_id=tid,
                               map_fn=pool.map, chunk_size=64)
    assert par.current.to_bytes() == serial.current.to_bytes()


# --- buckets and anonymity -------------------------------------------------------------


def test_every_bucket_holds_the_minimum(owner_table: OwnerTable) -> None:
    table = owner_table.current
    assert table.bucket_count > 1
    assert int(table.bucket_sizes().min()) >= MIN_BUCKET
    assert int(table.bucket_sizes().sum()) == table.entry_count
    for b in range(table.bucket_count):
        bucket = table.bucket(b)
        assert all(bucket_of(t, table.bucket_count) == b for t in bucket.tags())


@settings(max_examples=30, deadline=None)
@given(st.integers(10, 5000), st.integers(1, 300))
def test_choose_bucket_count_property(n: int, minimum: int) -> None:
    hi = np.sort(np.frombuffer(os.urandom(8 * n), dtype=np.uint64))
    b = choose_bucket_count(hi, minimum)
    starts = np.arange(b, dtype=np.uint64) * np.uint64(-(-(1 << 64) // b)) if b > 1 else None
    sizes = (np.diff(np.append(np.searchsorted(hi, starts), n)) if starts is not None
             else np.array([n]))
    assert b == 1 or int(sizes.min()) >= minimum
    if n < 2 * minimum:
        assert b == 1


def test_querier_refuses_owner_below_its_anonymity_floor(owner_table: OwnerTable) -> None:
    s = sid()
    q = AnonymousQuerier.realtime([phone(1)], session_id=s)  # default floor 1,000
    o = AnonymousQueryOwner(owner_table, querier_id="oem", session_id=s)
    reply = o.handle(q.start())
    assert reply is not None
    with pytest.raises(RemoteProtocolError) as exc:
        q.handle(reply)
    assert exc.value.status_hint == 403
    assert q.state is State.ERROR


# --- what the owner sees ---------------------------------------------------------------


def test_owner_transcript_holds_only_counts_bucket_ids_and_blinded_points(
    owner_table: OwnerTable,
) -> None:
    ids = [phone(21), email(21), b"\x01+8613811112222"]
    q, o, received = run_realtime(owner_table, ids)
    h = oprf.hash_to_curve(ids)
    f = oprf.oprf_direct(owner_table.key, ids)
    pairs = oprf.TagDeriver(owner_table.table_id).derive_many(f)
    secrets_ = [*ids, *(h[i : i + 32] for i in range(0, len(h), 32)),
                *(f[i : i + 32] for i in range(0, len(f), 32)),
                *(t for t, _ in pairs), *(k for _, k in pairs)]
    for msg in received:
        for secret in secrets_:
            assert secret not in msg
    eval_req = m.decode(received[0])
    bucket_req = m.decode(received[1])
    assert isinstance(eval_req, m.EvalRequest) and isinstance(bucket_req, m.BucketRequest)
    # exactly: header, mode/suite/count, blinded points; then version, count, bucket ids
    assert len(received[0]) == HEADER.size + 8 + 32 * 3
    assert len(received[1]) == HEADER.size + 8 + 4 * len(bucket_req.buckets)
    assert bucket_req.buckets == q.result.buckets
    assert o.observed.evaluations == 3
    # blinding is fresh per session: the same identifiers give other points next time
    _, _, again = run_realtime(owner_table, ids)
    assert m.decode(again[0]).points != eval_req.points  # type: ignore[union-attr]


def test_padding_hides_the_number_of_identifiers(owner_table: OwnerTable) -> None:
    s = sid()
    q = AnonymousQuerier.realtime([phone(4)], session_id=s, pad_to=3, min_anonymity=MIN_BUCKET)
    o = AnonymousQueryOwner(owner_table, querier_id="oem", session_id=s)
    b = q.handle(o.handle(q.start()))  # type: ignore[arg-type]
    assert b is not None
    q.handle(o.handle(b))  # type: ignore[arg-type]
    assert o.observed.evaluations == 3
    assert q.result.labels == {0: label(4)}


# --- incremental updates ---------------------------------------------------------------


def test_update_semantics_and_deltas() -> None:
    ot = OwnerTable.build(users(200), label_size=32, min_bucket_size=20)
    v1 = download(ot)
    delta = ot.update(
        upsert={"user-1": ([phone(1), device(1001)], label(1, 1)),  # email dropped
                "new": ([phone(5000)], b"new")},
        remove=["user-2"],
    )
    assert (delta.base_version, delta.version, ot.version) == (1, 2, 2)
    assert len(delta.removed) == 3  # email(1), phone(2), email(2)
    v2 = download(ot, have=v1)
    assert v2.to_bytes() == ot.current.to_bytes()
    ids = [phone(1), email(1), device(1001), phone(2), phone(5000), phone(3)]
    q, _, _ = run_batch(ot, v2, ids)
    assert q.result.labels == {0: label(1, 1), 2: label(1, 1), 4: b"new", 5: label(3)}
    # an old table still answers with its own version, and says it is stale
    q_old, _, _ = run_batch(ot, v1, [phone(1), phone(2)])
    assert q_old.result.stale and q_old.result.labels == {0: label(1), 1: label(2)}
    # version checks
    with pytest.raises(RemoteProtocolError) as exc:
        v2.apply(Delta.from_bytes(delta.to_bytes()))
    assert exc.value.status_hint == 409
    ot.update(upsert={"user-3": ([phone(3)], label(3, 2))})
    assert download(ot, have=v1).to_bytes() == ot.current.to_bytes()  # delta 1 -> 3
    assert download(ot, have=v2).to_bytes() == ot.current.to_bytes()  # delta 2 -> 3
    assert ot.delta_since(3).to_bytes() != b"" and len(ot.delta_since(3).upserts) == 0


def test_update_rejects_conflicts() -> None:
    ot = OwnerTable.build(users(50), label_size=32, min_bucket_size=10)
    with pytest.raises(LocalProtocolError):
        ot.update(upsert={"x": ([phone(3)], b"steal")})  # phone(3) belongs to user-3
    with pytest.raises(LocalProtocolError):
        ot.update(remove=["nobody"])
    with pytest.raises(LocalProtocolError):
        OwnerTable.build({"a": ([b"\x01same"], b"1"), "b": ([b"\x01same"], b"2")},
                         label_size=8, min_bucket_size=1)
    with pytest.raises(LocalProtocolError):
        OwnerTable.build({"a": ([b"\x01x"], bytes(9))}, label_size=8)
    assert ot.version == 1


op_st = st.lists(
    st.tuples(st.sampled_from(["upsert", "remove"]), st.integers(0, 29), st.integers(0, 3)),
    min_size=1, max_size=6,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, min_size=1, max_size=4))
def test_any_delta_chain_reproduces_the_current_table(
    batches: list[list[tuple[str, int, int]]],
) -> None:
    base = {f"u{i}": ([b"\x01%d" % i, b"\x02%d" % i], b"L%d" % i) for i in range(20)}
    ot = OwnerTable.build(base, label_size=8, min_bucket_size=4, key=bytes(31) + b"\x40",
                          table_id=bytes(16))
    expected = {ref: rec for ref, rec in base.items()}
    tables = [ot.current]
    for ops in batches:
        upsert: dict[str, tuple[list[bytes], bytes]] = {}
        remove: list[str] = []
        for kind, i, gen in ops:
            ref = f"u{i}"
            if ref in upsert or ref in remove:
                continue
            if kind == "remove":
                if ref in expected:
                    remove.append(ref)
            else:
                ids = [b"\x01%d" % i] + ([b"\x03%d-%d" % (i, gen)] if gen else [])
                upsert[ref] = (ids, b"L%d.%d" % (i, gen))
        delta = ot.update(upsert=upsert, remove=remove)
        tables.append(tables[-1].apply(Delta.from_bytes(delta.to_bytes())))
        for ref in remove:
            del expected[ref]
        expected.update(upsert)
    cur = ot.current.to_bytes()
    assert tables[-1].to_bytes() == cur
    for old in tables[:-1]:
        assert old.apply(ot.delta_since(old.version)).to_bytes() == cur
    # labels equal a plaintext model
    all_ids = sorted({x for rec in expected.values() for x in rec[0]}
                     | {b"\x01%d" % i for i in range(30)})
    f = oprf.oprf_direct(ot.key, all_ids)
    got = ot.current.open(oprf.TagDeriver(ot.table_id).derive_many(f))
    model = {x: rec[1] for rec in expected.values() for x in rec[0]}
    assert dict(zip(all_ids, got, strict=True)) == {x: model.get(x) for x in all_ids}


# --- strict parsing and wrong rounds ---------------------------------------------------


def test_truncated_and_garbled_messages_raise_remote_errors(owner_table: OwnerTable) -> None:
    s = sid()
    q = AnonymousQuerier.realtime([phone(1)], session_id=s, min_anonymity=MIN_BUCKET)
    o = AnonymousQueryOwner(owner_table, querier_id="oem", session_id=s)
    msg = q.start()
    reply = o.handle(msg)
    assert reply is not None
    breq = q.handle(reply)
    assert breq is not None
    bresp = o.handle(breq)
    assert bresp is not None
    for good in (msg, reply, breq, bresp):
        for cut in (0, 10, HEADER.size - 1, HEADER.size, len(good) - 1):
            with pytest.raises(RemoteProtocolError):
                m.decode(good[:cut])
        for pos in (0, 4, 7, 24):
            bad = bytearray(good)
            bad[pos] ^= 0x01
            with pytest.raises(RemoteProtocolError):
                m.decode(bytes(bad))
        with pytest.raises(RemoteProtocolError):
            m.decode(good + b"\x00")


def test_owner_errors_wrong_round_replay_session(owner_table: OwnerTable) -> None:
    s = sid()
    q = AnonymousQuerier.realtime([phone(1)], session_id=s, min_anonymity=MIN_BUCKET)
    msg = q.start()
    o = AnonymousQueryOwner(owner_table, querier_id="oem", session_id=s)
    reply = o.handle(msg)
    assert reply is not None
    with pytest.raises(RemoteProtocolError) as exc:
        o.handle(msg)  # replay
    assert exc.value.status_hint == 409 and o.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        o.handle(msg)  # after ERROR
    # a message of the wrong round, and a BUCKET_REQUEST before any evaluation
    for wrong in (reply, m.BucketRequest(s, 1, (0,)).to_bytes()):
        o2 = AnonymousQueryOwner(owner_table, querier_id="oem", session_id=s)
        with pytest.raises(RemoteProtocolError) as exc:
            o2.handle(wrong)
        assert exc.value.status_hint == 409
    # another session
    o3 = AnonymousQueryOwner(owner_table, querier_id="oem", session_id=sid())
    with pytest.raises(RemoteProtocolError) as exc:
        o3.handle(msg)
    assert exc.value.status_hint == 409


def test_owner_rejects_bad_bucket_requests(owner_table: OwnerTable) -> None:
    table = owner_table.current
    cases = [
        (m.BucketRequest(b"", table.version + 1, (0,)), 409),  # other version
        (m.BucketRequest(b"", table.version, (0, 1)), 400),  # more buckets than evaluations
        (m.BucketRequest(b"", table.version, (table.bucket_count,)), 400),  # out of range
    ]
    for req, status in cases:
        s = sid()
        q = AnonymousQuerier.realtime([phone(1)], session_id=s, min_anonymity=MIN_BUCKET)
        o = AnonymousQueryOwner(owner_table, querier_id="oem", session_id=s)
        o.handle(q.start())
        bad = m.BucketRequest(s, req.version, req.buckets).to_bytes()
        with pytest.raises(RemoteProtocolError) as exc:
            o.handle(bad)
        assert exc.value.status_hint == status
    # not strictly ascending / duplicate bucket ids
    raw = m.BucketRequest(bytes(16), 1, (3, 2)).to_bytes()
    with pytest.raises(RemoteProtocolError):
        m.decode(raw)


def test_oversized_and_bad_points(owner_table: OwnerTable) -> None:
    s = sid()
    o = AnonymousQueryOwner(owner_table, querier_id="oem", session_id=s, max_points=2)
    pts = oprf.blind(oprf.new_blinding_pair()[0], [b"a", b"b", b"c"])
    with pytest.raises(RemoteProtocolError) as exc:
        o.handle(m.EvalRequest(s, Mode.REALTIME, pts).to_bytes())
    assert exc.value.status_hint == 413
    head = HEADER.pack(m.MAGIC, 1, 1, 1, 0, s, 0xFFFFFFFF, 8)
    with pytest.raises(RemoteProtocolError) as exc:
        m.decode(head + struct.pack(">BBHI", 2, 1, 0, m.MAX_POINTS_PER_REQUEST + 1))
    assert exc.value.status_hint == 413
    with pytest.raises(RemoteProtocolError) as exc:
        m.decode(bytes(100), max_bytes=99)
    assert exc.value.status_hint == 413
    o2 = AnonymousQueryOwner(owner_table, querier_id="oem", session_id=s)
    with pytest.raises(RemoteProtocolError) as exc:
        o2.handle(m.EvalRequest(s, Mode.BATCH, bytes(32)).to_bytes())  # small-order point
    assert exc.value.status_hint == 400


def test_querier_rejects_replayed_and_mismatched_responses(owner_table: OwnerTable) -> None:
    q, _, _ = run_realtime(owner_table, [phone(1)])
    s = q.session_id
    with pytest.raises(RemoteProtocolError) as exc:
        q.handle(m.BucketResponse(s, ()).to_bytes())  # after DONE: replay
    assert exc.value.status_hint == 409
    # a response with the wrong number of points
    s2 = sid()
    q2 = AnonymousQuerier.realtime([phone(1), phone(2)], session_id=s2, min_anonymity=MIN_BUCKET)
    o2 = AnonymousQueryOwner(owner_table, querier_id="oem", session_id=s2)
    reply = o2.handle(q2.start())
    assert reply is not None
    resp = m.decode(reply)
    assert isinstance(resp, m.EvalResponse)
    with pytest.raises(RemoteProtocolError):
        q2.handle(m.EvalResponse(s2, resp.info, resp.points[:32]).to_bytes())
    # a bucket of another bucket id
    s3 = sid()
    q3 = AnonymousQuerier.realtime([phone(1)], session_id=s3, min_anonymity=MIN_BUCKET)
    o3 = AnonymousQueryOwner(owner_table, querier_id="oem", session_id=s3)
    breq = q3.handle(o3.handle(q3.start()))  # type: ignore[arg-type]
    asked = m.decode(breq)  # type: ignore[arg-type]
    assert isinstance(asked, m.BucketRequest)
    other = (asked.buckets[0] + 1) % owner_table.current.bucket_count
    forged = m.BucketResponse(s3, (owner_table.current.bucket(other).to_bytes(),)).to_bytes()
    with pytest.raises(RemoteProtocolError):
        q3.handle(forged)


def test_table_blob_parsing_is_strict(owner_table: OwnerTable) -> None:
    blob = owner_table.current.to_bytes()
    rsize = owner_table.current.row_size
    assert Table.from_bytes(blob).to_bytes() == blob
    for bad in (blob[:-1], blob + b"\x00", blob[:63], b"XXXX" + blob[4:]):
        with pytest.raises(RemoteProtocolError):
            Table.from_bytes(bad)
    swapped = bytearray(blob)
    a, b = 64, 64 + rsize
    swapped[a : a + rsize], swapped[b : b + rsize] = blob[b : b + rsize], blob[a : a + rsize]
    with pytest.raises(RemoteProtocolError):
        Table.from_bytes(bytes(swapped))  # rows not ascending
    with pytest.raises(RemoteProtocolError) as exc:
        Table.from_bytes(blob, max_entries=10)
    assert exc.value.status_hint == 413
    with pytest.raises(RemoteProtocolError):
        Bucket.from_bytes(blob)  # a table is not a bucket
    future = bytearray(blob)
    future[64 + 16 : 64 + 20] = (owner_table.version + 5).to_bytes(4, "big")
    with pytest.raises(RemoteProtocolError):
        Table.from_bytes(bytes(future))  # entry version above the table version


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_only_raises_remote_errors(data: bytes) -> None:
    for parse in (m.decode, Table.from_bytes, Bucket.from_bytes, Delta.from_bytes):
        with pytest.raises(RemoteProtocolError):
            parse(data)


# --- rate limits and policy ------------------------------------------------------------


def test_rate_limit_refuses_beyond_the_budget(owner_table: OwnerTable) -> None:
    table = owner_table.current
    budget = EvaluationBudget(per_querier=5)
    run_batch(owner_table, table, [phone(1), phone(2), phone(3)], budget)
    assert budget.used("oem") == 3
    with pytest.raises(RemoteProtocolError) as exc:
        run_batch(owner_table, table, [phone(4), phone(5), phone(6)], budget)
    assert exc.value.status_hint == 429
    assert budget.used("oem") == 3  # nothing charged for the refused request
    run_batch(owner_table, table, [phone(4), phone(5)], budget)
    run_batch(owner_table, table, [phone(4)], budget, querier_id="dealer")  # own budget
    budget.reset("oem")
    run_batch(owner_table, table, [phone(1)], budget)
    per_session = EvaluationBudget(per_session=2)
    with pytest.raises(RemoteProtocolError) as exc:
        run_batch(owner_table, table, [phone(1), phone(2), phone(3)], per_session)
    assert exc.value.status_hint == 429


def test_mode_not_allowed_by_policy(owner_table: OwnerTable) -> None:
    s = sid()
    q = AnonymousQuerier.realtime([phone(1)], session_id=s, min_anonymity=MIN_BUCKET)
    o = AnonymousQueryOwner(owner_table, querier_id="oem", session_id=s,
                            allowed_modes=frozenset({Mode.BATCH, Mode.DOWNLOAD}))
    with pytest.raises(RemoteProtocolError) as exc:
        o.handle(q.start())
    assert exc.value.status_hint == 403


def test_state_table_is_documented() -> None:
    md = state_table_markdown()
    assert md.count("\n") == len(TRANSITIONS) + 1
    doc = (Path(__file__).parents[1] / "docs/protocols/anonymous-query.md").read_text("utf-8")
    assert md in doc


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_find_per_tag_and_vectorised_agree(data: st.DataObject) -> None:
    """Row lookup takes a per-tag path for a few tags and a numpy path for many; both give
    the same rows, including tags that share a 64-bit prefix with a stored one."""
    from protocols.labeled_psi import table as t

    n = data.draw(st.integers(0, 40))
    prefixes = data.draw(st.lists(st.binary(min_size=8, max_size=8), min_size=1, max_size=6))
    raw = [data.draw(st.sampled_from(prefixes)) + data.draw(st.binary(min_size=8, max_size=8))
           for _ in range(n)]
    stored = sorted(set(raw))
    rows = np.zeros((len(stored), t.row_size(8)), dtype=np.uint8)
    for i, tag in enumerate(stored):
        rows[i, :16] = np.frombuffer(tag, dtype=np.uint8)
    hi = t._prefix(rows, 0) if len(rows) else np.zeros(0, dtype=np.uint64)
    asked = data.draw(st.lists(
        st.one_of(st.sampled_from(stored) if stored else st.nothing(),
                  st.builds(lambda p, s: p + s, st.sampled_from(prefixes),
                            st.binary(min_size=8, max_size=8))),
        max_size=2 * t._FEW_TAGS))
    expected = [stored.index(a) if a in stored else -1 for a in asked]
    assert t._find(rows, hi, asked).tolist() == expected  # per tag when few
    padded = asked + [bytes(16)] * (t._FEW_TAGS + 1)  # enough tags for the numpy path
    assert t._find(rows, hi, padded).tolist()[: len(asked)] == expected
