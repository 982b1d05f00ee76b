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
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cleanroom.node.launcher import (
    NodeProcess,
    free_port,
    make_node,
    node_command,
    pin_each_other,
)

ROOT = Path(__file__).resolve().parent.parent

# The throw-away PostgreSQL cluster fixtures (pg_url, pg_engine), one per session.
pytest_plugins = ["pgserver"]
__all__ = ["RunningNode", "free_port", "make_node", "node_command", "pin_each_other"]


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


# The fixtures' name for a node process; the class lives in the engine so the simulation
# and the tests start nodes the same way.
RunningNode = NodeProcess


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
