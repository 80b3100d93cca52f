"""The README and docs/*.md never wait with ``sleep()`` for something to be ready: they await
the event the API gives (``await registry.ready()``, ``await worker.ready()``,
``wait_listed``, an ``asyncio.Event`` a listener or handler sets...).

A ``sleep(...)`` is allowed only as the work of a command handler (a function decorated
with ``@<registry>.command(...)``: a slow command, on purpose). Code the blocks write to
files (a module in a string) is checked too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _is_handler(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "command":
            return True
    return False


def sleeps_for_readiness(code: str) -> list[str]:
    """The ``sleep(...)`` calls of ``code`` that are not a handler's work, as source lines."""
    lines = code.splitlines()
    found: list[str] = []

    def visit(node: ast.AST, in_handler: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_handler = _is_handler(node)
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "sleep" and not in_handler:
                found.append(lines[node.lineno - 1].strip())
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and "sleep(" in node.value
        ):
            found.extend(sleeps_for_readiness(node.value))  # a module written to a file
        for child in ast.iter_child_nodes(node):
            visit(child, in_handler)

    try:
        tree = ast.parse(code)
    except SyntaxError:
        # Not Python (a string that only mentions sleep): a plain look.
        return [line.strip() for line in lines if "sleep(" in line]
    visit(tree, False)
    return found


def test_docs_and_readme_never_sleep_for_readiness() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    offenders = []
    blocks = 0
    for page in pages:
        for i, m in enumerate(FENCE.finditer(page.read_text())):
            blocks += 1
            for line in sleeps_for_readiness(m.group(1)):
                offenders.append(f"{page.relative_to(ROOT)} block {i}: {line}")
    assert blocks > 10
    assert offenders == []


def test_the_check_finds_a_readiness_sleep() -> None:
    code = '''
import asyncio, time

async def main(registry):
    @registry.command("slow")
    async def slow():
        await asyncio.sleep(10)  # the handler's work: fine

    await asyncio.sleep(0.01)  # a wait for readiness
    text = """
def target(registry):
    time.sleep(0.1)
"""
    while registry.route_of("x") is None:
        time.sleep(0.01)
'''
    assert sleeps_for_readiness(code) == [
        "await asyncio.sleep(0.01)  # a wait for readiness",
        "time.sleep(0.1)",
        "time.sleep(0.01)",
    ]
