"""The cmd-ipc command: serve, list, call, stubs (in-process, HTTP and WebSocket targets)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cmd_ipc import CommandRegistry, HTTPChannel, WebSocketChannel
from cmd_ipc.cli import EXIT_CODES, EXIT_UNAUTHORIZED, main

TESTS = Path(__file__).resolve().parent
SETUP = "stub_targets:setup"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for sub in ("serve", "list", "call", "stubs", "bench", "demo"):
        with pytest.raises(SystemExit) as e:
            main([sub, "--help"])
        assert e.value.code == 0
        assert "usage: cmd-ipc " + sub in capsys.readouterr().out


def test_list_in_process_target(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "list", SETUP, "--json")
    assert code == 0
    commands = json.loads(out)
    ids = [c["id"] for c in commands]
    assert ids == ["geo.mid", "math.add", "paint.pick", "stats.totals", "sys.ping", "users.get"]
    # A table for humans: ids, descriptions and request fields (plain text when piped).
    code, out, _ = run_cli(capsys, "list", SETUP)
    assert code == 0
    assert "Finds a user by id" in out
    assert "user_id*: integer, verbose: boolean" in out
    assert "\x1b[" not in out  # no colour codes when not a terminal
    assert "_hidden" not in out


def test_call_prints_result_and_maps_errors_to_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_cli(capsys, "call", SETUP, "math.add", '{"a": 1, "b": 2}')
    assert (code, json.loads(out)) == (0, 3)
    code, out, _ = run_cli(capsys, "call", SETUP, "users.get", '{"user_id": 7}', "--json")
    assert code == 0
    answer = json.loads(out)
    assert answer["ok"] is True and answer["result"]["id"] == 7
    code, _, err = run_cli(capsys, "call", SETUP, "users.get", '{"user_id": "x"}')
    assert code == EXIT_CODES["invalid_request"] == 4
    assert "invalid_request" in err and "user_id" in err
    code, out, _ = run_cli(capsys, "call", SETUP, "no.such", "--json")
    assert code == EXIT_CODES["not_found"]
    assert json.loads(out)["error"]["code"] == "not_found"
    # In process the target's registry is this process's: its private commands are local.
    code, out, _ = run_cli(capsys, "call", SETUP, "_hidden.secret")
    assert (code, json.loads(out)) == (0, "private")
    # Usage errors: exit 2 with a message, no traceback.
    code, _, err = run_cli(capsys, "call", SETUP, "math.add", "{not json")
    assert code == 2 and "not valid JSON" in err
    code, _, err = run_cli(capsys, "call", SETUP, "math.add", "[1, 2]")
    assert code == 2 and "JSON object" in err
    code, _, err = run_cli(capsys, "list", "nowhere")
    assert code == 2 and "unknown target" in err
    code, _, err = run_cli(capsys, "list", "no_such_module_xyz:setup")
    assert code == 2 and "cannot import" in err


def test_async_setup_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "call", "stub_targets:setup_async", "echo.untyped", '{"value": [1, "x"]}'
    )
    assert (code, json.loads(out)) == (0, [1, "x"])


# --------------------------------------------------------------------------- stubs

USAGE = """
from __future__ import annotations


from cmd_ipc import CommandRegistry, HTTPChannel, WebSocketChannel

import client


async def use(registry: CommandRegistry) -> str:
    total: int = await client.math_add(registry, a=1, b=2)
    user = await client.users_get(registry, user_id=total, verbose=True)
    mid = await client.geo_mid(registry, a={"x": 0.0, "y": 0.0}, b={"x": 2.0, "y": 4.0})
    totals = await client.stats_totals(registry, tags=["a", "b", "a"])
    color: str = await client.paint_pick(registry, color="green")
    await client.sys_ping(registry)
    return f"{user['name']} {user['joined']} {mid['y']} {totals['by_tag']['a']} {color}"


def use_sync(registry: CommandRegistry) -> int:
    return client.math_add_sync(registry, a=20, b=22)
"""


@pytest.fixture
def stubs_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Path]:
    code, out, _ = run_cli(capsys, "stubs", SETUP, "-o", str(tmp_path / "client.py"))
    assert code == 0 and "wrote" in out
    (tmp_path / "usage.py").write_text(USAGE)
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("client", "usage"):
            sys.modules.pop(name, None)


def mypy(path: Path, *files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *files],
        cwd=path,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timeout(180)
def test_generated_stubs_pass_mypy_strict_and_catch_misuse(stubs_dir: Path) -> None:
    done = mypy(stubs_dir, "client.py", "usage.py")
    assert done.returncode == 0, done.stdout + done.stderr
    # The types mean something: a wrong argument type is an error.
    (stubs_dir / "misuse.py").write_text(
        "from cmd_ipc import CommandRegistry\nimport client\n\n"
        "async def bad(r: CommandRegistry) -> None:\n"
        "    await client.math_add(r, a='1', b=2)\n"
        "    await client.users_get(r, id=3)\n"
    )
    done = mypy(stubs_dir, "misuse.py")
    assert done.returncode == 1
    assert 'Argument "a" to "math_add" has incompatible type "str"' in done.stdout
    assert 'Unexpected keyword argument "id" for "users_get"' in done.stdout


async def test_generated_stubs_call_the_commands(stubs_dir: Path) -> None:
    import stub_targets
    import usage

    async with CommandRegistry("app") as registry:
        stub_targets.setup(registry)
        await registry.ready()
        assert await usage.use(registry) == "Ada 2020-01-02T03:04:05Z 2.0 2 green"


def test_generated_blocking_twins_call_the_commands(stubs_dir: Path) -> None:
    import usage

    with CommandRegistry("app") as registry:
        registry.register_command_sync("math.add", lambda a, b: a + b)
        assert usage.use_sync(registry) == 42


# --------------------------------------------------------------------------- serve


@pytest.fixture
def served() -> Iterator[dict[str, Any]]:
    """``cmd-ipc serve`` in a subprocess, over HTTP and WebSocket, with a token."""
    env = {**os.environ, "PYTHONPATH": str(TESTS), "CMD_IPC_TOKEN": "s3cret"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cmd_ipc",
            "serve",
            SETUP,
            "--http",
            "127.0.0.1:0",
            "--ws",
            "127.0.0.1:0",
            "--json",
            "--id",
            "svc",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        info = json.loads(line)
        assert info["id"] == "svc" and info["commands"] == 6
        yield {**info, "proc": proc}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        if proc.stdout is not None:
            proc.stdout.close()
        assert code == 0


@pytest.mark.parametrize("kind", ["http", "ws"])
def test_serve_then_list_call_and_stubs_remotely(
    served: dict[str, Any], kind: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = served["urls"][kind]
    assert url.startswith(f"{kind}://127.0.0.1:")
    code, out, _ = run_cli(capsys, "list", url, "--token", "s3cret", "--json")
    assert code == 0
    assert "users.get" in [c["id"] for c in json.loads(out)]
    code, out, _ = run_cli(
        capsys, "call", url, "math.add", '{"a": 20, "b": 22}', "--token", "s3cret"
    )
    assert (code, json.loads(out)) == (0, 42)
    code, _, err = run_cli(capsys, "call", url, "_hidden.secret", "--token", "s3cret")
    assert code == EXIT_CODES["not_found"], err
    code, _, err = run_cli(capsys, "call", url, "math.add", '{"a": 1, "b": 1}', "--token", "bad")
    assert code == EXIT_UNAUTHORIZED and "refused the token" in err, err
    code, _, _ = run_cli(capsys, "stubs", url, "--token", "s3cret", "-o", str(tmp_path / "c.py"))
    assert code == 0
    source = (tmp_path / "c.py").read_text()
    assert "async def users_get(" in source and "def users_get_sync(" in source
    assert url in source
    # Calls through the generated module reach the served registry.
    spec = importlib.util.spec_from_file_location(f"served_client_{kind}", tmp_path / "c.py")
    assert spec is not None and spec.loader is not None
    stubs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stubs)
    assert asyncio.run(_call_served(stubs, kind, url)) == (42, "Ada", "green", 2.0)
    with CommandRegistry("blocking-client") as registry:
        registry.register_channel_sync(_remote_channel(kind, url))
        assert stubs.math_add_sync(registry, a=1, b=2) == 3


def _remote_channel(kind: str, url: str) -> Any:
    if kind == "http":
        return HTTPChannel("svc", url, token="s3cret")
    return WebSocketChannel("svc", url, token="s3cret", reconnect=False)


async def _call_served(stubs: Any, kind: str, url: str) -> tuple[Any, ...]:
    async with CommandRegistry("stub-client") as registry:
        await registry.register_channel(_remote_channel(kind, url))
        total = await stubs.math_add(registry, a=40, b=2)
        user = await stubs.users_get(registry, user_id=1, verbose=True)
        color = await stubs.paint_pick(registry, color="green")
        mid = await stubs.geo_mid(registry, a={"x": 0.0, "y": 0.0}, b={"x": 4.0, "y": 4.0})
        return total, user["name"], color, mid["x"]


def test_stubs_to_stdout_are_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    code, first, _ = run_cli(capsys, "stubs", SETUP, "-o", "-")
    code2, second, _ = run_cli(capsys, "stubs", SETUP, "-o", "-")
    assert code == code2 == 0 and first == second
    compile(first, "client.py", "exec")
    assert textwrap.dedent(first).startswith('"""Typed client for the commands of')


TRICKY = [
    {"id": "mode.set", "description": 'Sets the mode to "fast"', "schema": {
        "request": {"type": "object", "properties": {"timeout": {"type": "number"},
                                                      "class": {"type": "string"}},
                    "required": ["timeout"]}}},
    {"id": "db", "schema": {"request": {"type": "object", "properties": {}}}},
    {"id": "db.sync"},
    {"id": "cast"},
    {"id": "list"},
    {"id": "tree.get", "schema": {
        "request": {"type": "object", "properties": {"depth": {"type": "integer"}}},
        "response": {"$ref": "#/$defs/Node", "$defs": {
            "Node": {"type": "object", "title": "Node",
                     "properties": {"child-nodes": {"type": "array",
                                                    "items": {"$ref": "#/$defs/Node"}}}}}}}},
    {"id": "json.echo", "schema": {
        "request": {"type": "object", "properties": {"value": {"$ref": "#/$defs/Json"}},
                    "required": ["value"],
                    "$defs": {"Json": {"anyOf": [{"type": "integer"},
                                                 {"type": "array",
                                                  "items": {"$ref": "#/$defs/Json"}}]}}},
        "response": {"type": "string", "description": 'ends with a quote"'}}},
]  # fmt: skip


@pytest.mark.timeout(180)
def test_stubs_for_awkward_names_and_recursive_schemas(tmp_path: Path) -> None:
    from cmd_ipc.stubs import generate

    source = generate(TRICKY, source='a "quoted" \\ target')
    (tmp_path / "tricky.py").write_text(source)
    # It imports (recursive types are forward references) and names no function twice.
    namespace: dict[str, Any] = {}
    exec(compile(source, "tricky.py", "exec"), namespace)
    exported = namespace["__all__"]
    assert len(exported) == len(set(exported)) == 2 * len(TRICKY)
    assert {"db", "db_sync", "db_sync_", "db_sync__sync"} <= set(exported)
    assert "cast" not in exported and "list" not in exported
    # A field named like a parameter of the function: the request is one typed mapping.
    assert "request: ModeSetRequest" in source
    done = mypy(tmp_path, "tricky.py")
    assert done.returncode == 0, done.stdout + done.stderr
