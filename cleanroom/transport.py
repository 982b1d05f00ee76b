"""The one client for node-to-node calls: mutual TLS with pinned certificates.

A :class:`PeerClient` talks to exactly one other node. It presents this node's certificate,
trusts only the peer's pinned certificate (and additionally checks the exact SHA-256
fingerprint of what the server presented; host names are not used for trust), applies
timeouts, retries idempotent calls a bounded number of times, puts a request id on every
call (kept across retries), streams large bodies in both directions and enforces size
limits. Every failure is a :class:`PeerCallError` naming the peer, the call and the
request id. :meth:`PeerClient.exchange` is the hot path for many small POSTs (real-time
lookups): the same pinning, limits and errors over keep-alive connections that send a
request as one write and parse the reply by hand (:class:`_Connection`), a fraction of
httpx's (and ``http.client``'s) per-call cost.

This module moves bytes and JSON; it must not log or inspect payloads, and it knows
nothing about the node's database or configuration files (callers pass paths and PEMs;
``cleanroom.node.context.NodeContext.peer_client`` builds one from a pinned peer).
"""

from __future__ import annotations

import hashlib
import json as jsonlib
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Container, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from cleanroom.errors import CleanroomError

REQUEST_ID_HEADER = "X-Request-ID"
DEFAULT_CHUNK = 64 * 1024
_RETRY_STATUS = frozenset({502, 503, 504})
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
MAX_IDLE_CONNECTIONS = 8  # keep-alive connections PeerClient.exchange keeps per client


class PeerCallError(CleanroomError):
    """A call to another node failed; says which peer, which call and why."""

    def __init__(
        self,
        peer: str,
        method: str,
        path: str,
        reason: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        self.peer = peer
        self.method = method
        self.path = path
        self.reason = reason
        self.status = status
        self.request_id = request_id
        rid = f" [request id {request_id}]" if request_id else ""
        super().__init__(f"peer {peer!r}: {method} {path} failed: {reason}{rid}")


def client_ssl_context(
    peer_cert_pem: bytes, own_cert_path: Path, own_key_path: Path
) -> ssl.SSLContext:
    """TLS 1.3 client context: our certificate, the peer's pinned certificate as only anchor."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # trust is the pinned certificate, not a name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=peer_cert_pem.decode("ascii"))
    ctx.load_cert_chain(str(own_cert_path), str(own_key_path))
    return ctx


def new_request_id() -> str:
    return uuid.uuid4().hex


class PeerClient:
    """Calls to one pinned peer (or, with a bearer token, to this node's operator API)."""

    def __init__(
        self,
        *,
        peer_name: str,
        base_url: str,
        peer_cert_pem: bytes,
        own_cert_path: Path,
        own_key_path: Path,
        peer_fingerprint: str | None = None,
        bearer_token: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        retries: int = 2,
        backoff_seconds: float = 0.2,
        max_request_bytes: int = 64 * 1024 * 1024,
        max_response_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        self.peer_name = peer_name
        self.base_url = base_url.rstrip("/")
        cert = x509.load_pem_x509_certificate(peer_cert_pem)
        pinned = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        if peer_fingerprint is not None and peer_fingerprint != pinned:
            raise CleanroomError(
                f"peer {peer_name!r}: pinned fingerprint does not match its certificate file"
            )
        self.fingerprint = pinned
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.max_request_bytes = max_request_bytes
        self.max_response_bytes = max_response_bytes
        headers = {"User-Agent": "cleanroom-node"}
        if bearer_token is not None:
            headers["Authorization"] = f"Bearer {bearer_token}"
        if not _headers_ok(headers):
            raise CleanroomError(f"peer {peer_name!r}: the bearer token holds characters an "
                                 "HTTP header cannot carry")
        self._headers = headers
        self._ssl = client_ssl_context(peer_cert_pem, own_cert_path, own_key_path)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._client = httpx.Client(
            base_url=self.base_url,
            verify=self._ssl,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            headers=headers,
            follow_redirects=False,
        )
        self._idle: list[_Connection] = []  # keep-alive, for exchange()
        url = urlsplit(self.base_url)
        self._host_header = (f"[{url.hostname}]" if ":" in (url.hostname or "")
                             else url.hostname or "") + (f":{url.port}" if url.port else "")
        self._idle_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._client.close()
        self._drop_idle()

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls ---------------------------------------------------------------------------------

    def get_json(
        self, path: str, *, params: Mapping[str, str] | None = None, request_id: str | None = None
    ) -> Any:
        return self.request("GET", path, params=params, request_id=request_id).json()

    def post_json(
        self,
        path: str,
        payload: Any,
        *,
        idempotent: bool = False,
        request_id: str | None = None,
    ) -> Any:
        body = jsonlib.dumps(payload, separators=(",", ":")).encode("utf-8")
        return self.request(
            "POST",
            path,
            content=body,
            headers={"Content-Type": "application/json"},
            idempotent=idempotent,
            request_id=request_id,
        ).json()

    def upload(
        self,
        path: str,
        chunks: bytes | Iterable[bytes],
        *,
        method: str = "POST",
        params: Mapping[str, str] | None = None,
        content_type: str = "application/octet-stream",
        idempotent: bool = False,
        request_id: str | None = None,
    ) -> Any:
        """Send a (possibly large) body as a stream of chunks; return the JSON reply.

        A body given as an iterator is sent once (it cannot be replayed), so it is never
        retried, whatever ``idempotent`` says.
        """
        return self.request(
            method,
            path,
            content=chunks,
            params=params,
            headers={"Content-Type": content_type},
            idempotent=idempotent,
            request_id=request_id,
        ).json()

    @contextmanager
    def download(
        self,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        request_id: str | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> Iterator[Iterator[bytes]]:
        """``with client.download(path) as chunks: for c in chunks: ...`` (size-limited)."""
        rid = request_id or new_request_id()
        req = self._client.build_request(
            "GET", path, params=params, headers={REQUEST_ID_HEADER: rid}
        )
        try:
            response = self._client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise self._error("GET", path, _describe(exc, self.base_url), rid) from None
        try:
            self._check_response(response, "GET", path, rid)
            yield self._limited(response.iter_bytes(chunk_size), "GET", path, rid)
        except httpx.HTTPError as exc:
            raise self._error("GET", path, _describe(exc, self.base_url), rid) from None
        finally:
            response.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | Iterable[bytes] | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        request_id: str | None = None,
        ok: Container[int] | None = None,
    ) -> httpx.Response:
        """One call with retries (idempotent calls with a replayable body only).

        Returns the response with its body read (bounded by ``max_response_bytes``).
        Non-2xx statuses (or statuses outside ``ok``) raise :class:`PeerCallError`.
        """
        method = method.upper()
        rid = request_id or new_request_id()
        if idempotent is None:
            idempotent = method in _IDEMPOTENT_METHODS
        body: bytes | Iterator[bytes] | None
        if content is None or isinstance(content, bytes | bytearray):
            body = bytes(content) if content is not None else None
            if body is not None and len(body) > self.max_request_bytes:
                raise self._error(
                    method,
                    path,
                    f"request body of {len(body)} bytes exceeds the limit of "
                    f"{self.max_request_bytes} bytes",
                    rid,
                )
            attempts = 1 + (self.retries if idempotent else 0)
        else:
            body = self._counted(iter(content), method, path, rid)
            attempts = 1
        all_headers = {REQUEST_ID_HEADER: rid, **(headers or {})}
        last: PeerCallError | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_seconds * (2 ** (attempt - 1)))
            try:
                req = self._client.build_request(
                    method, path, params=params, headers=all_headers, content=body
                )
                response = self._client.send(req, stream=True)
            except PeerCallError:
                raise
            except httpx.HTTPError as exc:
                cause = exc.__context__
                if isinstance(cause, PeerCallError):
                    raise cause from None
                last = self._error(method, path, _describe(exc, self.base_url), rid)
                continue
            try:
                if response.status_code in _RETRY_STATUS and attempt + 1 < attempts:
                    last = self._error(method, path, f"HTTP {response.status_code}", rid)
                    continue
                self._check_response(response, method, path, rid, ok)
                data = b"".join(self._limited(response.iter_bytes(), method, path, rid))
            except httpx.HTTPError as exc:
                last = self._error(method, path, _describe(exc, self.base_url), rid)
                continue
            finally:
                response.close()
            return httpx.Response(
                status_code=response.status_code,
                headers=response.headers,
                content=data,
                request=response.request,
            )
        assert last is not None
        raise last

    def exchange(
        self,
        path: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> bytes:
        """POST a small ``body`` and return the response body (2xx), for hot paths.

        Keep-alive connections (:class:`_Connection`: one per concurrent call, reused
        after), the pinned certificate checked at connect, the request and response size
        limits of :meth:`request`. The call is not idempotent, so it is never retried,
        except once on a fresh connection when a reused keep-alive connection turns out to
        be closed before any reply (the server never read the request). Raises
        :class:`PeerCallError` like :meth:`request`.
        """
        rid = request_id or new_request_id()
        if len(body) > self.max_request_bytes:
            raise self._error("POST", path, f"request body of {len(body)} bytes exceeds the "
                              f"limit of {self.max_request_bytes} bytes", rid)
        fields = {REQUEST_ID_HEADER: rid, **(headers or {})}  # the fixed ones: checked once
        if not _PATH_OK.fullmatch(path) or not _headers_ok(fields):
            raise self._error("POST", path[:200].encode("unicode_escape").decode("ascii"),
                              "the request path or a header holds characters HTTP does not "
                              "allow there (control characters, spaces, non-ASCII)", rid)
        lines = [f"POST {path} HTTP/1.1", f"Host: {self._host_header}",
                 *(f"{k}: {v}" for k, v in {**self._headers, **fields}.items()
                   if k.lower() not in ("host", "content-length")),
                 f"Content-Length: {len(body)}", "", ""]
        head = "\r\n".join(lines).encode("latin-1")
        for attempt in (0, 1):
            conn, reused = self._checkout(path, rid, fresh=attempt > 0)
            try:
                conn.send(head, body)
                status, keep = conn.read_head()
            except _Closed as exc:
                conn.close()
                if reused and attempt == 0:
                    self._drop_idle()  # idle at least as long as this one: likely closed too
                    continue
                raise self._error("POST", path, f"the connection was closed by the peer: {exc}",
                                  rid) from None
            except (OSError, _BadReply) as exc:
                conn.close()
                reason = ("timed out" if isinstance(exc, TimeoutError)
                          else str(exc) or type(exc).__name__)
                raise self._error("POST", path, reason, rid) from None
            try:
                data = conn.read_body(self.max_response_bytes)
            except _TooLarge:
                conn.close()
                raise self._error("POST", path, f"response exceeds the limit of "
                                  f"{self.max_response_bytes} bytes", rid) from None
            except (OSError, _BadReply, _Closed) as exc:
                conn.close()
                raise self._error("POST", path, f"reading the reply failed: {exc}",
                                  rid) from None
            if keep and conn.clean:
                self._checkin(conn)
            else:
                conn.close()
            break
        if 200 <= status < 300:
            return data
        detail = _error_message(data) if len(data) <= 65536 else ""
        raise self._error("POST", path, f"HTTP {status}" + (f": {detail}" if detail else ""),
                          rid, status)

    def _checkout(self, path: str, rid: str, *, fresh: bool = False
                  ) -> tuple[_Connection, bool]:
        if not fresh:
            with self._idle_lock:
                if self._idle:
                    return self._idle.pop(), True
        url = urlsplit(self.base_url)
        try:
            raw = socket.create_connection((url.hostname or "", url.port or 443),
                                           timeout=self._connect_timeout)
        except OSError as exc:
            raise self._error("POST", path, f"cannot connect to {self.base_url}: "
                              f"{exc or type(exc).__name__}", rid) from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self._ssl.wrap_socket(raw, server_hostname=url.hostname)
        except OSError as exc:
            raw.close()
            text = str(exc) or type(exc).__name__
            if "CERTIFICATE_VERIFY_FAILED" in text:
                text = "TLS: the server's certificate is not the pinned one"
            raise self._error("POST", path, f"cannot connect to {self.base_url}: {text}",
                              rid) from None
        der = sock.getpeercert(True)
        if der is None or hashlib.sha256(der).hexdigest() != self.fingerprint:
            sock.close()
            raise self._error("POST", path, "the server's certificate is not the pinned one",
                              rid)
        sock.settimeout(self._timeout)
        return _Connection(sock), False

    def _drop_idle(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _checkin(self, conn: _Connection) -> None:
        with self._idle_lock:
            if len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    # --- helpers -------------------------------------------------------------------------------

    def _error(
        self, method: str, path: str, reason: str, rid: str, status: int | None = None
    ) -> PeerCallError:
        return PeerCallError(self.peer_name, method, path, reason, status=status, request_id=rid)

    def _check_response(
        self,
        response: httpx.Response,
        method: str,
        path: str,
        rid: str,
        ok: Container[int] | None = None,
    ) -> None:
        stream = response.extensions.get("network_stream")
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        der = ssl_object.getpeercert(True) if ssl_object is not None else None
        if der is None or hashlib.sha256(der).hexdigest() != self.fingerprint:
            raise self._error(method, path, "the server's certificate is not the pinned one", rid)
        good = (200 <= response.status_code < 300) if ok is None else response.status_code in ok
        if good:
            return
        length = response.headers.get("content-length")
        detail = ""
        if length is None or int(length) <= 65536:
            response.read()
            detail = _error_detail(response)
        raise self._error(
            method,
            path,
            f"HTTP {response.status_code}" + (f": {detail}" if detail else ""),
            rid,
            response.status_code,
        )

    def _limited(
        self, chunks: Iterator[bytes], method: str, path: str, rid: str
    ) -> Iterator[bytes]:
        total = 0
        for chunk in chunks:
            total += len(chunk)
            if total > self.max_response_bytes:
                raise self._error(
                    method,
                    path,
                    f"response exceeds the limit of {self.max_response_bytes} bytes",
                    rid,
                )
            yield chunk

    def _counted(
        self, chunks: Iterator[bytes], method: str, path: str, rid: str
    ) -> Iterator[bytes]:
        total = 0
        for chunk in chunks:
            total += len(chunk)
            if total > self.max_request_bytes:
                raise self._error(
                    method,
                    path,
                    f"request body exceeds the limit of {self.max_request_bytes} bytes",
                    rid,
                )
            yield bytes(chunk)


def _error_detail(response: httpx.Response) -> str:
    return _error_message(response.content)


def _error_message(body: bytes) -> str:
    """The message of a node's JSON error body (or FastAPI's ``detail``), else ""."""
    try:
        data = jsonlib.loads(body)
    except ValueError:
        return ""
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:500]
        if isinstance(data.get("detail"), str):
            return str(data["detail"])[:500]
    return ""


def _describe(exc: httpx.HTTPError, base_url: str) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return "TLS: the server's certificate is not the pinned one"
        if "SSL" in text or "TLS" in text:
            return f"TLS handshake failed: {text}"
        return f"cannot connect to {base_url}: {text}"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return (
            "the connection was closed by the peer (if this happens at once, the peer has "
            f"probably not pinned this node's certificate): {text}"
        )
    return text


# --- the keep-alive connection of PeerClient.exchange ------------------------------------------

_MAX_HEAD = 65536
_PATH_OK = re.compile(r"/[!-~]*")  # visible ASCII, no spaces or control characters
_TOKEN_OK = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class _Closed(Exception):
    """The peer closed the connection before a complete reply."""


class _BadReply(Exception):
    """The reply is not HTTP/1.1 this client can read."""


class _TooLarge(Exception):
    """The reply body exceeds the caller's limit."""


def _headers_ok(fields: Mapping[str, str]) -> bool:
    """Names are RFC 9110 tokens and values hold no control characters (no CR/LF that
    would end the header early and let a value write a request of its own)."""
    return all(_TOKEN_OK.fullmatch(k) and not _BAD_VALUE.search(v) for k, v in fields.items())


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


class _Connection:
    """One keep-alive HTTP/1.1 connection over TLS: a request leaves as one ``sendall``;
    the reply's status line and headers are parsed by hand (``Content-Length`` or
    chunked bodies, ``Connection: close``). Not thread-safe: one caller at a time (the
    pool in :class:`PeerClient` hands each connection to one call)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._length: int | None = None
        self._chunked = False

    def close(self) -> None:
        with suppress(OSError):
            self._sock.close()

    def send(self, head: bytes, body: bytes) -> None:
        try:
            self._sock.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError,
                ssl.SSLZeroReturnError) as exc:
            raise _Closed(str(exc) or type(exc).__name__) from None

    def _fill(self) -> None:
        try:
            chunk = self._sock.recv(262144)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
            raise _Closed(str(exc) or type(exc).__name__) from None
        if not chunk:
            raise _Closed("end of stream")
        self._buf += chunk

    @property
    def clean(self) -> bool:
        """Nothing unread is left (a connection with stray bytes is never reused)."""
        return not self._buf

    def read_head(self) -> tuple[int, bool]:
        """Status code of the final reply (1xx interim replies are skipped) and whether the
        connection stays open after it."""
        while True:
            status, keep = self._one_head()
            if not 100 <= status < 200:
                return status, keep
            if status == 101:
                raise _BadReply("the peer switched protocols")

    def _one_head(self) -> tuple[int, bool]:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if len(self._buf) > _MAX_HEAD:
                raise _BadReply("reply headers too large")
            try:
                self._fill()
            except _Closed:
                if self._buf:  # part of a reply arrived: the request was processed
                    raise _BadReply("the connection closed in the middle of the reply") from None
                raise
        if end > _MAX_HEAD:
            raise _BadReply("reply headers too large")
        head = bytes(self._buf[:end]).decode("latin-1")
        del self._buf[:end + 4]
        status_line, *lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not (
                _digits(parts[1]) and len(parts[1]) == 3):
            raise _BadReply(f"malformed status line {status_line[:80]!r}")
        status = int(parts[1])
        keep = parts[0] == "HTTP/1.1"
        length: int | None = None
        codings: list[str] | None = None
        for line in lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadReply("malformed reply header")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length":
                if not _digits(value) or (length is not None and int(value) != length):
                    raise _BadReply("malformed Content-Length")
                length = int(value)
            elif name == "transfer-encoding":
                codings = [*(codings or []), *(c.strip().lower() for c in value.split(","))]
            elif name == "connection":
                tokens = {t.strip().lower() for t in value.split(",")}
                keep = "close" not in tokens and (keep or "keep-alive" in tokens)
        if status < 200 or status in (204, 304):  # no body, whatever the headers say
            self._length, self._chunked = 0, False
            return status, keep
        if codings is not None:  # Transfer-Encoding wins over Content-Length (RFC 9112 6.3)
            self._chunked = codings[-1:] == ["chunked"]
            self._length = None
            keep = keep and self._chunked and length is None
        else:
            self._chunked, self._length = False, length
        if self._length is None and not self._chunked:
            keep = False  # the body runs to the end of the stream
        return status, keep

    def _take(self, n: int) -> bytes:
        have = len(self._buf)
        if have >= n:
            with memoryview(self._buf) as view:
                data = bytes(view[:n])
            del self._buf[:n]
            return data
        out = bytearray(n)  # straight into the result, no intermediate buffer
        out[:have] = self._buf
        self._buf.clear()
        with memoryview(out) as view:
            while have < n:
                try:
                    got = self._sock.recv_into(view[have:])
                except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
                    raise _Closed(str(exc) or type(exc).__name__) from None
                if not got:
                    raise _Closed("end of stream")
                have += got
        return bytes(out)

    def _line(self) -> bytes:
        while (eol := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > 4096:
                raise _BadReply("malformed chunked body")
            self._fill()
        line = bytes(self._buf[:eol])
        del self._buf[:eol + 2]
        return line

    def read_body(self, limit: int) -> bytes:
        if self._length is not None and not self._chunked:
            if self._length > limit:
                raise _TooLarge
            return self._take(self._length)
        if self._chunked:
            out = bytearray()
            while True:
                size_text = self._line().split(b";", 1)[0].strip()
                if not _CHUNK_SIZE.fullmatch(size_text):
                    raise _BadReply("malformed chunk size")
                size = int(size_text, 16)
                if size == 0:
                    while self._line():  # trailers up to the empty line
                        pass
                    return bytes(out)
                if len(out) + size > limit:
                    raise _TooLarge
                out += self._take(size)
                if self._take(2) != b"\r\n":
                    raise _BadReply("malformed chunk")
        out = bytearray(self._buf)  # no length: read to the end of the stream
        self._buf.clear()
        while len(out) <= limit:
            try:
                self._fill()
            except _Closed:
                return bytes(out)
            out += self._buf
            self._buf.clear()
        raise _TooLarge
