"""Pure cryptographic protocols: one object per role, explicit states, typed messages.

Nothing in this package opens a socket, touches a database or imports a web framework:
callers move the bytes (see ../docs/architecture.md and STYLE.md's note on h11).
"""
