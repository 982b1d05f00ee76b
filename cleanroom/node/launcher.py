"""Run a node as a separate local process: start it, wait until it answers, stop it.

Used by the simulation (three nodes on one machine) and by the test fixtures. Each node
runs ``python -m cleanroom.node node start --dir NODE_DIR`` in its own process with its
own log file; this module only starts, probes (``GET /v1/health`` with the node's own
certificate) and signals processes. It never reads a node's data.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cleanroom.errors import CleanroomError
from cleanroom.node.admin import add_peer, init_node
from cleanroom.node.context import NodeContext
from cleanroom.transport import PeerCallError, PeerClient

START_TIMEOUT = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_command(*args: str) -> list[str]:
    """The node/dataset CLI as a subprocess command (same parser as ``cleanroom node``)."""
    return [sys.executable, "-m", "cleanroom.node", *args]


@dataclass
class NodeProcess:
    """One node directory and, once started, the process serving it."""

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

    def client_from(self, other: NodeProcess, **overrides: object) -> PeerClient:
        """A mutual-TLS client from ``other`` to this node, as ``other`` pins it."""
        return other.context().peer_client(self.name, **overrides)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(
        self,
        timeout: float = START_TIMEOUT,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> NodeProcess:
        """Start the node process (``env`` adds to the environment) and return once
        ``/v1/health`` answers."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                node_command("node", "start", "--dir", str(self.dir)),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env={**os.environ, **(env or {})},
            )
        deadline = time.monotonic() + timeout
        with self.operator_client(retries=0, connect_timeout=2.0, timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise CleanroomError(f"node {self.name} exited early:\n{self.log()}")
                try:
                    client.get_json("/v1/health")
                    return self
                except PeerCallError as exc:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise CleanroomError(
                            f"node {self.name} did not start within {timeout:g} s:\n{self.log()}"
                        ) from exc
                    time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        """Signal the process (SIGTERM by default: graceful) and wait for it to exit."""
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


def make_node(base: Path, name: str, party: str) -> NodeProcess:
    """Initialise ``base/name`` as a node listening on a free loopback port (not started)."""
    port = free_port()
    node_dir = base / name
    init_node(node_dir, name=name, party=party, listen=f"127.0.0.1:{port}")
    return NodeProcess(name=name, party=party, dir=node_dir, port=port)


def pin_each_other(*nodes: NodeProcess) -> None:
    """Pin every node's certificate at every other node (what operators do out of band)."""
    for a in nodes:
        for b in nodes:
            if a is not b:
                add_peer(a.dir, name=b.name, url=b.url, cert_file=b.cert_path, party=b.party)
