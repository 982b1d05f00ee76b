"""Fixed-point conventions of the vertical logistic regression and lead-grading protocols.

Every party turns its own real-valued feature matrix into integers the same way, so that
encrypted Gram blocks, gradients and scores decode at known scales:

* features are standardised with the party's own training-row mean and standard deviation
  (:class:`Standardizer`, fitted locally; the statistics never leave the party), clipped to
  ``[-CLIP, CLIP]`` and encoded at ``FEATURE_FRAC_BITS`` fractional bits, so every encoded
  feature lies in ``[-2^15, 2^15]``;
* weights are encoded at ``WEIGHT_FRAC_BITS`` each epoch; a Gram entry (scale
  ``2 * FEATURE_FRAC_BITS``) times a weight decodes at ``2 * FEATURE_FRAC_BITS +
  WEIGHT_FRAC_BITS``;
* scores (partial log-odds) are encoded at ``SCORE_FRAC_BITS``.

Also here: slot packing of small non-negative integers into one Paillier plaintext
(:func:`pack_slots` / :func:`unpack_slots`, with range checks) and the pseudo-random masks
that cancel between the two hosts (:func:`cancelling_mask`).

This module is arithmetic only: no I/O, no keys, no logging.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protocols.errors import LocalProtocolError, RemoteProtocolError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

FEATURE_FRAC_BITS = 12
CLIP = 8.0
FEATURE_OFFSET = 1 << 15  # |encoded feature| <= 2^15, so feature + offset lies in [0, 2^16]
WEIGHT_FRAC_BITS = 24
SCORE_FRAC_BITS = 24
GRAM_FRAC_BITS = 2 * FEATURE_FRAC_BITS
STAT_BITS = 40  # statistical hiding parameter of additive masks (distance <= 2^-40)
MASK_MODULUS_BITS = 64


@dataclass(frozen=True)
class Standardizer:
    """Per-column mean and scale fitted on a party's own training rows (stays local)."""

    mean: FloatArray
    scale: FloatArray

    @classmethod
    def fit(cls, x: FloatArray) -> Standardizer:
        arr = check_matrix(x, "features")
        mean = arr.mean(axis=0) if arr.shape[0] else np.zeros(arr.shape[1])
        std = arr.std(axis=0) if arr.shape[0] else np.ones(arr.shape[1])
        std = np.where(std > 1e-12, std, 1.0)
        return cls(np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64))

    def transform(self, x: FloatArray) -> FloatArray:
        arr = check_matrix(x, "features")
        if arr.shape[1] != self.mean.size:
            raise LocalProtocolError(
                f"features: {arr.shape[1]} columns, the model has {self.mean.size}",
                status_hint=400,
            )
        return np.asarray(np.clip((arr - self.mean) / self.scale, -CLIP, CLIP))


def check_matrix(x: object, what: str) -> FloatArray:
    """A finite 2-D float64 matrix, or a :class:`LocalProtocolError` naming the bad cell."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise LocalProtocolError(f"{what}: expected a 2-D matrix, got shape {arr.shape}",
                                 status_hint=400)
    bad = ~np.isfinite(arr)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise LocalProtocolError(f"{what}: row {r} column {c} is not a finite number",
                                 status_hint=400)
    return arr


def quantise(x: FloatArray) -> IntArray:
    """Standardised features -> integers at ``FEATURE_FRAC_BITS`` (clipped to +-CLIP)."""
    clipped = np.clip(np.asarray(x, dtype=np.float64), -CLIP, CLIP)
    return np.rint(np.ldexp(clipped, FEATURE_FRAC_BITS)).astype(np.int64)


def dequantise(x: IntArray) -> FloatArray:
    return np.ldexp(np.asarray(x, dtype=np.float64), -FEATURE_FRAC_BITS)


def encode_weights(w: FloatArray) -> list[int]:
    return [int(v) for v in np.rint(np.ldexp(np.asarray(w, dtype=np.float64),
                                             WEIGHT_FRAC_BITS)).astype(np.int64).tolist()]


def decode_weights(w: list[int]) -> FloatArray:
    return np.ldexp(np.asarray(w, dtype=np.float64), -WEIGHT_FRAC_BITS)


def encode_scores(u: FloatArray) -> IntArray:
    arr = np.asarray(u, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise LocalProtocolError("scores: not finite", status_hint=500)
    if arr.size and float(np.max(np.abs(arr))) >= 2.0 ** (62 - SCORE_FRAC_BITS):
        raise LocalProtocolError("scores: out of the fixed-point range", status_hint=500)
    return np.rint(np.ldexp(arr, SCORE_FRAC_BITS)).astype(np.int64)


def decode_scores(u: IntArray) -> FloatArray:
    return np.ldexp(np.asarray(u, dtype=np.float64), -SCORE_FRAC_BITS)


# -- slot packing --------------------------------------------------------------------------
def pack_slots(values: list[int], slot_bits: int) -> int:
    """``sum(values[k] << (k * slot_bits))`` for non-negative values below ``2^slot_bits``."""
    acc = 0
    for k in range(len(values) - 1, -1, -1):
        v = values[k]
        if not 0 <= v < 1 << slot_bits:
            raise LocalProtocolError(f"slot value {k} out of range", status_hint=500)
        acc = (acc << slot_bits) | v
    return acc


def unpack_slots(packed: int, count: int, slot_bits: int, field: str) -> list[int]:
    """Inverse of :func:`pack_slots`; bits above the last slot mean tampering (remote error)."""
    if packed < 0 or packed >> (count * slot_bits):
        raise RemoteProtocolError(f"{field}: packed plaintext out of range (tampered?)",
                                  status_hint=400)
    mask = (1 << slot_bits) - 1
    out = []
    for _ in range(count):
        out.append(packed & mask)
        packed >>= slot_bits
    return out


# -- masks that cancel between the two hosts ----------------------------------------------
def cancelling_mask(seed: bytes, label: bytes, count: int) -> npt.NDArray[np.uint64]:
    """``count`` uniform 64-bit words from SHAKE-256(seed, label); one host adds them, the
    other subtracts them, so the sum the guest sees is unmasked and each term is uniform."""
    stream = hashlib.shake_256(b"cleanroom/vlr/mask/v1" + len(seed).to_bytes(2, "big") + seed
                               + len(label).to_bytes(2, "big") + label).digest(8 * count)
    return np.frombuffer(stream, dtype=">u8").astype(np.uint64)


def to_u64(values: IntArray) -> npt.NDArray[np.uint64]:
    return np.asarray(values, dtype=np.int64).view(np.uint64)


def from_u64(values: npt.NDArray[np.uint64]) -> IntArray:
    return np.asarray(values, dtype=np.uint64).view(np.int64)
