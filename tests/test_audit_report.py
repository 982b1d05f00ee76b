"""``audit report``: the HTML report is self-contained, counts what the ledger recorded,
escapes entry values, and respects --since/--until."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, text
from test_audit_verify import (  # noqa: F401 - fixtures used by name
    DAY,
    T0,
    edit_entry,
    node_ledger,
    nodes,
    oem_scenario,
    template_nodes,
)

from audits.charts import fmt_bytes
from audits.report import build_report, load_entries, parse_time, report_for_node
from audits.stats import collect
from cleanroom.errors import InputError
from cleanroom.ledger import Entry, Event, Ledger, LedgerStore, digest, event

FORBIDDEN = ("http://", "https://", "<script", "<link", "<iframe", "<object", "<embed",
             "<img", "javascript:")
#: a tag (real markup: escaped text never contains "<") with an attribute that loads
LOADING_ATTR = re.compile(r"<[a-z][^<>]*\s(src|href|srcset|xlink:href|action)\s*=", re.I)


def scenario_entries(tmp_path: Path) -> tuple[list[Entry], dict[str, str]]:
    led = Ledger(create_engine(f"sqlite:///{tmp_path / 'ledger.db'}"), "cleanroom/oem",
                 Ed25519PrivateKey.generate())
    sc = oem_scenario(alarm=True)
    led.append_many(sc.events)
    led.checkpoint()
    entries, bad = load_entries(LedgerStore(led.store.engine, create=False))
    assert bad == [] and len(entries) == len(sc.events)
    return entries, sc.query_ids


def assert_self_contained(html: str) -> None:
    low = html.lower()
    for bad in FORBIDDEN:
        assert bad not in low, bad
    assert not LOADING_ATTR.search(html)
    styles = "".join(re.findall(r"<style>(.*?)</style>", html, re.S))
    assert "url(" not in styles and "@import" not in styles
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "default-src 'none'" in html  # the browser may load nothing at all


def row(*cells: str) -> str:
    num = ' class="n"'
    return "".join(f"<td{num if c.isdigit() else ''}>{c}</td>" for c in cells)


def test_counts_rules_flows_and_budget(tmp_path: Path) -> None:
    entries, ids = scenario_entries(tmp_path)
    st = collect(entries, self_names={"oem"}, budgets={"media": (0.6, 30.0)})
    # queries per counterparty: media is in 5 of the 7 queries, dealer in 3 (one is both)
    assert dict(st.per_counterparty) == {"media": 5, "dealer": 3}
    assert st.per_counterparty_purpose[("media", "lead_grading")] == 3
    assert st.per_counterparty_purpose[("media", "campaign_measurement")] == 2
    assert st.per_counterparty_purpose[("dealer", "resale")] == 1
    assert dict(st.outcomes) == {"completed": 3, "denied": 2, "failed": 1, "cancelled": 1}
    assert st.queries[ids["denied_dealer"]].outcome == "denied"
    assert {r: d.count for r, d in st.denial_rules.items()} == {
        "partners.dealer.purposes": 1, "partners.media.dp_budget": 1}
    assert dict(st.denial_rules["partners.dealer.purposes"].fields) == {"purpose": 1}
    media = st.flows["media"]
    sent = [120_000, 4_000, 2_048, 1_024, 4_096, 50_000]
    assert (media.messages_sent, media.bytes_sent) == (len(sent), sum(sent))
    assert (media.messages_received, media.bytes_received) == (3, 130_000 + 900 + 1_000)
    assert (media.results_to, media.rows_to, media.result_bytes_to) == (2, 42, 42 * 16)
    assert (media.results_from, media.rows_from) == (1, 4321)
    assert "dealer" not in st.budgets and st.budgets["media"].epsilon_milli == 750
    assert st.budgets["media"].max_window_milli() == 750 and st.budgets["media"].over_limit
    assert [(a.peer, a.reason) for a in st.alarms] == [("dealer", "fork")]

    html = build_report(entries, node_name="oem", budgets={"media": (0.6, 30.0)})
    assert_self_contained(html)
    assert html.count("<svg") >= 5
    assert row("media", "lead_grading", "3") in html
    assert row("dealer", "resale", "1") in html
    assert "partners.dealer.purposes" in html and "partners.media.dp_budget" in html
    assert fmt_bytes(sum(sent)) in html and "over budget" in html
    assert "cleanroom/dealer" in html and ">fork<" in html
    for qid in ids.values():
        assert qid in html
    assert "Ledger integrity was not verified" in html  # no audit result was given


def test_budget_within_limit_and_window(tmp_path: Path) -> None:
    entries, _ids = scenario_entries(tmp_path)
    # 0.5 on day 1 and 0.25 on day 3: a 1-day window never holds both
    st = collect(entries, self_names={"oem"}, budgets={"media": (0.6, 1.0)})
    assert st.budgets["media"].max_window_milli() == 500 and not st.budgets["media"].over_limit
    html = build_report(entries, node_name="oem", budgets={"media": (0.6, 1.0)})
    assert "within budget" in html and "over budget" not in html


def _stored(tmp_path: Path, events: list[Event]) -> list[Entry]:
    """``events`` appended to a real ledger and read back as the report reads them."""
    led = Ledger(create_engine(f"sqlite:///{tmp_path / 'budget.db'}"), "cleanroom/oem",
                 Ed25519PrivateKey.generate())
    led.append_many(events)
    entries, bad = load_entries(LedgerStore(led.store.engine, read_only=True))
    assert bad == []
    led.store.engine.dispose()
    return entries


def _query(qid: str, requester: str, counterparties: list[str], ts: int,
           *decisions: Event) -> list[Event]:
    return [event("query_proposed", ts_ms=ts, query_id=qid, query_type="segment_stats",
                  requester=requester, counterparties=counterparties, purpose="lead_grading",
                  spec_digest=digest(qid.encode())), *decisions]


def _decision(qid: str, ts: int, party: str, outcome: str = "approved", **kw: object) -> Event:
    return event("policy_decision", ts_ms=ts, query_id=qid, party=party, decision=outcome,
                 rule_id="partners.rule" if outcome == "denied" else "all_rules_passed", **kw)


def _result(qid: str, ts: int, receiver: str, eps: int, **kw: object) -> Event:
    return event("result_delivered", ts_ms=ts, query_id=qid, receiver=receiver,
                 digest=digest(qid.encode() + b"/r"), rows=4, epsilon_milli=eps, **kw)


def test_budget_charged_to_and_reserved_epsilon(tmp_path: Path) -> None:
    """``charged_to`` says whose budget a result is charged to (not the receiver's when
    media asks for a result sent to dealer); ``policy_decision.epsilon_milli`` is listed
    as reserved while the query runs. Without the fields the old assumption holds."""
    evs = [
        # media asks us, the result goes to dealer: charged to media (result's charged_to)
        *_query("q-a", "media", ["oem"], T0, _decision("q-a", T0 + 1, "oem", peer="media",
                epsilon_milli=300, charged_to="media")),
        _result("q-a", T0 + 2, "dealer", 300, charged_to="media"),
        # same, but only the decision names the payer: the result follows it
        *_query("q-b", "media", ["oem"], T0 + DAY, _decision("q-b", T0 + DAY + 1, "oem",
                epsilon_milli=200, charged_to="media")),
        _result("q-b", T0 + DAY + 2, "dealer", 200),
        # an old-style pair (no new fields): charged to the receiver, as before
        *_query("q-c", "dealer", ["oem"], T0 + DAY, _decision("q-c", T0 + DAY + 5, "oem")),
        _result("q-c", T0 + DAY + 6, "dealer", 50),
        # our own query to media and dealer, result to dealer, charged to us: it is budget
        # we spent at both partners, not a charge to dealer
        *_query("q-d", "oem", ["media", "dealer"], T0 + 2 * DAY,
                _decision("q-d", T0 + 2 * DAY + 1, "media", epsilon_milli=100,
                          charged_to="oem"),
                _decision("q-d", T0 + 2 * DAY + 1, "dealer", epsilon_milli=100)),
        _result("q-d", T0 + 2 * DAY + 2, "dealer", 100, charged_to="oem"),
        # approved and still running at the end of the period: reserved, not charged
        *_query("q-e", "media", ["oem"], T0 + 3 * DAY, _decision("q-e", T0 + 3 * DAY + 1,
                "oem", epsilon_milli=400, charged_to="media")),
        *_query("q-f", "oem", ["media"], T0 + 3 * DAY, _decision("q-f", T0 + 3 * DAY + 1,
                "media", epsilon_milli=150)),
        # denied, and failed: nothing reserved, nothing charged
        *_query("q-g", "media", ["oem"], T0 + 3 * DAY, _decision("q-g", T0 + 3 * DAY + 1,
                "oem", "denied", epsilon_milli=900, charged_to="media")),
        *_query("q-h", "media", ["oem"], T0 + 3 * DAY, _decision("q-h", T0 + 3 * DAY + 1,
                "oem", epsilon_milli=700, charged_to="media")),
        event("query_failed", ts_ms=T0 + 3 * DAY + 2, query_id="q-h", error_code="timeout"),
    ]
    st = collect(_stored(tmp_path, evs), self_names={"oem"}, budgets={"media": (0.6, 30.0)})
    media, dealer = st.budgets["media"], st.budgets["dealer"]
    assert (media.epsilon_milli, media.results, media.charges) == (
        500, 2, [(T0 + 2, 300), (T0 + DAY + 2, 200)])
    assert (dealer.epsilon_milli, dealer.results) == (50, 1)  # q-c only
    assert (media.reserved_milli, media.reserved_queries) == (400, 1)
    assert (dealer.reserved_milli, dealer.reserved_queries) == (0, 0)
    assert {p: (b.epsilon_milli, b.reserved_milli) for p, b in st.budgets_self.items()} == {
        "media": (100, 150), "dealer": (100, 0)}
    assert media.max_window_milli() == 500 and not media.over_limit  # 0.5 <= 0.6
    q = st.queries
    assert (q["q-d"].epsilon_requested_milli, q["q-d"].charged_to) == (100, "oem")
    assert q["q-c"].epsilon_requested_milli is None and q["q-c"].charged_to is None
    assert (q["q-g"].outcome, q["q-h"].outcome, q["q-e"].outcome) == (
        "denied", "failed", "approved")


HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


def test_entry_values_are_escaped() -> None:
    """Entries are data: even values the schema would refuse never become markup."""
    q = "q-<b>bold</b>"
    entries = [
        Entry(0, "query_proposed", T0, {"query_id": q, "query_type": "match",
                                        "requester": HOSTILE, "counterparties": ["oem"],
                                        "purpose": HOSTILE, "spec_digest": "x"}),
        Entry(1, "policy_decision", T0 + 1, {"query_id": q, "party": "oem", "peer": HOSTILE,
                                             "decision": "denied", "rule_id": HOSTILE,
                                             "field": HOSTILE}),
        Entry(2, "message_sent", T0 + 2, {"query_id": q, "session_id": "s", "protocol": "p",
                                          "peer": HOSTILE, "round": "r", "digest": "d",
                                          "size": 10}),
        Entry(3, "result_delivered", T0 + 3, {"query_id": q, "receiver": HOSTILE,
                                              "digest": "d", "rows": 5, "epsilon_milli": 7}),
        Entry(4, "query_failed", T0 + 4, {"query_id": "q-2", "error_code": HOSTILE}),
        Entry(5, "dataset_registered", T0 + 5, {"dataset": HOSTILE, "version": "v",
                                                "digest": "d", "rows": 1}),
        Entry(6, "witness_alarm", T0 + 6, {"peer": HOSTILE, "origin": HOSTILE,
                                           "reason": HOSTILE}),
    ]
    html = build_report(entries, node_name="oem")
    assert_self_contained(html)
    assert "<img" not in html and "<b>bold" not in html
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img src=x"
    # in tables and in the SVG chart labels alike
    assert html.count(escaped) >= 8
    assert re.search(r"<svg[^>]*>.*&lt;script&gt;", html, re.S)


def test_since_until_filter(tmp_path: Path) -> None:
    entries, ids = scenario_entries(tmp_path)
    since = parse_time("2024-05-03")
    until = parse_time("2024-05-04", option="--until", end=True)  # includes May 4
    assert (since, until) == (T0 + 2 * DAY, T0 + 4 * DAY)
    assert parse_time(str(T0 + 2 * DAY)) == since
    assert parse_time("2024-05-03T08:00:00+08:00") == since == parse_time("2024-05-03T00:00Z")
    st = collect(entries, self_names={"oem"}, since_ms=since, until_ms=until)
    inside = {"denied_dealer", "denied_media", "stats_media2", "score_failed"}
    assert {q.query_id for q in st.queries.values() if q.proposed_in_period} == {
        ids[n] for n in inside}
    assert st.flows["media"].messages_sent == 2 and st.flows["media"].rows_from == 0
    assert st.alarms == [] and st.cosigned == {}
    html = build_report(entries, node_name="oem", since_ms=since, until_ms=until,
                        generated_ms=T0)
    assert_self_contained(html)
    for name, qid in ids.items():
        assert (qid in html) == (name in inside), name
    assert "2024-05-03 00:00:00 UTC to 2024-05-05 00:00:00 UTC" in html
    # epoch milliseconds and ISO give the same report
    same = build_report(entries, node_name="oem", since_ms=parse_time(str(since)),
                        until_ms=parse_time(str(until), end=True), generated_ms=T0)
    assert same == html
    for bad in ("yesterday", "2024-13-01", "-5"):
        with pytest.raises(InputError, match="--since"):
            parse_time(bad)


def test_report_for_node_reads_the_period_from_entry_bytes(nodes: Path) -> None:  # noqa: F811
    d = nodes / "oem"
    led = node_ledger(d)
    sc = oem_scenario()
    led.append_many(sc.events)
    led.checkpoint()
    html, audit = report_for_node(d, since_ms=T0 + DAY, until_ms=T0 + 2 * DAY)
    assert audit.ok and "Ledger integrity verified" in html
    assert_self_contained(html)
    assert sc.query_ids["stats_media"] in html and sc.query_ids["match_media"] not in html
    assert f"size {led.size:,} at" in html  # latest signed checkpoint
    # the derived ts_ms column is not trusted: moving it does not move the entry
    eng = led.store.engine
    with eng.begin() as c:
        c.execute(text("UPDATE ledger_entry SET ts_ms = 0"))
    html2, _ = report_for_node(d, since_ms=T0 + DAY, until_ms=T0 + 2 * DAY)
    assert sc.query_ids["stats_media"] in html2
    # an entry that no longer decodes is reported, not silently dropped or a crash
    with eng.begin() as c:
        c.execute(text("UPDATE ledger_entry SET body = :b WHERE idx = 4"), {"b": b"{not json"})
    html3, audit3 = report_for_node(d)
    assert not audit3.ok and "could not be decoded" in html3 and "entry 4:" in html3
    assert "first bad entry index 4" in html3
    led.store.engine.dispose()


def test_report_shows_tampering(nodes: Path) -> None:  # noqa: F811
    d = nodes / "oem"
    led = node_ledger(d)
    led.append_many(oem_scenario().events)
    led.checkpoint()
    edit_entry(d, 9, b'"ts":', b'"ts":4')
    html, audit = report_for_node(d)
    assert not audit.ok
    assert "Ledger verification FAILED: first bad entry index 9: edited" in html
    assert "<h3>Verification problems</h3>" in html
    led.store.engine.dispose()
