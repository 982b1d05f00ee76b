"""Protocol error types shared by every sans-I/O protocol under ``protocols/``.

Two kinds, after h11: :class:`LocalProtocolError` means *we* (the caller of a role object)
did something wrong, such as asking for a message in the wrong state;
:class:`RemoteProtocolError` means the *peer* sent something wrong: malformed, truncated,
replayed, from another session or from the wrong round. Each carries an HTTP status hint
so the web layer can map errors to responses in one place. Messages never include raw
identifiers or message bytes, only what rule was broken.

This module does no I/O and imports nothing from the engine.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base for protocol errors; ``status_hint`` is the HTTP status a web layer should use."""

    def __init__(self, message: str, *, status_hint: int = 400) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class LocalProtocolError(ProtocolError):
    """The local caller misused a role object (wrong state, bad argument). Defaults to 500."""

    def __init__(self, message: str, *, status_hint: int = 500) -> None:
        super().__init__(message, status_hint=status_hint)


class RemoteProtocolError(ProtocolError):
    """The peer sent a message that breaks the protocol.

    ``status_hint`` is 400 for malformed or truncated messages and 409 for messages that
    are well formed but arrive in the wrong state: replays, wrong round, wrong session.
    """

    def __init__(self, message: str, *, status_hint: int = 400) -> None:
        super().__init__(message, status_hint=status_hint)
