"""The anonymous query's group-commit ledger recorder (cleanroom.anonq.guard.SessionRecorder)
over a real ledger on SQLite: atomic batches, group commit, order, failures, flush on
shutdown and what a crash can lose."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine

from cleanroom.anonq import guard
from cleanroom.errors import CleanroomError
from cleanroom.ledger import Event, Ledger

ORIGIN = "cleanroom/media"


def _ledger(path: Path) -> Ledger:
    return Ledger(create_engine(f"sqlite:///{path}"), ORIGIN, Ed25519PrivateKey.generate())


def _session(n: int, peer: str = "oem") -> list[Event]:
    """The entries of one whole real-time session number ``n`` (4 or 6 entries)."""
    label = guard.session_label(n.to_bytes(16, "big"))
    qid = f"q-bench{n:06d}"
    return [guard.started(qid, label, peer),
            *guard.message_events(qid, label, peer, ("eval_request", b"a" * n),
                                  ("eval_response", b"b" * n)),
            guard.ended(qid, label, peer, "ok", received=1, sent=1)]


class GatedWriter:
    """The real ledger's append, held at a gate so tests decide when a commit runs."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[int] = []

    def __call__(self, events: Sequence[Event]) -> object:
        self.entered.set()
        assert self.gate.wait(30)
        self.calls.append(len(events))
        return self.ledger.append_many(list(events))


def _types_by_session(ledger: Ledger) -> list[tuple[str, str]]:
    return [(str(e.entry.fields["session_id"]), e.entry.type)
            for e in ledger.entries(0, 10_000)]


def test_batches_queued_during_a_commit_go_in_one_commit_in_order(tmp_path: Path) -> None:
    led = _ledger(tmp_path / "l.db")
    w = GatedWriter(led)
    rec = guard.SessionRecorder(writer=w)
    try:
        first = rec.submit(_session(1))
        assert w.entered.wait(10)  # the writer holds session 1 at the gate
        later = [rec.submit(_session(n)) for n in range(2, 7)]
        assert rec.backlog == 6 * 4
        w.gate.set()
        for fut in [first, *later]:
            guard.wait_durable(fut, 10)
    finally:
        rec.close()
    assert w.calls == [4, 5 * 4]  # group commit: the five queued sessions in one append
    got = _types_by_session(led)
    expected = [(str(e.fields["session_id"]), e.type) for n in range(1, 7) for e in _session(n)]
    assert got == expected  # submission order, every batch contiguous
    assert rec.backlog == 0


def test_a_bad_batch_fails_alone_and_leaves_nothing(tmp_path: Path) -> None:
    led = _ledger(tmp_path / "l.db")
    w = GatedWriter(led)
    rec = guard.SessionRecorder(writer=w)
    try:
        first = rec.submit(_session(1))
        assert w.entered.wait(10)
        good_a = rec.submit(_session(2))
        # Something the ledger refuses at append time (after two valid entries).
        bad = rec.submit([*_session(3)[:2], cast(Event, "not an event")])
        good_b = rec.submit(_session(4))
        w.gate.set()
        for fut in (first, good_a, good_b):
            guard.wait_durable(fut, 10)
        with pytest.raises(CleanroomError, match="refused the session entries"):
            guard.wait_durable(bad, 10)
    finally:
        rec.close()
    sessions = [s for s, _t in _types_by_session(led)]
    bad_label = guard.session_label((3).to_bytes(16, "big"))
    assert bad_label not in sessions  # all or nothing: no entry of the bad batch
    assert len(sessions) == 3 * 4
    assert sessions == sorted(sessions, key=[guard.session_label(n.to_bytes(16, "big"))
                                             for n in (1, 2, 4)].index)


def test_close_writes_everything_queued_then_refuses(tmp_path: Path) -> None:
    led = _ledger(tmp_path / "l.db")
    w = GatedWriter(led)
    rec = guard.SessionRecorder(writer=w, max_batch_events=8)
    first = rec.submit(_session(1))
    assert w.entered.wait(10)
    queued = [rec.submit(_session(n)) for n in range(2, 10)]
    closer = threading.Thread(target=rec.close)
    closer.start()
    w.gate.set()
    closer.join(30)
    assert not closer.is_alive()
    assert all(f.done() and f.exception() is None for f in [first, *queued])
    assert led.size == 9 * 4
    assert all(n <= 8 for n in w.calls)  # no commit over max_batch_events (batches whole)
    late = rec.submit(_session(99))
    with pytest.raises(CleanroomError, match="stopped"):
        guard.wait_durable(late, 1)


def test_record_async_waits_on_the_event_loop(tmp_path: Path) -> None:
    led = _ledger(tmp_path / "l.db")
    rec = guard.SessionRecorder(writer=lambda evs: led.append_many(list(evs)))
    try:
        async def main() -> None:
            await asyncio.gather(*(rec.record_async(_session(n)) for n in range(1, 21)))

        asyncio.run(main())
        assert led.size == 20 * 4
        rec.record(_session(21))
        assert led.size == 21 * 4
    finally:
        rec.close()


def test_backlog_bound_is_reported() -> None:
    gate = threading.Event()
    rec = guard.SessionRecorder(writer=lambda evs: gate.wait(30), max_backlog=10)
    try:
        rec.submit(_session(1))
        assert not rec.backlogged
        futs = [rec.submit(_session(n)) for n in range(2, 5)]
        assert rec.backlogged
        gate.set()
        for f in futs:
            guard.wait_durable(f, 10)
        assert not rec.backlogged
    finally:
        rec.close()


CRASH_CHILD = textwrap.dedent("""
    import os, sys, threading
    from pathlib import Path
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from sqlalchemy import create_engine
    from cleanroom.anonq import guard
    from cleanroom.ledger import Ledger
    sys.path.insert(0, sys.argv[2])
    from test_anonq_recorder import _session

    led = Ledger(create_engine("sqlite:///" + sys.argv[1]), "cleanroom/media",
                 Ed25519PrivateKey.generate())
    calls = [0]
    never = threading.Event()

    def writer(events):
        calls[0] += 1
        if calls[0] > 1:
            never.wait()  # the second commit never happens: the process dies first
        return led.append_many(list(events))

    rec = guard.SessionRecorder(writer=writer)
    guard.wait_durable(rec.submit(_session(1)), 30)
    stuck = [rec.submit(_session(n)) for n in range(2, 6)]
    print("durable 1; pending", sum(not f.done() for f in stuck), flush=True)
    os._exit(0)  # a crash: no close(), no flush
""")


def test_a_crash_loses_only_entries_not_yet_durable(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    out = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(db), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "durable 1; pending 4" in out.stdout
    led = Ledger(create_engine(f"sqlite:///{db}"), ORIGIN, Ed25519PrivateKey.generate())
    got = _types_by_session(led)
    # Exactly the session whose future resolved; nothing of the unresolved ones, no part.
    assert got == [(str(e.fields["session_id"]), e.type) for e in _session(1)]
