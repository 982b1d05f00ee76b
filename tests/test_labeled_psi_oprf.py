"""The OPRF math of the anonymous query under X25519: blinding, clamping, cofactor, KDF."""

from __future__ import annotations

import hmac
import os

import gmpy2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_scalarmult

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.labeled_psi import oprf
from protocols.psi import ecdh, h2c


def test_blind_evaluate_unblind_equals_direct_evaluation() -> None:
    key = oprf.new_oprf_key()
    ids = [os.urandom(12) for _ in range(64)] + [b"\x01+8613800000000"]
    for _ in range(5):
        r, s = oprf.new_blinding_pair()
        blinded = oprf.blind(r, ids)
        assert oprf.unblind(s, oprf.evaluate(key, blinded)) == oprf.oprf_direct(key, ids)
        # the blinded points are neither H(x) nor F(x)
        assert blinded != oprf.hash_to_curve(ids)
        assert blinded != oprf.oprf_direct(key, ids)


def test_blinding_pair_is_clamped_and_inverse_mod_ell() -> None:
    for _ in range(50):
        r, s = oprf.new_blinding_pair()
        assert oprf.is_clamped(r) and oprf.is_clamped(s)
        rv, sv = int.from_bytes(r, "little"), int.from_bytes(s, "little")
        assert rv * sv % oprf.ELL == 1
        assert rv % 8 == 0 and sv % 8 == 0


def test_plain_inverse_is_wrong_because_x25519_clamps_it() -> None:
    """r^-1 mod ℓ is (almost never) a clamped scalar: X25519 would change it."""
    key = oprf.new_oprf_key()
    ids = [b"some identifier"]
    wrong = 0
    for _ in range(10):
        r, _s = oprf.new_blinding_pair()
        rv = int.from_bytes(r, "little")
        naive = int(gmpy2.invert(rv, oprf.ELL))
        evaluated = oprf.evaluate(key, oprf.blind(r, ids))
        got = crypto_scalarmult(naive.to_bytes(32, "little"), evaluated)
        if oprf.clamp(naive) % oprf.ELL != naive % oprf.ELL:
            wrong += got != oprf.oprf_direct(key, ids)
        else:  # pragma: no cover - probability about 2^-125
            assert got == oprf.oprf_direct(key, ids)
    assert wrong == 10


def test_unblinding_scalar_none_when_no_clamped_inverse_exists() -> None:
    found_none = found = 0
    for _ in range(64):
        r = oprf.clamp(int.from_bytes(os.urandom(32), "little")).to_bytes(32, "little")
        s = oprf.unblinding_scalar(r)
        if s is None:
            found_none += 1
        else:
            found += 1
            assert int.from_bytes(r, "little") * int.from_bytes(s, "little") % oprf.ELL == 1
    assert found_none > 0 and found > 0  # about half each


def test_cofactor_is_cleared_by_clamping() -> None:
    """Adding the 2-torsion point (0, 0) maps u to 1/u; the OPRF output must not change."""
    key = oprf.new_oprf_key()
    r, s = oprf.new_blinding_pair()
    for msg in (b"a", b"b", b"c", os.urandom(8)):
        u = oprf.hash_to_curve([msg])
        u_torsion = int(gmpy2.invert(int.from_bytes(u, "little"), h2c.P)).to_bytes(32, "little")
        assert u_torsion != u
        assert crypto_scalarmult(key, u_torsion) == crypto_scalarmult(key, u)
        blinded = crypto_scalarmult(r, u_torsion)
        assert oprf.unblind(s, oprf.evaluate(key, blinded)) == oprf.oprf_direct(key, [msg])


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=1, max_size=40))
def test_oprf_matches_reference_encode_to_curve(msg: bytes) -> None:
    """The OPRF's u-only hash path gives the x of the RFC 9380 reference Elligator 2 map."""
    key = oprf.new_oprf_key()
    (u_field,) = h2c.hash_to_field(msg, oprf.H2C_DST, 1)
    x, _y = h2c.map_to_curve_elligator2(u_field)
    assert oprf.oprf_direct(key, [msg]) == crypto_scalarmult(key, x.to_bytes(32, "little"))


def test_kdf_is_hkdf_sha512() -> None:
    table_id = os.urandom(16)
    deriver = oprf.TagDeriver(table_id)
    for _ in range(10):
        f = os.urandom(32)
        tag, key = deriver.derive(f)
        prk = hmac.digest(b"cleanroom-lpsi-v1 salt\x00" + table_id, f, "sha512")
        okm = hmac.digest(prk, b"cleanroom-lpsi-v1 tag[0:16] key[32:64]\x00\x01", "sha512")
        assert (tag, key) == (okm[:16], okm[32:64])
    other = oprf.TagDeriver(os.urandom(16)).derive(f)
    assert other != deriver.derive(f)  # bound to the table id


def test_label_seal_open_and_binding() -> None:
    tid, tag, key = os.urandom(16), os.urandom(16), os.urandom(32)
    ct = oprf.seal_label(key, tid, 3, tag, b"stores", 32)
    assert len(ct) == oprf.ciphertext_size(32)
    assert oprf.open_label(key, tid, 3, tag, ct) == b"stores"
    for bad in ((os.urandom(32), tid, 3, tag), (key, os.urandom(16), 3, tag),
                (key, tid, 4, tag), (key, tid, 3, os.urandom(16))):
        with pytest.raises(RemoteProtocolError):
            oprf.open_label(*bad, ct)
    with pytest.raises(LocalProtocolError):
        oprf.seal_label(key, tid, 1, tag, bytes(33), 32)


def test_evaluate_rejects_bad_points() -> None:
    key = oprf.new_oprf_key()
    with pytest.raises(RemoteProtocolError):
        oprf.evaluate(key, bytes(31))
    with pytest.raises(RemoteProtocolError):
        oprf.evaluate(key, bytes(32))  # u = 0: small order
    with pytest.raises(RemoteProtocolError):
        oprf.evaluate(key, b"\xff" * 32)  # non-canonical


_P25519 = 2**255 - 19


@pytest.mark.parametrize("count", [1, 3, 8, 9, 64])  # the per-point and the numpy paths
@pytest.mark.parametrize("bad", [
    pytest.param((_P25519).to_bytes(32, "little"), id="u = p"),
    pytest.param((_P25519 + 5).to_bytes(32, "little"), id="u > p"),
    pytest.param(b"\x00" * 31 + b"\x80", id="high bit"),
    pytest.param(b"\x01" * 31 + b"\xff", id="high bit and large"),
])
def test_check_points_rejects_non_canonical_encodings_at_any_position(
        count: int, bad: bytes) -> None:
    good = [(_P25519 - 1 - i).to_bytes(32, "little") for i in range(count)]  # largest valid
    ecdh.check_points(b"".join(good))
    for position in {0, count // 2, count - 1}:
        points = [*good[:position], bad, *good[position + 1:]]
        with pytest.raises(RemoteProtocolError, match="non-canonical"):
            ecdh.check_points(b"".join(points))
    with pytest.raises(RemoteProtocolError, match="multiple of 32"):
        ecdh.check_points(b"".join(good) + b"\x00")
