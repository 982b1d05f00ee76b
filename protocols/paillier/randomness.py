"""Offline pools of DJN randomisers ``h_s^a mod n^2``.

Encryption cost is almost entirely the randomiser; a party with idle time (between epochs,
before a scoring batch arrives) can compute randomisers ahead with :meth:`RandomizerPool.fill`
and let :meth:`PublicKey.encrypt_encoded` or :meth:`EncryptedVector.rerandomize` draw from
the pool. Each randomiser is handed out exactly once (popped), never reused: reuse would let
anyone who sees both ciphertexts compute the difference of the plaintexts.

The pool lives in memory only; it must not be serialised or shared between parties (a
randomiser known to another party strips the encryption of the ciphertext it is used in).
"""

from __future__ import annotations

from typing import Any

from protocols.paillier.keys import PublicKey

Mpz = Any


class RandomizerPool:
    """A stack of fresh randomisers for one public key."""

    __slots__ = ("_items", "public_key", "refill_on_empty")

    def __init__(self, public_key: PublicKey, size: int = 0, *, refill_on_empty: bool = True):
        self.public_key = public_key
        self.refill_on_empty = refill_on_empty
        self._items: list[Mpz] = []
        if size:
            self.fill(size)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"RandomizerPool(key_id={self.public_key.key_id.hex()}, available={len(self)})"

    def __reduce__(self) -> Any:
        raise TypeError("randomiser pools must not be pickled or shared")

    def fill(self, count: int) -> None:
        """Compute ``count`` more randomisers now."""
        if count < 0:
            raise ValueError("count must be >= 0")
        self._items.extend(self.public_key.randomizers(count))

    def require_key(self, key: PublicKey) -> None:
        self.public_key.require_same(key)

    def take(self, count: int) -> list[Mpz]:
        """Remove and return ``count`` randomisers, computing the shortfall fresh if allowed."""
        if count > len(self._items):
            if not self.refill_on_empty:
                raise LookupError(
                    f"randomiser pool has {len(self._items)} left, {count} requested"
                )
            self.fill(count - len(self._items))
        taken = self._items[len(self._items) - count :]
        del self._items[len(self._items) - count :]
        return taken
