"""The main job: a three-party clean-room simulation on one machine.

``cleanroom simulate --out DIR`` generates synthetic data for the OEM, the media platform
and the dealer, and runs the workflow that exists so far end to end, printing a summary
per step. It only drives the engine through its public entry points (the same ones an
operator uses); it holds no protocol or policy logic of its own.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cleanroom.errors import InputError
from cleanroom.synth import SynthConfig, generate

DEFAULT_LEADS = 20_000
MARKER = ".cleanroom-simulation"


@dataclass
class StepTimer:
    """Runs named steps, prints progress, and keeps the time each one took."""

    times: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"==> {name} ...", flush=True)
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        self.times[name] = elapsed
        print(f"    {name}: done in {elapsed:.1f} s", flush=True)
        return result


def run_simulation(out: Path, leads: int, seed: int, *, overwrite: bool = False) -> dict[str, Any]:
    """Run the simulation into ``out`` and return its summary as a dict."""
    if leads < 100:
        raise InputError(f"--leads must be at least 100, got {leads}")
    if out.exists() and any(out.iterdir()):
        if not (overwrite or (out / MARKER).exists()):
            raise InputError(
                f"output directory {out} is not empty and holds no earlier simulation; "
                "pass --overwrite or choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by cleanroom simulate; rerunning replaces this folder\n")
    timer = StepTimer()
    data_dir = out / "data"
    summary = timer.run(
        "generate synthetic data",
        lambda: generate(data_dir, SynthConfig(leads=leads, seed=seed)),
    )
    print(summary.format())
    result: dict[str, Any] = {"data": summary.as_dict(), "step_seconds": timer.times}
    print("\nStep times:")
    for name, seconds in timer.times.items():
        print(f"  {name:<32} {seconds:8.1f} s")
    return result


def _cmd(args: argparse.Namespace) -> int:
    run_simulation(Path(args.out), args.leads, args.seed, overwrite=args.overwrite)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate",
        help="run the three-party clean-room simulation end to end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="sim-out", help="output directory (default: sim-out)")
    p.add_argument("--leads", type=int, default=DEFAULT_LEADS, help="number of OEM leads")
    p.add_argument("--seed", type=int, default=7, help="random seed")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the output directory if it has files"
    )
    p.set_defaults(func=_cmd)
