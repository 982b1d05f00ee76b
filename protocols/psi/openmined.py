"""openmined-psi compatibility: serve stock openmined-psi clients from a node.

A thin adapter over ``private_set_intersection.python.server``: it produces the library's
``ServerSetup`` message (GCS, Bloom filter or raw) for the node's own items and turns a
client's serialised ``Request`` into serialised ``Response`` bytes. The wire format is the
library's protobuf, so clients in any of its languages can talk to it; bytes in, bytes
out, no I/O here.

Thread safety: the library's server objects are **not** thread-safe (two threads on one
object can crash the process). Each :class:`OpenMinedServer` therefore owns one library
object, serialises calls on it with a lock, and refuses use from another process than the
one that built it (a forked copy would share native state). :func:`worker_server` gives
every (process, thread) its own object built from the same key, which is what a worker
pool should use: all objects of one session must share the key, because the setup
message and the responses are both computed with it.

Errors: bytes that are not a ``Request``, points that do not decode, or a
``reveal_intersection`` flag that differs from the server's raise
:class:`~protocols.errors.RemoteProtocolError` (400).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from enum import Enum

import private_set_intersection.python as _psi
from google.protobuf.message import DecodeError

from protocols.errors import LocalProtocolError, RemoteProtocolError


class SetupKind(Enum):
    """The server-setup data structure sent to the client."""

    GCS = "gcs"
    BLOOM_FILTER = "bloom_filter"
    RAW = "raw"


_DS = {
    SetupKind.GCS: _psi.DataStructure.GCS,
    SetupKind.BLOOM_FILTER: _psi.DataStructure.BLOOM_FILTER,
    SetupKind.RAW: _psi.DataStructure.RAW,
}

DEFAULT_FPR = 1e-9


class OpenMinedServer:
    """One openmined-psi server object, guarded for use by one worker at a time."""

    def __init__(self, *, reveal_intersection: bool, key: bytes | None = None) -> None:
        if key is None:
            self._server = _psi.server.CreateWithNewKey(reveal_intersection)
        else:
            # The library's CreateFromKey: reusing a key across sessions makes their
            # encrypted values linkable. Only share a key between the workers of ONE session.
            self._server = _psi.server.CreateFromKey(key, reveal_intersection)
        self.reveal_intersection = reveal_intersection
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @property
    def key(self) -> bytes:
        """The session key, to build sibling objects in other workers of the same session."""
        with self._guard():
            return bytes(self._server.GetPrivateKeyBytes())

    def _guard(self) -> threading.Lock:
        if os.getpid() != self._pid:
            raise LocalProtocolError(
                "an openmined-psi server object was used in another process than the one "
                "that built it; build one per worker with worker_server()"
            )
        return self._lock

    def setup_message(
        self,
        items: Sequence[str | bytes],
        *,
        client_set_size: int,
        fpr: float = DEFAULT_FPR,
        kind: SetupKind = SetupKind.GCS,
    ) -> bytes:
        """Serialised ``ServerSetup`` for the node's items.

        ``fpr`` is the library's rate: the probability that a client query of
        ``client_set_size`` items sees any false positive (GCS and Bloom filter; raw has none).
        """
        if not 0.0 < fpr < 1.0:
            raise LocalProtocolError("fpr must be strictly between 0 and 1")
        if client_set_size < 1:
            raise LocalProtocolError("client_set_size must be at least 1")
        values = [x.decode("utf-8") if isinstance(x, bytes) else x for x in items]
        with self._guard():
            setup = self._server.CreateSetupMessage(fpr, client_set_size, values, _DS[kind])
        return bytes(setup.SerializeToString())

    def process_request(self, request_bytes: bytes) -> bytes:
        """A client's serialised ``Request`` -> serialised ``Response``."""
        request = _psi.Request()
        try:
            request.ParseFromString(bytes(request_bytes))
        except (DecodeError, TypeError, ValueError):
            raise RemoteProtocolError("openmined-psi: bytes are not a Request message") from None
        if request.reveal_intersection != self.reveal_intersection:
            raise RemoteProtocolError(
                "openmined-psi: client asks for reveal_intersection="
                f"{request.reveal_intersection}, this server is configured for "
                f"{self.reveal_intersection}",
                status_hint=400,
            )
        with self._guard():
            try:
                response = self._server.ProcessRequest(request)
            except RuntimeError:
                raise RemoteProtocolError(
                    "openmined-psi: request holds a point that does not decode"
                ) from None
        return bytes(response.SerializeToString())


_local = threading.local()


def worker_server(key: bytes, *, reveal_intersection: bool) -> OpenMinedServer:
    """This (process, thread)'s own server object for the session identified by ``key``."""
    cache: dict[tuple[int, bytes, bool], OpenMinedServer] | None = getattr(_local, "servers", None)
    if cache is None:
        cache = {}
        _local.servers = cache
    slot = (os.getpid(), key, reveal_intersection)
    server = cache.get(slot)
    if server is None:
        server = OpenMinedServer(reveal_intersection=reveal_intersection, key=key)
        cache[slot] = server
    return server


def release_worker_server(key: bytes) -> None:
    """Forget this thread's objects for a finished session (the key leaves memory with them)."""
    cache: dict[tuple[int, bytes, bool], OpenMinedServer] | None = getattr(_local, "servers", None)
    if cache:
        for slot in [s for s in cache if s[1] == key]:
            del cache[slot]
