"""States and the one transition table of the bucketed ECDH PSI protocol (both roles).

The role objects in :mod:`protocols.psi.roles` consult :data:`TRANSITIONS` for every
message they send or receive; anything not in the table moves the object to ``ERROR``.
:func:`state_table_markdown` renders the table for docs/protocols/psi.md, so the document
and the code cannot drift apart. Per-bucket bookkeeping (which buckets were requested,
answered, finished) is tracked inside the role objects on top of these session states.

No I/O here.
"""

from __future__ import annotations

from enum import Enum


class Role(Enum):
    REQUESTER = "requester"
    RESPONDER = "responder"


class State(Enum):
    IDLE = "IDLE"
    AWAIT_ACK = "AWAIT_ACK"  # requester sent HELLO
    EXCHANGING = "EXCHANGING"  # buckets flowing
    DONE = "DONE"  # every bucket finished
    ERROR = "ERROR"  # terminal: a protocol rule was broken


class Event(Enum):
    SEND_HELLO = "send HELLO"
    RECV_HELLO = "recv HELLO / send HELLO_ACK"
    RECV_HELLO_ACK = "recv HELLO_ACK"
    SEND_REQUEST = "send REQUEST(b)"
    RECV_REQUEST = "recv REQUEST(b) / send RESPONSE(b)"
    RECV_RESPONSE = "recv RESPONSE(b)"
    LAST_BUCKET = "last bucket finished"


TRANSITIONS: dict[tuple[Role, State, Event], State] = {
    (Role.REQUESTER, State.IDLE, Event.SEND_HELLO): State.AWAIT_ACK,
    (Role.REQUESTER, State.AWAIT_ACK, Event.RECV_HELLO_ACK): State.EXCHANGING,
    (Role.REQUESTER, State.EXCHANGING, Event.SEND_REQUEST): State.EXCHANGING,
    (Role.REQUESTER, State.EXCHANGING, Event.RECV_RESPONSE): State.EXCHANGING,
    (Role.REQUESTER, State.EXCHANGING, Event.LAST_BUCKET): State.DONE,
    (Role.RESPONDER, State.IDLE, Event.RECV_HELLO): State.EXCHANGING,
    (Role.RESPONDER, State.EXCHANGING, Event.RECV_REQUEST): State.EXCHANGING,
    (Role.RESPONDER, State.EXCHANGING, Event.LAST_BUCKET): State.DONE,
}


def next_state(role: Role, state: State, event: Event) -> State | None:
    """The state after ``event``, or ``None`` if the event is illegal in ``state``."""
    return TRANSITIONS.get((role, state, event))


def state_table_markdown() -> str:
    """The transition table as a Markdown table (any event not listed -> ERROR)."""
    lines = ["| role | state | event | next state |", "|---|---|---|---|"]
    for (role, state, event), nxt in TRANSITIONS.items():
        lines.append(f"| {role.value} | {state.value} | {event.value} | {nxt.value} |")
    return "\n".join(lines)
