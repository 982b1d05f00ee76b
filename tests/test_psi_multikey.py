"""Multi-key matching and the three-party compositions, over real PSI sessions."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.psi import Mode, PsiRequester, PsiResponder
from protocols.psi import multikey as mk
from protocols.psi import threeparty as tp


def exchange(req: PsiRequester, resp: PsiResponder) -> list[bytes]:
    out = [req.start()]
    ack = resp.handle(out[0])
    assert ack is not None
    out.append(ack)
    req.handle(ack)
    for msg in req.requests():
        reply = resp.handle(msg)
        assert reply is not None
        out += [msg, reply]
        req.handle(reply)
    assert req.finished
    return out


def run_multikey(
    r_recs: list[dict[str, str | None]], s_recs: list[dict[str, str | None]], pad: bool
) -> tuple[mk.Resolution, list[mk.Edge], list[bytes], list[bytes]]:
    r_items, origins = mk.requester_items(r_recs, pad=pad)
    s_items, labels, pseudonyms = mk.responder_items(s_recs, pad=pad)
    req = PsiRequester(r_items, want_labels=True, bucket_count=3)
    resp = PsiResponder(s_items, labels=labels)
    transcript = exchange(req, resp)
    edges = mk.edges_from_result(origins, req.result)
    return mk.resolve(edges), edges, pseudonyms, transcript


value = st.sampled_from(["a", "b", "c", "d", None])
record = st.fixed_dictionaries({"phone": value, "email": value, "device_id": value})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(r=st.lists(record, max_size=8), s=st.lists(record, max_size=8), pad=st.booleans())
def test_multikey_equals_plaintext_resolution(
    r: list[dict[str, str | None]], s: list[dict[str, str | None]], pad: bool
) -> None:
    resolution, edges, pseudonyms, _ = run_multikey(r, s, pad)
    expected_edges = mk.plaintext_edges(r, s, pseudonyms)
    assert sorted(edges) == sorted(expected_edges)
    assert resolution == mk.resolve(expected_edges)
    # one-to-one on both sides
    records = [rec for rec, _kind in resolution.pairs.values()]
    assert len(records) == len(set(records))
    assert sum(resolution.per_key_counts.values()) == len(resolution.pairs)


def test_priority_phone_beats_email_and_no_record_twice() -> None:
    r: list[dict[str, str | None]] = [
        {"phone": "+8613800000001", "email": "x@a.cn", "device_id": None},  # row 0
        {"phone": None, "email": "y@a.cn", "device_id": None},  # row 1
        {"phone": None, "email": None, "device_id": "dev0000000000001"},  # row 2
    ]
    s: list[dict[str, str | None]] = [
        # record A: row 0's email and row 1's email
        {"phone": None, "email": "x@a.cn", "device_id": None},
        # record B: row 0's phone, row 1's email and row 2's device
        {"phone": "+8613800000001", "email": "y@a.cn", "device_id": "dev0000000000001"},
    ]
    resolution, edges, pseudonyms, transcript = run_multikey(r, s, pad=True)
    a, b = pseudonyms
    assert set(edges) == {
        mk.Edge(0, a, "email"), mk.Edge(0, b, "phone"), mk.Edge(1, b, "email"),
        mk.Edge(2, b, "device_id"),
    }
    # phone first: row 0 takes B; row 1's only candidate B is taken; row 2 too.
    assert resolution.pairs == {0: (b, "phone")}
    assert resolution.per_key_counts == {"phone": 1, "email": 0, "device_id": 0}
    assert mk.per_key_counts(edges) == {"phone": 1, "email": 2, "device_id": 1}
    blob = b"".join(transcript)
    for needle in (b"13800000001", b"x@a.cn", b"y@a.cn", b"dev0000000000001"):
        assert needle not in blob


def test_padding_hides_key_availability_from_responder() -> None:
    r_sparse = [{"phone": "p1", "email": None, "device_id": None}] * 3
    r_full = [{"phone": f"p{i}", "email": f"e{i}", "device_id": f"d{i}"} for i in range(3)]
    sizes = []
    for recs in (r_sparse, r_full):
        items, _ = mk.requester_items(recs, pad=True)
        assert len(set(items)) == 9
        req = PsiRequester(items)
        resp = PsiResponder([b"zz"])
        exchange(req, resp)
        sizes.append(resp.result.requester_size)
    assert sizes == [9, 9]
    items, _ = mk.requester_items(r_sparse, pad=False)
    assert len(set(items)) == 1


def test_responder_labels_each_appear_three_times_with_padding() -> None:
    s = [{"phone": "p", "email": None, "device_id": None}, {"phone": "p", "email": "e",
                                                           "device_id": None}]
    items, labels, pseudonyms = mk.responder_items(s, pad=True)
    assert len(items) == len(set(items)) == 6
    assert all(labels.count(p) == 3 for p in pseudonyms)


def test_three_party_star_and_chained() -> None:
    oem = [f"id{i}".encode() for i in range(40)]
    media = [f"id{i}".encode() for i in range(0, 40, 2)] + [b"m-only"]
    dealer = [f"id{i}".encode() for i in range(0, 40, 3)] + [b"d-only"]
    with_media = PsiRequester(oem, bucket_count=2)
    exchange(with_media, PsiResponder(media))
    with_dealer = PsiRequester(oem, bucket_count=2)
    exchange(with_dealer, PsiResponder(dealer))
    star = tp.combine_star(with_media.result, with_dealer.result)
    assert star.in_all_three == tuple(i for i in range(40) if i % 6 == 0)
    assert star.counts == {"oem∩media": 20, "oem∩dealer": 14, "oem∩media∩dealer": 7}

    second = tp.chained_input(oem, with_media.result)
    chained = PsiRequester(second, mode=Mode.CARDINALITY, bucket_count=2)
    dealer_side = PsiResponder(dealer)
    exchange(chained, dealer_side)
    assert chained.result.cardinality == 7
    assert dealer_side.result.requester_size == 20  # the dealer learns |O∩M|, as stated
    plan = tp.plan(tp.Composition.CHAINED)
    assert "|O∩M| per bucket" in plan.learns["dealer"]
    assert [s.mode for s in plan.sessions] == [Mode.INTERSECTION, Mode.CARDINALITY]
