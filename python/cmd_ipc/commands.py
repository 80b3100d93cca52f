"""Typed commands: JSON Schemas derived from type hints, and validation at the boundary.

A handler written as an ordinary typed function is described and guarded by pydantic v2::

    @registry.command("users.get")
    def get(user_id: int, verbose: bool = False) -> User: ...

* **Request.** The keyword parameters become the fields of an object (required unless they
  have a default; unannotated ones accept anything; unexpected fields are refused). Its JSON
  Schema is advertised as ``schema.request``. An incoming request is validated (pydantic's lax
  mode: ``"3"`` becomes ``3``, a dict becomes a model) before the handler runs; one that does
  not match is answered ``invalid_request`` with every field error (``path: message``) and the
  handler never runs. The whole-request form ``def h(request: User, /)`` is validated against
  its annotation; unannotated, or with ``**kwargs``, there is no request schema and no check.
* **Response.** The return annotation (of an ``async def``, the awaited type) gives
  ``schema.response``. The result is validated against it (lax: a returned dict becomes the
  declared model, a tuple a list; an instance of the declared model passes as it is) and
  serialised through the same adapter, in pydantic's *python* mode: a returned model or
  dataclass arrives as a dict. A result that does not fit is answered ``internal_error``
  naming the command and the mismatch (it is the handler's bug, not the caller's).
* **Wire values.** Python mode keeps ``bytes`` as ``bytes`` (msgpack carries them natively,
  which pydantic's JSON mode would turn into text). What msgpack cannot carry is converted by
  :func:`to_wire`, the encoder's fallback, the way pydantic's JSON mode does: ``datetime`` and
  ``UUID`` to strings, enums to their values, sets to lists, models and dataclasses to dicts.
  The fallback runs for every request, result and event payload, validated or not, and only
  for those values: plain data never reaches it.

Which handlers are typed:

* ``@registry.command(...)`` and the module-level :func:`command` mark: on by default,
  ``validate=False`` turns it off for one command;
* ``registry.register_command(id, handler)``: off unless the handler carries the :func:`command`
  mark or ``validate=True`` is passed (an undecorated handler keeps the plain, untyped path);
* with validation off nothing is derived and no pydantic code runs per call; a schema passed as
  ``schema=`` is advertised as given (it is documentation, never used to validate). So a schema
  derived from the type hints is never merely decorative: it is what the handler enforces.

An explicit ``schema=`` wins over the derived one, key by key: ``schema={"response": {...}}``
replaces the derived response schema and keeps the derived request schema.

Events: ``@registry.on(event_id)`` (and ``add_event_listener(..., validate=True)``) validates
and converts the payload to the annotation of the listener's first parameter; a payload that
does not fit is logged as a warning (logger ``cmd_ipc``) and that listener is not called.
``emit_event`` takes models and dataclasses as payloads (through :func:`to_wire`).

Type hints are resolved against the handler's module and the local names of the code that
registers it, so models defined inside a function work too. pydantic is imported on first use:
a process whose commands are all untyped never loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import inspect
import re
import sys
import typing
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from cmd_ipc.errors import InvalidRequestError

if TYPE_CHECKING:
    from pydantic import TypeAdapter, ValidationError

# The public names; the others serve CommandRegistry.
__all__ = ["CommandMark", "command", "describe_errors", "mark_of", "to_wire"]

F = TypeVar("F", bound=Callable[..., Any])

#: The attribute :func:`command` sets on a function.
_MARK = "__cmd_ipc_command__"
#: At most this many field errors are spelled out in a message.
_MAX_ERRORS = 10
#: Inputs longer than this are shortened in error messages.
_MAX_INPUT = 60


# ---------------------------------------------------------------------------- the mark


@dataclass(frozen=True)
class CommandMark:
    """What :func:`command` records on a function (read by ``register_service``)."""

    command_id: str
    description: str | None = None
    schema: Mapping[str, Any] | None = None
    validate: bool = True


def command(
    command_id: str,
    *,
    description: str | None = None,
    schema: Mapping[str, Any] | None = None,
    validate: bool = True,
) -> Callable[[F], F]:
    """Marks a function, usually a method, as the handler of ``command_id``.

    Nothing is registered here: ``await registry.register_service(obj)`` registers every
    marked method of ``obj`` bound to it (``self`` is not part of the request), and
    ``registry.register_command(id, fn)`` honours the mark of a marked function.

    Args:
        command_id: Command id, e.g. ``"math.add"``.
        description: Human description, advertised to peers.
        schema: Explicit ``{"request": ..., "response": ...}`` JSON Schemas; each key given
            replaces the one derived from the type hints.
        validate: Derive schemas from the type hints and validate requests and results
            (the default); ``False`` registers the handler untyped.

    Returns:
        The decorator, which returns the function unchanged.

    Example:
        >>> from cmd_ipc import command
        >>> class Maths:
        ...     @command("math.add", description="Adds two numbers")
        ...     def add(self, a: int, b: int) -> int:
        ...         return a + b
        >>> Maths().add(1, 2)
        3
    """
    if not isinstance(command_id, str) or not command_id:
        raise ValueError("a command id must be a non-empty string")
    mark = CommandMark(command_id, description, schema, validate)

    def decorator(fn: F) -> F:
        setattr(getattr(fn, "__func__", fn), _MARK, mark)
        return fn

    return decorator


def mark_of(fn: Any) -> CommandMark | None:
    """The :func:`command` mark of a function or method, if it has one."""
    mark = getattr(getattr(fn, "__func__", fn), _MARK, None)
    return mark if isinstance(mark, CommandMark) else None


def service_commands(service: object) -> list[tuple[CommandMark, Callable[..., Any]]]:
    """The marked methods of ``service``, bound to it, subclasses first.

    A method overridden without the mark in a subclass is not a command.
    """
    seen: set[str] = set()
    out: list[tuple[CommandMark, Callable[..., Any]]] = []
    for klass in type(service).__mro__:
        for name, value in vars(klass).items():
            if name in seen:
                continue
            seen.add(name)
            mark = mark_of(value)
            if mark is not None:
                out.append((mark, getattr(service, name)))
    return out


# ---------------------------------------------------------------------------- registration


@dataclass
class Boundary:
    """What a typed command checks and converts: used by the registry on every call.

    Attributes:
        check: Validates a decoded request (``None`` for no request) and returns the handler's
            keyword arguments (a dict) or, for the whole-request form, its one argument;
            raises :class:`InvalidRequestError`. ``None``: nothing to check.
        dump: Serialises a result to msgpack-ready data; raises ``ValueError`` if it does not
            fit the return annotation. ``None``: the result is sent as it is.
    """

    check: Callable[[Any], Any] | None
    dump: Callable[[Any], Any] | None


@dataclass
class Prepared:
    """A handler ready to register: its boundary and what is advertised."""

    boundary: Boundary | None
    description: str | None
    schema: dict[str, Any] | None


def prepare(
    command_id: str,
    fn: Any,
    *,
    description: str | None = None,
    schema: Mapping[str, Any] | None = None,
    validate: bool | None = None,
    localns: Mapping[str, Any] | None = None,
) -> Prepared:
    """Derives what a command advertises and checks (see the module docstring for the rules).

    Args:
        validate: ``True``/``False``; ``None`` follows the :func:`command` mark of ``fn``
            (off without one).
        localns: Local names for resolving string annotations.

    Raises:
        TypeError: The type hints cannot be resolved or pydantic cannot describe them.
    """
    mark = mark_of(fn)
    if mark is not None:
        description = mark.description if description is None else description
        schema = mark.schema if schema is None else schema
        validate = mark.validate if validate is None else validate
    explicit = dict(schema) if schema is not None else None
    if not validate or not callable(fn):
        return Prepared(None, description, explicit)
    derived, boundary = _derive(command_id, fn, localns)
    merged = {**derived, **(explicit or {})}
    merged = {k: v for k, v in merged.items() if v is not None}
    return Prepared(boundary, description, merged or None)


def caller_locals(depth: int = 2) -> dict[str, Any]:
    """The local names of a calling frame: ``depth=2`` is the caller of this function's caller
    (empty at module level, where the handler's module globals already serve)."""
    try:
        frame = sys._getframe(depth)
    except ValueError:
        return {}
    if frame.f_locals is frame.f_globals:
        return {}
    return dict(frame.f_locals)


def _derive(
    command_id: str, fn: Callable[..., Any], localns: Mapping[str, Any] | None
) -> tuple[dict[str, Any], Boundary]:
    sig = _signature(fn, localns, f"the handler of {command_id!r}")
    schema: dict[str, Any] = {}
    check = dump = None
    if sig is None:
        return schema, Boundary(None, None)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    kinds = {p.kind for p in params}
    if len(params) == 1 and params[0].kind is inspect.Parameter.POSITIONAL_ONLY:
        # The whole-request form: typed only if annotated.
        ann = params[0].annotation
        if _is_typed(ann):
            adapter = _adapter(ann, f"the request of {command_id!r}")
            schema["request"] = _json_schema(
                adapter, "validation", f"the request of {command_id!r}"
            )
            check = _request_check(command_id, adapter)
    elif inspect.Parameter.VAR_KEYWORD in kinds:
        pass  # takes any field: nothing to describe or check
    elif inspect.Parameter.POSITIONAL_ONLY in kinds:
        names = ", ".join(p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_ONLY)
        raise TypeError(
            f"the handler of {command_id!r} has positional-only parameters ({names}): request "
            "fields are passed by name; use ordinary parameters, or one positional-only "
            "parameter for the whole request"
        )
    else:
        adapter, schema["request"] = _fields(command_id, params)
        check = _fields_check(command_id, adapter, frozenset(p.name for p in params))
    ret = _awaited(sig.return_annotation)
    if _is_typed(ret):
        what = f"the return type of {command_id!r}"
        adapter = _adapter(ret, what)
        schema["response"] = _json_schema(adapter, "serialization", what)
        dump = _result_dump(adapter, _type_name(ret))
    return schema, Boundary(check, dump)


def _fields(
    command_id: str, params: list[inspect.Parameter]
) -> tuple[TypeAdapter[Any], dict[str, Any]]:
    """The request object of a handler taking its fields as keyword arguments: a TypedDict
    (any parameter name works as a key, and a missing optional field is left to the handler's
    own default).

    Unexpected fields are refused by :func:`_fields_check`, not by ``extra="forbid"``: that
    config would also apply to the dataclasses and TypedDicts nested in the fields.
    """
    from pydantic_core import to_jsonable_python
    from typing_extensions import NotRequired, TypedDict

    fields: dict[str, Any] = {}
    for p in params:
        ann = p.annotation if p.annotation is not inspect.Parameter.empty else Any
        fields[p.name] = ann if p.default is inspect.Parameter.empty else NotRequired[ann]
    title = "".join(w[:1].upper() + w[1:] for w in re.split(r"[^0-9A-Za-z]+", command_id))
    td = TypedDict(f"{title}Request", fields)  # type: ignore[misc]
    what = f"the request of {command_id!r}"
    try:
        adapter = _adapter(td, what)
        schema = _json_schema(adapter, "validation", what)
    except TypeError:
        for p in params:  # name the parameter at fault
            if p.annotation is not inspect.Parameter.empty:
                _json_schema(
                    _adapter(p.annotation, f"parameter {p.name!r} of {command_id!r}"),
                    "validation",
                    f"parameter {p.name!r} of {command_id!r}",
                )
        raise
    schema["additionalProperties"] = False
    props = schema.get("properties", {})
    for p in params:
        if p.default is not inspect.Parameter.empty and p.name in props:
            # A default JSON cannot show is simply not advertised.
            with contextlib.suppress(Exception):
                props[p.name]["default"] = to_jsonable_python(p.default)
    return adapter, schema


def _fields_check(
    command_id: str, adapter: TypeAdapter[Any], names: frozenset[str]
) -> Callable[[Any], Any]:
    from pydantic import ValidationError

    validate = adapter.validator.validate_python

    def check(request: Any) -> Any:
        if request is None:
            request = {}
        try:
            kwargs = validate(request)
        except ValidationError as e:
            errors = e.errors(include_url=False, include_context=False)
        else:
            if len(kwargs) == len(request):  # the common case: no unexpected field
                return kwargs
            errors = []
        if isinstance(request, dict):
            errors += [_extra_error(k, v) for k, v in request.items() if k not in names]
        raise InvalidRequestError(f"invalid request for {command_id!r}: {describe_errors(errors)}")

    return check


def _extra_error(key: Any, value: Any) -> Any:
    return {"type": "extra_forbidden", "loc": (key,), "msg": "Unexpected field", "input": value}


def _request_check(command_id: str, adapter: TypeAdapter[Any]) -> Callable[[Any], Any]:
    from pydantic import ValidationError

    validate = adapter.validator.validate_python

    def check(request: Any) -> Any:
        try:
            return validate({} if request is None else request)
        except ValidationError as e:
            raise InvalidRequestError(
                f"invalid request for {command_id!r}: {describe_errors(e)}"
            ) from None

    return check


def _result_dump(adapter: TypeAdapter[Any], type_name: str) -> Callable[[Any], Any]:
    """Validates a result against the return annotation (lax: a dict becomes the declared
    model, a tuple a list), then serialises it. Validating first is what makes a mismatch an
    error, and is cheaper than pydantic's serialiser warnings turned into errors; a model
    instance of the declared class passes validation as it is."""
    from pydantic import ValidationError

    to_python = adapter.serializer.to_python
    validate = adapter.validator.validate_python

    def dump(result: Any) -> Any:
        try:
            value = validate(result)
        except ValidationError as e:
            raise ValueError(
                f"it does not match the return type {type_name}: {describe_errors(e, 'result')}"
            ) from None
        return to_python(value, warnings=False)

    return dump


# ---------------------------------------------------------------------------- events


def listener_converter(
    event_id: str, fn: Callable[..., Any], localns: Mapping[str, Any] | None
) -> Callable[[Any], Any] | None:
    """A function validating and converting an event payload to the type of the listener's
    first parameter (``None`` when it is not annotated, or ``Any``).

    The converter raises ``ValueError`` with the field errors when the payload does not fit.
    """
    sig = _signature(fn, localns, f"the listener of {event_id!r}")
    if sig is None:
        return None
    first = next(
        (
            p
            for p in sig.parameters.values()
            if p.kind
            in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ),
        None,
    )
    if first is None or not _is_typed(first.annotation):
        return None
    from pydantic import ValidationError

    adapter = _adapter(first.annotation, f"the payload of {event_id!r}")
    validate = adapter.validator.validate_python

    def convert(payload: Any) -> Any:
        try:
            return validate(payload)
        except ValidationError as e:
            raise ValueError(describe_errors(e, "payload")) from None

    return convert


# ---------------------------------------------------------------------------- wire values


def to_wire(obj: Any) -> Any:
    """msgpack's fallback for values it cannot carry: JSON-compatible data, bytes kept.

    Pydantic models and dataclasses become dicts (through their own serialiser, in python
    mode); enums their values; sets lists; anything else what pydantic's JSON mode makes of it
    (``datetime`` and ``date`` ISO strings, ``UUID``/``Decimal``/``Path`` strings...).

    Raises:
        TypeError: A value neither msgpack nor pydantic can serialise.
    """
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if not isinstance(obj, type):
        serializer = getattr(type(obj), "__pydantic_serializer__", None)
        if serializer is not None:  # a pydantic model or pydantic dataclass
            return serializer.to_python(obj)
        if dataclasses.is_dataclass(obj):
            cls: type = type(obj)
            return _class_adapter(cls).serializer.to_python(obj)
    from pydantic_core import PydanticSerializationError, to_jsonable_python

    try:
        return to_jsonable_python(obj)
    except PydanticSerializationError:
        raise TypeError(f"cannot serialize an object of type {type(obj).__qualname__}") from None


@functools.lru_cache(maxsize=256)
def _class_adapter(cls: type) -> TypeAdapter[Any]:
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


# ---------------------------------------------------------------------------- errors


def describe_errors(
    errors: ValidationError | Sequence[Mapping[str, Any]], root: str = "request"
) -> str:
    """A one-line account of validation errors: ``path: message`` per error.

    Args:
        errors: A pydantic ``ValidationError``, or its ``errors()``.
        root: The path of an error about the value as a whole.

    Example: ``2 field errors: user_id: Input should be a valid integer, unable to parse
    string as an integer (got 'x'); address.zip: Field required``.
    """
    if not isinstance(errors, Sequence):
        errors = errors.errors(include_url=False, include_context=False)
    parts = []
    for err in errors[:_MAX_ERRORS]:
        text = f"{_path(err['loc'], root)}: {err['msg']}"
        if err["type"] not in ("missing", "extra_forbidden") and "input" in err:
            text += f" (got {_short(err['input'])})"
        parts.append(text)
    if len(errors) > _MAX_ERRORS:
        parts.append(f"and {len(errors) - _MAX_ERRORS} more")
    n = len(errors)
    return f"{n} field error{'s' if n != 1 else ''}: " + "; ".join(parts)


def _path(loc: tuple[int | str, ...], root: str) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or root


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_INPUT else text[: _MAX_INPUT - 3] + "..."


# ---------------------------------------------------------------------------- helpers


def _signature(
    fn: Callable[..., Any], localns: Mapping[str, Any] | None, what: str
) -> inspect.Signature | None:
    """``fn``'s signature with its annotations resolved; ``None`` if it has none (builtins)."""
    try:
        inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        return inspect.signature(fn, eval_str=True, locals=dict(localns or {}))
    except Exception as e:
        raise TypeError(
            f"cannot resolve the type hints of {what} ({type(e).__name__}: {e}): define the "
            "types it names where the handler's module or the registering code can see them, "
            "or register it with validate=False"
        ) from e


def _is_typed(annotation: Any) -> bool:
    return all(annotation is not t for t in (inspect.Parameter.empty, Any, object))


def _awaited(annotation: Any) -> Any:
    """``Awaitable[T]``/``Coroutine[..., T]`` -> ``T`` (a ``def`` returning an awaitable)."""
    if typing.get_origin(annotation) in (Awaitable, Coroutine):
        args = typing.get_args(annotation)
        return args[-1] if args else Any
    return annotation


def _adapter(annotation: Any, what: str) -> TypeAdapter[Any]:
    from pydantic import PydanticUserError, TypeAdapter

    try:
        return TypeAdapter(annotation)
    except (PydanticUserError, TypeError, ValueError, NameError) as e:
        raise TypeError(_cannot_describe(annotation, what, e)) from e


def _json_schema(adapter: TypeAdapter[Any], mode: Any, what: str) -> dict[str, Any]:
    from pydantic import PydanticUserError

    try:
        return adapter.json_schema(mode=mode)
    except (PydanticUserError, TypeError, ValueError) as e:
        raise TypeError(_cannot_describe(None, what, e)) from e


def _cannot_describe(annotation: Any, what: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    of = f" ({_type_name(annotation)})" if annotation is not None else ""
    return (
        f"cannot derive a schema for {what}{of}: {first}. Use types pydantic can validate "
        "(models, dataclasses, TypedDicts, enums, builtins...), or register the command with "
        "validate=False (and schema=... to advertise one)"
    )


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__qualname__
    return repr(annotation).replace("typing.", "")
