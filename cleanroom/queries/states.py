"""Joint query lifecycle: the states, the one table of allowed transitions, restart rules.

Both roles (the requester's copy of a query and each counterparty's copy) use the same
states; :data:`TRANSITIONS` lists every allowed move, :data:`ON_RESTART` says what a node
does with a query found in each state when it starts. :func:`transition_table_markdown`
renders both for docs/governance.md so the document and the code cannot drift apart.

No I/O here.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    SUBMITTED = "submitted"  # requester: stored, own policy not checked yet
    HELD = "held"  # waiting for this node's operator (query approve|deny)
    PROPOSED = "proposed"  # requester: signed proposals out, waiting for decisions
    APPROVED = "approved"  # every party approved; sessions not started yet
    RUNNING = "running"  # protocol sessions under way
    COMPLETED = "completed"  # result delivered to the receiver
    DENIED = "denied"  # a policy (or a person) refused; rule and field recorded
    FAILED = "failed"  # an error, a threshold or a restart ended it
    CANCELLED = "cancelled"  # the requester's operator cancelled it
    TIMED_OUT = "timed_out"  # the deadline passed before completion


TERMINAL: frozenset[State] = frozenset(
    {State.COMPLETED, State.DENIED, State.FAILED, State.CANCELLED, State.TIMED_OUT}
)
ACTIVE: frozenset[State] = frozenset(State) - TERMINAL

_ENDINGS = {State.FAILED, State.CANCELLED, State.TIMED_OUT}

#: role -> state -> states it may move to. Anything else is refused.
TRANSITIONS: dict[str, dict[State, frozenset[State]]] = {
    "requester": {
        State.SUBMITTED: frozenset({State.HELD, State.PROPOSED, State.DENIED, *_ENDINGS}),
        State.HELD: frozenset({State.PROPOSED, State.DENIED, *_ENDINGS}),
        State.PROPOSED: frozenset({State.APPROVED, State.DENIED, *_ENDINGS}),
        State.APPROVED: frozenset({State.RUNNING, *_ENDINGS}),
        State.RUNNING: frozenset({State.COMPLETED, *_ENDINGS}),
    },
    "counterparty": {
        State.HELD: frozenset({State.APPROVED, State.DENIED, *_ENDINGS}),
        State.APPROVED: frozenset({State.RUNNING, State.COMPLETED, *_ENDINGS}),
        State.RUNNING: frozenset({State.COMPLETED, *_ENDINGS}),
    },
}

#: What a starting node does with a query it finds in each active state.
ON_RESTART: dict[str, dict[State, str]] = {
    "requester": {
        State.SUBMITTED: "resume: check the own policy and propose",
        State.HELD: "keep: still waits for the operator",
        State.PROPOSED: "resume: re-send unanswered proposals (idempotent), wait for decisions",
        State.APPROVED: "resume: start the sessions (none had started)",
        State.RUNNING: "fail (node_restarted): sessions were cut; counterparties are told",
    },
    "counterparty": {
        State.HELD: "keep: still waits for the operator",
        State.APPROVED: "keep: waits for the requester's sessions",
        State.RUNNING: "fail (node_restarted) if a session was open; else keep waiting "
        "for the requester's outcome",
    },
}


def allowed(role: str, old: State, new: State) -> bool:
    return new in TRANSITIONS.get(role, {}).get(old, frozenset())


def transition_table_markdown() -> str:
    """Allowed transitions and restart behaviour as Markdown tables."""
    lines = ["| role | from | allowed next states | after a node restart |", "|---|---|---|---|"]
    for role, table in TRANSITIONS.items():
        for state, nxt in table.items():
            order = [s.value for s in State if s in nxt]
            lines.append(
                f"| {role} | `{state.value}` | {', '.join(order)} | {ON_RESTART[role][state]} |"
            )
    return "\n".join(lines)
