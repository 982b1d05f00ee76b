"""Known-answer tests for the PSI primitives.

Provenance:
- RFC 9380 appendix J.7.2, suite curve25519_XMD:SHA-512_ELL2_NU_ (DST
  "QUUX-V01-CS02-with-curve25519_XMD:SHA-512_ELL2_NU_"); the same values are in the CFRG
  draft repository cfrg/draft-irtf-cfrg-hash-to-curve, poc/vectors/
  curve25519_XMD:SHA-512_ELL2_NU_.json (commit 146f1626).
- RFC 9380 appendix K.3, expand_message_xmd with SHA-512 (DST
  "QUUX-V01-CS02-with-expander-SHA512-256"), same repository, poc/vectors/
  expand_message_xmd_SHA512_38.json.
- RFC 7748 section 5.2, first X25519 test vector.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from protocols.errors import RemoteProtocolError
from protocols.psi import ecdh, h2c

NU_DST = b"QUUX-V01-CS02-with-curve25519_XMD:SHA-512_ELL2_NU_"
# (msg, u[0], Q.x, Q.y, P.x, P.y)
NU_VECTORS = [
    (
        b"",
        "608d892b641f0328523802a6603427c26e55e6f27e71a91a478148d45b5093cd",
        "51125222da5e763d97f3c10fcc92ea6860b9ccbbd2eb1285728f566721c1e65b",
        "343d2204f812d3dfc5304a5808c6c0d81a903a5d228b342442aa3c9ba5520a3d",
        "1bb913f0c9daefa0b3375378ffa534bda5526c97391952a7789eb976edfe4d08",
        "4548368f4f983243e747b62a600840ae7c1dab5c723991f85d3a9768479f3ec4",
    ),
    (
        b"abc",
        "46f5b22494bfeaa7f232cc8d054be68561af50230234d7d1d63d1d9abeca8da5",
        "7d56d1e08cb0ccb92baf069c18c49bb5a0dcd927eff8dcf75ca921ef7f3e6eeb",
        "404d9a7dc25c9c05c44ab9a94590e7c3fe2dcec74533a0b24b188a5d5dacf429",
        "7c22950b7d900fa866334262fcaea47a441a578df43b894b4625c9b450f9a026",
        "5547bc00e4c09685dcbc6cb6765288b386d8bdcb595fa5a6e3969e08097f0541",
    ),
    (
        b"abcdef0123456789",
        "235fe40c443766ce7e18111c33862d66c3b33267efa50d50f9e8e5d252a40aaa",
        "3fbe66b9c9883d79e8407150e7c2a1c8680bee496c62fabe4619a72b3cabe90f",
        "08ec476147c9a0a3ff312d303dbbd076abb7551e5fce82b48ab14b433f8d0a7b",
        "31ad08a8b0deeb2a4d8b0206ca25f567ab4e042746f792f4b7973f3ae2096c52",
        "405070c28e78b4fa269427c82827261991b9718bd6c6e95d627d701a53c30db1",
    ),
    (
        b"q128_" + b"q" * 128,
        "001e92a544463bda9bd04ddbe3d6eed248f82de32f522669efc5ddce95f46f5b",
        "227e0bb89de700385d19ec40e857db6e6a3e634b1c32962f370d26f84ff19683",
        "5f86ff3851d262727326a32c1bf7655a03665830fa7f1b8b1e5a09d85bc66e4a",
        "027877759d155b1997d0d84683a313eb78bdb493271d935b622900459d52ceaa",
        "54d691731a53baa30707f4a87121d5169fb5d587d70fb0292b5830dedbec4c18",
    ),
    (
        b"a512_" + b"a" * 512,
        "1a68a1af9f663592291af987203393f707305c7bac9c8d63d6a729bdc553dc19",
        "3bcd651ee54d5f7b6013898aab251ee8ecc0688166fce6e9548d38472f6bd196",
        "1bb36ad9197299f111b4ef21271c41f4b7ecf5543db8bb5931307ebdb2eaa465",
        "5fd892c0958d1a75f54c3182a18d286efab784e774d1e017ba2fb252998b5dc1",
        "750af3c66101737423a4519ac792fb93337bd74ee751f19da4cf1e94f4d6d0b8",
    ),
]


@pytest.mark.parametrize(("msg", "u", "qx", "qy", "px", "py"), NU_VECTORS)
def test_rfc9380_curve25519_nu_vectors(
    msg: bytes, u: str, qx: str, qy: str, px: str, py: str
) -> None:
    assert h2c.hash_to_field(msg, NU_DST) == [int(u, 16)]
    assert h2c.map_to_curve_elligator2(int(u, 16)) == (int(qx, 16), int(qy, 16))
    assert h2c.encode_to_curve(msg, NU_DST) == (int(px, 16), int(py, 16))
    # fast path: u-coordinate of Q, little-endian, as X25519 takes it
    assert h2c.encode_to_u(msg, NU_DST) == int(qx, 16).to_bytes(32, "little")
    assert h2c.map_to_u(int(u, 16)) == int(qx, 16)


XMD_DST = b"QUUX-V01-CS02-with-expander-SHA512-256"
XMD_VECTORS = [
    (b"", 0x20, "6b9a7312411d92f921c6f68ca0b6380730a1a4d982c507211a90964c394179ba"),
    (b"abc", 0x20, "0da749f12fbe5483eb066a5f595055679b976e93abe9be6f0f6318bce7aca8dc"),
    (
        b"",
        0x80,
        "41b037d1734a5f8df225dd8c7de38f851efdb45c372887be655212d07251b921b052b62eaed99b46f72f"
        "2ef4cc96bfaf254ebbbec091e1a3b9e4fb5e5b619d2e0c5414800a1d882b62bb5cd1778f098b8eb6cb39"
        "9d5d9d18f5d5842cf5d13d7eb00a7cff859b605da678b318bd0e65ebff70bec88c753b159a805d2c89c5"
        "5961",
    ),
]


@pytest.mark.parametrize(("msg", "length", "expected"), XMD_VECTORS)
def test_rfc9380_expand_message_xmd_sha512(msg: bytes, length: int, expected: str) -> None:
    assert h2c.expand_message_xmd(msg, XMD_DST, length).hex() == expected


def test_invalid_dst_rejected() -> None:
    with pytest.raises(ValueError):
        h2c.expand_message_xmd(b"x", b"", 32)
    with pytest.raises(ValueError):
        h2c.expand_message_xmd(b"x", b"d" * 256, 32)


def test_rfc7748_x25519_vector() -> None:
    scalar = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    out = bytes.fromhex("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")
    assert ecdh.scalarmult_packed(scalar, u) == out


def test_libsodium_and_openssl_x25519_agree_on_hashed_points() -> None:
    points = h2c.encode_many([os.urandom(12) for _ in range(64)], NU_DST)
    key = os.urandom(32)
    ours = ecdh.scalarmult_packed(key, points)
    sk = X25519PrivateKey.from_private_bytes(key)
    theirs = b"".join(
        sk.exchange(X25519PublicKey.from_public_bytes(points[i : i + 32]))
        for i in range(0, len(points), 32)
    )
    assert ours == theirs


def test_blinding_commutes() -> None:
    a, b = os.urandom(32), os.urandom(32)
    pts = h2c.encode_many([b"x", b"y"], NU_DST)
    assert ecdh.scalarmult_packed(a, ecdh.scalarmult_packed(b, pts)) == ecdh.scalarmult_packed(
        b, ecdh.scalarmult_packed(a, pts)
    )


def test_small_order_input_raises_remote_error() -> None:
    with pytest.raises(RemoteProtocolError):
        ecdh.scalarmult_packed(os.urandom(32), bytes(32))
