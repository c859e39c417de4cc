"""What the commands share: parsers of argument values (each raises argparse's error, so a bad value is argparse's
one line) and where progress messages go."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable


def names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def name_list(text: str) -> tuple[str, ...]:
    """A non-empty comma-separated list: `--task ,` is a mistake, not a request for the defaults."""
    found = names(text)
    if not found:
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated names, got '{text}'")
    return found


def positions(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1, got '{text}'") from None


def memory(text: str) -> dict[str, str]:
    """--max-memory 0=20GiB,cpu=64GiB -> {"0": "20GiB", "cpu": "64GiB"} (accelerate's max_memory)."""
    pairs = [part.partition("=") for part in names(text)]
    if not pairs or any(not device or not sep or not amount for device, sep, amount in pairs):
        raise argparse.ArgumentTypeError(f"expected DEVICE=AMOUNT pairs like 0=20GiB,cpu=64GiB, got '{text}'")
    return {device.strip(): amount.strip() for device, _, amount in pairs}


def minutes(text: str) -> float:
    """A time budget: more than 0 minutes (0 or less could not train a step; leave --budget out for no limit)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected minutes as a number, got '{text}'") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be more than 0 minutes, got '{text}' (leave --budget out to train "
                                         "without a time limit)")
    return value


def shape(text: str) -> tuple[int, int]:
    """BATCHxTOKENS, e.g. 4x2048."""
    try:
        batch, tokens = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxTOKENS like 4x2048, got '{text}'") from None
    return batch, tokens


def messages(quiet: bool) -> Callable[[str], None]:
    """Where a command's progress lines go: stderr (stdout holds its result), or nowhere with --quiet."""
    return (lambda message: None) if quiet else (lambda message: print(message, file=sys.stderr))


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """--device-map and --max-memory, for the commands that load a model to evaluate it (run, scan)."""
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="spread a model larger than one device over GPUs, CPU memory and disk with accelerate "
                             "(auto | balanced | balanced_low_0 | sequential); schemes run under sim")
    parser.add_argument("--max-memory", default=None, type=memory, metavar="DEV=AMOUNT,...",
                        help="memory per device with --device-map, e.g. 0=20GiB,cpu=64GiB (the rest goes to disk)")
