#!/usr/bin/env python3
"""Regenerate tests/vectors/paillier/djn_kat.json (run from the repository root).

    .venv/bin/python tests/vectors/paillier/generate.py

Provenance of each part of the file:
  * the key: a fresh ``protocols.paillier.generate_keypair(2048)``. It is a TEST KEY ONLY:
    its factors are public in this repository, never encrypt anything real under it;
  * ``djn_base_h`` and ``key_id``: computed here with the standard library only (SHAKE-256
    and SHA-256 as specified in docs/protocols/paillier.md), not with our package;
  * ``encryptions[].c``: computed with phe's ``PaillierPublicKey.raw_encrypt(m mod n,
    r_value=pow(h, a, n))``, an independent implementation, from the listed m and a;
  * ``serialised``: our own encoder (regression vectors pinning the documented format);
  * ``invalid``: hand-made corruptions of those bytes with the exception they must raise.

Regenerating replaces the key, so every vector changes; commit the new file as a whole.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from phe import paillier  # noqa: E402

from protocols.paillier import generate_keypair, to_bytes  # noqa: E402
from protocols.paillier import serialization as ser  # noqa: E402
from protocols.paillier.hazmat import encrypt_with_exponents_unsafe  # noqa: E402

OUT = Path(__file__).with_name("djn_kat.json")


def _nb(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def stdlib_djn_base(n: int) -> int:
    nb = _nb(n)
    counter = 0
    while True:
        stream = hashlib.shake_256(
            b"cleanroom/paillier/djn-base/v1" + len(nb).to_bytes(4, "big") + nb
            + counter.to_bytes(4, "big")
        ).digest(len(nb) + 32)
        x = int.from_bytes(stream, "big") % n
        if x > 1 and x != n - 1:
            return (-x * x) % n
        counter += 1


def stdlib_key_id(n: int) -> str:
    nb = _nb(n)
    return hashlib.sha256(
        b"cleanroom/paillier/key-id/v1" + len(nb).to_bytes(4, "big") + nb
    ).hexdigest()[:32]


def main() -> None:
    pub, priv = generate_keypair(2048)
    n = pub.n
    h = stdlib_djn_base(n)
    phe_pub = paillier.PaillierPublicKey(n)
    plain = [0, 1, -1, 2**64 + 7, -(2**100), pub.max_int, -pub.max_int]
    encs = []
    for m in plain:
        a = secrets.randbits(448)
        c = phe_pub.raw_encrypt(m % n, r_value=pow(h, a, n))
        encs.append({"m": str(m), "a": format(a, "x"), "c": format(c, "x")})
    values = [3, -5, 2**40]
    exps = [secrets.randbits(448) for _ in values]
    vec = encrypt_with_exponents_unsafe(pub, values, exps, frac_bits=4)
    vec_bytes = to_bytes(vec, context=b"kat/session/round-1", rerandomize=False)

    def frame(body: bytes) -> str:
        return ser._frame(ser.KIND_VECTOR, body).hex()

    good_cts = vec.ciphertexts
    flipped = bytearray(vec_bytes)
    flipped[100] ^= 0x10
    invalid = [
        {"case": "one bit flipped in a ciphertext", "loader": "vector",
         "hex": flipped.hex(), "error": "PaillierFormatError", "field": "sha256"},
        {"case": "truncated by one byte", "loader": "vector", "hex": vec_bytes[:-1].hex(),
         "error": "PaillierFormatError", "field": "sha256"},
        {"case": "public key bytes given to the vector loader", "loader": "vector",
         "hex": to_bytes(pub).hex(), "error": "PaillierFormatError", "field": "kind"},
        {"case": "unknown version", "loader": "vector",
         "hex": (b"CRPA\x02" + vec_bytes[5:]).hex(), "error": "PaillierFormatError",
         "field": "version"},
        {"case": "key id of another key, checksum recomputed", "loader": "vector",
         "hex": frame(ser._vector_body(b"\x00" * 16, 4, b"", good_cts, 512)),
         "error": "PaillierKeyMismatchError", "field": "key_id"},
        {"case": "ciphertext equal to n (not a unit), checksum recomputed",
         "loader": "vector",
         "hex": frame(ser._vector_body(pub.key_id, 4, b"", [n], 512)),
         "error": "PaillierFormatError", "field": "ciphertexts[0]"},
        {"case": "count says 4 but 3 ciphertexts follow, checksum recomputed",
         "loader": "vector",
         "hex": frame(ser._vector_body(pub.key_id, 4, b"", good_cts, 512)
                      .replace(b"\x00\x00\x00\x03\x02\x00", b"\x00\x00\x00\x04\x02\x00", 1)),
         "error": "PaillierFormatError", "field": "count"},
        {"case": "wrong session context", "loader": "vector", "hex": vec_bytes.hex(),
         "expected_context": "kat/session/round-2", "error": "PaillierFormatError",
         "field": "context"},
    ]
    doc = {
        "comment": "TEST KEY ONLY: p and q are public here; never encrypt real data under it.",
        "provenance": " ".join(
            line.strip()
            for line in (__doc__ or "").split("file:")[1].split("Regenerating")[0].splitlines()
            if line.strip()
        ),
        "n": format(n, "x"), "p": format(priv.p, "x"), "q": format(priv.q, "x"),
        "key_id": stdlib_key_id(n),
        "djn_base_h": format(h, "x"),
        "exponent_bits": 448,
        "encryptions": encs,
        "serialised": {
            "public_key_bytes": to_bytes(pub).hex(),
            "vector_bytes": vec_bytes.hex(),
            "vector_context": "kat/session/round-1",
            "vector_values": [str(v) for v in values],
            "vector_frac_bits": 4,
        },
        "invalid": invalid,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
