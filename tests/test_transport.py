"""Peer transport: bounded retries for idempotent calls only, limits, streaming, clear errors."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import RunningNode, free_port

from cleanroom.node.identity import NodeIdentity
from cleanroom.transport import PeerCallError, PeerClient


class _ClosingServer:
    """Accepts TCP connections and hands each to ``serve`` (default: close it at once),
    counting them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def identity(tmp_path: Path) -> NodeIdentity:
    return NodeIdentity.create(tmp_path / "me", name="me", party="oem")


def _client(identity: NodeIdentity, url: str, **kw: object) -> PeerClient:
    return PeerClient(
        peer_name="media",
        base_url=url,
        peer_cert_pem=identity.cert_pem,
        own_cert_path=identity.cert_path,
        own_key_path=identity.key_path,
        backoff_seconds=0.01,
        connect_timeout=5,
        **kw,  # type: ignore[arg-type]
    )


def test_idempotent_calls_are_retried_a_bounded_number_of_times(identity: NodeIdentity) -> None:
    server = _ClosingServer()
    try:
        with _client(identity, f"https://127.0.0.1:{server.port}", retries=2) as client:
            with pytest.raises(PeerCallError) as info:
                client.get_json("/v1/peer/whoami")
            assert server.count == 3
            err = info.value
            assert err.peer == "media" and err.method == "GET" and err.path == "/v1/peer/whoami"
            assert err.request_id and err.request_id in str(err)
            with pytest.raises(PeerCallError):
                client.post_json("/v1/peer/submit", {"a": 1})
            assert server.count == 4  # not retried: POST is not idempotent
            with pytest.raises(PeerCallError):
                client.upload("/v1/peer/probe", iter([b"x"]), method="PUT", idempotent=True)
            assert server.count == 5  # a stream cannot be replayed
    finally:
        server.close()


def test_connection_refused_names_peer_call_and_address(identity: NodeIdentity) -> None:
    port = free_port()
    with (
        _client(identity, f"https://127.0.0.1:{port}", retries=0) as client,
        pytest.raises(PeerCallError) as info,
    ):
        client.get_json("/v1/health")
    text = str(info.value)
    assert "peer 'media'" in text and "GET /v1/health" in text and f"127.0.0.1:{port}" in text


def test_client_side_request_limit(identity: NodeIdentity) -> None:
    with (
        _client(identity, "https://127.0.0.1:9", max_request_bytes=10) as client,
        pytest.raises(PeerCallError, match="exceeds the limit of 10 bytes"),
    ):
        client.upload("/v1/peer/probe", b"x" * 11)


def test_streaming_both_ways_and_response_limit(three_nodes: dict[str, RunningNode]) -> None:
    oem, media = three_nodes["oem"], three_nodes["media"]
    h = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        for i in range(40):
            block = bytes([i]) * 100_000
            h.update(block)
            yield block

    with media.client_from(oem) as client:
        reply = client.upload("/v1/peer/probe", chunks())
        assert reply == {"bytes": 4_000_000, "sha256": h.hexdigest()}
        total = 0
        with client.download("/v1/peer/probe", params={"bytes": "3000000"}) as stream:
            for c in stream:
                total += len(c)
        assert total == 3_000_000
    with (
        media.client_from(oem, max_response_bytes=1_000_000) as client,
        pytest.raises(PeerCallError, match="response exceeds"),
        client.download("/v1/peer/probe", params={"bytes": "3000000"}) as stream,
    ):
        for _ in stream:
            pass


class _OneShotTlsServer(_ClosingServer):
    """A TLS server that answers one small POST per connection (its body reversed) and
    then closes it, as a server does with an idle keep-alive connection."""

    def __init__(self, identity: NodeIdentity,
                 reply: Callable[[bytes], bytes] | None = None) -> None:
        import ssl

        self.ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ssl.load_cert_chain(str(identity.cert_path), str(identity.key_path))
        self.reply = reply or (lambda body: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(body), body[::-1]))
        super().__init__()

    def serve(self, raw: socket.socket) -> None:
        try:
            with self.ssl.wrap_socket(raw, server_side=True) as conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(4096)
                head, body = data.split(b"\r\n\r\n", 1)
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                while len(body) < length:
                    body += conn.recv(4096)
                conn.sendall(self.reply(body))
        except OSError:
            pass


def test_exchange_reuses_connections_and_reconnects_once_when_the_idle_one_was_closed(
        identity: NodeIdentity) -> None:
    server = _OneShotTlsServer(identity)
    try:
        with _client(identity, f"https://127.0.0.1:{server.port}") as client:
            assert client.exchange("/v1/peer/x", b"abc") == b"cba"
            assert server.count == 1
            # the server closed that connection after replying: the next call finds the
            # reused connection dead before any reply and sends once more on a fresh one
            assert client.exchange("/v1/peer/x", b"hello") == b"olleh"
            assert server.count == 2
    finally:
        server.close()


_REPLIES: dict[str, tuple[bytes, bytes | str]] = {
    # raw reply -> the body exchange() returns, or the error it raises
    "chunked, with an extension and a trailer": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n", b"abcde"),
    "no length: the body runs to the end of the stream": (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end", b"to the end"),
    "HTTP/1.0 with a length": (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    "malformed status line": (b"HTTP/1.1 2x0 OK\r\n\r\n", "malformed status line"),
    "not HTTP": (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed status line"),
    "malformed Content-Length": (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                                 "malformed Content-Length"),
    "header line without a colon": (b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n",
                                    "malformed reply header"),
    "truncated body": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
                       "reading the reply failed"),
    "malformed chunk size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"zz\r\n", "malformed chunk size"),
    "chunks above the limit": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"20\r\n" + b"x" * 32 + b"\r\n0\r\n\r\n",
                               "response exceeds the limit of 16 bytes"),
    "unframed body above the limit": (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 40,
                                      "response exceeds the limit of 16 bytes"),
    "interim 100 Continue, then the reply": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    "204 without a length": (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    "negative chunk size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"-5\r\n", "malformed chunk size"),
    "non-ASCII digits in Content-Length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", "malformed Content-Length"),
    "two different Content-Lengths": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        "malformed Content-Length"),
    "closed in the middle of the reply head": (b"HTTP/1.1 200 O", "in the middle of the reply"),
    "error status with a JSON message": (
        b'HTTP/1.1 409 Conflict\r\nContent-Length: 37\r\n\r\n'
        b'{"error": {"message": "wrong round"}}', "HTTP 409: wrong round"),
}


@pytest.mark.parametrize("case", list(_REPLIES))
def test_exchange_reads_every_reply_framing_or_names_what_is_wrong(
        identity: NodeIdentity, case: str) -> None:
    raw, expected = _REPLIES[case]
    server = _OneShotTlsServer(identity, reply=lambda _body: raw)
    try:
        with _client(identity, f"https://127.0.0.1:{server.port}",
                     max_response_bytes=16 if "limit" in case else 1 << 20) as client:
            if isinstance(expected, bytes):
                assert client.exchange("/v1/peer/x", b"q") == expected
            else:
                with pytest.raises(PeerCallError, match=expected) as info:
                    client.exchange("/v1/peer/x", b"q")
                assert info.value.request_id and info.value.request_id in str(info.value)
                if info.value.status is None:  # a connection in an unknown state
                    assert client._idle == []  # is not reused
        assert server.count == 1  # never sent twice: a reply had started
    finally:
        server.close()


@pytest.mark.parametrize(("path", "headers"), [
    ("/v1/peer/anonq/tables/t HTTP/1.1\r\nHost: x\r\n\r\nPOST /evil/eval", {}),
    ("/v1/peer/x y", {}),
    ("/v1/peer/\u00e9", {}),
    ("/v1/peer/x", {"X-Query": "q1\r\nX-Evil: 1"}),
    ("/v1/peer/x", {"Bad Name": "v"}),
])
def test_exchange_refuses_paths_and_headers_that_would_split_the_request(
        identity: NodeIdentity, path: str, headers: dict[str, str]) -> None:
    server = _OneShotTlsServer(identity)
    try:
        with (_client(identity, f"https://127.0.0.1:{server.port}") as client,
              pytest.raises(PeerCallError, match="characters HTTP does not allow")):
            client.exchange(path, b"abc", headers=headers)
        assert server.count == 0  # refused before anything was sent
    finally:
        server.close()


def test_exchange_retries_on_a_fresh_connection_when_every_idle_one_is_stale(
        identity: NodeIdentity) -> None:
    server = _OneShotTlsServer(identity)  # closes every connection after one reply
    try:
        with _client(identity, f"https://127.0.0.1:{server.port}") as client:
            assert client.exchange("/v1/peer/x", b"ab") == b"ba"
            first = client._idle.pop()
            assert client.exchange("/v1/peer/x", b"cd") == b"dc"  # a second connection
            client._idle.append(first)
            assert len(client._idle) == 2  # both closed by the server by now
            assert client.exchange("/v1/peer/x", b"xyz") == b"zyx"
            assert server.count == 3 and len(client._idle) == 1
    finally:
        server.close()


def test_exchange_refuses_a_server_that_is_not_the_pinned_one(
        identity: NodeIdentity, tmp_path: Path) -> None:
    other = NodeIdentity.create(tmp_path / "other", name="other", party="media")
    server = _OneShotTlsServer(other)
    try:
        with (_client(identity, f"https://127.0.0.1:{server.port}") as client,
              pytest.raises(PeerCallError, match="not the pinned one")):
            client.exchange("/v1/peer/x", b"abc")
    finally:
        server.close()


def test_exchange_limits_and_errors_through_a_node(three_nodes: dict[str, RunningNode]) -> None:
    oem, media = three_nodes["oem"], three_nodes["media"]
    with media.client_from(oem) as client:
        reply = client.exchange("/v1/peer/probe", b"x" * 1000)
        assert reply == (b'{"bytes":1000,"sha256":"%s"}'
                         % hashlib.sha256(b"x" * 1000).hexdigest().encode())
        first = client._idle[0]
        client.exchange("/v1/peer/probe", b"y")
        assert client._idle == [first]  # one keep-alive connection, reused
        with pytest.raises(PeerCallError) as info:
            client.exchange("/v1/peer/anonq/tables/no_such_table/eval", b"z")
        assert info.value.status == 404 and "no_such_table" in str(info.value)
        assert info.value.request_id and info.value.request_id in str(info.value)
    with (media.client_from(oem, max_request_bytes=10) as client,
          pytest.raises(PeerCallError, match="exceeds the limit of 10 bytes")):
        client.exchange("/v1/peer/probe", b"x" * 11)
    with (media.client_from(oem, max_response_bytes=20) as client,
          pytest.raises(PeerCallError, match="response exceeds the limit of 20 bytes")):
        client.exchange("/v1/peer/probe", b"x" * 100)
