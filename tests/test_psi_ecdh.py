"""The fast paths of :mod:`protocols.psi.ecdh` against their plain definitions.

- ``scalarmult_packed`` (libsodium through PyNaCl's cffi module, pointers into packed
  buffers) equals PyNaCl's checked wrapper point by point, rejects small-order points as the
  peer's error and refuses a scalar of the wrong size instead of reading past it;
- the partition (one keyed BLAKE2b state copied per item, numpy grouping) equals
  ``BLAKE2b-64(key, x) mod B`` computed item by item, order kept within a bucket.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_scalarmult

from protocols.errors import RemoteProtocolError
from protocols.psi import ecdh, h2c

DST = ecdh.h2c_dst(bytes(16))


def test_scalarmult_packed_equals_pynacl_per_point() -> None:
    points = h2c.encode_many([os.urandom(10) for _ in range(64)], DST)
    k = ecdh.new_scalar()
    expected = b"".join(crypto_scalarmult(k, points[i : i + 32]) for i in range(0, 64 * 32, 32))
    assert ecdh.scalarmult_packed(k, points) == expected
    assert ecdh.scalarmult_packed(k, b"") == b""


def test_scalarmult_packed_rejects_small_order_and_bad_sizes() -> None:
    good = h2c.encode_many([b"a", b"b"], DST)
    k = ecdh.new_scalar()
    for small in (bytes(32), (1).to_bytes(32, "little")):  # order 1 and order-4 u = 0 / 1
        with pytest.raises(RemoteProtocolError):
            ecdh.scalarmult_packed(k, good + small)
    with pytest.raises(RemoteProtocolError):
        ecdh.scalarmult_packed(k, good[:40])
    with pytest.raises(ValueError):
        ecdh.scalarmult_packed(k[:31], good)


def _reference(items: list[bytes], key: bytes, count: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(count)]
    for i, x in enumerate(items):
        h = hashlib.blake2b(x, key=key, digest_size=8).digest()
        out[int.from_bytes(h, "little") % count].append(i)
    return out


@settings(max_examples=60, deadline=None)
@given(items=st.lists(st.binary(max_size=24), max_size=60), count=st.integers(1, 40),
       key=st.binary(min_size=32, max_size=32))
def test_partition_equals_its_definition(items: list[bytes], count: int, key: bytes) -> None:
    ref = _reference(items, key, count)
    assert ecdh.partition(items, key, count) == ref
    assert [g.tolist() for g in ecdh.partition_groups(items, key, count)] == ref
    assert ecdh.partition_items(items, key, count) == [[items[i] for i in g] for g in ref]
