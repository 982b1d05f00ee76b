"""How a query type plugs into the lifecycle: the :class:`Runner` interface and its registry.

A runner owns what is specific to one query type; the orchestrator owns everything else
(policy decisions, proposals, approvals, ledger entries, deadlines, cancellation, result
delivery, restarts). To add a query type:

1. write a module with a subclass of :class:`Runner` (``query_type = "match"``) and, at
   module level, ``register(MatchRunner())``;
2. add the module's dotted name to :data:`RUNNER_MODULES`.

A runner implements

- :meth:`Runner.validate` (every party, after its policy passed, before any data is
  touched): refuse a spec the type cannot run by raising :class:`SpecRefused` with a rule
  id (``spec.<type>.<what>``) and the spec field; check the common parameters and the
  inputs of the validating party only;
- :meth:`Runner.run` (requester side): load this node's inputs, drive one or more protocol
  sessions with ``run.session(peer, protocol)`` (each :meth:`SessionChannel.exchange` sends
  one protocol message to the counterparty and returns its reply; the node only moves the
  bytes and records their digest and size), and return a :class:`RunResult` addressed to
  ``spec.receiver``. Raise :class:`QueryFailure` to fail the query with a code (and a rule
  and field when a threshold refused it);
- :meth:`Runner.open_responder` (counterparty side): return a :class:`SessionResponder`
  for a session the requester opens; its ``handle(message) -> reply`` is called once per
  message received (serially, one lock per session), ``finished`` tells when the session
  is complete. Protocol objects from ``protocols/`` fit directly; their
  :class:`~protocols.errors.RemoteProtocolError` becomes the HTTP status it hints (4xx).

Runners must not open sockets themselves, write ledger entries or touch query states.
"""

from __future__ import annotations

import hashlib
import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cleanroom.errors import CleanroomError
from cleanroom.node.context import NodeContext
from cleanroom.policy import Policy, QuerySpec

#: Modules that register runners when imported. Add yours here.
RUNNER_MODULES: tuple[str, ...] = (
    "cleanroom.queries.segment_stats",
    "cleanroom.queries.match",
    "cleanroom.queries.store_recommendation",
    "cleanroom.queries.lead_model",
    "cleanroom.queries.lead_score",
)


class SpecRefused(CleanroomError):
    """The spec cannot be run by its query type; names the rule and the spec field."""

    def __init__(self, rule: str, field: str, reason: str) -> None:
        super().__init__(f"{reason} (rule {rule}, field {field})")
        self.rule = rule
        self.field = field
        self.reason = reason


class QueryFailure(CleanroomError):
    """The query ends as failed; ``code`` is a short name, ``rule``/``field`` when a rule
    (e.g. a minimum size) stopped it, ``party`` whose rule it was."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        rule: str | None = None,
        field: str | None = None,
        party: str | None = None,
        peer: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.rule = rule
        self.field = field
        self.party = party
        self.peer = peer


class QueryAborted(CleanroomError):
    """The query was cancelled or timed out while running; the runner should just stop."""


@dataclass(frozen=True)
class Threshold:
    value: int
    rule: str  # "<party>:<policy rule>" or "spec:params.<name>"


@dataclass(frozen=True)
class RunResult:
    """What the requester side produced: ``payload`` (JSON-able) for ``spec.receiver``,
    the number of result rows, and the epsilon of noise applied (0 without noise)."""

    payload: dict[str, Any]
    rows: int
    epsilon: float = 0.0


class SessionChannel(Protocol):
    """The requester's end of one protocol session with one counterparty."""

    session_id: str
    peer: str
    protocol: str

    @property
    def protocol_session_id(self) -> bytes:
        """16 bytes both ends derive from the query and session ids (for protocols/)."""
        ...

    def exchange(self, message: bytes, *, round: str) -> bytes:
        """Send one message (``round`` names it in the ledgers); return the reply bytes
        (``b""`` when the protocol has nothing to say back)."""
        ...


class SessionResponder(Protocol):
    """The counterparty's end of one protocol session."""

    def handle(self, message: bytes) -> bytes: ...

    @property
    def finished(self) -> bool: ...


@dataclass
class RequesterRun:
    """Everything :meth:`Runner.run` may use at the requester."""

    ctx: NodeContext
    query_id: str
    spec: QuerySpec
    policy: Policy
    min_intersection: Threshold
    min_group: Threshold
    open_session: Callable[[str, str, str], Any]  # (peer, protocol, name) -> context manager
    check_alive: Callable[[], None]  # raises QueryAborted after a cancel or timeout
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def me(self) -> str:
        return self.ctx.config.name

    def session(self, peer: str, protocol: str, name: str = "main") -> Any:
        """``with run.session("media", "psi") as ch: reply = ch.exchange(msg, round=...)``"""
        return self.open_session(peer, protocol, name)


@dataclass
class CounterpartyRun:
    """Everything :meth:`Runner.open_responder` may use at a counterparty."""

    ctx: NodeContext
    query_id: str
    spec: QuerySpec
    policy: Policy

    @property
    def me(self) -> str:
        return self.ctx.config.name


def protocol_session_id(query_id: str, session_id: str) -> bytes:
    """The 16-byte session id protocols bind their messages to (same at both ends)."""
    return hashlib.sha256(f"cleanroom-session/v1\0{query_id}\0{session_id}".encode()).digest()[
        :16
    ]


class Runner(ABC):
    """One query type. Instances are shared across threads: keep them stateless."""

    query_type: str = ""

    @abstractmethod
    def validate(self, spec: QuerySpec, party: str) -> None:
        """Raise :class:`SpecRefused` if this type cannot run ``spec``: the parts common to
        all parties and the inputs of ``party`` (the node validating). Each node checks
        its own inputs, so a refusal is the refusal of the party whose inputs are wrong."""

    @abstractmethod
    def run(self, run: RequesterRun) -> RunResult:
        """Requester side: drive the sessions, compute the result for ``spec.receiver``."""

    @abstractmethod
    def open_responder(
        self, run: CounterpartyRun, session_id: str, protocol: str, peer: str
    ) -> SessionResponder:
        """Counterparty side: a responder for a new session opened by ``peer``."""


_registry: dict[str, Runner] = {}
_loaded = False
_load_lock = threading.Lock()


def register(runner: Runner) -> Runner:
    if not runner.query_type:
        raise ValueError("a runner needs a query_type")
    _registry[runner.query_type] = runner
    return runner


def _load() -> None:
    global _loaded
    with _load_lock:
        if not _loaded:
            for name in RUNNER_MODULES:
                importlib.import_module(name)
            _loaded = True


def get_runner(query_type: str) -> Runner | None:
    _load()
    return _registry.get(query_type)


def runner_types() -> list[str]:
    _load()
    return sorted(_registry)
