"""The ``train_lead_model`` query type: vertical federated LR through the query lifecycle.

Three parties: the OEM (requester and receiver: labels, CRM features) and two hosts, the
media platform and the dealer (counterparties: behaviour and visit features). Each party
prepares its features at its own node (:mod:`parties.features`); the protocol is
:mod:`protocols.vertical_lr.training` (guest = OEM, hosts = media, dealer).

One session per host (protocol ``vlr``), kept open for the whole query:

1. PSI (intersection mode with record pseudonyms, as the ``match`` type): the OEM learns
   which of its labelled leads each host knows and the host's per-session pseudonym of
   the record; one-to-one resolution with the priority phone > email > device id.
2. ``ALIGN`` (OEM -> host): the training order (a fresh random permutation of the OEM's
   labelled leads; the first ``n_train`` rows train, the rest validate) as one pseudonym
   per row, all-zero for a lead the host does not know. The host thereby learns which of
   its records are among the OEM's leads (the intersection, revealed to the training
   participants only: ``params.reveal_counterparty_rows`` must be true, each host's
   policy must list the OEM in ``reveal_rows_to``, the OEM's policy must list each host;
   otherwise the query is refused or fails naming the rule). A lead the host does not
   know gets an all-zero raw feature row at that host (presence flags 0). Reply: the
   host's feature count.
3. ``START`` (OEM -> host): the agreed shape; reply: the host's relay handshake (an
   ephemeral X25519 key signed with its node's Ed25519 identity key).
4. ``BEGIN`` (OEM -> host): the other host's handshake; the host checks the signature
   against the other host's pinned key, derives the relay keys and starts its role.
5. ``BUNDLE`` both ways until the guest is done: frames of protocol messages. The
   lifecycle only lets the requester open sessions, so media <-> dealer messages are
   **relayed through the OEM, sealed end to end** (AES-256-GCM, one key per direction
   from the hosts' X25519 exchange, a strict counter as nonce: the OEM sees ciphertexts,
   their sizes and their order only; a tampered, replayed or reordered frame fails the
   query with a 4xx).

Each party stores its model slice (standardiser and weights; the OEM also Platt scaling
and the report) under ``<data_dir>/models/<query id>.json`` at its own node. The result,
at the OEM: validation AUC, lift by decile, epochs, checks, row counts.

What this module must not do: send a feature, label, identifier or partial score in the
clear (only protocol bytes and pseudonyms leave a node), log, or open sockets.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cleanroom.errors import CleanroomError
from cleanroom.node.context import NodeContext
from cleanroom.policy import QuerySpec
from cleanroom.policy.spec import InputSpec
from cleanroom.queries.framing import Framing
from cleanroom.queries.match import align_with, requester_items, responder_items
from cleanroom.queries.psi_session import PsiSessionResponder
from cleanroom.queries.runners import (
    CounterpartyRun,
    QueryFailure,
    RequesterRun,
    Runner,
    RunResult,
    SessionResponder,
    SpecRefused,
    protocol_session_id,
    register,
)
from cleanroom.queries.segment_stats import _kinds, _load
from parties import features as pf
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.psi import Mode, PsiResponder
from protocols.psi.multikey import LABEL_BYTES
from protocols.vertical_lr import (
    ModelSlice,
    Party,
    TrainingConfig,
    TrainingGuest,
    TrainingHost,
    session_shape,
)
from protocols.vertical_lr.fixedpoint import Standardizer

PROTOCOL = "vlr"
MODELS_SUBDIR = "models"
MAGIC = b"CRLM"
VERSION = 1
ALIGN, START, BEGIN, BUNDLE = 1, 2, 3, 4
FEATURES, HANDSHAKE = 11, 12
PLAIN, SEALED = 0, 1
_U32 = struct.Struct(">I")
HANDSHAKE_BYTES = 32 + 64
_NO_RECORD = bytes(LABEL_BYTES)
CONFIG_FIELDS = {f.name for f in fields(TrainingConfig)}
ROLE_NAME = {Party.GUEST: "guest", Party.MEDIA: "media", Party.DEALER: "dealer"}


def _rule(what: str) -> str:
    return f"spec.train_lead_model.{what}"


# --- framing ---------------------------------------------------------------------------


_FRAMING = Framing(MAGIC, VERSION, "vlr session", "lead-model")
frame = _FRAMING.frame
unframe = _FRAMING.unframe


def encode_bundle(items: Sequence[tuple[int, bytes]]) -> bytes:
    out = [_U32.pack(len(items))]
    for kind, body in items:
        out.append(bytes([kind]) + _U32.pack(len(body)) + body)
    return frame(BUNDLE, b"".join(out))


def decode_bundle(payload: bytes) -> list[tuple[int, bytes]]:
    if len(payload) < 4:
        raise RemoteProtocolError("bundle: truncated")
    (count,) = _U32.unpack_from(payload)
    pos, out = 4, []
    for _ in range(count):
        if pos + 5 > len(payload):
            raise RemoteProtocolError("bundle: truncated item header")
        kind = payload[pos]
        (n,) = _U32.unpack_from(payload, pos + 1)
        pos += 5
        if kind not in (PLAIN, SEALED) or pos + n > len(payload):
            raise RemoteProtocolError("bundle: bad item")
        out.append((kind, payload[pos:pos + n]))
        pos += n
    if pos != len(payload):
        raise RemoteProtocolError("bundle: trailing bytes")
    return out


# --- the end-to-end relay between the hosts --------------------------------------------


def _handshake_text(query_id: str, role: Party, pub: bytes) -> bytes:
    return b"cleanroom/vlr-relay/v1\0" + query_id.encode() + b"\0" + bytes([role]) + pub


class Relay:
    """AES-256-GCM between the two hosts, keyed by an X25519 exchange whose public keys
    are signed with the hosts' node identity keys (the relaying OEM cannot substitute
    them). One key and one strictly increasing counter per direction."""

    def __init__(self, query_id: str, me: Party) -> None:
        self.query_id = query_id
        self.me = me
        self.other = Party.DEALER if me == Party.MEDIA else Party.MEDIA
        self._priv = X25519PrivateKey.generate()
        self._send: AESGCM | None = None
        self._recv: AESGCM | None = None
        self.sent = 0
        self.received = 0

    def handshake(self, signing_key: Any) -> bytes:
        pub = self._priv.public_key().public_bytes_raw()
        sig: bytes = signing_key.sign(_handshake_text(self.query_id, self.me, pub))
        return pub + sig

    def accept(self, data: bytes, peer_key: Any) -> None:
        if len(data) != HANDSHAKE_BYTES:
            raise RemoteProtocolError("relay handshake: wrong length")
        pub, sig = data[:32], data[32:]
        try:
            peer_key.verify(sig, _handshake_text(self.query_id, self.other, pub))
        except InvalidSignature:
            raise RemoteProtocolError("relay handshake: bad signature (not the other host)",
                                      status_hint=403) from None
        shared = self._priv.exchange(X25519PublicKey.from_public_bytes(pub))
        salt = hashlib.sha256(b"cleanroom/vlr-relay/v1\0" + self.query_id.encode()).digest()

        def key(src: Party, dst: Party) -> AESGCM:
            info = f"cleanroom/vlr-relay/v1 {src.name}>{dst.name}".encode()
            return AESGCM(HKDF(hashes.SHA256(), 32, salt, info).derive(shared))

        self._send, self._recv = key(self.me, self.other), key(self.other, self.me)

    def seal(self, message: bytes) -> bytes:
        if self._send is None:
            raise LocalProtocolError("relay: no handshake yet")
        nonce = self.sent.to_bytes(12, "big")
        self.sent += 1
        return nonce + self._send.encrypt(nonce, message, bytes([self.me, self.other]))

    def open(self, data: bytes) -> bytes:
        if self._recv is None:
            raise RemoteProtocolError("relay: sealed frame before the handshake",
                                      status_hint=409)
        if len(data) < 12 + 16:
            raise RemoteProtocolError("relay: truncated sealed frame")
        nonce = data[:12]
        if int.from_bytes(nonce, "big") != self.received:
            raise RemoteProtocolError("relay: replayed or reordered frame", status_hint=409)
        try:
            out = self._recv.decrypt(nonce, data[12:], bytes([self.other, self.me]))
        except InvalidTag:
            raise RemoteProtocolError("relay: sealed frame failed authentication") from None
        self.received += 1
        return out


# --- models at rest ----------------------------------------------------------------------


def model_path(ctx: NodeContext, query_id: str) -> Path:
    if not query_id.replace("-", "").replace("_", "").isalnum():
        raise CleanroomError(f"not a query id: {query_id!r}")
    return ctx.data_dir / MODELS_SUBDIR / f"{query_id}.json"


def save_model(ctx: NodeContext, query_id: str, model: ModelSlice, columns: Sequence[str],
               extra: dict[str, Any]) -> Path:
    path = model_path(ctx, query_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": 1, "query_id": query_id, "party": ROLE_NAME[model.party],
           "columns": list(columns), "intercept": model.intercept,
           "mean": model.standardizer.mean.tolist(),
           "scale": model.standardizer.scale.tolist(),
           "weights": model.weights.tolist(), **extra}
    tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(doc, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_model(ctx: NodeContext, query_id: str) -> tuple[ModelSlice, dict[str, Any]]:
    path = model_path(ctx, query_id)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        party = {v: k for k, v in ROLE_NAME.items()}[doc["party"]]
        model = ModelSlice(party, Standardizer(np.asarray(doc["mean"], dtype=np.float64),
                                               np.asarray(doc["scale"], dtype=np.float64)),
                           np.asarray(doc["weights"], dtype=np.float64), bool(doc["intercept"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CleanroomError(f"no model of query {query_id} at this node ({exc})") from None
    return model, doc


# --- inputs ------------------------------------------------------------------------------


def _cols(item: InputSpec, use: str) -> list[str]:
    return [c for c, u in item.columns.items() if u == use]


def _party_kind(spec: QuerySpec, party: str) -> str:
    cols = [c for item in spec.inputs.get(party, []) for c in item.columns]
    try:
        return pf.detect(cols)
    except CleanroomError as exc:
        raise SpecRefused(_rule("features"), f"inputs.{party}", str(exc)) from None


def _load_party(ctx: NodeContext, spec: QuerySpec, party: str
                ) -> tuple[pd.DataFrame, list[str], pf.PartyFeatures, list[pd.DataFrame]]:
    """(identity frame, join columns, features aligned with the identity frame, frames)."""
    items = spec.inputs[party]
    frames = {n: _load(ctx, it.dataset, list(it.columns)) for n, it in enumerate(items)}
    ident_n = next(n for n, it in enumerate(items) if _cols(it, "join_key"))
    ident = frames[ident_n].reset_index(drop=True)
    join = _cols(items[ident_n], "join_key")
    kind = pf.detect([c for it in items for c in it.columns])
    try:
        if kind == "dealer":
            feats = pf.dealer_features(ident)
            ident = pd.DataFrame({join[0]: feats.keys})
        elif kind == "media":
            beh = next(f for f in frames.values() if "price_checks" in f.columns)
            feats = pf.media_features(ident, beh)
        else:
            crm = next(f for f in frames.values() if "previous_owner" in f.columns)
            feats = pf.oem_features(ident, crm)
    except CleanroomError as exc:
        raise QueryFailure("input_error", f"{party} features: {exc}") from None
    return ident, join, feats, list(frames.values())


def _config(spec: QuerySpec) -> TrainingConfig:
    raw = spec.params.options.get("training", {}) or {}
    cfg = TrainingConfig(**{k: v for k, v in raw.items() if k in CONFIG_FIELDS})
    cfg.validate()
    return cfg


def _val_fraction(spec: QuerySpec) -> float:
    return float(spec.params.options.get("validation_fraction", 0.2))


# --- the runner ----------------------------------------------------------------------------


class TrainLeadModelRunner(Runner):
    query_type = "train_lead_model"

    def validate(self, spec: QuerySpec, party: str) -> None:
        if spec.receiver != spec.requester:
            raise SpecRefused(_rule("receiver"), "receiver",
                              "training metrics go to the requester (the label holder)")
        if spec.params.psi_reveal != "intersection":
            raise SpecRefused(_rule("psi_reveal"), "params.psi_reveal",
                              "rows are aligned by PSI in intersection mode")
        if not spec.params.reveal_counterparty_rows:
            raise SpecRefused(_rule("reveal_counterparty_rows"),
                              "params.reveal_counterparty_rows",
                              "training aligns rows: the intersection is revealed to the "
                              "training participants, so reveal_counterparty_rows must be true "
                              "(and each host's reveal_rows_to must list the requester)")
        if len(spec.counterparties) != 2:
            raise SpecRefused(_rule("counterparties"), "counterparties",
                              "training runs with two hosts: the media platform and the dealer")
        kinds = {p: _party_kind(spec, p) for p in spec.parties}
        if kinds[spec.requester] != "oem" or sorted(
                kinds[p] for p in spec.counterparties) != ["dealer", "media"]:
            raise SpecRefused(_rule("features"), "inputs",
                              "the requester brings OEM leads/CRM features and labels, the "
                              "counterparties media behaviour and dealer activity")
        try:
            _config(spec)
        except (TypeError, LocalProtocolError) as exc:
            raise SpecRefused(_rule("training"), "params.options.training", str(exc)) from None
        vf = spec.params.options.get("validation_fraction", 0.2)
        if not isinstance(vf, int | float) or isinstance(vf, bool) or not 0.05 <= vf <= 0.5:
            raise SpecRefused(_rule("validation_fraction"), "params.options.validation_fraction",
                              "validation_fraction must lie in [0.05, 0.5]")
        items = spec.inputs.get(party, [])
        if not any(_cols(i, "join_key") for i in items):
            raise SpecRefused(_rule("join_key"), f"inputs.{party}",
                              f"{party} must name at least one join_key column")
        if party == spec.requester and not any(_cols(i, "label") for i in items):
            raise SpecRefused(_rule("label"), f"inputs.{party}",
                              "the requester must name its label column")
        if party != spec.requester and any(_cols(i, "label") for i in items):
            raise SpecRefused(_rule("label"), f"inputs.{party}", "labels live at the requester")

    # --- requester -----------------------------------------------------------------------

    def run(self, run: RequesterRun) -> RunResult:
        spec, ctx = run.spec, run.ctx
        for host in spec.counterparties:
            rule = run.policy.partners.get(host)
            if rule is None or host not in rule.reveal_rows_to:
                raise QueryFailure(
                    "policy", f"training reveals which of our leads {host} knows to {host}; "
                    f"our policy does not list {host} in reveal_rows_to",
                    rule=f"{run.me}:partners.{host}.reveal_rows_to",
                    field="params.reveal_counterparty_rows", party=run.me)
        roles = {p: Party.MEDIA if _party_kind(spec, p) == "media" else Party.DEALER
                 for p in spec.counterparties}
        ident, join, feats, frames = _load_party(ctx, spec, run.me)
        label_col = next(c for it in spec.inputs[run.me] for c in _cols(it, "label"))
        label_frame = next(f for f in frames if label_col in f.columns)
        try:
            labels = pf.oem_labels(ident, label_frame, label=label_col)
        except CleanroomError as exc:
            raise QueryFailure("input_error", f"labels: {exc}") from None
        key_pos = {k: i for i, k in enumerate(feats.keys)}
        labelled = np.asarray([key_pos[k] for k in labels.index], dtype=np.int64)
        order = labelled[np.random.default_rng(secrets.randbits(64)).permutation(len(labelled))]
        n = len(order)
        n_val = max(1, round(n * _val_fraction(spec)))
        n_train = n - n_val
        y_by_row = np.zeros(len(feats.keys))
        y_by_row[labelled] = labels.to_numpy(dtype=np.float64)
        kinds = _kinds(ctx, [it for it in spec.inputs[run.me] if _cols(it, "join_key")],
                       "join_key")
        sub = ident.iloc[order].reset_index(drop=True)
        items, origins = requester_items(sub, join, kinds)
        cfg = _config(spec)
        sid = protocol_session_id(run.query_id, "train")
        with run.session(spec.counterparties[0], PROTOCOL) as ch0, \
                run.session(spec.counterparties[1], PROTOCOL) as ch1:
            channels = {spec.counterparties[0]: ch0, spec.counterparties[1]: ch1}
            matched: dict[str, int] = {}
            dims: dict[str, int] = {}
            for host, ch in channels.items():
                resolution = align_with(run, host, ch, items, origins)
                matched[host] = len(resolution.pairs)
                pseud = b"".join(resolution.pairs[i][0] if i in resolution.pairs else _NO_RECORD
                                 for i in range(n))
                reply = ch.exchange(frame(ALIGN, struct.pack(">II", n_train, n_val) + pseud),
                                    round="align")
                kind, body = unframe(reply)
                if kind != FEATURES or len(body) != 4:
                    raise QueryFailure("protocol_error", f"{host}: bad ALIGN reply")
                dims[ROLE_NAME[roles[host]]] = _U32.unpack(body)[0]
            shape = session_shape(n_train, n_val, len(feats.columns), dims["media"],
                                  dims["dealer"])
            hs: dict[str, bytes] = {}
            for host, ch in channels.items():
                kind, body = unframe(ch.exchange(frame(START, json.dumps(shape).encode()),
                                                 round="start"))
                if kind != HANDSHAKE:
                    raise QueryFailure("protocol_error", f"{host}: bad START reply")
                hs[host] = body
            x = feats.values[order]
            yy = y_by_row[order]
            guest = TrainingGuest(sid, cfg, x[:n_train], yy[:n_train], x[n_train:],
                                  yy[n_train:], shape=shape)
            party_of = {roles[h]: h for h in channels}
            queues: dict[str, list[tuple[int, bytes]]] = {h: [] for h in channels}

            def route(out: list[tuple[Party, bytes]]) -> None:
                for to, msg in out:
                    queues[party_of[to]].append((PLAIN, msg))

            route(guest.start())
            replies: dict[str, bytes] = {}
            for host, ch in channels.items():
                other = next(h for h in channels if h != host)
                replies[host] = ch.exchange(frame(BEGIN, hs[other]), round="begin")
            pending = dict(replies)
            while True:
                run.check_alive()
                for host, reply in pending.items():
                    kind, body = unframe(reply)
                    if kind != BUNDLE:
                        raise QueryFailure("protocol_error", f"{host}: expected a bundle")
                    other = next(h for h in channels if h != host)
                    for k, msg in decode_bundle(body):
                        if k == PLAIN:
                            route(guest.handle(msg))
                        else:
                            queues[other].append((SEALED, msg))
                pending = {}
                busy = [h for h in channels if queues[h]]
                if not busy:
                    break
                for host in busy:
                    batch, queues[host] = queues[host], []
                    pending[host] = channels[host].exchange(encode_bundle(batch),
                                                            round="bundle")
            if not guest.finished:
                raise QueryFailure("protocol_error", "training stalled before the guest was done")
        report = guest.report
        assert report is not None
        doc = {"type": "train_lead_model", "model_id": run.query_id,
               "rows": {"train": n_train, "validation": n_val, "labelled_leads": n},
               "matched": matched,
               "features": {"oem": len(feats.columns), **{h: dims[ROLE_NAME[roles[h]]]
                                                          for h in channels}},
               "unmatched_rows": "zero raw features at the host that does not know the lead",
               "validation_auc": report.validation_auc, "lift_by_decile": report.lift,
               "epochs": report.epochs, "best_check": report.best_check,
               "check_epochs": report.check_epochs, "check_auc": report.check_auc,
               "stopped_early": report.stopped_early, "platt": list(report.platt),
               "config": asdict(cfg)}
        save_model(ctx, run.query_id, guest.model(), feats.columns,
                   {"platt": list(report.platt), "report": doc,
                    "hosts": {h: ROLE_NAME[roles[h]] for h in channels}})
        return RunResult(doc, rows=len(report.lift))

    # --- counterparty --------------------------------------------------------------------

    def open_responder(self, run: CounterpartyRun, session_id: str, protocol: str,
                       peer: str) -> SessionResponder:
        if protocol != PROTOCOL:
            raise QueryFailure("bad_protocol", f"train_lead_model runs {PROTOCOL}")
        return _HostResponder(run, session_id)


class _HostResponder:
    """A host's end of the ``vlr`` session: PSI, then ALIGN, START, BEGIN and bundles."""

    def __init__(self, run: CounterpartyRun, session_id: str) -> None:
        spec = run.spec
        self.run = run
        self.role_party = Party.MEDIA if _party_kind(spec, run.me) == "media" else Party.DEALER
        self.other_name = next(p for p in spec.counterparties if p != run.me)
        ident, join, feats, _ = _load_party(run.ctx, spec, run.me)
        kinds = ({join[0]: "phone"} if self.role_party == Party.DEALER else
                 _kinds(run.ctx, [it for it in spec.inputs[run.me] if _cols(it, "join_key")],
                        "join_key"))
        items, labels = responder_items(ident, join, kinds)  # type: ignore[arg-type]
        self.record_of = {labels[i * len(join)]: i for i in range(len(ident))}
        self.feats = feats
        rule = run.policy.partners.get(spec.requester)
        modes = frozenset(Mode.INTERSECTION for m in (rule.psi_reveal if rule else [])
                          if m == "intersection")
        self.psi = PsiSessionResponder(PsiResponder(
            items, labels=labels, allowed_modes=modes,
            expected_session_id=protocol_session_id(run.query_id, session_id)))
        self.x: np.ndarray | None = None
        self.n_train = 0
        self.shape: dict[str, int] | None = None
        self.relay = Relay(run.query_id, self.role_party)
        self.role: TrainingHost | None = None
        self.done = False

    @property
    def finished(self) -> bool:
        return self.done

    def handle(self, message: bytes) -> bytes:
        if not self.psi.finished:
            return self.psi.handle(message)
        kind, body = unframe(message)
        if kind == ALIGN and self.x is None:
            return self._align(body)
        if kind == START and self.x is not None and self.shape is None:
            shape = json.loads(body)
            if not isinstance(shape, dict) or shape.get(ROLE_NAME[self.role_party]) != len(
                    self.feats.columns) or shape.get("n_train") != self.n_train:
                raise RemoteProtocolError("START: the shape does not match this host")
            self.shape = {k: int(v) for k, v in shape.items()}
            return frame(HANDSHAKE, self.relay.handshake(self.run.ctx.identity.signing_key()))
        if kind == BEGIN and self.shape is not None and self.role is None:
            self.relay.accept(body, self.run.ctx.peer_public_key(self.other_name))
            assert self.x is not None
            cfg = _config(self.run.spec)
            self.role = TrainingHost(self.role_party, protocol_session_id(
                self.run.query_id, "train"), cfg, self.x[:self.n_train], self.x[self.n_train:],
                shape=self.shape)
            return self._bundle(self.role.start())
        if kind == BUNDLE and self.role is not None and not self.done:
            out: list[tuple[Party, bytes]] = []
            for k, msg in decode_bundle(body):
                out.extend(self.role.handle(msg if k == PLAIN else self.relay.open(msg)))
            reply = self._bundle(out)
            if self.role.finished:
                save_model(self.run.ctx, self.run.query_id, self.role.model(),
                           self.feats.columns, {"requester": self.run.spec.requester,
                                                "best_check": self.role.best_check})
                self.done = True
            return reply
        raise RemoteProtocolError("vlr session: message out of turn", status_hint=409)

    def _align(self, body: bytes) -> bytes:
        if len(body) < 8:
            raise RemoteProtocolError("ALIGN: truncated")
        n_train, n_val = struct.unpack_from(">II", body)
        rows = body[8:]
        n = n_train + n_val
        if n_train < 1 or n_val < 1 or len(rows) != n * LABEL_BYTES:
            raise RemoteProtocolError("ALIGN: wrong length")
        x = np.zeros((n, len(self.feats.columns)))
        seen: set[int] = set()
        for i in range(n):
            tag = rows[i * LABEL_BYTES:(i + 1) * LABEL_BYTES]
            if tag == _NO_RECORD:
                continue
            rec = self.record_of.get(tag)
            if rec is None or rec in seen:
                raise RemoteProtocolError("ALIGN: unknown or repeated record pseudonym")
            seen.add(rec)
            x[i] = self.feats.values[rec]
        self.x, self.n_train = x, int(n_train)
        return frame(FEATURES, _U32.pack(len(self.feats.columns)))

    def _bundle(self, out: list[tuple[Party, bytes]]) -> bytes:
        items: list[tuple[int, bytes]] = []
        for to, msg in out:
            items.append((PLAIN, msg) if to == Party.GUEST else (SEALED, self.relay.seal(msg)))
        return encode_bundle(items)


register(TrainLeadModelRunner())
