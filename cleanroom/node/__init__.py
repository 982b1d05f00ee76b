"""The party node: one HTTPS service per organisation, the only place its raw data lives.

Modules: ``identity`` (Ed25519 key + self-signed certificate), ``config`` (``node.toml``),
``admin`` (init, pin and unpin peers), ``context`` (``NodeContext``), ``tls`` (server TLS
and the client certificate in the ASGI scope), ``deps`` (``CurrentPeer``, ``OperatorAuth``,
``NodeContextDep``, ``DbSession``), ``app`` (``create_app`` and ``ROUTER_MODULES``, the
registration point for subsystem routers), ``server`` (``node start``), ``datasets``
(``load_dataset``), ``audit`` (the node's ledger: ``record``, ``reconcile``), ``api_ledger``
(checkpoint, proof and entry endpoints), ``witness_service`` (cross-party witnessing rounds
and timer), ``launcher`` (run a node as a local process), ``cli``. Nothing in this package
sends dataset rows to a peer.
"""
