"""The README's quick start runs as written, and its two commands are what CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_quick_start_runs_as_written() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "README has no python block"
    out = subprocess.run(
        [sys.executable, "-c", blocks[0]], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "3"
    assert lines[1] == "hello, w"
    assert lines[2] == "event {'id': 7}"
    assert lines[3].startswith("not_found ") and "did you mean calc.add" in lines[3]
    assert "'worker'" in lines[4]


def test_remote_example_runs_as_written() -> None:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "HTTPChannel(" in b]
    assert len(blocks) == 1
    out = subprocess.run(
        [sys.executable, "-c", blocks[0]], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["3"]


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test   #" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nmake test\n" in ci


def test_demo_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cmd_ipc", "demo"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "sub calls calc.add" in out.stdout and "-> 5" in out.stdout
    assert "event demo.ping delivered to: main:1, sub:1, worker:1" in out.stdout
