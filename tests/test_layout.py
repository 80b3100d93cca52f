"""The house rules that keep the code easy to change, checked on the source itself.

* No two modules of ``cmd_ipc`` import each other, directly or through others (every import
  counts: module level, inside functions, and under ``TYPE_CHECKING``).
* No module touches private attributes of asyncio's event loop (they differ per loop
  implementation: uvloop has none of them).
* The protocol crate ``rust/core`` is sans-I/O: no ``libc``, no threads, locks or clocks.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "cmd_ipc"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from cmd_ipc import x`` counts as importing
    the submodule ``cmd_ipc.x`` when there is one, else the package)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    found.add(sub)
                elif base in modules:
                    found.add(base)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files} | {"cmd_ipc._core"}
    graph = {_module_name(f): _imports(f, modules) for f in files}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_another_that_imports_it_back() -> None:
    graph = _graph()
    assert "cmd_ipc.registry" in graph and "cmd_ipc._driver" in graph
    # Entry points (cli, demo) may import the package; nothing the package imports may.
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_collaborators_never_import_the_registry() -> None:
    graph = _graph()
    low = [m for m in graph if m.startswith("cmd_ipc._") and m not in ("cmd_ipc._worker",)]
    low += ["cmd_ipc.workers", "cmd_ipc.errors", "cmd_ipc.commands"]
    low += [m for m in graph if m.startswith("cmd_ipc.channels")]
    offenders = {m: graph[m] & {"cmd_ipc.registry", "cmd_ipc"} for m in low}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_private_event_loop_attributes() -> None:
    private = re.compile(r"\bloop\._[a-z]\w*|[\"']_(ready|scheduled|selector)[\"']")
    hits = [
        f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
        for f in sorted(PACKAGE.rglob("*.py"))
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert hits == []


def test_protocol_crate_is_sans_io() -> None:
    core = ROOT / "rust" / "core"
    manifest = (core / "Cargo.toml").read_text()
    deps = manifest.split("[dependencies]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^\s*libc\b", deps, re.M), deps
    banned = re.compile(r"std::(thread|sync|time::Instant|os::fd|fs|net)\b|\bInstant::|\blibc::")
    hits = [
        f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
        for f in sorted((core / "src").rglob("*.rs"))
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if banned.search(line) and not line.lstrip().startswith("//")
    ]
    assert hits == []
