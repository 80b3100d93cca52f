"""Prints each benchmark row as a ratio of the baseline measured in the same run."""

from __future__ import annotations

from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    try:
        import test_bench_inprocess as b
    except ImportError:
        return
    rows = [(n, base) for n, base in b.RATIOS if n in b.RESULTS and base in b.RESULTS]
    if not rows:
        return
    terminalreporter.section("ratios to same-run baselines")
    for name, base in rows:
        terminalreporter.write_line(
            f"{name:>8}: {b.RESULTS[name]:7.2f} us/call   {base}: {b.RESULTS[base]:6.2f} us/call"
            f"   ratio {b.RESULTS[name] / b.RESULTS[base]:5.1f}x"
        )
