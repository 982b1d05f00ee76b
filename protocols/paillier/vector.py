"""Encrypted vectors of fixed-point values and their homomorphic operations.

An :class:`EncryptedVector` is a list of Paillier ciphertexts under one public key, all at
the same fixed-point scale ``2^-frac_bits``. Operations:

* ``a + b``, ``a - b``, ``-a``: element-wise on ciphertexts (scales are aligned by
  multiplying the coarser one by a power of two);
* :meth:`~EncryptedVector.add_plain` / :meth:`~EncryptedVector.add_encoded`: add plaintexts;
* :meth:`~EncryptedVector.mul_encoded`: multiply element-wise by plaintext integers (scale
  unchanged) and :meth:`~EncryptedVector.mul_plain` by reals (scales add);
* :meth:`~EncryptedVector.dot` (also ``vec @ matrix``): ``sum_i c_i * X[i, j]`` for every
  column j of an integer matrix, by bucket multi-exponentiation: the encrypted gradient
  ``X^T d`` of a logistic regression;
* :meth:`~EncryptedVector.rerandomize` / :meth:`~EncryptedVector.for_transport`: multiply
  by fresh encryptions of zero so the bytes leaving the owner cannot be linked to the
  computation that produced them. The serialisers call ``for_transport`` by default.

Nothing here decrypts, draws keys, logs values or does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import gmpy2
import numpy as np

from protocols.paillier.encoding import DEFAULT_FRAC_BITS, as_int_list, encode
from protocols.paillier.errors import EncodingError, PaillierFormatError
from protocols.paillier.fastexp import multiexp
from protocols.paillier.keys import PublicKey

if TYPE_CHECKING:
    from phe import paillier as _phe

    from protocols.paillier.randomness import RandomizerPool

Mpz = Any
IntLike = Iterable[int] | np.ndarray


class EncryptedVector:
    """Ciphertexts under ``public_key`` at scale ``2^-frac_bits``.

    ``fresh`` is True only for ciphertexts straight out of encryption or re-randomisation
    (their randomness is independent of everything else); any homomorphic result is not
    fresh and is re-randomised by :meth:`for_transport`.
    """

    __slots__ = ("_cts", "frac_bits", "fresh", "public_key")

    def __init__(
        self,
        public_key: PublicKey,
        ciphertexts: Iterable[int],
        frac_bits: int = 0,
        *,
        validate: bool = True,
    ) -> None:
        """Wrap ciphertexts received from elsewhere (validated unless told otherwise)."""
        if frac_bits < 0:
            raise PaillierFormatError("frac_bits must be >= 0", field="frac_bits")
        cts = list(ciphertexts)
        cts = (public_key.validate_ciphertexts(cts) if validate
               else [gmpy2.mpz(c) for c in cts])
        self.public_key = public_key
        self._cts: list[Mpz] = cts
        self.frac_bits = frac_bits
        self.fresh = False

    @classmethod
    def _trusted(
        cls, public_key: PublicKey, cts: list[Mpz], frac_bits: int, *, fresh: bool = False
    ) -> EncryptedVector:
        obj = cls.__new__(cls)
        obj.public_key = public_key
        obj._cts = cts
        obj.frac_bits = frac_bits
        obj.fresh = fresh
        return obj

    # -- container ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._cts)

    def __repr__(self) -> str:
        return (
            f"EncryptedVector(len={len(self)}, frac_bits={self.frac_bits}, "
            f"key_id={self.public_key.key_id.hex()}, fresh={self.fresh})"
        )

    def __reduce__(self) -> Any:
        raise TypeError("use protocols.paillier.serialization, never pickle")

    @property
    def ciphertexts(self) -> list[int]:
        """The ciphertexts as Python ints (a copy)."""
        return [int(c) for c in self._cts]

    def __getitem__(self, index: int | slice) -> EncryptedVector:
        if isinstance(index, slice):
            return self._trusted(self.public_key, self._cts[index], self.frac_bits,
                                 fresh=self.fresh)
        return self._trusted(self.public_key, [self._cts[index]], self.frac_bits,
                             fresh=self.fresh)

    def take(self, indices: Sequence[int] | np.ndarray) -> EncryptedVector:
        """Sub-vector at ``indices`` (e.g. a mini-batch)."""
        idx = as_int_list(np.asarray(indices) if not isinstance(indices, np.ndarray)
                          else indices, name="indices")
        return self._trusted(self.public_key, [self._cts[i] for i in idx], self.frac_bits,
                             fresh=self.fresh)

    @classmethod
    def concat(cls, parts: Sequence[EncryptedVector]) -> EncryptedVector:
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        f = max(p.frac_bits for p in parts)
        out: list[Mpz] = []
        for p in parts:
            first.public_key.require_same(p.public_key)
            out.extend(p.rescale(f)._cts)
        return cls._trusted(first.public_key, out, f,
                            fresh=all(p.fresh and p.frac_bits == f for p in parts))

    # -- scale --------------------------------------------------------------------------
    def rescale(self, frac_bits: int) -> EncryptedVector:
        """The same values at a finer scale (multiplies every plaintext by a power of 2)."""
        if frac_bits < self.frac_bits:
            raise EncodingError(
                f"cannot lower the scale from {self.frac_bits} to {frac_bits} frac bits "
                "under encryption (that needs a division); decrypt or use a finer target"
            )
        if frac_bits == self.frac_bits:
            return self
        k = 1 << (frac_bits - self.frac_bits)
        n2 = self.public_key._n2
        cts = [gmpy2.powmod(c, k, n2) for c in self._cts]
        return self._trusted(self.public_key, cts, frac_bits)

    def _aligned(self, other: EncryptedVector) -> tuple[EncryptedVector, EncryptedVector]:
        self.public_key.require_same(other.public_key)
        if len(self) != len(other):
            raise ValueError(f"length mismatch: {len(self)} vs {len(other)}")
        f = max(self.frac_bits, other.frac_bits)
        return self.rescale(f), other.rescale(f)

    # -- additive operations ------------------------------------------------------------
    def __add__(self, other: EncryptedVector) -> EncryptedVector:
        if not isinstance(other, EncryptedVector):
            return NotImplemented
        a, b = self._aligned(other)
        n2 = self.public_key._n2
        cts = [x * y % n2 for x, y in zip(a._cts, b._cts, strict=True)]
        return self._trusted(self.public_key, cts, a.frac_bits)

    def __neg__(self) -> EncryptedVector:
        n2 = self.public_key._n2
        return self._trusted(self.public_key, [gmpy2.invert(c, n2) for c in self._cts],
                             self.frac_bits)

    def __sub__(self, other: EncryptedVector) -> EncryptedVector:
        if not isinstance(other, EncryptedVector):
            return NotImplemented
        return self + (-other)

    def add_encoded(self, encoded: IntLike) -> EncryptedVector:
        """Add plaintext integers already at this vector's scale (a scalar broadcasts)."""
        ints = self._broadcast(encoded, "encoded")
        pk = self.public_key
        n, n2 = pk._n, pk._n2
        cts = [
            c * (pk.check_plaintext(m, i) * n + 1) % n2
            for i, (c, m) in enumerate(zip(self._cts, ints, strict=True))
        ]
        return self._trusted(pk, cts, self.frac_bits)

    def add_plain(self, values: Iterable[float] | np.ndarray | float) -> EncryptedVector:
        """Add real values, encoded at this vector's scale."""
        arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
        if arr.shape == (1,) and len(self) != 1:
            arr = np.full(len(self), arr[0])
        return self.add_encoded(encode(arr, self.frac_bits))

    def sum(self) -> EncryptedVector:
        """Encryption of the sum of all elements (a vector of length 1)."""
        n2 = self.public_key._n2
        acc = gmpy2.mpz(1)
        for c in self._cts:
            acc = acc * c % n2
        return self._trusted(self.public_key, [acc], self.frac_bits)

    # -- multiplicative operations ------------------------------------------------------
    def _broadcast(self, encoded: IntLike | int, name: str) -> list[int]:
        if isinstance(encoded, int | np.integer) and not isinstance(encoded, bool | np.bool_):
            return [int(encoded)] * len(self)
        ints = as_int_list(encoded, name=name)  # type: ignore[arg-type]
        if len(ints) != len(self):
            raise ValueError(f"{name}: length {len(ints)} does not match vector {len(self)}")
        return ints

    def mul_encoded(self, factors: IntLike | int, *, frac_bits: int = 0) -> EncryptedVector:
        """Multiply element-wise by plaintext integers (negative allowed; a scalar broadcasts).

        ``frac_bits`` is the scale of the factors; the result's scale is the sum.
        """
        ints = self._broadcast(factors, "factors")
        n2 = self.public_key._n2
        cts = [gmpy2.powmod(c, k, n2) for c, k in zip(self._cts, ints, strict=True)]
        return self._trusted(self.public_key, cts, self.frac_bits + frac_bits)

    def mul_plain(
        self, values: Iterable[float] | np.ndarray | float, *, frac_bits: int = DEFAULT_FRAC_BITS
    ) -> EncryptedVector:
        """Multiply element-wise by reals encoded at ``frac_bits`` (scales add)."""
        arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
        if arr.shape == (1,) and len(self) != 1:
            return self.mul_encoded(encode(arr, frac_bits)[0], frac_bits=frac_bits)
        return self.mul_encoded(encode(arr, frac_bits), frac_bits=frac_bits)

    def dot(self, matrix: np.ndarray | Sequence[int] | Sequence[Sequence[int]], *,
            frac_bits: int = 0) -> EncryptedVector:
        """``[sum_i m_i * X[i, j] for j]``: encrypted vector times a plaintext integer matrix.

        ``matrix`` has shape ``(len(self),)`` (result of length 1) or ``(len(self), k)``
        (result of length k) and holds integers at scale ``2^-frac_bits``; the result's scale
        is ``self.frac_bits + frac_bits``. Each column is one multi-exponentiation (bucket
        method), positive and negative entries separately, then one inversion.
        """
        mat = np.asarray(matrix)
        if mat.dtype.kind not in "iuO" or mat.dtype.kind == "b":
            raise EncodingError(f"dot needs integer entries, got dtype {mat.dtype}; "
                                "encode reals with encoding.encode first")
        if mat.ndim == 1:
            mat = mat.reshape(-1, 1)
        if mat.ndim != 2 or mat.shape[0] != len(self):
            raise ValueError(f"matrix shape {mat.shape} does not match vector {len(self)}")
        if mat.dtype.kind == "i" and mat.size and int(mat.min()) == np.iinfo(mat.dtype).min:
            mat = mat.astype(object)  # -min does not fit the dtype
        if mat.dtype.kind == "O":
            for i, row in enumerate(mat.tolist()):
                as_int_list(row, name=f"matrix[{i}]")
        n2 = self.public_key._n2
        bases = self._cts
        out: list[Mpz] = []
        for j in range(mat.shape[1]):
            col = mat[:, j]
            pos = np.flatnonzero(col > 0)
            neg = np.flatnonzero(col < 0)
            p = multiexp([bases[i] for i in pos.tolist()], _abs_ints(col[pos]), n2)
            q = multiexp([bases[i] for i in neg.tolist()], _abs_ints(-col[neg]), n2)
            out.append(p if q == 1 else p * gmpy2.invert(q, n2) % n2)
        return self._trusted(self.public_key, out, self.frac_bits + frac_bits)

    def __matmul__(self, matrix: np.ndarray) -> EncryptedVector:
        return self.dot(matrix)

    # -- randomness ---------------------------------------------------------------------
    def rerandomize(self, pool: RandomizerPool | None = None) -> EncryptedVector:
        """Multiply every ciphertext by a fresh encryption of zero (new randomness)."""
        pk = self.public_key
        if pool is not None:
            pool.require_key(pk)
            rands = pool.take(len(self))
        else:
            rands = pk.randomizers(len(self))
        n2 = pk._n2
        cts = [c * r % n2 for c, r in zip(self._cts, rands, strict=True)]
        return self._trusted(pk, cts, self.frac_bits, fresh=True)

    def for_transport(self, pool: RandomizerPool | None = None) -> EncryptedVector:
        """This vector ready to leave its owner: re-randomised unless already fresh."""
        return self if self.fresh else self.rerandomize(pool)

    # -- phe interop --------------------------------------------------------------------
    def to_phe(self) -> list[_phe.EncryptedNumber]:
        """phe ``EncryptedNumber`` objects (phe's base-16 exponent needs frac_bits % 4 == 0)."""
        from phe import paillier

        if self.frac_bits % 4:
            raise EncodingError(
                f"phe exponents are base 16: frac_bits {self.frac_bits} is not a multiple of 4"
            )
        pub = self.public_key.to_phe()
        e = -self.frac_bits // 4
        return [paillier.EncryptedNumber(pub, int(c), e) for c in self.for_transport()._cts]

    @classmethod
    def from_phe(
        cls, public_key: PublicKey, numbers: Sequence[_phe.EncryptedNumber]
    ) -> EncryptedVector:
        """Wrap phe ciphertexts (same key; one common exponent <= 0)."""
        exps = {int(x.exponent) for x in numbers}
        if len(exps) > 1:
            raise EncodingError(f"phe numbers have different exponents {sorted(exps)}")
        e = exps.pop() if exps else 0
        if e > 0:
            raise EncodingError("phe numbers with positive exponents are not supported")
        for i, x in enumerate(numbers):
            if int(x.public_key.n) != public_key.n:
                raise PaillierFormatError("phe number under another key", field=f"numbers[{i}]")
        return cls(public_key, [int(x.ciphertext(be_secure=False)) for x in numbers],
                   frac_bits=-4 * e)


def _abs_ints(col: np.ndarray) -> np.ndarray | list[int]:
    if col.dtype.kind in "iu":
        return col
    return [int(v) for v in col.tolist()]
