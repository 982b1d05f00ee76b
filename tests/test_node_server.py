"""The node service as real processes: mutual TLS, pinning, operator auth, limits, lifecycle."""

from __future__ import annotations

import base64
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import RunningNode, make_node, pin_each_other, run_node_cli
from cryptography.hazmat.primitives import serialization

from cleanroom.node.admin import remove_peer
from cleanroom.node.identity import NodeIdentity
from cleanroom.transport import PeerCallError, PeerClient

NodeFactory = Callable[[str, str], RunningNode]


def _stranger_client(tmp_path: Path, target: RunningNode) -> PeerClient:
    """A client with a real, valid node certificate that ``target`` never pinned."""
    ident = NodeIdentity.create(tmp_path / "stranger", name="stranger", party="media")
    return PeerClient(
        peer_name=target.name,
        base_url=target.url,
        peer_cert_pem=target.cert_path.read_bytes(),
        own_cert_path=ident.cert_path,
        own_key_path=ident.key_path,
        retries=0,
        timeout=10,
    )


def test_pinned_peer_is_accepted_and_identified(three_nodes: dict[str, RunningNode]) -> None:
    oem, media, dealer = three_nodes["oem"], three_nodes["media"], three_nodes["dealer"]
    for caller in (oem, dealer):
        with media.client_from(caller) as client:
            who = client.get_json("/v1/peer/whoami")
        assert who == {"you": caller.name, "node": "media", "party": "media"}


def test_peer_identity_key_is_the_pinned_certificates_key(
    three_nodes: dict[str, RunningNode],
) -> None:
    oem, media = three_nodes["oem"], three_nodes["media"]
    with media.client_from(oem) as client:
        ident = client.get_json("/v1/peer/identity")
    pinned = oem.context().peer_public_key("media")
    raw = pinned.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert base64.b64decode(ident["public_key_ed25519"]) == raw
    assert ident["fingerprint"] == oem.context().peer("media").fingerprint
    # The same key signs: a signature by media's identity key verifies with the pinned key.
    sig = media.context().identity.signing_key().sign(b"checkpoint")
    pinned.verify(sig, b"checkpoint")


def test_unknown_certificate_is_refused(
    three_nodes: dict[str, RunningNode], tmp_path: Path
) -> None:
    media = three_nodes["media"]
    with _stranger_client(tmp_path, media) as client:
        for path in ("/v1/health", "/v1/peer/whoami", "/v1/node"):
            with pytest.raises(PeerCallError) as info:
                client.get_json(path)
            assert info.value.peer == "media"
            assert info.value.status in (None, 403)  # refused at the handshake, or 403


def test_server_with_unpinned_certificate_is_refused(
    three_nodes: dict[str, RunningNode],
) -> None:
    oem, media, dealer = three_nodes["oem"], three_nodes["media"], three_nodes["dealer"]
    ident = oem.context().identity
    # oem believes it talks to media but pins dealer's certificate: the client refuses.
    client = PeerClient(
        peer_name="media",
        base_url=media.url,
        peer_cert_pem=dealer.cert_path.read_bytes(),
        own_cert_path=ident.cert_path,
        own_key_path=ident.key_path,
        retries=0,
    )
    with client, pytest.raises(PeerCallError, match="certificate"):
        client.get_json("/v1/peer/whoami")


def test_peer_calling_operator_endpoint_is_refused(three_nodes: dict[str, RunningNode]) -> None:
    oem, media = three_nodes["oem"], three_nodes["media"]
    token = media.context().operator_token()  # even with the right token
    with media.client_from(oem) as client:
        for path in ("/v1/node", "/v1/datasets", "/openapi.json"):
            with pytest.raises(PeerCallError) as info:
                client.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            assert info.value.status == 403
        # but health is open to any pinned client
        assert client.get_json("/v1/health")["node"] == "media"


def test_operator_token_is_required(three_nodes: dict[str, RunningNode]) -> None:
    oem = three_nodes["oem"]
    with oem.operator_client() as client:
        assert client.get_json("/v1/node")["fingerprint"] == oem.context().identity.fingerprint
        for auth in ("Bearer wrong-token-wrong-token-wrong-token", "Basic abc"):
            with pytest.raises(PeerCallError) as info:
                client.request("GET", "/v1/node", headers={"Authorization": auth})
            assert info.value.status == 401
        # the operator is not a peer
        with pytest.raises(PeerCallError) as info:
            client.get_json("/v1/peer/whoami")
        assert info.value.status == 403


def test_openapi_describes_operator_api(three_nodes: dict[str, RunningNode]) -> None:
    with three_nodes["dealer"].operator_client() as client:
        spec = client.get_json("/openapi.json")
    assert "/v1/datasets/{name}/versions" in spec["paths"]
    assert "/v1/health" in spec["paths"]


def test_request_id_on_every_response(three_nodes: dict[str, RunningNode]) -> None:
    oem, media = three_nodes["oem"], three_nodes["media"]
    with media.client_from(oem) as client:
        r = client.request("GET", "/v1/peer/whoami", request_id="test-rid-0123456789")
        assert r.headers["X-Request-ID"] == "test-rid-0123456789"
        with pytest.raises(PeerCallError) as info:
            client.request("GET", "/v1/node", request_id="test-rid-denied-42")
        assert info.value.request_id == "test-rid-denied-42"
        assert "test-rid-denied-42" in str(info.value)
    log = media.log()
    assert "test-rid-0123456789 peer:oem GET /v1/peer/whoami 200" in log


def test_oversize_request_gets_413(three_nodes: dict[str, RunningNode]) -> None:
    oem, media = three_nodes["oem"], three_nodes["media"]
    limit = media.context().config.limits.max_request_bytes
    with media.client_from(oem, max_request_bytes=limit * 4) as client:
        # declared length over the limit: refused before the body is read
        with pytest.raises(PeerCallError) as info:
            client.upload("/v1/peer/probe", bytes(limit + 1))
        assert info.value.status == 413
        # streamed (chunked) body over the limit: refused while reading
        block = bytes(1 << 20)
        chunks = (block for _ in range(limit // len(block) + 2))
        with pytest.raises(PeerCallError) as info:
            client.upload("/v1/peer/probe", chunks)
        assert info.value.status == 413
        # at the limit: accepted, and the stream arrives intact
        assert client.upload("/v1/peer/probe", iter([block, block]))["bytes"] == 2 * len(block)


def test_bad_input_gives_4xx_not_500(three_nodes: dict[str, RunningNode]) -> None:
    oem, media = three_nodes["oem"], three_nodes["media"]
    with media.client_from(oem) as client:
        for params in ({"bytes": "-1"}, {"bytes": "x"}, {}):
            with pytest.raises(PeerCallError) as info:
                client.request("GET", "/v1/peer/probe", params=params)
            assert info.value.status == 422
    with media.operator_client() as op:
        with pytest.raises(PeerCallError) as info:
            op.get_json("/v1/datasets/no-such-dataset")
        assert info.value.status == 400
        with pytest.raises(PeerCallError) as info:
            op.upload("/v1/datasets/x/versions", b"\x00\xff garbage", params={"id_columns": "x:y"})
        assert info.value.status == 400


def test_peer_removed_at_runtime_gets_403(node_factory: NodeFactory) -> None:
    a, b = node_factory("alpha", "oem"), node_factory("beta", "media")
    pin_each_other(a, b)
    a.start()
    with a.client_from(b) as client:
        assert client.get_json("/v1/peer/whoami")["you"] == "beta"
        remove_peer(a.dir, "beta")
        with pytest.raises(PeerCallError) as info:
            client.get_json("/v1/peer/whoami")
        assert info.value.status == 403


def test_peer_pinned_at_runtime_is_accepted(node_factory: NodeFactory, tmp_path: Path) -> None:
    a, c = node_factory("alpha", "oem"), node_factory("gamma", "dealer")
    a.start()
    with _stranger_client(tmp_path, a) as stranger, pytest.raises(PeerCallError):
        stranger.get_json("/v1/peer/whoami")
    pin_each_other(a, c)
    time.sleep(0.05)  # a different mtime for node.toml on coarse clocks
    with a.client_from(c) as client:
        assert client.get_json("/v1/peer/whoami")["you"] == "gamma"


def test_sigterm_stops_gracefully(node_factory: NodeFactory) -> None:
    node = node_factory("solo", "dealer").start()
    assert node.stop(signal.SIGTERM) == 0
    assert "node solo stopped" in node.log()


def test_taken_port_gives_clear_error(tmp_path: Path) -> None:
    node = make_node(tmp_path, "busy", "oem")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", node.port))
        holder.listen(1)
        result = run_node_cli("node", "start", "--dir", str(node.dir), timeout=60)
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{node.port}" in result.stderr
    assert "already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_config_gives_clear_error(tmp_path: Path) -> None:
    node = make_node(tmp_path, "broken", "oem")
    config = node.dir / "node.toml"
    text = config.read_text()
    config.write_text(text.replace('party = "oem"', 'party = "bank"'))
    result = run_node_cli("node", "start", "--dir", str(node.dir), timeout=60)
    assert result.returncode != 0
    assert str(config) in result.stderr and "node.party" in result.stderr
    assert "line 3" in result.stderr and "Traceback" not in result.stderr
    config.write_text(text + "\n[node\n")
    result = run_node_cli("node", "start", "--dir", str(node.dir), timeout=60)
    assert result.returncode != 0
    assert "not valid TOML" in result.stderr and "line" in result.stderr


def test_direct_routes_keep_the_guard_rules(three_nodes: dict[str, RunningNode]) -> None:
    """The real-time endpoints skip FastAPI but not the guard: access rules, request ids,
    JSON errors; only peer paths can be direct."""
    from cleanroom.node.app import DirectRoute

    oem, media = three_nodes["oem"], three_nodes["media"]
    path = "/v1/peer/anonq/tables/no_such_table/eval"
    with media.operator_client() as op, pytest.raises(PeerCallError) as refused:
        op.exchange(path, b"x")
    assert refused.value.status == 403 and "not operators" in str(refused.value)
    with media.client_from(oem) as client:
        with pytest.raises(PeerCallError) as missing:
            client.exchange(path, b"x", request_id="rid-direct-0001")
        assert missing.value.status == 404 and "no_such_table" in str(missing.value)
        # a failed direct request keeps its own access line (successes go to the summary)
        assert f"rid-direct-0001 peer:oem POST {path} 404" in media.log()
        # the other methods of that path are not direct: FastAPI answers them
        reply = client.request("GET", path, ok={404, 405})
        assert reply.status_code in (404, 405)
        assert reply.headers["X-Request-ID"]

    async def endpoint(*_args: object) -> None:  # pragma: no cover - never called
        return None

    with pytest.raises(ValueError, match="only peer endpoints"):
        DirectRoute("POST", "/v1/queries/{id}", endpoint, 10).pattern()  # type: ignore[arg-type]
    pattern = DirectRoute("POST", "/v1/peer/x/{name}/y", endpoint, 10).pattern()  # type: ignore[arg-type]
    assert pattern.fullmatch("/v1/peer/x/t1/y") and not pattern.fullmatch("/v1/peer/x/a/b/y")
