"""The ``cmd-ipc`` command (also ``python -m cmd_ipc``).

Sub-commands: ``serve``, ``list``, ``call``, ``stubs``, ``mcp serve``, ``bench`` and
``demo``; each has ``--help``. A TARGET is where commands live: an HTTP URL
(``http://host:port``, served by :mod:`cmd_ipc.server.http`), a WebSocket URL
(``ws://host:port``, served by :mod:`cmd_ipc.server.websocket`), or
``package.module:setup``, a function that registers commands on a registry, run in this
process.

Human output is a table (with colour when stdout is a terminal); ``--json`` prints JSON for
scripts. ``call`` exits with 0 on success and, on failure, prints the error code and message
and exits with a code per error (see :data:`EXIT_CODES`). Every failure is one line on
stderr saying what to do, never a traceback: a usage error exits with 2, a target that
cannot be reached with 7, a missing or refused token with :data:`EXIT_UNAUTHORIZED`, a
missing optional dependency with 1 (naming the extra to install), Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib
import inspect
import json
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cmd_ipc import __version__
from cmd_ipc._expose import Exposure
from cmd_ipc._optional import MissingDependency
from cmd_ipc.errors import ChannelDisconnectedError, CommandError, CommandTimeoutError

#: Exit code of ``cmd-ipc call`` per error code (2 is a usage error, 1 anything else).
EXIT_CODES = {
    "not_found": 3,
    "invalid_request": 4,
    "internal_error": 5,
    "timeout": 6,
    "channel_disconnected": 7,
    "duplicate_command": 8,
}

#: Exit code when the target asks for a bearer token that was not given, or refuses it.
EXIT_UNAUTHORIZED = 9
#: Exit code when the target cannot be reached (the code of ``channel_disconnected``).
EXIT_UNREACHABLE = EXIT_CODES["channel_disconnected"]
#: Exit code of a usage error.
EXIT_USAGE = 2
#: Exit code after Ctrl-C (128 + SIGINT), ``serve`` included.
EXIT_INTERRUPTED = 130

_TOKEN_ENV = "CMD_IPC_TOKEN"


class UsageError(Exception):
    """A bad argument: printed without a traceback, exit code 2."""


class Failure(Exception):
    """A failure the command line explains in one line (no traceback), with its exit code.

    Attributes:
        exit_code: The process's exit status.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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


#: ``HOST:PORT`` (a name, an IPv4 address or a bracketed IPv6 one): a URL without a scheme.
_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[\w.-]+):\d{1,5}(/\S*)?")


def http_base(url: str) -> str:
    """The base URL of an HTTP target: ``http://h:p/cmd`` (the endpoint itself, as a user
    may paste it) is ``http://h:p``, so that the endpoint's path is not doubled."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if path.endswith("/cmd"):
        path = path[: -len("/cmd")]
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


def _chain(e: BaseException | None) -> list[BaseException]:
    """``e`` and its causes, outermost first."""
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _http_status(e: BaseException) -> int | None:
    """The HTTP status of a refused request or handshake in the cause chain of ``e``."""
    status = getattr(e, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int):
        return status
    response = getattr(e, "response", None)  # websockets InvalidStatus
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def connect_failure(
    url: str, error: BaseException, *, token: str | None, timeout: float
) -> Failure:
    """Explains why connecting to ``url`` failed, in one line, with the exit code.

    Args:
        url: What was connected to (the HTTP endpoint, or the WebSocket URL).
        error: The error of ``register_channel`` (its causes are looked at).
        token: The token that was sent, if any.
        timeout: The ``--timeout`` in seconds.
    """
    chain = _chain(error)
    for e in chain:
        status = _http_status(e)
        if status in (401, 403):
            if token is None:
                return Failure(
                    f"{url} needs a bearer token (HTTP {status}): pass --token TOKEN or set "
                    f"${_TOKEN_ENV}",
                    EXIT_UNAUTHORIZED,
                )
            return Failure(
                f"{url} refused the token (HTTP {status}): check --token or ${_TOKEN_ENV}",
                EXIT_UNAUTHORIZED,
            )
    why: str | None = None
    for e in chain:
        if isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED:
            why = "connection refused"
        elif isinstance(e, socket.gaierror):
            why = f"host not found: {e.strerror or e}"
        elif isinstance(e, (TimeoutError, asyncio.TimeoutError)):
            why = f"no answer within {timeout:g} s"
        if why is not None:
            break
    if why is None:
        status = next((s for s in map(_http_status, chain) if s is not None), None)
        if status is not None:
            why = f"HTTP {status}"
        else:
            inner = chain[-1]
            why = str(inner) or type(inner).__name__
    return Failure(f"cannot connect to {url} ({why})", EXIT_UNREACHABLE)


@contextlib.asynccontextmanager
async def open_target(
    target: str, *, token: str | None = None, timeout: float = 30.0
) -> AsyncIterator[Any]:
    """A registry from which the commands of ``target`` are callable.

    Args:
        target: ``http(s)://...`` (the base URL or the ``/cmd`` endpoint), ``ws(s)://...``
            or ``package.module:setup``.
        token: Bearer token for a remote target.
        timeout: Seconds a call (and connecting) may take.

    Yields:
        A :class:`~cmd_ipc.CommandRegistry`; closed on exit.

    Raises:
        UsageError: ``target`` is none of these (``HOST:PORT`` gets a suggestion).
        Failure: The target cannot be reached, or refuses the token.
        MissingDependency: The extra a remote target needs is not installed.
    """
    from cmd_ipc.registry import CommandRegistry

    if target.startswith(("http://", "https://")):
        from cmd_ipc.channels.http import HTTPChannel

        channel: Any = HTTPChannel("remote", http_base(target), token=token, timeout=timeout)
        url = channel.url
    elif target.startswith(("ws://", "wss://")):
        from cmd_ipc.channels.websocket import WebSocketChannel

        channel = WebSocketChannel(
            "remote", target, token=token, reconnect=False, open_timeout=timeout
        )
        url = target
    elif _HOST_PORT.fullmatch(target):
        raise UsageError(
            f"target {target!r} has no scheme: did you mean http://{target} (or ws://{target})?"
        )
    elif ":" in target and "/" not in target:
        channel = url = None
    else:
        raise UsageError(
            f"unknown target {target!r}: expected http(s)://HOST:PORT, ws(s)://HOST:PORT or "
            "package.module:setup"
        )
    registry = CommandRegistry("cmd-ipc-cli", request_ttl=timeout)
    try:
        if channel is None:
            await run_setup(registry, target)
        else:
            try:
                await registry.register_channel(channel)
            except ChannelDisconnectedError as e:
                raise connect_failure(url, e, token=token, timeout=timeout) from None
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
        started = time.monotonic()
        try:
            result = await registry.execute_command(args.command_id, request)
        except CommandError as e:
            message = e.message
            if isinstance(e, CommandTimeoutError):
                waited = time.monotonic() - started
                if waited >= 0.95 * args.timeout:
                    # This side gave up: say after how long.
                    message = (
                        f"{args.command_id} did not answer within {args.timeout:g} s "
                        "(--timeout SECONDS waits longer)"
                    )
                else:
                    # The target's own request TTL ran out first (its message names its
                    # internal channels): say so in the caller's terms.
                    message = (
                        f"{args.command_id} timed out at the target after {waited:.3g} s "
                        "(the target's own request TTL; --timeout cannot extend it)"
                    )
            if args.json:
                out = {"ok": False, "error": {"code": e.code, "message": message}}
                print(json.dumps(out, ensure_ascii=False))
            else:
                _console(err=True).print(f"[bold red]{e.code}[/]: {escape(message)}")
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
    # The servers' dependencies are checked before the setup runs (it may spawn workers).
    serve_http: Any = None
    serve_ws: Any = None
    if http_at is not None:
        from cmd_ipc.server import http

        serve_http = http.serve
    if ws_at is not None:
        from cmd_ipc.server import websocket

        serve_ws = websocket.serve_websocket
    expose = args.expose  # None: every public command
    exposure = Exposure(expose)
    options: dict[str, Any] = {"token": args.token, "expose": expose}
    stop = asyncio.Event()
    signalled: list[int] = []
    loop = asyncio.get_running_loop()
    closers: list[Any] = []
    async with CommandRegistry(args.id) as registry:
        # Ctrl-C during setup interrupts it (KeyboardInterrupt); once serving, SIGINT and
        # SIGTERM stop the servers in order, and a second signal interrupts a stuck close.
        await run_setup(registry, args.setup)

        def on_signal(sig: int) -> None:
            signalled.append(sig)
            stop.set()
            for s in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(s)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        urls: dict[str, str] = {}
        try:
            if http_at is not None:
                http_options = dict(options)
                if args.public_schema:
                    http_options["schema_auth"] = False
                server = await serve_http(registry, http_at[0], http_at[1], **http_options)
                closers.append(server)
                urls["http"] = server.url
            if ws_at is not None:
                ws = await serve_ws(registry, ws_at[0], ws_at[1], **options)
                closers.append(ws)
                urls["ws"] = ws.url
            reachable = public_commands(registry)
            commands = exposure.commands(reachable)
            if args.json:
                info = {"id": args.id, "urls": urls, "commands": len(commands), "expose": expose}
                print(json.dumps(info))
            else:
                con = _console()
                for kind, url in urls.items():
                    con.print(f"serving [bold]{args.id}[/] over {kind} at [bold cyan]{url}[/]")
                shown = f"{len(commands)} commands"
                if expose is not None:
                    shown = f"{len(commands)} of {len(reachable)} commands exposed"
                auth = "bearer token required" if args.token else "no token: anyone may call"
                con.print(f"{shown}; {auth}; Ctrl-C stops")
            sys.stdout.flush()
            await stop.wait()
        finally:
            for c in reversed(closers):
                await c.close()
    # Ctrl-C is an interruption (130); SIGTERM, the way a supervisor stops a service, is not.
    return EXIT_INTERRUPTED if signalled and signalled[0] == signal.SIGINT else 0


async def _mcp_serve(args: argparse.Namespace) -> int:
    from cmd_ipc.registry import CommandRegistry
    from cmd_ipc.server import mcp

    http_at = _host_port(args.http, "--http") if args.http else None
    # Only an explicit --token is a usage error over stdio: $CMD_IPC_TOKEN, set for the
    # other sub-commands, is read for --http only.
    if args.token is not None and http_at is None:
        raise UsageError("--token protects the HTTP endpoint: it needs --http HOST:PORT")
    token = args.token if args.token is not None else os.environ.get(_TOKEN_ENV) or None
    options: dict[str, Any] = {"expose": args.expose}
    stop = asyncio.Event()
    signalled: list[int] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        signalled.append(sig)
        stop.set()
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)

    async with CommandRegistry(args.id) as registry:
        if http_at is None:
            # stdout carries MCP only: the streams are claimed before the setup runs, so
            # whatever it (or a worker it spawns) prints goes to stderr.
            async with mcp.stdio_streams() as (read, write):
                await run_setup(registry, args.setup)
                async with mcp.MCPServer(registry, **options) as server:
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        loop.add_signal_handler(sig, on_signal, sig)
                    print(
                        f"cmd-ipc mcp: serving {len(server.tools())} tools of {args.id!r} "
                        "over stdio",
                        file=sys.stderr,
                    )
                    serving = asyncio.ensure_future(server.serve_streams(read, write))
                    stopping = asyncio.ensure_future(stop.wait())
                    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    for task in (serving, stopping):
                        task.cancel()
                    await asyncio.gather(serving, stopping, return_exceptions=True)
        else:
            await run_setup(registry, args.setup)
            http = await mcp.serve_http(
                registry, http_at[0], http_at[1], path=args.path, token=token, **options
            )
            try:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, on_signal, sig)
                tools = len(http.mcp.tools())
                if args.json:
                    print(json.dumps({"id": args.id, "url": http.url, "tools": tools}))
                else:
                    auth = "bearer token required" if token else "no token: anyone may call"
                    _console().print(
                        f"serving [bold]{args.id}[/] over MCP at [bold cyan]{http.url}[/] "
                        f"({tools} tools; {auth}); Ctrl-C stops"
                    )
                sys.stdout.flush()
                await stop.wait()
            finally:
                await http.close()
    return EXIT_INTERRUPTED if signalled and signalled[0] == signal.SIGINT else 0


# --------------------------------------------------------------------------- parser


def seconds(text: str) -> float:
    """``--timeout``'s type: a positive, finite number of seconds.

    Raises:
        argparse.ArgumentTypeError: Anything else (a usage error: exit 2).
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _remote_options(p: argparse.ArgumentParser, json_help: str) -> None:
    p.add_argument(
        "--token",
        default=os.environ.get(_TOKEN_ENV),
        help=f"bearer token for a remote target (default: ${_TOKEN_ENV})",
    )
    p.add_argument(
        "--timeout",
        type=seconds,
        default=30.0,
        metavar="SECONDS",
        help="seconds connecting and each call may take (default 30; must be > 0)",
    )
    p.add_argument("--json", action="store_true", help=json_help)


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
            "127.0.0.1:8765. --expose limits what clients may list and call; --token "
            "protects both the calls and the command list. Ctrl-C exits with 130, SIGTERM "
            "with 0, after closing the servers and stopping the workers."
        ),
    )
    p.add_argument("setup", metavar="SETUP", help="package.module:function")
    p.add_argument("--http", metavar="HOST:PORT", help="serve HTTP here")
    p.add_argument("--ws", metavar="HOST:PORT", help="serve WebSocket here")
    p.add_argument("--id", default="cmd-ipc", help="the registry's id (default cmd-ipc)")
    p.add_argument(
        "--token",
        default=os.environ.get(_TOKEN_ENV),
        help=f"require this bearer token (default: ${_TOKEN_ENV}; none: no auth); "
        "GET /cmds.json needs it too, unless --public-schema",
    )
    p.add_argument(
        "--expose",
        action="append",
        metavar="PATTERN",
        help="serve only the commands matching this glob pattern (repeatable; '*' matches "
        "dots too, so 'api.*' takes api.users.get); the others are never listed and calling "
        "them is answered not_found. Default: every public command of the tree, workers' "
        "included",
    )
    p.add_argument(
        "--public-schema",
        action="store_true",
        help="serve GET /cmds.json without the token (the commands stay protected)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='once serving, print one JSON line {"id", "urls": {"http", "ws"}, "commands": '
        'N exposed, "expose": [PATTERN...] or null} instead of the banner',
    )

    p = sub.add_parser(
        "list",
        help="list the commands of a target",
        description=(
            "Prints the target's public commands: id, description, request fields. Exits "
            f"with {EXIT_UNREACHABLE} when the target cannot be reached, "
            f"{EXIT_UNAUTHORIZED} when it needs another token."
        ),
    )
    p.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    _remote_options(
        p,
        "print the commands as a JSON array of command definitions (id, description, "
        "schema) instead of a table",
    )

    p = sub.add_parser(
        "call",
        help="call a command and print its JSON result",
        description=(
            "Calls COMMAND_ID on the target with REQUEST (a JSON object) and prints the JSON "
            "result. On failure prints the error code and message and exits with "
            + ", ".join(f"{v} ({k})" for k, v in EXIT_CODES.items())
            + f"; {EXIT_UNAUTHORIZED} when the target needs another token; 2 for a usage "
            "error."
        ),
    )
    p.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    p.add_argument("command_id", metavar="COMMAND_ID")
    p.add_argument("request", metavar="REQUEST", nargs="?", help="JSON object, e.g. '{\"a\": 1}'")
    _remote_options(
        p,
        'print one JSON line, {"ok": true, "result": ...} or {"ok": false, "error": '
        '{"code", "message"}}, instead of the bare result (errors then go to stdout)',
    )

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
    _remote_options(
        p,
        'print {"output": PATH, "bytes": N} once the module is written, instead of a message',
    )

    p = sub.add_parser(
        "mcp",
        help="serve a registry's commands as MCP tools (for AI agents)",
        description="Model Context Protocol. `cmd-ipc mcp serve SETUP` serves the tools.",
    )
    mcp_sub = p.add_subparsers(dest="mcp_command", metavar="MCP_COMMAND")
    p = mcp_sub.add_parser(
        "serve",
        help="serve every public command of a registry (workers' included) as MCP tools",
        description=(
            "Creates a registry, calls SETUP (package.module:function) to register commands "
            "(and spawn workers), and serves every public command the registry can route to "
            "as MCP tools: over stdio by default (what an agent that starts the server "
            "expects; stdout then carries MCP only, everything else printed goes to "
            "stderr), or over streamable HTTP with --http. Agents are told of every change "
            "of the tool list (notifications/tools/list_changed). Needs cmd-ipc[mcp]."
        ),
    )
    p.add_argument("setup", metavar="SETUP", help="package.module:function")
    p.add_argument("--http", metavar="HOST:PORT", help="serve streamable HTTP here (not stdio)")
    p.add_argument("--path", default="/mcp", help="the HTTP endpoint's path (default /mcp)")
    p.add_argument("--id", default="cmd-ipc", help="the registry's id (default cmd-ipc)")
    p.add_argument(
        "--token",
        default=None,
        help=f"require this bearer token over HTTP (default with --http: ${_TOKEN_ENV}; "
        "none: no auth)",
    )
    p.add_argument(
        "--expose",
        action="append",
        metavar="PATTERN",
        help="serve only the commands matching this glob pattern (repeatable)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='with --http, print one JSON line {"id", "url", "tools": N} once serving',
    )

    sub.add_parser(
        "demo",
        help="run a three-level in-process tree and print what happens",
        description=(
            "Builds three registries in this process (main <- worker <- sub, joined by "
            "in-memory channels), makes every one call a command of every other, sends an "
            "event round the tree, and prints each call's result and route, then the "
            "routing counters. Needs nothing installed beyond cmd-ipc."
        ),
    )
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
        if args.command == "mcp":
            if getattr(args, "mcp_command", None) != "serve":
                parser.parse_args(["mcp", "--help"])
            return asyncio.run(_mcp_serve(args))
        if args.command == "demo":
            from cmd_ipc.demo import main as demo_main

            demo_main()
            return 0
        if args.command == "bench":
            from cmd_ipc import bench

            return bench.main(args)
    except UsageError as e:
        print(f"cmd-ipc {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Failure as e:  # cannot connect, refused token...
        print(f"cmd-ipc {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except MissingDependency as e:  # an extra that is not installed
        print(f"cmd-ipc {args.command}: {e}", file=sys.stderr)
        return 1
    except CommandError as e:  # a setup that failed to register, say
        print(f"cmd-ipc {args.command}: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_CODES.get(e.code, 1)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OSError as e:  # a port in use, an address this host does not have...
        print(f"cmd-ipc {args.command}: {e}", file=sys.stderr)
        return 1
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
