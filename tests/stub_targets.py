"""Setup functions for ``cmd-ipc serve/list/call/stubs`` tests: typed commands of every kind."""
# ruff: noqa: UP007, UP045  (pydantic evaluates these hints at run time: Optional/Union work on 3.9)

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from typing import Optional, Union

from cmd_ipc import CommandRegistry
from pydantic import BaseModel
from typing_extensions import TypedDict


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    city: str
    zip: Optional[str] = None


class User(BaseModel):
    """A user of the system."""

    id: int
    name: str
    color: Color = Color.RED
    addresses: list[Address] = []
    joined: dt.datetime


@dataclasses.dataclass
class Point:
    x: float
    y: float


class Totals(TypedDict):
    count: int
    by_tag: dict[str, int]


def setup(registry: CommandRegistry) -> None:
    """Registers the commands the CLI tests use."""

    @registry.command("math.add", description="Adds two integers")
    def add(a: int, b: int) -> int:
        return a + b

    @registry.command("users.get", description="Finds a user by id")
    def get(user_id: int, verbose: bool = False) -> User:
        return User(
            id=user_id,
            name="Ada" if verbose else "A",
            addresses=[Address(city="London")],
            joined=dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        )

    @registry.command("geo.mid")
    def mid(a: Point, b: Point, tags: Optional[list[str]] = None) -> Point:
        return Point((a.x + b.x) / 2, (a.y + b.y) / 2)

    @registry.command("stats.totals")
    def totals(tags: list[str], weight: Union[int, float] = 1) -> Totals:
        by: dict[str, int] = {}
        for t in tags:
            by[t] = by.get(t, 0) + int(weight)
        return {"count": len(tags), "by_tag": by}

    @registry.command("paint.pick")
    def pick(color: Color) -> Color:
        return color

    @registry.command("sys.ping")
    def ping() -> None:
        return None

    @registry.command("_hidden.secret")
    def secret() -> str:
        return "private"


async def setup_async(registry: CommandRegistry) -> None:
    """An async setup: also accepted by the CLI."""
    await registry.register_command("echo.untyped", lambda value: value)
