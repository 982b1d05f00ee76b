"""Fixed-point encoding of real vectors as signed integers, vectorised with numpy.

A real ``x`` is encoded as the integer ``round(x * 2^f)`` (round half to even) where ``f``
is the number of fractional bits (``DEFAULT_FRAC_BITS = 32``, so the step is 2^-32, about
2.3e-10). The scale travels with the ciphertexts as ``frac_bits`` and is *the same for every
element of a vector*, unlike phe's ``EncodedNumber`` whose per-value exponent reveals each
value's magnitude. Products add scales: a vector at ``f1`` times plaintext integers at ``f2``
decodes at ``f1 + f2``.

Negative integers become residues ``m mod n`` only at encryption time (see
``PublicKey.check_plaintext``); decryption maps residues back with the n/3 bands.

numpy integers are converted to Python ints here (``ndarray.tolist``): phe and gmpy2 must
never see ``numpy.int64``, which silently overflows in phe's encoding.

This module does no cryptography and no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from protocols.paillier.errors import EncodingError

DEFAULT_FRAC_BITS = 32
_FAST_LIMIT = 2.0**62


def _as_array(values: Iterable[float] | np.ndarray, name: str) -> np.ndarray:
    arr = values if isinstance(values, np.ndarray) else np.asarray(list(values))
    if arr.ndim != 1:
        raise EncodingError(f"{name}: expected a 1-D vector, got shape {arr.shape}")
    return arr


def as_int_list(values: Iterable[int] | np.ndarray, *, name: str = "values") -> list[int]:
    """Python ints from a list or a numpy integer array; floats and bools are refused."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise EncodingError(f"{name}: expected a 1-D vector, got shape {values.shape}")
        if values.dtype.kind in "iu":
            return [int(v) for v in values.tolist()]
        if values.dtype.kind != "O":
            raise EncodingError(
                f"{name}: expected integers, got dtype {values.dtype}; encode reals first"
            )
        values = values.tolist()
    out: list[int] = []
    for i, v in enumerate(values):
        if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer):
            raise EncodingError(f"{name}[{i}]: expected an integer, got {type(v).__name__}")
        out.append(int(v))
    return out


def encode(values: Iterable[float] | np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS) -> list[int]:
    """``round(x * 2^frac_bits)`` for each x, as Python ints. NaN/inf raise, naming the index."""
    if frac_bits < 0:
        raise EncodingError(f"frac_bits must be >= 0, got {frac_bits}")
    arr = _as_array(values, "values")
    if arr.size == 0:
        return []
    if arr.dtype.kind in "iu":
        return [int(v) << frac_bits for v in arr.tolist()]
    if arr.dtype.kind == "O":
        return encode(np.asarray(arr, dtype=np.float64), frac_bits)
    if arr.dtype.kind not in "f":
        raise EncodingError(f"values: cannot encode dtype {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.rint(np.ldexp(arr.astype(np.float64, copy=False), frac_bits))
    bad = ~np.isfinite(scaled)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = "NaN" if np.isnan(arr[i]) else "an infinite or too large value"
        raise EncodingError(f"values[{i}]: {what} cannot be encoded with {frac_bits} frac bits")
    if float(np.max(np.abs(scaled))) < _FAST_LIMIT:
        return [int(v) for v in scaled.astype(np.int64).tolist()]
    return [int(v) for v in scaled.tolist()]


def decode(encoded: Sequence[int], frac_bits: int) -> np.ndarray:
    """Float64 vector ``m / 2^frac_bits`` (correctly rounded even for very large m)."""
    if not encoded:
        return np.zeros(0, dtype=np.float64)
    if max(abs(int(m)) for m in encoded) < 2**53:
        return np.ldexp(np.asarray(encoded, dtype=np.float64), -frac_bits)
    denom = 1 << frac_bits
    return np.fromiter((int(m) / denom for m in encoded), dtype=np.float64, count=len(encoded))


def quantisation_error(frac_bits: int) -> float:
    """Largest rounding error of :func:`encode` for one value: half a step."""
    return 2.0 ** -(frac_bits + 1)
