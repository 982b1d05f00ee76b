"""kill -9 during appends never leaves a ledger that fails verification.

A child process appends batches (and signs checkpoints) as fast as it can; the test
SIGKILLs it at varying moments, then reopens the database, verifies it, checks that what
survived is a prefix of whole batches, and lets the next child continue the same log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine

from cleanroom.ledger import Ledger

CHILD = r"""
import sys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine
from cleanroom.ledger import Ledger, digest, event

url, seed, batch = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
led = Ledger(create_engine(url), "cleanroom/crash", Ed25519PrivateKey.from_private_bytes(seed))
print("ready", led.size, flush=True)
n = 0
while True:
    start = led.size
    evs = [event("message_sent", query_id="q-crash", session_id="s-%d" % (start // batch),
                 protocol="ecdh_psi", peer="media", round="r%d" % (i % batch),
                 digest=digest(b"%d" % (start + i)), size=start + i)
           for i in range(batch)]
    led.append_many(evs)
    n += 1
    if n % 3 == 0:
        led.checkpoint()
    print("committed", led.size, flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
def test_sigkill_mid_append_leaves_a_verifiable_log(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    url = f"sqlite:///{db}"
    key = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex()
    batch = 250
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    last_size = 0
    for round_no, delay in enumerate((0.35, 0.6, 0.9)):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, url, seed, str(batch)],
                                stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[0] == "ready" and int(ready[1]) == last_size
        # let it commit at least one batch, then kill it somewhere mid-stream
        line = proc.stdout.readline()
        assert line.startswith("committed"), line
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        proc.stdout.close()

        led = Ledger(create_engine(url), "cleanroom/crash", key)
        report = led.verify(deep=round_no == 0)
        assert report.ok, report.summary()
        assert led.size > last_size
        assert led.size % batch == 0, "a partial batch survived the crash"
        assert report.checkpoints_checked >= 1
        # entries are exactly 0..size-1 with matching sizes: nothing half-written
        tail = led.entries(offset=led.size - 1, limit=5)
        assert [e.entry.fields["size"] for e in tail] == [led.size - 1]
        last_size = led.size
        led.store.engine.dispose()
