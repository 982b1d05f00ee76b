"""Error types of the Paillier layer.

Two families, following the h11 split the project uses for protocols:

* :class:`PaillierFormatError` (and :class:`PaillierKeyMismatchError`) mean *the peer sent
  something wrong*: malformed or tampered bytes, a ciphertext outside the group, a vector made
  under another key or for another session context.  They carry ``status_hint = 400`` so the
  web layer can map them to a 4xx reply in one place.  Messages name the field at fault but
  never echo secret material (no plaintexts, no key factors).
* :class:`KeySizeError`, :class:`EncodingError`, :class:`PlaintextOverflowError` and
  :class:`PackingOverflowError` mean *we were asked to do something invalid locally* (a key
  that is too small, NaN in a feature vector, a sum that would wrap modulo n).

:class:`PaillierFormatError` is a :class:`protocols.errors.RemoteProtocolError`, so protocol
code and the web layer handle it like every other peer fault.

This module must not import anything heavy; every other module of the package imports it.
"""

from __future__ import annotations

from protocols.errors import RemoteProtocolError


class PaillierError(Exception):
    """Base class of every error raised by :mod:`protocols.paillier`."""

    status_hint = 500


class PaillierFormatError(PaillierError, RemoteProtocolError, ValueError):
    """Remote error: serialised keys or ciphertexts are malformed, tampered or out of range.

    ``field`` names the field (or ciphertext index) at fault when one is known;
    ``status_hint`` is 400, or 409 for a vector bound to another session or round.
    """

    def __init__(
        self, message: str, *, field: str | None = None, status_hint: int = 400
    ) -> None:
        self.field = field
        self.detail = message
        super().__init__(f"field {field!r}: {message}" if field else message,
                         status_hint=status_hint)


class PaillierKeyMismatchError(PaillierFormatError):
    """Remote error: ciphertexts were made under a different public key than expected."""


class KeySizeError(PaillierError, ValueError):
    """A Paillier modulus is smaller than the minimum the project accepts (2048 bits)."""


class EncodingError(PaillierError, ValueError):
    """A value cannot be encoded as a fixed-point plaintext (NaN, infinity, out of range,
    non-integer where an integer was required). Names the index at fault."""


class PlaintextOverflowError(PaillierError, OverflowError):
    """A decrypted plaintext lies in the band between the positive and negative ranges:
    a homomorphic computation wrapped around modulo n (or the ciphertext was tampered)."""


class PackingOverflowError(PaillierError, OverflowError):
    """A packed slot would exceed (or was found to exceed) its headroom: raised instead of
    letting one slot silently carry into its neighbour."""
