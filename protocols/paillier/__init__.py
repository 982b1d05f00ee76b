"""A fast, honest Paillier layer over phe and gmpy2 for the clean room's scoring protocols.

Recipes (safe defaults) are exported here; deterministic primitives live in
:mod:`protocols.paillier.hazmat` and carry warnings.

    pub, priv = generate_keypair()            # >= 2048 bits, refuses smaller
    enc = pub.encrypt(residuals)              # DJN short-exponent, fixed-point 2^-32
    grad = enc.dot(encoded_features, frac_bits=16)   # X^T d by multi-exponentiation
    wire = to_bytes(grad, context=session_round)     # re-randomised, checksummed
    grad2 = load_vector(wire, pub, expected_context=session_round)
    priv.decrypt(grad2)                       # CRT decryption -> float64 array

What it must not do: no sockets, files, logging or pickle; it never returns a ciphertext
for transport without fresh randomness unless the caller says so explicitly. See
docs/protocols/paillier.md for the assumptions and what leaks.
"""

from protocols.paillier.encoding import DEFAULT_FRAC_BITS, decode, encode, quantisation_error
from protocols.paillier.errors import (
    EncodingError,
    KeySizeError,
    PackingOverflowError,
    PaillierError,
    PaillierFormatError,
    PaillierKeyMismatchError,
    PlaintextOverflowError,
)
from protocols.paillier.keys import (
    MIN_KEY_BITS,
    PrivateKey,
    PublicKey,
    default_exponent_bits,
    generate_keypair,
    security_bits,
)
from protocols.paillier.packing import (
    PackedVector,
    PackingLayout,
    pack_encrypt,
    pack_encrypt_encoded,
)
from protocols.paillier.randomness import RandomizerPool
from protocols.paillier.serialization import (
    load_packed,
    load_private_key,
    load_public_key,
    load_vector,
    to_bytes,
    to_json,
)
from protocols.paillier.vector import EncryptedVector

__all__ = [
    "DEFAULT_FRAC_BITS",
    "MIN_KEY_BITS",
    "EncodingError",
    "EncryptedVector",
    "KeySizeError",
    "PackedVector",
    "PackingLayout",
    "PackingOverflowError",
    "PaillierError",
    "PaillierFormatError",
    "PaillierKeyMismatchError",
    "PlaintextOverflowError",
    "PrivateKey",
    "PublicKey",
    "RandomizerPool",
    "decode",
    "default_exponent_bits",
    "encode",
    "generate_keypair",
    "load_packed",
    "load_private_key",
    "load_public_key",
    "load_vector",
    "pack_encrypt",
    "pack_encrypt_encoded",
    "quantisation_error",
    "security_bits",
    "to_bytes",
    "to_json",
]
