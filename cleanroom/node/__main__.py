"""``python -m cleanroom.node ...``: the node and dataset commands without the rest of the CLI.

Same commands and exit codes as ``cleanroom node ...`` / ``cleanroom dataset ...``; it
imports only the node's modules, so a service manager starts the node quickly with it
(``python -m cleanroom.node node start --dir NODE_DIR``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cleanroom.errors import CleanroomError
from cleanroom.node import cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cleanroom.node")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cli.register(sub)
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
