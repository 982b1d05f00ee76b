"""Packing several fixed-point values into one Paillier plaintext, with overflow checks.

Layout. A plaintext is cut into ``slots`` slots of ``slot_bits = value_bits + headroom_bits``
bits, slot 0 in the least significant bits; ``slots * slot_bits <= |n| - 1`` so a packed
plaintext is always below n. A signed integer ``v`` with ``-2^(value_bits-1) <= v <
2^(value_bits-1)`` is stored offset-binary as ``u = v + 2^(value_bits-1)`` (never negative,
so additions cannot borrow from a neighbour). With the defaults (64 value bits, 16 headroom
bits) a 2048-bit key holds 25 values per ciphertext: encryption, transport and decryption
cost drop 25-fold.

Weight. Every packed ciphertext carries a public *weight* ``W``: each slot holds
``sum_i k_i * u_i`` with ``sum_i k_i = W`` (W = 1 after packing; adding two packed vectors
adds weights; multiplying by a plaintext integer ``k >= 0`` multiplies it). A slot then holds
at most ``W * (2^value_bits - 1)``, and the true sum is ``slot - W * 2^(value_bits-1)``.
Operations whose result could exceed a slot raise :class:`PackingOverflowError` *before*
computing; unpacking re-checks every slot (and that padding slots and the bits above the
last slot are zero) and raises instead of returning wrapped values.

Valid operations: add packed vectors of the same layout, count and scale; add plaintexts;
multiply by a non-negative integer (or non-negative fixed-point scalar). Negative factors,
per-slot factors and dot products are not valid on packed values (they would mix slots or
borrow): unpack first or use :class:`~protocols.paillier.vector.EncryptedVector`.

This module does no I/O and never decrypts on its own (decryption takes a PrivateKey).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gmpy2
import numpy as np

from protocols.paillier.encoding import DEFAULT_FRAC_BITS, as_int_list, encode
from protocols.paillier.errors import (
    EncodingError,
    PackingOverflowError,
    PaillierFormatError,
)
from protocols.paillier.keys import PrivateKey, PublicKey

if TYPE_CHECKING:
    from protocols.paillier.randomness import RandomizerPool

Mpz = Any
DEFAULT_VALUE_BITS = 64
DEFAULT_HEADROOM_BITS = 16


@dataclass(frozen=True)
class PackingLayout:
    """Slot geometry. ``value_bits`` bounds one packed signed value; ``headroom_bits`` bounds
    the total weight of additions and scalar multiplications (about ``2^headroom_bits``)."""

    value_bits: int
    headroom_bits: int
    slots: int

    def __post_init__(self) -> None:
        if self.value_bits < 2 or self.headroom_bits < 0 or self.slots < 1:
            raise PaillierFormatError(
                "packing layout needs value_bits >= 2, headroom_bits >= 0, slots >= 1",
                field="packing",
            )

    @property
    def slot_bits(self) -> int:
        return self.value_bits + self.headroom_bits

    @property
    def offset(self) -> int:
        return 1 << (self.value_bits - 1)

    @property
    def max_weight(self) -> int:
        """Largest weight for which no slot can overflow."""
        return ((1 << self.slot_bits) - 1) // ((1 << self.value_bits) - 1)

    @property
    def used_bits(self) -> int:
        return self.slots * self.slot_bits

    def check_key(self, public_key: PublicKey) -> None:
        if self.used_bits > public_key.n_bits - 1:
            raise PaillierFormatError(
                f"{self.slots} slots of {self.slot_bits} bits do not fit a "
                f"{public_key.n_bits}-bit key",
                field="packing",
            )

    @classmethod
    def for_key(
        cls,
        public_key: PublicKey,
        *,
        value_bits: int = DEFAULT_VALUE_BITS,
        headroom_bits: int = DEFAULT_HEADROOM_BITS,
    ) -> PackingLayout:
        """As many slots as fit the key."""
        slots = (public_key.n_bits - 1) // (value_bits + headroom_bits)
        layout = cls(value_bits, headroom_bits, slots)
        layout.check_key(public_key)
        return layout


def _pack_plaintexts(ints: list[int], layout: PackingLayout) -> list[int]:
    lo, hi = -layout.offset, layout.offset
    sb = layout.slot_bits
    out: list[int] = []
    for start in range(0, len(ints), layout.slots):
        acc = 0
        chunk = ints[start : start + layout.slots]
        for k in range(len(chunk) - 1, -1, -1):
            v = chunk[k]
            if not lo <= v < hi:
                raise PackingOverflowError(
                    f"values[{start + k}]: does not fit a {layout.value_bits}-bit signed slot "
                    f"(at the chosen scale); widen value_bits or lower frac_bits"
                )
            acc = (acc << sb) | (v + hi)
        out.append(acc)
    return out


class PackedVector:
    """``count`` fixed-point values packed ``layout.slots`` to a ciphertext."""

    __slots__ = ("_cts", "count", "frac_bits", "fresh", "layout", "public_key", "weight")

    def __init__(
        self,
        public_key: PublicKey,
        ciphertexts: Iterable[int],
        *,
        layout: PackingLayout,
        count: int,
        weight: int,
        frac_bits: int,
        validate: bool = True,
    ) -> None:
        """Wrap packed ciphertexts received from elsewhere (validated unless told otherwise)."""
        layout.check_key(public_key)
        cts = list(ciphertexts)
        cts = (public_key.validate_ciphertexts(cts) if validate
               else [gmpy2.mpz(c) for c in cts])
        expected = -(-count // layout.slots) if count > 0 else 0
        if count < 0 or len(cts) != expected:
            raise PaillierFormatError(
                f"{count} values need {expected} ciphertexts, got {len(cts)}", field="count"
            )
        if not 0 <= weight <= layout.max_weight:
            raise PaillierFormatError(
                f"weight {weight} exceeds the layout's maximum {layout.max_weight}",
                field="weight",
            )
        if frac_bits < 0:
            raise PaillierFormatError("frac_bits must be >= 0", field="frac_bits")
        self.public_key = public_key
        self.layout = layout
        self._cts: list[Mpz] = cts
        self.count = count
        self.weight = weight
        self.frac_bits = frac_bits
        self.fresh = False

    def _derive(self, cts: list[Mpz], weight: int, frac_bits: int | None = None,
                fresh: bool = False) -> PackedVector:
        obj = PackedVector.__new__(PackedVector)
        obj.public_key = self.public_key
        obj.layout = self.layout
        obj._cts = cts
        obj.count = self.count
        obj.weight = weight
        obj.frac_bits = self.frac_bits if frac_bits is None else frac_bits
        obj.fresh = fresh
        return obj

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (
            f"PackedVector(count={self.count}, ciphertexts={len(self._cts)}, "
            f"weight={self.weight}, frac_bits={self.frac_bits}, layout={self.layout})"
        )

    def __reduce__(self) -> Any:
        raise TypeError("use protocols.paillier.serialization, never pickle")

    @property
    def ciphertexts(self) -> list[int]:
        return [int(c) for c in self._cts]

    def _check_weight(self, weight: int, what: str) -> None:
        if weight > self.layout.max_weight:
            raise PackingOverflowError(
                f"{what} would give weight {weight} > {self.layout.max_weight}: a slot could "
                f"overflow its {self.layout.headroom_bits} headroom bits"
            )

    def _compatible(self, other: PackedVector) -> None:
        self.public_key.require_same(other.public_key)
        if other.layout != self.layout or other.count != self.count:
            raise ValueError("packed vectors differ in layout or length")
        if other.frac_bits != self.frac_bits:
            raise EncodingError(
                f"packed vectors at different scales ({self.frac_bits} vs {other.frac_bits})"
            )

    # -- operations ---------------------------------------------------------------------
    def __add__(self, other: PackedVector) -> PackedVector:
        if not isinstance(other, PackedVector):
            return NotImplemented
        self._compatible(other)
        w = self.weight + other.weight
        self._check_weight(w, "adding packed vectors")
        n2 = self.public_key._n2
        return self._derive([a * b % n2 for a, b in zip(self._cts, other._cts, strict=True)], w)

    def add_encoded(self, encoded: Iterable[int] | np.ndarray) -> PackedVector:
        """Add plaintext integers at this vector's scale (weight + 1)."""
        ints = as_int_list(encoded, name="encoded")
        if len(ints) != self.count:
            raise ValueError(f"encoded: length {len(ints)} does not match {self.count}")
        w = self.weight + 1
        self._check_weight(w, "adding plaintexts")
        n, n2 = self.public_key._n, self.public_key._n2
        plains = _pack_plaintexts(ints, self.layout)
        return self._derive([c * (m * n + 1) % n2 for c, m in zip(self._cts, plains,
                                                                   strict=True)], w)

    def add_plain(self, values: Iterable[float] | np.ndarray) -> PackedVector:
        return self.add_encoded(encode(values, self.frac_bits))

    def mul_scalar(self, k: int, *, frac_bits: int = 0) -> PackedVector:
        """Multiply every value by the integer ``k >= 0`` (at scale ``2^-frac_bits``)."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise EncodingError("packed scalar must be an integer; encode reals first")
        k = int(k)
        if k < 0:
            raise PackingOverflowError(
                "negative factors would borrow across packed slots; unpack first"
            )
        w = self.weight * k
        self._check_weight(w, f"multiplying by {k}")
        n2 = self.public_key._n2
        return self._derive([gmpy2.powmod(c, k, n2) for c in self._cts], w,
                            self.frac_bits + frac_bits)

    def mul_plain(self, value: float, *, frac_bits: int = DEFAULT_FRAC_BITS) -> PackedVector:
        """Multiply by a non-negative real encoded at ``frac_bits`` (scales add)."""
        return self.mul_scalar(encode([value], frac_bits)[0], frac_bits=frac_bits)

    def rerandomize(self, pool: RandomizerPool | None = None) -> PackedVector:
        pk = self.public_key
        if pool is not None:
            pool.require_key(pk)
            rands = pool.take(len(self._cts))
        else:
            rands = pk.randomizers(len(self._cts))
        n2 = pk._n2
        return self._derive([c * r % n2 for c, r in zip(self._cts, rands, strict=True)],
                            self.weight, fresh=True)

    def for_transport(self, pool: RandomizerPool | None = None) -> PackedVector:
        return self if self.fresh else self.rerandomize(pool)

    # -- decryption ---------------------------------------------------------------------
    def decrypt_encoded(self, private_key: PrivateKey) -> list[int]:
        """Decrypt, unpack and remove offsets: signed integers at scale ``2^-frac_bits``.

        Raises :class:`PackingOverflowError` if any slot is out of its bound, a padding slot
        is non-zero or bits above the last slot are set (overflow or tampering).
        """
        private_key.public_key.require_same(self.public_key)
        lay = self.layout
        sb, mask = lay.slot_bits, (1 << lay.slot_bits) - 1
        bound = self.weight * ((1 << lay.value_bits) - 1)
        shift = self.weight * lay.offset
        out: list[int] = []
        for ci, c in enumerate(self._cts):
            m = private_key.raw_decrypt(c)
            if m >> lay.used_bits:
                raise PackingOverflowError(
                    f"ciphertexts[{ci}]: plaintext exceeds the packed width (overflow or "
                    "tampering)"
                )
            live = min(lay.slots, self.count - ci * lay.slots)
            for s in range(lay.slots):
                u = m & mask
                m >>= sb
                if s < live:
                    if u > bound:
                        raise PackingOverflowError(
                            f"ciphertexts[{ci}] slot {s}: value exceeds its bound (overflow "
                            "or tampering)"
                        )
                    out.append(u - shift)
                elif u:
                    raise PackingOverflowError(
                        f"ciphertexts[{ci}] slot {s}: padding slot is not zero (tampering)"
                    )
        return out

    def decrypt(self, private_key: PrivateKey) -> np.ndarray:
        from protocols.paillier.encoding import decode

        return decode(self.decrypt_encoded(private_key), self.frac_bits)


def pack_encrypt_encoded(
    public_key: PublicKey,
    encoded: Iterable[int] | np.ndarray,
    *,
    layout: PackingLayout | None = None,
    frac_bits: int = 0,
    pool: RandomizerPool | None = None,
) -> PackedVector:
    """Pack signed integers (scale ``2^-frac_bits``) and encrypt each packed plaintext."""
    lay = layout or PackingLayout.for_key(public_key)
    lay.check_key(public_key)
    ints = as_int_list(encoded, name="values")
    plains = _pack_plaintexts(ints, lay)
    if pool is not None:
        pool.require_key(public_key)
        rands = pool.take(len(plains))
    else:
        rands = public_key.randomizers(len(plains))
    n, n2 = public_key._n, public_key._n2
    cts = [(m * n + 1) * r % n2 for m, r in zip(plains, rands, strict=True)]
    pv = PackedVector.__new__(PackedVector)
    pv.public_key, pv.layout, pv._cts = public_key, lay, cts
    pv.count, pv.weight, pv.frac_bits, pv.fresh = len(ints), 1, frac_bits, True
    return pv


def pack_encrypt(
    public_key: PublicKey,
    values: Iterable[float] | np.ndarray,
    *,
    layout: PackingLayout | None = None,
    frac_bits: int = DEFAULT_FRAC_BITS,
    pool: RandomizerPool | None = None,
) -> PackedVector:
    """Fixed-point encode reals at ``frac_bits`` and pack-encrypt them."""
    return pack_encrypt_encoded(
        public_key, encode(values, frac_bits), layout=layout, frac_bits=frac_bits, pool=pool
    )
