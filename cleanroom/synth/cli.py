"""The ``cleanroom synth`` subcommand: write a synthetic three-party dataset.

Only parses arguments and prints the summary; :func:`cleanroom.synth.generate` does the
work. Bad arguments raise :class:`cleanroom.errors.InputError` (non-zero exit).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cleanroom.errors import InputError
from cleanroom.synth.generator import SynthConfig, generate


def _int(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") \
            from None
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``synth`` to the ``cleanroom`` command line."""
    p = subparsers.add_parser(
        "synth",
        help="write realistic synthetic OEM / media / dealer data with ground truth",
        description="Write synthetic three-party data to DIR/oem, DIR/media, DIR/dealer and "
        "the answers to DIR/ground_truth, then print a summary (also in DIR/summary.json).",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="new or empty output directory")
    p.add_argument("--leads", required=True, type=_int, metavar="N", help="number of OEM leads")
    p.add_argument("--media-users", type=_int, default=None, metavar="M",
                   help="number of media platform users (default 3 x leads)")
    p.add_argument("--seed", type=_int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--csv", action="store_true", help="write CSV instead of Parquet")
    p.add_argument("--media-overlap", type=_fraction, default=0.6, metavar="F",
                   help="share of OEM leads that are media users (default 0.6)")
    p.add_argument("--dealer-overlap", type=_fraction, default=0.3, metavar="F",
                   help="share of OEM leads that are dealer customers (default 0.3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if str(args.out).strip() == "":
        raise InputError("--out must name a directory")
    config = SynthConfig(
        leads=args.leads,
        media_users=args.media_users,
        seed=args.seed,
        csv=args.csv,
        media_overlap=args.media_overlap,
        dealer_overlap=args.dealer_overlap,
    )
    summary = generate(args.out, config)
    print(summary.format())
    return 0
