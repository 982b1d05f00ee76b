"""HAZARDOUS MATERIALS: deterministic Paillier primitives for tests and known-answer vectors.

WARNING. Everything here takes randomness as an argument. A ciphertext made with an
exponent that anyone else knows, or with the same exponent twice, is not encrypted: the
exponent strips the randomiser and reveals the plaintext (or the difference of two).
Production code must use :meth:`PublicKey.encrypt` / :meth:`PublicKey.encrypt_encoded`
(fresh randomness) and ``for_transport()``. This module exists so tests can pin the
randomness (pyca/cryptography style) and the benchmark can time the textbook baseline.

No I/O; nothing here is used by the protocol code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import gmpy2
import numpy as np

from protocols.paillier.encoding import as_int_list
from protocols.paillier.keys import PrivateKey, PublicKey
from protocols.paillier.vector import EncryptedVector

Mpz = Any


def djn_randomizer_for_exponent(public_key: PublicKey, exponent: int) -> Mpz:
    """``h_s^a mod n^2`` for a caller-chosen ``a`` (via the fixed-base table)."""
    return public_key.table.pow(exponent)


def djn_r_for_exponent(public_key: PublicKey, exponent: int) -> int:
    """The classic Paillier randomness ``r = h^a mod n`` equivalent to DJN exponent ``a``:
    ``r^n mod n^2 == h_s^a``, so ``phe``'s ``raw_encrypt(m, r_value=r)`` gives the same
    ciphertext."""
    return int(gmpy2.powmod(public_key.djn_base(), exponent, public_key.n))


def encrypt_with_exponents_unsafe(
    public_key: PublicKey,
    encoded: Iterable[int] | np.ndarray,
    exponents: Iterable[int],
    *,
    frac_bits: int = 0,
) -> EncryptedVector:
    """DANGER: encrypt with caller-supplied DJN exponents (tests and vectors only)."""
    ints = as_int_list(encoded, name="values")
    exps = [int(a) for a in exponents]
    if len(exps) != len(ints):
        raise ValueError("one exponent per value is required")
    n, n2 = public_key._n, public_key._n2
    cts = [
        (public_key.check_plaintext(m, i) * n + 1) * public_key.table.pow(a) % n2
        for i, (m, a) in enumerate(zip(ints, exps, strict=True))
    ]
    return EncryptedVector._trusted(public_key, cts, frac_bits)


def decrypt_textbook(private_key: PrivateKey, ciphertext: int) -> int:
    """Paillier's plain formula ``L(c^lambda mod n^2) * mu mod n`` (no CRT): the baseline
    the CRT decryption is measured and checked against."""
    pk = private_key.public_key
    p, q = private_key.p, private_key.q
    lam = (p - 1) * (q - 1) // int(gmpy2.gcd(p - 1, q - 1))
    n, n2 = pk.n, pk.nsquare
    mu = gmpy2.invert((gmpy2.powmod(n + 1, lam, n2) - 1) // n, n)
    return int((gmpy2.powmod(ciphertext, lam, n2) - 1) // n * mu % n)
