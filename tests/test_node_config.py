"""Node directory setup: identity files, init never overwrites, config errors, pinning."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from conftest import run_node_cli

from cleanroom.errors import CleanroomError, ConfigError, InputError
from cleanroom.node.admin import add_peer, init_node, remove_peer
from cleanroom.node.config import NodeConfig
from cleanroom.node.identity import NodeIdentity, format_fingerprint, normalize_fingerprint


def test_init_creates_private_identity_and_never_overwrites(tmp_path: Path) -> None:
    d = tmp_path / "oem"
    result = run_node_cli(
        "node",
        "init",
        "--party",
        "oem",
        "--name",
        "oem",
        "--dir",
        str(d),
        "--listen",
        "127.0.0.1:18443",
    )
    assert result.returncode == 0, result.stderr
    ident = NodeIdentity.load(d)
    assert format_fingerprint(ident.fingerprint) in result.stdout
    assert stat.S_IMODE((d / "identity" / "node.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "operator.token").stat().st_mode) == 0o600
    key_before = (d / "identity" / "node.key").read_bytes()
    again = run_node_cli("node", "init", "--party", "media", "--name", "x", "--dir", str(d))
    assert again.returncode != 0 and "never overwrites" in again.stderr
    assert (d / "identity" / "node.key").read_bytes() == key_before
    cfg = NodeConfig.load(d)
    assert (cfg.name, cfg.party, cfg.listen) == ("oem", "oem", "127.0.0.1:18443")
    assert cfg.database_url == f"sqlite:///{(d / 'node.db').resolve().as_posix()}"
    show = run_node_cli("node", "show", "--dir", str(d))
    assert ident.fingerprint in show.stdout and str(ident.cert_path) in show.stdout
    # the identity key signs, and the certificate carries the matching public key
    ident.public_key.verify(ident.signing_key().sign(b"note"), b"note")


def test_config_errors_name_file_line_and_key(tmp_path: Path) -> None:
    d = tmp_path / "n"
    init_node(d, name="n", party="dealer", listen="127.0.0.1:18000")
    path = d / "node.toml"
    good = path.read_text()
    cases = [
        (good.replace('listen = "127.0.0.1:18000"', 'listen = "nowhere"'), "node.listen"),
        (good.replace('data_dir = "data"', 'data_dir = "data"\ncolour = "red"'), "node.colour"),
        (good + "\n[limits]\nmax_request_bytes = -5\n", "limits.max_request_bytes"),
        (
            good.replace('database_url = "sqlite:///node.db"', 'database_url = "::"'),
            "node.database_url",
        ),
    ]
    for text, key in cases:
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            NodeConfig.load(d)
        assert str(path) in str(info.value) and repr(key) in str(info.value)
        assert "line " in str(info.value)
    path.write_text(good + "[[peers]\n")
    with pytest.raises(ConfigError, match=r"not valid TOML.*line \d+"):
        NodeConfig.load(d)


def test_pinning_checks_certificates(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    init_node(a, name="a", party="oem")
    init_node(b, name="b", party="media")
    b_cert = b / "identity" / "node.pem"
    fp = NodeIdentity.load(b).fingerprint
    with pytest.raises(InputError, match="does not match"):
        add_peer(a, name="b", url="https://b.example:8443", cert_file=b_cert, fingerprint="0" * 64)
    with pytest.raises(InputError, match="own certificate"):
        add_peer(a, name="self", url="https://a:1", cert_file=a / "identity" / "node.pem")
    with pytest.raises(InputError, match="https"):
        add_peer(a, name="b", url="http://b:80", cert_file=b_cert)
    peer = add_peer(
        a,
        name="b",
        url="https://b.example:8443",
        cert_file=b_cert,
        fingerprint=format_fingerprint(fp),
    )
    assert peer.fingerprint == fp and peer.party == "media"  # party read from the cert
    with pytest.raises(CleanroomError, match="already pinned"):
        add_peer(a, name="b2", url="https://b.example:8443", cert_file=b_cert)
    # tampering with the pinned file after the fact is caught on load
    (a / "peers" / "b.pem").write_bytes((a / "identity" / "node.pem").read_bytes())
    with pytest.raises(ConfigError, match=r"peers\[0\]\.fingerprint"):
        NodeConfig.load(a)
    (a / "peers" / "b.pem").write_bytes(b_cert.read_bytes())
    remove_peer(a, "b")
    assert NodeConfig.load(a).peers == ()


def test_fingerprint_forms() -> None:
    fp = "ab" * 32
    assert normalize_fingerprint("SHA256:" + format_fingerprint(fp)) == fp
    with pytest.raises(ValueError):
        normalize_fingerprint("abc")


def test_ledger_settings_are_validated(tmp_path: Path) -> None:
    node_dir = tmp_path / "oem"
    init_node(node_dir, name="oem", party="oem", listen="127.0.0.1:9443")
    config_file = node_dir / "node.toml"
    assert NodeConfig.load(node_dir).ledger.witness_interval_seconds == 300.0
    original = config_file.read_text()
    config_file.write_text(original + "\n[ledger]\nwitness_interval_seconds = 0\n")
    assert NodeConfig.load(node_dir).ledger.witness_interval_seconds == 0.0
    config_file.write_text(original + "\n[ledger]\nwitness_interval_seconds = -5\n")
    with pytest.raises(ConfigError, match=r"line \d+: key 'ledger.witness_interval_seconds'"):
        NodeConfig.load(node_dir)
    config_file.write_text(original + "\n[ledger]\nwitness_every = 5\n")
    with pytest.raises(ConfigError, match=r"'ledger\.witness_every': unknown key"):
        NodeConfig.load(node_dir)
