"""Labeled-PSI sessions of a query runner at the querier: the pieces every runner that reads
an owner's anonymous-query table through the lifecycle shares (``store_recommendation``,
``lead_score`` standard mode).

- :func:`opener`: opens one lifecycle session (protocol ``labeled_psi``) with a peer, so
  every labeled-PSI session is tied to the approved query and recorded in both ledgers;
- :func:`sync_table`: the owner's current table, a delta onto this node's cached copy
  (``DATA_DIR/anonq/remote/``) when it has one, else a full download;
- :func:`session_errors`: protocol errors on our side of a session become a
  :class:`~cleanroom.queries.runners.QueryFailure` naming the peer and its table;
- :func:`check_table_names`: the ``params.options.tables`` option (counterparty -> the
  name of its table) of such a spec.

This module moves protocol bytes through the runner's session channel only: it must not
open sockets, log or look at labels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from cleanroom.anonq import lifecycle, tables
from cleanroom.errors import InputError
from cleanroom.queries.runners import QueryFailure, RequesterRun, SpecRefused
from protocols.errors import RemoteProtocolError
from protocols.labeled_psi import Table

PROTOCOL = "labeled_psi"


def opener(run: RequesterRun, peer: str) -> lifecycle.OpenChannel:
    """A factory of lifecycle sessions with ``peer`` for :mod:`cleanroom.anonq.lifecycle`."""

    def open_channel() -> Any:
        return run.session(peer, PROTOCOL, "lookup")

    return open_channel


def sync_table(run: RequesterRun, peer: str, name: str) -> Table:
    """The owner's current table: a delta onto this node's cached copy, else all of it."""
    from cleanroom.anonq.client import cached_table, save_cached_table

    have = cached_table(run.ctx, peer, name)
    fresh = lifecycle.download_table(opener(run, peer), have)
    if have is None or (fresh.table_id, fresh.version) != (have.table_id, have.version):
        save_cached_table(run.ctx, peer, name, fresh)
    return fresh


@contextlib.contextmanager
def session_errors(peer: str, name: str) -> Iterator[None]:
    """Protocol errors on our side of a session: fail naming the peer and its table."""
    try:
        yield
    except RemoteProtocolError as exc:
        raise QueryFailure("protocol_error", f"{peer}, table {name}: {exc}",
                           peer=peer) from None


def check_table_names(names: object, counterparties: Sequence[str], rule: str) -> None:
    """``params.options.tables``: a mapping counterparty -> table name; else
    :class:`SpecRefused` under ``rule`` naming the field."""
    if not isinstance(names, dict):
        raise SpecRefused(rule, "params.options.tables",
                          "tables must map a counterparty to the name of its table")
    for peer, name in names.items():
        if peer not in counterparties:
            raise SpecRefused(rule, f"params.options.tables.{peer}",
                              f"{peer} is not a counterparty")
        try:
            tables.check_table_name(name)
        except InputError as exc:
            raise SpecRefused(rule, f"params.options.tables.{peer}", str(exc)) from None
