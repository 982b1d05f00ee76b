"""Behaviour tests of protocols.paillier: keys, DJN encryption, CRT decryption, phe interop,
homomorphic operations, multi-exponentiation, re-randomisation and randomiser pools.

Packing and serialisation have their own files (test_paillier_packing.py,
test_paillier_serialization.py); known-answer vectors are in test_paillier_vectors.py.
"""

from __future__ import annotations

import math
import pickle
import secrets

import gmpy2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phe import paillier

from protocols.errors import RemoteProtocolError
from protocols.paillier import (
    MIN_KEY_BITS,
    EncodingError,
    EncryptedVector,
    KeySizeError,
    PaillierFormatError,
    PaillierKeyMismatchError,
    PlaintextOverflowError,
    PrivateKey,
    PublicKey,
    RandomizerPool,
    decode,
    encode,
    generate_keypair,
    hazmat,
    quantisation_error,
)
from protocols.paillier.fastexp import FixedBaseTable, multiexp

SETTINGS = settings(max_examples=20, deadline=None)


@pytest.fixture(scope="session")
def keys() -> tuple[PublicKey, PrivateKey]:
    pub, priv = generate_keypair(2048)
    return pub.precompute(), priv


@pytest.fixture(scope="session")
def other_keys() -> tuple[PublicKey, PrivateKey]:
    return generate_keypair(2048)


# -- keys ------------------------------------------------------------------------------
def test_generated_key_shape(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    assert pub.n_bits == 2048
    assert priv.p * priv.q == pub.n and priv.p != priv.q
    assert priv.p % 4 == 3 and priv.q % 4 == 3
    assert gmpy2.is_prime(priv.p, 30) and gmpy2.is_prime(priv.q, 30)
    assert math.gcd(pub.n, (priv.p - 1) * (priv.q - 1)) == 1
    assert pub.exponent_bits == 448
    assert "p=" not in repr(priv) and str(priv.p) not in repr(priv)


@pytest.mark.parametrize("bits", [512, 1024, 2046])
def test_small_keys_refused(bits: int) -> None:
    with pytest.raises(KeySizeError, match="2048"):
        generate_keypair(bits)


def test_small_modulus_refused() -> None:
    p, q = gmpy2.next_prime(2**511), gmpy2.next_prime(2**512)
    with pytest.raises(KeySizeError, match="at least 2048"):
        PublicKey(int(p * q))
    assert MIN_KEY_BITS == 2048


def test_bad_modulus_refused() -> None:
    with pytest.raises(PaillierFormatError):
        PublicKey(2**2048)  # even
    with pytest.raises(PaillierFormatError):
        PublicKey(int(gmpy2.next_prime(2**1024)) ** 2)  # a square


def test_exponent_below_twice_security_refused(keys: tuple[PublicKey, PrivateKey]) -> None:
    with pytest.raises(ValueError, match="below"):
        PublicKey(keys[0].n, exponent_bits=200)


def test_private_key_must_factor_n(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    with pytest.raises(PaillierFormatError):
        PrivateKey(pub, priv.p, priv.q + 2)


# -- encryption / decryption -----------------------------------------------------------
def _edge_values(pub: PublicKey) -> list[int]:
    return [0, 1, -1, 2, -2, 2**64, -(2**64), pub.max_int, -pub.max_int, pub.max_int - 1]


def test_roundtrip_edge_integers(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    vals = _edge_values(pub)
    enc = pub.encrypt_encoded(vals)
    assert priv.decrypt_encoded(enc) == vals


def test_roundtrip_edge_reals(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    x = np.array([0.0, -0.0, 1.5, -2.25, 1e-12, -1e-12, 1e12, -1e12, 2.0**-33, 123456.789])
    got = priv.decrypt(pub.encrypt(x))
    assert np.all(np.abs(got - x) <= quantisation_error(32))


def test_plaintext_out_of_range_refused(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = keys
    with pytest.raises(EncodingError, match=r"values\[1\]"):
        pub.encrypt_encoded([0, pub.max_int + 1])


def test_overflow_band_detected(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    a = pub.encrypt_encoded([pub.max_int])
    with pytest.raises(PlaintextOverflowError, match="overflowed"):
        priv.decrypt_encoded(a + a)


def test_encryption_is_randomised(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = keys
    a = pub.encrypt_encoded([7, 7])
    b = pub.encrypt_encoded([7])
    assert len({*a.ciphertexts, *b.ciphertexts}) == 3


def test_numpy_int64_inputs(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    arr = np.array([2**62, -(2**62), 5], dtype=np.int64)
    enc = pub.encrypt_encoded(arr)
    assert priv.decrypt_encoded(enc) == [2**62, -(2**62), 5]
    big = enc.mul_encoded(np.array([2**40, 2**40, 1], dtype=np.int64))
    assert priv.decrypt_encoded(big) == [2**102, -(2**102), 5]
    assert all(type(v) is int for v in encode(np.array([1.5, 2.5])))


def test_crt_matches_textbook_and_phe(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    phe_priv = priv.to_phe()
    for _ in range(3):
        c = secrets.randbelow(pub.nsquare - 2) + 1
        if math.gcd(c, pub.n) != 1:
            continue
        ours = priv.raw_decrypt(c)
        assert ours == hazmat.decrypt_textbook(priv, c) == phe_priv.raw_decrypt(c)


# -- phe interop -------------------------------------------------------------------------
def test_ours_decrypt_with_phe(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    x = np.array([3.25, -1.0, 0.0, 1e6])
    phe_priv = priv.to_phe()
    assert [phe_priv.decrypt(v) for v in pub.encrypt(x).to_phe()] == pytest.approx(x.tolist())
    ints = pub.encrypt_encoded([5, -5])
    assert [phe_priv.raw_decrypt(c) for c in ints.ciphertexts] == [5, pub.n - 5]


def test_phe_decrypt_with_ours(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    phe_pub = pub.to_phe()
    nums = [phe_pub.encrypt(v, precision=2**-32) for v in (2.5, -7.75, 0.0)]
    vec = EncryptedVector.from_phe(pub, nums)
    assert vec.frac_bits == 32
    assert priv.decrypt(vec).tolist() == [2.5, -7.75, 0.0]
    raw = phe_pub.raw_encrypt(12345)
    assert priv.raw_decrypt(raw) == 12345


def test_phe_generated_key_interop() -> None:
    phe_pub, phe_priv = paillier.generate_paillier_keypair(n_length=2048)
    pub = PublicKey.from_phe(phe_pub)
    priv = PrivateKey.from_phe(phe_priv)
    enc = pub.encrypt([1.25, -3.5])
    assert [phe_priv.decrypt(v) for v in enc.to_phe()] == [1.25, -3.5]
    assert priv.decrypt(EncryptedVector.from_phe(pub, [phe_pub.encrypt(0.5)])).tolist() == [0.5]


def test_from_phe_rejects_other_key(keys: tuple[PublicKey, PrivateKey],
                                    other_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = keys
    num = other_keys[0].to_phe().encrypt(1)
    with pytest.raises(PaillierFormatError, match="another key"):
        EncryptedVector.from_phe(pub, [num])


def test_to_phe_needs_frac_bits_multiple_of_4(keys: tuple[PublicKey, PrivateKey]) -> None:
    with pytest.raises(EncodingError, match="multiple of 4"):
        keys[0].encrypt([1.0], frac_bits=10).to_phe()


# -- DJN ---------------------------------------------------------------------------------
def test_djn_ciphertexts_are_paillier_ciphertexts(keys: tuple[PublicKey, PrivateKey]) -> None:
    """c = (1 + m n) h_s^a equals phe's (1 + m n) r^n with r = h^a mod n."""
    pub, _ = keys
    phe_pub = pub.to_phe()
    for m in (0, 1, -9, pub.max_int):
        a = secrets.randbits(pub.exponent_bits)
        c = hazmat.encrypt_with_exponents_unsafe(pub, [m], [a]).ciphertexts[0]
        r = hazmat.djn_r_for_exponent(pub, a)
        assert c == phe_pub.raw_encrypt(m % pub.n, r_value=r)


def test_djn_base_is_derived_from_n(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = keys
    fresh = PublicKey(pub.n)
    assert fresh.djn_base() == pub.djn_base()
    assert gmpy2.jacobi(pub.djn_base(), pub.n) == 1  # -x^2 with -1 a non-residue mod p, q
    assert fresh.djn_hs() == gmpy2.powmod(pub.djn_base(), pub.n, pub.nsquare)


def test_private_randomness_variant_reproducible(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    exps = [secrets.randbits(448) for _ in range(3)]
    a = hazmat.encrypt_with_exponents_unsafe(pub, [1, 2, 3], exps)
    b = hazmat.encrypt_with_exponents_unsafe(pub, [1, 2, 3], exps)
    c = hazmat.encrypt_with_exponents_unsafe(pub, [1, 2, 3], [e + 1 for e in exps])
    assert a.ciphertexts == b.ciphertexts
    assert not set(a.ciphertexts) & set(c.ciphertexts)
    assert priv.decrypt_encoded(a) == priv.decrypt_encoded(c) == [1, 2, 3]


@given(st.integers(min_value=0, max_value=2**448 - 1))
@SETTINGS
def test_fixed_base_table_matches_powmod(keys: tuple[PublicKey, PrivateKey], a: int) -> None:
    pub, _ = keys
    assert pub.table.pow(a) == gmpy2.powmod(pub.djn_hs(), a, pub.nsquare)


def test_fixed_base_table_small_modulus() -> None:
    t = FixedBaseTable(3, 1_000_003, 20)
    for a in (0, 1, 255, 256, 2**20 - 1, 777_777):
        assert t.pow(a) == pow(3, a, 1_000_003)
    with pytest.raises(ValueError):
        t.pow(2**20)


# -- multi-exponentiation -----------------------------------------------------------------
@given(
    st.lists(st.tuples(st.integers(2, 10**12), st.integers(0, 2**70)), min_size=0,
             max_size=40)
)
@SETTINGS
def test_multiexp_matches_naive(pairs: list[tuple[int, int]]) -> None:
    mod = 2**127 - 1
    bases = [gmpy2.mpz(b) for b, _ in pairs]
    exps = [e for _, e in pairs]
    want = 1
    for b, e in pairs:
        want = want * pow(b, e, mod) % mod
    assert multiexp(bases, exps, mod) == want


def test_multiexp_bucket_path_numpy() -> None:
    rng = np.random.default_rng(3)
    mod = 2**521 - 1
    bases = [gmpy2.mpz(int(v)) for v in rng.integers(2, 2**62, size=500)]
    exps = rng.integers(0, 2**20, size=500)
    want = 1
    for b, e in zip(bases, exps.tolist(), strict=True):
        want = want * pow(int(b), e, mod) % mod
    assert multiexp(bases, exps, mod) == want
    with pytest.raises(ValueError):
        multiexp(bases[:2], np.array([1, -1]), mod)


# -- homomorphic properties -----------------------------------------------------------------
small_ints = st.integers(min_value=-(2**40), max_value=2**40)


@given(st.lists(st.tuples(small_ints, small_ints, small_ints), min_size=1, max_size=4))
@SETTINGS
def test_homomorphic_add_sub_mul(keys: tuple[PublicKey, PrivateKey],
                                 triples: list[tuple[int, int, int]]) -> None:
    pub, priv = keys
    a = [t[0] for t in triples]
    b = [t[1] for t in triples]
    k = [t[2] for t in triples]
    ea, eb = pub.encrypt_encoded(a), pub.encrypt_encoded(b)
    assert priv.decrypt_encoded(ea + eb) == [x + y for x, y in zip(a, b, strict=True)]
    assert priv.decrypt_encoded(ea - eb) == [x - y for x, y in zip(a, b, strict=True)]
    assert priv.decrypt_encoded(-ea) == [-x for x in a]
    assert priv.decrypt_encoded(ea.add_encoded(b)) == [x + y for x, y in zip(a, b, strict=True)]
    assert priv.decrypt_encoded(ea.mul_encoded(k)) == [x * y for x, y in zip(a, k, strict=True)]
    assert priv.decrypt_encoded(ea.sum()) == [sum(a)]


@given(
    st.integers(min_value=1, max_value=6).flatmap(
        lambda rows: st.tuples(
            st.lists(small_ints, min_size=rows, max_size=rows),
            st.lists(st.lists(st.integers(-(2**20), 2**20), min_size=3, max_size=3),
                     min_size=rows, max_size=rows),
        )
    )
)
@SETTINGS
def test_homomorphic_dot(keys: tuple[PublicKey, PrivateKey],
                         data: tuple[list[int], list[list[int]]]) -> None:
    pub, priv = keys
    d, x = data
    enc = pub.encrypt_encoded(d, frac_bits=8)
    got = enc.dot(np.array(x, dtype=np.int64), frac_bits=4)
    assert got.frac_bits == 12
    want = [sum(d[i] * x[i][j] for i in range(len(d))) for j in range(3)]
    assert priv.decrypt_encoded(got) == want
    assert priv.decrypt_encoded(enc @ np.array([row[0] for row in x])) == want[:1]


def test_dot_with_huge_python_int_weights(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    enc = pub.encrypt_encoded([3, -4])
    w = np.array([[2**80], [-(2**70)]], dtype=object)
    assert priv.decrypt_encoded(enc.dot(w)) == [3 * 2**80 + 4 * 2**70]


def test_dot_with_int64_extremes(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    enc = pub.encrypt_encoded([3, -4])
    w = np.array([-(2**63), 2**63 - 1], dtype=np.int64)
    assert priv.decrypt_encoded(enc.dot(w)) == [3 * -(2**63) - 4 * (2**63 - 1)]


def test_dot_refuses_floats(keys: tuple[PublicKey, PrivateKey]) -> None:
    enc = keys[0].encrypt_encoded([1])
    with pytest.raises(EncodingError, match="encode reals"):
        enc.dot(np.array([0.5]))


def test_real_valued_gradient_within_fixed_point_error(
    keys: tuple[PublicKey, PrivateKey],
) -> None:
    pub, priv = keys
    rng = np.random.default_rng(5)
    d = rng.normal(size=40)
    x = rng.normal(size=(40, 3))
    enc = pub.encrypt(d, frac_bits=32)
    grad = priv.decrypt(enc.dot(np.asarray(encode(x.ravel(), 16), dtype=np.int64)
                                .reshape(40, 3), frac_bits=16))
    bound = 40 * (np.abs(x).max() * 2.0**-33 + np.abs(d).max() * 2.0**-17 + 2.0**-50)
    assert np.all(np.abs(grad - d @ x) <= bound)


def test_add_plain_mul_plain_and_rescale(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    x = np.array([1.5, -2.0, 0.25])
    e8 = pub.encrypt(x, frac_bits=8)
    e16 = pub.encrypt(x, frac_bits=16)
    both = e8 + e16
    assert both.frac_bits == 16
    assert priv.decrypt(both).tolist() == (2 * x).tolist()
    assert priv.decrypt(e8.add_plain([1.0, 1.0, 1.0])).tolist() == (x + 1).tolist()
    assert priv.decrypt(e8.add_plain(0.5)).tolist() == (x + 0.5).tolist()
    prod = e8.mul_plain([2.0, -0.5, 4.0], frac_bits=4)
    assert prod.frac_bits == 12
    assert priv.decrypt(prod).tolist() == (x * [2.0, -0.5, 4.0]).tolist()
    with pytest.raises(EncodingError, match="cannot lower"):
        e16.rescale(8)


def test_ops_across_keys_refused(keys: tuple[PublicKey, PrivateKey],
                                 other_keys: tuple[PublicKey, PrivateKey]) -> None:
    a = keys[0].encrypt_encoded([1])
    b = other_keys[0].encrypt_encoded([1])
    with pytest.raises(PaillierKeyMismatchError):
        _ = a + b
    with pytest.raises(PaillierKeyMismatchError) as info:
        other_keys[1].decrypt(a)
    assert isinstance(info.value, RemoteProtocolError)


def test_vector_slicing_take_concat(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    enc = pub.encrypt_encoded([10, 20, 30, 40])
    assert priv.decrypt_encoded(enc[1:3]) == [20, 30]
    assert priv.decrypt_encoded(enc.take([3, 0])) == [40, 10]
    assert priv.decrypt_encoded(EncryptedVector.concat([enc[:1], enc[3:]])) == [10, 40]


def test_wrapping_foreign_ciphertexts_validates(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = keys
    for bad in (0, pub.nsquare, pub.n, -5):
        with pytest.raises(PaillierFormatError, match=r"ciphertexts\[0\]"):
            EncryptedVector(pub, [bad])


# -- re-randomisation and pools -------------------------------------------------------------
def test_for_transport_rerandomises_results(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    fresh = pub.encrypt_encoded([4, 5])
    assert fresh.fresh and fresh.for_transport() is fresh
    derived = fresh.add_encoded([1, 1])
    assert not derived.fresh
    sent = derived.for_transport()
    assert sent.fresh
    assert not set(sent.ciphertexts) & set(derived.ciphertexts)
    assert priv.decrypt_encoded(sent) == [5, 6]


def test_pool_hands_out_each_randomiser_once(keys: tuple[PublicKey, PrivateKey],
                                             other_keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = keys
    pool = RandomizerPool(pub, 6)
    a = pool.take(3)
    b = pool.take(3)
    assert len(pool) == 0 and not {int(x) for x in a} & {int(x) for x in b}
    enc = pub.encrypt_encoded([1, 2], pool=pool)  # refills on demand
    assert priv.decrypt_encoded(enc) == [1, 2]
    strict = RandomizerPool(pub, 1, refill_on_empty=False)
    with pytest.raises(LookupError):
        strict.take(2)
    with pytest.raises(PaillierKeyMismatchError):
        other_keys[0].encrypt_encoded([1], pool=RandomizerPool(pub, 1))
    with pytest.raises(TypeError):
        pickle.dumps(pool)


def test_keys_and_vectors_refuse_pickle(keys: tuple[PublicKey, PrivateKey]) -> None:
    for obj in (keys[0], keys[1], keys[0].encrypt_encoded([1])):
        with pytest.raises(TypeError, match="pickle"):
            pickle.dumps(obj)


# -- encoding -----------------------------------------------------------------------------
def test_encode_rejects_nan_and_inf_naming_index() -> None:
    with pytest.raises(EncodingError, match=r"values\[2\]: NaN"):
        encode(np.array([1.0, 2.0, np.nan]))
    with pytest.raises(EncodingError, match=r"values\[0\]"):
        encode([np.inf])
    with pytest.raises(EncodingError, match=r"values\[0\]: an infinite or too large"):
        encode([1e300], 40)  # 1e300 * 2^40 overflows float64


def test_encode_decode_large_and_exact() -> None:
    vals = encode(np.array([1e30, -1e30, 0.5]), 32)
    assert vals[2] == 2**31
    assert decode(vals, 32).tolist() == [1e30, -1e30, 0.5]
    assert decode([3 * 2**200], 200).tolist() == [3.0]


@given(st.lists(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False), max_size=20))
@SETTINGS
def test_encode_decode_property(xs: list[float]) -> None:
    got = decode(encode(np.array(xs, dtype=np.float64), 32), 32)
    assert np.all(np.abs(got - np.array(xs)) <= quantisation_error(32))


# -- owner-side CRT encryption, batched validation, grouped multi-exponentiation ---------
def test_crt_encryption_equals_public_encryption(keys: tuple[PublicKey, PrivateKey]) -> None:
    from protocols.paillier.hazmat import encrypt_with_exponents_unsafe

    pub, priv = keys
    values = [0, 1, -1, 12345, -(2**200), pub.max_int]
    exps = [secrets.randbits(pub.exponent_bits) for _ in values]
    nb = (pub.exponent_bits + 7) // 8
    crt = priv._encrypt_residues([pub.check_plaintext(v) for v in values],
                                 [a.to_bytes(nb, "little") for a in exps])
    ref = encrypt_with_exponents_unsafe(pub, values, exps)
    assert [int(c) for c in crt] == ref.ciphertexts
    fresh = priv.encrypt_encoded(values)
    assert fresh.fresh and priv.decrypt_encoded(fresh) == values
    assert len(set(fresh.ciphertexts)) == len(values)


def test_batched_validation_names_the_bad_ciphertext(keys: tuple[PublicKey, PrivateKey]
                                                     ) -> None:
    pub, _ = keys
    good = pub.encrypt_encoded([1, 2, 3]).ciphertexts
    assert [int(c) for c in pub.validate_ciphertexts(good)] == good
    for bad, why in ((pub.n * 7, "unit"), (0, "outside"), (pub.nsquare, "outside")):
        with pytest.raises(PaillierFormatError, match=why) as err:
            pub.validate_ciphertexts([good[0], good[1], bad])
        assert err.value.field == "ciphertexts[2]"


def test_multiexp_grouped_exponents_match_direct(keys: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = keys
    n2 = pub._n2
    bases = [gmpy2.mpz(c) for c in pub.encrypt_encoded(list(range(200))).ciphertexts]
    for exps in (np.full(200, 4097), np.arange(200) % 2 * 4096 + 32768):
        expected = gmpy2.mpz(1)
        for b, e in zip(bases, exps.tolist(), strict=True):
            expected = expected * gmpy2.powmod(b, e, n2) % n2
        assert multiexp(bases, exps, n2) == expected
