"""States and the one transition table of the anonymous query (both roles, all modes).

The role objects in :mod:`protocols.labeled_psi.roles` consult :data:`TRANSITIONS` for
every message they send or receive; anything not in the table moves the object to
``ERROR``. :func:`state_table_markdown` renders the table for
docs/protocols/anonymous-query.md. Same conventions as :mod:`protocols.psi.states`
(one table for both roles; an event names what is received and what is sent in reply).
No I/O here.
"""

from __future__ import annotations

from enum import Enum


class Role(Enum):
    QUERIER = "querier"
    OWNER = "owner"


class State(Enum):
    IDLE = "IDLE"
    AWAIT_EVAL = "AWAIT_EVAL"  # querier sent EVAL_REQUEST
    EVALUATED = "EVALUATED"  # real-time: evaluations done, buckets not yet asked
    AWAIT_BUCKETS = "AWAIT_BUCKETS"  # querier sent BUCKET_REQUEST
    AWAIT_TABLE = "AWAIT_TABLE"  # querier sent TABLE_REQUEST
    DONE = "DONE"
    ERROR = "ERROR"  # terminal: a protocol rule was broken


class Event(Enum):
    SEND_EVAL = "send EVAL_REQUEST"
    RECV_EVAL_BATCH = "recv EVAL_RESPONSE (batch)"
    RECV_EVAL_REALTIME = "recv EVAL_RESPONSE (real-time)"
    SEND_BUCKETS = "send BUCKET_REQUEST"
    RECV_BUCKETS = "recv BUCKET_RESPONSE"
    SEND_TABLE_REQUEST = "send TABLE_REQUEST"
    RECV_TABLE = "recv TABLE_RESPONSE"
    ANSWER_EVAL_BATCH = "recv EVAL_REQUEST (batch) / send EVAL_RESPONSE"
    ANSWER_EVAL_REALTIME = "recv EVAL_REQUEST (real-time) / send EVAL_RESPONSE"
    ANSWER_BUCKETS = "recv BUCKET_REQUEST / send BUCKET_RESPONSE"
    ANSWER_TABLE = "recv TABLE_REQUEST / send TABLE_RESPONSE"


TRANSITIONS: dict[tuple[Role, State, Event], State] = {
    (Role.QUERIER, State.IDLE, Event.SEND_EVAL): State.AWAIT_EVAL,
    (Role.QUERIER, State.AWAIT_EVAL, Event.RECV_EVAL_BATCH): State.DONE,
    (Role.QUERIER, State.AWAIT_EVAL, Event.RECV_EVAL_REALTIME): State.EVALUATED,
    (Role.QUERIER, State.EVALUATED, Event.SEND_BUCKETS): State.AWAIT_BUCKETS,
    (Role.QUERIER, State.AWAIT_BUCKETS, Event.RECV_BUCKETS): State.DONE,
    (Role.QUERIER, State.IDLE, Event.SEND_TABLE_REQUEST): State.AWAIT_TABLE,
    (Role.QUERIER, State.AWAIT_TABLE, Event.RECV_TABLE): State.DONE,
    (Role.OWNER, State.IDLE, Event.ANSWER_EVAL_BATCH): State.DONE,
    (Role.OWNER, State.IDLE, Event.ANSWER_EVAL_REALTIME): State.EVALUATED,
    (Role.OWNER, State.EVALUATED, Event.ANSWER_BUCKETS): State.DONE,
    (Role.OWNER, State.IDLE, Event.ANSWER_TABLE): State.DONE,
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
