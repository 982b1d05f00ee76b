"""The PSI session driver (:mod:`cleanroom.queries.psi_session`) end to end in one process.

:func:`run_requester` talks to a :class:`PsiSessionResponder` through an in-memory channel
(no node, no network), with the drivers' real streaming: several buckets per batch message,
the responder's own buckets blinded ahead of the requests on a background partition, jobs
in an executor. Results must equal the plaintext join on normalised identifiers, for random
messy inputs with duplicates and empty sets, in both reveal modes; the transcript never
holds an identifier, raw or normalised.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cleanroom.identity import normalize_phone
from cleanroom.queries.psi_session import (
    PsiSessionResponder,
    Streaming,
    decode_batch,
    new_requester,
    run_requester,
)
from protocols.psi import Mode, PsiResponder
from protocols.psi.multikey import encode_item

SID = bytes(range(16))

#: small buckets and messages so that a few dozen items already make several batches
SMALL = Streaming(items_per_bucket=4, buckets_per_message=2, min_messages=2,
                  min_items_per_bucket=1, min_buckets=4)

#: the driver only needs ``submit`` and a worker count: threads run the same pure jobs
THREADS = ThreadPoolExecutor(2)


class MemoryChannel:
    """The requester's end of a session whose other end is a responder in this process."""

    peer = "media"
    protocol = "psi.test"
    session_id = "s-test"

    def __init__(self, responder: PsiSessionResponder) -> None:
        self.responder = responder
        self.transcript: list[tuple[str, bytes, bytes]] = []

    @property
    def protocol_session_id(self) -> bytes:
        return SID

    def exchange(self, message: bytes, *, round: str) -> bytes:
        reply = self.responder.handle(message)
        self.transcript.append((round, message, reply))
        return reply


def _phone(person: int, style: int) -> str:
    """One person's phone number written one of several messy ways."""
    digits = f"139{person:08d}"
    return [digits, f"+86 {digits[:3]} {digits[3:7]} {digits[7:]}",
            f"0086-{digits[:3]}-{digits[3:7]}-{digits[7:]}", f" {digits} "][style]


people = st.lists(st.tuples(st.integers(0, 30), st.integers(0, 3)), max_size=40)


def _items(rows: list[tuple[int, int]]) -> tuple[list[str], list[bytes]]:
    raw = [_phone(p, s) for p, s in rows]
    norm = [normalize_phone(x) for x in raw]
    assert all(n is not None for n in norm)
    return raw, [encode_item("phone", n) for n in norm if n is not None]


def _run(r: list[bytes], s: list[bytes], mode: Mode, pool: Any,
         streaming: Streaming = SMALL) -> tuple[Any, PsiSessionResponder, MemoryChannel]:
    responder = PsiSessionResponder(
        PsiResponder(s, allowed_modes=frozenset({mode}), expected_session_id=SID), pool=pool)
    channel = MemoryChannel(responder)
    role = new_requester(r, mode=mode, session_id=channel.protocol_session_id,
                         streaming=streaming)
    result = run_requester(channel, role, streaming=streaming, pool=pool)
    return result, responder, channel


def _frames(channel: MemoryChannel) -> Iterator[bytes]:
    for _, sent, got in channel.transcript:
        yield sent
        yield got


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(r_rows=people, s_rows=people, mode=st.sampled_from(list(Mode)),
       threaded=st.booleans())
def test_session_result_equals_plaintext_join(r_rows: list[tuple[int, int]],
                                              s_rows: list[tuple[int, int]], mode: Mode,
                                              threaded: bool) -> None:
    r_raw, r = _items(r_rows)
    s_raw, s = _items(s_rows)
    result, responder, channel = _run(r, s, mode, THREADS if threaded else None)

    theirs = set(s)
    assert result.cardinality == len(set(r) & theirs)
    assert result.responder_size == len(theirs)
    if mode is Mode.INTERSECTION:
        assert result.matched_indices == tuple(i for i, x in enumerate(r) if x in theirs)
    else:
        assert result.matched_indices is None
    assert responder.finished and responder.role.result.requester_size == len(set(r))
    # streamed: a HELLO, then batches that never carry more than SMALL's share of buckets
    rounds = [name for name, _, _ in channel.transcript]
    assert rounds[0] == "hello" and set(rounds[1:]) <= {"buckets"}
    for _, sent, _ in channel.transcript[1:]:
        assert len(decode_batch(sent)) <= SMALL.buckets_per_message
    blob = b"".join(_frames(channel))
    for value in r_raw + s_raw:
        assert value.strip().encode() not in blob
    for item in set(r) | theirs:
        assert item not in blob and item[1:] not in blob


def test_empty_sets_on_either_side() -> None:
    _, some = _items([(1, 0), (2, 1), (2, 2)])
    for r, s in (([], some), (some, []), ([], [])):
        for mode in Mode:
            result, _, _ = _run(r, s, mode, THREADS)
            assert result.cardinality == 0 and result.responder_size == len(set(s))


def test_process_pool_with_many_batches_equals_plaintext_join() -> None:
    """Real worker processes, the default-shaped streaming scaled down: dozens of buckets,
    several batches in flight, own buckets blinded ahead of the requests."""
    r = [encode_item("phone", f"1390000{i:04d}") for i in range(0, 3000, 1)]
    r += r[:50]  # duplicates: every row carrying a matched identifier is matched
    s = [encode_item("phone", f"1390000{i:04d}") for i in range(1500, 4500)]
    streaming = Streaming(items_per_bucket=128, buckets_per_message=4, min_messages=4,
                          min_items_per_bucket=64, min_buckets=16)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        for mode in Mode:
            result, responder, channel = _run(r, s, mode, pool, streaming)
            theirs = set(s)
            assert result.cardinality == 1500
            if mode is Mode.INTERSECTION:
                assert result.matched_indices == tuple(
                    i for i, x in enumerate(r) if x in theirs)
            assert len(channel.transcript) >= 1 + 4
            assert responder.role.result.requester_size == 3000


def test_a_failing_session_raises_the_remote_error_and_stays_failed() -> None:
    from protocols.errors import RemoteProtocolError

    _, s = _items([(1, 0), (2, 0), (3, 0)])
    responder = PsiSessionResponder(
        PsiResponder(s, allowed_modes=frozenset({Mode.INTERSECTION}), expected_session_id=SID),
        pool=THREADS)
    channel = MemoryChannel(responder)
    role = new_requester(s, mode=Mode.INTERSECTION, session_id=SID, streaming=SMALL)
    channel.exchange(role.start(), round="hello")
    with pytest.raises(RemoteProtocolError):
        responder.handle(b"CRPB\x01\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x03abc")
    with pytest.raises(RemoteProtocolError) as info:
        responder.handle(b"anything")
    assert info.value.status_hint == 409
