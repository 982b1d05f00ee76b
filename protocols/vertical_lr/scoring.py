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
random; magnitudes are blinded but not statistically hidden). The exponentiations run as
picklable jobs (:mod:`protocols.vertical_lr.blinding`) that the caller may hand to the
OEM's own worker processes; the packed ciphertexts are re-randomised from an optional
offline :class:`~protocols.paillier.RandomizerPool`. ``adaptive=True`` grades with two
comparisons per lead in two exchanges (middle threshold, then A or C) instead of three in
one; the key holder refuses any third comparison per lead.

This module does no I/O and never logs; partial scores never appear in strict-mode
messages in plaintext.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import gmpy2
import numpy as np

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.paillier import (
    EncryptedVector,
    PaillierError,
    PrivateKey,
    PublicKey,
    RandomizerPool,
    load_vector,
    to_bytes,
)
from protocols.vertical_lr.blinding import BlindJob, run_blind_job, run_blind_jobs
from protocols.vertical_lr.fixedpoint import SCORE_FRAC_BITS, decode_scores, encode_scores
from protocols.vertical_lr.messages import (
    SESSION_ID_BYTES,
    Message,
    MsgType,
    Party,
    decode,
    u8,
    u32,
)
from protocols.vertical_lr.model import FloatArray, sigmoid

GRADES = ("A", "B", "C", "D")
LABEL_VERSION = 1
GRADE_FRAC_BITS = 16  # strict-mode score scale
# |partial score|, |threshold| < 2^(SCORE_BOUND_BITS - GRADE_FRAC_BITS - 2) = 64 log-odds,
# so |s - t| < 2^SCORE_BOUND_BITS at scale 2^-16; the slot width (and the OEM's squarings
# per comparison) grows with it: 24 gives 74-bit slots, 27 comparisons per ciphertext
SCORE_BOUND_BITS = 24
MAX_BATCH_VALUES = 1 << 20
Mpz = Any  # gmpy2.mpz has no type stubs


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


def load_partial_labels(labels: Sequence[bytes], key_holder: PublicKey) -> list[Mpz]:
    """OEM: many labels at once (one gcd for the batch instead of one per label)."""
    w = _width(key_holder)
    for i, label in enumerate(labels):
        if len(label) != w:
            raise RemoteProtocolError(f"encrypted partial-score label {i}: wrong length")
    try:
        return key_holder.validate_ciphertexts([int.from_bytes(b, "big") for b in labels])
    except PaillierError as exc:
        raise RemoteProtocolError(f"encrypted partial-score label: {exc}") from exc


# -- strict mode: blinded comparison -------------------------------------------------------
ROUND_ALL = 0  # one exchange: every lead against every threshold (default)
ROUND_MIDDLE = 1  # adaptive, first exchange: every lead against the middle threshold (B)
ROUND_NEXT = 2  # adaptive, second exchange: against A if the lead passed B, else against C
SCORE_LIMIT = 2.0 ** (SCORE_BOUND_BITS - GRADE_FRAC_BITS - 2)  # |partial score|, |threshold|
_ROUND_TAG = b"/grade-round"

JobRunner = Callable[[Sequence[BlindJob]], Sequence[Sequence[int]]]


@dataclass(frozen=True)
class Blinding:
    """r = 2^e * m with e uniform in [0, spread_bits] and m uniform in [2^(mantissa-1),
    2^mantissa); r' uniform in [1, r)."""

    mantissa_bits: int = 32
    spread_bits: int = 16

    def __post_init__(self) -> None:
        if not 8 <= self.mantissa_bits <= 64 or not 0 <= self.spread_bits <= 64:
            raise LocalProtocolError("blinding: mantissa 8..64 bits, spread 0..64 bits",
                                     status_hint=400)

    @property
    def slot_bits(self) -> int:
        return SCORE_BOUND_BITS + self.mantissa_bits + self.spread_bits + 2


@dataclass(frozen=True)
class GradingStep:
    """What the OEM does next after a SIGNS message: send ``reply`` (the second round of an
    adaptive batch) or use ``grades`` (the batch is finished)."""

    batch_id: int
    reply: bytes | None = None
    grades: list[str] | None = None


@dataclass
class _Pending:
    leads: int
    round: int
    perm: list[int]
    flips: list[int]
    bases: list[Mpz] = field(default_factory=list)  # adaptive: kept for the second round
    own: list[int] = field(default_factory=list)
    first: np.ndarray | None = None  # adaptive: passed the middle threshold


@dataclass
class StrictGrader:
    """OEM role of strict grading. ``blind_batch`` -> BLIND bytes for the key holder;
    ``handle(SIGNS bytes)`` -> grades of that batch, in the order given.

    ``adaptive=True`` asks two comparisons per lead instead of three (binary search over the
    thresholds: the middle one first, then A or C); a batch then takes two exchanges and the
    caller uses :meth:`step` (see docs/protocols/lead-scoring.md for what this changes).
    ``runner`` runs the blinding jobs (default: inline; pass e.g. an executor's ``map`` to
    use the OEM's own worker processes) and ``jobs_per_batch`` sets how many jobs a batch is
    split into. ``pool`` supplies the randomisers that re-randomise the packed ciphertexts
    (filled offline; without it they are computed online).
    """

    session_id: bytes
    key_holder: PublicKey
    spec: GradeSpec
    platt: tuple[float, float]
    blinding: Blinding = field(default_factory=Blinding)
    adaptive: bool = False
    runner: JobRunner | None = None
    jobs_per_batch: int = 1
    pool: RandomizerPool | None = None
    pending: dict[int, _Pending] = field(default_factory=dict)
    used: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if len(self.session_id) != SESSION_ID_BYTES:
            raise LocalProtocolError("session_id must be 16 bytes")
        if self.jobs_per_batch < 1:
            raise LocalProtocolError("jobs_per_batch must be >= 1", status_hint=400)
        if self.pool is not None:
            self.pool.require_key(self.key_holder)
        self.key_holder.precompute()
        thresholds = self.spec.score_thresholds(self.platt)
        if any(abs(t) >= SCORE_LIMIT for t in thresholds):
            raise LocalProtocolError(
                f"grade thresholds on the score scale must lie within +-{SCORE_LIMIT:g} "
                "(Platt slope too small?)", status_hint=400)
        self._t = [math.ceil(t * 2**GRADE_FRAC_BITS) for t in thresholds]
        self.slots = (self.key_holder.n_bits - 3) // self.blinding.slot_bits

    # -- first exchange -------------------------------------------------------------------
    def blind_batch(self, batch_id: int, own_scores: FloatArray,
                    host_labels: list[list[bytes]]) -> bytes:
        """BLIND message of a batch: every lead against every threshold or, if adaptive,
        against the middle threshold (the first of two exchanges)."""
        if batch_id in self.used or not 0 <= batch_id < 2**32:
            raise LocalProtocolError(f"batch id {batch_id} already used or out of range",
                                     status_hint=500)
        own = np.asarray(own_scores, dtype=np.float64)
        n = own.size
        if any(len(h) != n for h in host_labels):
            raise LocalProtocolError("one label per lead and host is needed", status_hint=400)
        if n * len(self._t) > MAX_BATCH_VALUES:
            raise LocalProtocolError("batch too large", status_hint=400)
        if n and not (np.isfinite(own).all() and float(np.max(np.abs(own))) < SCORE_LIMIT):
            raise LocalProtocolError(
                f"own partial scores must be finite and within +-{SCORE_LIMIT:g}",
                status_hint=400)
        pk = self.key_holder
        n2 = pk._n2
        own_int = np.rint(np.ldexp(own, GRADE_FRAC_BITS)).astype(np.int64).tolist()
        bases: list[Mpz] = [gmpy2.mpz(1)] * n
        for h in host_labels:
            for i, c in enumerate(load_partial_labels(h, pk)):
                bases[i] = bases[i] * c % n2
        if self.adaptive:
            mid = self._t[len(self._t) // 2]
            items = [(lead, mid) for lead in range(n)]
            rnd = ROUND_MIDDLE
        else:
            items = [(lead, t) for lead in range(n) for t in self._t]
            rnd = ROUND_ALL
        self.used.add(batch_id)
        data, perm, flips = self._blind(batch_id, rnd, bases, own_int, items)
        self.pending[batch_id] = _Pending(n, rnd, perm, flips,
                                          bases if self.adaptive else [],
                                          own_int if self.adaptive else [])
        return data

    def _blind(self, batch_id: int, rnd: int, bases: list[Mpz], own: list[int],
               items: list[tuple[int, int]]) -> tuple[bytes, list[int], list[int]]:
        """Permute, blind and pack the comparisons ``items`` (lead, threshold) and seal them
        into a BLIND message. Randomness is drawn here; the exponentiations run as jobs."""
        pk = self.key_holder
        n_ = pk.n
        total = len(items)
        perm = list(range(total))
        _shuffle(perm)
        flips = [secrets.randbits(1) for _ in range(total)]
        bl = self.blinding
        v_bits = bl.slot_bits
        offset = 1 << (v_bits - 1)
        top_m = 1 << (bl.mantissa_bits - 1)
        n_cts = -(-total // self.slots)
        n_jobs = min(self.jobs_per_batch, n_cts)
        jobs: list[BlindJob] = []
        for j in range(n_jobs):
            lo, hi = n_cts * j // n_jobs, n_cts * (j + 1) // n_jobs
            local: dict[int, int] = {}
            job_bases: list[int] = []
            cts: list[tuple[tuple[int, bool, int, int], ...]] = []
            consts: list[int] = []
            for ct in range(lo, hi):
                start = ct * self.slots
                slots: list[tuple[int, bool, int, int]] = []
                packed = 0
                for pos in range(min(total, start + self.slots) - 1, start - 1, -1):
                    lead, t = items[perm[pos]]
                    e = secrets.randbelow(bl.spread_bits + 1)
                    m = secrets.randbits(bl.mantissa_bits - 1) | top_m
                    r = m << e
                    plain = r * (own[lead] - t) + 1 + secrets.randbelow(r - 1)
                    if flips[pos]:
                        plain = -plain
                    packed = (packed << v_bits) + plain + offset
                    b = local.get(lead)
                    if b is None:
                        b = local[lead] = len(job_bases)
                        job_bases.append(int(bases[lead]))
                    slots.append((b, bool(flips[pos]), m, e))
                cts.append(tuple(slots))
                consts.append(packed % n_)
            jobs.append(BlindJob(n_, v_bits, tuple(job_bases), tuple(cts), tuple(consts)))
        results = (self.runner or run_blind_jobs)(jobs)
        if len(results) != len(jobs) or any(
                len(res) != len(job.ciphertexts) for res, job in zip(results, jobs, strict=True)):
            raise LocalProtocolError("blinding runner returned the wrong number of results")
        cts_all = [c for res in results for c in res]
        vec = EncryptedVector(pk, cts_all, 0, validate=False).rerandomize(self.pool)
        head = Message(MsgType.BLIND, Party.GUEST, Party.MEDIA, self.session_id, batch_id, ())
        parts = [total.to_bytes(4, "big"), v_bits.to_bytes(2, "big"),
                 to_bytes(vec, context=_blind_context(head, rnd))]
        if rnd != ROUND_ALL:
            parts.append(bytes([rnd]))
        msg = Message(MsgType.BLIND, Party.GUEST, Party.MEDIA, self.session_id, batch_id,
                      tuple(parts))
        return msg.to_bytes(), perm, flips

    # -- answers --------------------------------------------------------------------------
    def handle(self, data: bytes) -> list[str]:
        """Grades of the batch answered by this SIGNS message (non-adaptive grading)."""
        if self.adaptive:
            raise LocalProtocolError("adaptive grading takes two exchanges: use step()")
        grades = self.step(data).grades
        assert grades is not None
        return grades

    def step(self, data: bytes) -> GradingStep:
        """Consume a SIGNS message: the next BLIND (adaptive first round) or the grades."""
        msg = decode(data)
        if (msg.type != MsgType.SIGNS or msg.sender != Party.MEDIA
                or msg.recipient != Party.GUEST or msg.session_id != self.session_id):
            raise RemoteProtocolError("expected SIGNS from the key holder", status_hint=409)
        pend = self.pending.get(msg.seq)
        if pend is None:
            raise RemoteProtocolError("SIGNS for no outstanding batch (replay?)",
                                      status_hint=409)
        if len(msg.parts) not in (1, 2):
            raise RemoteProtocolError("SIGNS: bad layout")
        rnd = ROUND_ALL if len(msg.parts) == 1 else u8(msg.parts[1], "round")
        if rnd != pend.round:
            raise RemoteProtocolError("SIGNS for another round of this batch", status_hint=409)
        k = len(self._t)
        total = pend.leads * (k if rnd == ROUND_ALL else 1)
        if len(msg.parts[0]) != (total + 7) // 8:
            raise RemoteProtocolError("SIGNS: wrong bitmap length")
        del self.pending[msg.seq]
        bits = np.unpackbits(np.frombuffer(msg.parts[0], dtype=np.uint8))[:total]
        passed = np.zeros(total, dtype=np.int64)
        passed[np.asarray(pend.perm, dtype=np.int64)] = (
            bits.astype(np.int64) ^ np.asarray(pend.flips, dtype=np.int64))
        if rnd == ROUND_ALL:
            per_lead = passed.reshape(pend.leads, k)
            # thresholds decrease in probability: passing A implies passing B and C
            if (np.diff(per_lead, axis=1) < 0).any():
                raise RemoteProtocolError("SIGNS: inconsistent comparisons (tampered?)")
            return GradingStep(msg.seq, grades=[GRADES[k - int(c)]
                                                for c in per_lead.sum(axis=1)])
        if rnd == ROUND_MIDDLE:
            mid = k // 2
            items = [(lead, self._t[mid - 1] if passed[lead] else self._t[mid + 1])
                     for lead in range(pend.leads)]
            reply, perm, flips = self._blind(msg.seq, ROUND_NEXT, pend.bases, pend.own, items)
            self.pending[msg.seq] = _Pending(pend.leads, ROUND_NEXT, perm, flips,
                                             first=passed)
            return GradingStep(msg.seq, reply=reply)
        assert pend.first is not None
        # passed B: A or B; failed B: C or D (count of thresholds passed: 2 + a or c)
        count = 2 * pend.first + passed
        return GradingStep(msg.seq, grades=[GRADES[k - int(c)] for c in count])


def _blind_context(head: Message, rnd: int) -> bytes:
    ctx = head.context(2)
    return ctx if rnd == ROUND_ALL else ctx + _ROUND_TAG + bytes([rnd])


def _shuffle(items: list[int]) -> None:
    for i in range(len(items) - 1, 0, -1):
        j = secrets.randbelow(i + 1)
        items[i], items[j] = items[j], items[i]


@dataclass
class StrictKeyHolder:
    """Media platform as key holder: decrypts packed blinded values, returns only signs.

    It accepts one exchange of ``3 x leads`` values per batch, or (adaptive grading) a first
    exchange and exactly one second exchange of the same size; anything else is refused, so
    an OEM cannot ask more comparisons per lead than the protocol allows.
    """

    session_id: bytes
    private_key: PrivateKey
    seen: set[int] = field(default_factory=set)
    max_slot_bits: int = 256
    awaiting_next: dict[int, int] = field(default_factory=dict)

    def handle(self, data: bytes) -> bytes:
        msg = decode(data)
        if (msg.type != MsgType.BLIND or msg.sender != Party.GUEST
                or msg.recipient != Party.MEDIA or msg.session_id != self.session_id):
            raise RemoteProtocolError("expected BLIND from the OEM", status_hint=409)
        if len(msg.parts) not in (3, 4):
            raise RemoteProtocolError("BLIND: bad layout")
        rnd = ROUND_ALL if len(msg.parts) == 3 else u8(msg.parts[3], "round")
        if rnd not in (ROUND_ALL, ROUND_MIDDLE, ROUND_NEXT):
            raise RemoteProtocolError("BLIND: unknown round")
        total = u32(msg.parts[0], "count")
        if rnd == ROUND_NEXT:
            if self.awaiting_next.get(msg.seq) is None:
                raise RemoteProtocolError("BLIND: second round without a first (replay?)",
                                          status_hint=409)
            if self.awaiting_next[msg.seq] != total:
                raise RemoteProtocolError("BLIND: second round of another size")
        elif msg.seq in self.seen:
            raise RemoteProtocolError("replayed BLIND batch", status_hint=409)
        if len(msg.parts[1]) != 2:
            raise RemoteProtocolError("BLIND: bad slot width")
        v_bits = int.from_bytes(msg.parts[1], "big")
        pk = self.private_key.public_key
        if not 8 <= v_bits <= self.max_slot_bits or not 0 < total <= MAX_BATCH_VALUES:
            raise RemoteProtocolError("BLIND: parameters out of range")
        if rnd == ROUND_ALL and total % (len(GRADES) - 1):
            raise RemoteProtocolError("BLIND: not one value per lead and threshold")
        slots = (pk.n_bits - 3) // v_bits
        vec = load_vector(msg.parts[2], pk, expected_context=_blind_context(msg, rnd))
        if len(vec) != -(-total // slots):
            raise RemoteProtocolError("BLIND: ciphertext count does not match")
        if rnd == ROUND_NEXT:
            del self.awaiting_next[msg.seq]
        else:
            self.seen.add(msg.seq)
            if rnd == ROUND_MIDDLE:
                self.awaiting_next[msg.seq] = total
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
        parts: tuple[bytes, ...] = (np.packbits(bits).tobytes(),)
        if rnd != ROUND_ALL:
            parts += (bytes([rnd]),)
        return Message(MsgType.SIGNS, Party.MEDIA, Party.GUEST, self.session_id, msg.seq,
                       parts).to_bytes()


__all__ = [
    "GRADES",
    "GRADE_FRAC_BITS",
    "ROUND_ALL",
    "ROUND_MIDDLE",
    "ROUND_NEXT",
    "SCORE_FRAC_BITS",
    "SCORE_LIMIT",
    "BlindJob",
    "Blinding",
    "GradeSpec",
    "GradingStep",
    "JobRunner",
    "StrictGrader",
    "StrictKeyHolder",
    "combine_standard",
    "decode_partial_label",
    "encode_partial_label",
    "encrypt_partial_labels",
    "load_partial_label",
    "load_partial_labels",
    "run_blind_job",
]
