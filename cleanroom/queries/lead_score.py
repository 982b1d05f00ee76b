"""The ``lead_score`` query type: grade the OEM's leads with a trained ``train_lead_model``.

Three parties, as in training: the OEM (requester and receiver: leads, CRM features, its
model slice with the intercept and Platt calibration) and two hosts, the media platform and
the dealer (their own slices). ``params.options``:

- ``model`` (required): the id of a ``train_lead_model`` query. Every party checks that this
  query *completed at its own node*, between the same parties, and loads its own slice from
  ``<data_dir>/models/<model>.json`` (:func:`cleanroom.queries.lead_model.load_model`);
  otherwise the query fails naming ``params.options.model``.
- ``mode``: ``"strict"`` (default) or ``"standard"``.
- ``thresholds``: probabilities for grades A/B/C (default 0.30 / 0.15 / 0.05; below C is D).
- ``adaptive`` (strict only, default false): two blinded comparisons per lead instead of
  three.
- ``subset``: ``"all"`` leads of the OEM's input (default), ``"unlabelled"`` (leads not
  listed in the OEM's input that names only a ``row_id`` column, e.g. ``labels.lead_id``:
  the new leads) or ``"labelled"`` (the listed ones). Labels are never read.
- ``include_probability`` (standard only, default false): add the calibrated probability to
  the result table.
- ``tables`` (standard only): ``{host: table name}`` of the hosts' ``partial_scores``
  tables (default ``partial_scores`` at each).

Strict mode (the media platform is the Paillier key holder): one session per host
(protocol ``lsc``), opened by the OEM. First a multi-key PSI in intersection mode with
per-session record pseudonyms (as ``match`` and ``train_lead_model``): the OEM learns which
of its leads each host knows and the host's pseudonym of the record. Then:

1. ``SETUP`` -> media: the media platform makes a fresh 2048-bit Paillier key for this query
   and replies with the public key signed by its node identity key (Ed25519).
2. ``SETUP`` -> dealer, carrying that signed key; the dealer checks the signature against the
   media platform's pinned identity key (the relaying OEM cannot substitute its own key).
3. ``TABLE`` chunks from each host: the host's partial score of **every one of its records**
   (not only the matched ones: a host is never told which of its records are leads), each a
   fresh Paillier ciphertext under the media key, keyed by the record's session pseudonym,
   plus one ciphertext of the score of an all-zero feature row (for leads the host does not
   know). The dealer's ciphertexts go to the OEM directly; they are under the media key, so
   the OEM cannot read them, and the media platform never sees them unblinded: it only ever
   receives the OEM's blinded, packed, re-randomised comparisons.
4. ``GRADE``: the OEM multiplies the two hosts' ciphertexts per lead, adds its own score and
   runs :class:`~protocols.vertical_lr.scoring.StrictGrader` against the media platform's
   :class:`~protocols.vertical_lr.scoring.StrictKeyHolder` in batches; it learns the grade
   only. ``DONE`` ends the media session.

Standard mode (the anonymous query, :mod:`cleanroom.anonq`): no ``lsc`` session. Each host
has published beforehand, from this model, a labeled table of kind ``partial_scores``
(:func:`partial_score_records`, ``POST /v1/anonq/tables/{name}/publish`` with
``{"kind": "partial_scores", "model": <training query id>}``): for every one of its users
the 9-byte label :func:`~protocols.vertical_lr.scoring.encode_partial_label` of the user's
partial score, keyed by every identifier of the user, plus one reserved entry
(:data:`cleanroom.anonq.tables.ZERO_ROW_ITEM`) holding the partial score of an all-zero
feature row. The OEM opens ``labeled_psi`` sessions through the lifecycle (as
``store_recommendation`` does): a download of the host's table (or a delta onto its cached
copy), then batch evaluations of its leads' identifiers and the zero-row item, blinded.
Per lead it takes the label of its highest-priority identifier that hit (phone > email >
device id, the priority of multi-key matching; first hit wins), the zero-row score if
none did, and combines and calibrates (:func:`combine_standard`). The OEM learns each
host's partial score of each matched lead; a host learns the number of evaluations and
which table version was downloaded, not which of its users are leads, so standard mode
needs neither ``params.reveal_counterparty_rows`` nor ``reveal_rows_to``. The host
refuses (naming the field) a table that is missing, of another kind, built from another
model or from datasets other than (or older than) the ones the spec names.

The result at the OEM: a table ``lead_id, grade`` (``probability`` too in standard mode if
asked) under ``<data_dir>/lead_scores/<query id>.parquet`` with a JSON manifest; the payload
holds its path, the grade distribution and counts.

What this module must not do: send a feature, identifier or partial score in the clear
(strict: only protocol bytes, pseudonyms and ciphertexts leave a node; standard: only
blinded points, table bytes and encrypted labels), log, or open sockets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cryptography.exceptions import InvalidSignature

from cleanroom.anonq import lifecycle, tables
from cleanroom.errors import CleanroomError, InputError
from cleanroom.node.context import NodeContext
from cleanroom.node.datasets import dataset_summary
from cleanroom.policy import QuerySpec
from cleanroom.queries import anonq_sessions
from cleanroom.queries.framing import Framing
from cleanroom.queries.lead_model import (
    _cols,
    _load_party,
    _party_kind,
    load_model,
)
from cleanroom.queries.match import (
    align_with,
    requester_items,
    require_min_intersection,
    responder_items,
)
from cleanroom.queries.psi_session import (
    PsiSessionResponder,
    worker_pool,
)
from cleanroom.queries.runners import (
    CounterpartyRun,
    QueryFailure,
    RequesterRun,
    Runner,
    RunResult,
    SessionChannel,
    SessionResponder,
    SpecRefused,
    protocol_session_id,
    register,
)
from cleanroom.queries.segment_stats import _kinds
from cleanroom.queries.store import find_query, spec_of
from parties import features as pf
from parties.labels import PARTIAL_SCORE_LABEL_SIZE
from protocols.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from protocols.labeled_psi import Mode as AnonqMode
from protocols.paillier import (
    PaillierError,
    PublicKey,
    generate_keypair,
    load_public_key,
    to_bytes,
)
from protocols.psi import Mode, PsiResponder
from protocols.psi.multikey import LABEL_BYTES, PRIORITY, Kind, encode_item
from protocols.vertical_lr import (
    GradeSpec,
    ModelSlice,
    Party,
    StrictGrader,
    StrictKeyHolder,
    combine_standard,
    decode_partial_label,
    encode_partial_label,
    encrypt_partial_labels,
)
from protocols.vertical_lr.blinding import BlindJob, run_blind_job
from protocols.vertical_lr.scoring import load_partial_label

PROTOCOL = "lsc"
ANONQ_PROTOCOL = anonq_sessions.PROTOCOL  # standard mode: lifecycle labeled-PSI sessions
MAGIC = b"CRLS"
VERSION = 1
SETUP, READY, TABLE, ROWS, GRADE, SIGNS, DONE = range(1, 8)  # 8 and 9 (ALIGN, PARTIALS): retired
_U32 = struct.Struct(">I")
SIG_BYTES = 64
TABLE_CHUNK = 4096
BATCH_LEADS = 1000
MODES = ("strict", "standard")
SUBSETS = ("all", "unlabelled", "labelled")
RESULT_DIR = "lead_scores"
_QUERY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_MODEL_FIELD = "params.options.model"
MODEL_OUTCOME_WAIT_SECONDS = 30.0
DEFAULT_TABLE = "partial_scores"
PARTIAL_LABEL_SIZE = PARTIAL_SCORE_LABEL_SIZE  # encode_partial_label: version + 64-bit word


def _rule(what: str) -> str:
    return f"spec.lead_score.{what}"


# --- framing -----------------------------------------------------------------------------


_FRAMING = Framing(MAGIC, VERSION, "lsc session", "lead-score")
frame = _FRAMING.frame
unframe = _FRAMING.unframe


def _key_text(query_id: str, pub: bytes) -> bytes:
    return b"cleanroom/lead-score/key-holder/v1\0" + query_id.encode() + b"\0" + pub


def encode_key_blob(query_id: str, pub: PublicKey, signing_key: Any) -> bytes:
    """The key holder's Paillier public key, signed with its node identity key."""
    raw = to_bytes(pub)
    return _U32.pack(len(raw)) + raw + signing_key.sign(_key_text(query_id, raw))


def decode_key_blob(query_id: str, blob: bytes, holder_key: Any) -> PublicKey:
    """Check the signature against the key holder's pinned identity key; the public key."""
    if len(blob) < 4:
        raise RemoteProtocolError("key-holder key: truncated")
    (n,) = _U32.unpack_from(blob)
    if len(blob) != 4 + n + SIG_BYTES:
        raise RemoteProtocolError("key-holder key: wrong length")
    raw, sig = blob[4:4 + n], blob[4 + n:]
    try:
        holder_key.verify(sig, _key_text(query_id, raw))
    except InvalidSignature:
        raise RemoteProtocolError("key-holder key: bad signature (not the media platform's "
                                  "key for this query)", status_hint=403) from None
    try:
        return load_public_key(raw)
    except (ProtocolError, PaillierError, ValueError) as exc:
        raise RemoteProtocolError(f"key-holder key: {exc}") from None


# --- options -----------------------------------------------------------------------------


def _opt(spec: QuerySpec, name: str, default: Any) -> Any:
    return spec.params.options.get(name, default)


def _mode(spec: QuerySpec) -> str:
    return str(_opt(spec, "mode", "strict"))


def _grade_spec(spec: QuerySpec) -> GradeSpec:
    raw = _opt(spec, "thresholds", None)
    if raw is None:
        return GradeSpec()
    if not isinstance(raw, list | tuple) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
        raise LocalProtocolError("thresholds must be a list of three probabilities")
    return GradeSpec(tuple(float(v) for v in raw))  # type: ignore[arg-type]


def _model_id(spec: QuerySpec) -> str:
    return str(_opt(spec, "model", ""))


# --- models --------------------------------------------------------------------------------


def _model_failure(me: str, why: str) -> QueryFailure:
    return QueryFailure("model_unavailable", f"{_MODEL_FIELD}: {why} (at {me})",
                        field=_MODEL_FIELD, party=me)


def _model_row(ctx: NodeContext, spec: QuerySpec, me: str) -> None:
    """``params.options.model`` completed at this node, between the same parties."""
    mid = _model_id(spec)
    row = find_query(ctx, mid)
    if row is None or row.query_type != "train_lead_model":
        raise _model_failure(me, f"no train_lead_model query {mid} at this node")
    # The requester marks training completed first; a counterparty learns it from the
    # outcome message a moment later. Wait for that outcome briefly rather than refusing.
    deadline = time.monotonic() + MODEL_OUTCOME_WAIT_SECONDS
    while row is not None and row.state == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        row = find_query(ctx, mid)
    if row is None or row.state != "completed":
        state = "gone" if row is None else row.state
        raise _model_failure(me, f"training query {mid} is {state}, not completed")
    mspec = spec_of(row)
    if mspec.requester != spec.requester or sorted(mspec.counterparties) != sorted(
            spec.counterparties):
        raise _model_failure(me, f"model {mid} was trained by other parties")


def load_own_slice(ctx: NodeContext, spec: QuerySpec, me: str,
                   columns: Sequence[str]) -> tuple[ModelSlice, dict[str, Any]]:
    """This node's slice of ``params.options.model``: the training query must have completed
    here, between the same parties, and its stored columns must be this node's columns."""
    mid = _model_id(spec)
    _model_row(ctx, spec, me)
    try:
        model, doc = load_model(ctx, mid)
    except CleanroomError as exc:
        raise _model_failure(me, str(exc)) from None
    if list(doc.get("columns", [])) != list(columns):
        raise _model_failure(me, f"model {mid} was trained on other feature columns")
    return model, doc


# --- the hosts' partial_scores tables (standard mode) ---------------------------------------


class ModelUnavailable(CleanroomError):
    """A ``partial_scores`` table cannot be published from the named model: names the
    publish-spec field (``model``) and carries the HTTP status the endpoint answers with."""

    def __init__(self, message: str, *, status: int = 409, field: str = "model") -> None:
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field


def _record_ref(key: str) -> str:
    """A stable reference of one host record for the table's private user index (a digest,
    so the index holds no identifier even though it never leaves the node)."""
    return "r:" + hashlib.sha256(b"cleanroom/partial-scores/ref\0" + key.encode()).hexdigest()[:32]


def _host_kinds(ctx: NodeContext, spec: QuerySpec, me: str, join: list[str]) -> dict[str, Kind]:
    if _party_kind(spec, me) == "dealer":
        return {join[0]: "phone"}  # the dealer's features are keyed by phone (dealer_features)
    return _kinds(ctx, [it for it in spec.inputs[me] if _cols(it, "join_key")], "join_key")


def partial_score_records(ctx: NodeContext, model: str
                          ) -> tuple[dict[str, tables.UserRecord], dict[str, str]]:
    """A host's ``partial_scores`` table content from its slice of training query ``model``:
    ``(records, sources)`` for :func:`cleanroom.anonq.tables.publish`.

    Every record of the host's inputs in the training spec (current dataset versions) gets
    the label :func:`encode_partial_label` of its partial score, keyed by each of its
    identifiers (join-key columns; an identifier shared by records belongs to the first);
    the reserved zero-row entry holds the score of an all-zero feature row. ``sources``
    names the datasets and versions, the model and the join-key columns. Raises
    :class:`ModelUnavailable` (404: no such training query here; 409: not completed, or
    this node holds no host slice of it) or :class:`InputError`.
    """
    if not _QUERY_ID.fullmatch(model):
        raise ModelUnavailable(f"{model!r} is not a query id", status=422)
    row = find_query(ctx, model)
    if row is None or row.query_type != "train_lead_model":
        raise ModelUnavailable(f"no train_lead_model query {model} at this node", status=404)
    if row.state != "completed":
        raise ModelUnavailable(f"training query {model} is {row.state}, not completed at this "
                               "node")
    mspec = spec_of(row)
    me = ctx.config.name
    if me not in mspec.counterparties:
        raise ModelUnavailable(f"this node ({me}) is not a host of model {model}: only the "
                               "media platform and the dealer publish partial scores")
    try:
        ident, join, feats, _ = _load_party(ctx, mspec, me)
        kinds = _host_kinds(ctx, mspec, me, join)
    except QueryFailure as exc:
        raise InputError(f"partial scores of model {model}: {exc}") from None
    try:
        slice_, doc = load_model(ctx, model)
    except CleanroomError as exc:
        raise ModelUnavailable(str(exc)) from None
    if list(doc.get("columns", [])) != list(feats.columns):
        raise ModelUnavailable(f"model {model} was trained on other feature columns than "
                               "this node's datasets now give")
    scores = slice_.partial_scores(feats.values)
    zero = float(slice_.partial_scores(np.zeros((1, len(feats.columns))))[0])
    if not np.isfinite(scores).all() or not np.isfinite(zero):
        raise InputError(f"partial scores of model {model}: not finite")
    columns = [ident[c].to_numpy(dtype=object) for c in join]
    items: list[list[bytes]] = []
    for i in range(len(ident)):
        own: list[bytes] = []
        for c, values in zip(join, columns, strict=True):
            value = values[i]
            if value is None or value is pd.NA or value != value or not str(value):
                continue
            own.append(encode_item(kinds[c], str(value)))
        items.append(own)
    labels = [encode_partial_label(float(v)) for v in scores]
    refs = [_record_ref(str(k)) for k in feats.keys]
    records = tables.partial_score_users(items, labels, refs, encode_partial_label(zero))
    sources = {f"dataset:{it.dataset}": str(dataset_summary(ctx, it.dataset).version)
               for it in mspec.inputs[me]}
    sources.update({"model": model, "join_keys": ",".join(join)})
    return records, sources


def table_name(spec: QuerySpec, host: str) -> str:
    names = _opt(spec, "tables", None) or {}
    return str(names.get(host, DEFAULT_TABLE))


def _check_table_sources(ctx: NodeContext, spec: QuerySpec, me: str, name: str,
                         sources: dict[str, str]) -> None:
    """The table must hold this model's scores, from the current versions of exactly the
    datasets the spec names for this host, keyed only by columns the spec names as join
    keys (what the host approved is what is used)."""
    mid = _model_id(spec)
    built_from = sources.get("model")
    if built_from != mid:
        raise QueryFailure("wrong_table",
                           f"table {name!r} at {me} holds the partial scores of model "
                           f"{built_from}, not {mid}: publish it again naming model {mid}",
                           field=_MODEL_FIELD, party=me)
    items = spec.inputs.get(me, [])
    named = {it.dataset for it in items}
    built = {k.split(":", 1)[1] for k in sources if k.startswith("dataset:")}
    extra = sorted(built - named)
    if extra:
        raise QueryFailure("wrong_table", f"table {name!r} at {me} was built from dataset "
                           f"{extra[0]} too, which the spec does not name",
                           field=f"inputs.{me}", party=me)
    for n, item in enumerate(items):
        field = f"inputs.{me}.{n}.dataset"
        version = sources.get(f"dataset:{item.dataset}")
        if version is None:
            raise QueryFailure("wrong_table", f"table {name!r} at {me} was not built from "
                               f"dataset {item.dataset}", field=field, party=me)
        try:
            current = str(dataset_summary(ctx, item.dataset).version)
        except CleanroomError as exc:
            raise QueryFailure("input_error", str(exc), field=field, party=me) from None
        if version != current:
            raise QueryFailure("stale_table",
                               f"table {name!r} at {me} was built from version {version} of "
                               f"{item.dataset}; version {current} is current: publish the "
                               "table again", field=field, party=me)
    keys = [c for c in sources.get("join_keys", "").split(",") if c]
    for column in keys:
        at = next((k for k, it in enumerate(items) if column in it.columns), None)
        if at is None or items[at].columns[column] != "join_key":
            where = f"inputs.{me}" if at is None else f"inputs.{me}.{at}.columns.{column}"
            raise QueryFailure("unapproved_column",
                               f"table {name!r} at {me} is keyed by {column} too; the spec "
                               "must name it as join_key", field=where, party=me)


# --- result storage ------------------------------------------------------------------------


def result_paths(ctx: NodeContext, query_id: str) -> tuple[Path, Path]:
    if not _QUERY_ID.fullmatch(query_id):
        raise CleanroomError(f"not a query id: {query_id!r}")
    base = ctx.data_dir / RESULT_DIR
    return base / f"{query_id}.parquet", base / f"{query_id}.json"


def _write_result(ctx: NodeContext, query_id: str, table: pd.DataFrame,
                  manifest: dict[str, Any]) -> Path:
    rows_path, manifest_path = result_paths(ctx, query_id)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_rows = rows_path.with_suffix(".parquet.tmp")
    tmp_manifest = manifest_path.with_suffix(".json.tmp")
    table.to_parquet(tmp_rows, index=False)
    tmp_manifest.write_text(json.dumps(manifest, sort_keys=True, indent=1), encoding="utf-8")
    os.replace(tmp_rows, rows_path)
    os.replace(tmp_manifest, manifest_path)  # the manifest last: it marks the table complete
    return rows_path


def _subset_item(spec: QuerySpec) -> int | None:
    """The requester's input naming the labelled leads: one ``row_id`` column, nothing else
    (only its lead ids are read; labels are never used for grading)."""
    for n, item in enumerate(spec.inputs.get(spec.requester, [])):
        if len(item.columns) == 1 and _cols(item, "row_id"):
            return n
    return None


# --- the runner ----------------------------------------------------------------------------


class LeadScoreRunner(Runner):
    query_type = "lead_score"

    def validate(self, spec: QuerySpec, party: str) -> None:
        if spec.receiver != spec.requester:
            raise SpecRefused(_rule("receiver"), "receiver",
                              "grades go to the requester (the OEM that owns the leads)")
        if spec.params.psi_reveal != "intersection":
            raise SpecRefused(_rule("psi_reveal"), "params.psi_reveal",
                              "the OEM gets a result per lead (strict: leads aligned by PSI in "
                              "intersection mode; standard: per-lead lookups)")
        if not _QUERY_ID.fullmatch(_model_id(spec)):
            raise SpecRefused(_rule("model"), _MODEL_FIELD,
                              "params.options.model must name a train_lead_model query id")
        mode = _mode(spec)
        if mode not in MODES:
            raise SpecRefused(_rule("mode"), "params.options.mode",
                              "mode must be 'strict' or 'standard'")
        names = _opt(spec, "tables", None)
        if names is not None:
            if mode != "standard":
                raise SpecRefused(_rule("tables"), "params.options.tables",
                                  "tables (standard mode only) maps a host to the name of its "
                                  "partial_scores table")
            anonq_sessions.check_table_names(names, spec.counterparties, _rule("tables"))
        adaptive = _opt(spec, "adaptive", False)
        if not isinstance(adaptive, bool) or (adaptive and mode != "strict"):
            raise SpecRefused(_rule("adaptive"), "params.options.adaptive",
                              "adaptive is a boolean and applies to strict mode only")
        prob = _opt(spec, "include_probability", False)
        if not isinstance(prob, bool) or (prob and mode != "standard"):
            raise SpecRefused(_rule("include_probability"),
                              "params.options.include_probability",
                              "probabilities can be released in standard mode only (strict "
                              "mode reveals the grade and nothing else)")
        if _opt(spec, "subset", "all") not in SUBSETS:
            raise SpecRefused(_rule("subset"), "params.options.subset",
                              f"subset must be one of {', '.join(SUBSETS)}")
        try:
            _grade_spec(spec)
        except (LocalProtocolError, TypeError) as exc:
            raise SpecRefused(_rule("thresholds"), "params.options.thresholds",
                              str(exc)) from None
        if len(spec.counterparties) != 2:
            raise SpecRefused(_rule("counterparties"), "counterparties",
                              "grading runs with the two training hosts: media and dealer")
        kinds = {p: _party_kind(spec, p) for p in spec.parties}
        if kinds[spec.requester] != "oem" or sorted(
                kinds[p] for p in spec.counterparties) != ["dealer", "media"]:
            raise SpecRefused(_rule("features"), "inputs",
                              "the requester brings OEM leads/CRM features, the counterparties "
                              "media behaviour and dealer activity")
        items = spec.inputs.get(party, [])
        if not any(_cols(i, "join_key") for i in items):
            raise SpecRefused(_rule("join_key"), f"inputs.{party}",
                              f"{party} must name at least one join_key column")
        if (party == spec.requester and _opt(spec, "subset", "all") != "all"
                and _subset_item(spec) is None):
            raise SpecRefused(_rule("subset"), "params.options.subset",
                              "a labelled/unlabelled subset needs a requester input that names "
                              "only the lead_id (row_id) of the labelled leads")

    # --- requester -----------------------------------------------------------------------

    def run(self, run: RequesterRun) -> RunResult:
        spec, ctx = run.spec, run.ctx
        mode = _mode(spec)
        ident, join, feats, frames = _load_party(ctx, spec, run.me)
        model, doc = load_own_slice(ctx, spec, run.me, feats.columns)
        try:
            platt = (float(doc["platt"][0]), float(doc["platt"][1]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise _model_failure(run.me, "the OEM slice has no Platt calibration") from None
        rows = self._subset(spec, run.me, feats, frames)
        if not len(rows):
            raise QueryFailure("input_error", "no leads to grade in the chosen subset",
                               field="params.options.subset")
        own = model.partial_scores(feats.values[rows])
        kinds = _kinds(ctx, [it for it in spec.inputs[run.me] if _cols(it, "join_key")],
                       "join_key")
        leads = ident.iloc[rows].reset_index(drop=True)
        grades_spec = _grade_spec(spec)
        n = len(rows)
        prob: np.ndarray | None = None
        sessions: dict[str, Any] = {}
        if mode == "strict":
            grades, matched = self._strict_run(run, leads, join, kinds, own, platt,
                                               grades_spec)
        else:
            partials, matched, sessions = self._standard(run, leads, join, kinds)
            try:
                p, grades = combine_standard(own, partials, platt, grades_spec)
            except LocalProtocolError as exc:
                raise QueryFailure("protocol_error", f"partial scores: {exc}") from None
            if _opt(spec, "include_probability", False):
                prob = p
        lead_ids = [feats.keys[i] for i in rows]
        table = pd.DataFrame({"lead_id": lead_ids, "grade": grades})
        if prob is not None:
            table["probability"] = np.asarray(prob, dtype=np.float64)
        dist = {g: int((table["grade"] == g).sum()) for g in ("A", "B", "C", "D")}
        manifest = {"query_id": run.query_id, "model": _model_id(spec), "mode": mode,
                    "rows": n, "columns": list(table.columns)}
        path = _write_result(ctx, run.query_id, table, manifest)
        payload = {
            "type": "lead_score", "mode": mode, "model": _model_id(spec),
            "adaptive": bool(_opt(spec, "adaptive", False)),
            "subset": _opt(spec, "subset", "all"),
            "thresholds": list(grades_spec.thresholds), "leads": n,
            "grades": dist, "matched": matched,
            "unmatched_leads": "scored with the host's partial score of an all-zero row",
            "result_file": str(path), "columns": list(table.columns),
        }
        if sessions:
            payload["tables"] = sessions
        return RunResult(payload, rows=n)

    @staticmethod
    def _subset(spec: QuerySpec, me: str, feats: pf.PartyFeatures,
                frames: list[pd.DataFrame]) -> np.ndarray:
        subset = _opt(spec, "subset", "all")
        all_rows = np.arange(len(feats.keys))
        if subset == "all":
            return all_rows
        n = _subset_item(spec)
        assert n is not None
        col = _cols(spec.inputs[me][n], "row_id")[0]
        labelled = set(frames[n][col].astype(str))
        mask = np.asarray([k in labelled for k in feats.keys], dtype=bool)
        return all_rows[mask if subset == "labelled" else ~mask]

    def _strict(self, run: RequesterRun, chm: SessionChannel, chd: SessionChannel,
                m_pseud: list[bytes | None], d_pseud: list[bytes | None], own: np.ndarray,
                platt: tuple[float, float], grades_spec: GradeSpec) -> list[str]:
        kind, blob = unframe(chm.exchange(frame(SETUP, b""), round="setup"))
        if kind != READY:
            raise QueryFailure("protocol_error", "media: bad SETUP reply")
        pub = decode_key_blob(run.query_id, blob, run.ctx.peer_public_key(chm.peer))
        kind, body = unframe(chd.exchange(frame(SETUP, blob), round="setup"))
        if kind != READY or body:
            raise QueryFailure("protocol_error", "dealer: bad SETUP reply")
        labels = []
        for ch, pseud in ((chm, m_pseud), (chd, d_pseud)):
            table, zero = _fetch_table(run, ch, pub)
            try:
                labels.append([zero if p is None else table[p] for p in pseud])
            except KeyError:
                raise QueryFailure("protocol_error",
                                   f"{ch.peer}: its table lacks a matched record") from None
        pool = worker_pool()

        def jobs(batch: Sequence[BlindJob]) -> list[list[int]]:
            assert pool is not None
            return [list(r) for r in pool.map(run_blind_job, batch)]

        try:
            grader = StrictGrader(protocol_session_id(run.query_id, "grade"), pub, grades_spec,
                                  platt, adaptive=bool(_opt(run.spec, "adaptive", False)),
                                  runner=jobs if pool is not None else None,
                                  jobs_per_batch=max(1, getattr(pool, "_max_workers", 1)))
        except LocalProtocolError as exc:
            raise QueryFailure("model_unavailable", f"grading: {exc}",
                               field="params.options.thresholds") from None
        grades: list[str] = []
        for b, lo in enumerate(range(0, len(own), BATCH_LEADS)):
            run.check_alive()
            hi = min(len(own), lo + BATCH_LEADS)
            msg: bytes | None = grader.blind_batch(
                b, own[lo:hi], [lab[lo:hi] for lab in labels])
            while msg is not None:
                kind, body = unframe(chm.exchange(frame(GRADE, msg), round="grade"))
                if kind != SIGNS:
                    raise QueryFailure("protocol_error", "media: expected SIGNS")
                step = grader.step(body)
                msg = step.reply
                if step.grades is not None:
                    grades.extend(step.grades)
        kind, _ = unframe(chm.exchange(frame(DONE, b""), round="done"))
        if kind != DONE:
            raise QueryFailure("protocol_error", "media: bad DONE reply")
        return grades

    def _standard(self, run: RequesterRun, leads: pd.DataFrame, join: list[str],
                  kinds: dict[str, Kind]
                  ) -> tuple[list[np.ndarray], dict[str, int], dict[str, Any]]:
        """Each host's partial score per lead from its ``partial_scores`` table: download
        (or a delta onto the cached copy), then blinded batch evaluations of the leads'
        distinct identifiers and the zero-row item; first hit by priority wins."""
        items, per_lead = _lead_items(leads, join, kinds)
        partials: list[np.ndarray] = []
        matched: dict[str, int] = {}
        info: dict[str, Any] = {}
        for host in run.spec.counterparties:
            name = table_name(run.spec, host)
            with anonq_sessions.session_errors(host, name):
                table = anonq_sessions.sync_table(run, host, name)
                if table.label_size != PARTIAL_LABEL_SIZE:
                    raise QueryFailure(
                        "wrong_table", f"{host}'s table {name} has {table.label_size}-byte "
                        f"labels, not {PARTIAL_LABEL_SIZE}-byte partial scores",
                        field=f"params.options.tables.{host}", peer=host)
                found = lifecycle.lookup_batch_sessions(
                    anonq_sessions.opener(run, host), [*items, tables.ZERO_ROW_ITEM], table,
                    check_alive=run.check_alive)
            zero_label = found.get(len(items))
            if zero_label is None:
                raise QueryFailure(
                    "wrong_table", f"{host}'s table {name} has no zero-row entry: not a "
                    "partial_scores table", field=f"params.options.tables.{host}", peer=host)
            scores, hits = _pick(per_lead, found, zero_label, host, name)
            require_min_intersection(run, hits, f"the number of leads matched with {host}")
            partials.append(scores)
            matched[host] = hits
            info[host] = {"table": name, "version": table.version,
                          "entries": table.entry_count, "evaluations": len(items) + 1}
        return partials, matched, info

    def _strict_run(self, run: RequesterRun, leads: pd.DataFrame, join: list[str],
                    kinds: dict[str, Kind], own: np.ndarray, platt: tuple[float, float],
                    grades_spec: GradeSpec) -> tuple[list[str], dict[str, int]]:
        spec = run.spec
        roles = {p: Party.MEDIA if _party_kind(spec, p) == "media" else Party.DEALER
                 for p in spec.counterparties}
        media = next(h for h, r in roles.items() if r == Party.MEDIA)
        dealer = next(h for h, r in roles.items() if r == Party.DEALER)
        items, origins = requester_items(leads, join, kinds)
        n = len(leads)
        with run.session(media, PROTOCOL) as chm, run.session(dealer, PROTOCOL) as chd:
            channels: dict[str, SessionChannel] = {media: chm, dealer: chd}
            pseud: dict[str, list[bytes | None]] = {}
            matched: dict[str, int] = {}
            for host, ch in channels.items():
                resolution = align_with(run, host, ch, items, origins)
                matched[host] = len(resolution.pairs)
                pseud[host] = [resolution.pairs[i][0] if i in resolution.pairs else None
                               for i in range(n)]
            grades = self._strict(run, chm, chd, pseud[media], pseud[dealer], own, platt,
                                  grades_spec)
        return grades, matched

    # --- counterparty --------------------------------------------------------------------

    def open_responder(self, run: CounterpartyRun, session_id: str, protocol: str,
                       peer: str) -> SessionResponder:
        mode = _mode(run.spec)
        if protocol == ANONQ_PROTOCOL and mode == "standard":
            return _table_responder(run, session_id, peer)
        if protocol == PROTOCOL and mode == "strict":
            return _HostResponder(run, session_id)
        want = ANONQ_PROTOCOL if mode == "standard" else PROTOCOL
        raise QueryFailure("bad_protocol", f"lead_score in {mode} mode runs {want}, "
                           f"not {protocol}")


# --- standard mode helpers -----------------------------------------------------------------


def _lead_items(leads: pd.DataFrame, join: list[str], kinds: dict[str, Kind]
                ) -> tuple[list[bytes], list[list[tuple[int, int]]]]:
    """The distinct table items of the leads' identifiers and, per lead, its
    ``(priority rank, item index)`` pairs, best first (phone > email > device id, then
    column order)."""
    rank = {k: i for i, k in enumerate(PRIORITY)}
    index: dict[bytes, int] = {}
    per_lead: list[list[tuple[int, int]]] = [[] for _ in range(len(leads))]
    for pos, column in enumerate(join):
        kind = kinds[column]
        order = rank[kind] * len(join) + pos
        for row, value in enumerate(leads[column].to_numpy(dtype=object)):
            if value is None or value is pd.NA or value != value or not str(value):
                continue
            item = encode_item(kind, str(value))
            per_lead[row].append((order, index.setdefault(item, len(index))))
    for pairs in per_lead:
        pairs.sort()
    return list(index), per_lead


def _pick(per_lead: list[list[tuple[int, int]]], found: dict[int, bytes], zero_label: bytes,
          host: str, name: str) -> tuple[np.ndarray, int]:
    """Each lead's partial score (its first identifier that hit, else the zero-row score)
    and the number of leads that hit."""
    try:
        zero = decode_partial_label(zero_label)
        cache: dict[int, float] = {}
        out = np.empty(len(per_lead), dtype=np.float64)
        hits = 0
        for row, pairs in enumerate(per_lead):
            hit = next((i for _, i in pairs if i in found), None)
            if hit is None:
                out[row] = zero
                continue
            hits += 1
            value = cache.get(hit)
            if value is None:
                value = cache[hit] = decode_partial_label(found[hit])
            out[row] = value
    except RemoteProtocolError as exc:
        raise QueryFailure("protocol_error", f"{host}, table {name}: {exc}",
                           peer=host) from None
    return out, hits


class _CapturingResponder:
    """The owner's responder, each received message also handed to the node's transcript
    test hook (``CLEANROOM_ANONQ_TRANSCRIPT``; a no-op unless set when the node started)."""

    def __init__(self, inner: lifecycle.OwnerSessionResponder,
                 capture: Callable[[str, bytes], None]) -> None:
        self.inner = inner
        self.capture = capture

    @property
    def finished(self) -> bool:
        return self.inner.finished

    def handle(self, message: bytes) -> bytes:
        self.capture("lead_score", message)
        return self.inner.handle(message)


def _table_responder(run: CounterpartyRun, session_id: str, peer: str) -> SessionResponder:
    """A host's end of one standard-mode ``labeled_psi`` session: its published
    ``partial_scores`` table for this model, download and batch evaluations only."""
    from cleanroom.anonq.api import lifecycle_source, state_of

    spec, me = run.spec, run.me
    _model_row(run.ctx, spec, me)
    name = table_name(spec, me)
    field = f"params.options.tables.{me}"
    try:
        source, budget = lifecycle_source(run.ctx, name, peer)
    except CleanroomError as exc:
        raise QueryFailure("no_table", f"table {name!r} at {me}: {exc}; publish it with "
                           f"kind partial_scores and model {_model_id(spec)}",
                           field=field, party=me) from None
    meta = source.meta
    if meta.kind != tables.PARTIAL_SCORES or meta.query_type != "lead_score":
        raise QueryFailure("wrong_table", f"table {name!r} at {me} is a {meta.kind} table "
                           f"for {meta.query_type}, not a partial_scores table for lead_score",
                           field=field, party=me)
    _check_table_sources(run.ctx, spec, me, name, meta.sources)
    responder = lifecycle.open_owner_session(
        source, peer=peer, session_id=protocol_session_id(run.query_id, session_id),
        modes=frozenset({AnonqMode.BATCH, AnonqMode.DOWNLOAD}), budget=budget)
    return _CapturingResponder(responder, state_of(run.ctx).capture)


def _fetch_table(run: RequesterRun, ch: SessionChannel, pub: PublicKey
                 ) -> tuple[dict[bytes, bytes], bytes]:
    """All of a host's (pseudonym -> ciphertext) and its zero-row ciphertext, in chunks."""
    width = (pub.nsquare.bit_length() + 7) // 8
    table: dict[bytes, bytes] = {}
    zero = b""
    start, total = 0, None
    while total is None or start < total:
        run.check_alive()
        kind, body = unframe(ch.exchange(frame(TABLE, _U32.pack(start)), round="table"))
        if kind != ROWS or len(body) < 12 + width:
            raise QueryFailure("protocol_error", f"{ch.peer}: bad TABLE reply")
        got_start, count, total = struct.unpack_from(">III", body)
        rec = LABEL_BYTES + width
        if got_start != start or len(body) != 12 + width + count * rec or (
                count == 0 and start < total):
            raise QueryFailure("protocol_error", f"{ch.peer}: TABLE reply of the wrong shape")
        zero = body[12:12 + width]
        load_partial_label(zero, pub)
        pos = 12 + width
        for _ in range(count):
            tag, ct = body[pos:pos + LABEL_BYTES], body[pos + LABEL_BYTES:pos + rec]
            load_partial_label(ct, pub)  # validates: in range, a unit mod n^2
            table[tag] = ct
            pos += rec
        start += count
    return table, zero


class _HostResponder:
    """A host's end of the strict-mode ``lsc`` session: PSI, then the strict part."""

    def __init__(self, run: CounterpartyRun, session_id: str) -> None:
        spec = run.spec
        self.run = run
        self.role_party = Party.MEDIA if _party_kind(spec, run.me) == "media" else Party.DEALER
        ident, join, feats, _ = _load_party(run.ctx, spec, run.me)
        self.model, _ = load_own_slice(run.ctx, spec, run.me, feats.columns)
        kinds = ({join[0]: "phone"} if self.role_party == Party.DEALER else
                 _kinds(run.ctx, [it for it in spec.inputs[run.me] if _cols(it, "join_key")],
                        "join_key"))
        items, labels = responder_items(ident, join, kinds)  # type: ignore[arg-type]
        self.pseudonyms = [labels[i * len(join)] for i in range(len(ident))]
        self.feats = feats
        rule = run.policy.partners.get(spec.requester)
        modes = frozenset(Mode.INTERSECTION for m in (rule.psi_reveal if rule else [])
                          if m == "intersection")
        self.psi = PsiSessionResponder(PsiResponder(
            items, labels=labels, allowed_modes=modes,
            expected_session_id=protocol_session_id(run.query_id, session_id)))
        self.pub: PublicKey | None = None
        self.keyholder: StrictKeyHolder | None = None
        self.table: list[bytes] | None = None
        self.zero = b""
        self.done = False

    @property
    def finished(self) -> bool:
        return self.done

    def _scores(self) -> tuple[np.ndarray, float]:
        zero_row = np.zeros((1, len(self.feats.columns)))
        return (self.model.partial_scores(self.feats.values),
                float(self.model.partial_scores(zero_row)[0]))

    def handle(self, message: bytes) -> bytes:
        if not self.psi.finished:
            return self.psi.handle(message)
        if self.done:
            raise RemoteProtocolError("lsc session: already finished", status_hint=409)
        kind, body = unframe(message)
        if kind == SETUP and self.pub is None:
            return self._setup(body)
        if kind == TABLE and self.table is not None:
            return self._rows(body)
        if kind == GRADE and self.keyholder is not None:
            return frame(SIGNS, self.keyholder.handle(body))
        if kind == DONE and self.keyholder is not None and not body:
            self.done = True
            return frame(DONE, b"")
        raise RemoteProtocolError("lsc session: message out of turn", status_hint=409)

    def _setup(self, body: bytes) -> bytes:
        ctx, qid = self.run.ctx, self.run.query_id
        if self.role_party == Party.MEDIA:
            if body:
                raise RemoteProtocolError("SETUP: the key holder expects an empty SETUP")
            pub, priv = generate_keypair()
            self.keyholder = StrictKeyHolder(protocol_session_id(qid, "grade"), priv)
            reply = encode_key_blob(qid, pub, ctx.identity.signing_key())
        else:
            media = next(p for p in self.run.spec.counterparties if p != self.run.me)
            pub = decode_key_blob(qid, body, ctx.peer_public_key(media))
            reply = b""
        scores, zero = self._scores()
        try:
            cts = encrypt_partial_labels(np.append(scores, zero), pub)
        except LocalProtocolError as exc:
            raise QueryFailure("input_error", f"partial scores: {exc}") from None
        self.pub, self.table, self.zero = pub, cts[:-1], cts[-1]
        return frame(READY, reply)

    def _rows(self, body: bytes) -> bytes:
        assert self.table is not None
        if len(body) != 4:
            raise RemoteProtocolError("TABLE: bad request")
        (start,) = _U32.unpack(body)
        total = len(self.table)
        if start > total:
            raise RemoteProtocolError("TABLE: start past the end")
        end = min(total, start + TABLE_CHUNK)
        out = [struct.pack(">III", start, end - start, total), self.zero]
        for i in range(start, end):
            out.append(self.pseudonyms[i] + self.table[i])
        if end == total and self.role_party == Party.DEALER:
            self.done = True
        return frame(ROWS, b"".join(out))


register(LeadScoreRunner())
