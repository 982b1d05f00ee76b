"""Packed PSI items (:mod:`protocols.psi.items`) and the role objects fed with them.

- a packing gives back exactly the items it was made from (any slice, gather, prefix);
- the distinct count used to size buckets equals the plaintext one;
- a role fed packed items (with repeats, labels packed or listed) sends the same
  requests (byte for byte, pinned randomness) and gets the same result as one fed the
  same items as a list, and both equal the plaintext join with first-occurrence labels.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_psi_protocol import run

from protocols.psi import Mode, PsiRequester, PsiResponder
from protocols.psi.items import PackedItems, as_packed, count_distinct

item_st = st.binary(min_size=0, max_size=4)


@settings(max_examples=60, deadline=None)
@given(items=st.lists(item_st, max_size=40), prefix=st.sampled_from([b"", b"\x01", b"ab"]),
       data=st.data())
def test_packing_gives_back_the_items(items: list[bytes], prefix: bytes,
                                      data: st.DataObject) -> None:
    want = [prefix + x for x in items]
    packed = PackedItems.from_list(items, prefix)
    assert len(packed) == len(items)
    assert list(packed) == want
    assert [packed[i] for i in range(len(items))] == want
    if items:
        assert packed[-1] == want[-1]
    idx = data.draw(st.lists(st.integers(0, max(0, len(items) - 1)),
                             max_size=20 if items else 0))
    assert packed.take(np.array(idx, dtype=np.int64)) == [want[i] for i in idx]
    lo = data.draw(st.integers(0, len(items)))
    hi = data.draw(st.integers(lo, len(items)))
    assert packed.range(lo, hi) == want[lo:hi]
    assert packed[lo:hi] == want[lo:hi]


def test_arrow_style_int32_offsets_into_a_larger_buffer() -> None:
    """Offsets need not start at 0 (a sliced Arrow array) and may be int32."""
    data = np.frombuffer(b"xxhelloworld!yy", dtype=np.uint8)
    packed = PackedItems(data, np.array([2, 7, 12, 13], dtype=np.int32), b"\x02")
    assert list(packed) == [b"\x02hello", b"\x02world", b"\x02!"]
    assert packed.take(np.array([2, 0])) == [b"\x02!", b"\x02hello"]


@pytest.mark.parametrize("offsets", [[0, 5, 3], [0, 99], [-1, 2], []])
def test_bad_offsets_are_refused(offsets: list[int]) -> None:
    with pytest.raises(ValueError):
        PackedItems(b"abcdef", np.array(offsets, dtype=np.int64))


def test_out_of_range_index_and_range() -> None:
    packed = PackedItems.from_list([b"a", b"b"])
    with pytest.raises(IndexError):
        packed[2]
    with pytest.raises(IndexError):
        packed.range(1, 3)


@settings(max_examples=60, deadline=None)
@given(items=st.lists(item_st, max_size=60))
def test_count_distinct_equals_plaintext(items: list[bytes]) -> None:
    assert count_distinct(items) == len(set(items))
    assert count_distinct(as_packed(items)) == len(set(items))


SCALAR_R, SCALAR_S = bytes([7]) * 32, bytes([9]) * 32
NONCE_R, NONCE_S = bytes([1]) * 32, bytes([2]) * 32
SID = bytes(range(16))


def _pair(r: object, s: object, labels: object, mode: Mode, buckets: int
          ) -> tuple[PsiRequester, PsiResponder]:
    req = PsiRequester._with_randomness(r, scalar=SCALAR_R, nonce=NONCE_R, mode=mode,  # type: ignore[arg-type]
                                        bucket_count=buckets, session_id=SID,
                                        want_labels=mode is Mode.INTERSECTION)
    resp = PsiResponder._with_randomness(s, scalar=SCALAR_S, nonce=NONCE_S,  # type: ignore[arg-type]
                                         labels=labels if mode is Mode.INTERSECTION else None)  # type: ignore[arg-type]
    return req, resp


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(r=st.lists(st.binary(min_size=0, max_size=2), max_size=30),
       s=st.lists(st.binary(min_size=0, max_size=2), max_size=30),
       buckets=st.integers(1, 5), mode=st.sampled_from([Mode.INTERSECTION, Mode.CARDINALITY]))
def test_packed_and_listed_items_give_identical_sessions(
    r: list[bytes], s: list[bytes], buckets: int, mode: Mode
) -> None:
    labels = [i.to_bytes(2, "big") for i in range(len(s))]
    req_l, resp_l = _pair(r, s, labels, mode, buckets)
    req_p, resp_p = _pair(PackedItems.from_list(r), PackedItems.from_list(s),
                          b"".join(labels) if s else labels, mode, buckets)
    listed, packed = run(req_l, resp_l), run(req_p, resp_p)
    # the requester's messages and the ACK are byte-identical; the responses differ only
    # by the responder's fresh shuffle of its own points
    assert listed[0::2] == packed[0::2] and listed[1] == packed[1]
    assert [len(m) for m in listed] == [len(m) for m in packed]
    res = req_p.result
    assert res == req_l.result
    assert resp_p.result == resp_l.result
    # and both are the plaintext join, labels of the responder's first occurrence
    first: dict[bytes, bytes] = {}
    for x, label in zip(s, labels, strict=True):
        first.setdefault(x, label)
    assert res.cardinality == len(set(r) & set(s))
    assert res.responder_size == len(set(s))
    assert resp_p.result.requester_size == len(set(r))
    if mode is Mode.INTERSECTION:
        assert res.matched_indices == tuple(i for i, x in enumerate(r) if x in first)
        assert res.labels == {i: first[x] for i, x in enumerate(r) if x in first}


def test_packed_labels_must_divide_evenly() -> None:
    from protocols.errors import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        PsiResponder([b"a", b"b"], labels=b"abc")
    with pytest.raises(LocalProtocolError):
        PsiResponder([b"a", b"b"], labels=[b"ab", b"c"])
