"""Hash-to-curve for the PSI engine: RFC 9380 ``curve25519_XMD:SHA-512_ELL2_NU_``.

What is here:

- :func:`expand_message_xmd` (RFC 9380 section 5.3.1) with SHA-512;
- :func:`hash_to_field` (section 5.2) for GF(2^255 - 19), ``L = 48``;
- :func:`map_to_curve_elligator2` (section 6.7.1, ``Z = 2``) returning the full point, and
  :func:`encode_to_curve` (section 3, nonuniform encoding) including ``clear_cofactor``:
  the slow, readable reference that the known-answer tests check against RFC 9380
  appendix J.7.2;
- :func:`encode_to_u` / :func:`encode_many`: the fast path the protocol uses. It returns only
  the Montgomery u-coordinate of ``Q = map_to_curve(hash_to_field(msg))``, *before*
  ``clear_cofactor``. That is deliberate: X25519 ignores the sign of ``y`` (P and -P share
  u) and clamps every scalar to a multiple of 8, so ``X25519(k, u(Q)) = u([k/8]·[8]Q)``
  already multiplies the cofactor out. The fast path therefore needs no square root: one
  Legendre symbol per element and one inversion per batch (gmpy2), so it costs a small fraction of
  an X25519 scalar multiplication.

Why NU and not RO: the RO suite needs two maps, two square roots and a point addition per
element, roughly as expensive as a scalar multiplication in Python. The NU encoding maps
onto about half of the curve points with a non-uniform distribution, but nobody knows a
discrete logarithm of its outputs, which is what DH-based PSI relies on; the protocol
document states this choice.

Field arithmetic uses gmpy2 integers and is **not constant time**: timing may reveal
information about the identifier being hashed to a local observer of this process. This
module does no I/O and keeps no state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import gmpy2
from gmpy2 import mpz

SUITE_ID = "curve25519_XMD:SHA-512_ELL2_NU_"

P = mpz(2**255 - 19)
A = mpz(486662)
Z = mpz(2)
L = 48  # ceil((ceil(log2(p)) + k) / 8) with k = 128
_C1 = (P + 3) // 8  # square root exponent for p = 5 mod 8
_C2 = gmpy2.powmod(mpz(2), (P - 1) // 4, P)  # sqrt(-1)
_A2 = A * A % P
_A3 = _A2 * A % P
_PM1 = P - 1

_S_IN_BYTES = 128  # SHA-512 block size
_B_IN_BYTES = 64  # SHA-512 output size
_SHA512_ZPAD = hashlib.sha512(bytes(_S_IN_BYTES))


def _dst_prime(dst: bytes) -> bytes:
    if not 0 < len(dst) <= 255:
        raise ValueError("hash-to-curve domain separation tag must be 1 to 255 bytes")
    return dst + bytes([len(dst)])


def expand_message_xmd(msg: bytes, dst: bytes, len_in_bytes: int) -> bytes:
    """RFC 9380 section 5.3.1 with H = SHA-512."""
    ell = -(-len_in_bytes // _B_IN_BYTES)
    if ell > 255 or len_in_bytes > 65535 or len_in_bytes <= 0:
        raise ValueError("expand_message_xmd: requested length out of range")
    dst_prime = _dst_prime(dst)
    h0 = _SHA512_ZPAD.copy()
    h0.update(msg + len_in_bytes.to_bytes(2, "big") + b"\x00" + dst_prime)
    b0 = h0.digest()
    b_prev = hashlib.sha512(b0 + b"\x01" + dst_prime).digest()
    out = [b_prev]
    for i in range(2, ell + 1):
        mixed = bytes(x ^ y for x, y in zip(b0, b_prev, strict=True))
        b_prev = hashlib.sha512(mixed + bytes([i]) + dst_prime).digest()
        out.append(b_prev)
    return b"".join(out)[:len_in_bytes]


def hash_to_field(msg: bytes, dst: bytes, count: int = 1) -> list[int]:
    """RFC 9380 section 5.2 for GF(p), m = 1, L = 48."""
    uniform = expand_message_xmd(msg, dst, count * L)
    return [int(mpz(int.from_bytes(uniform[i * L : (i + 1) * L], "big")) % P) for i in range(count)]


def _is_square(x: mpz) -> bool:
    return bool(gmpy2.legendre(x, P) != -1)


def _sqrt(x: mpz) -> mpz:
    y = gmpy2.powmod(x, _C1, P)
    if y * y % P != x % P:
        y = y * _C2 % P
    return mpz(y)


def map_to_curve_elligator2(u: int) -> tuple[int, int]:
    """RFC 9380 section 6.7.1 (straightforward form) for curve25519: returns (x, y)."""
    uu = mpz(u)
    tv1 = Z * uu * uu % P
    if tv1 == _PM1:
        tv1 = mpz(0)
    x1 = (-A) * gmpy2.invert(tv1 + 1, P) % P
    gx1 = (x1 * x1 * x1 + A * x1 * x1 + x1) % P
    x2 = (-x1 - A) % P
    gx2 = tv1 * gx1 % P
    e2 = _is_square(gx1)
    x, y2 = (x1, gx1) if e2 else (x2, gx2)
    y = _sqrt(y2)
    e3 = (y % 2) == 1
    if e2 != e3:
        y = (-y) % P
    return int(x), int(y)


def _double(pt: tuple[int, int]) -> tuple[int, int]:
    """Affine doubling on the Montgomery curve y^2 = x^3 + A x^2 + x (never at infinity here)."""
    x, y = mpz(pt[0]), mpz(pt[1])
    lam = (3 * x * x + 2 * A * x + 1) * gmpy2.invert(2 * y, P) % P
    x3 = (lam * lam - A - 2 * x) % P
    y3 = (lam * (x - x3) - y) % P
    return int(x3), int(y3)


def encode_to_curve(msg: bytes, dst: bytes) -> tuple[int, int]:
    """Reference RFC 9380 encode_to_curve (NU suite), including clear_cofactor (h_eff = 8)."""
    (u,) = hash_to_field(msg, dst, 1)
    q = map_to_curve_elligator2(u)
    return _double(_double(_double(q)))


def map_to_u(u: int) -> int:
    """u-coordinate of ``map_to_curve_elligator2(u)`` without the square root."""
    uu = mpz(u)
    tv1 = Z * uu * uu % P
    if tv1 == _PM1:
        tv1 = mpz(0)
    d = tv1 + 1
    # gx1 * d^4 = d * (-A^3 + A^3 d - A d^2): same quadratic character as gx1.
    num = (_A3 * d - _A3 - A * d * d) * d % P
    inv = gmpy2.invert(d, P)
    if gmpy2.legendre(num, P) != -1:
        return int(-A * inv % P)
    return int(-A * tv1 * inv % P)


def encode_to_u(msg: bytes, dst: bytes) -> bytes:
    """Fast path for one message: 32-byte little-endian u of Q (before clear_cofactor)."""
    return encode_many([msg], dst)


def encode_many(msgs: Sequence[bytes], dst: bytes) -> bytes:
    """Encode every message; return the u-coordinates packed as 32-byte little-endian rows.

    Same result as ``map_to_u(hash_to_field(m, dst)[0])`` for each ``m``, written as one loop
    with local bindings because this runs once per identifier at both parties. The
    denominators ``d`` of all messages are inverted together (Montgomery's trick: one
    field inversion per call plus three multiplications per message).
    """
    dst_prime = _dst_prime(dst)
    tail0 = L.to_bytes(2, "big") + b"\x00" + dst_prime
    tail1 = b"\x01" + dst_prime
    zpad = _SHA512_ZPAD
    sha512 = hashlib.sha512
    from_bytes = int.from_bytes
    legendre = gmpy2.legendre
    p, a, a3, pm1 = P, A, _A3, _PM1
    nums: list[mpz] = []
    dens: list[mpz] = []
    prefix: list[mpz] = []
    acc = mpz(1)
    for msg in msgs:
        h = zpad.copy()
        h.update(msg + tail0)
        u = mpz(from_bytes(sha512(h.digest() + tail1).digest()[:L], "big"))
        tv1 = 2 * u * u % p
        if tv1 == pm1:
            tv1 = mpz(0)
        d = tv1 + 1  # never 0: tv1 = p - 1 was mapped to 0
        # gx1 * d^4 = d * (A^3 d - A^3 - A d^2): same quadratic character as gx1.
        square = legendre((a3 * d - a3 - a * d * d) * d, p) != -1
        nums.append(-a if square else -a * tv1)  # u = num / d
        dens.append(d)
        prefix.append(acc)
        acc = acc * d % p
    n = len(nums)
    if n == 0:
        return b""
    inv = gmpy2.invert(acc, p)  # 1 / (d_0 ... d_{n-1})
    out: list[bytes] = [b""] * n
    for i in range(n - 1, -1, -1):
        out[i] = int(nums[i] * prefix[i] * inv % p).to_bytes(32, "little")
        inv = inv * dens[i] % p
    return b"".join(out)
