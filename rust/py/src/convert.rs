//! Payload values between Python objects and msgpack bytes, without a round trip through
//! Python code, for the plain values calls carry almost always: `None`, `bool`, `int` (64-bit),
//! `float`, `str`, `bytes`, `list`, `tuple` and `dict` of exactly those types (no subclasses).
//!
//! The result is the same as msgpack-python's `Packer(use_bin_type=True)` and
//! `unpackb(raw=False, strict_map_key=False)` give for these values (the tests compare the
//! two). Anything else (a subclass, a model, a datetime, an int beyond 64 bits, an ext type,
//! invalid UTF-8, trailing bytes, very deep nesting) makes these functions return `None`, and
//! the caller takes the Python path, which handles it (or raises its usual error).
//!
//! The wire format itself is written and read with `rmp`'s primitives.

use cmd_ipc_core::mpread::Cursor;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use rmp::Marker;

/// Deeper values take the Python path (msgpack-python's own limit is 511).
const MAX_DEPTH: usize = 256;

/// The msgpack encoding of `obj`, or `None` if it is not a plain value.
pub fn encode(obj: &Bound<'_, PyAny>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    write(obj, &mut out, 0).then_some(out)
}

fn write(obj: &Bound<'_, PyAny>, out: &mut Vec<u8>, depth: usize) -> bool {
    use rmp::encode as e;
    if depth > MAX_DEPTH {
        return false;
    }
    // Writes to a Vec cannot fail; only the value's shape can send us to the Python path.
    if obj.is_none() {
        e::write_nil(out).is_ok()
    } else if let Ok(s) = obj.cast_exact::<PyString>() {
        match s.to_str() {
            // rmp writes the length as a u32: longer is not plain (msgpack-python refuses).
            Ok(s) if u32::try_from(s.len()).is_ok() => e::write_str(out, s).is_ok(),
            Ok(_) => false,
            Err(_) => false, // lone surrogates: msgpack-python raises, and so will Python
        }
    } else if let Ok(i) = obj.cast_exact::<PyInt>() {
        if let Ok(v) = i.extract::<i64>() {
            if v >= 0 {
                e::write_uint(out, v as u64).is_ok()
            } else {
                e::write_sint(out, v).is_ok()
            }
        } else if let Ok(v) = i.extract::<u64>() {
            e::write_uint(out, v).is_ok()
        } else {
            false
        }
    } else if let Ok(d) = obj.cast_exact::<PyDict>() {
        let Ok(n) = u32::try_from(d.len()) else {
            return false;
        };
        if e::write_map_len(out, n).is_err() {
            return false;
        }
        let mut seen = 0u32;
        for (k, v) in d.iter() {
            seen += 1;
            if !write(&k, out, depth + 1) || !write(&v, out, depth + 1) {
                return false;
            }
        }
        seen == n // a dict changed under us (a key's __eq__ running code) is not plain
    } else if let Ok(f) = obj.cast_exact::<PyFloat>() {
        e::write_f64(out, f.value()).is_ok()
    } else if obj.is_exact_instance_of::<PyBool>() {
        e::write_bool(out, obj.is_truthy().unwrap_or(false)).is_ok()
    } else if let Ok(l) = obj.cast_exact::<PyList>() {
        let Ok(n) = u32::try_from(l.len()) else {
            return false;
        };
        if e::write_array_len(out, n).is_err() {
            return false;
        }
        let mut seen = 0u32;
        for item in l.iter() {
            seen += 1;
            if seen > n || !write(&item, out, depth + 1) {
                return false;
            }
        }
        seen == n
    } else if let Ok(t) = obj.cast_exact::<PyTuple>() {
        let Ok(n) = u32::try_from(t.len()) else {
            return false;
        };
        e::write_array_len(out, n).is_ok() && t.iter().all(|item| write(&item, out, depth + 1))
    } else if let Ok(b) = obj.cast_exact::<PyBytes>() {
        let b = b.as_bytes();
        u32::try_from(b.len()).is_ok() && e::write_bin(out, b).is_ok()
    } else {
        false
    }
}

/// The Python value of one msgpack-encoded value, or `None` if it holds something other than
/// plain values (or is not exactly one well-formed value).
pub fn decode<'py>(py: Python<'py>, data: &[u8]) -> Option<Bound<'py, PyAny>> {
    let mut r = Cursor::new(data);
    let v = read(py, &mut r, 0)?;
    (r.remaining() == 0).then_some(v)
}

fn read<'py>(py: Python<'py>, r: &mut Cursor<'_>, depth: usize) -> Option<Bound<'py, PyAny>> {
    if depth > MAX_DEPTH {
        return None;
    }
    let int = |v: i64| v.into_pyobject(py).ok().map(|o| o.into_any());
    Some(match r.marker()? {
        Marker::Null => py.None().into_bound(py),
        Marker::True => PyBool::new(py, true).to_owned().into_any(),
        Marker::False => PyBool::new(py, false).to_owned().into_any(),
        Marker::FixPos(v) => int(v as i64)?,
        Marker::FixNeg(v) => int(v as i64)?,
        Marker::U8 => int(r.u8()? as i64)?,
        Marker::U16 => int(u16::from_be_bytes(r.be()?) as i64)?,
        Marker::U32 => int(u32::from_be_bytes(r.be()?) as i64)?,
        Marker::U64 => u64::from_be_bytes(r.be()?)
            .into_pyobject(py)
            .ok()?
            .into_any(),
        Marker::I8 => int(i8::from_be_bytes(r.be()?) as i64)?,
        Marker::I16 => int(i16::from_be_bytes(r.be()?) as i64)?,
        Marker::I32 => int(i32::from_be_bytes(r.be()?) as i64)?,
        Marker::I64 => int(i64::from_be_bytes(r.be()?))?,
        Marker::F32 => PyFloat::new(py, f32::from_be_bytes(r.be()?) as f64).into_any(),
        Marker::F64 => PyFloat::new(py, f64::from_be_bytes(r.be()?)).into_any(),
        m @ (Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32) => {
            let n = r.length(m)?;
            PyString::new(py, r.utf8(n)?).into_any()
        }
        m @ (Marker::Bin8 | Marker::Bin16 | Marker::Bin32) => {
            let n = r.length(m)?;
            PyBytes::new(py, r.take(n)?).into_any()
        }
        m @ (Marker::FixArray(_) | Marker::Array16 | Marker::Array32) => {
            let n = r.length(m)?;
            array(py, r, n, depth)?
        }
        m @ (Marker::FixMap(_) | Marker::Map16 | Marker::Map32) => {
            let n = r.length(m)?;
            map(py, r, n, depth)?
        }
        // Ext types (msgpack-python gives ExtType or Timestamp) and the reserved byte.
        _ => return None,
    })
}

fn array<'py>(
    py: Python<'py>,
    r: &mut Cursor<'_>,
    n: usize,
    depth: usize,
) -> Option<Bound<'py, PyAny>> {
    // Each element takes at least one byte: a length beyond the input is a lie.
    if n > r.remaining() {
        return None;
    }
    let list = PyList::empty(py);
    for _ in 0..n {
        list.append(read(py, r, depth + 1)?).ok()?;
    }
    Some(list.into_any())
}

fn map<'py>(
    py: Python<'py>,
    r: &mut Cursor<'_>,
    n: usize,
    depth: usize,
) -> Option<Bound<'py, PyAny>> {
    if n > r.remaining() / 2 {
        return None;
    }
    let dict = PyDict::new(py);
    for _ in 0..n {
        // String keys are interned, as msgpack-python does: a handler's keyword arguments
        // then match its parameter names by identity.
        let k = match r.peek_marker() {
            Some(Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32) => {
                PyString::intern(py, r.str()?).into_any()
            }
            _ => read(py, r, depth + 1)?,
        };
        let v = read(py, r, depth + 1)?;
        // An unhashable key (a list) fails here: the Python path raises its usual error.
        dict.set_item(k, v).ok()?;
    }
    Some(dict.into_any())
}
