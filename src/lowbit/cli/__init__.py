"""The ``lowbit`` command line: ``demo``, ``quantize``, ``inspect`` and ``bench``.

A thin layer: each command module parses its arguments, calls the public API and prints. Errors
are one line on stderr (``--debug`` adds the traceback); exit status 2 for usage errors, 1 for
failures while running.

Example:
    >>> from lowbit.cli import main
    >>> main(["demo", "--configs", "int8-weight-only", "--sentences", "40"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .. import __version__
from . import bench, demo, inspect, quantize
from .common import UsageError

COMMANDS = (demo, quantize, inspect, bench)


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before and after the command; SUPPRESS keeps a subcommand from resetting it
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    parser = argparse.ArgumentParser(prog="lowbit", description="Quantize PyTorch models to int8, int4 and float8.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers, parent)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    ``--help`` and argparse's own usage errors exit through ``SystemExit`` (status 0 and 2). Output
    cut short by its reader (``lowbit inspect X | head``) is not an error: status 0, nothing on stderr.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
        sys.stdout.flush()  # a reader that went away shows here, not in the interpreter's flush at exit
        return status
    except BrokenPipeError:
        # the rest of the output has nowhere to go; point stdout at /dev/null so the final flush cannot fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the command line reports every failure as one line
        if args.debug:
            traceback.print_exc()
        status = 2 if isinstance(error, UsageError) else 1
        hint = "" if args.debug else " (--debug shows the traceback)"
        print(f"lowbit {args.command}: error: {' '.join(str(error).split()) or type(error).__name__}{hint}", file=sys.stderr)
        return status
