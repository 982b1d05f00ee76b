"""Shared fixtures: real node processes with real certificates on free loopback ports.

- ``three_nodes`` (session): OEM, media and dealer nodes in temporary directories, each
  pinning the other two, started as separate ``python -m cleanroom.node node start``
  processes; a dict ``{"oem": RunningNode, "media": ..., "dealer": ...}``. Shared by the
  whole session: do not unpin peers or stop these nodes in a test (use ``node_factory``).
- ``node_factory`` (function): ``make(name, party) -> RunningNode`` initialises a node
  directory (not started); ``RunningNode.start()`` runs it; everything started through the
  factory is stopped at teardown. ``pin_each_other(*nodes)`` pins nodes mutually.

``RunningNode`` gives ``context()`` (a :class:`NodeContext` on its directory),
``operator_client()`` (own certificate + operator token), ``client_from(other)`` (a
mutual-TLS client from node ``other`` to this node, as ``other`` pins it), ``stop()``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cleanroom.node.admin import add_peer, init_node
from cleanroom.node.context import NodeContext
from cleanroom.transport import PeerCallError, PeerClient

ROOT = Path(__file__).resolve().parent.parent

# The throw-away PostgreSQL cluster fixtures (pg_url, pg_engine), one per session.
pytest_plugins = ["pgserver"]
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_command(*args: str) -> list[str]:
    """The node/dataset CLI as a subprocess command (same parser as ``cleanroom node``)."""
    return [sys.executable, "-m", "cleanroom.node", *args]


def run_node_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        node_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=full_env,
    )


@dataclass
class RunningNode:
    name: str
    party: str
    dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.dir.parent / f"{self.name}.log"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def cert_path(self) -> Path:
        return self.dir / "identity" / "node.pem"

    def context(self) -> NodeContext:
        return NodeContext.open(self.dir)

    def operator_client(self, **overrides: object) -> PeerClient:
        return self.context().operator_client(**overrides)

    def client_from(self, other: RunningNode, **overrides: object) -> PeerClient:
        return other.context().peer_client(self.name, **overrides)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(
        self, timeout: float = START_TIMEOUT, env: dict[str, str] | None = None
    ) -> RunningNode:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            node_command("node", "start", "--dir", str(self.dir)),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        log.close()
        deadline = time.monotonic() + timeout
        with self.operator_client(retries=0, connect_timeout=2.0, timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"node {self.name} exited early:\n{self.log()}")
                try:
                    client.get_json("/v1/health")
                    return self
                except PeerCallError as exc:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(
                            f"node {self.name} did not start:\n{self.log()}"
                        ) from exc
                    time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code


def make_node(base: Path, name: str, party: str) -> RunningNode:
    port = free_port()
    node_dir = base / name
    init_node(node_dir, name=name, party=party, listen=f"127.0.0.1:{port}")
    return RunningNode(name=name, party=party, dir=node_dir, port=port)


def pin_each_other(*nodes: RunningNode) -> None:
    for a in nodes:
        for b in nodes:
            if a is not b:
                add_peer(a.dir, name=b.name, url=b.url, cert_file=b.cert_path, party=b.party)


@pytest.fixture(scope="session")
def three_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RunningNode]]:
    base = tmp_path_factory.mktemp("three_nodes")
    nodes = {party: make_node(base, party, party) for party in ("oem", "media", "dealer")}
    pin_each_other(*nodes.values())
    try:
        for node in nodes.values():
            node.start()
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[[str, str], RunningNode]]:
    made: list[RunningNode] = []

    def make(name: str, party: str) -> RunningNode:
        node = make_node(tmp_path, name, party)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()
