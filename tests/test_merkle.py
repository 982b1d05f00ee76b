"""Merkle proofs checked against an independent reference written here from RFC 9162 text.

The reference below (``ref_*``) does not import cleanroom.ledger.merkle: it is the
recursive definitions of RFC 9162 section 2.1.1 (MTH), 2.1.3.1 (PATH), 2.1.4.1
(PROOF/SUBPROOF) and the verification algorithms of 2.1.3.2 and 2.1.4.2, transcribed
literally. Our tree's roots and proofs must equal the reference's, and our proofs must
verify with the reference verifiers (and vice versa).
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cleanroom.ledger.errors import VerificationError
from cleanroom.ledger.merkle import (
    MerkleTree,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)

# ---------------------------------------------------------------- reference (RFC 9162)


def ref_hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def ref_k(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: list[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return ref_hash(b"")
    if n == 1:
        return ref_hash(b"\x00" + d[0])
    k = ref_k(n)
    return ref_hash(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:]))


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = ref_k(n)
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = ref_k(n)
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


def ref_proof(m: int, d: list[bytes]) -> list[bytes]:
    return ref_subproof(m, d, True)


def ref_verify_inclusion(
    leaf_index: int, tree_size: int, hash_: bytes, path: list[bytes], root: bytes
) -> bool:
    if leaf_index >= tree_size:
        return False
    fn, sn, r = leaf_index, tree_size - 1, hash_
    for p in path:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            r = ref_hash(b"\x01" + p + r)
            if fn % 2 == 0:
                while not (fn % 2 == 1 or fn == 0):
                    fn //= 2
                    sn //= 2
        else:
            r = ref_hash(b"\x01" + r + p)
        fn //= 2
        sn //= 2
    return sn == 0 and r == root


def ref_verify_consistency(
    first: int, second: int, first_hash: bytes, second_hash: bytes, path: list[bytes]
) -> bool:
    if not path:
        return False
    if first & (first - 1) == 0:  # exact power of two
        path = [first_hash, *path]
    fn, sn = first - 1, second - 1
    while fn % 2 == 1:
        fn //= 2
        sn //= 2
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            fr = ref_hash(b"\x01" + c + fr)
            sr = ref_hash(b"\x01" + c + sr)
            if fn % 2 == 0:
                while not (fn % 2 == 1 or fn == 0):
                    fn //= 2
                    sn //= 2
        else:
            sr = ref_hash(b"\x01" + sr + c)
        fn //= 2
        sn //= 2
    return fr == first_hash and sr == second_hash and sn == 0


# ---------------------------------------------------------------- tests


def _leaves(n: int) -> list[bytes]:
    return [f"entry-{i}".encode() for i in range(n)]


def _tree(d: list[bytes]) -> MerkleTree:
    t = MerkleTree()
    for e in d:
        t.append(e)
    return t


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert MerkleTree().root() == ref_mth([])
    assert MerkleTree().root().hex().startswith("e3b0c442")


def test_leaf_and_node_domain_separation() -> None:
    assert leaf_hash(b"x") == ref_hash(b"\x00x")
    t = _tree([b"a", b"b"])
    assert t.root() == ref_hash(b"\x01" + ref_hash(b"\x00a") + ref_hash(b"\x00b"))


@pytest.mark.parametrize("n", range(1, 70))
def test_roots_and_proofs_match_reference(n: int) -> None:
    d = _leaves(n)
    t = _tree(d)
    bulk = MerkleTree.from_leaf_hashes([leaf_hash(e) for e in d])
    for size in range(0, n + 1):
        assert t.root(size) == ref_mth(d[:size]) == bulk.root(size)
    root = ref_mth(d)
    for m in range(n):
        proof = t.inclusion_proof(m)
        assert proof == ref_path(m, d)
        assert ref_verify_inclusion(m, n, leaf_hash(d[m]), proof, root)
        verify_inclusion(leaf_hash(d[m]), m, n, proof, root)
    for m in range(1, n):
        proof = t.consistency_proof(m, n)
        assert proof == ref_proof(m, d)
        assert ref_verify_consistency(m, n, ref_mth(d[:m]), root, proof)
        verify_consistency(m, n, ref_mth(d[:m]), root, proof)


def test_proofs_at_old_sizes() -> None:
    d = _leaves(37)
    t = _tree(d)
    for size in (5, 16, 17, 31):
        for m in range(size):
            assert t.inclusion_proof(m, size) == ref_path(m, d[:size])
        for old in range(1, size):
            assert t.consistency_proof(old, size) == ref_proof(old, d[:size])


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=300),
    data=st.data(),
)
def test_tampered_proofs_are_rejected(n: int, data: st.DataObject) -> None:
    d = _leaves(n)
    t = _tree(d)
    root = t.root()
    m = data.draw(st.integers(0, n - 1))
    proof = t.inclusion_proof(m)
    verify_inclusion(leaf_hash(d[m]), m, n, proof, root)
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 1]) + bad[i][1:]
        with pytest.raises(VerificationError):
            verify_inclusion(leaf_hash(d[m]), m, n, bad, root)
        assert not ref_verify_inclusion(m, n, leaf_hash(d[m]), bad, root)
        with pytest.raises(VerificationError):
            verify_inclusion(leaf_hash(d[m]), m, n, proof[:-1], root)
    other = (m + 1) % n
    with pytest.raises(VerificationError):
        verify_inclusion(leaf_hash(d[m]), other, n, proof, root)
    old = data.draw(st.integers(1, n - 1))
    cproof = t.consistency_proof(old)
    old_root = t.root(old)
    verify_consistency(old, n, old_root, root, cproof)
    bad_c = list(cproof)
    j = data.draw(st.integers(0, len(bad_c) - 1))
    bad_c[j] = hashlib.sha256(bad_c[j]).digest()
    with pytest.raises(VerificationError):
        verify_consistency(old, n, old_root, root, bad_c)
    assert not ref_verify_consistency(old, n, old_root, root, bad_c)
    with pytest.raises(VerificationError):
        verify_consistency(old, n, hashlib.sha256(old_root).digest(), root, cproof)


def test_consistency_edge_cases() -> None:
    t = _tree(_leaves(9))
    assert t.consistency_proof(0) == []
    assert t.consistency_proof(9) == []
    verify_consistency(0, 9, t.root(0), t.root(), [])
    verify_consistency(9, 9, t.root(), t.root(), [])
    with pytest.raises(VerificationError):
        verify_consistency(9, 9, t.root(8), t.root(), [])
    with pytest.raises(VerificationError):
        verify_consistency(5, 4, t.root(5), t.root(4), t.consistency_proof(4, 5))
    with pytest.raises(ValueError):
        t.inclusion_proof(9)
    with pytest.raises(ValueError):
        t.consistency_proof(3, 10)


def test_truncate_rolls_back_to_same_state() -> None:
    d = _leaves(50)
    t = _tree(d)
    t.truncate(21)
    assert t.root() == ref_mth(d[:21])
    for e in d[21:]:
        t.append(e)
    assert t.root() == ref_mth(d)
