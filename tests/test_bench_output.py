"""What ``cmd-ipc bench`` shows its users: no internal references, one status per target
cell, rows under load labelled so, no progress lines when not on a terminal, and a run that
does not judge the targets says so first."""

from __future__ import annotations

import io

from cmd_ipc.bench import FULL_CALLS, LABELS, PIPELINED_AWAIT, BenchConfig, Results
from cmd_ipc.bench.render import Progress, _cell, render, table_rows


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_drawn_on_a_terminal_only() -> None:
    piped = io.StringIO()
    bar = Progress(3, True, piped)
    bar.set("a row")
    bar.advance(1)
    bar.close()
    assert piped.getvalue() == ""
    terminal = _Terminal()
    bar = Progress(3, True, terminal)
    bar.set("a row")
    bar.advance(1)
    bar.close()
    assert terminal.getvalue() != ""


def test_one_status_per_target_cell() -> None:
    assert _cell([True]) == _cell([True, True]) == "met"
    assert _cell([False]) == "NOT met"
    assert _cell([True, False]) == "NOT met (1 of 2)"
    assert _cell([None, None]) == "n/a"


def test_rows_under_load_say_so_in_their_label() -> None:
    assert LABELS[PIPELINED_AWAIT].endswith("under load")


def _rendered(config: BenchConfig) -> str:
    out = io.StringIO()
    render(Results(config, started="now", machine={"cpu_count": 2, "cpu_model": "x",
                                                   "python": "3"}), out)  # fmt: skip
    return out.getvalue()


def test_only_a_full_pinned_run_judges_the_targets() -> None:
    judged = BenchConfig(calls=FULL_CALLS, pin=True)
    assert judged.judged
    text = _rendered(judged)
    assert "does not judge" not in text and "\ntargets:\n" in text
    for config, why in (
        (BenchConfig(calls=FULL_CALLS), "not pinned"),
        (BenchConfig(calls=2000, pin=True, quick=True), "--quick"),
        (BenchConfig(calls=500, pin=True), "500 calls a row"),
    ):
        assert not config.judged
        text = _rendered(config)
        first = text.splitlines()[0]
        assert first.startswith(f"note: this run ({why}) does not judge the targets"), first
        assert "targets (preview: not judged by this run):" in text
    assert "issue" not in text
    _, rows = table_rows(Results(BenchConfig()))
    assert all(" / " not in row[-1] for row in rows)
