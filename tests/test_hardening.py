"""A broken or hostile peer holds a bounded share of a registry (issue: hardening)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from typing import Any

import aiohttp
import pytest
from cmd_ipc import CommandRegistry, CommandTimeoutError, InternalError, RestartPolicy
from cmd_ipc.http import HTTPChannel, serve
from helpers import eventually


async def test_timed_out_http_calls_cannot_grow_the_servers_jobs_without_limit() -> None:
    """Calls through the HTTP server that time out on the client while their handlers keep
    running: the server's handler runs for that endpoint stop at max_pending_per_channel,
    later calls are refused at once with a clear error, and the server recovers when the
    runs end."""
    release = asyncio.Event()
    async with CommandRegistry("api", max_pending=20) as api:

        async def stuck() -> str:
            await release.wait()
            return "late"

        await api.register_command("stuck", stuck)
        await api.register_command("ping", lambda: "pong")
        server = await serve(api, host="127.0.0.1", port=0)
        try:
            async with CommandRegistry("client") as client:
                await client.register_channel(HTTPChannel("api", server.url))
                outcomes: list[Any] = []
                for _ in range(30):
                    try:
                        await client.execute_command("stuck", timeout=0.2)
                    except (CommandTimeoutError, InternalError) as e:
                        outcomes.append(e)
                jobs = api.stats()["jobs"]
                assert jobs <= 10, f"{jobs} handler runs kept for one endpoint (cap 10)"
                refused = [e for e in outcomes if isinstance(e, InternalError)]
                assert len(refused) == 20, outcomes
                assert "max_pending_per_channel" in str(refused[0])
                release.set()
                # Every stuck run returns; then the endpoint is served again.
                await eventually(lambda: api.stats()["jobs"] == 0, 5)
                assert await client.execute_command("ping") == "pong"
        finally:
            await server.close()


async def test_a_worker_killed_while_its_restart_starts_is_restarted_again() -> None:
    async with CommandRegistry("main") as main:
        worker = await main.spawn_worker(
            "w", "hardening_targets:slow_start", restart=RestartPolicy(backoff=0.05)
        )
        first = worker.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        # The restart spawns a new process, which takes a second to be ready: kill it then.
        await eventually(lambda: worker.pid not in (None, first), 10)
        second = worker.pid
        assert second is not None
        os.kill(second, signal.SIGKILL)
        await eventually(lambda: worker.pid not in (None, first, second), 15)
        await worker.ready(15)
        pid = await main.execute_command("slow.pid", timeout=10)
        assert pid == worker.pid
        assert worker.restarts >= 2
        await worker.stop()


async def test_numbers_no_peer_can_carry_are_invalid_request_before_the_handler() -> None:
    """Over HTTP, ``1e400`` (infinity to Python) and integers outside 64 bits used to run
    the handler and fail afterwards as ``internal_error``; now they are a 400, as is an
    empty ``id``. (Over a channel, the request is answered ``invalid_request``.)"""
    ran: list[Any] = []
    async with CommandRegistry("api") as api:

        def echo(**kw: Any) -> Any:
            ran.append(kw)
            return kw

        await api.register_command("echo", echo, validate=False)
        server = await serve(api, host="127.0.0.1", port=0)
        try:
            async with aiohttp.ClientSession() as session:

                async def post(body: str) -> tuple[int, Any]:
                    async with session.post(
                        server.url + "/cmd",
                        data=body,
                        headers={"Content-Type": "application/json"},
                    ) as r:
                        text = await r.text()
                        return r.status, json.loads(text) if r.status == 200 else text

                for n in ["1e400", "18446744073709551616", "-9223372036854775809"]:
                    status, answer = await post(
                        '{"id":"r1","type":"execute.command.request","commandId":"echo",'
                        f'"request":{{"a":{n}}}}}'
                    )
                    # Refused as the malformed message it is, before anything runs.
                    assert status == 400, (n, answer)
                    assert "out of range" in answer, (n, answer)
                status, _ = await post(
                    '{"id":"","type":"execute.command.request","commandId":"echo"}'
                )
                assert status == 400
                assert ran == []
                # The edges of the range are carried.
                status, answer = await post(
                    '{"id":"r2","type":"execute.command.request","commandId":"echo",'
                    '"request":{"a":18446744073709551615,"b":1e300}}'
                )
                assert answer["response"] == {
                    "ok": True,
                    "result": {"a": 18446744073709551615, "b": 1e300},
                }
        finally:
            await server.close()


async def test_a_ping_flood_whose_pongs_are_never_read_is_bounded_then_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A WebSocket client floods pings and never reads: the server stops reading it while
    its socket is full (so no pong queues up without bound), other clients are served, and
    the connection is dropped after the stall timeout and counted."""
    from cmd_ipc.channels import websocket as ws_channels
    from cmd_ipc.websocket import WebSocketChannel, serve_websocket

    monkeypatch.setattr(ws_channels._SinkConnection, "stall_timeout", 1.0)
    async with CommandRegistry("hub") as hub:
        await hub.register_command("ping", lambda: "pong")
        server = await serve_websocket(hub, "127.0.0.1", 0, ping_interval=None)
        try:
            loop = asyncio.get_running_loop()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            await loop.sock_sendall(
                sock,
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            )
            status = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
            assert b"101" in status.split(b"\r\n", 1)[0], status
            sock.setblocking(True)
            # A masked ping with a 125-byte payload (mask 0: the payload is sent as is).
            ping = bytes([0x89, 0x80 | 125, 0, 0, 0, 0]) + b"p" * 125
            burst = ping * 512
            sock.settimeout(0.5)

            def flood() -> int:
                sent = 0
                try:
                    while sent < 200_000 * len(ping):
                        sock.sendall(burst)
                        sent += len(burst)
                except (TimeoutError, OSError):
                    pass
                return sent

            sent = await loop.run_in_executor(None, flood)
            (conn,) = server.server.connections
            backlog = conn.transport.get_write_buffer_size()
            # Without the bound the pongs to every ping read so far would wait here.
            assert backlog < 1024 * 1024, f"{backlog} bytes queued for a peer that reads nothing"
            assert sent < 200_000 * len(ping), "the server read the whole flood"
            async with CommandRegistry("other") as other:
                await other.register_channel(WebSocketChannel("hub", server.url))
                assert await other.execute_command("ping", timeout=10) == "pong"
            await eventually(lambda: server.handler.stalled == 1, 10)
            sock.close()
        finally:
            await server.close()
