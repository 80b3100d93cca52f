"""Typed client stubs: a Python module generated from the commands a registry advertises.

``cmd-ipc stubs TARGET -o client.py`` (or :func:`generate`) turns each command's JSON Schemas
into ``TypedDict`` types and writes, per command, one typed ``async`` function and a blocking
twin that call it through a :class:`~cmd_ipc.CommandRegistry`::

    async def users_get(registry: CommandRegistry, *, user_id: int, verbose: bool = False) -> User
    def users_get_sync(registry: CommandRegistry, *, user_id: int, verbose: bool = False) -> User

Results are typed as what actually arrives: JSON-compatible data (a pydantic model returned
by a handler arrives as a dict, so it is typed as a ``TypedDict``). The generated module is
checked with ``mypy --strict`` by the project's tests. Supported schema keywords: ``type``
(and lists of types), ``properties``/``required``, ``additionalProperties``, ``items``,
``enum``, ``const``, ``anyOf``/``oneOf``, single-member ``allOf``, ``$ref`` to ``$defs`` or
``definitions``, ``default``; anything else is typed ``Any``.
"""

from __future__ import annotations

import json
import keyword
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["generate"]

#: Names the generated module uses itself: no function or parameter may take them.
_RESERVED = frozenset(
    {
        "Any", "Literal", "Optional", "Union", "cast", "TypeAlias", "NotRequired", "TypedDict",
        "CommandRegistry", "list", "dict", "str", "int", "float", "bool", "registry",
        "timeout", "request",
    }
)  # fmt: skip

_SCALARS = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "None"}


def _camel(text: str) -> str:
    parts = re.split(r"[^0-9A-Za-z]+", text)
    name = "".join(p[:1].upper() + p[1:] for p in parts if p)
    if not name or name[0].isdigit():
        name = "T" + name
    return name


def _snake(text: str) -> str:
    name = re.sub(r"[^0-9A-Za-z]+", "_", text)
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower().strip("_")
    if not name or name[0].isdigit():
        name = "cmd_" + name
    if keyword.iskeyword(name):
        name += "_"
    return name


def _identifier(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


class _Module:
    """Collects the type definitions of one generated module."""

    def __init__(self) -> None:
        self.defs: list[str] = []
        self.names: set[str] = {"CommandRegistry", "Any", "Literal", "Union", "Optional"}
        self.refs: dict[tuple[str, str], str] = {}
        #: TypedDicts already defined, by their schema: one class per shape.
        self.shapes: dict[str, str] = {}

    def unique(self, base: str) -> str:
        name, n = base, 2
        while name in self.names:
            name, n = f"{base}{n}", n + 1
        self.names.add(name)
        return name

    def type_of(self, schema: Any, hint: str, root: Mapping[str, Any]) -> str:
        """The Python type of ``schema`` (defining TypedDicts as needed, named from ``hint``)."""
        if schema is True or not isinstance(schema, Mapping) or not schema:
            return "Any"
        ref = schema.get("$ref")
        if isinstance(ref, str):
            return self._ref(ref, root)
        if "const" in schema:
            return self._literal([schema["const"]])
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return self._literal(enum)
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                return self._union(
                    [self.type_of(o, f"{hint}{i + 1}", root) for i, o in enumerate(options)]
                )
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and len(all_of) == 1:
            return self.type_of(all_of[0], hint, root)
        kind = schema.get("type")
        if isinstance(kind, list):
            return self._union([self.type_of({**schema, "type": k}, hint, root) for k in kind])
        if kind in _SCALARS:
            return _SCALARS[kind]
        if kind == "array":
            return f"list[{self.type_of(schema.get('items'), hint + 'Item', root)}]"
        if kind == "object" or "properties" in schema:
            props = schema.get("properties")
            if isinstance(props, Mapping) and props:
                return self._typed_dict(schema, hint, root)
            extra = schema.get("additionalProperties")
            value = (
                self.type_of(extra, hint + "Value", root) if isinstance(extra, Mapping) else "Any"
            )
            return f"dict[str, {value}]"
        return "Any"

    def _ref(self, ref: str, root: Mapping[str, Any]) -> str:
        m = re.fullmatch(r"#/(\$defs|definitions)/(.+)", ref)
        if m is None:
            return "Any"
        target = root.get(m.group(1), {}).get(m.group(2))
        if not isinstance(target, Mapping):
            return "Any"
        # The same model under the same name (a request and a response sharing it) is
        # defined once.
        key = (m.group(2), json.dumps(target, sort_keys=True, default=str))
        if key in self.refs:
            return self.refs[key]
        shape = key[1]
        if shape in self.shapes:
            self.refs[key] = self.shapes[shape]
            return self.shapes[shape]
        name = self.unique(_camel(m.group(2)))
        self.refs[key] = name  # before recursing: a model may refer to itself
        props = target.get("properties")
        if isinstance(props, Mapping) and props and "$ref" not in target:
            self._typed_dict(target, name, root, name=name)
        else:
            # A string alias: it may name itself (recursive schemas) or types defined below.
            self.defs.append(f"{name}: TypeAlias = {self.type_of(target, name, root)!r}")
        return name

    def _literal(self, values: Sequence[Any]) -> str:
        lits = [v for v in values if isinstance(v, (str, int, bool)) or v is None]
        if len(lits) != len(values):
            return "Any"
        return "Literal[" + ", ".join(repr(v) for v in lits) + "]"

    @staticmethod
    def _union(types: list[str]) -> str:
        seen: list[str] = []
        for t in types:
            if t not in seen:
                seen.append(t)
        if "Any" in seen:
            return "Any"
        if len(seen) == 1:
            return seen[0]
        if "None" in seen:
            rest = [t for t in seen if t != "None"]
            inner = rest[0] if len(rest) == 1 else "Union[" + ", ".join(rest) + "]"
            return f"Optional[{inner}]"
        return "Union[" + ", ".join(seen) + "]"

    def _typed_dict(
        self,
        schema: Mapping[str, Any],
        hint: str,
        root: Mapping[str, Any],
        name: str | None = None,
    ) -> str:
        shape = json.dumps(schema, sort_keys=True, default=str)
        if name is None:
            if shape in self.shapes:
                return self.shapes[shape]
            title = schema.get("title")
            name = self.unique(_camel(title) if isinstance(title, str) and title else hint)
        self.shapes[shape] = name
        required = set(schema.get("required") or ())
        fields: list[tuple[str, str]] = []
        for prop, sub in schema["properties"].items():
            t = self.type_of(sub, name + _camel(prop), root)
            fields.append((prop, t if prop in required else f"NotRequired[{t}]"))
        doc = schema.get("description")
        if all(_identifier(p) for p, _ in fields):
            lines = [f"class {name}(TypedDict):"]
            if isinstance(doc, str) and doc:
                lines.append(f"    {_docstring(doc)}")
            lines += [f"    {p}: {t}" for p, t in fields]
        else:
            # Field types quoted: evaluated at import, they may name types defined below.
            body = ", ".join(f"{p!r}: {t!r}" for p, t in fields)
            lines = [f"{name} = TypedDict({name!r}, {{{body}}})"]
        self.defs.append("\n".join(lines))
        return name


def _docstring(text: str) -> str:
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"""{text}"""'


def _py_default(value: Any) -> str | None:
    """A Python literal for a JSON default, when one is simple enough to repeat."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return None


def generate(commands: Sequence[Mapping[str, Any]], *, source: str = "") -> str:
    """Writes the source of a typed client module for ``commands``.

    Args:
        commands: Command definitions as :meth:`CommandRegistry.list_commands` returns them
            (``id``, optional ``description`` and ``schema``). Private ids are skipped.
        source: Where the commands came from, for the module docstring.

    Returns:
        Python source; importing it needs only ``cmd_ipc`` (and ``typing_extensions``).
    """
    mod = _Module()
    funcs: list[str] = []
    names: list[str] = []
    used: set[str] = set()
    for cmd in sorted(commands, key=lambda c: str(c.get("id", ""))):
        cid = cmd.get("id")
        if not isinstance(cid, str) or not cid or cid.startswith("_"):
            continue
        fname = _snake(cid)
        # The async function and its `_sync` twin: neither may collide with another
        # command's, a type, or a name the module uses.
        while {fname, fname + "_sync"} & (used | mod.names | _RESERVED):
            fname += "_"
        used.update((fname, fname + "_sync"))
        schema = cmd.get("schema") or {}
        req = schema.get("request") if isinstance(schema, Mapping) else None
        resp = schema.get("response") if isinstance(schema, Mapping) else None
        base = _camel(cid)
        result = mod.type_of(resp, base + "Response", resp) if isinstance(resp, Mapping) else "Any"
        params, build = _parameters(mod, req, base + "Request")
        doc = cmd.get("description")
        doc_line = doc if isinstance(doc, str) and doc else f"Calls ``{cid}``."
        parts = ["registry: CommandRegistry", "*", *params, "timeout: Optional[float] = None"]
        sig = ", ".join(parts)
        if len(sig) + len(fname) + len(result) > 70:
            sig = "\n" + "".join(f"    {part},\n" for part in parts)
        body = "".join(line + "\n" for line in build)
        for prefix, suffix, call in (
            ("async def", "", "await registry.execute_command"),
            ("def", "_sync", "registry.execute_command_sync"),
        ):
            funcs.append(
                f"{prefix} {fname}{suffix}({sig}) -> {result}:\n"
                f"    {_docstring(doc_line)}\n"
                f"{body}"
                f"    return cast({result!r}, {call}({cid!r}, request, timeout=timeout))"
            )
            names.append(fname + suffix)
    code = "\n\n\n".join([*mod.defs, *funcs])
    typing_names = [
        n for n in ("Any", "Literal", "Optional", "Union") if re.search(rf"\b{n}\b", code)
    ]
    ext = [n for n in ("NotRequired", "TypeAlias", "TypedDict") if re.search(rf"\b{n}\b", code)]
    doc = _docstring(
        f"Typed client for the commands of {source or 'a cmd-ipc registry'}.\n\n"
        "Generated by ``cmd-ipc stubs``; do not edit. Each command has an async function and a\n"
        "blocking ``_sync`` twin; both take the registry that reaches the command."
    )
    header = [
        doc,
        "",
        "from __future__ import annotations",
        "",
        "from typing import " + ", ".join([*typing_names, "cast"]),
        "",
        *([f"from typing_extensions import {', '.join(ext)}", ""] if ext else []),
        "from cmd_ipc import CommandRegistry",
        "",
        "__all__ = [",
        *(f"    {n!r}," for n in sorted(names)),
        "]",
    ]
    return "\n".join(header) + "\n\n\n" + code + "\n"


def _parameters(mod: _Module, req: Any, hint: str) -> tuple[list[str], list[str]]:
    """Keyword parameters for a request schema, and the lines that build ``request``."""
    props = req.get("properties") if isinstance(req, Mapping) else None
    if not isinstance(req, Mapping) or (req.get("type") == "object" and not props):
        return ["request: Optional[dict[str, Any]] = None"], []
    if (
        not isinstance(props, Mapping)
        or not props
        or not all(_identifier(p) and p not in _RESERVED for p in props)
    ):
        # Fields that cannot be keyword parameters: the request is one typed mapping.
        return [f"request: {mod.type_of(req, hint, req)}"], []
    required = set(req.get("required") or ())
    params: list[str] = []
    optional: list[str] = []
    build = ["    request: dict[str, Any] = {}"]
    for prop, sub in props.items():
        t = mod.type_of(sub, hint + _camel(prop), req)
        if prop in required:
            params.append(f"{prop}: {t}")
            build.append(f"    request[{prop!r}] = {prop}")
            continue
        has_default = isinstance(sub, Mapping) and "default" in sub
        default = _py_default(sub["default"]) if has_default else None
        if default is not None:
            if default == "None" and not (t == "Any" or t.startswith("Optional[")):
                t = f"Optional[{t}]"
            optional.append(f"{prop}: {t} = {default}")
            build.append(f"    request[{prop!r}] = {prop}")
        else:
            optional.append(f"{prop}: Optional[{t}] = None")
            build.append(f"    if {prop} is not None:")
            build.append(f"        request[{prop!r}] = {prop}")
    return params + optional, build
