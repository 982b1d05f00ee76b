"""The server's write coalescing (cleanroom.node.tls.CoalescingTransport): a response's
header and body writes reach the TLS transport as one write, large writes are not held
back, and nothing is lost at close."""

from __future__ import annotations

import asyncio
from typing import Any

from cleanroom.node.tls import COALESCE_BYTES, CoalescingTransport


class _Recording(asyncio.Transport):
    """A transport that records what reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.eof = False

    def write(self, data: Any) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 7

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def _run(body: Any) -> Any:
    return asyncio.run(body())


def test_writes_of_one_turn_leave_as_one() -> None:
    async def body() -> _Recording:
        inner = _Recording()
        t = CoalescingTransport(inner, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"")
        t.writelines([b"body", bytearray(b"-more")])
        assert inner.writes == []  # held until the end of this turn
        assert t.get_write_buffer_size() == 7 + 19 + 9
        await asyncio.sleep(0)
        t.write(b"next")
        await asyncio.sleep(0)
        return inner

    inner = _run(body)
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody-more", b"next"]


def test_large_writes_go_at_once_with_what_was_held() -> None:
    async def body() -> tuple[_Recording, list[bytes]]:
        inner = _Recording()
        t = CoalescingTransport(inner, asyncio.get_running_loop())
        t.write(b"head")
        t.write(b"x" * COALESCE_BYTES)
        seen = list(inner.writes)  # before the loop turned
        await asyncio.sleep(0)
        return inner, seen

    inner, seen = _run(body)
    assert seen == [b"head" + b"x" * COALESCE_BYTES]
    assert inner.writes == seen


def test_close_and_eof_flush_first_and_the_rest_is_the_inner_transport() -> None:
    async def body() -> _Recording:
        inner = _Recording()
        t = CoalescingTransport(inner, asyncio.get_running_loop())
        t.write(b"last words")
        t.write_eof()
        assert inner.writes == [b"last words"] and inner.eof
        t.write(b"bye")
        t.close()
        assert inner.writes == [b"last words", b"bye"] and inner.closed
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)
        assert t.is_closing()
        t.write(b"after close")  # dropped, as a closing transport drops writes
        await asyncio.sleep(0)
        return inner

    assert _run(body).writes == [b"last words", b"bye"]
