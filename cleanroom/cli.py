"""The ``cleanroom`` command line.

Each subsystem owns its subcommands in its own module, which exposes
``register(subparsers)``; this module only wires them together and turns
:class:`~cleanroom.errors.CleanroomError` into a message and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cleanroom import __version__
from cleanroom.errors import CleanroomError

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "cleanroom.synth.cli",
    "cleanroom.simulate",
    "cleanroom.node.cli",
    "audits.cli",
    "cleanroom.queries.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cleanroom",
        description="Privacy-preserving data clean room for automotive marketing.",
    )
    parser.add_argument("--version", action="version", version=f"cleanroom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except CleanroomError as exc:
        print(f"cleanroom {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
