"""Serialisation of Paillier keys and ciphertext vectors: round trips in both formats,
re-randomisation on the way out, and malformed / tampered / wrong-key / wrong-context input
raising the remote protocol error (never another exception, never a wrong result)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocols.errors import RemoteProtocolError
from protocols.paillier import (
    PaillierFormatError,
    PaillierKeyMismatchError,
    PrivateKey,
    PublicKey,
    generate_keypair,
    load_packed,
    load_private_key,
    load_public_key,
    load_vector,
    pack_encrypt,
    to_bytes,
    to_json,
)
from protocols.paillier import serialization as ser

SETTINGS = settings(max_examples=40, deadline=None)


@pytest.fixture(scope="session")
def s_keys() -> tuple[PublicKey, PrivateKey]:
    pub, priv = generate_keypair(2048)
    return pub.precompute(), priv


@pytest.fixture(scope="session")
def s_other() -> tuple[PublicKey, PrivateKey]:
    return generate_keypair(2048)


@pytest.fixture(scope="session")
def wire_vector(s_keys: tuple[PublicKey, PrivateKey]) -> bytes:
    pub, _ = s_keys
    return to_bytes(pub.encrypt([1.5, -2.5, 0.0]), context=b"session-1/round-2")


# -- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("dump", [to_bytes, to_json])
def test_key_roundtrips(s_keys: tuple[PublicKey, PrivateKey], dump: object) -> None:
    pub, priv = s_keys
    assert load_public_key(dump(pub)) == pub  # type: ignore[operator]
    back = load_private_key(dump(priv))  # type: ignore[operator]
    assert (back.p, back.q, back.public_key) == (priv.p, priv.q, pub)


def test_private_key_json_carries_warning(s_keys: tuple[PublicKey, PrivateKey]) -> None:
    doc = json.loads(to_json(s_keys[1]))
    assert "SECRET" in doc["warning"]


@pytest.mark.parametrize("dump", [to_bytes, to_json])
def test_vector_roundtrip(s_keys: tuple[PublicKey, PrivateKey], dump: object) -> None:
    pub, priv = s_keys
    x = np.array([1.5, -2.5, 0.0, 1e9])
    enc = pub.encrypt(x, frac_bits=20)
    data = dump(enc, context=b"ctx")  # type: ignore[operator]
    back = load_vector(data, pub, expected_context=b"ctx")
    assert back.frac_bits == 20 and priv.decrypt(back).tolist() == x.tolist()
    assert back.ciphertexts == enc.ciphertexts  # fresh ciphertexts are sent as they are
    assert not back.fresh  # but a received vector is re-randomised when forwarded


@pytest.mark.parametrize("dump", [to_bytes, to_json])
def test_packed_roundtrip(s_keys: tuple[PublicKey, PrivateKey], dump: object) -> None:
    pub, priv = s_keys
    x = np.arange(30) * 0.25 - 3
    pv = pack_encrypt(pub, x, frac_bits=8)
    pv = pv + pv
    back = load_packed(dump(pv, context=b"c"), pub)  # type: ignore[operator]
    assert (back.weight, back.count, back.layout) == (2, 30, pv.layout)
    assert priv.decrypt(back).tolist() == (2 * x).tolist()


def test_results_rerandomised_by_default(s_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = s_keys
    result = pub.encrypt_encoded([1, 2]).add_encoded([3, 4])
    sent = load_vector(to_bytes(result), pub)
    assert not set(sent.ciphertexts) & set(result.ciphertexts)
    assert priv.decrypt_encoded(sent) == [4, 6]
    kept = load_vector(to_bytes(result, rerandomize=False), pub)
    assert kept.ciphertexts == result.ciphertexts
    via_json = load_vector(to_json(result), pub)
    assert not set(via_json.ciphertexts) & set(result.ciphertexts)


def test_bytes_layout_is_as_documented(s_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = s_keys
    enc = pub.encrypt_encoded([7])
    data = to_bytes(enc, context=b"ab")
    assert data[:6] == b"CRPA\x01\x03"
    assert data[6:22] == pub.key_id
    assert data[22:24] == (0).to_bytes(2, "big")  # frac_bits
    assert data[24:28] == b"\x00\x02ab"
    assert int.from_bytes(data[28:32], "big") == 1
    assert int.from_bytes(data[32:34], "big") == 512
    assert int.from_bytes(data[34:546], "big") == enc.ciphertexts[0]
    assert data[546:] == hashlib.sha256(data[:546]).digest()
    assert len(data) == 578
    doc = json.loads(to_json(enc, context=b"ab"))
    assert doc["sha256"] == data[546:].hex()


# -- rejection ----------------------------------------------------------------------------
def test_wrong_key_detected(s_keys: tuple[PublicKey, PrivateKey],
                            s_other: tuple[PublicKey, PrivateKey], wire_vector: bytes) -> None:
    with pytest.raises(PaillierKeyMismatchError, match="key_id") as info:
        load_vector(wire_vector, s_other[0])
    assert isinstance(info.value, RemoteProtocolError) and info.value.status_hint == 400
    j = to_json(s_keys[0].encrypt([1.0]))
    with pytest.raises(PaillierKeyMismatchError):
        load_vector(j, s_other[0])


def test_wrong_context_detected(s_keys: tuple[PublicKey, PrivateKey],
                                wire_vector: bytes) -> None:
    with pytest.raises(PaillierFormatError, match="another session") as info:
        load_vector(wire_vector, s_keys[0], expected_context=b"session-1/round-3")
    assert info.value.status_hint == 409


def test_wrong_kind_detected(s_keys: tuple[PublicKey, PrivateKey], wire_vector: bytes) -> None:
    pub, _ = s_keys
    with pytest.raises(PaillierFormatError, match="expected a packed-vector"):
        load_packed(wire_vector, pub)
    with pytest.raises(PaillierFormatError, match="expected a public-key"):
        load_public_key(to_bytes(s_keys[1]))
    with pytest.raises(PaillierFormatError, match="expected a ciphertext-vector"):
        load_vector(to_json(pub), pub)


@pytest.mark.parametrize("cut", [0, 5, 40, 300, -1])
def test_truncated_detected(s_keys: tuple[PublicKey, PrivateKey], wire_vector: bytes,
                            cut: int) -> None:
    with pytest.raises(PaillierFormatError):
        load_vector(wire_vector[:cut], s_keys[0])


def test_small_key_in_message_refused() -> None:
    import gmpy2

    n = int(gmpy2.next_prime(2**511) * gmpy2.next_prime(2**512))
    body = ser._public_body(n)
    with pytest.raises(PaillierFormatError, match="at least 2048"):
        load_public_key(ser._frame(ser.KIND_PUBLIC_KEY, body))


def test_out_of_group_ciphertext_refused_even_with_valid_checksum(
    s_keys: tuple[PublicKey, PrivateKey],
) -> None:
    """The checksum is not what protects us: range and unit checks run on every load."""
    pub, _ = s_keys
    for bad, why in ((0, "outside"), (pub.n, "not a unit"), (pub.nsquare, "outside")):
        body = ser._vector_body(pub.key_id, 0, b"", [bad], 512)
        with pytest.raises(PaillierFormatError, match=why):
            load_vector(ser._frame(ser.KIND_VECTOR, body), pub)


def test_tampered_json_detected(s_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = s_keys
    doc = json.loads(to_json(pub.encrypt([1.0, 2.0]), context=b"x"))
    for field, value in (("frac_bits", 31), ("context", "eQ"),
                         ("ciphertexts", list(reversed(doc["ciphertexts"])))):
        bad = dict(doc, **{field: value})
        with pytest.raises(PaillierFormatError, match="checksum"):
            load_vector(json.dumps(bad), pub)
    for field, value in (("frac_bits", "32"), ("ciphertexts", "AA"), ("context", 5),
                         ("key_id", "zz"), ("version", 2), ("format", "phe")):
        bad = dict(doc, **{field: value})
        with pytest.raises(PaillierFormatError, match=field):
            load_vector(json.dumps(bad), pub)
    missing = {k: v for k, v in doc.items() if k != "sha256"}
    with pytest.raises(PaillierFormatError, match="sha256"):
        load_vector(json.dumps(missing), pub)
    with pytest.raises(PaillierFormatError, match="json"):
        load_vector("{not json", pub)
    with pytest.raises(PaillierFormatError, match="json"):
        load_vector("[1, 2]", pub)


@given(st.data())
@SETTINGS
def test_any_bit_flip_is_detected(s_keys: tuple[PublicKey, PrivateKey], wire_vector: bytes,
                                  data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, len(wire_vector) - 1))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(wire_vector)
    bad[pos] ^= 1 << bit
    with pytest.raises(PaillierFormatError):
        load_vector(bytes(bad), s_keys[0])


@given(st.binary(max_size=700))
@SETTINGS
def test_garbage_only_raises_remote_error(s_keys: tuple[PublicKey, PrivateKey],
                                          junk: bytes) -> None:
    pub, _ = s_keys
    for loader in (lambda d: load_vector(d, pub), lambda d: load_packed(d, pub),
                   load_public_key, load_private_key):
        with pytest.raises(RemoteProtocolError):
            loader(junk)
        with pytest.raises(RemoteProtocolError):
            loader(b"CRPA\x01" + junk)


@given(st.sampled_from(["format", "version", "kind", "key_id", "frac_bits", "context",
                        "packing", "weight", "values", "ciphertexts", "sha256"]),
       st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8))
@example(field="version", value=True)  # JSON true == 1 in Python; found by this test
@example(field="sha256", value="\x80")  # non-ASCII text broke compare_digest; likewise
@SETTINGS
def test_garbage_json_field_only_raises_remote_error(
    s_keys: tuple[PublicKey, PrivateKey], field: str, value: object
) -> None:
    pub, _ = s_keys
    for kind_doc, loader in (
        (json.loads(to_json(pub.encrypt([1.0]))), load_vector),
        (json.loads(to_json(pack_encrypt(pub, [1.0]))), load_packed),
    ):
        doc = dict(kind_doc, **{field: value})
        with pytest.raises(RemoteProtocolError):
            loader(json.dumps(doc), pub)


def test_forged_packed_metadata_refused(s_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = s_keys
    pv = pack_encrypt(pub, [1.0, 2.0])
    doc = json.loads(to_json(pv))
    # recompute the checksum, as an active attacker could: the semantic checks still hold
    doc["weight"] = 10**9
    layout = ser.PackingLayout(**doc["packing"])
    body = ser._packed_body(pub.key_id, doc["frac_bits"], b"", layout, doc["weight"],
                            doc["values"], pv.ciphertexts, 512)
    doc["sha256"] = hashlib.sha256(b"CRPA\x01\x04" + body).hexdigest()
    with pytest.raises(PaillierFormatError, match="weight"):
        load_packed(json.dumps(doc), pub)
