"""The ``cmd-ipc`` command (also ``python -m cmd_ipc``).

Sub-commands: ``serve``, ``list``, ``call``, ``stubs``, ``bench`` and ``demo``; each has
``--help``. A TARGET is where commands live: an HTTP URL (``http://host:port``, served by
:mod:`cmd_ipc.server.http`), a WebSocket URL (``ws://host:port``, served by
:mod:`cmd_ipc.server.websocket`), or ``package.module:setup``, a function that registers
commands on a registry, run in this process.

Human output is a table (with colour when stdout is a terminal); ``--json`` prints JSON for
scripts. ``call`` exits with 0 on success and, on failure, prints the error code and message
and exits with a code per error (see :data:`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from cmd_ipc import __version__
from cmd_ipc.errors import CommandError

#: Exit code of ``cmd-ipc call`` per error code (2 is a usage error, 1 anything else).
EXIT_CODES = {
    "not_found": 3,
    "invalid_request": 4,
    "internal_error": 5,
    "timeout": 6,
    "channel_disconnected": 7,
    "duplicate_command": 8,
}

_TOKEN_ENV = "CMD_IPC_TOKEN"


class UsageError(Exception):
    """A bad argument: printed without a traceback, exit code 2."""


# --------------------------------------------------------------------------- targets


def load_setup(spec: str) -> Callable[[Any], Any]:
    """Imports ``package.module:function``.

    Raises:
        UsageError: The spec is malformed, or the module or function is missing.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected package.module:function, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"cannot import {module_name!r}: {e}") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)  # type: ignore[assignment]
        if fn is None:
            raise UsageError(f"{module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise UsageError(f"{spec!r} is not callable")
    return fn


async def run_setup(registry: Any, spec: str) -> None:
    """Calls the setup function ``spec`` with ``registry`` (awaiting it if async) and waits
    for its commands to be registered."""
    result = load_setup(spec)(registry)
    if inspect.isawaitable(result):
        await result
    await registry.ready()


@contextlib.asynccontextmanager
async def open_target(
    target: str, *, token: str | None = None, timeout: float = 30.0
) -> AsyncIterator[Any]:
    """A registry from which the commands of ``target`` are callable.

    Args:
        target: ``http(s)://...``, ``ws(s)://...`` or ``package.module:setup``.
        token: Bearer token for a remote target.
        timeout: Seconds a call (and connecting) may take.

    Yields:
        A :class:`~cmd_ipc.CommandRegistry`; closed on exit.
    """
    from cmd_ipc.registry import CommandRegistry

    registry = CommandRegistry("cmd-ipc-cli", request_ttl=timeout)
    try:
        if target.startswith(("http://", "https://")):
            from cmd_ipc.channels.http import HTTPChannel

            await registry.register_channel(
                HTTPChannel("remote", target, token=token, timeout=timeout)
            )
        elif target.startswith(("ws://", "wss://")):
            from cmd_ipc.channels.websocket import WebSocketChannel

            await registry.register_channel(
                WebSocketChannel("remote", target, token=token, reconnect=False)
            )
        elif ":" in target and "/" not in target:
            await run_setup(registry, target)
        else:
            raise UsageError(
                f"unknown target {target!r}: expected http(s)://..., ws(s)://... or "
                "package.module:setup"
            )
        yield registry
    finally:
        await registry.close()


def public_commands(registry: Any) -> list[dict[str, Any]]:
    """The commands a target offers (private ``_`` ids left out)."""
    return [c for c in registry.list_commands() if not c["id"].startswith("_")]


# --------------------------------------------------------------------------- output


def _console(err: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=err, highlight=False, soft_wrap=True)


def request_fields(command: dict[str, Any]) -> str:
    """``name: type`` for each request field, ``*`` marking required ones."""
    req = (command.get("schema") or {}).get("request") or {}
    props = req.get("properties")
    if not isinstance(props, dict):
        return ""
    required = set(req.get("required") or ())
    out = []
    for name, sub in props.items():
        out.append(f"{name}{'*' if name in required else ''}: {_type_name(sub)}")
    return ", ".join(out)


def _type_name(schema: Any) -> str:
    """A short name for a schema's type: ``integer``, ``Point``, ``string|null``..."""
    if not isinstance(schema, dict):
        return "any"
    if isinstance(schema.get("$ref"), str):
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return "|".join(_type_name(s) for s in schema[key])
    kind = schema.get("type")
    if isinstance(kind, list):
        return "|".join(map(str, kind))
    if kind == "array":
        return f"array[{_type_name(schema.get('items'))}]"
    return str(kind) if kind else "any"


def print_commands(commands: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(commands, indent=2, ensure_ascii=False))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(commands)} commands", title_justify="left")
    table.add_column("id", style="bold cyan", no_wrap=True)
    table.add_column("description")
    table.add_column("request fields (* required)", style="green")
    for c in commands:
        cells = (c["id"], c.get("description", ""), request_fields(c))
        table.add_row(*(escape(cell) for cell in cells))
    _console().print(table)


# --------------------------------------------------------------------------- sub-commands


async def _list(args: argparse.Namespace) -> int:
    async with open_target(args.target, token=args.token, timeout=args.timeout) as registry:
        print_commands(public_commands(registry), args.json)
    return 0


async def _call(args: argparse.Namespace) -> int:
    from rich.markup import escape

    try:
        request = json.loads(args.request) if args.request is not None else None
    except json.JSONDecodeError as e:
        raise UsageError(f"REQUEST is not valid JSON: {e}") from e
    if request is not None and not isinstance(request, dict):
        raise UsageError("REQUEST must be a JSON object")
    async with open_target(args.target, token=args.token, timeout=args.timeout) as registry:
        try:
            result = await registry.execute_command(args.command_id, request)
        except CommandError as e:
            if args.json:
                out = {"ok": False, "error": {"code": e.code, "message": e.message}}
                print(json.dumps(out, ensure_ascii=False))
            else:
                _console(err=True).print(f"[bold red]{e.code}[/]: {escape(e.message)}")
            return EXIT_CODES.get(e.code, 1)
    if args.json:
        print(json.dumps({"ok": True, "result": result}, ensure_ascii=False, default=str))
    else:
        print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    return 0


async def _stubs(args: argparse.Namespace) -> int:
    from cmd_ipc.stubs import generate

    async with open_target(args.target, token=args.token, timeout=args.timeout) as registry:
        source = generate(public_commands(registry), source=args.target)
    if args.output == "-":
        sys.stdout.write(source)
    else:
        Path(args.output).write_text(source, encoding="utf-8")
        if args.json:
            print(json.dumps({"output": args.output, "bytes": len(source.encode())}))
        else:
            _console().print(f"wrote [bold]{args.output}[/]")
    return 0


def _host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"{flag} expects HOST:PORT (port 0 to 65535), got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _serve(args: argparse.Namespace) -> int:
    from cmd_ipc.registry import CommandRegistry

    http_at = _host_port(args.http, "--http") if args.http else None
    ws_at = _host_port(args.ws, "--ws") if args.ws else None
    if http_at is None and ws_at is None:
        http_at = ("127.0.0.1", 8765)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    closers: list[Any] = []
    async with CommandRegistry(args.id) as registry:
        # Ctrl-C during setup interrupts it (KeyboardInterrupt); once serving, SIGINT and
        # SIGTERM stop the servers in order, and a second signal interrupts a stuck close.
        await run_setup(registry, args.setup)

        def on_signal() -> None:
            stop.set()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        urls: dict[str, str] = {}
        try:
            if http_at is not None:
                from cmd_ipc.server.http import serve

                server = await serve(registry, http_at[0], http_at[1], token=args.token)
                closers.append(server)
                urls["http"] = server.url
            if ws_at is not None:
                from cmd_ipc.server.websocket import serve_websocket

                ws = await serve_websocket(registry, ws_at[0], ws_at[1], token=args.token)
                closers.append(ws)
                urls["ws"] = ws.url
            commands = public_commands(registry)
            if args.json:
                print(json.dumps({"id": args.id, "urls": urls, "commands": len(commands)}))
            else:
                con = _console()
                for kind, url in urls.items():
                    con.print(f"serving [bold]{args.id}[/] over {kind} at [bold cyan]{url}[/]")
                con.print(f"{len(commands)} commands; Ctrl-C stops")
            sys.stdout.flush()
            await stop.wait()
        finally:
            for c in reversed(closers):
                await c.close()
    return 0


# --------------------------------------------------------------------------- parser


def _remote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token",
        default=os.environ.get(_TOKEN_ENV),
        help=f"bearer token for a remote target (default: ${_TOKEN_ENV})",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


TARGET_HELP = "http(s)://HOST:PORT, ws(s)://HOST:PORT, or package.module:setup (run here)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cmd-ipc`` (every sub-command has ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="cmd-ipc", description="cmd-ipc for Python: call commands across processes."
    )
    parser.add_argument("--version", action="version", version=f"cmd-ipc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "serve",
        help="run a registry with the commands of a setup function, over HTTP/WebSocket",
        description=(
            "Creates a registry, calls SETUP (package.module:function, sync or async) to "
            "register commands, and serves it over HTTP (POST /cmd, GET /cmds.json) and/or "
            "WebSocket until interrupted. Without --http or --ws it serves HTTP on "
            "127.0.0.1:8765."
        ),
    )
    p.add_argument("setup", metavar="SETUP", help="package.module:function")
    p.add_argument("--http", metavar="HOST:PORT", help="serve HTTP here")
    p.add_argument("--ws", metavar="HOST:PORT", help="serve WebSocket here")
    p.add_argument("--id", default="cmd-ipc", help="the registry's id (default cmd-ipc)")
    p.add_argument(
        "--token",
        default=os.environ.get(_TOKEN_ENV),
        help=f"require this bearer token (default: ${_TOKEN_ENV}; none: no auth)",
    )
    p.add_argument("--json", action="store_true", help="print the URLs as one JSON line")

    p = sub.add_parser(
        "list",
        help="list the commands of a target",
        description="Prints the target's public commands: id, description, request fields.",
    )
    p.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    _remote_options(p)

    p = sub.add_parser(
        "call",
        help="call a command and print its JSON result",
        description=(
            "Calls COMMAND_ID on the target with REQUEST (a JSON object) and prints the JSON "
            "result. On failure prints the error code and message and exits with "
            + ", ".join(f"{v} ({k})" for k, v in EXIT_CODES.items())
            + "; 2 for a usage error."
        ),
    )
    p.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    p.add_argument("command_id", metavar="COMMAND_ID")
    p.add_argument("request", metavar="REQUEST", nargs="?", help="JSON object, e.g. '{\"a\": 1}'")
    _remote_options(p)

    p = sub.add_parser(
        "stubs",
        help="write a typed Python client module for a target's commands",
        description=(
            "Reads the target's commands and schemas and writes a module with TypedDict "
            "types and one typed async function plus a blocking _sync twin per command "
            "(mypy --strict clean)."
        ),
    )
    p.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    p.add_argument("-o", "--output", required=True, help="file to write ('-' for stdout)")
    _remote_options(p)

    sub.add_parser("demo", help="run a three-level in-process tree and print what happens")
    from cmd_ipc import bench

    bench_parser = sub.add_parser(
        "bench",
        help="measure call latency and throughput across processes against baselines",
        description=(
            "Spawns workers and baseline children and measures, in one run, the round trip "
            "of add(a, b): blocking and await calls over shared memory, a blocking call over "
            "a pipe, one extra router hop, pipelined throughput, multiprocessing.Pipe and "
            "asyncio-streams baselines, HTTPChannel and WebSocketChannel round trips next to "
            "a bare aiohttp POST, and the idle cost; prints a table with each row's ratio to "
            "its baseline and the project's targets."
        ),
    )
    bench.add_arguments(bench_parser)
    return parser


_ASYNC = {"serve": _serve, "list": _list, "call": _call, "stubs": _stubs}


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in _ASYNC:
            return asyncio.run(_ASYNC[args.command](args))
        if args.command == "demo":
            from cmd_ipc.demo import main as demo_main

            demo_main()
            return 0
        if args.command == "bench":
            from cmd_ipc import bench

            return bench.main(args)
    except UsageError as e:
        print(f"cmd-ipc {args.command}: {e}", file=sys.stderr)
        return 2
    except CommandError as e:  # connecting failed (refused, unauthorised...)
        print(f"cmd-ipc {args.command}: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_CODES.get(e.code, 1)
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # a port in use, an address this host does not have...
        print(f"cmd-ipc {args.command}: {e}", file=sys.stderr)
        return 1
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
