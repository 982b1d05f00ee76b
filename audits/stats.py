"""Aggregates a compliance reviewer needs, computed from decoded ledger entries.

:func:`collect` turns a sequence of :class:`cleanroom.ledger.Entry` (already filtered to a
time window, or filtered here with ``since_ms``/``until_ms``, ``until`` exclusive) into a
:class:`ReportStats`: queries per counterparty and purpose, policy decisions with the rules
that denied, what left the domain per peer (messages and bytes from ``message_sent``,
rows and bytes from ``result_delivered`` to another party), privacy budget per partner,
witnessing (``checkpoint_cosigned``, ``witness_alarm``) and governance events (datasets,
policy changes, key rotations).

Privacy budget (thousandths of epsilon, integers):

- *charged*: ``result_delivered.epsilon_milli``, charged to ``result_delivered.charged_to``;
  without it, to the ``charged_to`` of the query's ``policy_decision``; without either, to
  the receiver (the assumption of entries written before ``charged_to`` existed). A charge
  to a party that is not this node is listed under that partner; a charge to this node is
  listed against the query's other parties (budget this node spent at its partners);
- *reserved*: ``policy_decision.epsilon_milli`` is what the query asks for. For a query
  approved but not yet delivered, failed or cancelled at the end of the period, it is
  listed as reserved, against the decision's ``charged_to``; without it, against the
  requester (a peer's query) or this node's partners (this node's query), as the policy
  reserves it. Entries without these fields count nothing as reserved.

Pure computation: no I/O, no HTML. Values are copied as they are in the entries; escaping
is the renderer's job. Entry fields are data and are never interpreted as markup or code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cleanroom.ledger import Entry

UNKNOWN = "(unknown)"


def _s(v: object, default: str = UNKNOWN) -> str:
    return v if isinstance(v, str) else default


def _n(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _opt(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


@dataclass
class QueryInfo:
    """One query as this node's ledger saw it."""

    query_id: str
    ts_ms: int | None = None
    query_type: str = UNKNOWN
    purpose: str = UNKNOWN
    requester: str = UNKNOWN
    counterparties: tuple[str, ...] = ()
    direction: str = UNKNOWN  # outgoing (we asked) | incoming (a peer asked us)
    decisions: list[tuple[str, str, str]] = field(default_factory=list)  # party, decision, rule
    human: list[str] = field(default_factory=list)
    failed: str | None = None
    cancelled: str | None = None
    delivered_rows: int = 0
    delivered: bool = False
    epsilon_milli: int = 0  # charged (result_delivered.epsilon_milli)
    epsilon_requested_milli: int | None = None  # asked for (policy_decision.epsilon_milli)
    charged_to: str | None = None  # whose budget, per the decisions (charged_to)
    proposed_in_period: bool = False

    @property
    def outcome(self) -> str:
        if any(d == "denied" for _p, d, _r in self.decisions) or "denied" in self.human:
            return "denied"
        if self.failed is not None:
            return "failed"
        if self.cancelled is not None:
            return "cancelled"
        if self.delivered:
            return "completed"
        if any(d == "held" for _p, d, _r in self.decisions) and "approved" not in self.human:
            return "held"
        if self.decisions or self.human:
            return "approved"
        return "proposed"


@dataclass
class PeerFlow:
    """What moved between this node and one peer."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    sessions: int = 0
    results_to: int = 0  # results delivered to this peer (left our domain)
    rows_to: int = 0
    result_bytes_to: int = 0
    results_from: int = 0  # results this node received with this peer in the query
    rows_from: int = 0


@dataclass
class DenialRule:
    rule_id: str
    count: int = 0
    parties: Counter[str] = field(default_factory=Counter)
    fields: Counter[str] = field(default_factory=Counter)
    peers: Counter[str] = field(default_factory=Counter)


@dataclass
class BudgetUse:
    """Privacy budget charged to one partner (thousandths of epsilon)."""

    partner: str
    epsilon_milli: int = 0
    results: int = 0
    by_purpose: Counter[str] = field(default_factory=Counter)
    charges: list[tuple[int, int]] = field(default_factory=list)  # (ts_ms, epsilon_milli)
    reserved_milli: int = 0  # approved, not yet delivered, failed or cancelled
    reserved_queries: int = 0
    limit_epsilon: float | None = None
    period_days: float | None = None

    def max_window_milli(self) -> int | None:
        """The largest amount charged within any window of ``period_days`` (in the data)."""
        if self.period_days is None:
            return None
        span = int(self.period_days * 86_400_000)
        pts = sorted(self.charges)
        best = total = 0
        lo = 0
        for ts, eps in pts:
            total += eps
            while pts[lo][0] <= ts - span:
                total -= pts[lo][1]
                lo += 1
            best = max(best, total)
        return best

    @property
    def over_limit(self) -> bool:
        w = self.max_window_milli()
        return (self.limit_epsilon is not None and w is not None
                and w > round(self.limit_epsilon * 1000))


@dataclass(frozen=True)
class AlarmRow:
    index: int
    ts_ms: int
    peer: str
    origin: str
    reason: str
    old_size: int | None
    new_size: int | None


@dataclass
class CosignRow:
    peer: str
    origin: str
    count: int = 0
    last_size: int = 0
    last_ts_ms: int = 0


@dataclass
class ReportStats:
    """Everything the report shows, for the entries in ``[since_ms, until_ms)``."""

    self_names: frozenset[str]
    since_ms: int | None
    until_ms: int | None
    entries: int = 0
    first_ts_ms: int | None = None
    last_ts_ms: int | None = None
    by_type: Counter[str] = field(default_factory=Counter)
    queries: dict[str, QueryInfo] = field(default_factory=dict)
    per_counterparty: Counter[str] = field(default_factory=Counter)
    per_counterparty_purpose: Counter[tuple[str, str]] = field(default_factory=Counter)
    per_type: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)  # approved/denied/held
    decisions_by_party: dict[str, Counter[str]] = field(default_factory=dict)
    human: Counter[str] = field(default_factory=Counter)
    denial_rules: dict[str, DenialRule] = field(default_factory=dict)
    flows: dict[str, PeerFlow] = field(default_factory=dict)
    budgets: dict[str, BudgetUse] = field(default_factory=dict)  # charged to partners
    budgets_self: dict[str, BudgetUse] = field(default_factory=dict)  # to us, per partner
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)  # (code, stage)
    cancellations: Counter[tuple[str, str]] = field(default_factory=Counter)  # (by, reason)
    alarms: list[AlarmRow] = field(default_factory=list)
    cosigned: dict[str, CosignRow] = field(default_factory=dict)
    governance: list[tuple[int, int, str, str]] = field(default_factory=list)
    query_times: list[int] = field(default_factory=list)

    @property
    def outcomes(self) -> Counter[str]:
        return Counter(q.outcome for q in self.queries.values() if q.proposed_in_period)

    def flow(self, peer: str) -> PeerFlow:
        return self.flows.setdefault(peer, PeerFlow())


def _query(st: ReportStats, qid: str) -> QueryInfo:
    q = st.queries.get(qid)
    if q is None:
        q = st.queries[qid] = QueryInfo(qid)
    return q


def _others(st: ReportStats, q: QueryInfo) -> list[str]:
    names = [q.requester, *q.counterparties]
    out = [n for n in dict.fromkeys(names) if n not in st.self_names and n != UNKNOWN]
    return out or [UNKNOWN]


def _budget_targets(st: ReportStats, q: QueryInfo, payer: str) -> list[BudgetUse]:
    """Where budget paid by ``payer`` is listed: under the partner, or (paid by this node)
    against each of the query's other parties."""
    if payer in st.self_names:
        return [st.budgets_self.setdefault(cp, BudgetUse(cp)) for cp in _others(st, q)]
    return [st.budgets.setdefault(payer, BudgetUse(payer))]


def collect(
    entries: Iterable[Entry],
    *,
    self_names: Iterable[str] = (),
    since_ms: int | None = None,
    until_ms: int | None = None,
    budgets: Mapping[str, tuple[float, float]] | None = None,
) -> ReportStats:
    """Aggregate ``entries`` with ``since_ms <= ts < until_ms``.

    ``self_names``: the names this node goes by in entries (to tell counterparties from
    itself). ``budgets``: partner -> (epsilon limit, period in days) from the policy.
    """
    st = ReportStats(frozenset(self_names), since_ms, until_ms)
    pending_results: list[tuple[Entry, str]] = []
    for e in entries:
        if since_ms is not None and e.ts_ms < since_ms:
            continue
        if until_ms is not None and e.ts_ms >= until_ms:
            continue
        st.entries += 1
        st.first_ts_ms = e.ts_ms if st.first_ts_ms is None else min(st.first_ts_ms, e.ts_ms)
        st.last_ts_ms = e.ts_ms if st.last_ts_ms is None else max(st.last_ts_ms, e.ts_ms)
        st.by_type[e.type] += 1
        f = e.fields
        qid = e.query_id
        t = e.type
        if t == "query_proposed" and qid is not None:
            q = _query(st, qid)
            q.ts_ms = e.ts_ms
            q.proposed_in_period = True
            q.query_type = _s(f.get("query_type"))
            q.purpose = _s(f.get("purpose"))
            q.requester = _s(f.get("requester"))
            cps = f.get("counterparties")
            q.counterparties = tuple(str(x) for x in cps) if isinstance(cps, list) else ()
            q.direction = "outgoing" if q.requester in st.self_names else "incoming"
            st.per_type[q.query_type] += 1
            st.query_times.append(e.ts_ms)
            for cp in _others(st, q):
                st.per_counterparty[cp] += 1
                st.per_counterparty_purpose[(cp, q.purpose)] += 1
        elif t == "policy_decision" and qid is not None:
            party, decision = _s(f.get("party")), _s(f.get("decision"))
            rule = _s(f.get("rule_id"))
            q = _query(st, qid)
            q.decisions.append((party, decision, rule))
            asked = _opt(f.get("epsilon_milli"))
            if asked is not None:
                q.epsilon_requested_milli = max(asked, q.epsilon_requested_milli or 0)
            if isinstance(f.get("charged_to"), str) and q.charged_to is None:
                q.charged_to = str(f["charged_to"])
            st.decisions[decision] += 1
            st.decisions_by_party.setdefault(party, Counter())[decision] += 1
            if decision == "denied":
                dr = st.denial_rules.setdefault(rule, DenialRule(rule))
                dr.count += 1
                dr.parties[party] += 1
                if isinstance(f.get("field"), str):
                    dr.fields[str(f["field"])] += 1
                if isinstance(f.get("peer"), str):
                    dr.peers[str(f["peer"])] += 1
        elif t == "human_approval" and qid is not None:
            decision = _s(f.get("decision"))
            _query(st, qid).human.append(decision)
            st.human[decision] += 1
        elif t == "session_started":
            st.flow(_s(f.get("peer"))).sessions += 1
        elif t == "message_sent":
            fl = st.flow(_s(f.get("peer")))
            fl.messages_sent += 1
            fl.bytes_sent += _n(f.get("size"))
        elif t == "message_received":
            fl = st.flow(_s(f.get("peer")))
            fl.messages_received += 1
            fl.bytes_received += _n(f.get("size"))
        elif t == "result_delivered" and qid is not None:
            pending_results.append((e, qid))
        elif t == "query_failed" and qid is not None:
            code = _s(f.get("error_code"))
            _query(st, qid).failed = code
            st.failures[(code, _s(f.get("stage"), "-"))] += 1
        elif t == "query_cancelled" and qid is not None:
            by = _s(f.get("by"))
            _query(st, qid).cancelled = by
            st.cancellations[(by, _s(f.get("reason_code"), "-"))] += 1
        elif t == "checkpoint_cosigned":
            origin = _s(f.get("origin"))
            row = st.cosigned.setdefault(origin, CosignRow(_s(f.get("peer")), origin))
            row.count += 1
            row.last_size = max(row.last_size, _n(f.get("size")))
            row.last_ts_ms = max(row.last_ts_ms, e.ts_ms)
        elif t == "witness_alarm":
            st.alarms.append(AlarmRow(
                e.seq, e.ts_ms, _s(f.get("peer")), _s(f.get("origin")), _s(f.get("reason")),
                _opt(f.get("old_size")), _opt(f.get("new_size"))))
        elif t == "dataset_registered":
            st.governance.append((e.seq, e.ts_ms, t, f"dataset {_s(f.get('dataset'))} version "
                                  f"{_s(f.get('version'))}: {_n(f.get('rows'))} rows"))
        elif t == "policy_changed":
            v = f.get("policy_version")
            st.governance.append((e.seq, e.ts_ms, t, f"policy {_s(f.get('digest'))}"
                                  + (f" (version {v})" if isinstance(v, int) else "")))
        elif t == "key_rotated":
            st.governance.append((e.seq, e.ts_ms, t, f"{_s(f.get('key_kind'))} key -> "
                                  f"{_s(f.get('new_key'))}"))
    # results last: they need the query's counterparties, which may come later in a page
    for e, qid in pending_results:
        f = e.fields
        q = _query(st, qid)
        receiver = _s(f.get("receiver"))
        rows, size, eps = _n(f.get("rows")), _n(f.get("size")), _n(f.get("epsilon_milli"))
        q.delivered = True
        q.delivered_rows += rows
        q.epsilon_milli += eps
        if receiver in st.self_names:
            for cp in _others(st, q):
                fl = st.flow(cp)
                fl.results_from += 1
                fl.rows_from += rows
        else:
            fl = st.flow(receiver)
            fl.results_to += 1
            fl.rows_to += rows
            fl.result_bytes_to += size
        if "epsilon_milli" in f:
            charged = f.get("charged_to")
            payer = charged if isinstance(charged, str) else q.charged_to or receiver
            for b in _budget_targets(st, q, payer):
                b.epsilon_milli += eps
                b.results += 1
                b.by_purpose[q.purpose] += eps
                b.charges.append((e.ts_ms, eps))
    for q in st.queries.values():
        if q.epsilon_requested_milli and q.outcome == "approved":
            payer = q.charged_to or q.requester  # this node's own query: paid by itself
            if payer == UNKNOWN:
                continue  # proposed before the period: whose budget is not known
            for b in _budget_targets(st, q, payer):
                b.reserved_milli += q.epsilon_requested_milli
                b.reserved_queries += 1
    for partner, (limit, days) in (budgets or {}).items():
        b = st.budgets.setdefault(partner, BudgetUse(partner))
        b.limit_epsilon, b.period_days = limit, days
    st.query_times.sort()
    return st
