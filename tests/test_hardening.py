"""A broken or hostile peer holds a bounded share of a registry (issue: hardening)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from typing import Any

import aiohttp
import pytest
from cmd_ipc import (
    ChannelDisconnectedError,
    CommandRegistry,
    CommandTimeoutError,
    InternalError,
    InvalidRequestError,
    NativeChannel,
    RestartPolicy,
)
from cmd_ipc.http import HTTPChannel, serve
from helpers import FakeChannel, eventually


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


async def test_a_worker_killed_while_its_restart_starts_is_restarted_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
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
        # A waiter of ready() from before the second death must see the restart through.
        waiter = asyncio.ensure_future(worker.ready(30))
        with caplog.at_level(logging.ERROR, logger="cmd_ipc"):
            os.kill(second, signal.SIGKILL)
            await eventually(lambda: worker.pid not in (None, first, second), 15)
            await waiter
        # The second kill landed while that process was still starting.
        assert "restart of worker 'w' failed" in caplog.text
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
    """A WebSocket client floods pings and never reads: the pongs waiting for it are
    bounded (``max_backlog``): past the bound the connection is dropped and counted, and
    other clients are served throughout."""
    from cmd_ipc.channels import websocket as ws_channels
    from cmd_ipc.websocket import WebSocketChannel, serve_websocket

    monkeypatch.setattr(ws_channels._SinkConnection, "max_backlog", 1024 * 1024)
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
            sock.settimeout(5)
            # A masked ping with a 125-byte payload (mask 0: the payload is sent as is).
            ping = bytes([0x89, 0x80 | 125, 0, 0, 0, 0]) + b"p" * 125
            burst = ping * 512
            limit = 200_000 * len(ping)  # 26 MB of pings: 25 MB of pongs unbounded

            def flood() -> int:
                sent = 0
                try:
                    while sent < limit:
                        sock.sendall(burst)
                        sent += len(burst)
                except OSError:  # the server dropped the connection
                    pass
                return sent

            sent = await loop.run_in_executor(None, flood)
            assert sent < limit, "the server kept answering pings no one read"
            await eventually(lambda: server.handler.stalled == 1, 10)
            assert not server.server.connections
            async with CommandRegistry("other") as other:
                await other.register_channel(WebSocketChannel("hub", server.url))
                assert await other.execute_command("ping", timeout=10) == "pong"
            sock.close()
        finally:
            await server.close()


# ------------------------------------------------------------------ native outboxes


def nested(levels: int) -> Any:
    """A value of ``levels`` nested lists (``[[...[]...]]``)."""
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


async def fill(registry: CommandRegistry, events: int) -> None:
    """Emits ``events`` events of 1 KB, letting the loop write between bursts."""
    for i in range(events):
        registry.emit_event("hard.fill", {"s": "x" * 1000})
        if i % 100 == 99:
            await asyncio.sleep(0)


async def test_close_completes_when_a_pipe_peer_stopped_reading() -> None:
    """Closing a registry whose pipe channel has bytes waiting for a peer that reads nothing
    used to raise OSError(EBADF) (the loop stopped watching a descriptor already closed) and
    skip the rest of close: calls waiting on other channels were never failed."""
    main = CommandRegistry("main", router_channel="up")
    svc = CommandRegistry("svc")
    deaf, deaf_peer = NativeChannel.pair("deaf", "main", transport="pipe")
    to_svc, from_main = NativeChannel.pair("svc", "main", transport="pipe")
    try:

        async def hang() -> None:
            await asyncio.Event().wait()

        await svc.register_command("svc.hang", hang)
        up = FakeChannel("up")
        await main.register_channel(up)
        await main.register_channel(deaf)
        await main.register_channel(to_svc)
        await svc.register_channel(from_main)
        assert await main.wait_listed("svc")
        on_svc = asyncio.ensure_future(main.execute_command("svc.hang", timeout=60))
        on_up = asyncio.ensure_future(main.execute_command("above", timeout=60))
        await eventually(lambda: main.stats()["pending"] == 2)
        await fill(main, 3000)  # 3 MB: more than the socket buffers hold
        assert main.stats()["channels"]["deaf"]["outbox"] > 0
        await main.close()
        for call in (on_svc, on_up):
            with pytest.raises(ChannelDisconnectedError):
                await asyncio.wait_for(call, 5)
    finally:
        await main.close()
        await svc.close()
        deaf_peer.close_fds()


async def test_a_pipe_worker_dying_with_a_full_outbox_is_reported_like_any_death() -> None:
    """A pipe worker killed while the parent's outbox to it held bytes: its close listeners
    run, the call waiting on it fails at once, and its restart policy restarts it."""
    async with CommandRegistry("main") as main:
        closed: list[tuple[str, str]] = []
        main.add_close_listener(lambda c, r: closed.append((c, r)))
        worker = await main.spawn_worker(
            "w",
            "hardening_targets:limits",
            transport="pipe",
            restart=RestartPolicy(backoff=0.05),
        )
        first = worker.pid
        assert first is not None
        call = asyncio.ensure_future(main.execute_command("hard.hang", timeout=60))
        await eventually(lambda: main.stats()["channels"]["w"]["in_flight"] == 1)
        os.kill(first, signal.SIGSTOP)
        try:
            await fill(main, 3000)
            assert main.stats()["channels"]["w"]["outbox"] > 0
        finally:
            os.kill(first, signal.SIGKILL)
        with pytest.raises(ChannelDisconnectedError):
            await asyncio.wait_for(call, 10)
        await eventually(lambda: [c for c, _ in closed] == ["w"], 10)
        await worker.ready(15)
        assert worker.pid != first and worker.restarts == 1
        assert await main.execute_command("hard.ping", timeout=10) == "pong"
        await worker.stop()


async def test_a_stopped_worker_costs_a_bounded_outbox_then_is_disconnected() -> None:
    """A shm worker stopped with SIGSTOP while its parent emits 1 KB events: once its ring
    and the outbox (max_outbox) are full, events to it are dropped and counted, a call to it
    fails at once, and after slow_consumer_timeout it is disconnected (its waiting call
    fails with channel_disconnected)."""
    bound = 1 << 20
    async with CommandRegistry("main", max_outbox=bound, slow_consumer_timeout=3.0) as main:
        closed: list[tuple[str, str]] = []
        main.add_close_listener(lambda c, r: closed.append((c, r)))
        worker = await main.spawn_worker("w", "hardening_targets:limits")
        pid = worker.pid
        assert pid is not None
        waiting = asyncio.ensure_future(main.execute_command("hard.hang", timeout=60))
        await eventually(lambda: main.stats()["channels"]["w"]["in_flight"] == 1)
        os.kill(pid, signal.SIGSTOP)
        try:
            await fill(main, 5000)  # 5 MB: the ring (1 MiB) and the outbox fill
            w = main.stats()["channels"]["w"]
            assert w["outbox"] <= bound
            assert w["outbox_peak"] <= bound, w
            assert w["dropped"] >= 2000, w
            with pytest.raises(InternalError, match=r"outbox to 'w' is full \(max_outbox"):
                await asyncio.wait_for(main.execute_command("hard.ping"), 1)
            with pytest.raises(ChannelDisconnectedError):
                await asyncio.wait_for(waiting, 10)
            await eventually(lambda: closed != [], 10)
            assert closed[0][0] == "w" and "slow_consumer" in closed[0][1], closed
            assert "w" not in main.stats()["channels"]
        finally:
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)
        await worker.wait()


def json_frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return len(body).to_bytes(4, "little") + body


async def test_a_pipe_peer_flooding_requests_it_never_reads_answers_to_is_bounded() -> None:
    """100,000 list and execute requests from a pipe peer that never reads: the answers
    wait in the parent up to max_outbox bytes; beyond it they are dropped and counted (it
    used to keep every answer: gigabytes for a list flood)."""
    bound = 256 * 1024
    n = 100_000
    async with CommandRegistry("main", max_outbox=bound, slow_consumer_timeout=3.0) as main:
        await main.register_command("ping", lambda: "pong")
        for i in range(20):
            await main.register_command(f"cmd.{i}", lambda: None, description="d" * 100)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        await main.register_channel(
            NativeChannel("flood", sock_fd=ours.detach(), transport="pipe", encoding="json")
        )
        hello = len(b'{"cmd-ipc":1,"encoding":"json"}').to_bytes(4, "little")
        data = b"".join(
            [hello + b'{"cmd-ipc":1,"encoding":"json"}']
            + [
                json_frame({"id": f"l{i}", "type": "list.commands.request"})
                if i % 2
                else json_frame(
                    {"id": f"x{i}", "type": "execute.command.request", "commandId": "ping"}
                )
                for i in range(n)
            ]
        )
        loop = asyncio.get_running_loop()
        writing = loop.run_in_executor(None, theirs.sendall, data)
        peak = 0
        try:
            while not writing.done():
                peak = max(peak, main.stats()["channels"]["flood"]["outbox"])
                await asyncio.sleep(0.01)
            await writing
            await eventually(lambda: main.stats()["channels"]["flood"]["received"] >= n, 60)
            flood = main.stats()["channels"]["flood"]
            peak = max(peak, flood["outbox_peak"])
            assert peak <= bound, flood
            # What the socket buffers held went; the rest was dropped and counted.
            assert flood["dropped"] >= n // 2, flood
            assert await main.execute_command("ping") == "pong"
        finally:
            theirs.close()


# ------------------------------------------------------------------ limits at the sender


async def test_a_workers_result_over_its_parents_message_size_fails_that_call_only() -> None:
    """A worker has its parent's limits: its 2 MB result for a parent limited to 1 MiB is
    answered internal_error (the frame used to close the channel, and the worker exited)."""
    async with CommandRegistry("main", max_message_size=1 << 20) as main:
        worker = await main.spawn_worker("w", "hardening_targets:limits")
        with pytest.raises(InternalError, match="exceeds"):
            await main.execute_command("hard.big", {"n": 2_000_000}, timeout=10)
        assert await main.execute_command("hard.ping", timeout=10) == "pong"
        assert worker.alive and "w" in main.channels
        await worker.stop()


async def test_a_request_one_level_too_deep_fails_before_it_is_sent() -> None:
    """The message is level 1: a request may nest max_depth - 1 levels (as its receiver
    allows). One level more used to pass the local check and wait for its timeout."""
    async with CommandRegistry("main", router_channel="up") as main:
        up = FakeChannel("up")
        await main.register_channel(up)
        with pytest.raises(InvalidRequestError, match="nesting"):
            await asyncio.wait_for(main.execute_command("x", {"v": nested(63)}, timeout=5), 2)
        assert up.of_type("execute.command.request") == []
        legal = asyncio.ensure_future(main.execute_command("x", {"v": nested(62)}, timeout=5))
        await eventually(lambda: up.of_type("execute.command.request"))
        legal.cancel()


async def test_a_result_too_deep_for_its_caller_is_internal_error_at_once() -> None:
    """A request at the deepest legal nesting whose result is two levels deeper: the worker
    answers internal_error instead of a response its caller would drop (the caller used to
    wait for its whole timeout)."""
    async with CommandRegistry("main") as main:
        await main.spawn_worker("w", "hardening_targets:limits")
        with pytest.raises(InternalError, match="could not send the response"):
            await main.execute_command("hard.wrap", {"v": nested(62)}, timeout=5)
        # One level too deep for a request: refused here, before it is sent.
        with pytest.raises(InvalidRequestError):
            await main.execute_command("hard.wrap", {"v": nested(63)}, timeout=5)
        assert await main.execute_command("hard.ping", timeout=10) == "pong"


async def test_oversize_messages_fail_their_call_at_once_and_close_nothing() -> None:
    """A request (or a result) under max_message_size whose whole message is over it: the
    caller gets invalid_request (the serving side answers internal_error for a result) at
    once; the native channel between the two stays up. Both used to be sent, and the
    receiver closed the channel (frame_too_large)."""
    limit = 100_000
    async with (
        CommandRegistry("main", max_message_size=limit) as main,
        CommandRegistry("svc", max_message_size=limit) as svc,
    ):
        await svc.register_command("echo", lambda s: len(s), validate=False)
        await svc.register_command("big", lambda: "y" * (limit - 10), validate=False)
        a, b = NativeChannel.pair("svc", "main", transport="pipe")
        await main.register_channel(a)
        await svc.register_channel(b)
        assert await main.wait_listed("svc")
        with pytest.raises(InvalidRequestError, match="exceeds the limit"):
            await main.execute_command("echo", {"s": "x" * (limit - 20)}, timeout=5)
        with pytest.raises(InternalError, match="exceeds the limit"):
            await main.execute_command("big", timeout=5)
        assert await main.execute_command("echo", {"s": "x"}, timeout=5) == 1
        assert "svc" in main.channels and "main" in svc.channels


async def test_websocket_peers_sending_each_other_large_results_at_once_both_finish() -> None:
    """Both ends of a WebSocket write large messages at the same moment: neither may stop
    reading because its own socket is full (they would wait for each other for ever)."""
    from cmd_ipc.websocket import WebSocketChannel, serve_websocket

    big = "x" * (8 * 1024 * 1024)
    async with CommandRegistry("hub") as hub, CommandRegistry("edge") as edge:
        await hub.register_command("hub.big", lambda: big)
        await edge.register_command("edge.big", lambda: big)
        server = await serve_websocket(hub, "127.0.0.1", 0)
        try:
            await edge.register_channel(WebSocketChannel("hub", server.url, client_id="edge"))
            await eventually(lambda: "edge" in hub.channels, 10)
            await hub.wait_listed("edge")
            a, b = await asyncio.gather(
                hub.execute_command("edge.big", timeout=30),
                edge.execute_command("hub.big", timeout=30),
            )
            assert a == big and b == big
            assert server.handler.stalled == 0
        finally:
            await server.close()
