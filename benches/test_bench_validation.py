"""The cost of typed commands (pytest-benchmark): ``make bench`` or
``pytest benches/test_bench_validation.py --benchmark-only``.

The same in-process local call (``await registry.execute_command`` of a ``def`` handler, as
``local`` in test_bench_inprocess.py), in batches of ``BATCH`` sequential calls:

* ``untyped``: registered with ``validate=False`` (the fast path: no pydantic per call);
* ``validated``: the same typed handler validated (request checked against ``a: int, b: int``,
  result serialised through ``-> int``);
* ``validated_model``: a request with a nested pydantic model and a model result (validated on
  the way in, serialised to a dict on the way out), against ``untyped_model``, the same
  handler unvalidated returning a plain dict. This ratio includes what a typed handler costs
  by itself (building two models: about 2 us here), not only the validation.

The ratios ``validated / untyped`` and ``validated_model / untyped_model`` are printed at the
end of the run (``benches/conftest.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from bench_support import per_call_us
from cmd_ipc import CommandRegistry
from pydantic import BaseModel

#: Per-call microseconds by row, read by the terminal summary in conftest.py.
RESULTS: dict[str, float] = {}
RATIOS = (("validated", "untyped"), ("validated_model", "untyped_model"))


class Point(BaseModel):
    x: float
    y: float


class Moved(BaseModel):
    point: Point
    label: str


def _add(a: int, b: int) -> int:
    return a + b


def _move(point: Point, dx: float, label: str = "") -> Moved:
    return Moved(point=Point(x=point.x + dx, y=point.y), label=label)


def _move_untyped(point: dict[str, float], dx: float, label: str = "") -> dict[str, Any]:
    return {"point": {"x": point["x"] + dx, "y": point["y"]}, "label": label}


def _run_local(
    benchmark: Any,
    loop: asyncio.AbstractEventLoop,
    name: str,
    handler: Callable[..., Any],
    validate: bool,
    request: dict[str, Any],
    expected: Any,
) -> None:
    registry = CommandRegistry("main")

    async def setup() -> None:
        await registry.register_command("cmd", handler, validate=validate)
        assert await registry.execute_command("cmd", request) == expected

    loop.run_until_complete(setup())
    RESULTS[name] = per_call_us(benchmark, loop, lambda: registry.execute_command("cmd", request))
    loop.run_until_complete(registry.close())


def test_untyped(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    _run_local(benchmark, loop, "untyped", _add, False, {"a": 1, "b": 2}, 3)


def test_validated(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    _run_local(benchmark, loop, "validated", _add, True, {"a": 1, "b": 2}, 3)


MOVE_REQUEST = {"point": {"x": 1.0, "y": 2.0}, "dx": 0.5, "label": "p"}
MOVE_RESULT = {"point": {"x": 1.5, "y": 2.0}, "label": "p"}


def test_untyped_model(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    _run_local(benchmark, loop, "untyped_model", _move_untyped, False, MOVE_REQUEST, MOVE_RESULT)


def test_validated_model(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    _run_local(benchmark, loop, "validated_model", _move, True, MOVE_REQUEST, MOVE_RESULT)
