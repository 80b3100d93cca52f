"""The Rust conversion of plain payload values (``_core.encode_plain`` / ``decode_plain``)
gives exactly what msgpack-python gives, and hands anything else back to the Python path."""

from __future__ import annotations

import collections
import datetime
import enum
import math
import sys

import msgpack
import pytest
from cmd_ipc import _core
from hypothesis import given, settings
from hypothesis import strategies as st

NOT_PLAIN = object()

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
plain = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text() | st.integers(-1000, 1000), inner, max_size=6)
    ),
    max_leaves=40,
)


def py_pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def py_unpack(data: bytes) -> object:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


@settings(max_examples=400, deadline=None)
@given(plain)
def test_plain_values_encode_like_msgpack_python(value: object) -> None:
    assert _core.encode_plain(value) == py_pack(value)


@settings(max_examples=400, deadline=None)
@given(plain)
def test_plain_values_decode_like_msgpack_python(value: object) -> None:
    data = py_pack(value)
    assert _core.decode_plain(data, NOT_PLAIN) == py_unpack(data)


@pytest.mark.parametrize(
    "value",
    [
        2**64,  # beyond 64 bits: msgpack-python raises, the Python path says so
        -(2**63) - 1,
        {1, 2},
        datetime.date(2026, 1, 1),
        collections.OrderedDict(a=1),
        bytearray(b"x"),
        "\ud800",  # a lone surrogate
        [1, [2, {"k": {3}}]],  # not plain deep inside
    ],
    ids=repr,
)
def test_other_values_are_left_to_python(value: object) -> None:
    assert _core.encode_plain(value) is None


def test_subclasses_are_left_to_python() -> None:
    class Color(enum.IntEnum):
        RED = 1

    class Name(str):
        pass

    assert _core.encode_plain(Color.RED) is None
    assert _core.encode_plain(Name("x")) is None
    assert _core.encode_plain(True) == py_pack(True)  # bool is not taken for an int


def test_floats_keep_their_bits() -> None:
    for f in (0.0, -0.0, math.inf, -math.inf, 1e-310, 5e-324):
        assert _core.encode_plain(f) == py_pack(f)
    data = py_pack(math.nan)
    assert math.isnan(_core.decode_plain(data, NOT_PLAIN))
    # float32 on the wire decodes to a float, as msgpack-python does
    f32 = msgpack.packb(1.5, use_single_float=True)
    assert _core.decode_plain(f32, NOT_PLAIN) == 1.5


def test_deep_nesting_is_left_to_python() -> None:
    value: object = 1
    for _ in range(300):
        value = [value]
    assert _core.encode_plain(value) is None
    assert _core.decode_plain(py_pack(value), NOT_PLAIN) is NOT_PLAIN


@pytest.mark.parametrize(
    "data",
    [
        b"",  # nothing
        b"\x92\x01",  # truncated array
        b"\xdd\xff\xff\xff\xff",  # array length beyond the input
        b"\xdf\xff\xff\xff\xff",  # map length beyond the input
        b"\x01\x02",  # trailing bytes
        b"\xa2\xff\xfe",  # invalid UTF-8
        b"\xc1",  # the reserved byte
        msgpack.packb(msgpack.ExtType(5, b"abc")),
        msgpack.packb(datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc), datetime=True),
        b"\x81\x91\x01\x02",  # a list as a map key (unhashable)
    ],
    ids=repr,
)
def test_undecodable_input_gives_the_default(data: bytes) -> None:
    assert _core.decode_plain(data, NOT_PLAIN) is NOT_PLAIN


def test_map_with_repeated_keys_keeps_the_last_like_msgpack_python() -> None:
    data = b"\x82\xa1a\x01\xa1a\x02"
    assert _core.decode_plain(data, NOT_PLAIN) == py_unpack(data) == {"a": 2}


def test_string_keys_are_interned_like_msgpack_python() -> None:
    key = "k" * 40  # a str8 key, beyond the fixstr range
    for data in (py_pack({key: 1}), py_pack({"short": 1})):
        (got,) = _core.decode_plain(data, NOT_PLAIN)
        assert sys.intern(got) is got
