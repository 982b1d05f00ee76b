"""Packing several fixed-point values per Paillier plaintext: round trips, homomorphic adds
and scalar multiplications, and overflow/tampering detection (never a silent wrap)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.paillier import (
    EncodingError,
    PackedVector,
    PackingLayout,
    PackingOverflowError,
    PaillierFormatError,
    PrivateKey,
    PublicKey,
    generate_keypair,
    hazmat,
    pack_encrypt,
    pack_encrypt_encoded,
    quantisation_error,
)

SETTINGS = settings(max_examples=15, deadline=None)


@pytest.fixture(scope="session")
def pk_keys() -> tuple[PublicKey, PrivateKey]:
    pub, priv = generate_keypair(2048)
    return pub.precompute(), priv


def test_default_layout_fits_key(pk_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = pk_keys
    lay = PackingLayout.for_key(pub)
    assert lay.slot_bits == 80 and lay.slots == 25
    assert lay.used_bits <= pub.n_bits - 1
    with pytest.raises(PaillierFormatError, match="do not fit"):
        PackingLayout(64, 16, 26).check_key(pub)


def test_roundtrip_reals_across_ciphertexts(pk_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = pk_keys
    x = np.random.default_rng(1).normal(0, 1000, size=57)  # 3 ciphertexts, last partial
    pv = pack_encrypt(pub, x)
    assert len(pv.ciphertexts) == 3 and len(pv) == 57
    assert np.all(np.abs(priv.decrypt(pv) - x) <= quantisation_error(32))


@given(st.lists(st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1)),
                min_size=1, max_size=30),
       st.integers(0, 1000))
@SETTINGS
def test_packed_add_and_scalar(pk_keys: tuple[PublicKey, PrivateKey],
                               pairs: list[tuple[int, int]], k: int) -> None:
    pub, priv = pk_keys
    a = [p[0] for p in pairs]
    b = [p[1] for p in pairs]
    pa, pb = pack_encrypt_encoded(pub, a), pack_encrypt_encoded(pub, b)
    s = pa + pb
    assert s.weight == 2
    assert s.decrypt_encoded(priv) == [x + y for x, y in zip(a, b, strict=True)]
    m = s.mul_scalar(k)
    assert m.decrypt_encoded(priv) == [k * (x + y) for x, y in zip(a, b, strict=True)]
    assert pa.add_encoded(b).decrypt_encoded(priv) == [x + y for x, y in zip(a, b,
                                                                              strict=True)]


def test_packed_extreme_values_exact(pk_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = pk_keys
    lo, hi = -(2**63), 2**63 - 1
    pv = pack_encrypt_encoded(pub, [lo, hi, 0, lo, hi])
    total = pv
    for _ in range(2**4 - 1):
        total = total + pv
    assert total.decrypt_encoded(priv) == [16 * v for v in (lo, hi, 0, lo, hi)]


def test_value_too_wide_refused_at_packing(pk_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = pk_keys
    with pytest.raises(PackingOverflowError, match=r"values\[1\]"):
        pack_encrypt_encoded(pub, [0, 2**63])
    with pytest.raises(PackingOverflowError, match=r"values\[0\]"):
        pack_encrypt(pub, [2.0**40], frac_bits=32)


def test_weight_overflow_refused_before_computing(pk_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = pk_keys
    lay = PackingLayout(value_bits=8, headroom_bits=2, slots=10)
    assert lay.max_weight == 4
    pv = pack_encrypt_encoded(pub, [127, -128, 5], layout=lay)
    four = (pv + pv) + (pv + pv)
    assert four.decrypt_encoded(priv) == [508, -512, 20]
    with pytest.raises(PackingOverflowError, match="weight 5"):
        _ = four + pv
    with pytest.raises(PackingOverflowError, match="weight"):
        pv.mul_scalar(5)
    with pytest.raises(PackingOverflowError, match="weight"):
        four.add_encoded([1, 1, 1])


def test_negative_scalar_refused(pk_keys: tuple[PublicKey, PrivateKey]) -> None:
    pv = pack_encrypt_encoded(pk_keys[0], [1, 2])
    with pytest.raises(PackingOverflowError, match="borrow"):
        pv.mul_scalar(-1)
    with pytest.raises(EncodingError):
        pv.mul_scalar(1.5)  # type: ignore[arg-type]


def test_mul_plain_fixed_point_scalar(pk_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = pk_keys
    pv = pack_encrypt(pub, [1.5, -2.0], frac_bits=16)
    out = pv.mul_plain(0.75, frac_bits=8)
    assert out.frac_bits == 24
    assert priv.decrypt(out).tolist() == [1.125, -1.5]


def test_mismatched_layouts_refused(pk_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = pk_keys
    a = pack_encrypt_encoded(pub, [1, 2])
    b = pack_encrypt_encoded(pub, [1, 2], layout=PackingLayout(32, 8, 20))
    with pytest.raises(ValueError, match="layout"):
        _ = a + b
    c = pack_encrypt_encoded(pub, [1, 2], frac_bits=3)
    with pytest.raises(EncodingError, match="scales"):
        _ = a + c


def _forge(pub: PublicKey, plaintext: int, *, layout: PackingLayout, count: int,
           weight: int = 1) -> PackedVector:
    ct = hazmat.encrypt_with_exponents_unsafe(pub, [plaintext], [12345]).ciphertexts
    return PackedVector(pub, ct, layout=layout, count=count, weight=weight, frac_bits=0)


def test_tampered_slot_detected(pk_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = pk_keys
    lay = PackingLayout(8, 4, 4)
    # slot 0 = 256 > 1 * 255: impossible for weight 1
    with pytest.raises(PackingOverflowError, match="slot 0"):
        _forge(pub, 256, layout=lay, count=2).decrypt_encoded(priv)
    # slot 3 is padding for count=2 and must be zero
    with pytest.raises(PackingOverflowError, match="padding"):
        _forge(pub, 1 << 36, layout=lay, count=2).decrypt_encoded(priv)
    # bits above the last slot
    with pytest.raises(PackingOverflowError, match="packed width"):
        _forge(pub, 1 << 48, layout=lay, count=4).decrypt_encoded(priv)
    # a negative plaintext (wrapped mod n) is far above the packed width
    with pytest.raises(PackingOverflowError):
        _forge(pub, -1, layout=lay, count=4).decrypt_encoded(priv)


def test_bad_metadata_refused(pk_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = pk_keys
    pv = pack_encrypt_encoded(pub, list(range(30)))
    with pytest.raises(PaillierFormatError, match="count"):
        PackedVector(pub, pv.ciphertexts, layout=pv.layout, count=60, weight=1, frac_bits=0)
    with pytest.raises(PaillierFormatError, match="weight"):
        PackedVector(pub, pv.ciphertexts, layout=pv.layout, count=30,
                     weight=pv.layout.max_weight + 1, frac_bits=0)


def test_packed_rerandomise(pk_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = pk_keys
    pv = pack_encrypt_encoded(pub, [3, 4, 5])
    assert pv.for_transport() is pv
    s = pv + pv
    sent = s.for_transport()
    assert sent.fresh and sent.ciphertexts != s.ciphertexts
    assert sent.decrypt_encoded(priv) == [6, 8, 10]
