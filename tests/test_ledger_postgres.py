"""The ledger on a real PostgreSQL server (a throw-away cluster started by the fixture).

The server comes from tests/pgserver.py; skipped when PostgreSQL or psycopg is missing.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pgserver import pgserver_required
from sqlalchemy import text
from sqlalchemy.engine import Engine

from cleanroom.ledger import Ledger, LedgerStore, ProblemKind, digest, event, verify_store

pytestmark = pgserver_required()


def test_ledger_on_postgres(pg_engine: Engine) -> None:
    key = Ed25519PrivateKey.generate()
    led = Ledger(pg_engine, "cleanroom/pg", key)
    evs = [event("message_sent", query_id="q-pg", session_id="s-1", protocol="ecdh_psi",
                 peer="media_x" if i % 2 else "dealer", round="r1", digest=digest(b"%d" % i),
                 size=i) for i in range(300)]
    assert led.append_many(evs[:150])[0] == 0
    led.checkpoint()
    led.append_many(evs[150:])
    led.checkpoint()
    assert led.verify(deep=True).ok
    assert len(led.entries(peer="media_x", limit=1000)) == 150
    assert led.entries(peer="media%") == []
    again = Ledger(pg_engine, "cleanroom/pg", key)
    assert again.root() == led.root()

    with pg_engine.begin() as c:
        c.execute(text("DELETE FROM ledger_entry WHERE idx = 170"))
    rep = verify_store(LedgerStore(pg_engine, create=False), "cleanroom/pg", [led.verifier])
    first = rep.first_problem
    assert first is not None and first.kind is ProblemKind.DELETED and first.index == 170
