"""Every ```python block of docs/*.md runs as written, and prints what it says it prints.

Each block runs in a fresh interpreter (``sys.executable -c``, cwd a temporary directory,
60 s at most) and must exit with status 0. A block may be kept out only with the comment
``<!-- no-run: reason -->`` on the line just before its opening fence, and at most
``MAX_NO_RUN`` blocks may be.

Expected output: a comment ``# prints: TEXT`` (at the end of a code line or on a line of its
own) says that the block's stdout has a line equal to ``TEXT``; a ``TEXT`` ending in ``...``
matches any line starting with what precedes the dots. The expected lines must appear in
the order of their comments (other lines may come between them). Every runnable block must
carry at least one such comment, except those listed in ``UNCHECKED``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

#: Blocks that may be marked ``<!-- no-run: ... -->``, in all the pages together.
MAX_NO_RUN = 0
#: Runnable blocks whose output is not checked (no ``# prints:`` comment), by test id.
UNCHECKED: dict[str, str] = {}
#: Pages that must exist, and how many python blocks each must have at least.
PAGES = {
    "README.md": 0,
    "concepts.md": 2,
    "channels.md": 2,
    "workers.md": 3,
    "pools.md": 1,
    "mesh.md": 3,
    "errors.md": 1,
    "schemas.md": 3,
    "performance.md": 1,
    "remote.md": 3,
    "mcp.md": 4,
    "limits.md": 0,
}

FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NO_RUN = re.compile(r"^<!-- no-run: \S.*-->$")
PRINTS = re.compile(r"#\s*prints:\s?(.*?)\s*$")


@dataclass
class Block:
    page: str
    index: int
    code: str
    no_run: bool

    @property
    def id(self) -> str:
        return f"{self.page}:{self.index}"

    def expected(self) -> list[str]:
        return [m.group(1) for line in self.code.splitlines() if (m := PRINTS.search(line))]


def collect() -> list[Block]:
    blocks = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        for i, m in enumerate(FENCE.finditer(text)):
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            blocks.append(Block(page.name, i, m.group(1), bool(NO_RUN.match(before))))
    return blocks


BLOCKS = collect()


def _param(b: Block) -> object:
    return pytest.param(b, id=b.id)


def matches(expected: str, line: str) -> bool:
    if expected.endswith("..."):
        return line.startswith(expected[:-3])
    return line == expected


def missing_output(expected: list[str], stdout: str) -> str | None:
    """The first expected line not found (in order) in ``stdout``, or None."""
    lines = iter(line.rstrip() for line in stdout.splitlines())
    for want in expected:
        if not any(matches(want, line) for line in lines):
            return want
    return None


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS if not b.no_run])
def test_block_runs(block: Block, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, f"{block.id} failed:\n{out.stdout}\n{out.stderr}"
    missing = missing_output(block.expected(), out.stdout)
    assert missing is None, (
        f"{block.id}: expected a line {missing!r} (in order) in its output:\n"
        f"{out.stdout}\n{out.stderr}"
    )


def test_pages_and_markers() -> None:
    names = {p.name for p in DOCS.glob("*.md")}
    for page, least in PAGES.items():
        assert page in names, f"docs/{page} is missing"
        assert sum(b.page == page for b in BLOCKS) >= least, f"docs/{page}: too few blocks"
    no_run = [b.id for b in BLOCKS if b.no_run]
    assert len(no_run) <= MAX_NO_RUN, f"too many blocks marked no-run: {no_run}"
    for b in BLOCKS:
        if b.no_run:
            continue
        if b.id in UNCHECKED:
            assert not b.expected(), f"{b.id} is checked now: remove it from UNCHECKED"
        else:
            assert b.expected(), f"{b.id} has no '# prints:' comment"
    # The index links every page.
    index = (DOCS / "README.md").read_text()
    for page in names - {"README.md"}:
        assert f"]({page})" in index, f"docs/README.md does not link {page}"


def test_the_checker_can_fail() -> None:
    assert missing_output(["a", "c..."], "a\nb\ncd\n") is None
    assert missing_output(["c", "a"], "a\nc\n") == "a"  # order matters
    assert missing_output(["x"], "xy\n") == "x"  # whole lines unless "..."
    assert PRINTS.search("print(1)  # prints: 1").group(1) == "1"  # type: ignore[union-attr]
    assert NO_RUN.match("<!-- no-run: needs a GPU -->")
    assert not NO_RUN.match("<!-- no-run: -->")
