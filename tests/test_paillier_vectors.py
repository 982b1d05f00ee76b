"""Known-answer vectors for protocols.paillier (tests/vectors/paillier/djn_kat.json).

The key in the vector file is a TEST KEY ONLY (its factors are checked in). Expected DJN
ciphertexts were computed with phe's raw_encrypt, the DJN base and key id with the standard
library only (see tests/vectors/paillier/generate.py for the provenance); the serialised
bytes pin the documented wire format, and the invalid cases name the error they must raise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from protocols.paillier import (
    PaillierFormatError,
    PaillierKeyMismatchError,
    PrivateKey,
    PublicKey,
    load_public_key,
    load_vector,
    to_bytes,
)
from protocols.paillier.hazmat import encrypt_with_exponents_unsafe

VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "paillier" / "djn_kat.json").read_text()
)
ERRORS: dict[str, type[Exception]] = {
    "PaillierFormatError": PaillierFormatError,
    "PaillierKeyMismatchError": PaillierKeyMismatchError,
}


@pytest.fixture(scope="module")
def test_key() -> tuple[PublicKey, PrivateKey]:
    pub = PublicKey(int(VECTORS["n"], 16))
    return pub, PrivateKey(pub, int(VECTORS["p"], 16), int(VECTORS["q"], 16))


def test_key_id_and_djn_base_derivation(test_key: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = test_key
    assert pub.key_id.hex() == VECTORS["key_id"]
    assert pub.djn_base() == int(VECTORS["djn_base_h"], 16)
    assert pub.exponent_bits == VECTORS["exponent_bits"]


@pytest.mark.parametrize("case", VECTORS["encryptions"], ids=lambda c: c["m"][:12])
def test_djn_encryption_known_answers(test_key: tuple[PublicKey, PrivateKey],
                                      case: dict[str, str]) -> None:
    pub, priv = test_key
    m, a, c = int(case["m"]), int(case["a"], 16), int(case["c"], 16)
    assert encrypt_with_exponents_unsafe(pub, [m], [a]).ciphertexts == [c]
    assert priv.signed(priv.raw_decrypt(c)) == m


def test_serialised_public_key(test_key: tuple[PublicKey, PrivateKey]) -> None:
    pub, _ = test_key
    data = bytes.fromhex(VECTORS["serialised"]["public_key_bytes"])
    assert to_bytes(pub) == data
    assert load_public_key(data) == pub


def test_serialised_vector(test_key: tuple[PublicKey, PrivateKey]) -> None:
    pub, priv = test_key
    s = VECTORS["serialised"]
    data = bytes.fromhex(s["vector_bytes"])
    ctx = s["vector_context"].encode()
    vec = load_vector(data, pub, expected_context=ctx)
    assert vec.frac_bits == s["vector_frac_bits"]
    assert priv.decrypt_encoded(vec) == [int(v) for v in s["vector_values"]]
    assert to_bytes(vec, context=ctx, rerandomize=False) == data


@pytest.mark.parametrize("case", VECTORS["invalid"], ids=lambda c: c["case"])
def test_invalid_vectors(test_key: tuple[PublicKey, PrivateKey], case: dict[str, Any]) -> None:
    pub, _ = test_key
    expected = case.get("expected_context")
    with pytest.raises(ERRORS[case["error"]]) as info:
        load_vector(bytes.fromhex(case["hex"]), pub,
                    expected_context=expected.encode() if expected else None)
    assert type(info.value) is ERRORS[case["error"]]
    assert info.value.field == case["field"]  # type: ignore[attr-defined]
