#!/usr/bin/env python3
"""Fail when a test ran in no tox env: skipped everywhere it was collected, for a reason other than needing a GPU.

Each env writes pytest's JUnit XML (tox.ini: --junitxml=.junit/<env>.xml). A test that needs a library is skipped in
the env without it and must run in that library's env (`--needs PKG`); a test skipped in every file here runs
nowhere, and a wrong number it would catch goes unnoticed. GPU tests are the exception: CI has no GPU; they run on
one by hand (benchmarks/gpu_check.sh).

    python3 .ci/skips.py .junit/*.xml

Prints each test that ran nowhere with its skip reasons and exits 1, or prints a one-line count and exits 0.
Standard library only: .ci/run calls it with the system python, outside every tox env.
"""

from __future__ import annotations

import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# skip reasons that mean "needs a GPU" (tests/conftest.py's gpu marker; a GPU test's own capability check)
GPU_REASONS = ("needs a CUDA GPU", "compute capability")
# and a browser .ci/run could not install (its package list unreachable): only where chromium is really absent
MACHINE_REASONS = GPU_REASONS + (("needs chromium",) if shutil.which("chromium") is None else ())


def outcomes(path: Path) -> dict[str, str | None]:
    """test id -> None if it ran (passed, failed or errored), else its skip reason."""
    results: dict[str, str | None] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        skipped = case.find("skipped")
        results[test] = None if skipped is None else (skipped.get("message") or "skipped, no reason given")
    return results


def run_nowhere(files: list[Path]) -> dict[str, dict[str, str]]:
    """Tests skipped in every file that collected them, not for a GPU: test id -> {env: reason}."""
    seen: dict[str, dict[str, str | None]] = {}
    for path in files:
        for test, reason in outcomes(path).items():
            seen.setdefault(test, {})[path.stem] = reason
    return {test: envs for test, envs in sorted(seen.items())
            if all(reason is not None for reason in envs.values())
            and not any(allowed in reason for reason in envs.values() for allowed in MACHINE_REASONS)}


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv]
    if not files:
        print("skips.py: error: give the JUnit XML files of the tox envs (.junit/*.xml)", file=sys.stderr)
        return 2
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"skips.py: error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    nowhere = run_nowhere(files)
    envs = ", ".join(f.stem for f in files)
    if nowhere:
        print(f"{len(nowhere)} test(s) ran in none of the envs ({envs}):")
        for test, reasons in nowhere.items():
            print(f"  {test}: " + "; ".join(f"{env}: {reason}" for env, reason in reasons.items()))
        return 1
    print(f"every collected test ran in some env ({envs}), GPU tests aside")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
