"""Sans-I/O roles of vertical federated logistic regression: one guest, two hosts.

Parties: the guest (OEM) holds labels and CRM features, the hosts (media platform, dealer)
hold their own feature columns for the same rows (already aligned by PSI, in an agreed
order, with an agreed train/validation split). Each party keeps its own weight slice.

Design (see docs/protocols/lead-scoring.md for the message flow and the leakage table).
The Taylor-approximated logistic gradient ``X^T (0.25 X w + 0.5 - y)`` is linear in the
weights, so full-batch training needs only the Gram blocks ``X_p^T X_q`` and ``X_p^T y``.
They are computed once, encrypted, and kept as additive shares:

1. setup, for each pair (exponent holder E, row owner P) in :data:`PAIRS`: P encrypts its
   rows, all its features packed into one plaintext per row (``slot_bits`` per feature),
   under its own key; E raises each row ciphertext to its own (offset) features and
   multiplies (one multi-exponentiation per E column), giving the packed block
   ``X_E^T X_P`` plus known offsets; E adds a packed mask R (40 bits of statistical
   hiding) and returns it; P decrypts the masked block. Now ``C = a + b`` with E holding
   a and P holding b; each sends the other its share encrypted under its own key.
2. every epoch, for each pair, E computes ``[[C^T w_E]]`` under P's key and P computes
   ``[[C w_P]]`` under E's key (a plaintext share times a weight, plus an encrypted share
   times a weight). The terms are summed under the beneficiary's key by a third party
   before the beneficiary decrypts, so each party learns only its own gradient.
3. the guest checks the validation AUC every ``eval_every`` epochs from the hosts' partial
   scores summed with cancelling masks (it sees the sum, never one host's score), stops
   early, and fits Platt scaling on the best check's validation scores.

Driving a role: ``start() -> [(recipient, bytes)]``, then ``handle(bytes) -> [(recipient,
bytes)]`` for every message received, until ``finished``. Messages between two parties
must be delivered in the order they were sent (one ordered channel per pair). Malformed,
tampered, replayed, wrong-key or out-of-turn messages raise
:class:`~protocols.errors.RemoteProtocolError` and move the role to ``ERROR``.

What this module must not do: no sockets, files, logging or clocks; never put a plaintext
feature, label, partial score or gradient of one party into a message to another.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import gmpy2
import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocols.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocols.paillier import (
    EncryptedVector,
    PaillierError,
    PrivateKey,
    PublicKey,
    generate_keypair,
    load_public_key,
    load_vector,
    to_bytes,
)
from protocols.paillier.fastexp import multiexp
from protocols.vertical_lr import fixedpoint as fx
from protocols.vertical_lr.messages import (
    SESSION_ID_BYTES,
    Message,
    MsgType,
    Party,
    context,
    decode,
    u8,
    u32,
)
from protocols.vertical_lr.model import (
    FloatArray,
    TrainingConfig,
    apply_update,
    auc,
    fit_platt,
    lift_by_decile,
)
from protocols.vertical_lr.states import State, accepts

Outgoing = list[tuple[Party, bytes]]
PAIRS: tuple[tuple[Party, Party], ...] = (
    (Party.GUEST, Party.MEDIA),
    (Party.GUEST, Party.DEALER),
    (Party.DEALER, Party.MEDIA),
)
HOSTS = (Party.MEDIA, Party.DEALER)
GO, STOP = 1, 2
_OFF = fx.FEATURE_OFFSET
_K = fx.FEATURE_OFFSET
CROSS_FRAC_BITS = fx.GRAM_FRAC_BITS + fx.WEIGHT_FRAC_BITS
Y_WEIGHT = -4.0  # 0.25 * (-4) * X^T y = -X^T y in the host gradients


def slot_bits_for(n_rows: int) -> int:
    """Slot width of a packed Gram entry plus its mask: sum of n_rows products of 16-bit
    offsets, plus STAT_BITS of mask, plus a carry bit."""
    return 32 + max(n_rows, 1).bit_length() + fx.STAT_BITS + 1


@dataclass(frozen=True)
class DotJob:
    """Picklable work order for the exponent holder's heavy setup step: ``prod_i
    bases[i] ^ exponents[i, j] mod modulus`` for every column j (a slice of the rows).

    Contains the exponent holder's own (offset, quantised) features: hand it only to that
    party's own worker processes, never to another party, never log it.
    """

    modulus: int
    bases: tuple[int, ...]
    exponents: np.ndarray  # int64, rows x columns, all >= 0

    def __repr__(self) -> str:  # never print the features
        return f"DotJob(rows={len(self.bases)}, columns={self.exponents.shape[1]})"


def run_dot_job(job: DotJob) -> list[int]:
    """The column products of ``job`` (bucket multi-exponentiation), as Python ints."""
    bases = [gmpy2.mpz(b) for b in job.bases]
    return [int(multiexp(bases, job.exponents[:, j], job.modulus))
            for j in range(job.exponents.shape[1])]


DotRunner = Callable[[Sequence[DotJob]], Sequence[Sequence[int]]]


@dataclass(frozen=True)
class ModelSlice:
    """One party's part of the trained model: its standardiser and weights.

    For the guest, ``weights[0]`` is the intercept; partial scores use the same
    quantisation as training.
    """

    party: Party
    standardizer: fx.Standardizer
    weights: FloatArray
    intercept: bool

    def design(self, features: FloatArray) -> FloatArray:
        q = fx.dequantise(fx.quantise(self.standardizer.transform(features)))
        if self.intercept:
            q = np.column_stack([np.ones(q.shape[0]), q])
        return np.asarray(q)

    def partial_scores(self, features: FloatArray) -> FloatArray:
        """This party's share ``X_p w_p`` of the log-odds for each row."""
        return np.asarray(self.design(features) @ self.weights)


@dataclass
class TrainingReport:
    """What the guest learns about the run (hosts learn ``epochs`` and ``best_check``)."""

    epochs: int
    best_check: int
    check_epochs: list[int] = field(default_factory=list)
    check_auc: list[float] = field(default_factory=list)
    validation_auc: float = float("nan")
    lift: list[dict[str, float]] = field(default_factory=list)
    platt: tuple[float, float] = (1.0, 0.0)
    stopped_early: bool = False


@dataclass
class _Pair:
    e: Party
    p: Party
    # at E
    a: list[list[int]] | None = None  # d_E x d_P
    enc_b: EncryptedVector | None = None  # under P's key, row-major d_E x d_P
    # at P
    b: list[list[int]] | None = None
    enc_a: EncryptedVector | None = None  # under E's key
    done: bool = False


class _Role(ABC):
    party: Party

    def __init__(self, party: Party, session_id: bytes, config: TrainingConfig,
                 train: FloatArray, val: FloatArray, *, shape: dict[str, int],
                 keys: tuple[PublicKey, PrivateKey] | None, intercept: bool,
                 runner: DotRunner | None = None, jobs: int = 1) -> None:
        config.validate()
        if len(session_id) != SESSION_ID_BYTES:
            raise LocalProtocolError("session_id must be 16 bytes", status_hint=500)
        tr = fx.check_matrix(train, f"{party.name.lower()} training features")
        va = fx.check_matrix(val, f"{party.name.lower()} validation features")
        if jobs < 1:
            raise LocalProtocolError("jobs must be >= 1", status_hint=500)
        self.party = party
        self.runner = runner
        self.jobs = jobs
        self.session_id = session_id
        self.config = config
        self.shape = dict(shape)
        if tr.shape[0] != shape["n_train"] or va.shape[0] != shape["n_val"]:
            raise LocalProtocolError(
                f"{party.name.lower()}: {tr.shape[0]}/{va.shape[0]} train/validation rows, "
                f"the session agreed {shape['n_train']}/{shape['n_val']}", status_hint=400)
        if tr.shape[1] != shape[party.name.lower()]:
            raise LocalProtocolError(
                f"{party.name.lower()}: {tr.shape[1]} feature columns, the session agreed "
                f"{shape[party.name.lower()]}", status_hint=400)
        self.standardizer = fx.Standardizer.fit(tr)
        q = fx.quantise(self.standardizer.transform(tr))
        qv = fx.quantise(self.standardizer.transform(va))
        if intercept:
            one = 1 << fx.FEATURE_FRAC_BITS
            q = np.column_stack([np.full(q.shape[0], one, dtype=np.int64), q])
            qv = np.column_stack([np.full(qv.shape[0], one, dtype=np.int64), qv])
        self.intercept = intercept
        self.xq = q  # int64, scale 2^-FEATURE_FRAC_BITS
        self.x = fx.dequantise(q)
        self.xv = fx.dequantise(qv)
        self.n = int(tr.shape[0])
        self.col_sums = [int(v) for v in q.sum(axis=0).tolist()]
        self.gram_local = self.x.T @ self.x
        if keys is None:
            keys = generate_keypair(config.key_bits)
        self.pub, self.priv = keys
        if self.pub.n_bits < config.key_bits:
            raise LocalProtocolError("Paillier key shorter than the agreed key_bits",
                                     status_hint=500)
        self.priv.precompute()  # owner-side CRT encryption tables
        self.peer_keys: dict[Party, PublicKey] = {}
        self.slot_bits = slot_bits_for(self.n)
        self.slots = (self.pub.n_bits - 3) // self.slot_bits
        self.digest = config.digest({"shape": self.shape,
                                     "session": session_id.hex()})
        self.pairs = {(e, p): _Pair(e, p) for e, p in PAIRS if party in (e, p)}
        self._rows_enc: EncryptedVector | None = None
        self.state = State.IDLE
        self.seen: set[tuple[MsgType, Party, int]] = set()
        self.w = np.zeros(self.x.shape[1])
        self.velocity = np.zeros(self.x.shape[1])
        self.snapshots: dict[int, FloatArray] = {}
        self.epoch = 0
        self.report: TrainingReport | None = None

    # -- helpers ------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.state == State.DONE

    def dims(self, party: Party) -> int:
        """Columns a party contributes to Gram blocks as E (guest: intercept + features +
        y) or as P (features)."""
        d = self.shape[party.name.lower()]
        return d + 2 if party == Party.GUEST else d

    def row_dims(self, party: Party) -> int:
        return self.shape[party.name.lower()]

    def _msg(self, mtype: MsgType, to: Party, seq: int, parts: list[bytes]) -> tuple[Party,
                                                                                    bytes]:
        return to, Message(mtype, self.party, to, self.session_id, seq, tuple(parts)).to_bytes()

    def _ctx(self, mtype: MsgType, to: Party, seq: int, index: int) -> bytes:
        return context(mtype, self.party, to, self.session_id, seq, index)

    def _vec(self, msg: Message, index: int, key: PublicKey, count: int) -> EncryptedVector:
        if index >= len(msg.parts):
            raise RemoteProtocolError(f"{msg.type.name}: missing part {index}")
        vec = load_vector(msg.parts[index], key, expected_context=msg.context(index))
        if len(vec) != count:
            raise RemoteProtocolError(
                f"{msg.type.name} part {index}: {len(vec)} ciphertexts, expected {count}")
        return vec

    def _fail(self, exc: Exception) -> None:
        self.state = State.ERROR
        if isinstance(exc, ProtocolError):
            raise exc
        raise RemoteProtocolError(f"{type(exc).__name__}: {exc}") from exc

    # -- public API ---------------------------------------------------------------------
    def start(self) -> Outgoing:
        if self.state != State.IDLE:
            raise LocalProtocolError(f"start() in state {self.state.value}")
        self.state = State.SETUP
        return self._start()

    def handle(self, data: bytes) -> Outgoing:
        if self.state in (State.ERROR, State.DONE, State.IDLE):
            raise LocalProtocolError(f"handle() in state {self.state.value}")
        try:
            msg = decode(data)
            if msg.recipient != self.party:
                raise RemoteProtocolError("message addressed to another party")
            if msg.session_id != self.session_id:
                raise RemoteProtocolError("message from another session", status_hint=409)
            if not accepts(self.party, self.state, msg.type):
                raise RemoteProtocolError(
                    f"{msg.type.name} not expected in state {self.state.value}",
                    status_hint=409)
            key = (msg.type, msg.sender, msg.seq)
            if key in self.seen:
                raise RemoteProtocolError(f"replayed {msg.type.name}", status_hint=409)
            self.seen.add(key)
            return self._dispatch(msg)
        except (ProtocolError, PaillierError, ValueError, ArithmeticError) as exc:
            self._fail(exc)
            raise  # pragma: no cover - _fail always raises

    @abstractmethod
    def _start(self) -> Outgoing:
        """The first messages of this role."""

    @abstractmethod
    def _dispatch(self, msg: Message) -> Outgoing:
        """Handle one checked message."""

    # -- setup --------------------------------------------------------------------------
    def _keys_parts(self, to: Party, x25519: bytes = b"") -> list[bytes]:
        return [self.digest, to_bytes(self.pub), x25519]

    def _on_keys(self, msg: Message) -> bytes:
        if msg.seq != 0 or len(msg.parts) != 3:
            raise RemoteProtocolError("KEYS: bad layout")
        if msg.parts[0] != self.digest:
            raise RemoteProtocolError("KEYS: the peer runs another configuration or shape",
                                      status_hint=409)
        key = load_public_key(msg.parts[1])
        if key.n_bits < self.config.key_bits:
            raise RemoteProtocolError("KEYS: peer key shorter than the agreed key_bits")
        if msg.sender in self.peer_keys:
            raise RemoteProtocolError("KEYS: sent twice", status_hint=409)
        self.peer_keys[msg.sender] = key.precompute()
        return msg.parts[2]

    def _peer_key(self, party: Party) -> PublicKey:
        if party not in self.peer_keys:
            raise RemoteProtocolError(f"no KEYS from {party.name.lower()} yet", status_hint=409)
        return self.peer_keys[party]

    def _rows_message(self, to: Party) -> tuple[Party, bytes]:
        """P: every training row's features (+ offset) packed into ceil(d/slots) plaintexts,
        encrypted once under P's own key (CRT) and sent to each E of P's pairs: the media
        platform sends the same fresh ciphertexts to the guest and to the dealer (each copy
        bound to its recipient by the serialisation context)."""
        if self._rows_enc is None:
            d = self.xq.shape[1]
            chunks = -(-d // self.slots)
            shifted = (self.xq + _OFF).tolist()
            ints: list[int] = []
            for row in shifted:
                for k in range(chunks):
                    ints.append(fx.pack_slots(row[k * self.slots:(k + 1) * self.slots],
                                              self.slot_bits))
            self._rows_enc = self.priv.encrypt_encoded(ints)
        return self._msg(MsgType.ROWS, to, 0, [to_bytes(self._rows_enc, context=self._ctx(
            MsgType.ROWS, to, 0, 0))])

    def _exponents(self) -> np.ndarray:
        """E: offset exponent columns (all >= 0)."""
        return self.xq + _K

    def _on_rows(self, msg: Message) -> Outgoing:
        """E: packed Gram block of (my columns) x (P's columns), masked, plus my share."""
        p = msg.sender
        pair = self.pairs.get((self.party, p))
        if pair is None or pair.a is not None:
            raise RemoteProtocolError("ROWS: unexpected sender", status_hint=409)
        key_p = self._peer_key(p)
        d_p = self.row_dims(p)
        chunks = -(-d_p // self.slots)
        rows = self._vec(msg, 0, key_p, self.n * chunks)
        expo = self._exponents()
        d_e = expo.shape[1]
        bound = 1 << (self.slot_bits - 1)  # masks below 2^(B + STAT_BITS)
        mask = [[secrets.randbelow(bound) for _ in range(d_p)] for _ in range(d_e)]
        parts: list[EncryptedVector] = []
        for k in range(chunks):
            sub = rows.take(np.arange(k, self.n * chunks, chunks))
            block = self._column_products(sub, expo)  # d_E packed ciphertexts
            lo, hi = k * self.slots, min(d_p, (k + 1) * self.slots)
            packed_mask = [fx.pack_slots(mask[row][lo:hi], self.slot_bits)
                           for row in range(d_e)]
            parts.append(block.add_encoded(packed_mask))
        masked = EncryptedVector.concat(parts)
        col_e = [int(v) for v in (expo - _K).sum(axis=0).tolist()]
        const = self.n * _K * _OFF
        pair.a = [[-(mask[r][j] + _OFF * col_e[r] + const) for j in range(d_p)]
                  for r in range(d_e)]
        enc_a = self.priv.encrypt_encoded([v for row in pair.a for v in row])
        ctx = self._ctx(MsgType.MASKED, p, 0, 0)
        ctx_a = self._ctx(MsgType.MASKED, p, 0, 1)
        return [self._msg(MsgType.MASKED, p, 0, [to_bytes(masked, context=ctx),
                                                 to_bytes(enc_a, context=ctx_a)])]

    def _column_products(self, rows: EncryptedVector, expo: np.ndarray) -> EncryptedVector:
        """``prod_i rows[i] ^ expo[i, j]`` for every column j: inline, or as ``self.jobs``
        row slices through ``self.runner`` (this party's own worker processes)."""
        if self.runner is None:
            return rows.dot(expo)
        key = rows.public_key
        cts = rows.ciphertexts
        n_jobs = max(1, min(self.jobs, len(cts)))
        cuts = [len(cts) * j // n_jobs for j in range(n_jobs + 1)]
        work = [DotJob(key.nsquare, tuple(cts[lo:hi]), np.ascontiguousarray(expo[lo:hi]))
                for lo, hi in pairwise(cuts)]
        results = self.runner(work)
        if len(results) != len(work) or any(len(r) != expo.shape[1] for r in results):
            raise LocalProtocolError("dot runner returned the wrong number of results",
                                     status_hint=500)
        n2 = key._n2
        out = [gmpy2.mpz(1)] * expo.shape[1]
        for res in results:
            out = [a * gmpy2.mpz(b) % n2 for a, b in zip(out, res, strict=True)]
        return EncryptedVector(key, out, 0, validate=False)

    def _on_masked(self, msg: Message) -> Outgoing:
        """P: decrypt the masked block into my share b; keep E's encrypted share."""
        e = msg.sender
        pair = self.pairs.get((e, self.party))
        if pair is None or pair.b is not None:
            raise RemoteProtocolError("MASKED: unexpected sender", status_hint=409)
        d_e, d_p = self.dims(e), self.row_dims(self.party)
        chunks = -(-d_p // self.slots)
        masked = self._vec(msg, 0, self.pub, d_e * chunks)
        pair.enc_a = self._vec(msg, 1, self._peer_key(e), d_e * d_p)
        plain = self.priv.decrypt_encoded(masked)
        b = [[0] * d_p for _ in range(d_e)]
        for k in range(chunks):
            lo, hi = k * self.slots, min(d_p, (k + 1) * self.slots)
            for r in range(d_e):
                vals = fx.unpack_slots(plain[k * d_e + r], hi - lo, self.slot_bits,
                                       f"MASKED block row {r}")
                for j, v in enumerate(vals):
                    b[r][lo + j] = v - _K * self.col_sums[lo + j]
        pair.b = b
        enc_b = self.priv.encrypt_encoded([v for row in b for v in row])
        out = [self._msg(MsgType.SHARE, e, 0, [to_bytes(enc_b, context=self._ctx(
            MsgType.SHARE, e, 0, 0))])]
        pair.done = True
        return out

    def _on_share(self, msg: Message) -> None:
        p = msg.sender
        pair = self.pairs.get((self.party, p))
        if pair is None or pair.a is None or pair.enc_b is not None:
            raise RemoteProtocolError("SHARE: unexpected", status_hint=409)
        pair.enc_b = self._vec(msg, 0, self._peer_key(p), self.dims(self.party) *
                               self.row_dims(p))
        pair.done = True

    def _setup_done(self) -> bool:
        return all(pr.done for pr in self.pairs.values())

    # -- epoch terms --------------------------------------------------------------------
    def _weights_as_e(self) -> list[int]:
        w = fx.encode_weights(self.w)
        if self.party == Party.GUEST:
            w.append(fx.encode_weights(np.array([Y_WEIGHT]))[0])
        return w

    def _term_for_p(self, p: Party) -> EncryptedVector:
        """E: ``[[C^T w_E]]`` under P's key (d_P values at CROSS_FRAC_BITS)."""
        pair = self.pairs[(self.party, p)]
        assert pair.a is not None and pair.enc_b is not None
        w = self._weights_as_e()
        d_e, d_p = len(pair.a), len(pair.a[0])
        outs = []
        for j in range(d_p):
            col = pair.enc_b.take(np.arange(j, d_e * d_p, d_p))
            plain = sum(pair.a[r][j] * w[r] for r in range(d_e))
            outs.append(col.dot(np.asarray(w, dtype=object)).add_encoded([plain]))
        return EncryptedVector.concat(outs)

    def _term_for_e(self, e: Party) -> EncryptedVector:
        """P: ``[[C w_P]]`` under E's key (the guest's y row is left out)."""
        pair = self.pairs[(e, self.party)]
        assert pair.b is not None and pair.enc_a is not None
        w = fx.encode_weights(self.w)
        d_e, d_p = len(pair.b), len(pair.b[0])
        rows = d_e - 1 if e == Party.GUEST else d_e
        outs = []
        for r in range(rows):
            vec = pair.enc_a[r * d_p:(r + 1) * d_p]
            plain = sum(pair.b[r][j] * w[j] for j in range(d_p))
            outs.append(vec.dot(np.asarray(w, dtype=object)).add_encoded([plain]))
        return EncryptedVector.concat(outs)

    def _decrypt_cross(self, vec: EncryptedVector) -> FloatArray:
        vals = self.priv.decrypt_encoded(vec)
        limit = self.n << (2 * fx.FEATURE_FRAC_BITS + fx.WEIGHT_FRAC_BITS + 40)
        if any(abs(v) > limit for v in vals):
            raise RemoteProtocolError("aggregate out of the plausible range (tampered?)")
        return np.ldexp(np.asarray([float(v) for v in vals]), -CROSS_FRAC_BITS)

    def _update(self, cross: FloatArray, extra: FloatArray | None = None) -> None:
        own = self.gram_local @ self.w
        grad = 0.25 * (own + cross) + 0.5 * self.x.sum(axis=0)
        if extra is not None:
            grad = grad + extra
        grad = grad / self.n
        self.w, self.velocity = apply_update(self.w, self.velocity, grad, self.epoch,
                                             self.config, 0 if self.intercept else None)

    def model(self) -> ModelSlice:
        if self.state != State.DONE:
            raise LocalProtocolError("the model is available once training is DONE")
        return ModelSlice(self.party, self.standardizer, self.w.copy(), self.intercept)


class TrainingGuest(_Role):
    """The OEM: labels, CRM features (an intercept column is added), validation metrics."""

    def __init__(self, session_id: bytes, config: TrainingConfig, train: FloatArray,
                 labels: Any, val: FloatArray, val_labels: Any, *, shape: dict[str, int],
                 keys: tuple[PublicKey, PrivateKey] | None = None,
                 runner: DotRunner | None = None, jobs: int = 1) -> None:
        super().__init__(Party.GUEST, session_id, config, train, val, shape=shape, keys=keys,
                         intercept=True, runner=runner, jobs=jobs)
        y = np.asarray(labels, dtype=np.float64).ravel()
        yv = np.asarray(val_labels, dtype=np.float64).ravel()
        for name, arr, rows in (("labels", y, self.n), ("validation labels", yv,
                                                         shape["n_val"])):
            if arr.size != rows or not np.isin(arr, (0.0, 1.0)).all():
                raise LocalProtocolError(f"{name}: need {rows} values of 0 or 1",
                                         status_hint=400)
        self.y, self.yv = y, yv
        one = 1 << fx.FEATURE_FRAC_BITS
        self.xq_aug = np.column_stack([self.xq, (y * one).astype(np.int64)])
        self.xy = self.x.T @ y
        self.ready: set[Party] = set()
        self.cross: dict[tuple[Party, int], EncryptedVector] = {}
        self.sent_agg: set[Party] = set()
        self.own_done = False
        self.pending_agg: FloatArray | None = None
        self.val: dict[Party, np.ndarray] = {}
        self.check_scores: dict[int, FloatArray] = {}
        self.report = TrainingReport(epochs=0, best_check=-1)

    def _exponents(self) -> np.ndarray:
        return self.xq_aug + _K

    def _start(self) -> Outgoing:
        return [self._msg(MsgType.KEYS, h, 0, self._keys_parts(h)) for h in HOSTS]

    def _dispatch(self, msg: Message) -> Outgoing:
        t = msg.type
        if t == MsgType.KEYS:
            self._on_keys(msg)
            return []
        if t == MsgType.ROWS:
            return self._on_rows(msg)
        if t == MsgType.SHARE:
            self._on_share(msg)
            return self._maybe_begin()
        if t == MsgType.READY:
            if msg.seq != 0 or msg.parts:
                raise RemoteProtocolError("READY: bad layout")
            self.ready.add(msg.sender)
            return self._maybe_begin()
        if msg.seq != self.epoch:
            raise RemoteProtocolError(f"{t.name} for epoch {msg.seq}, expected {self.epoch}",
                                      status_hint=409)
        if t == MsgType.CROSS:
            return self._on_cross(msg)
        if t == MsgType.AGG:
            if msg.sender != Party.MEDIA or self.own_done or self.pending_agg is not None:
                raise RemoteProtocolError("AGG: unexpected", status_hint=409)
            # applied once both of this epoch's aggregates for the hosts have been sent
            self.pending_agg = self._decrypt_cross(
                self._vec(msg, 0, self.pub, self.dims(Party.GUEST) - 1))
            return self._maybe_next()
        if t == MsgType.VAL:
            return self._on_val(msg)
        raise RemoteProtocolError(f"unexpected {t.name}")  # pragma: no cover

    def _maybe_begin(self) -> Outgoing:
        if self.state == State.SETUP and self._setup_done() and self.ready == set(HOSTS):
            self.state = State.EPOCH
            return self._control(GO)
        return []

    def _control(self, action: int, best: int = 0) -> Outgoing:
        # CONTROL(t) opens epoch t; the final STOP carries the number of epochs run
        seq = self.epoch + 1 if action == STOP else self.epoch
        parts = [bytes([action]), best.to_bytes(4, "big")]
        return [self._msg(MsgType.CONTROL, h, seq, parts) for h in HOSTS]

    def _on_cross(self, msg: Message) -> Outgoing:
        if len(msg.parts) != 2:
            raise RemoteProtocolError("CROSS: bad layout")
        # D sends the term for M, M sends the term for D
        expected = Party.MEDIA if msg.sender == Party.DEALER else Party.DEALER
        if u8(msg.parts[0], "beneficiary") != expected or expected in self.sent_agg:
            raise RemoteProtocolError("CROSS: wrong beneficiary", status_hint=409)
        key = self._peer_key(expected)
        term = self._vec(msg, 1, key, self.row_dims(expected))
        own = self._term_for_p(expected)
        agg = own + term
        self.sent_agg.add(expected)
        return [self._msg(MsgType.AGG, expected, self.epoch, [to_bytes(agg, context=self._ctx(
            MsgType.AGG, expected, self.epoch, 0))])]

    def _on_val(self, msg: Message) -> Outgoing:
        if not self.config.is_check_epoch(self.epoch) or len(msg.parts) != 1:
            raise RemoteProtocolError("VAL: unexpected", status_hint=409)
        raw = msg.parts[0]
        if len(raw) != 8 * self.shape["n_val"]:
            raise RemoteProtocolError("VAL: wrong length")
        self.val[msg.sender] = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        return self._maybe_next()

    def _maybe_next(self) -> Outgoing:
        if self.sent_agg != set(HOSTS):
            return []
        if not self.own_done and self.pending_agg is not None:
            self._update(self.pending_agg, extra=-self.xy)
            self.pending_agg = None
            self.own_done = True
        if not self.own_done:
            return []
        check = self.config.is_check_epoch(self.epoch)
        if check and set(self.val) != set(HOSTS):
            return []
        assert self.report is not None
        stop = self.epoch + 1 >= self.config.max_epochs
        if check:
            c = self.config.check_index(self.epoch)
            with np.errstate(over="ignore"):
                total = self.val[Party.MEDIA] + self.val[Party.DEALER]
            hosts = fx.decode_scores(fx.from_u64(total))
            scores = self.xv @ self.w + hosts
            self.check_scores[c] = scores
            self.snapshots[c] = self.w.copy()
            self.report.check_epochs.append(self.epoch)
            self.report.check_auc.append(auc(self.yv, scores))
            best = int(np.nanargmax(self.report.check_auc)) if not all(
                np.isnan(self.report.check_auc)) else c
            self.report.best_check = best
            if c - best >= self.config.patience:
                stop = True
                self.report.stopped_early = True
            if c + 1 >= self.config.max_checks:
                stop = True
            self.val.clear()
        self.report.epochs = self.epoch + 1
        if stop:
            return self._finish()
        self.epoch += 1
        self.own_done = False
        self.sent_agg = set()
        return self._control(GO)

    def _finish(self) -> Outgoing:
        assert self.report is not None
        best = self.report.best_check
        if best < 0:
            raise LocalProtocolError("no validation check was made", status_hint=500)
        out = self._control(STOP, best)
        self.w = self.snapshots[best]
        scores = self.check_scores[best]
        self.report.validation_auc = auc(self.yv, scores)
        self.report.lift = lift_by_decile(self.yv, scores)
        self.report.platt = fit_platt(scores, self.yv)
        self.state = State.DONE
        return out


class TrainingHost(_Role):
    """A host (media platform or dealer): features only, no labels."""

    def __init__(self, party: Party, session_id: bytes, config: TrainingConfig,
                 train: FloatArray, val: FloatArray, *, shape: dict[str, int],
                 keys: tuple[PublicKey, PrivateKey] | None = None,
                 runner: DotRunner | None = None, jobs: int = 1) -> None:
        if party not in HOSTS:
            raise LocalProtocolError("a host is the media platform or the dealer")
        super().__init__(party, session_id, config, train, val, shape=shape, keys=keys,
                         intercept=False, runner=runner, jobs=jobs)
        self.other = Party.DEALER if party == Party.MEDIA else Party.MEDIA
        self._x25519 = X25519PrivateKey.generate()
        self.mask_seed: bytes | None = None
        self.control_epoch = -1
        self.pending_cross: dict[int, EncryptedVector] = {}
        self.sent_agg_epoch = -1
        self.pending_agg: FloatArray | None = None
        self.best_check = -1

    def _start(self) -> Outgoing:
        xpub = self._x25519.public_key().public_bytes_raw()
        out = [self._msg(MsgType.KEYS, Party.GUEST, 0, self._keys_parts(Party.GUEST)),
               self._msg(MsgType.KEYS, self.other, 0, self._keys_parts(self.other, xpub))]
        # row owner: media in both its pairs, dealer in (guest, dealer)
        for e, p in PAIRS:
            if p == self.party:
                out.append(self._rows_message(e))
        return out

    def _dispatch(self, msg: Message) -> Outgoing:
        t = msg.type
        out: Outgoing = []
        if t == MsgType.KEYS:
            xpub = self._on_keys(msg)
            if msg.sender == self.other:
                if len(xpub) != 32:
                    raise RemoteProtocolError("KEYS: bad X25519 key")
                shared = self._x25519.exchange(X25519PublicKey.from_public_bytes(xpub))
                self.mask_seed = HKDF(hashes.SHA256(), 32, self.session_id,
                                      b"cleanroom/vlr/val-mask/v1").derive(shared)
            elif xpub:
                raise RemoteProtocolError("KEYS: unexpected X25519 key")
        elif t == MsgType.ROWS:
            out = self._on_rows(msg)
        elif t == MsgType.MASKED:
            out = self._on_masked(msg)
        elif t == MsgType.SHARE:
            self._on_share(msg)
        elif t == MsgType.CONTROL:
            return self._on_control(msg)
        elif t == MsgType.CROSS:
            return self._on_cross(msg)
        elif t == MsgType.AGG:
            return self._on_agg(msg)
        if self.state == State.SETUP and self._setup_done() and self.mask_seed is not None:
            self.state = State.READY
            out.append(self._msg(MsgType.READY, Party.GUEST, 0, []))
        return out

    def _on_control(self, msg: Message) -> Outgoing:
        if msg.sender != Party.GUEST or len(msg.parts) != 2:
            raise RemoteProtocolError("CONTROL: bad layout")
        action, best = u8(msg.parts[0], "action"), u32(msg.parts[1], "best")
        if self.state != State.READY or msg.seq != self.control_epoch + 1:
            raise RemoteProtocolError("CONTROL out of turn", status_hint=409)
        if action == STOP:
            if best not in self.snapshots:
                raise RemoteProtocolError("CONTROL: unknown best check")
            self.w = self.snapshots[best]
            self.best_check = best
            self.state = State.DONE
            return []
        if action != GO:
            raise RemoteProtocolError("CONTROL: unknown action")
        if msg.seq >= self.config.max_epochs:
            raise RemoteProtocolError("CONTROL: beyond max_epochs", status_hint=409)
        self.control_epoch = self.epoch = msg.seq
        self.state = State.EPOCH
        out: Outgoing = []
        if self.party == Party.DEALER:
            for_g = self._term_for_e(Party.GUEST)
            for_m = self._term_for_p(Party.MEDIA)
            out.append(self._cross(Party.MEDIA, Party.GUEST, for_g))
            out.append(self._cross(Party.GUEST, Party.MEDIA, for_m))
        else:
            out.append(self._cross(Party.GUEST, Party.DEALER, self._term_for_e(Party.DEALER)))
            out.extend(self._maybe_agg())
        return out

    def _cross(self, to: Party, beneficiary: Party, term: EncryptedVector) -> tuple[Party,
                                                                                    bytes]:
        ctx = self._ctx(MsgType.CROSS, to, self.epoch, 1)
        return self._msg(MsgType.CROSS, to, self.epoch, [bytes([beneficiary]),
                                                         to_bytes(term, context=ctx)])

    def _on_cross(self, msg: Message) -> Outgoing:
        # only media receives CROSS (from the dealer: the dealer's term for the guest)
        if msg.sender != Party.DEALER or len(msg.parts) != 2 or msg.parts[0] != bytes(
                [Party.GUEST]):
            raise RemoteProtocolError("CROSS: bad layout")
        if msg.seq not in (self.control_epoch, self.control_epoch + 1):
            raise RemoteProtocolError("CROSS for another epoch", status_hint=409)
        self.pending_cross[msg.seq] = self._vec(msg, 1, self._peer_key(Party.GUEST),
                                                self.dims(Party.GUEST) - 1)
        return self._maybe_agg() if self.state == State.EPOCH else []

    def _maybe_agg(self) -> Outgoing:
        term = self.pending_cross.get(self.epoch)
        if term is None or self.sent_agg_epoch == self.epoch:
            return []
        del self.pending_cross[self.epoch]
        agg = self._term_for_e(Party.GUEST) + term
        self.sent_agg_epoch = self.epoch
        out = [self._msg(MsgType.AGG, Party.GUEST, self.epoch, [to_bytes(
            agg, context=self._ctx(MsgType.AGG, Party.GUEST, self.epoch, 0))])]
        return out + self._apply_agg()

    def _on_agg(self, msg: Message) -> Outgoing:
        if msg.sender != Party.GUEST or msg.seq != self.epoch or len(msg.parts) != 1:
            raise RemoteProtocolError("AGG: unexpected", status_hint=409)
        self.pending_agg = self._decrypt_cross(
            self._vec(msg, 0, self.pub, self.row_dims(self.party)))
        return self._apply_agg()

    def _apply_agg(self) -> Outgoing:
        # media applies its update only after it has sent its own aggregate for the guest
        if self.pending_agg is None or (self.party == Party.MEDIA
                                        and self.sent_agg_epoch != self.epoch):
            return []
        cross, self.pending_agg = self.pending_agg, None
        self._update(cross)
        self.state = State.READY
        if not self.config.is_check_epoch(self.epoch):
            return []
        c = self.config.check_index(self.epoch)
        self.snapshots[c] = self.w.copy()
        assert self.mask_seed is not None
        scores = fx.to_u64(fx.encode_scores(self.xv @ self.w))
        mask = fx.cancelling_mask(self.mask_seed, b"val/" + c.to_bytes(4, "big"),
                                  scores.size)
        with np.errstate(over="ignore"):
            masked = scores + mask if self.party == Party.MEDIA else scores - mask
        return [self._msg(MsgType.VAL, Party.GUEST, self.epoch,
                          [masked.astype(">u8").tobytes()])]


def session_shape(n_train: int, n_val: int, guest: int, media: int, dealer: int) -> dict[
        str, int]:
    """The public shape every party must agree on (row counts and feature counts)."""
    return {"n_train": n_train, "n_val": n_val, "guest": guest, "media": media,
            "dealer": dealer}
