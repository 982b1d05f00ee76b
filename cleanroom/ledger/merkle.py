"""RFC 6962 / RFC 9162 Merkle tree hashing, inclusion and consistency proofs.

- leaf hash ``SHA-256(0x00 || entry)``, node hash ``SHA-256(0x01 || left || right)``;
- ``MTH`` of ``n`` leaves splits at ``k``, the largest power of two smaller than ``n``;
- inclusion proofs (``PATH``) and consistency proofs (``PROOF``/``SUBPROOF``) are generated
  as RFC 9162 section 2.1.3.1 / 2.1.4.1 define them and verified with the algorithms of
  sections 2.1.3.2 / 2.1.4.2.

:class:`MerkleTree` keeps every leaf hash and the hash of every *complete, aligned*
subtree (level ``h`` holds the roots of leaves ``[i*2^h, (i+1)*2^h)``) in flat byte
arrays: about ``64 * n`` bytes. Any ``MTH(D[a:b])`` that the RFC recursion asks for is
then a right fold of at most ``log2(n)`` stored subtree roots, so roots at old sizes,
inclusion proofs and consistency proofs never rehash the log. Appending costs one leaf
hash plus on average one node hash.

Verification failures raise :class:`~cleanroom.ledger.errors.VerificationError`, one opaque
type. This module does no I/O: callers supply leaf bytes or leaf hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from cleanroom.ledger.errors import VerificationError

HASH_SIZE = 32
_sha256 = hashlib.sha256
EMPTY_ROOT = _sha256(b"").digest()


def leaf_hash(entry: bytes) -> bytes:
    """RFC 6962 leaf hash: ``SHA-256(0x00 || entry)``."""
    return _sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: ``SHA-256(0x01 || left || right)``."""
    return _sha256(b"\x01" + left + right).digest()


def _largest_pow2_below(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An append-only RFC 6962 tree over leaf hashes, with stored complete-subtree hashes."""

    __slots__ = ("_levels", "_size")

    def __init__(self) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0

    @classmethod
    def from_leaf_hashes(cls, hashes: bytes | bytearray | Iterable[bytes]) -> MerkleTree:
        """Build a tree in bulk (level by level) from concatenated or listed leaf hashes."""
        tree = cls()
        level0 = bytearray(hashes) if isinstance(hashes, bytes | bytearray) else bytearray(
            b"".join(hashes)
        )
        if len(level0) % HASH_SIZE:
            raise ValueError("leaf hashes must be 32 bytes each")
        tree._levels = [level0]
        tree._size = len(level0) // HASH_SIZE
        tree._rebuild_upper()
        return tree

    def _rebuild_upper(self) -> None:
        sha = _sha256
        levels = self._levels[:1]
        cur = levels[0]
        while len(cur) >= 2 * HASH_SIZE:
            mv = memoryview(cur)
            end = (len(cur) // (2 * HASH_SIZE)) * 2 * HASH_SIZE
            nxt = bytearray(
                b"".join(
                    [sha(b"\x01" + mv[i : i + 2 * HASH_SIZE]).digest()
                     for i in range(0, end, 2 * HASH_SIZE)]
                )
            )
            levels.append(nxt)
            cur = nxt
        self._levels = levels

    @property
    def size(self) -> int:
        return self._size

    def append_hash(self, lh: bytes) -> int:
        """Append a leaf hash; return its index."""
        if len(lh) != HASH_SIZE:
            raise ValueError("a leaf hash is 32 bytes")
        index = self._size
        levels = self._levels
        levels[0] += lh
        self._size += 1
        n = self._size
        h = 0
        node = lh
        # every time the count at level h becomes even, a new complete subtree closes
        while n % 2 == 0:
            left = bytes(levels[h][-2 * HASH_SIZE : -HASH_SIZE])
            node = node_hash(left, node)
            h += 1
            n //= 2
            if len(levels) <= h:
                levels.append(bytearray())
            levels[h] += node
        return index

    def append(self, entry: bytes) -> int:
        """Append raw entry bytes (hashed as a leaf); return the index."""
        return self.append_hash(leaf_hash(entry))

    def truncate(self, size: int) -> None:
        """Drop leaves ``>= size`` (used to roll back an append that failed to commit)."""
        if not 0 <= size <= self._size:
            raise ValueError("bad size")
        for h, lv in enumerate(self._levels):
            del lv[(size >> h) * HASH_SIZE :]
        self._size = size

    def leaf(self, index: int) -> bytes:
        if not 0 <= index < self._size:
            raise IndexError(index)
        return bytes(self._levels[0][index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def leaf_hashes(self) -> bytes:
        return bytes(self._levels[0])

    def _subtree(self, start: int, height: int) -> bytes:
        off = (start >> height) * HASH_SIZE
        return bytes(self._levels[height][off : off + HASH_SIZE])

    def range_hash(self, start: int, end: int) -> bytes:
        """``MTH(D[start:end])`` for a range the RFC recursion produces.

        ``start`` must be a multiple of the largest power of two not exceeding
        ``end - start`` (always true for ranges produced by MTH/PATH/PROOF recursion).
        """
        n = end - start
        if n <= 0 or end > self._size:
            raise ValueError("empty or out-of-range subtree")
        # decompose n into descending powers of two; those subtrees are complete & aligned
        parts: list[bytes] = []
        pos = start
        for h in range(n.bit_length() - 1, -1, -1):
            if n >> h & 1:
                if pos % (1 << h):
                    raise ValueError("unaligned subtree")
                parts.append(self._subtree(pos, h))
                pos += 1 << h
        acc = parts[-1]
        for p in reversed(parts[:-1]):
            acc = node_hash(p, acc)
        return acc

    def root(self, size: int | None = None) -> bytes:
        """``MTH`` of the first ``size`` leaves (default: all). Empty tree: SHA-256("")."""
        size = self._size if size is None else size
        if not 0 <= size <= self._size:
            raise ValueError(f"size {size} outside tree of size {self._size}")
        if size == 0:
            return EMPTY_ROOT
        return self.range_hash(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 2.1.3.1 ``PATH(index, D[0:size])``."""
        size = self._size if size is None else size
        if not 0 <= index < size <= self._size:
            raise ValueError(f"no inclusion proof for index {index} in size {size}")
        proof: list[bytes] = []
        start, end, m = 0, size, index
        # iterative form of PATH: collect siblings from the root down, then reverse
        while end - start > 1:
            k = _largest_pow2_below(end - start)
            if m < k:
                proof.append(self.range_hash(start + k, end))
                end = start + k
            else:
                proof.append(self.range_hash(start, start + k))
                start, m = start + k, m - k
        proof.reverse()
        return proof

    def consistency_proof(self, old: int, new: int | None = None) -> list[bytes]:
        """RFC 9162 2.1.4.1 ``PROOF(old, D[0:new])``; empty when ``old`` is 0 or ``new``."""
        new = self._size if new is None else new
        if not 0 <= old <= new <= self._size:
            raise ValueError(f"no consistency proof from {old} to {new}")
        if old == 0 or old == new:
            return []
        proof: list[bytes] = []
        start, end, m, complete = 0, new, old, True
        # iterative form of SUBPROOF(m, D[start:end], b)
        while True:
            n = end - start
            if m == n:
                if not complete:
                    proof.append(self.range_hash(start, end))
                break
            k = _largest_pow2_below(n)
            if m <= k:
                proof.append(self.range_hash(start + k, end))
                end = start + k
            else:
                proof.append(self.range_hash(start, start + k))
                start, m, complete = start + k, m - k, False
        proof.reverse()
        return proof


def root_of(entries: Sequence[bytes]) -> bytes:
    """Convenience: ``MTH`` of raw entries."""
    return MerkleTree.from_leaf_hashes([leaf_hash(e) for e in entries]).root()


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 2.1.3.2: check that leaf hash ``leaf`` is at ``index`` in tree ``root``.

    Raises :class:`VerificationError` (opaque) on any failure.
    """
    if not (0 <= index < size) or len(leaf) != HASH_SIZE or len(root) != HASH_SIZE:
        raise VerificationError()
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if len(p) != HASH_SIZE or sn == 0:
            raise VerificationError()
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or r != root:
        raise VerificationError()


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 2.1.4.2: check that tree ``old_root`` is a prefix of tree ``new_root``.

    ``old_size == 0`` is consistent with anything (empty proof); equal sizes need equal
    roots and an empty proof. Raises :class:`VerificationError` (opaque) on any failure.
    """
    if len(old_root) != HASH_SIZE or len(new_root) != HASH_SIZE or any(
        len(p) != HASH_SIZE for p in proof
    ):
        raise VerificationError()
    if not 0 <= old_size <= new_size:
        raise VerificationError()
    if old_size == 0:
        if proof:
            raise VerificationError()
        return
    if old_size == new_size:
        if proof or old_root != new_root:
            raise VerificationError()
        return
    if not proof:
        raise VerificationError()
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise VerificationError()
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if fr != old_root or sr != new_root or sn != 0:
        raise VerificationError()
