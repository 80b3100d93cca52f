"""What a new user of ``cmd-ipc`` hits first, through the command itself (a subprocess, stderr
checked): one-line errors that say what to do and their exit codes, ``serve --expose`` and
the token on ``GET /cmds.json``, missing extras, and the help texts."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cmd_ipc._optional import MissingDependency, install_hint
from cmd_ipc.cli import EXIT_CODES, EXIT_UNAUTHORIZED, EXIT_UNREACHABLE

TESTS = Path(__file__).resolve().parent
SETUP = "cli_targets:setup"


def env(*paths: Path) -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), str(TESTS)])}
    out.pop("CMD_IPC_TOKEN", None)
    return out


def cli(*argv: str, paths: tuple[Path, ...] = (), timeout: float = 60) -> tuple[int, str, str]:
    """Runs ``cmd-ipc ARGV``; returns its exit status, stdout and stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "cmd_ipc", *argv],
        capture_output=True,
        text=True,
        env=env(*paths),
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


def one_line(err: str) -> str:
    """The single line of an error output (never a traceback)."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Serve = Callable[..., dict[str, Any]]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """``serve(*options)`` runs ``cmd-ipc serve cli_targets:setup`` over HTTP and WebSocket
    and returns its JSON line; at teardown SIGTERM stops it: exit 0, nothing on stderr."""
    procs: list[subprocess.Popen[str]] = []

    def start(*options: str) -> dict[str, Any]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cmd_ipc", "serve", SETUP, "--http", "127.0.0.1:0",
             "--ws", "127.0.0.1:0", "--json", *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )  # fmt: skip
        procs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "cmd-ipc serve printed nothing within 30 s"
        line = proc.stdout.readline()
        assert line, proc.communicate()
        return dict(json.loads(line))

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert (proc.returncode, err) == (0, ""), err


def http_get(url: str, token: str | None = None) -> tuple[int, Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# --------------------------------------------------------------------------- 1. exposure


def test_serve_expose_and_the_token_on_the_command_list(serve: Serve) -> None:
    info = serve("--token", "s3cret", "--expose", "api.*")
    assert (info["commands"], info["expose"]) == (2, ["api.*"])
    http, ws = info["urls"]["http"], info["urls"]["ws"]
    # The command list needs the token, like the commands.
    assert http_get(http + "/cmds.json")[0] == 401
    status, doc = http_get(http + "/cmds.json", "s3cret")
    assert status == 200 and sorted(c["id"] for c in doc["commands"]) == ["api.add", "api.slow"]
    for url in (http, ws):
        code, out, err = cli("list", url, "--token", "s3cret", "--json")
        assert (code, err) == (0, "")
        assert sorted(c["id"] for c in json.loads(out)) == ["api.add", "api.slow"], url
        code, out, err = cli("call", url, "admin.reset", "--token", "s3cret", "--json")
        assert code == EXIT_CODES["not_found"], err
        assert json.loads(out)["error"]["code"] == "not_found"
        code, out, _ = cli("call", url, "api.add", '{"a": 1, "b": 2}', "--token", "s3cret")
        assert (code, json.loads(out)) == (0, 3)


def test_serve_public_schema_opts_out_for_the_list_only(serve: Serve) -> None:
    info = serve("--token", "s3cret", "--expose", "api.add", "--expose", "admin.*",
                 "--public-schema")  # fmt: skip
    http = info["urls"]["http"]
    status, doc = http_get(http + "/cmds.json")
    assert status == 200 and sorted(c["id"] for c in doc["commands"]) == ["admin.reset", "api.add"]
    code, _, err = cli("call", http, "api.add", '{"a": 1, "b": 2}')
    assert code == EXIT_UNAUTHORIZED, err


# --------------------------------------------------------------------------- 3. errors


def test_unreachable_targets_say_so() -> None:
    port = free_port()
    for target, shown in (
        (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/cmd"),
        (f"http://127.0.0.1:{port}/cmd", f"http://127.0.0.1:{port}/cmd"),  # not doubled
        (f"ws://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"),
    ):
        code, out, err = cli("list", target)
        assert code == EXIT_UNREACHABLE == EXIT_CODES["channel_disconnected"]
        assert one_line(err) == f"cmd-ipc list: cannot connect to {shown} (connection refused)"
        assert out == ""


def test_a_target_without_scheme_gets_a_suggestion() -> None:
    for target in ("localhost:8765", "127.0.0.1:8765", "[::1]:8765", "localhost:8765/cmd"):
        code, _, err = cli("call", target, "api.add")
        assert code == 2
        assert one_line(err) == (
            f"cmd-ipc call: target {target!r} has no scheme: did you mean http://{target} "
            f"(or ws://{target})?"
        )


def test_bad_timeouts_are_usage_errors() -> None:
    for value in ("0", "-1", "abc", "nan", "inf"):
        code, _, err = cli("call", "http://127.0.0.1:1", "api.add", "--timeout", value)
        assert code == 2, value
        assert "Traceback" not in err
        assert f"argument --timeout: must be a positive number of seconds, got {value!r}" in err


def test_tokens_and_timeouts(serve: Serve) -> None:
    info = serve("--token", "s3cret")
    for url in info["urls"].values():
        shown = url if url.startswith("ws") else url + "/cmd"
        code, _, err = cli("call", url, "api.add", '{"a": 1, "b": 2}')
        assert code == EXIT_UNAUTHORIZED == 9
        assert one_line(err) == (
            f"cmd-ipc call: {shown} needs a bearer token (HTTP 401): pass --token TOKEN or "
            "set $CMD_IPC_TOKEN"
        )
        code, _, err = cli("list", url, "--token", "wrong")
        assert code == EXIT_UNAUTHORIZED
        assert one_line(err) == (
            f"cmd-ipc list: {shown} refused the token (HTTP 401): check --token or $CMD_IPC_TOKEN"
        )
        # A timeout names the command and the seconds, not a channel.
        started = time.monotonic()
        code, out, err = cli("call", url, "api.slow", "--token", "s3cret", "--timeout", "0.5")
        assert time.monotonic() - started < 30
        assert code == EXIT_CODES["timeout"], err
        assert one_line(err) == (
            "timeout: api.slow did not answer within 0.5 s (--timeout SECONDS waits longer)"
        )
        code, out, _ = cli(
            "call", url, "api.slow", "--token", "s3cret", "--timeout", "0.5", "--json"
        )
        assert json.loads(out)["error"]["message"].startswith("api.slow did not answer within")


# --------------------------------------------------------------------------- 3, 4. extras


@pytest.fixture
def without_extras(tmp_path: Path) -> Path:
    """A directory that, first on the import path, makes aiohttp and websockets missing."""
    for module in ("aiohttp", "websockets"):
        (tmp_path / f"{module}.py").write_text(f"raise ImportError('no {module} here')\n")
    return tmp_path


def test_a_missing_extra_is_one_line_naming_what_to_install(without_extras: Path) -> None:
    paths = (without_extras,)
    cases = [
        (("list", "http://127.0.0.1:1"), "http", "HTTPChannel needs the 'aiohttp' package"),
        (("call", "ws://127.0.0.1:1", "x"), "ws", "WebSocketChannel needs the 'websockets'"),
        (("serve", SETUP), "http", "the HTTP server (cmd_ipc.server.http) needs the 'aiohttp'"),
        (("serve", SETUP, "--ws", "127.0.0.1:0"), "ws", "the WebSocket server"),
    ]
    for argv, extra, what in cases:
        code, out, err = cli(*argv, paths=paths)
        line = one_line(err)
        assert code == 1, argv
        assert line.startswith(f"cmd-ipc {argv[0]}: {what}"), line
        assert f"cmd-ipc[{extra}]" in line and f"pip install '.[{extra}]'" in line, line
        assert out == ""
        if argv[0] == "serve":
            assert "HTTPChannel" not in line and "WebSocketChannel" not in line
    # In process, no extra is needed.
    code, out, err = cli("list", SETUP, "--json", paths=paths)
    assert (code, err) == (0, "") and "api.add" in out


def test_missing_dependency_message_names_the_extra_and_the_checkout_form() -> None:
    e = MissingDependency("aiohttp", "http", "HTTPChannel")
    assert isinstance(e, ImportError)
    assert str(e) == f"HTTPChannel needs the 'aiohttp' package: {install_hint('http')}"
    assert "cmd-ipc[http]" in str(e) and "pip install '.[http]'" in str(e)
    assert "pip install -e '.[http]'" in str(e)


# --------------------------------------------------------------------------- 3. help


def test_json_help_says_what_it_prints_and_demo_has_a_description() -> None:
    wanted = {
        "list": "JSON array of command definitions",
        "call": '{"ok": true, "result": ...}',
        "stubs": '{"output": PATH, "bytes": N}',
        "serve": '{"id", "urls"',
    }
    for sub, text in wanted.items():
        code, out, _ = cli(sub, "--help")
        assert code == 0
        assert text in " ".join(out.split()), (sub, out)
    code, out, _ = cli("serve", "--help")
    assert "--expose PATTERN" in out and "--public-schema" in out
    code, out, _ = cli("call", "--help")
    assert f"{EXIT_UNAUTHORIZED} when the target needs another token" in " ".join(out.split())
    code, out, _ = cli("demo", "--help")
    assert code == 0 and "Builds three registries in this process" in out
