"""``cmd-ipc bench`` end to end, small: every row is measured and reported (never a speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cmd_ipc.bench import (
    BASE_AIOHTTP,
    GRPC_CHANNEL,
    HTTP_CHANNEL,
    IDLE_ROWS,
    LABELS,
    LATENCY_ROWS,
    WS_CHANNEL,
)
from cmd_ipc.bench.results import BASE_NATS, NATS_CHANNEL

#: Rows timed with --remote-calls calls (the NATS rows too).
REMOTE_ROWS = (HTTP_CHANNEL, WS_CHANNEL, GRPC_CHANNEL, BASE_AIOHTTP, NATS_CHANNEL, BASE_NATS)

CALLS = 300
PIPELINED = 2000
REMOTE = 100


def test_bench_quick_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "cmd_ipc", "bench", "--quick", "--calls", str(CALLS),
         "--pipelined-calls", str(PIPELINED), "--idle-seconds", "0.5", "--remote-calls",
         str(REMOTE), "--json", str(out)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=50,
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())

    assert set(data["rows"]) == set(LATENCY_ROWS), data.get("errors")
    assert not data["errors"]
    for key, row in data["rows"].items():
        expected = {
            "pipelined_shm": PIPELINED,
            "pipelined_await_shm": PIPELINED,
            **dict.fromkeys(REMOTE_ROWS, REMOTE),
            # The pool rows: calls of about 1 ms each, per member.
            "pool_one_member": max(100, CALLS // 20),
            "pool_two_members": 2 * max(100, CALLS // 20),
        }.get(key, CALLS)
        assert row["n"] == expected, key
        for figure in ("p50_us", "p99_us", "mean_us", "calls_per_s"):
            assert row[figure] > 0, (key, figure, row)
        assert row["p99_us"] >= row["p50_us"], key
        if row["baseline"] is not None:
            assert row["ratio"] > 0, key
    assert set(data["idle"]) == set(IDLE_ROWS)
    for key, idle in data["idle"].items():
        assert idle["cpu_percent"] >= 0, key
        assert idle["window_s"] > 0, key
    assert data["machine"]["cpu_count"] >= 1
    noise = data["machine"]["noise"]
    assert noise["cpus"] and all(v["gaps_per_s"] >= 0 for v in noise["cpus"].values())
    assert "machine noise (pauses > 5 µs" in proc.stdout
    assert data["machine"]["python"] == sys.version.split()[0]
    assert data["date"]
    assert data["config"]["calls"] == CALLS
    assert data["targets"]
    for target in data["targets"]:
        assert target["met"] in (True, False), target

    # The table went to stdout, with each row and its status against the targets.
    for key in (*LATENCY_ROWS, *IDLE_ROWS):
        assert LABELS[key] in proc.stdout, key
    assert "p50 µs" in proc.stdout
    assert "targets" in proc.stdout
    # Output for users: no internal references, one status per target cell, and a quick
    # unpinned run says that it does not judge the targets.
    assert "issue" not in proc.stdout
    assert "met / " not in proc.stdout
    assert proc.stdout.startswith("note: this run (not pinned, --quick) does not judge")
    assert data["judged"] is False
    # stderr is not a terminal here: no progress bar lines (nor anything else).
    assert "%" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
