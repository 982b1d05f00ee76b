"""The anonymous query (labeled PSI) served between nodes.

- :mod:`cleanroom.anonq.tables`: the owner's labeled tables: built from the node's own
  datasets (the media platform's nearest-stores table, the dealer's inventory table),
  persisted under the data directory (binary formats of :mod:`protocols.labeled_psi`,
  written atomically), versioned and updated incrementally; the OPRF key stays in a
  0600 file at the node.
- :mod:`cleanroom.anonq.api`: the node's routers: peer endpoints (public columns, table
  info, blinded evaluation, buckets, table and delta download) and operator endpoints
  (publish a table).
- :mod:`cleanroom.anonq.guard`: who may query which table under the node's policy, the
  per-partner rate limit and evaluation budget, and the ledger recording of sessions.
- :mod:`cleanroom.anonq.lifecycle`: the same sessions run through a joint query's
  session channel (the ``store_recommendation`` query type): the owner's role object as
  a lifecycle responder, the querier's download, batch and real-time drivers;
- :mod:`cleanroom.anonq.client`: the querier (the OEM): real-time and batch lookups,
  fetching public columns, publishing through the operator API, and the
  ``store_recommendation`` pipeline.

The node only moves protocol bytes: nothing here sends an identifier, a location or a
label in the clear, logs one, or records one in the ledger.
"""

PROTOCOL = "labeled_psi"
"""The protocol name used in ledger entries."""

QUERY_HEADER = "X-Cleanroom-Query"
"""Optional request header: the lifecycle query id a session belongs to."""

__all__ = ["PROTOCOL", "QUERY_HEADER"]
