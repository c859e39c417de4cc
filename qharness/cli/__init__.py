"""The command line, one module a command: each holds its EXAMPLES, HELP, `add_arguments(parser)` and `main(args)`;
`COMMANDS` names them. Heavy libraries are imported inside the commands that need them, so `--help` and `list` stay
fast (tests/test_imports.py checks that they load no torch).
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable

from qharness.cli import bench, compare, listing, run, scan, sweep, train
from qharness.core.errors import QHarnessError

Command = tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str, str]
COMMANDS: dict[str, Command] = {
    name: (module.main, module.add_arguments, module.HELP, module.EXAMPLES)
    for name, module in (("run", run), ("scan", scan), ("sweep", sweep), ("compare", compare), ("train", train),
                         ("bench", bench), ("list", listing))
}


INTERRUPTED = {  # what a Ctrl-C leaves, by command
    "run": "finished cells are saved, rerun to resume",
    "sweep": "finished cells are saved, rerun to resume",
    "train": "the same command resumes from the last checkpoint, if one was saved (every checkpoint_every steps)",
    "scan": "nothing was saved; rerun to scan",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block above a bad argument; every other error here is one line, so these
    are too, pointing at --help for the usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"qharness: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="qharness", description="How much do massive activations hurt INT8, INT4 and FP8 quantization?"
    )
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=OneLineParser)
    for name, (_, add_arguments, help_text, examples) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text, epilog=examples,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][0](args)
    except QHarnessError as exc:
        print(f"qharness: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qharness: interrupted; {INTERRUPTED.get(args.command, 'nothing was saved')}", file=sys.stderr)
        return 130
