"""The OEM's heavy step in strict grading: blinded comparisons packed into few ciphertexts.

A packed ciphertext carries ``k`` blinded comparisons, slot ``j`` (from the top) holding
``f_j * r_j * (u_m + u_d) + const_j`` with ``r_j = 2^e_j * m_j``; homomorphically it is

    C = prod_j B_j^(f_j * r_j * 2^(v * j)) * (1 + n * P)     (mod n^2)

where ``B_j = [[u_m]] * [[u_d]]`` of the slot's lead, ``v`` the slot width and ``P`` the
packed plaintext constants (the OEM's own score, the threshold, ``r'`` and the offset, all
in clear at the OEM). The earlier code computed every ``B^r`` with its own exponentiation
(~48 squarings) and then shifted the accumulator by ``v`` squarings per slot (Horner).
:func:`run_blind_job` evaluates the same product as one interleaved (Straus-style)
exponentiation: ``acc^(2^v) * B^(2^e * m) = (acc^(2^(v - e)) * B^m)^(2^e)`` and the bits
of ``m`` are consumed by a sliding window *while* the accumulator is being squared for the
shift, so a slot costs exactly ``v`` squarings modulo n^2 plus about ``|m| / 4``
multiplications, instead of ``v + |r|`` squarings. The result is bit-for-bit the same
ciphertext as the straightforward formula (tested), so nothing about the blinding, its
distribution or what the key holder sees changes.

A :class:`BlindJob` holds only integers and tuples, so the caller may run jobs in worker
processes (``concurrent.futures.ProcessPoolExecutor.map(run_blind_job, jobs)``) or inline.
Jobs carry the OEM's blinding secrets (``m``, ``e``, flips and the constants): they may
only be handed to the OEM's own workers, never serialised to another party or logged.

What this module must not do: no I/O, no randomness (every random value is drawn by
:class:`~protocols.vertical_lr.scoring.StrictGrader` and passed in), no process
management (the caller chooses the executor), no re-randomisation (the grader does that
after the jobs, before anything leaves the OEM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gmpy2

Mpz = Any  # gmpy2.mpz has no type stubs

WINDOW_BITS = 3  # sliding window over m: 4 odd powers per base, ~|m|/4 multiplications
_POWMOD_RUN = 6  # runs of at least this many squarings go to one gmpy2.powmod call


@dataclass(frozen=True)
class BlindJob:
    """Picklable work order: ``ciphertexts[i]`` lists the slots of packed ciphertext ``i``
    from the top slot down as ``(base_index, negate, m, e)``; ``bases[base_index]`` is the
    lead's ``[[u_m]] * [[u_d]]``; ``constants[i]`` is the packed plaintext ``P mod n``.

    Contains OEM secrets: keep it inside the OEM (its own worker processes only).
    """

    n: int
    slot_bits: int
    bases: tuple[int, ...]
    ciphertexts: tuple[tuple[tuple[int, bool, int, int], ...], ...]
    constants: tuple[int, ...]

    def __repr__(self) -> str:  # never print the secrets
        return (f"BlindJob(ciphertexts={len(self.ciphertexts)}, bases={len(self.bases)}, "
                f"slot_bits={self.slot_bits})")


def _windows(m: int, w: int) -> list[tuple[int, int]]:
    """Left-to-right sliding-window digits of ``m > 0``: ``(position, odd_digit // 2)``
    with ``m = sum(digit << position)`` and positions strictly decreasing."""
    out: list[tuple[int, int]] = []
    i = m.bit_length() - 1
    while i >= 0:
        if not (m >> i) & 1:
            i -= 1
            continue
        lo = max(i - w + 1, 0)
        while not (m >> lo) & 1:
            lo += 1
        digit = (m >> lo) & ((1 << (i - lo + 1)) - 1)
        out.append((lo, digit >> 1))
        i = lo - 1
    return out


def _square_run(x: Mpz, k: int, n2: Mpz) -> Mpz:
    if k >= _POWMOD_RUN:
        return gmpy2.powmod(x, 1 << k, n2)
    for _ in range(k):
        x = x * x % n2
    return x


def _odd_powers(b: Mpz, n2: Mpz, w: int) -> list[Mpz]:
    """``[b, b^3, b^5, ..., b^(2^w - 1)]``."""
    out = [b]
    if w > 1:
        b2 = b * b % n2
        for _ in range((1 << (w - 1)) - 1):
            out.append(out[-1] * b2 % n2)
    return out


def _batch_invert(values: list[Mpz], n2: Mpz) -> list[Mpz]:
    """Inverses of units modulo n^2 with one modular inversion (Montgomery's trick)."""
    if not values:
        return []
    prefix = [values[0]]
    for v in values[1:]:
        prefix.append(prefix[-1] * v % n2)
    inv = gmpy2.invert(prefix[-1], n2)
    out: list[Mpz] = [None] * len(values)
    for i in range(len(values) - 1, 0, -1):
        out[i] = inv * prefix[i - 1] % n2
        inv = inv * values[i] % n2
    out[0] = inv
    return out


def run_blind_job(job: BlindJob) -> list[int]:
    """The packed ciphertexts of ``job`` (not yet re-randomised), as Python ints."""
    n = gmpy2.mpz(job.n)
    n2 = n * n
    v = job.slot_bits
    w = WINDOW_BITS
    bases = [gmpy2.mpz(b) for b in job.bases]
    needed_neg = sorted({b for cts in job.ciphertexts for b, neg, _, _ in cts if neg})
    inverses = dict(zip(needed_neg, _batch_invert([bases[b] for b in needed_neg], n2),
                        strict=True))
    tables: dict[tuple[int, bool], list[Mpz]] = {}
    out: list[int] = []
    for slots, const in zip(job.ciphertexts, job.constants, strict=True):
        acc: Mpz = None
        owe = 0  # squarings still owed to acc
        for b, neg, m, e in slots:
            tab = tables.get((b, neg))
            if tab is None:
                tab = tables[(b, neg)] = _odd_powers(inverses[b] if neg else bases[b], n2, w)
            # acc <- acc^(2^(owe + v)) * B^(2^e * m) = (acc^(2^(owe + v - e)) * B^m)^(2^e)
            prev: int | None = None
            for pos, idx in _windows(m, w):
                if acc is None:
                    acc = tab[idx]
                else:
                    k = (owe + v - e - pos) if prev is None else (prev - pos)
                    acc = _square_run(acc, k, n2) * tab[idx] % n2
                prev = pos
            assert prev is not None  # m > 0 (its top bit is set)
            owe = e + prev
        if acc is None:
            acc = gmpy2.mpz(1)
        acc = _square_run(acc, owe, n2)
        out.append(int(acc * (gmpy2.mpz(const) * n + 1) % n2))
    return out


def run_blind_jobs(jobs: Sequence[BlindJob]) -> list[list[int]]:
    """Run jobs one after another in this process (the default runner)."""
    return [run_blind_job(j) for j in jobs]


def reference_packed(n: int, slot_bits: int, bases: Sequence[int],
                     slots: Sequence[tuple[int, bool, int, int]], const: int) -> int:
    """The same packed ciphertext by the plain formula (one powmod per slot, then Horner
    shifts): the check for :func:`run_blind_job` in tests and the benchmark's baseline."""
    n_ = gmpy2.mpz(n)
    n2 = n_ * n_
    acc = gmpy2.mpz(1)
    for b, neg, m, e in slots:
        base = gmpy2.invert(bases[b], n2) if neg else gmpy2.mpz(bases[b])
        acc = gmpy2.powmod(acc, 1 << slot_bits, n2) * gmpy2.powmod(base, m << e, n2) % n2
    return int(acc * (gmpy2.mpz(const) * n_ + 1) % n2)


__all__ = ["WINDOW_BITS", "BlindJob", "reference_packed", "run_blind_job", "run_blind_jobs"]
