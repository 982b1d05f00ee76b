"""Node-local storage: the shared database setup and the dataset store.

Everything here stays on the node that owns it. Nothing in this package talks to the
network or hands rows to another party; it only reads and writes the node's own database
and data directory.
"""
