"""The clean-room engine: node service, storage, policy, query orchestration, ledger, CLI.

Raw party data is handled only at its owner's node; nothing in this package sends an
identifier, feature value or location to a peer, a log line or the ledger.
"""

__version__ = "0.1.0"
