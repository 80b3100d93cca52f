//! The typed seam between Rust and Python: the kinds of actions a node hands to Python and the
//! outcomes of a blocking call, each defined once here and exposed as `_core` module
//! constants (`ACTION_SEND`, `OUTCOME_VALUE`...), plus the rules Python asks of Rust rather
//! than restating them (`is_private`, `EXECUTE_ERROR_CODES`, `needs_await`).

use std::convert::Infallible;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PyString, PyTuple};

use cmd_ipc_core::message::{self, ErrorCode};

/// Element 0 of an action tuple (see `_core.pyi` for each shape).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionKind {
    /// `(ACTION_SEND, channel_id, frame, type, id, reference)`
    Send = 0,
    /// `(ACTION_RUN, job, handler_id, command_id, request, encoding)`
    Run = 1,
    /// `(ACTION_RESULT, call, value, encoding)`
    Result = 2,
    /// `(ACTION_ERROR, call, code, message)`
    Error = 3,
    /// `(ACTION_REGISTERED, call, code, message)`
    Registered = 4,
    /// `(ACTION_EVENT, event_id, payload, encoding)`
    Event = 5,
    /// `(ACTION_WANT_WRITE, channel_id)`
    WantWrite = 6,
    /// `(ACTION_LISTED, channel_id)`
    Listed = 7,
    /// `(ACTION_CLOSED, channel_id, reason)`
    Closed = 8,
    /// `(ACTION_DROPPED, channel_id, kind, reason)`
    Dropped = 9,
    /// `(ACTION_FAST_FAILED, job, handler_id, request, exception)`
    FastFailed = 10,
    /// `(ACTION_FAST_AWAIT, job, handler_id, request, awaitable)`
    FastAwait = 11,
    /// `(ACTION_FAST_UNENCODABLE, job, handler_id, request, exception)`
    FastUnencodable = 12,
}

impl ActionKind {
    /// Every kind with its `_core` constant name.
    pub const ALL: [(ActionKind, &'static str); 13] = [
        (ActionKind::Send, "ACTION_SEND"),
        (ActionKind::Run, "ACTION_RUN"),
        (ActionKind::Result, "ACTION_RESULT"),
        (ActionKind::Error, "ACTION_ERROR"),
        (ActionKind::Registered, "ACTION_REGISTERED"),
        (ActionKind::Event, "ACTION_EVENT"),
        (ActionKind::WantWrite, "ACTION_WANT_WRITE"),
        (ActionKind::Listed, "ACTION_LISTED"),
        (ActionKind::Closed, "ACTION_CLOSED"),
        (ActionKind::Dropped, "ACTION_DROPPED"),
        (ActionKind::FastFailed, "ACTION_FAST_FAILED"),
        (ActionKind::FastAwait, "ACTION_FAST_AWAIT"),
        (ActionKind::FastUnencodable, "ACTION_FAST_UNENCODABLE"),
    ];
}

/// Element 0 of what `Node.call_sync` / `call_many_sync` return, and element 1 of the
/// `others` entries of `call_many_sync`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    /// `(OUTCOME_VALUE, value, None)`: the result, decoded in Rust.
    Value = 0,
    /// `(OUTCOME_RESULT, data, encoding)`: the result, for Python to decode.
    Result = 1,
    /// `(OUTCOME_ERROR, code, message)`: the call failed.
    Error = 2,
    /// `(OUTCOME_ENCODE, None, None)`: encode the request in Python and call again.
    Encode = 3,
    /// `(OUTCOME_FALLBACK, None, None)`: not behind a native channel; use the event loop.
    Fallback = 4,
    /// `(OUTCOME_DONE, values, others)`: a batch finished.
    Done = 5,
}

impl CallOutcome {
    /// Every outcome with its `_core` constant name.
    pub const ALL: [(CallOutcome, &'static str); 6] = [
        (CallOutcome::Value, "OUTCOME_VALUE"),
        (CallOutcome::Result, "OUTCOME_RESULT"),
        (CallOutcome::Error, "OUTCOME_ERROR"),
        (CallOutcome::Encode, "OUTCOME_ENCODE"),
        (CallOutcome::Fallback, "OUTCOME_FALLBACK"),
        (CallOutcome::Done, "OUTCOME_DONE"),
    ];
}

macro_rules! small_int {
    ($t:ty) => {
        impl<'py> IntoPyObject<'py> for $t {
            type Target = PyInt;
            type Output = Bound<'py, PyInt>;
            type Error = Infallible;

            fn into_pyobject(self, py: Python<'py>) -> Result<Self::Output, Infallible> {
                (self as u8).into_pyobject(py)
            }
        }
    };
}
small_int!(ActionKind);
small_int!(CallOutcome);

/// Whether a handler's result must be awaited: it is not a plain value (`None`, `bool`,
/// `int`, `float`, `str`, `bytes`, `list`, `tuple`, `dict`) and has `__await__`. Plain values
/// are tested first: `hasattr` on them would raise and catch an `AttributeError`.
pub fn awaitable(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let plain = obj.is_none()
        || obj.is_instance_of::<PyInt>() // bool included
        || obj.is_instance_of::<PyFloat>()
        || obj.is_instance_of::<PyString>()
        || obj.is_instance_of::<PyDict>()
        || obj.is_instance_of::<PyList>()
        || obj.is_instance_of::<PyBytes>()
        || obj.is_instance_of::<PyTuple>();
    if plain {
        return Ok(false);
    }
    if obj.hasattr("__await__")? {
        return Ok(true);
    }
    // A generator-based coroutine (`@types.coroutine`) is awaitable without `__await__`, as
    // `inspect.isawaitable` says: its code has CO_ITERABLE_COROUTINE.
    const CO_ITERABLE_COROUTINE: i64 = 0x100;
    if obj.get_type().name()?.to_str()? == "generator" {
        let flags: i64 = obj.getattr("gi_code")?.getattr("co_flags")?.extract()?;
        return Ok(flags & CO_ITERABLE_COROUTINE != 0);
    }
    Ok(false)
}

/// Whether a handler's result must be awaited (the test the fast path applies itself): not a
/// plain value, and awaitable as `inspect.isawaitable` says (`__await__`, or a
/// generator-based coroutine).
#[pyfunction]
fn needs_await(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    awaitable(obj)
}

/// Whether a command or event id is private (never advertised, escalated or broadcast; an
/// execute of one arriving from a channel is `not_found`).
#[pyfunction]
fn is_private(command_id: &str) -> bool {
    message::is_private(command_id)
}

/// Adds the constants and functions of the seam to `_core`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    for (kind, name) in ActionKind::ALL {
        m.add(name, kind as u8)?;
    }
    for (outcome, name) in CallOutcome::ALL {
        m.add(name, outcome as u8)?;
    }
    let codes = ErrorCode::EXECUTE.map(ErrorCode::as_str);
    m.add("EXECUTE_ERROR_CODES", PyFrozenSet::new(m.py(), codes)?)?;
    m.add_function(wrap_pyfunction!(needs_await, m)?)?;
    m.add_function(wrap_pyfunction!(is_private, m)?)?;
    Ok(())
}

// `ALL` lists each enum in the order of its values (checked when compiling): the constants
// are 0..n in the order of `_core.pyi`.
const _: () = {
    let mut i = 0;
    while i < ActionKind::ALL.len() {
        assert!(ActionKind::ALL[i].0 as usize == i);
        i += 1;
    }
    let mut i = 0;
    while i < CallOutcome::ALL.len() {
        assert!(CallOutcome::ALL[i].0 as usize == i);
        i += 1;
    }
};
