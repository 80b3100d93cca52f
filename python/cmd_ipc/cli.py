"""The ``cmd-ipc`` command (also ``python -m cmd_ipc``)."""

from __future__ import annotations

import argparse
import sys

from cmd_ipc import __version__


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="cmd-ipc", description="cmd-ipc for Python: call commands across processes."
    )
    parser.add_argument("--version", action="version", version=f"cmd-ipc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("demo", help="run a three-level in-process tree and print what happens")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from cmd_ipc.demo import main as demo_main

        demo_main()
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
