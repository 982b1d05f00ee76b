"""Paillier keys (g = n + 1): key generation, DJN short-exponent encryption, CRT decryption.

What this module is for
  * :func:`generate_keypair` makes keys of 2048 bits or more from gmpy2-tested Blum primes
    (p = q = 3 mod 4). Smaller moduli are refused with :class:`KeySizeError`.
  * :class:`PublicKey` encrypts with the Damgard-Jurik-Nielsen randomiser
    ``c = (1 + m n) * h_s^a mod n^2`` where ``h_s = (-x^2)^n mod n^2`` is fixed per key and
    ``a`` is a short random exponent (``4 * security level`` bits, 448 for a 2048-bit n).
    ``h_s^a`` comes from a precomputed fixed-base table, so an encryption costs about
    ``exponent_bits / 8`` multiplications mod n^2 instead of a full ``r^n`` exponentiation.
    ``x`` is derived from n by hashing (nothing up anyone's sleeve), so every party derives
    the same ``h_s`` from n alone and a phe key needs no extra parameter.
  * :class:`PrivateKey` decrypts with the CRT (mod p^2 and mod q^2).
  * Keys convert to and from phe's ``PaillierPublicKey`` / ``PaillierPrivateKey``: the
    ciphertexts are ordinary Paillier ciphertexts (the DJN randomiser is ``r^n`` with
    ``r = (-x^2)^a mod n``), so they decrypt with phe and phe's decrypt with ours.

What it must not do
  * No I/O, no logging of keys or plaintexts; ``repr`` never shows p or q.
  * It never reuses a randomiser and never lets callers choose one (see ``hazmat`` for the
    clearly-warned deterministic variant used by tests).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import gmpy2
import numpy as np

from protocols.paillier.errors import (
    EncodingError,
    KeySizeError,
    PaillierFormatError,
    PaillierKeyMismatchError,
    PlaintextOverflowError,
)
from protocols.paillier.fastexp import FixedBaseTable

if TYPE_CHECKING:
    from phe import paillier as _phe

    from protocols.paillier.packing import PackedVector
    from protocols.paillier.randomness import RandomizerPool
    from protocols.paillier.vector import EncryptedVector

Mpz = Any  # gmpy2.mpz has no type stubs

MIN_KEY_BITS = 2048
KEY_ID_BYTES = 16
_DJN_DOMAIN = b"cleanroom/paillier/djn-base/v1"
_KEY_ID_DOMAIN = b"cleanroom/paillier/key-id/v1"
_PRIME_REPS = 50  # gmpy2.is_prime: BPSW plus Miller-Rabin rounds


def security_bits(n_bits: int) -> int:
    """Symmetric-equivalent strength of an RSA/Paillier modulus (NIST SP 800-57 Part 1)."""
    if n_bits >= 15360:
        return 256
    if n_bits >= 7680:
        return 192
    if n_bits >= 3072:
        return 128
    return 112


def default_exponent_bits(n_bits: int) -> int:
    """Length of the DJN random exponent ``a``: four times the security level.

    The best known attack on a short exponent is Pollard's lambda (kangaroo) on
    ``c mod n = (h_s mod n)^a``, costing ``2^(L/2)``; Koshiba-Kurosawa style arguments ask
    ``L >= 2 * security``. We take twice that as a margin against multi-target and
    precomputation variants (Bernstein-Lange): 448 bits for a 2048-bit n, well under DJN's
    original ``ceil(|n|/2)`` = 1024. See docs/protocols/paillier.md.
    """
    return 4 * security_bits(n_bits)


def _int_bytes(v: int) -> bytes:
    return int(v).to_bytes((int(v).bit_length() + 7) // 8 or 1, "big")


def compute_key_id(n: int) -> bytes:
    """16-byte identifier of a public key: SHA-256 over a domain tag and n."""
    nb = _int_bytes(n)
    return hashlib.sha256(_KEY_ID_DOMAIN + len(nb).to_bytes(4, "big") + nb).digest()[
        :KEY_ID_BYTES
    ]


def derive_djn_root(n: int) -> int:
    """The public ``x`` of the DJN base ``h = -x^2 mod n``, derived from n with SHAKE-256.

    Deterministic and verifiable: the key owner cannot pick a weak base, and every holder
    of n derives the same ``h_s``.
    """
    nb = _int_bytes(n)
    counter = 0
    while True:
        stream = hashlib.shake_256(
            _DJN_DOMAIN + len(nb).to_bytes(4, "big") + nb + counter.to_bytes(4, "big")
        ).digest(len(nb) + 32)
        x = int.from_bytes(stream, "big") % n
        if x > 1 and x != n - 1 and math.gcd(x, n) == 1:
            return x
        counter += 1  # pragma: no cover - probability ~2^-1000


class PublicKey:
    """A Paillier public key ``n`` (g = n + 1) with a DJN fixed-base encryption table.

    ``exponent_bits`` is the encryptor's choice of DJN exponent length; it defaults to
    :func:`default_exponent_bits` and may not be set below ``2 * security_bits``.
    """

    __slots__ = (
        "_h",
        "_hs",
        "_n",
        "_n2",
        "_table",
        "exponent_bits",
        "key_id",
        "max_int",
        "n",
        "nsquare",
    )

    def __init__(self, n: int, *, exponent_bits: int | None = None) -> None:
        if isinstance(n, bool) or not isinstance(n, int | type(gmpy2.mpz(0))):
            raise PaillierFormatError("modulus must be an integer", field="n")
        n = int(n)
        if n.bit_length() < MIN_KEY_BITS:
            raise KeySizeError(
                f"Paillier modulus has {n.bit_length()} bits; at least {MIN_KEY_BITS} are "
                "required"
            )
        if n % 2 == 0 or gmpy2.is_square(n):
            raise PaillierFormatError("modulus must be odd and not a perfect square", field="n")
        sec = security_bits(n.bit_length())
        if exponent_bits is None:
            exponent_bits = default_exponent_bits(n.bit_length())
        if exponent_bits < 2 * sec:
            raise ValueError(
                f"DJN exponent of {exponent_bits} bits is below 2 x {sec}-bit security"
            )
        self.n = n
        self.nsquare = n * n
        self.max_int = n // 3 - 1
        self.key_id = compute_key_id(n)
        self.exponent_bits = exponent_bits
        self._n = gmpy2.mpz(n)
        self._n2 = self._n * self._n
        self._h: int | None = None
        self._hs: Mpz = None
        self._table: FixedBaseTable | None = None

    # -- identity -----------------------------------------------------------------------
    @property
    def n_bits(self) -> int:
        return self.n.bit_length()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.n == self.n

    def __hash__(self) -> int:
        return hash(("paillier-public-key", self.n))

    def __repr__(self) -> str:
        return f"PublicKey(bits={self.n_bits}, key_id={self.key_id.hex()})"

    def __reduce__(self) -> Any:
        raise TypeError("use protocols.paillier.serialization, never pickle")

    def require_same(self, other: PublicKey) -> None:
        """Raise :class:`PaillierKeyMismatchError` unless ``other`` is this key."""
        if other.n != self.n:
            raise PaillierKeyMismatchError(
                f"ciphertexts are under key {other.key_id.hex()}, expected {self.key_id.hex()}",
                field="key_id",
            )

    # -- DJN randomiser -----------------------------------------------------------------
    def djn_base(self) -> int:
        """``h = -x^2 mod n`` (public; see :func:`derive_djn_root`)."""
        if self._h is None:
            x = derive_djn_root(self.n)
            self._h = (-x * x) % self.n
        return self._h

    def djn_hs(self) -> Mpz:
        """``h_s = h^n mod n^2``: the fixed base of the DJN randomiser."""
        if self._hs is None:
            self._hs = gmpy2.powmod(self.djn_base(), self._n, self._n2)
        return self._hs

    @property
    def table(self) -> FixedBaseTable:
        """The fixed-base table for ``h_s`` (built on first use, ~0.1 s and ~7 MB)."""
        if self._table is None:
            self._table = FixedBaseTable(self.djn_hs(), self._n2, self.exponent_bits)
        return self._table

    def precompute(self) -> PublicKey:
        """Build the encryption table now rather than on the first encryption."""
        _ = self.table
        return self

    def _random_exponent_bytes(self) -> bytes:
        nb = (self.exponent_bits + 7) // 8
        raw = bytearray(secrets.token_bytes(nb))
        top = self.exponent_bits - 8 * (nb - 1)
        raw[-1] &= (1 << top) - 1
        return bytes(raw)

    def randomizer(self) -> Mpz:
        """A fresh DJN randomiser ``h_s^a mod n^2`` (an n-th residue) for one ciphertext."""
        return self.table.pow_bytes(self._random_exponent_bytes())

    def randomizers(self, count: int) -> list[Mpz]:
        table = self.table
        return [table.pow_bytes(self._random_exponent_bytes()) for _ in range(count)]

    # -- plaintexts and ciphertexts -----------------------------------------------------
    def check_plaintext(self, m: int, index: int | None = None) -> int:
        """Range-check a signed plaintext; returns its residue mod n."""
        if not -self.max_int <= m <= self.max_int:
            where = f"values[{index}]: " if index is not None else ""
            raise EncodingError(
                f"{where}encoded plaintext does not fit the signed range (|m| <= n/3)"
            )
        return m % self.n

    def validate_ciphertext(self, c: int, index: int | None = None) -> Mpz:
        """Check ``0 < c < n^2`` and ``gcd(c, n) = 1``; returns ``c`` as an mpz."""
        field = f"ciphertexts[{index}]" if index is not None else "ciphertext"
        if isinstance(c, bool) or not isinstance(c, int | type(gmpy2.mpz(0))):
            raise PaillierFormatError("ciphertext must be an integer", field=field)
        cz = gmpy2.mpz(c)
        if not 0 < cz < self._n2:
            raise PaillierFormatError("ciphertext outside [1, n^2)", field=field)
        if gmpy2.gcd(cz, self._n) != 1:
            raise PaillierFormatError("ciphertext is not a unit modulo n^2", field=field)
        return cz

    def validate_ciphertexts(self, cts: list[Any]) -> list[Mpz]:
        """:meth:`validate_ciphertext` for many: range checks per value, then one gcd of
        the product modulo n (a non-unit makes the product a non-unit); only if that fails
        are the values checked one by one, to name the first bad index."""
        out: list[Mpz] = []
        n, n2 = self._n, self._n2
        mpz = gmpy2.mpz
        mpz_type = type(mpz(0))
        prod = mpz(1)
        for i, c in enumerate(cts):
            if isinstance(c, bool) or not isinstance(c, int | mpz_type):
                raise PaillierFormatError("ciphertext must be an integer",
                                          field=f"ciphertexts[{i}]")
            cz = mpz(c)
            if not 0 < cz < n2:
                raise PaillierFormatError("ciphertext outside [1, n^2)",
                                          field=f"ciphertexts[{i}]")
            prod = prod * cz % n
            out.append(cz)
        if gmpy2.gcd(prod, n) != 1:
            for i, cz in enumerate(out):
                self.validate_ciphertext(cz, i)
        return out

    def raw_encrypt(self, m: int) -> Mpz:
        """Encrypt one signed integer plaintext with fresh DJN randomness."""
        residue = self.check_plaintext(int(m))
        return (residue * self._n + 1) * self.randomizer() % self._n2

    def encrypt_encoded(
        self,
        encoded: Iterable[int] | np.ndarray,
        *,
        frac_bits: int = 0,
        pool: RandomizerPool | None = None,
    ) -> EncryptedVector:
        """Encrypt already-encoded signed integers (fixed-point scale ``2^-frac_bits``).

        Randomisers come from ``pool`` when given (each used once), else are drawn fresh.
        """
        from protocols.paillier.encoding import as_int_list
        from protocols.paillier.vector import EncryptedVector

        ints = as_int_list(encoded, name="values")
        residues = [self.check_plaintext(m, i) for i, m in enumerate(ints)]
        if pool is not None:
            pool.require_key(self)
            rands = pool.take(len(residues))
        else:
            rands = self.randomizers(len(residues))
        n, n2 = self._n, self._n2
        cts = [(r * n + 1) * s % n2 for r, s in zip(residues, rands, strict=True)]
        return EncryptedVector._trusted(self, cts, frac_bits, fresh=True)

    def encrypt(
        self,
        values: Iterable[float] | np.ndarray,
        *,
        frac_bits: int | None = None,
        pool: RandomizerPool | None = None,
    ) -> EncryptedVector:
        """Fixed-point encode real values (scale ``2^-frac_bits``, default 32) and encrypt."""
        from protocols.paillier.encoding import DEFAULT_FRAC_BITS, encode

        f = DEFAULT_FRAC_BITS if frac_bits is None else frac_bits
        return self.encrypt_encoded(encode(values, f), frac_bits=f, pool=pool)

    # -- phe interop --------------------------------------------------------------------
    def to_phe(self) -> _phe.PaillierPublicKey:
        from phe import paillier

        return paillier.PaillierPublicKey(self.n)

    @classmethod
    def from_phe(cls, key: _phe.PaillierPublicKey) -> PublicKey:
        if int(key.g) != int(key.n) + 1:
            raise PaillierFormatError("only g = n + 1 keys are supported", field="g")
        return cls(int(key.n))


class PrivateKey:
    """The factors p < q of n with CRT decryption constants. Keep it at its owner."""

    __slots__ = ("_crt", "_hp", "_hq", "_p", "_p2", "_p2_inv_q2", "_p_inv_q", "_q", "_q2",
                 "public_key")

    def __init__(self, public_key: PublicKey, p: int, q: int) -> None:
        p, q = int(p), int(q)
        if p == q or p < 3 or q < 3 or p * q != public_key.n:
            raise PaillierFormatError("p and q are not distinct factors of n", field="p,q")
        if p > q:
            p, q = q, p
        self.public_key = public_key
        self._p, self._q = gmpy2.mpz(p), gmpy2.mpz(q)
        self._p2, self._q2 = self._p * self._p, self._q * self._q
        self._p_inv_q = gmpy2.invert(self._p, self._q)
        self._hp = self._h(self._p, self._p2)
        self._hq = self._h(self._q, self._q2)
        self._p2_inv_q2 = gmpy2.invert(self._p2, self._q2)
        self._crt: tuple[FixedBaseTable, FixedBaseTable] | None = None

    def _h(self, x: Mpz, x2: Mpz) -> Mpz:
        # h_x = L_x(g^(x-1) mod x^2)^-1 mod x with g = n + 1
        g = self.public_key._n + 1
        lx = (gmpy2.powmod(g, x - 1, x2) - 1) // x
        try:
            return gmpy2.invert(lx, x)
        except ZeroDivisionError as exc:  # pragma: no cover - only for invalid factors
            raise PaillierFormatError("factors do not form a Paillier key", field="p,q") from exc

    @property
    def p(self) -> int:
        return int(self._p)

    @property
    def q(self) -> int:
        return int(self._q)

    def __repr__(self) -> str:
        return f"PrivateKey(bits={self.public_key.n_bits}, key_id={self.public_key.key_id.hex()})"

    def __reduce__(self) -> Any:
        raise TypeError("private keys must not be pickled; see protocols.paillier.serialization")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivateKey) and other.public_key == self.public_key

    def __hash__(self) -> int:
        return hash(("paillier-private-key", self.public_key.n))

    # -- owner-side encryption (CRT) ----------------------------------------------------
    def precompute(self) -> PrivateKey:
        """Build the owner's CRT encryption tables now (two tables modulo p^2 and q^2)."""
        if self._crt is None:
            pk = self.public_key
            hs = pk.djn_hs()
            self._crt = (FixedBaseTable(hs % self._p2, self._p2, pk.exponent_bits),
                         FixedBaseTable(hs % self._q2, self._q2, pk.exponent_bits))
        return self

    def _encrypt_residues(self, residues: list[int], exponents: list[bytes]) -> list[Mpz]:
        """Ciphertexts of residues mod n with the given DJN exponent bytes (little-endian,
        top byte masked), computed modulo p^2 and q^2 and joined by the CRT. The result is
        bit-for-bit the public-key ciphertext ``(1 + m n) * h_s^a mod n^2``."""
        tp, tq = self.precompute()._crt  # type: ignore[misc]
        n = self.public_key._n
        p2, q2, k = self._p2, self._q2, self._p2_inv_q2
        out: list[Mpz] = []
        for m, a in zip(residues, exponents, strict=True):
            g = m * n + 1
            cp = g % p2 * tp.pow_bytes(a) % p2
            cq = g % q2 * tq.pow_bytes(a) % q2
            out.append(cp + (cq - cp) * k % q2 * p2)
        return out

    def encrypt_encoded(self, encoded: Iterable[int] | np.ndarray, *,
                        frac_bits: int = 0) -> EncryptedVector:
        """Encrypt under this key pair's public key, as :meth:`PublicKey.encrypt_encoded`
        (fresh DJN exponent per value, same ciphertext distribution) but about 1.5-2x
        faster: the key owner works modulo p^2 and q^2. Only the key owner can do this."""
        from protocols.paillier.encoding import as_int_list
        from protocols.paillier.vector import EncryptedVector

        pk = self.public_key
        ints = as_int_list(encoded, name="values")
        residues = [pk.check_plaintext(m, i) for i, m in enumerate(ints)]
        exps = [pk._random_exponent_bytes() for _ in residues]
        return EncryptedVector._trusted(pk, self._encrypt_residues(residues, exps), frac_bits,
                                        fresh=True)

    # -- decryption ---------------------------------------------------------------------
    def raw_decrypt(self, c: int) -> int:
        """Plaintext residue in ``[0, n)`` of one ciphertext, by the CRT."""
        cz = gmpy2.mpz(c)
        p, q = self._p, self._q
        mp = (gmpy2.powmod(cz, p - 1, self._p2) - 1) // p * self._hp % p
        mq = (gmpy2.powmod(cz, q - 1, self._q2) - 1) // q * self._hq % q
        return int(mp + (mq - mp) * self._p_inv_q % q * p)

    def signed(self, residue: int, index: int | None = None) -> int:
        """Map a residue to a signed integer; the band ``(n/3, 2n/3)`` means overflow."""
        pk = self.public_key
        if residue <= pk.max_int:
            return residue
        if residue >= pk.n - pk.max_int:
            return residue - pk.n
        where = f"ciphertexts[{index}]: " if index is not None else ""
        raise PlaintextOverflowError(
            f"{where}decrypted value lies outside the signed range: the computation "
            "overflowed modulo n or the ciphertext was altered"
        )

    def decrypt_encoded(self, vector: EncryptedVector) -> list[int]:
        """Signed fixed-point integers (scale ``2^-vector.frac_bits``) of an encrypted vector."""
        self.public_key.require_same(vector.public_key)
        return [self.signed(self.raw_decrypt(c), i) for i, c in enumerate(vector.ciphertexts)]

    def decrypt(self, vector: EncryptedVector | PackedVector) -> np.ndarray:
        """Decrypt and decode to float64 (plain or packed vectors)."""
        from protocols.paillier.encoding import decode
        from protocols.paillier.packing import PackedVector

        if isinstance(vector, PackedVector):
            return decode(vector.decrypt_encoded(self), vector.frac_bits)
        return decode(self.decrypt_encoded(vector), vector.frac_bits)

    # -- phe interop --------------------------------------------------------------------
    def to_phe(self) -> _phe.PaillierPrivateKey:
        from phe import paillier

        return paillier.PaillierPrivateKey(self.public_key.to_phe(), self.p, self.q)

    @classmethod
    def from_phe(cls, key: _phe.PaillierPrivateKey) -> PrivateKey:
        return cls(PublicKey.from_phe(key.public_key), int(key.p), int(key.q))


def _blum_prime(bits: int) -> Mpz:
    """A random ``bits``-bit prime p = 3 mod 4 with its top two bits set."""
    while True:
        start = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        p = gmpy2.next_prime(start)
        while p % 4 != 3:
            p = gmpy2.next_prime(p)
        if p.bit_length() == bits and gmpy2.is_prime(p, _PRIME_REPS):
            return p


def generate_keypair(bits: int = MIN_KEY_BITS) -> tuple[PublicKey, PrivateKey]:
    """Fresh Paillier keys with an n of exactly ``bits`` bits (>= 2048, even).

    p and q are Blum primes (3 mod 4) of equal length with ``gcd((p-1)/2, (q-1)/2) = 1``,
    which makes ``h = -x^2`` generate the large cyclic group DJN reason about.
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError("bits must be an integer")
    if bits < MIN_KEY_BITS:
        raise KeySizeError(f"refusing a {bits}-bit Paillier key: at least {MIN_KEY_BITS} bits")
    if bits % 2:
        raise KeySizeError(f"key size must be even, got {bits}")
    half = bits // 2
    while True:
        p = _blum_prime(half)
        q = _blum_prime(half)
        if p == q or gmpy2.gcd((p - 1) // 2, (q - 1) // 2) != 1:
            continue
        n = p * q
        if n.bit_length() != bits:  # pragma: no cover - top bits set make this impossible
            continue
        public = PublicKey(int(n))
        return public, PrivateKey(public, int(p), int(q))

