"""Joint queries: lifecycle states, persistence, the orchestrator, query-type runners, API, CLI.

Modules: ``states`` (states, allowed transitions, restart rules), ``tables`` / ``store``
(persistence and :class:`~cleanroom.queries.store.DbUsage`), ``signing`` (signed proposals
and decisions), ``runners`` (the :class:`~cleanroom.queries.runners.Runner` interface and
registry; add query types there), ``segment_stats`` (the first query type),
``orchestrator`` (the lifecycle), ``api`` (operator and peer endpoints), ``cli``
(``cleanroom query ...``). Raw data never leaves a node through this package: peers get
specs, signed decisions, protocol bytes and outcomes (digests and counts).
"""
