"""Fast modular exponentiation helpers over gmpy2: fixed-base tables and multi-exponentiation.

* :class:`FixedBaseTable` precomputes ``base^(d * 2^(8 i))`` for every byte position ``i`` and
  byte value ``d`` so that ``base^a`` for an exponent of ``L`` bits costs ``ceil(L / 8)``
  modular multiplications and no squarings (a windowed "comb" with 8-bit windows). It is used
  for the DJN randomiser ``h_s^a`` whose base is fixed per key.
* :func:`multiexp` computes ``prod(b_i ^ e_i) mod m`` for many bases at once with the bucket
  method (Pippenger): per window of ``c`` bits each base costs one multiplication, plus
  ``2^(c+1)`` multiplications per window for the buckets. It falls back to one ``powmod``
  per base when that is estimated to be cheaper (few bases or huge exponents), and groups
  bases by exponent when there are few distinct exponents (a constant or a 0/1 column).

This module is pure arithmetic: it draws no randomness, keeps no secrets of its own and does
no I/O. Its timing depends on the exponents (it is not constant-time), which is acceptable
for public exponents (plaintext feature values known to the party computing) and for the
DJN randomiser exponent (whose bytes only select table rows; see docs/protocols/paillier.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gmpy2
import numpy as np

Mpz = Any  # gmpy2.mpz has no type stubs

WINDOW_BITS = 8
_ROW = 1 << WINDOW_BITS


class FixedBaseTable:
    """Precomputed powers of one fixed base modulo ``modulus`` for exponents < 2^exponent_bits.

    Memory: ``ceil(exponent_bits / 8) * 256`` residues (about 7 MB for a 448-bit exponent
    modulo a 4096-bit n^2).
    """

    __slots__ = ("_flat", "exponent_bits", "modulus", "n_bytes")

    def __init__(self, base: int, modulus: int, exponent_bits: int) -> None:
        if exponent_bits <= 0:
            raise ValueError("exponent_bits must be positive")
        mod = gmpy2.mpz(modulus)
        self.modulus = mod
        self.exponent_bits = exponent_bits
        self.n_bytes = (exponent_bits + 7) // 8
        flat: list[Mpz] = []
        row_base = gmpy2.mpz(base) % mod
        for _ in range(self.n_bytes):
            row: list[Mpz] = [gmpy2.mpz(1), row_base]
            acc = row_base
            for _d in range(2, _ROW):
                acc = acc * row_base % mod
                row.append(acc)
            flat.extend(row)
            # next row's base is row_base^256 = row[255] * row_base
            row_base = acc * row_base % mod
        self._flat = flat

    def pow_bytes(self, digits: bytes) -> Mpz:
        """``base^a`` where ``a = int.from_bytes(digits, "little")``; ``len(digits)`` must be
        ``n_bytes`` and ``a < 2^exponent_bits`` (the caller masks the top byte)."""
        if len(digits) != self.n_bytes:
            raise ValueError(f"expected {self.n_bytes} exponent bytes, got {len(digits)}")
        flat = self._flat
        mod = self.modulus
        acc = None
        offset = 0
        for d in digits:
            if d:
                v = flat[offset + d]
                acc = v if acc is None else acc * v % mod
            offset += _ROW
        return gmpy2.mpz(1) if acc is None else acc

    def pow(self, exponent: int) -> Mpz:
        """``base^exponent`` for ``0 <= exponent < 2^exponent_bits``."""
        if exponent < 0 or exponent.bit_length() > self.exponent_bits:
            raise ValueError(f"exponent must lie in [0, 2^{self.exponent_bits})")
        return self.pow_bytes(int(exponent).to_bytes(self.n_bytes, "little"))


def _direct(bases: Sequence[Mpz], exps: Sequence[int], mod: Mpz) -> Mpz:
    acc = gmpy2.mpz(1)
    for b, e in zip(bases, exps, strict=True):
        if e:
            acc = acc * gmpy2.powmod(b, e, mod) % mod
    return acc


def _best_window(count: int, bits: int) -> tuple[int, int]:
    """Window width minimising the bucket method's multiplication count, and that count."""
    best_c, best_cost = 1, None
    for c in range(1, 17):
        windows = (bits + c - 1) // c
        cost = windows * (count + (2 << c)) + bits  # + squarings between windows
        if best_cost is None or cost < best_cost:
            best_c, best_cost = c, cost
    assert best_cost is not None
    return best_c, best_cost


def multiexp(bases: Sequence[Mpz], exps: Sequence[int] | np.ndarray, modulus: int) -> Mpz:
    """``prod(bases[i] ^ exps[i]) mod modulus`` for non-negative integer exponents.

    ``exps`` may be a list of Python ints or a numpy integer array (values must be >= 0).
    """
    mod = gmpy2.mpz(modulus)
    if len(bases) != len(exps):
        raise ValueError(f"{len(bases)} bases but {len(exps)} exponents")
    if len(bases) == 0:
        return gmpy2.mpz(1)
    arr: np.ndarray | None = None
    exp_list: list[int] | None = None
    if isinstance(exps, np.ndarray):
        if exps.dtype.kind not in "iu":
            raise TypeError("exponents must be an integer array")
        if exps.size and int(exps.min()) < 0:
            raise ValueError("multiexp needs non-negative exponents")
        max_e = int(exps.max())
        if max_e < 2**63:
            arr = exps.astype(np.int64, copy=False)
        else:
            exp_list = [int(e) for e in exps.tolist()]
    else:
        exp_list = [int(e) for e in exps]
        if any(e < 0 for e in exp_list):
            raise ValueError("multiexp needs non-negative exponents")
        max_e = max(exp_list)
    bits = max_e.bit_length()
    if bits == 0:
        return gmpy2.mpz(1)
    count = len(bases)
    if arr is not None and count > 64:
        # few distinct exponents (a constant or 0/1 column): one product per value, then
        # one powmod per value; cheaper than buckets when count >> values * bits
        values, inverse = np.unique(arr, return_inverse=True)
        if values.size * bits * 2 < count:
            groups: list[Mpz] = [gmpy2.mpz(1)] * values.size
            for i, g in enumerate(inverse.tolist()):
                groups[g] = groups[g] * bases[i] % mod
            return _direct(groups, values.tolist(), mod)
    c, bucket_cost = _best_window(count, bits)
    direct_cost = count * bits  # powmod: ~bits squarings + bits/5 mults, in C (a bit cheaper)
    if direct_cost <= bucket_cost:
        if exp_list is None:
            assert arr is not None
            exp_list = arr.tolist()
        return _direct(bases, exp_list, mod)

    mask = (1 << c) - 1
    windows = (bits + c - 1) // c
    acc = None
    for w in range(windows - 1, -1, -1):
        shift = w * c
        if arr is not None:
            digits = (arr >> shift) & mask
            nz = np.flatnonzero(digits)
            pairs: Any = zip(nz.tolist(), digits[nz].tolist(), strict=True)
        else:
            assert exp_list is not None
            pairs = ((i, (e >> shift) & mask) for i, e in enumerate(exp_list))
        buckets: list[Mpz | None] = [None] * (mask + 1)
        for i, d in pairs:
            if d:
                b = buckets[d]
                buckets[d] = bases[i] if b is None else b * bases[i] % mod
        running = None
        total = None
        for d in range(mask, 0, -1):
            b = buckets[d]
            if b is not None:
                running = b if running is None else running * b % mod
            if running is not None:
                total = running if total is None else total * running % mod
        if acc is not None:
            acc = gmpy2.powmod(acc, 1 << c, mod)
            if total is not None:
                acc = acc * total % mod
        else:
            acc = total
    return gmpy2.mpz(1) if acc is None else acc
