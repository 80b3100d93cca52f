"""Prints each benchmark row as a ratio of the baseline measured in the same run.

Every bench module may define ``RESULTS`` (per-call microseconds by row), ``RATIOS``
(``(row, baseline)`` pairs) and ``EXTRA`` (``(row, reference)`` pairs whose difference is
printed: the cost of an extra router hop).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A private event loop per bench module."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


MODULES = (
    "test_bench_inprocess",
    "test_bench_processes",
    "test_bench_remote",
    "test_bench_mesh",
    "test_bench_validation",
)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines: list[str] = []
    for name in MODULES:
        b = sys.modules.get(name)
        results: dict[str, float] = getattr(b, "RESULTS", {})
        for row, base in getattr(b, "RATIOS", ()):
            if row in results and base in results:
                lines.append(
                    f"{row:>16}: {results[row]:7.2f} us/call   {base:>16}: "
                    f"{results[base]:6.2f} us/call   ratio {results[row] / results[base]:5.2f}x"
                )
        for row, ref in getattr(b, "EXTRA", ()):
            if row in results and ref in results:
                lines.append(
                    f"{row:>16}: {results[row]:7.2f} us/call   {ref:>16}: "
                    f"{results[ref]:6.2f} us/call   extra {results[row] - results[ref]:+6.2f} us"
                )
    if lines:
        terminalreporter.section("ratios to same-run baselines")
        for line in lines:
            terminalreporter.write_line(line)
