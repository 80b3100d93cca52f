"""A closed registry is garbage once dropped, even when a handler closes over it.

The handler table of the Rust node holds Python callables; it is visible to Python's garbage
collector (``__traverse__``/``__clear__``) and emptied on close, so a cycle through it
(registry -> node -> handler -> registry) is collected like any other.
"""

from __future__ import annotations

import gc
import weakref

import pytest
from cmd_ipc import CommandRegistry, _core


async def _registry_with_a_handler_over_it(validate: bool) -> CommandRegistry:
    """A registry whose handler closes over it (the cell lives on in the closure only)."""
    registry = CommandRegistry("gc")

    def echo(x: int) -> int:
        return x if registry.id == "gc" else -1

    await registry.register_command("gc.echo", echo, validate=validate)
    return registry


def _holders(obj: object) -> str:
    """What still refers to ``obj`` (for the failure message)."""
    gc.collect()
    lines = []
    for r in gc.get_referrers(obj):
        if isinstance(r, (list, dict)) and len(repr(r)) > 300:
            lines.append(f"{type(r).__name__} of {len(r)} items")
        else:
            lines.append(f"{type(r).__module__}.{type(r).__qualname__}: {repr(r)[:200]}")
    return "\n".join(lines)


@pytest.mark.parametrize("validate", [False, True], ids=["untyped", "validated"])
async def test_a_closed_registry_whose_handler_closes_over_it_is_collected(
    validate: bool,
) -> None:
    registry = await _registry_with_a_handler_over_it(validate)
    assert await registry.execute_command("gc.echo", {"x": 2}) == 2
    await registry.close()
    ref = weakref.ref(registry)
    del registry
    gc.collect()
    alive = ref()
    assert alive is None, "the registry is still referred to by:\n" + _holders(alive)


class _Holder:
    node: _core.Node


def _node_in_a_cycle() -> tuple[_Holder, weakref.ref[_Holder]]:
    """holder -> node -> handler and codec -> holder."""
    holder = _Holder()
    holder.node = _core.Node("gc")

    def handler(**request: object) -> object:
        return holder

    holder.node.set_fast_handler(1, handler)
    holder.node.set_fast_codec(handler, handler)
    return holder, weakref.ref(holder)


def test_the_node_shows_its_callables_to_the_garbage_collector() -> None:
    holder, ref = _node_in_a_cycle()
    assert gc.is_tracked(holder.node)
    del holder
    gc.collect()
    assert ref() is None


def test_clear_handlers_breaks_the_cycle_at_once() -> None:
    holder, ref = _node_in_a_cycle()
    holder.node.clear_handlers()
    del holder
    assert ref() is None  # no cycle left: freed by reference counting, without a collection
