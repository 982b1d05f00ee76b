"""States and the one transition table of the vertical LR training roles.

Every role (guest, media host, dealer host) checks each received message type against
:data:`ACCEPTS` for its current state; anything else moves it to ``ERROR`` and raises
:class:`~protocols.errors.RemoteProtocolError` (409). :func:`state_table_markdown` renders
the table for docs/protocols/lead-scoring.md. No I/O here.
"""

from __future__ import annotations

from enum import Enum

from protocols.vertical_lr.messages import MsgType, Party


class State(Enum):
    IDLE = "IDLE"  # constructed, start() not called
    SETUP = "SETUP"  # keys, encrypted rows, masked Gram blocks and shares flowing
    READY = "READY"  # hosts: setup or an epoch done, waiting for the guest's CONTROL
    EPOCH = "EPOCH"  # cross terms and aggregates of one epoch flowing
    DONE = "DONE"  # stopped; the role's model slice is final
    ERROR = "ERROR"  # terminal: a protocol rule was broken


ACCEPTS: dict[tuple[Party, State], frozenset[MsgType]] = {
    # the guest is the exponent holder of its pairs: it gets ROWS and SHAREs, never MASKED
    (Party.GUEST, State.SETUP): frozenset({MsgType.KEYS, MsgType.ROWS, MsgType.SHARE,
                                           MsgType.READY}),
    (Party.GUEST, State.EPOCH): frozenset({MsgType.CROSS, MsgType.AGG, MsgType.VAL}),
    # media owns the rows of both its pairs: it gets MASKED blocks only
    (Party.MEDIA, State.SETUP): frozenset({MsgType.KEYS, MsgType.MASKED}),
    (Party.MEDIA, State.READY): frozenset({MsgType.CONTROL, MsgType.CROSS}),
    (Party.MEDIA, State.EPOCH): frozenset({MsgType.CROSS, MsgType.AGG}),
    # the dealer owns rows for the guest and holds exponents for media
    (Party.DEALER, State.SETUP): frozenset({MsgType.KEYS, MsgType.ROWS, MsgType.MASKED,
                                            MsgType.SHARE}),
    (Party.DEALER, State.READY): frozenset({MsgType.CONTROL}),
    (Party.DEALER, State.EPOCH): frozenset({MsgType.AGG}),
}

TRANSITIONS: tuple[tuple[str, State, str, State], ...] = (
    ("any", State.IDLE, "start(): send KEYS (hosts also ROWS)", State.SETUP),
    ("host", State.SETUP, "last MASKED/SHARE handled: send READY", State.READY),
    ("guest", State.SETUP, "both SHAREs and both READYs: send CONTROL(0, go)", State.EPOCH),
    ("host", State.READY, "recv CONTROL(t, go): send CROSS", State.EPOCH),
    ("host", State.EPOCH, "recv AGG(t): update; VAL on check epochs", State.READY),
    ("guest", State.EPOCH, "recv AGG(t) (+ VALs): update; send CONTROL(t+1, go)", State.EPOCH),
    ("guest", State.EPOCH, "stop rule met: send CONTROL(stop, best check)", State.DONE),
    ("host", State.READY, "recv CONTROL(stop, best check)", State.DONE),
    ("any", State.SETUP, "any message not accepted in the current state (any state)",
     State.ERROR),
)


def accepts(party: Party, state: State, mtype: MsgType) -> bool:
    return mtype in ACCEPTS.get((party, state), frozenset())


def state_table_markdown() -> str:
    lines = ["| role | state | event | next state |", "|---|---|---|---|"]
    for role, state, event, nxt in TRANSITIONS:
        lines.append(f"| {role} | {state.value} | {event} | {nxt.value} |")
    lines.append("")
    lines.append("| role | state | accepted message types |")
    lines.append("|---|---|---|")
    for (party, state), types in ACCEPTS.items():
        names = ", ".join(t.name for t in sorted(types))
        lines.append(f"| {party.name.lower()} | {state.value} | {names} |")
    return "\n".join(lines)
