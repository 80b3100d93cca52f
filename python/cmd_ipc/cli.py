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
    from cmd_ipc import bench

    bench_parser = sub.add_parser(
        "bench",
        help="measure call latency and throughput across processes against baselines",
        description=(
            "Spawns workers and baseline children and measures, in one run, the round trip "
            "of add(a, b): blocking and await calls over shared memory, a blocking call over "
            "a pipe, one extra router hop, pipelined throughput, multiprocessing.Pipe and "
            "asyncio-streams baselines, and the idle cost; prints a table with each row's "
            "ratio to its baseline and the project's targets."
        ),
    )
    bench.add_arguments(bench_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from cmd_ipc.demo import main as demo_main

        demo_main()
        return 0
    if args.command == "bench":
        return bench.main(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
