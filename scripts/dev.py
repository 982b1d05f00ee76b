#!/usr/bin/env python3
"""One entry point for a fresh machine: set up ``.venv`` and run the main job or the tests.

    python3.11 scripts/dev.py simulate [ARGS...]   # the three-party simulation (main job)
    python3.11 scripts/dev.py test [PYTEST ARGS...] # ruff, mypy and the whole test suite

The first run creates ``.venv`` next to this repository and installs the package with its
test extras from the package registry; later runs reinstall only when ``pyproject.toml``
changes. This file uses the standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".cleanroom-install-stamp"


def _log(message: str) -> None:
    print(f"[dev] {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str]) -> int:
    return subprocess.call(cmd, cwd=ROOT)


def ensure_env() -> None:
    """Create the virtual environment and install the project into it when needed."""
    if sys.version_info < (3, 11):  # noqa: UP036 - this file runs before the venv exists
        sys.exit(f"Python 3.11 or newer is required, this is {sys.version.split()[0]}")
    if not PY.exists():
        _log(f"creating virtual environment in {VENV}")
        venv.EnvBuilder(with_pip=True, clear=False).create(VENV)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    _log("installing the project and its test extras into .venv (first run takes a minute)")
    steps = [
        [str(PY), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [str(PY), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test]"],
    ]
    for step in steps:
        if _run(step) != 0:
            sys.exit(f"install step failed: {' '.join(step)}")
    STAMP.write_text(wanted)


def cmd_test(args: list[str]) -> int:
    checks = [
        [str(PY), "-m", "ruff", "check", "."],
        [str(PY), "-m", "mypy"],
    ]
    for check in checks:
        _log("running " + " ".join(check[2:]))
        if _run(check) != 0:
            _log(f"FAILED: {' '.join(check[2:])}")
            return 1
    _log("running pytest")
    code = _run([str(PY), "-m", "pytest", *args])
    if code == 5:
        _log("pytest collected no tests: counted as a failure")
        return 1
    return code


def cmd_simulate(args: list[str]) -> int:
    return _run([str(BIN / "cleanroom"), "simulate", *args])


def main(argv: list[str]) -> int:
    commands = {"test": cmd_test, "simulate": cmd_simulate}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    ensure_env()
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
