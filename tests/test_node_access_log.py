"""The access-log summary of direct routes (cleanroom.node.app.AccessSummary): counts per
caller, method, path and status, one line per interval, nothing when nothing happened."""

from __future__ import annotations

import logging

import pytest

from cleanroom.node.app import AccessSummary

LOGGER = "cleanroom.node.access"


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_summary_counts_per_key_and_writes_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    summary = AccessSummary(interval=3600)
    eval_path = "/v1/peer/anonq/tables/t/eval"
    for ms in (1.0, 3.0):
        summary.add("peer:oem", "POST", eval_path, 200, ms)
    summary.add("peer:oem", "POST", "/v1/peer/anonq/tables/t/buckets", 200, 7.5)
    summary.add("peer:dealer", "POST", eval_path, 200, 2.0)
    assert _lines(caplog) == []  # nothing before the interval ends
    summary.flush()
    (line,) = _lines(caplog)
    assert line.startswith("access summary, 4 requests in ")
    assert "peer:oem POST /v1/peer/anonq/tables/t/eval 200 x2 (mean 2.0ms, max 3.0ms)" in line
    assert "peer:oem POST /v1/peer/anonq/tables/t/buckets 200 x1 (mean 7.5ms" in line
    assert "peer:dealer POST /v1/peer/anonq/tables/t/eval 200 x1" in line
    summary.flush()  # counted requests were written once; an empty interval writes nothing
    assert len(_lines(caplog)) == 1


def test_summary_is_written_when_a_request_ends_after_the_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    summary = AccessSummary(interval=0.0)
    summary.add("peer:oem", "POST", "/v1/peer/x", 204, 0.5)
    summary.add("peer:oem", "POST", "/v1/peer/x", 204, 0.7)
    lines = _lines(caplog)
    assert len(lines) == 2
    assert all(line.startswith("access summary, 1 requests") for line in lines)
