"""The one client for node-to-node calls: mutual TLS with pinned certificates.

A :class:`PeerClient` talks to exactly one other node. It presents this node's certificate,
trusts only the peer's pinned certificate (and additionally checks the exact SHA-256
fingerprint of what the server presented; host names are not used for trust), applies
timeouts, retries idempotent calls a bounded number of times, puts a request id on every
call (kept across retries), streams large bodies in both directions and enforces size
limits. Every failure is a :class:`PeerCallError` naming the peer, the call and the
request id. :meth:`PeerClient.exchange` is the hot path for many small POSTs (real-time
lookups): the same pinning, limits and errors over one keep-alive connection of the
standard library's ``http.client``, which costs a fraction of httpx's per-call overhead.

This module moves bytes and JSON; it must not log or inspect payloads, and it knows
nothing about the node's database or configuration files (callers pass paths and PEMs;
``cleanroom.node.context.NodeContext.peer_client`` builds one from a pinned peer).
"""

from __future__ import annotations

import hashlib
import http.client
import json as jsonlib
import ssl
import threading
import time
import uuid
from collections.abc import Container, Iterable, Iterator, Mapping
from contextlib import contextmanager
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
        self._idle: list[http.client.HTTPSConnection] = []  # keep-alive, for exchange()
        self._idle_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._client.close()
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

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

        Keep-alive connections of ``http.client`` (one per concurrent call, reused after),
        the pinned certificate checked at connect, the request and response size limits of
        :meth:`request`. The call is not idempotent, so it is never retried, except once on
        a fresh connection when a reused keep-alive connection turns out to be closed
        before any reply (the server never read the request). Raises
        :class:`PeerCallError` like :meth:`request`.
        """
        rid = request_id or new_request_id()
        if len(body) > self.max_request_bytes:
            raise self._error("POST", path, f"request body of {len(body)} bytes exceeds the "
                              f"limit of {self.max_request_bytes} bytes", rid)
        all_headers = {**self._headers, REQUEST_ID_HEADER: rid, **(headers or {}),
                       "Content-Length": str(len(body))}
        for attempt in (0, 1):
            conn, reused = self._checkout(path, rid)
            try:
                conn.request("POST", path, body=body, headers=all_headers)
                response = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
                conn.close()
                if reused and attempt == 0:
                    continue
                raise self._error("POST", path, "the connection was closed by the peer: "
                                  f"{exc or type(exc).__name__}", rid) from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                reason = ("timed out" if isinstance(exc, TimeoutError)
                          else str(exc) or type(exc).__name__)
                raise self._error("POST", path, reason, rid) from None
            try:
                data = self._read_fast(response, path, rid)
            except PeerCallError:
                conn.close()
                raise
            if response.will_close:
                conn.close()
            else:
                self._checkin(conn)
            break
        if 200 <= response.status < 300:
            return data
        detail = _error_message(data) if len(data) <= 65536 else ""
        raise self._error("POST", path, f"HTTP {response.status}"
                          + (f": {detail}" if detail else ""), rid, response.status)

    def _checkout(self, path: str, rid: str) -> tuple[http.client.HTTPSConnection, bool]:
        with self._idle_lock:
            if self._idle:
                return self._idle.pop(), True
        url = urlsplit(self.base_url)
        conn = http.client.HTTPSConnection(url.hostname or "", url.port or 443,
                                           timeout=self._connect_timeout, context=self._ssl)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            text = str(exc) or type(exc).__name__
            if "CERTIFICATE_VERIFY_FAILED" in text:
                text = "TLS: the server's certificate is not the pinned one"
            raise self._error("POST", path, f"cannot connect to {self.base_url}: {text}",
                              rid) from None
        sock = conn.sock
        der = sock.getpeercert(True) if isinstance(sock, ssl.SSLSocket) else None
        if der is None or hashlib.sha256(der).hexdigest() != self.fingerprint:
            conn.close()
            raise self._error("POST", path, "the server's certificate is not the pinned one",
                              rid)
        sock.settimeout(self._timeout)
        return conn, False

    def _checkin(self, conn: http.client.HTTPSConnection) -> None:
        with self._idle_lock:
            if len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def _read_fast(self, response: http.client.HTTPResponse, path: str, rid: str) -> bytes:
        length = response.getheader("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_response_bytes:
            raise self._error("POST", path, f"response exceeds the limit of "
                              f"{self.max_response_bytes} bytes", rid)
        try:
            data = response.read(self.max_response_bytes + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise self._error("POST", path, f"reading the reply failed: {exc}", rid) from None
        if len(data) > self.max_response_bytes:
            raise self._error("POST", path, f"response exceeds the limit of "
                              f"{self.max_response_bytes} bytes", rid)
        return data

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
