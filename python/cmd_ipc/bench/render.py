"""Output of ``cmd-ipc bench``: the progress bar while it runs (on a terminal only), then the
table and the targets."""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, TextIO

from cmd_ipc.bench.results import (
    BASELINE_OF,
    BASELINES,
    FULL_CALLS,
    IDLE_ROWS,
    LABELS,
    LATENCY_ROWS,
    SHORT,
    Results,
    machine_info,
)

__all__ = ["Progress", "render", "table_rows"]


class Progress:
    """A progress bar on stderr: rich's when rich is installed, else a small one. Drawn only
    when the stream is a terminal: piped to a file or a log, a run writes no progress
    lines."""

    def __init__(self, total: float, enabled: bool, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0.0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.enabled = enabled and self.tty
        self.label = ""
        self._rich: Any = None
        self._task: Any = None
        self._last_label = ""
        if enabled and self.tty:
            with contextlib.suppress(ImportError):
                from rich.console import Console  # type: ignore[import-not-found,unused-ignore]
                from rich.progress import (  # type: ignore[import-not-found,unused-ignore]
                    BarColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                self._rich = Progress(
                    TextColumn("{task.description:<34}"),
                    BarColumn(),
                    TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(),
                    console=Console(file=self.stream),
                    transient=True,
                )
                self._rich.start()
                self._task = self._rich.add_task("starting", total=total)

    def set(self, label: str) -> None:
        self.label = label
        self._draw()

    def advance(self, amount: float) -> None:
        self.done = min(self.total, self.done + amount)
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, description=self.label)
            return
        frac = self.done / self.total if self.total else 1.0
        width = 30
        filled = int(frac * width)
        bar = "#" * filled + "-" * (width - filled)
        line = f"[{bar}] {frac * 100:3.0f}%  {self.label}"
        self.stream.write("\r\x1b[2K" + line)
        self.stream.flush()
        self._last_label = self.label

    def close(self) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.stop()
        else:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


def _fmt_us(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:,.1f}" if v >= 100 else f"{v:.2f}"


def _fmt_rate(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:,.0f}"


def _status(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT met")


def _cell(mets: list[bool | None]) -> str:
    """One status for a row with one or more targets: "met" only if every one is."""
    judged = [m for m in mets if m is not None]
    if not judged:
        return "n/a"
    missed = judged.count(False)
    if not missed:
        return "met"
    if len(mets) == 1:
        return "NOT met"
    return f"NOT met ({missed} of {len(mets)})"


def table_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """The table as text cells: (header, rows)."""
    header = ["row", "p50 µs", "p99 µs", "mean µs", "calls/s", "vs baseline", "target"]
    targets = results.targets()
    by_row: dict[str, list[bool | None]] = {}
    for t in targets:
        for key in t["rows"]:
            by_row.setdefault(key, []).append(t["met"])
    rows: list[list[str]] = []
    for key in LATENCY_ROWS:
        row = results.rows.get(key)
        status = ""
        if key in by_row:
            status = _cell(by_row[key])
        if row is None:
            why = "failed (below)" if key in results.errors else "not measured"
            rows.append([LABELS[key], "-", "-", "-", "-", why, status])
            continue
        ratio = results.ratio(key)
        base = BASELINE_OF.get(key)
        vs = "" if ratio is None or base is None else f"{ratio:.2f}x {SHORT[base]}"
        if key in BASELINES:
            vs = "(baseline)"
        f = row.figures()
        rows.append(
            [
                LABELS[key],
                _fmt_us(f["p50_us"]),
                _fmt_us(f["p99_us"]),
                _fmt_us(f["mean_us"]),
                _fmt_rate(f["calls_per_s"]),
                vs,
                status,
            ]
        )
    for key in IDLE_ROWS:
        idle = results.idle.get(key)
        status = _status(None if idle is None else idle["cpu_percent"] < 1.0)
        if idle is None:
            why = "failed (below)" if key in results.errors else "not measured"
            rows.append([LABELS[key], "-", "-", "-", "-", why, status])
            continue
        cpu = f"{idle['cpu_percent']:.3f}% CPU"
        rows.append([LABELS[key], "", "", "", "", cpu, status])
    return header, rows


class _Plain:
    """Writes to a stream whose encoding may lack "µ" or "→" (replaced then)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        try:
            "µ→".encode(out.encoding or "utf-8")
            self.ok = True
        except (UnicodeEncodeError, LookupError):
            self.ok = False

    def write(self, text: str) -> int:
        if not self.ok:
            text = text.replace("µ", "u").replace("→", "->")
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()

    @property
    def encoding(self) -> str:
        return self.out.encoding or "utf-8"


def render(results: Results, out: TextIO | None = None) -> None:
    """Prints the table and the targets."""
    out = _Plain(out or sys.stdout)  # type: ignore[assignment]
    assert out is not None
    header, rows = table_rows(results)
    cfg = results.config
    title = (
        f"cmd-ipc bench: add(a, b) round trip, {cfg.calls} calls per row"
        f"{', pinned (bench CPU 0, children CPU 1)' if cfg.pin else ', not pinned'}"
        f"{'' if cfg.spin_us is None else f', readers spin {cfg.spin_us} µs'}"
    )
    targets = results.targets()
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=None if out.isatty() else 130)
    if not cfg.judged:
        why = [
            *(["not pinned"] if not cfg.pin else []),
            *(["--quick"] if cfg.quick else []),
            *([f"{cfg.calls} calls a row"] if cfg.calls < FULL_CALLS and not cfg.quick else []),
        ]
        print(
            f"note: this run ({', '.join(why)}) does not judge the targets: only a full "
            "pinned run does (cmd-ipc bench --pin); the statuses below are a preview",
            file=out,
        )
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i in (0, 5, 6) else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    print("", file=out)
    print("targets" + ("" if cfg.judged else " (preview: not judged by this run)") + ":", file=out)
    for t in targets:
        value = t["value"]
        if value is None:
            shown = "not measured"
        elif t["unit"] == "x":
            shown = f"{value:.3f}x"
        elif t["unit"] == "calls/s":
            shown = f"{value:,.0f} calls/s"
        elif t["unit"] == "%":
            shown = f"{value:.3f}%"
        else:
            shown = f"{value:+.2f} µs" if "extra" in t["target"] else f"{value:.2f} µs"
        detail = f" ({t['detail']})" if t["detail"] else ""
        print(f"  [{_status(t['met']):>7}] {t['target']}: {shown}{detail}", file=out)
    noise = results.machine.get("noise")
    if noise and noise.get("cpus"):
        per_cpu = ", ".join(
            f"CPU {cpu}: {v['gaps_per_s']:,.0f}/s (longest {v['longest_us']:,.0f} µs)"
            for cpu, v in noise["cpus"].items()
        )
        print(
            f"\n  machine noise (pauses > {noise['threshold_us']:g} µs of a bare loop, "
            f"{noise['seconds_per_cpu']:g} s per CPU): {per_cpu}",
            file=out,
        )
    notes = [
        f"{LABELS[k]}: {results.rows[k].note}"
        for k in LATENCY_ROWS
        if k in results.rows and results.rows[k].note
    ]
    if notes:
        print("", file=out)
        for n in notes:
            print(f"  note: {n}", file=out)
    if results.errors:
        print("", file=out)
        for key, err in results.errors.items():
            print(f"  error in {LABELS.get(key, key)}: {err}", file=out)
    m = results.machine or machine_info()
    print(
        f"\n{m['cpu_count']} CPUs ({m['cpu_model']}), Python {m['python']}, "
        f"{results.started}, {results.duration_s:.1f} s",
        file=out,
    )
