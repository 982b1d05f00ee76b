"""Lead grading with a trained vertical LR model: standard and strict mode.

Grades A/B/C/D come from the calibrated probability ``p = sigmoid(a * s + b)`` of the summed
score ``s = u_oem + u_media + u_dealer`` (each ``u_p`` is a party's partial score, Platt
parameters ``(a, b)`` from training) and the thresholds of a :class:`GradeSpec`.

Standard mode: each host computes the partial scores of its users
(:meth:`~protocols.vertical_lr.training.ModelSlice.partial_scores`) and publishes them as
label bytes (:func:`encode_partial_label`) in the anonymous-query labeled-PSI table the node
builds; the OEM looks its leads up, decodes the labels and calls :func:`combine_standard`.
The OEM learns the hosts' partial scores of its own leads; the hosts learn nothing about
which leads were scored (that is the labeled PSI's property, not this module's).

Strict mode: the hosts publish their partial scores encrypted under the key holder's
Paillier key (:func:`encrypt_partial_labels`; the media platform is the key holder). The
OEM (:class:`StrictGrader`) adds its own score under encryption, and for every lead and
threshold t builds the blinded comparison ``f * (r * (s - t) + r')`` with r = 2^e * m
random, ``1 <= r' < r`` (so the sign is that of ``s - t``, ties counting as ``>=``) and a
random sign flip f; it permutes all values of a batch, packs them into few ciphertexts and
sends them to the key holder (:class:`StrictKeyHolder`), which decrypts and returns only
the signs. The OEM removes flips and permutation and learns the grade, nothing else. What
the key holder learns is stated in docs/protocols/lead-scoring.md (signs are uniformly
random; magnitudes are blinded but not statistically hidden).

This module does no I/O and never logs; partial scores never appear in strict-mode
messages in plaintext.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from itertools import pairwise

import gmpy2
import numpy as np

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.paillier import (
    EncryptedVector,
    PaillierError,
    PrivateKey,
    PublicKey,
    load_vector,
    to_bytes,
)
from protocols.vertical_lr.fixedpoint import SCORE_FRAC_BITS, decode_scores, encode_scores
from protocols.vertical_lr.messages import (
    SESSION_ID_BYTES,
    Message,
    MsgType,
    Party,
    decode,
    u32,
)
from protocols.vertical_lr.model import FloatArray, sigmoid

GRADES = ("A", "B", "C", "D")
LABEL_VERSION = 1
GRADE_FRAC_BITS = 16  # strict-mode score scale; |s| < 2^15 so |s - t| < 2^32
SCORE_BOUND_BITS = 32
MAX_BATCH_VALUES = 1 << 20


@dataclass(frozen=True)
class GradeSpec:
    """Probability thresholds, highest first: grade A if p >= thresholds[0], B if
    p >= thresholds[1], C if p >= thresholds[2], else D."""

    thresholds: tuple[float, float, float] = (0.30, 0.15, 0.05)

    def __post_init__(self) -> None:
        t = self.thresholds
        if len(t) != len(GRADES) - 1:
            raise LocalProtocolError("grade spec: exactly three thresholds (A, B, C)",
                                     status_hint=400)
        if not all(0.0 < v < 1.0 for v in t) or not all(a > b for a, b in pairwise(t)):
            raise LocalProtocolError(
                "grade spec: thresholds must lie in (0, 1) and strictly decrease (A > B > C)",
                status_hint=400)

    def grade(self, p: FloatArray) -> list[str]:
        passed = sum((np.asarray(p) >= t).astype(int) for t in self.thresholds)
        return [GRADES[len(GRADES) - 1 - int(k)] for k in np.asarray(passed).ravel()]

    def score_thresholds(self, platt: tuple[float, float]) -> list[float]:
        """Thresholds on the raw summed score: ``(logit(p) - b) / a`` (needs a > 0)."""
        a, b = platt
        if not a > 0:
            raise LocalProtocolError("Platt slope must be positive to grade", status_hint=400)
        return [(math.log(t / (1 - t)) - b) / a for t in self.thresholds]


# -- standard mode --------------------------------------------------------------------------
def encode_partial_label(score: float) -> bytes:
    """9 bytes: version, then the score as a signed 64-bit fixed-point integer (2^-24)."""
    v = int(encode_scores(np.asarray([score]))[0])
    return bytes([LABEL_VERSION]) + v.to_bytes(8, "big", signed=True)


def decode_partial_label(label: bytes) -> float:
    if len(label) != 9 or label[0] != LABEL_VERSION:
        raise RemoteProtocolError("partial-score label: bad length or version")
    return float(decode_scores(np.asarray([int.from_bytes(label[1:], "big", signed=True)]))[0])


def combine_standard(own: FloatArray, partials: list[FloatArray], platt: tuple[float, float],
                     spec: GradeSpec) -> tuple[FloatArray, list[str]]:
    """OEM: calibrated probabilities and grades from its own and the hosts' partial scores."""
    s = np.asarray(own, dtype=np.float64).copy()
    for p in partials:
        arr = np.asarray(p, dtype=np.float64)
        if arr.shape != s.shape or not np.isfinite(arr).all():
            raise LocalProtocolError("partial scores: shape mismatch or not finite",
                                     status_hint=400)
        s += arr
    prob = sigmoid(platt[0] * s + platt[1])
    return prob, spec.grade(prob)


# -- strict mode: labels --------------------------------------------------------------------
def _width(pub: PublicKey) -> int:
    return (pub.nsquare.bit_length() + 7) // 8


def encrypt_partial_labels(scores: FloatArray, key_holder: PublicKey) -> list[bytes]:
    """Host: each partial score encrypted (fresh DJN randomness) under the key holder's key,
    as a fixed-width big-endian ciphertext (the label bytes of the anonymous-query table)."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.size and float(np.max(np.abs(arr))) >= 2.0 ** (SCORE_BOUND_BITS - GRADE_FRAC_BITS - 2):
        raise LocalProtocolError("partial scores exceed the strict-mode range", status_hint=400)
    enc = key_holder.encrypt(arr, frac_bits=GRADE_FRAC_BITS)
    w = _width(key_holder)
    return [c.to_bytes(w, "big") for c in enc.ciphertexts]


def load_partial_label(label: bytes, key_holder: PublicKey) -> int:
    """OEM: a label back to a validated ciphertext (RemoteProtocolError if malformed)."""
    if len(label) != _width(key_holder):
        raise RemoteProtocolError("encrypted partial-score label: wrong length")
    try:
        return int(key_holder.validate_ciphertext(int.from_bytes(label, "big")))
    except PaillierError as exc:
        raise RemoteProtocolError(f"encrypted partial-score label: {exc}") from exc


# -- strict mode: blinded comparison -------------------------------------------------------
@dataclass(frozen=True)
class Blinding:
    """r = 2^e * m with e uniform in [0, spread_bits] and m uniform in [2^(mantissa-1),
    2^mantissa); r' uniform in [1, r)."""

    mantissa_bits: int = 32
    spread_bits: int = 16

    @property
    def slot_bits(self) -> int:
        return SCORE_BOUND_BITS + self.mantissa_bits + self.spread_bits + 2


@dataclass
class _Pending:
    leads: int
    perm: list[int]
    flips: list[int]


@dataclass
class StrictGrader:
    """OEM role of strict grading. ``blind_batch`` -> BLIND bytes for the key holder;
    ``handle(SIGNS bytes)`` -> grades of that batch, in the order given."""

    session_id: bytes
    key_holder: PublicKey
    spec: GradeSpec
    platt: tuple[float, float]
    blinding: Blinding = field(default_factory=Blinding)
    pending: dict[int, _Pending] = field(default_factory=dict)
    used: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if len(self.session_id) != SESSION_ID_BYTES:
            raise LocalProtocolError("session_id must be 16 bytes")
        self.key_holder.precompute()
        self._t = [math.ceil(t * 2**GRADE_FRAC_BITS)
                   for t in self.spec.score_thresholds(self.platt)]
        self.slots = (self.key_holder.n_bits - 3) // self.blinding.slot_bits

    def blind_batch(self, batch_id: int, own_scores: FloatArray,
                    host_labels: list[list[bytes]]) -> bytes:
        """Blinded comparisons of every lead's summed score with every threshold."""
        if batch_id in self.used:
            raise LocalProtocolError(f"batch id {batch_id} already used", status_hint=500)
        own = np.asarray(own_scores, dtype=np.float64)
        n = own.size
        if any(len(h) != n for h in host_labels):
            raise LocalProtocolError("one label per lead and host is needed", status_hint=400)
        if n * len(self._t) > MAX_BATCH_VALUES:
            raise LocalProtocolError("batch too large", status_hint=400)
        pk = self.key_holder
        n_, n2 = pk._n, pk._n2
        own_int = np.rint(np.ldexp(own, GRADE_FRAC_BITS)).astype(np.int64).tolist()
        sums = []
        for i in range(n):
            c = (pk.check_plaintext(own_int[i]) * n_ + 1) % n2
            for h in host_labels:
                c = c * load_partial_label(h[i], pk) % n2
            sums.append(c)
        k = len(self._t)
        total = n * k
        perm = list(range(total))
        _shuffle(perm)
        flips = [secrets.randbits(1) for _ in range(total)]
        bl = self.blinding
        v_bits = bl.slot_bits
        offset = 1 << (v_bits - 1)
        inverses: dict[int, int] = {}
        cts: list[int] = []
        shift = 1 << v_bits
        for start in range(0, total, self.slots):
            acc = None
            for pos in range(min(total, start + self.slots) - 1, start - 1, -1):
                idx = perm[pos]
                lead, thr = divmod(idx, k)
                e = secrets.randbelow(bl.spread_bits + 1)
                r = (secrets.randbits(bl.mantissa_bits - 1) | 1 << (bl.mantissa_bits - 1)) << e
                r2 = 1 + secrets.randbelow(r - 1)
                f = -1 if flips[pos] else 1
                if f < 0:
                    base = inverses.get(lead)
                    if base is None:
                        base = inverses[lead] = gmpy2.invert(sums[lead], n2)
                else:
                    base = sums[lead]
                plain = f * (r2 - r * self._t[thr]) + offset
                c = gmpy2.powmod(base, r, n2) * ((plain % n_) * n_ + 1) % n2
                acc = c if acc is None else gmpy2.powmod(acc, shift, n2) * c % n2
            assert acc is not None
            cts.append(int(acc))
        self.used.add(batch_id)
        self.pending[batch_id] = _Pending(n, perm, flips)
        vec = EncryptedVector(pk, cts, 0, validate=False)
        msg = Message(MsgType.BLIND, Party.GUEST, Party.MEDIA, self.session_id, batch_id, ())
        parts = (total.to_bytes(4, "big"), v_bits.to_bytes(2, "big"),
                 to_bytes(vec, context=msg.context(2)))
        return Message(MsgType.BLIND, Party.GUEST, Party.MEDIA, self.session_id, batch_id,
                       parts).to_bytes()

    def handle(self, data: bytes) -> list[str]:
        """Grades of the batch answered by this SIGNS message."""
        msg = decode(data)
        if (msg.type != MsgType.SIGNS or msg.sender != Party.MEDIA
                or msg.recipient != Party.GUEST or msg.session_id != self.session_id):
            raise RemoteProtocolError("expected SIGNS from the key holder", status_hint=409)
        pend = self.pending.pop(msg.seq, None)
        if pend is None:
            raise RemoteProtocolError("SIGNS for no outstanding batch (replay?)",
                                      status_hint=409)
        k = len(self._t)
        total = pend.leads * k
        if len(msg.parts) != 1 or len(msg.parts[0]) != (total + 7) // 8:
            raise RemoteProtocolError("SIGNS: wrong bitmap length")
        bits = np.unpackbits(np.frombuffer(msg.parts[0], dtype=np.uint8))[:total]
        passed = np.zeros(total, dtype=np.int64)
        for pos in range(total):
            positive = int(bits[pos]) ^ pend.flips[pos]
            passed[pend.perm[pos]] = positive
        per_lead = passed.reshape(pend.leads, k)
        # thresholds decrease in probability: passing A implies passing B and C
        if (np.diff(per_lead, axis=1) < 0).any():
            raise RemoteProtocolError("SIGNS: inconsistent comparisons (tampered?)")
        return [GRADES[k - int(c)] for c in per_lead.sum(axis=1)]


def _shuffle(items: list[int]) -> None:
    for i in range(len(items) - 1, 0, -1):
        j = secrets.randbelow(i + 1)
        items[i], items[j] = items[j], items[i]


@dataclass
class StrictKeyHolder:
    """Media platform as key holder: decrypts packed blinded values, returns only signs."""

    session_id: bytes
    private_key: PrivateKey
    seen: set[int] = field(default_factory=set)
    max_slot_bits: int = 256

    def handle(self, data: bytes) -> bytes:
        msg = decode(data)
        if (msg.type != MsgType.BLIND or msg.sender != Party.GUEST
                or msg.recipient != Party.MEDIA or msg.session_id != self.session_id):
            raise RemoteProtocolError("expected BLIND from the OEM", status_hint=409)
        if msg.seq in self.seen:
            raise RemoteProtocolError("replayed BLIND batch", status_hint=409)
        if len(msg.parts) != 3:
            raise RemoteProtocolError("BLIND: bad layout")
        total = u32(msg.parts[0], "count")
        if len(msg.parts[1]) != 2:
            raise RemoteProtocolError("BLIND: bad slot width")
        v_bits = int.from_bytes(msg.parts[1], "big")
        pk = self.private_key.public_key
        if not 8 <= v_bits <= self.max_slot_bits or not 0 < total <= MAX_BATCH_VALUES:
            raise RemoteProtocolError("BLIND: parameters out of range")
        slots = (pk.n_bits - 3) // v_bits
        vec = load_vector(msg.parts[2], pk, expected_context=msg.context(2))
        if len(vec) != -(-total // slots):
            raise RemoteProtocolError("BLIND: ciphertext count does not match")
        self.seen.add(msg.seq)
        offset = 1 << (v_bits - 1)
        mask = (1 << v_bits) - 1
        bits = np.zeros(total, dtype=np.uint8)
        try:
            plain = self.private_key.decrypt_encoded(vec)
        except PaillierError as exc:
            raise RemoteProtocolError(f"BLIND: {exc}") from exc
        pos = 0
        for m in plain:
            live = min(slots, total - pos)
            if m < 0 or m >> (live * v_bits):
                raise RemoteProtocolError("BLIND: packed value out of range (tampered?)")
            for _ in range(live):
                bits[pos] = 1 if (m & mask) > offset else 0
                m >>= v_bits
                pos += 1
        reply = Message(MsgType.SIGNS, Party.MEDIA, Party.GUEST, self.session_id, msg.seq,
                        (np.packbits(bits).tobytes(),))
        return reply.to_bytes()


__all__ = [
    "GRADES",
    "GRADE_FRAC_BITS",
    "SCORE_FRAC_BITS",
    "Blinding",
    "GradeSpec",
    "StrictGrader",
    "StrictKeyHolder",
    "combine_standard",
    "decode_partial_label",
    "encode_partial_label",
    "encrypt_partial_labels",
    "load_partial_label",
]
