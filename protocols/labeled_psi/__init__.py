"""Labeled unbalanced PSI through an OPRF (the "anonymous query").

The data owner builds, offline, a table keyed by ``F_k(x) = X25519(k, H(x))`` for every
identifier ``x`` of its users, each entry holding the user's label encrypted under a key
derived from ``F_k(x)`` (:mod:`~protocols.labeled_psi.table`). A querier obtains
``F_k(x)`` for its own identifiers by blinded evaluation and opens only those labels,
either in a table it downloaded (batch mode) or in the one hash bucket it fetches
(real-time mode) (:mod:`~protocols.labeled_psi.roles`). See
docs/protocols/anonymous-query.md. Nothing here does I/O.
"""

from protocols.labeled_psi.messages import Mode, TableInfo
from protocols.labeled_psi.roles import (
    AnonymousQuerier,
    AnonymousQueryOwner,
    EvaluationBudget,
    OwnerObservation,
    QueryResult,
    Step,
)
from protocols.labeled_psi.table import Bucket, Delta, OwnerTable, Table

__all__ = [
    "AnonymousQuerier",
    "AnonymousQueryOwner",
    "Bucket",
    "Delta",
    "EvaluationBudget",
    "Mode",
    "OwnerObservation",
    "OwnerTable",
    "QueryResult",
    "Step",
    "Table",
    "TableInfo",
]
