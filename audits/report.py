"""``cleanroom audit report``: one self-contained HTML file for a compliance reviewer.

:func:`build_report` renders decoded ledger entries (plus, optionally, the
:class:`~audits.verify.AuditResult` of ``audit verify``) into a single HTML document with
inline CSS and inline SVG charts: queries per counterparty and purpose, approvals and
denials with the denying rules, what left the domain per peer, privacy budget charged per
partner, witnessing status and alarms, ledger size and latest checkpoint.
:func:`report_for_node` does the reading: it verifies the node's ledger, streams the
entries of the requested period from the database opened read-only, and reads the budget
limits from the node's policy file when there is one.

The document loads nothing: no scripts, no external URLs, no web fonts; a
Content-Security-Policy meta tag forbids any load, so it renders the same offline and in
an archive years later. Every value that comes from entries, configuration or the
verifier is passed through :func:`html.escape`: entries are data, never markup. This
module never writes to the node database; the CLI writes the output file.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

from audits.charts import (
    BLUE,
    GREEN,
    ORANGE,
    RED,
    fmt_bytes,
    fmt_int,
    hbar_chart,
    stacked_hbar_chart,
    timeline_chart,
)
from audits.stats import UNKNOWN, ReportStats, collect
from audits.verify import AuditResult, open_readonly, open_store, verify_node
from cleanroom import __version__
from cleanroom.errors import CleanroomError, ConfigError, InputError
from cleanroom.ledger import Entry, EntrySchemaError, LedgerStore, decode_entry
from cleanroom.node.config import NodeConfig

MAX_QUERY_ROWS = 500

# --- time arguments -----------------------------------------------------------------------

_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_time(text: str, *, option: str = "--since", end: bool = False) -> int:
    """``--since``/``--until`` value -> epoch milliseconds (UTC).

    Accepts epoch milliseconds (digits only) or ISO 8601 (``2024-05-01``,
    ``2024-05-01T08:00``, ``2024-05-01T08:00:00+08:00``, ``...Z``); a value without an
    offset is UTC. With ``end=True`` a date alone means the end of that day, so
    ``--until 2024-05-31`` includes the 31st (the bound itself is exclusive).
    """
    s = text.strip()
    if s.isdigit():
        if len(s) > 16:
            raise InputError(f"{option} {text!r}: epoch milliseconds out of range")
        return int(s)
    try:
        when = dt.datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InputError(f"{option} {text!r}: expected ISO 8601 (2024-05-01 or "
                         "2024-05-01T08:00:00Z) or epoch milliseconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    if end and _DATE_ONLY.fullmatch(s):
        when += dt.timedelta(days=1)
    ms = int(when.timestamp() * 1000)
    if ms < 0:
        raise InputError(f"{option} {text!r}: before 1970")
    return ms


def fmt_time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- reading entries ------------------------------------------------------------------------

_TS_RE = re.compile(rb'"ts":(\d{1,19})[,}]')


@dataclass(frozen=True)
class Unreadable:
    index: int
    reason: str


def load_entries(
    store: LedgerStore, since_ms: int | None = None, until_ms: int | None = None
) -> tuple[list[Entry], list[Unreadable]]:
    """Decode the stored entries whose ``ts`` is in ``[since_ms, until_ms)``.

    The time is read from the entry bytes (the signed content), not from the derived
    ``ts_ms`` column. Entries that do not decode are returned as :class:`Unreadable`.
    """
    out: list[Entry] = []
    bad: list[Unreadable] = []
    for rec in store.iter_entries():
        m = _TS_RE.search(rec.body)
        if m is not None:
            ts = int(m.group(1))
            if (since_ms is not None and ts < since_ms) or (
                    until_ms is not None and ts >= until_ms):
                continue
        try:
            out.append(decode_entry(rec.body))
        except EntrySchemaError as exc:
            bad.append(Unreadable(rec.idx, exc.detail))
    return out, bad


def policy_budgets(config: NodeConfig) -> tuple[dict[str, tuple[float, float]], str | None]:
    """Partner -> (epsilon, period days) from the node's policy; a note if unavailable."""
    if config.policy_file is None:
        return {}, "this node has no policy file: budget limits are not shown"
    from cleanroom.policy.model import load_policy

    try:
        policy = load_policy(config.policy_file)
    except ConfigError as exc:
        return {}, f"the policy file could not be read, budget limits are not shown: {exc}"
    return {name: (rule.dp_budget.epsilon, rule.dp_budget.period_days)
            for name, rule in policy.partners.items() if rule.dp_budget is not None}, None


# --- HTML helpers ---------------------------------------------------------------------------

_CSS = """
:root{--fg:#1b1b1b;--muted:#666;--line:#d8d8d8;--ok:#0a7d4f;--bad:#b3261e;--warn:#8a5a00}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
margin:0 auto;max-width:1080px;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;
border-bottom:2px solid var(--line);padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;width:100%}
th,td{border-bottom:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;
word-break:break-all}
.muted{color:var(--muted);fill:var(--muted)}
.banner{padding:10px 14px;border-radius:6px;margin:12px 0;font-weight:600}
.banner.ok{background:#e6f4ec;color:var(--ok)}.banner.bad{background:#fbe9e7;color:var(--bad)}
.banner.warn{background:#fff4dc;color:var(--warn)}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{border:1px solid var(--line);border-radius:6px;padding:8px 12px;min-width:150px}
.card b{display:block;font-size:20px}
.tag{display:inline-block;padding:0 6px;border-radius:4px;font-size:12px;font-weight:600}
.tag.ok{background:#e6f4ec;color:var(--ok)}.tag.bad{background:#fbe9e7;color:var(--bad)}
.tag.warn{background:#fff4dc;color:var(--warn)}
svg.chart{display:block;margin:6px 0 14px;max-width:100%;height:auto}
svg.chart text{font-size:12px;fill:#333}
ul.notes li{margin:2px 0}
@media print{body{padding:0}h2{break-after:avoid}table,svg{break-inside:avoid}}
"""


def _e(v: object) -> str:
    return escape(str(v), quote=True)


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]],
           numeric: Sequence[int] = (), empty: str = "none in this period") -> str:
    rows = list(rows)
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    num = set(numeric)
    head = "".join(f'<th class="n">{_e(h)}</th>' if i in num else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            if isinstance(c, _Raw):
                cells.append(f"<td>{c.html}</td>")
            elif i in num:
                cells.append(f'<td class="n">{_e(c)}</td>')
            else:
                cells.append(f"<td>{_e(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


@dataclass(frozen=True)
class _Raw:
    """Already-escaped HTML for a table cell (built only from escaped parts here)."""

    html: str


def _tag(text: str, kind: str) -> _Raw:
    return _Raw(f'<span class="tag {kind}">{_e(text)}</span>')


def _counter_text(c: Mapping[str, int]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in sorted(c.items(), key=lambda kv: -kv[1])) or "-"


def _eps(milli: int | None) -> str:
    return "-" if milli is None else f"{milli / 1000:.3f}"


# --- sections -------------------------------------------------------------------------------


def _integrity(audit: AuditResult | None) -> str:
    if audit is None:
        return ('<div class="banner warn">Ledger integrity was not verified for this report.'
                "</div>")
    if audit.ok:
        return (f'<div class="banner ok">Ledger integrity verified: {audit.report.size:,} '
                "entries, every signature and cosignature holds"
                + (", every peer is consistent" if audit.peers_checked else "")
                + ".</div>")
    lines = audit.failure_lines()
    more = "".join(f"<li>{_e(x)}</li>" for x in lines[1:])
    return (f'<div class="banner bad">Ledger verification FAILED: {_e(lines[0])}'
            + (f"<ul>{more}</ul>" if more else "") + "</div>")


def _summary_cards(st: ReportStats, audit: AuditResult | None) -> str:
    out = st.outcomes
    sent = sum(f.bytes_sent for f in st.flows.values())
    rows_out = sum(f.rows_to for f in st.flows.values())
    alarms = len(st.alarms)
    cards = [
        ("entries in period", fmt_int(st.entries)),
        ("queries proposed", fmt_int(sum(out.values()))),
        ("denied", fmt_int(out.get("denied", 0))),
        ("completed", fmt_int(out.get("completed", 0))),
        ("bytes sent to peers", fmt_bytes(sent)),
        ("rows delivered to peers", fmt_int(rows_out)),
        ("witness alarms", fmt_int(alarms)),
    ]
    if audit is not None:
        cards.append(("ledger size (all time)", fmt_int(audit.report.size)))
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{_e(v)}</b>{_e(k)}</div>' for k, v in cards) + "</div>"


def _queries(st: ReportStats) -> str:
    h = ["<h2>Queries per counterparty and purpose</h2>"]
    h.append(hbar_chart(st.per_counterparty.most_common(),
                        title="Queries per counterparty"))
    h.append(timeline_chart(st.query_times, title="Queries proposed over time",
                            start_ms=st.since_ms, end_ms=st.until_ms))
    rows = sorted(st.per_counterparty_purpose.items(), key=lambda kv: (kv[0][0], -kv[1]))
    h.append("<h3>Counterparty and purpose</h3>")
    h.append(_table(["counterparty", "purpose", "queries"],
                    [(cp, purpose, n) for (cp, purpose), n in rows], numeric=[2]))
    direction: dict[tuple[str, str], int] = {}
    for q in st.queries.values():
        if q.proposed_in_period:
            key = (q.query_type, q.direction)
            direction[key] = direction.get(key, 0) + 1
    h.append("<h3>Query types</h3>")
    h.append(_table(["query type", "direction", "queries"],
                    [(t, d, n) for (t, d), n in sorted(direction.items())], numeric=[2]))
    return "".join(h)


def _decisions(st: ReportStats) -> str:
    h = ["<h2>Approvals and denials</h2>"]
    series = [("approved", GREEN), ("held", ORANGE), ("denied", RED)]
    rows = [(party, {k: float(v) for k, v in c.items()})
            for party, c in sorted(st.decisions_by_party.items())]
    h.append(stacked_hbar_chart(rows, series, title="Policy decisions per deciding party"))
    h.append(_table(["deciding party", "approved", "held", "denied"],
                    [(p, c.get("approved", 0), c.get("held", 0), c.get("denied", 0))
                     for p, c in sorted(st.decisions_by_party.items())], numeric=[1, 2, 3]))
    h.append("<h3>Rules that denied</h3>")
    h.append(_table(
        ["rule", "denials", "deciding party", "spec field", "requesting peer"],
        [(r.rule_id, r.count, _counter_text(r.parties), _counter_text(r.fields),
          _counter_text(r.peers))
         for r in sorted(st.denial_rules.values(), key=lambda r: (-r.count, r.rule_id))],
        numeric=[1], empty="no denial in this period"))
    h.append("<h3>Human approvals</h3>")
    h.append(_table(["decision", "count"], sorted(st.human.items()), numeric=[1],
                    empty="no human approval in this period"))
    h.append("<h3>Query outcomes</h3>")
    h.append(_table(["outcome", "queries"], sorted(st.outcomes.items()), numeric=[1]))
    return "".join(h)


def _flows(st: ReportStats) -> str:
    h = ["<h2>What left the domain</h2>",
         '<p class="muted">From <code>message_sent</code>, <code>message_received</code>, '
         "<code>session_started</code> and <code>result_delivered</code> entries. Sizes are "
         "protocol message bytes as recorded; rows are result rows delivered.</p>"]
    peers = sorted(st.flows.items(), key=lambda kv: -kv[1].bytes_sent - kv[1].result_bytes_to)
    h.append(hbar_chart([(p, float(f.bytes_sent)) for p, f in peers],
                        title="Bytes sent per peer", color=ORANGE, fmt=fmt_bytes))
    h.append(hbar_chart([(p, float(f.rows_to)) for p, f in peers],
                        title="Result rows delivered per peer", color=RED))
    h.append(_table(
        ["peer", "sessions", "messages sent", "bytes sent", "messages received",
         "bytes received", "results delivered to", "rows delivered to", "result bytes to",
         "results received", "rows received"],
        [(p, f.sessions, fmt_int(f.messages_sent), fmt_bytes(f.bytes_sent),
          fmt_int(f.messages_received), fmt_bytes(f.bytes_received), f.results_to,
          fmt_int(f.rows_to), fmt_bytes(f.result_bytes_to), f.results_from,
          fmt_int(f.rows_from)) for p, f in peers],
        numeric=list(range(1, 11)), empty="nothing was sent or received in this period"))
    return "".join(h)


def _budgets(st: ReportStats, note: str | None) -> str:
    h = ["<h2>Privacy budget</h2>",
         '<p class="muted">Epsilon charged per partner, from <code>result_delivered.'
         "epsilon_milli</code> (a result delivered to a partner is charged to it). "
         "&ldquo;Largest window&rdquo; is the most charged within any window of the "
         "policy period in this report's data.</p>"]
    if note:
        h.append(f'<p class="muted">{_e(note)}</p>')
    rows = []
    for p, b in sorted(st.budgets.items()):
        if b.over_limit:
            status = _tag("over budget", "bad")
        elif b.limit_epsilon is None:
            status = _tag("no limit in policy", "warn")
        else:
            status = _tag("within budget", "ok")
        limit = "-" if b.limit_epsilon is None else f"{b.limit_epsilon:g} per {b.period_days:g} d"
        rows.append((p, _eps(b.epsilon_milli), b.results, limit, _eps(b.max_window_milli()),
                     status, ", ".join(f"{k}: {_eps(v)}" for k, v in b.by_purpose.items())
                     or "-"))
    h.append(hbar_chart([(p, b.epsilon_milli / 1000) for p, b in sorted(st.budgets.items())],
                        title="Epsilon charged per partner", color=BLUE,
                        fmt=lambda v: f"{v:.3f}"))
    h.append(_table(["partner", "epsilon charged", "results", "policy budget",
                     "largest window", "status", "by purpose"], rows, numeric=[1, 2, 4],
                    empty="no privacy budget was charged in this period"))
    if st.budgets_self:
        h.append("<h3>Charged to this node by its partners (results it received)</h3>")
        h.append(_table(["partner", "epsilon charged", "results"],
                        [(p, _eps(b.epsilon_milli), b.results)
                         for p, b in sorted(st.budgets_self.items())], numeric=[1, 2]))
    return "".join(h)


def _witnessing(st: ReportStats, audit: AuditResult | None) -> str:
    h = ["<h2>Ledger, checkpoints and witnesses</h2>"]
    if audit is not None:
        r = audit.report
        cp = audit.latest_checkpoint
        h.append(_table(["", ""], [
            ("origin", audit.origin),
            ("entries (all time)", fmt_int(r.size)),
            ("root hash", _Raw(f"<code>{_e(r.root.hex())}</code>")),
            ("latest signed checkpoint",
             "none" if cp is None else f"size {cp.size:,} at {fmt_time(cp.created_ms)}"),
            ("latest checkpoint root",
             _Raw("-" if cp is None else f"<code>{_e(cp.root_hex)}</code>")),
            ("signed checkpoints verified", fmt_int(r.checkpoints_checked)),
            ("cosignatures verified", f"{r.cosignatures_checked:,} (+ "
             f"{r.cosignatures_unknown_key:,} by witnesses not pinned here)"),
            ("largest size anchored by a signature", fmt_int(r.largest_matching_anchor)),
        ]))
        h.append("<h3>Who witnesses this node's log</h3>")
        h.append(_table(["witness", "pinned peer", "cosignatures", "latest size cosigned",
                         "latest cosignature"],
                        [(w.witness, w.peer or "-", w.count, fmt_int(w.latest_size),
                          fmt_time(w.latest_time_s * 1000)) for w in audit.witnesses],
                        numeric=[2, 3], empty="no verified cosignature: nobody has witnessed "
                        "this log yet"))
        if audit.problems_rows():
            h.append("<h3>Verification problems</h3>")
            h.append(_table(["kind", "entry index", "checkpoint size", "detail"],
                            audit.problems_rows()))
        if audit.peers_checked:
            h.append("<h3>Peer consistency (checked live)</h3>")
            h.append(_table(
                ["peer", "origin", "status", "cosigned size", "latest size",
                 "our log as the peer saw it", "detail"],
                [(p.peer, p.origin, _tag(p.status, "ok" if p.ok else "bad"),
                  "-" if p.last_cosigned_size is None else p.last_cosigned_size,
                  "-" if p.latest_size is None else p.latest_size, p.our_log, p.detail)
                 for p in audit.peers], empty="no pinned peer"))
    h.append("<h3>Peer logs this node cosigned (in this period)</h3>")
    h.append(_table(["peer", "origin", "cosignings", "latest size", "latest"],
                    [(c.peer, c.origin, c.count, fmt_int(c.last_size), fmt_time(c.last_ts_ms))
                     for c in sorted(st.cosigned.values(), key=lambda c: c.origin)],
                    numeric=[2, 3]))
    h.append("<h3>Witness alarms</h3>")
    alarm_rows = [(a.index, fmt_time(a.ts_ms), a.peer, a.origin, _tag(a.reason, "bad"),
                   "-" if a.old_size is None else a.old_size,
                   "-" if a.new_size is None else a.new_size) for a in st.alarms]
    h.append(_table(["entry", "time", "peer", "origin", "reason", "size cosigned",
                     "size shown"], alarm_rows, numeric=[0],
                    empty="no witness alarm in this period"))
    if audit is not None and audit.report.alarms and len(audit.report.alarms) != len(st.alarms):
        h.append(f'<p class="muted">{len(audit.report.alarms)} witness alarm(s) in the whole '
                 "ledger (verification counts all time).</p>")
    return "".join(h)


def _failures(st: ReportStats) -> str:
    h = ["<h2>Failures and cancellations</h2>"]
    h.append(_table(["error code", "stage", "queries"],
                    [(c, s, n) for (c, s), n in sorted(st.failures.items())], numeric=[2],
                    empty="no failed query in this period"))
    h.append(_table(["cancelled by", "reason", "queries"],
                    [(b, r, n) for (b, r), n in sorted(st.cancellations.items())], numeric=[2],
                    empty="no cancelled query in this period"))
    return "".join(h)


def _governance(st: ReportStats) -> str:
    return "<h2>Datasets, policy and keys</h2>" + _table(
        ["entry", "time", "event", "what"],
        [(i, fmt_time(ts), t, what) for i, ts, t, what in st.governance], numeric=[0],
        empty="no dataset registration, policy change or key rotation in this period")


def _query_list(st: ReportStats) -> str:
    qs = sorted((q for q in st.queries.values() if q.proposed_in_period),
                key=lambda q: (q.ts_ms or 0, q.query_id))
    shown = qs[:MAX_QUERY_ROWS]
    h = ["<h2>Queries</h2>"]
    if len(qs) > len(shown):
        h.append(f'<p class="muted">The first {len(shown):,} of {len(qs):,} queries.</p>')
    kind = {"denied": "bad", "failed": "bad", "cancelled": "warn", "held": "warn",
            "completed": "ok", "approved": "ok"}
    rows = []
    for q in shown:
        rules = sorted({r for _p, d, r in q.decisions if d == "denied"})
        rows.append((fmt_time(q.ts_ms), _Raw(f"<code>{_e(q.query_id)}</code>"), q.query_type,
                     q.purpose, q.requester, ", ".join(q.counterparties) or UNKNOWN,
                     _tag(q.outcome, kind.get(q.outcome, "warn")), ", ".join(rules) or "-",
                     fmt_int(q.delivered_rows), _eps(q.epsilon_milli or None)))
    h.append(_table(["time", "query", "type", "purpose", "requester", "counterparties",
                     "outcome", "denying rule", "rows", "epsilon"], rows, numeric=[8, 9]))
    return "".join(h)


_PROVES = (
    "Every entry shown was in the log when a signed checkpoint covering it was made; later "
    "checkpoints extend earlier ones; entries covered by a peer's cosignature cannot be "
    "rewritten, deleted, reordered or truncated without verification failing.",
    "The ledger does not prove that every event was recorded, nor anything about entries "
    "after the last cosigned checkpoint; times are the node's own clock. "
    "See docs/ledger.md.",
)


def build_report(
    entries: Iterable[Entry],
    *,
    audit: AuditResult | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    node_name: str | None = None,
    self_names: Iterable[str] = (),
    budgets: Mapping[str, tuple[float, float]] | None = None,
    budget_note: str | None = None,
    unreadable: Sequence[Unreadable] = (),
    generated_ms: int | None = None,
) -> str:
    """Render the report for ``entries`` in ``[since_ms, until_ms)`` as one HTML string.

    ``audit``: the verification result to show (integrity banner, checkpoints, witnesses,
    peer checks). ``self_names``: names this node goes by in entries (default: its node
    name). ``budgets``: partner -> (epsilon, period days) from the policy.
    """
    name = node_name or (audit.node_name if audit is not None else None)
    names = set(self_names) or ({name} if name else set())
    st = collect(entries, self_names=names, since_ms=since_ms, until_ms=until_ms,
                 budgets=budgets)
    gen = generated_ms if generated_ms is not None else int(
        dt.datetime.now(dt.UTC).timestamp() * 1000)
    title = f"Clean-room audit report: {name or 'node'}"
    period = (f"{fmt_time(since_ms) if since_ms is not None else 'the beginning'} to "
              f"{fmt_time(until_ms) if until_ms is not None else 'the end'} (end exclusive)")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">Ledger {_e(audit.origin if audit else "-")} &middot; period '
        f"{_e(period)} &middot; entries in period: first {_e(fmt_time(st.first_ts_ms))}, last "
        f"{_e(fmt_time(st.last_ts_ms))} &middot; generated {_e(fmt_time(gen))} by cleanroom "
        f"{_e(__version__)}</p>",
        _integrity(audit),
    ]
    if unreadable:
        items = "".join(f"<li>entry {u.index}: {_e(u.reason)}</li>" for u in unreadable[:50])
        parts.append(f'<div class="banner bad">{len(unreadable)} entr'
                     f'{"y" if len(unreadable) == 1 else "ies"} could not be decoded and '
                     f"are not counted below:<ul>{items}</ul></div>")
    parts += [
        _summary_cards(st, audit),
        _queries(st),
        _decisions(st),
        _flows(st),
        _budgets(st, budget_note),
        _witnessing(st, audit),
        _failures(st),
        _governance(st),
        _query_list(st),
        "<h2>What this report rests on</h2><ul class=\"notes\">"
        + "".join(f"<li>{_e(x)}</li>" for x in _PROVES) + "</ul>",
        "</body></html>",
    ]
    return "\n".join(parts)


def report_for_node(
    node_dir: Path | str,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    audit: AuditResult | None = None,
) -> tuple[str, AuditResult]:
    """Verify the node's ledger, read the period's entries read-only, render the report."""
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        raise InputError("--since must be before --until")
    config = NodeConfig.load(Path(node_dir))
    if audit is None:
        audit = verify_node(config.node_dir)
    budgets, note = policy_budgets(config)
    engine = open_readonly(config.database_url)
    try:
        store = open_store(engine, audit.database)
        entries, bad = load_entries(store, since_ms, until_ms)
    except CleanroomError:
        raise
    finally:
        engine.dispose()
    html = build_report(entries, audit=audit, since_ms=since_ms, until_ms=until_ms,
                        node_name=config.name, budgets=budgets, budget_note=note,
                        unreadable=bad)
    return html, audit
