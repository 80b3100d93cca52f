//! `cmd_ipc._core`: the Python binding of the cmd-ipc crates. Declarations and conversions
//! only: every protocol rule lives in `cmd-ipc-core`, the native channels and the threaded
//! node in `cmd-ipc-native`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, TryLockError};

use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use pyo3::PyTraverseError;

use cmd_ipc_core::codec::{self, Limits};
use cmd_ipc_core::error::{CodecError, UsageError};
use cmd_ipc_core::message::{
    CommandDef, CommandSchema, Encoding, ErrorCode, ExecError, ExecResult, Message, Payload,
};
use cmd_ipc_core::router::{Action, Config, Micros, Router as CoreRouter};
use cmd_ipc_native::node::{Node as CoreNode, NodeAction, Stopped, SyncOutcome};
use cmd_ipc_native::transport::Endpoint;
use cmd_ipc_native::{ids, RandomIds};

mod convert;
mod seam;

use seam::{ActionKind as A, CallOutcome as O};

/// Rust-side allocations only (Python objects keep Python's allocator). The hot path makes
/// many small short-lived ones (ids, frames, payloads), which mimalloc serves several times
/// faster than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// Defined in Python (`cmd_ipc.errors`, the one exception tree), raised from here; the module
// is imported the first time one is raised.
pyo3::import_exception!(cmd_ipc.errors, ProtocolError);

// ------------------------------------------------------------------------------------------
// The one conversion point from Rust errors to Python exceptions.
// ------------------------------------------------------------------------------------------

/// A blocking call's `stop` (see `Node::call_sync_until`): on the main thread, runs
/// Python's signal handlers (taking the GIL for a moment) and stops the wait when one raised
/// (Ctrl-C: `KeyboardInterrupt`), keeping the exception in `raised`. Other threads never
/// receive Python signals: for them it is always false, without the GIL.
fn signal_check(raised: &mut Option<PyErr>) -> impl FnMut() -> bool + '_ {
    move || {
        // Asked afresh at each check (at most every few ms, never on a reply's path): a
        // thread that forked is the main thread of its child.
        // SAFETY: gettid and getpid have no preconditions.
        if unsafe { libc::gettid() != libc::getpid() } {
            return false;
        }
        Python::attach(|py| match py.check_signals() {
            Ok(()) => false,
            Err(e) => {
                *raised = Some(e);
                true
            }
        })
    }
}

/// The exception a blocking call stopped by [`signal_check`] raises.
fn stopped(raised: Option<PyErr>) -> PyErr {
    raised.unwrap_or_else(|| pyo3::exceptions::PyKeyboardInterrupt::new_err(()))
}

fn codec_err(e: CodecError) -> PyErr {
    ProtocolError::new_err((e.code(), e.to_string()))
}

fn usage_err(e: UsageError) -> PyErr {
    match e {
        UsageError::UnknownChannel(_) | UsageError::UnknownJob(_) => {
            PyKeyError::new_err(e.to_string())
        }
        _ => PyValueError::new_err(e.to_string()),
    }
}

fn encoding(name: &str) -> PyResult<Encoding> {
    Encoding::parse(name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "unknown encoding {name:?}: expected 'json' or 'msgpack'"
        ))
    })
}

fn error_code(code: &str) -> PyResult<ErrorCode> {
    ErrorCode::parse(code)
        .ok_or_else(|| PyValueError::new_err(format!("unknown error code {code:?}")))
}

fn to_micros(seconds: f64) -> Micros {
    if seconds.is_finite() && seconds > 0.0 {
        (seconds * 1e6) as Micros
    } else {
        0
    }
}

fn payload(data: Option<&[u8]>, enc: &str) -> PyResult<Option<Payload>> {
    match data {
        None => Ok(None),
        Some(d) => Ok(Some(Payload::new(encoding(enc)?, d.to_vec()))),
    }
}

fn py_payload<'py>(py: Python<'py>, p: &Option<Payload>) -> (Bound<'py, PyAny>, Bound<'py, PyAny>) {
    match p {
        None => (py.None().into_bound(py), py.None().into_bound(py)),
        Some(p) => (
            PyBytes::new(py, &p.data).into_any(),
            pyo3::types::PyString::new(py, p.encoding.as_str()).into_any(),
        ),
    }
}

/// A blocking call's request: `None`, msgpack `bytes` encoded by Python (only when `encoded`:
/// a user's `bytes` is not a request), or a `dict` of plain values encoded here; `None`
/// (outer) when Python must encode it (and check it).
fn call_request(request: &Bound<'_, PyAny>, encoded: bool) -> Option<Option<Payload>> {
    if request.is_none() {
        Some(None)
    } else if encoded {
        let b = request.cast_exact::<PyBytes>().ok()?;
        Some(Some(Payload::new(Encoding::Msgpack, b.as_bytes().to_vec())))
    } else if request.is_exact_instance_of::<PyDict>() {
        convert::encode(request).map(|d| Some(Payload::new(Encoding::Msgpack, d)))
    } else {
        None
    }
}

/// A blocking call's result, for Python: the value (decoded here when it is plain msgpack),
/// the payload Python must decode, or the error.
enum SyncResult<'py> {
    Value(Bound<'py, PyAny>),
    Raw(Bound<'py, PyAny>, Bound<'py, PyAny>),
    Error(&'static str, String),
}

fn sync_result<'py>(py: Python<'py>, r: ExecResult) -> SyncResult<'py> {
    match r {
        Ok(None) => SyncResult::Value(py.None().into_bound(py)),
        Ok(Some(p)) => {
            if p.encoding == Encoding::Msgpack {
                if let Some(v) = convert::decode(py, &p.data) {
                    return SyncResult::Value(v);
                }
            }
            let (data, enc) = py_payload(py, &Some(p));
            SyncResult::Raw(data, enc)
        }
        Err(e) => SyncResult::Error(e.code.as_str(), e.message),
    }
}

/// Converts actions into Python tuples (see `_core.pyi` for their shapes). Sends to channels
/// written in Python come encoded (and checked) by the node.
fn actions_to_py<'py>(
    py: Python<'py>,
    _node: &Node,
    actions: Vec<NodeAction>,
) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for a in actions {
        let a = match a {
            NodeAction::Router(a) => a,
            NodeAction::WantWrite { channel } => {
                list.append((A::WantWrite, &*channel))?;
                continue;
            }
            NodeAction::Closed {
                channel,
                reason,
                fd,
            } => {
                list.append((A::Closed, &*channel, reason, fd))?;
                continue;
            }
            NodeAction::Frame {
                channel,
                frame,
                kind,
                id,
                reference,
            } => {
                list.append((
                    A::Send,
                    &*channel,
                    PyBytes::new(py, &frame),
                    kind,
                    id,
                    reference,
                ))?;
                continue;
            }
        };
        let item: Bound<'py, PyTuple> = match a {
            Action::Send { channel, message } => {
                // The node encodes every send (a NodeAction::Frame); never expected here.
                (
                    A::Dropped,
                    &*channel,
                    "unencodable",
                    format!("{} for '{channel}' was not encoded", message.type_name()),
                )
                    .into_pyobject(py)?
            }
            Action::RunHandler {
                job,
                handler,
                command_id,
                request,
            } => {
                let (data, enc) = py_payload(py, &request);
                (A::Run, job, handler, command_id, data, enc).into_pyobject(py)?
            }
            Action::CallDone { call, result } => match result {
                Ok(p) => {
                    let (data, enc) = py_payload(py, &p);
                    (A::Result, call, data, enc).into_pyobject(py)?
                }
                Err(e) => (A::Error, call, e.code.as_str(), e.message).into_pyobject(py)?,
            },
            Action::RegisterDone { call, result } => match result {
                Ok(()) => (A::Registered, call, py.None(), py.None()).into_pyobject(py)?,
                Err(e) => (A::Registered, call, e.code.as_str(), e.message).into_pyobject(py)?,
            },
            Action::DeliverEvent { event_id, payload } => {
                let (data, enc) = py_payload(py, &payload);
                (A::Event, event_id, data, enc).into_pyobject(py)?
            }
            Action::Listed { channel } => (A::Listed, &*channel).into_pyobject(py)?,
            Action::Dropped {
                channel,
                kind,
                reason,
            } => (A::Dropped, channel.as_deref(), kind.as_str(), reason).into_pyobject(py)?,
        };
        list.append(item)?;
    }
    Ok(list)
}

type PyActions<'py> = PyResult<Bound<'py, PyList>>;

/// A registry's native half: the sans-I/O router plus the native channels (see the
/// `cmd-ipc-native` crate's `node` module). Safe to call from several threads.
#[pyclass(module = "cmd_ipc._core", frozen)]
struct Node {
    inner: CoreNode,
    /// The Python objects this node holds (the only ones): visible to Python's garbage
    /// collector (`__traverse__`), emptied by `__clear__` and `clear_handlers`.
    fast: Mutex<FastTable>,
}

/// Plain sync handlers the read loop may call directly (the binding's table, never the
/// router's), by handler id, and the msgpack (unpack, pack) callables to use with them.
#[derive(Default)]
struct FastTable {
    handlers: HashMap<u64, Py<PyAny>>,
    codec: Option<(Py<PyAny>, Py<PyAny>)>,
}

/// What a directly dispatched handler run came to.
enum Fast<'py> {
    /// Finished: complete job `.0` with result `.1`.
    Done(u64, Option<Payload>),
    /// Python must finish it: `(ACTION_FAST_FAILED | ACTION_FAST_AWAIT |
    /// ACTION_FAST_UNENCODABLE, ...)`.
    Python(Bound<'py, PyTuple>),
    /// Not handled here: give the action to Python as usual.
    Decline(Action),
}

impl std::ops::Deref for Node {
    type Target = CoreNode;
    fn deref(&self) -> &CoreNode {
        &self.inner
    }
}

impl Node {
    fn fast_table(&self) -> MutexGuard<'_, FastTable> {
        self.fast.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Empties the fast table; the objects are released after the lock (releasing one may
    /// run Python code, which may call back into this node).
    fn take_fast(&self) -> FastTable {
        std::mem::take(&mut *self.fast_table())
    }

    /// Runs a handler action in place if its handler is a registered plain sync handler and
    /// its request is msgpack; anything unusual goes back to Python.
    fn run_fast<'py>(&self, py: Python<'py>, action: Action) -> PyResult<Fast<'py>> {
        let Action::RunHandler {
            job,
            handler,
            request,
            ..
        } = &action
        else {
            return Ok(Fast::Decline(action));
        };
        let (job, handler) = (*job, *handler);
        let (fn_, unpack, pack) = {
            let t = self.fast_table();
            match (t.handlers.get(&handler), &t.codec) {
                (Some(f), Some((unpack, pack))) => {
                    (f.clone_ref(py), unpack.clone_ref(py), pack.clone_ref(py))
                }
                _ => return Ok(Fast::Decline(action)),
            }
        };
        let request_obj = match request {
            None => None,
            Some(p) if p.encoding == Encoding::Msgpack => match convert::decode(py, &p.data) {
                Some(obj) => Some(obj),
                None => match unpack.bind(py).call1((PyBytes::new(py, &p.data),)) {
                    Ok(obj) => Some(obj),
                    Err(_) => return Ok(Fast::Decline(action)),
                },
            },
            Some(_) => return Ok(Fast::Decline(action)),
        };
        let called = match &request_obj {
            None => fn_.bind(py).call0(),
            Some(obj) => match obj.cast::<PyDict>() {
                Ok(kwargs) => fn_.bind(py).call((), Some(kwargs)),
                Err(_) => return Ok(Fast::Decline(action)),
            },
        };
        let req = request_obj.unwrap_or_else(|| py.None().into_bound(py));
        let result = match called {
            Ok(r) => r,
            Err(e) => {
                let exc = e.into_value(py).into_bound(py).into_any();
                return Ok(Fast::Python(
                    (A::FastFailed, job, handler, req, exc).into_pyobject(py)?,
                ));
            }
        };
        if result.is_none() {
            return Ok(Fast::Done(job, None));
        }
        if let Some(data) = convert::encode(&result) {
            return Ok(Fast::Done(job, Some(Payload::new(Encoding::Msgpack, data))));
        }
        // The one plain-result test, shared with Python's job runner (`_core.needs_await`).
        if seam::awaitable(&result)? {
            return Ok(Fast::Python(
                (A::FastAwait, job, handler, req, result).into_pyobject(py)?,
            ));
        }
        match pack.bind(py).call1((result,)) {
            Ok(b) => match b.cast::<PyBytes>() {
                Ok(bytes) => Ok(Fast::Done(
                    job,
                    Some(Payload::new(Encoding::Msgpack, bytes.as_bytes().to_vec())),
                )),
                Err(_) => Ok(Fast::Decline(action)),
            },
            Err(e) => {
                let exc = e.into_value(py).into_bound(py).into_any();
                Ok(Fast::Python(
                    (A::FastUnencodable, job, handler, req, exc).into_pyobject(py)?,
                ))
            }
        }
    }

    fn run<'py, R>(
        &self,
        py: Python<'py>,
        f: impl FnOnce(&mut CoreRouter) -> R,
    ) -> PyResult<(R, Bound<'py, PyList>)> {
        let (r, actions) = self.inner.with_router(f);
        Ok((r, actions_to_py(py, self, actions)?))
    }
}

#[pymethods]
impl Node {
    #[new]
    #[pyo3(signature = (id, router_channel=None, *, request_ttl=30.0, event_ttl=5.0,
        max_pending=100_000, max_dedup=100_000, max_message_size=67_108_864, max_depth=64,
        spin_us=50, max_pending_per_channel=None, max_commands_per_channel=10_000,
        max_command_size=262_144, max_outbox=67_108_864, slow_consumer_timeout=10.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        id: &str,
        router_channel: Option<&str>,
        request_ttl: f64,
        event_ttl: f64,
        max_pending: usize,
        max_dedup: usize,
        max_message_size: usize,
        max_depth: usize,
        spin_us: u64,
        max_pending_per_channel: Option<usize>,
        max_commands_per_channel: usize,
        max_command_size: usize,
        max_outbox: usize,
        slow_consumer_timeout: f64,
    ) -> PyResult<Self> {
        if id.is_empty() {
            return Err(PyValueError::new_err(
                "registry id must be a non-empty string",
            ));
        }
        if router_channel == Some("") {
            return Err(PyValueError::new_err(
                "router_channel must be a non-empty string or None",
            ));
        }
        for (name, v) in [
            ("request_ttl", request_ttl),
            ("event_ttl", event_ttl),
            ("slow_consumer_timeout", slow_consumer_timeout),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(PyValueError::new_err(format!(
                    "{name} must be a positive number of seconds, got {v}"
                )));
            }
        }
        // Half of max_pending by default: one peer never takes every slot.
        let per_channel = max_pending_per_channel.unwrap_or((max_pending / 2).max(1));
        if [
            max_depth,
            max_message_size,
            max_pending,
            max_dedup,
            per_channel,
            max_commands_per_channel,
            max_command_size,
            max_outbox,
        ]
        .contains(&0)
        {
            return Err(PyValueError::new_err(
                "max_pending, max_pending_per_channel, max_dedup, max_message_size, max_depth, \
                 max_commands_per_channel, max_command_size and max_outbox must be positive",
            ));
        }
        let mut config = Config::new(id);
        config.router_channel = router_channel.map(str::to_string);
        config.request_ttl = to_micros(request_ttl);
        config.event_ttl = to_micros(event_ttl);
        config.max_pending = max_pending;
        config.max_pending_per_channel = per_channel;
        config.max_commands_per_channel = max_commands_per_channel;
        config.max_command_size = max_command_size;
        config.max_dedup = max_dedup;
        config.limits = Limits {
            max_message_size,
            max_depth,
        };
        let mut inner = CoreNode::new(config, Box::new(RandomIds)).map_err(PyErr::from)?;
        inner.spin_us = spin_us;
        inner.max_outbox = max_outbox;
        inner.slow_consumer_us = to_micros(slow_consumer_timeout);
        Ok(Node {
            inner,
            fast: Mutex::new(FastTable::default()),
        })
    }

    /// Tells Python's garbage collector about the callables held here (a handler that closes
    /// over its registry makes a cycle through this node). `try_lock`, not `lock`: a
    /// collection may start on a thread that holds the table's lock (an allocation while
    /// it is held), which would then wait for itself. Skipping the visit only hides edges
    /// for that one collection, which keeps the objects alive (never frees one too early).
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        let t = match self.fast.try_lock() {
            Ok(t) => t,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(()),
        };
        for f in t.handlers.values() {
            visit.call(f)?;
        }
        if let Some((unpack, pack)) = &t.codec {
            visit.call(unpack)?;
            visit.call(pack)?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        drop(self.take_fast());
    }

    /// Drops every fast handler and the fast codec pair (a registry's `close()`), so that
    /// nothing here keeps a handler, or the registry it closes over, alive.
    fn clear_handlers(&self) {
        drop(self.take_fast());
    }

    #[getter]
    fn wake_fd(&self) -> i32 {
        self.inner.wake_fd()
    }

    fn add_channel<'py>(&self, py: Python<'py>, channel: &str, encoding: &str) -> PyActions<'py> {
        let enc = self::encoding(encoding)?;
        let (r, list) = self.run(py, |r| r.add_channel(channel, enc))?;
        r.map_err(usage_err)?;
        Ok(list)
    }

    #[pyo3(signature = (channel, sock_fd, encoding, shm_fd=None, side=0))]
    fn add_native_channel<'py>(
        &self,
        py: Python<'py>,
        channel: &str,
        sock_fd: i32,
        encoding: &str,
        shm_fd: Option<i32>,
        side: u8,
    ) -> PyActions<'py> {
        let enc = self::encoding(encoding)?;
        let max = self.lock().router.config().limits.max_message_size;
        let ep =
            Endpoint::open(sock_fd, shm_fd.map(|fd| (fd, side)), enc, max).map_err(PyErr::from)?;
        let actions = self.inner.add_endpoint(channel, ep).map_err(usage_err)?;
        actions_to_py(py, self, actions)
    }

    fn native_fd(&self, channel: &str) -> Option<i32> {
        self.inner.endpoint_fd(channel)
    }

    /// Reads a native channel (GIL released); returns (actions, again, want_write, busy).
    /// Requests for plain sync handlers (see `set_fast_handler`) are served right here, up
    /// to `budget` read passes, without returning to Python in between. `spin_us`: spin
    /// for a first frame; `follow_us`: after a frame was read, spin that long for the next
    /// (see `Node::poll_endpoint`).
    #[pyo3(signature = (channel, spin_us=0, budget=64, follow_us=0))]
    fn poll_native<'py>(
        &self,
        py: Python<'py>,
        channel: &str,
        spin_us: u64,
        budget: u32,
        follow_us: u64,
    ) -> PyResult<(Bound<'py, PyList>, bool, bool, bool)> {
        let node = &self.inner;
        let mut for_python: Vec<NodeAction> = Vec::new();
        let mut extra: Vec<Bound<'py, PyTuple>> = Vec::new();
        let (mut again, mut want_write, mut busy) = (false, false, false);
        let has_fast = !self.fast_table().handlers.is_empty();
        for pass in 0..budget.max(1) {
            // The socket is read once per call (after the loop's wake-up), not per request.
            // A pass after one that served requests spins for the next (a client's next
            // call usually comes within microseconds of its reply).
            let spin = if pass == 0 {
                spin_us
            } else {
                spin_us.max(follow_us)
            };
            let poll = py.detach(|| node.poll_endpoint(channel, spin, follow_us, pass == 0));
            again = poll.again;
            want_write |= poll.want_write;
            busy = poll.busy;
            // `again` with nothing to do: the read kept the loop long enough (frames that
            // need no Python keep coming); return so that the loop runs.
            let long_read = poll.again && poll.actions.is_empty();
            if !has_fast || long_read {
                for_python.extend(poll.actions);
                break;
            }
            let mut done: Vec<(u64, Option<Payload>)> = Vec::new();
            for a in poll.actions {
                let a = match a {
                    NodeAction::Router(a @ Action::RunHandler { .. }) => a,
                    other => {
                        for_python.push(other);
                        continue;
                    }
                };
                match self.run_fast(py, a)? {
                    Fast::Done(job, result) => done.push((job, result)),
                    Fast::Python(t) => extra.push(t),
                    Fast::Decline(a) => for_python.push(a.into()),
                }
            }
            if !done.is_empty() {
                let (_, acts) = node.with_router(|r| {
                    for (job, result) in done {
                        let _ = r.complete_job(job, Ok(result));
                    }
                });
                for_python.extend(acts);
            }
            if !again || busy || !for_python.is_empty() || !extra.is_empty() {
                break;
            }
        }
        let list = actions_to_py(py, self, for_python)?;
        for t in extra {
            list.append(t)?;
        }
        Ok((list, again, want_write, busy))
    }

    /// Lets the read loop call `fn(**request)` directly for handler `handler` (a plain,
    /// untyped, synchronous handler taking keyword arguments); `None` removes it.
    fn set_fast_handler(&self, handler: u64, fn_: Option<Py<PyAny>>) {
        // The replaced callable is released after the lock (see `take_fast`).
        let _old = {
            let mut t = self.fast_table();
            match fn_ {
                Some(f) => t.handlers.insert(handler, f),
                None => t.handlers.remove(&handler),
            }
        };
    }

    /// The msgpack `unpack(bytes)` and `pack(obj)` callables used for direct dispatch.
    fn set_fast_codec(&self, unpack: Py<PyAny>, pack: Py<PyAny>) {
        let _old = self.fast_table().codec.replace((unpack, pack));
    }

    fn native_busy(&self, channel: &str) -> bool {
        self.inner.endpoint_busy(channel)
    }

    fn flush_native(&self, py: Python<'_>, channel: &str) -> bool {
        let node = &self.inner;
        py.detach(|| node.flush_endpoint(channel))
    }

    fn close_native<'py>(&self, py: Python<'py>, channel: &str) -> PyActions<'py> {
        let actions = self.inner.close_endpoint(channel);
        actions_to_py(py, self, actions)
    }

    /// Lets go of the descriptor of a native channel that closed (`ACTION_CLOSED` gave it),
    /// once the event loop stopped watching it.
    fn release_native(&self, fd: i32) {
        self.inner.release_endpoint(fd);
    }

    fn close_all_native<'py>(&self, py: Python<'py>) -> PyActions<'py> {
        let actions = self.inner.close_all();
        actions_to_py(py, self, actions)
    }

    fn take_queued<'py>(&self, py: Python<'py>) -> PyActions<'py> {
        let actions = self.inner.take_queued();
        actions_to_py(py, self, actions)
    }

    fn close_channel<'py>(&self, py: Python<'py>, channel: &str) -> PyActions<'py> {
        let (r, list) = self.run(py, |r| r.close_channel(channel))?;
        r.map_err(usage_err)?;
        Ok(list)
    }

    fn has_channel(&self, channel: &str) -> bool {
        self.lock().router.has_channel(channel)
    }

    fn handle_frame<'py>(
        &self,
        py: Python<'py>,
        channel: &str,
        frame: &[u8],
        now: f64,
    ) -> PyActions<'py> {
        use cmd_ipc_core::router::InboundError;
        let (r, list) = self.run(py, |r| r.handle_frame(channel, frame, to_micros(now)))?;
        match r {
            // A codec error is already reported as an ACTION_DROPPED action.
            Ok(()) | Err(InboundError::Codec(_)) => Ok(list),
            Err(InboundError::Usage(e)) => Err(usage_err(e)),
        }
    }

    #[pyo3(signature = (command_id, request, encoding, ttl, now))]
    fn execute<'py>(
        &self,
        py: Python<'py>,
        command_id: &str,
        request: Option<&[u8]>,
        encoding: &str,
        ttl: Option<f64>,
        now: f64,
    ) -> PyResult<(u64, Bound<'py, PyList>)> {
        let request = payload(request, encoding)?;
        self.run(py, |r| {
            r.execute(command_id, request, ttl.map(to_micros), to_micros(now))
        })
    }

    /// A blocking call (GIL released). `request` is `None`, a `dict` (encoded here when it
    /// holds plain values), or, with `encoded`, msgpack `bytes` the caller encoded. Returns
    /// `(OUTCOME_VALUE, obj, None)` (the result, decoded here), `(OUTCOME_RESULT, data,
    /// encoding)` (for Python to decode), `(OUTCOME_ERROR, code, message)`, `(OUTCOME_ENCODE,
    /// None, None)` (the request is not plain: encode it in Python and call again with
    /// bytes), or `(OUTCOME_FALLBACK, None, None)`
    /// when the command is not behind a native channel. On the main thread, Python's signal
    /// handlers run while the wait is parked; what they raise ends it (see `signal_check`).
    #[pyo3(signature = (command_id, request, ttl, encoded=false))]
    fn call_sync<'py>(
        &self,
        py: Python<'py>,
        command_id: &str,
        request: &Bound<'py, PyAny>,
        ttl: Option<f64>,
        encoded: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let none = || py.None().into_bound(py);
        let Some(request) = call_request(request, encoded) else {
            return (O::Encode, none(), none()).into_pyobject(py);
        };
        let node = &self.inner;
        let mut raised = None;
        let outcome = py.detach(|| {
            let mut stop = signal_check(&mut raised);
            node.call_sync_until(command_id, request, ttl.map(to_micros), &mut stop)
        });
        let Ok(outcome) = outcome else {
            return Err(stopped(raised));
        };
        match outcome {
            SyncOutcome::Fallback => (O::Fallback, none(), none()).into_pyobject(py),
            SyncOutcome::Done(r) => match sync_result(py, r) {
                SyncResult::Value(v) => (O::Value, v, none()).into_pyobject(py),
                SyncResult::Raw(data, enc) => (O::Result, data, enc).into_pyobject(py),
                SyncResult::Error(code, message) => (O::Error, code, message).into_pyobject(py),
            },
        }
    }

    /// Blocking calls of `command_id`, one per item of `requests` (each `None`, a `dict` or
    /// msgpack `bytes`, as for `call_sync`), pipelined with up to `window` in flight (GIL
    /// released). Returns `(OUTCOME_DONE, values, others)`: `values` holds each result
    /// decoded here (`None` where `others` says otherwise), `others` lists `(index,
    /// OUTCOME_RESULT, data, encoding)` for results Python must decode and `(index,
    /// OUTCOME_ERROR, code, message)` for failed calls. `(OUTCOME_ENCODE, None, None)`: a
    /// request is not plain (encode them in Python and call again with bytes);
    /// `(OUTCOME_FALLBACK, None, None)`: not behind a native channel.
    #[pyo3(signature = (command_id, requests, ttl, window, encoded=false))]
    fn call_many_sync<'py>(
        &self,
        py: Python<'py>,
        command_id: &str,
        requests: &Bound<'py, PyList>,
        ttl: Option<f64>,
        window: usize,
        encoded: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let none = || py.None().into_bound(py);
        let mut payloads = Vec::with_capacity(requests.len());
        for r in requests.iter() {
            let Some(request) = call_request(&r, encoded) else {
                return (O::Encode, none(), none()).into_pyobject(py);
            };
            payloads.push(request);
        }
        let node = &self.inner;
        let ttl = ttl.map(to_micros);
        let mut raised = None;
        let results = py.detach(|| {
            let mut stop = signal_check(&mut raised);
            node.call_many_sync_until(command_id, payloads, ttl, window, &mut stop)
        });
        let Some(results) = results.map_err(|Stopped| stopped(raised))? else {
            return (O::Fallback, none(), none()).into_pyobject(py);
        };
        let values = PyList::empty(py);
        let others = PyList::empty(py);
        for (i, r) in results.into_iter().enumerate() {
            let value = match sync_result(py, r) {
                SyncResult::Value(v) => v,
                SyncResult::Raw(data, enc) => {
                    others.append((i, O::Result, data, enc))?;
                    none()
                }
                SyncResult::Error(code, message) => {
                    others.append((i, O::Error, code, message))?;
                    none()
                }
            };
            values.append(value)?;
        }
        (O::Done, values, others).into_pyobject(py)
    }

    fn cancel_call(&self, call: u64) {
        self.lock().router.cancel_call(call);
    }

    #[pyo3(signature = (job, result, encoding))]
    fn complete_job_ok<'py>(
        &self,
        py: Python<'py>,
        job: u64,
        result: Option<&[u8]>,
        encoding: &str,
    ) -> PyActions<'py> {
        let result = payload(result, encoding)?;
        let (r, list) = self.run(py, |r| r.complete_job(job, Ok(result)))?;
        r.map_err(usage_err)?;
        Ok(list)
    }

    fn complete_job_err<'py>(
        &self,
        py: Python<'py>,
        job: u64,
        code: &str,
        message: &str,
    ) -> PyActions<'py> {
        let err = ExecError::new(error_code(code)?, message);
        let (r, list) = self.run(py, |r| r.complete_job(job, Err(err)))?;
        r.map_err(usage_err)?;
        Ok(list)
    }

    #[pyo3(signature = (command_id, handler, now, description=None, schema_request=None, schema_response=None))]
    #[allow(clippy::too_many_arguments)]
    fn register_local<'py>(
        &self,
        py: Python<'py>,
        command_id: &str,
        handler: u64,
        now: f64,
        description: Option<String>,
        schema_request: Option<&[u8]>,
        schema_response: Option<&[u8]>,
    ) -> PyResult<(u64, Bound<'py, PyList>)> {
        let limits = self.lock().router.config().limits;
        let schema_part = |s: Option<&[u8]>| -> PyResult<Option<Payload>> {
            let Some(s) = s else { return Ok(None) };
            let p = Payload::new(Encoding::Json, s.to_vec());
            codec::validate_payload(&p, &limits, codec::level::SCHEMA).map_err(codec_err)?;
            Ok(Some(p))
        };
        let request = schema_part(schema_request)?;
        let response = schema_part(schema_response)?;
        let schema = (request.is_some() || response.is_some())
            .then_some(CommandSchema { request, response });
        let def = CommandDef {
            id: command_id.to_string(),
            description,
            schema,
        };
        self.run(py, |r| r.register_local(def, handler, to_micros(now)))
    }

    fn unregister_local(&self, command_id: &str) -> bool {
        self.lock().router.unregister_local(command_id)
    }

    #[pyo3(signature = (event_id, payload, encoding, now))]
    fn emit_event<'py>(
        &self,
        py: Python<'py>,
        event_id: &str,
        payload: Option<&[u8]>,
        encoding: &str,
        now: f64,
    ) -> PyResult<(String, Bound<'py, PyList>)> {
        if event_id.is_empty() {
            return Err(PyValueError::new_err("event id must be a non-empty string"));
        }
        let payload = self::payload(payload, encoding)?;
        if let Some(p) = &payload {
            let limits = self.lock().router.config().limits;
            codec::validate_payload(p, &limits, codec::level::REQUEST).map_err(codec_err)?;
        }
        self.run(py, |r| r.emit_event(event_id, payload, to_micros(now)))
    }

    /// Registers this subtree's public commands again with a router channel that came back.
    fn reannounce<'py>(&self, py: Python<'py>, now: f64) -> PyResult<(usize, Bound<'py, PyList>)> {
        self.run(py, |r| r.reannounce(to_micros(now)))
    }

    fn tick<'py>(&self, py: Python<'py>, now: f64) -> PyActions<'py> {
        let actions = self.inner.tick(to_micros(now));
        actions_to_py(py, self, actions)
    }

    fn next_deadline(&self) -> Option<f64> {
        self.inner.next_deadline().map(|d| d as f64 / 1e6)
    }

    /// [(id, description, schema_request_json, schema_response_json)]
    #[allow(clippy::type_complexity)]
    fn list_commands(
        &self,
    ) -> PyResult<Vec<(String, Option<String>, Option<Vec<u8>>, Option<Vec<u8>>)>> {
        let json = |p: &Option<Payload>| -> PyResult<Option<Vec<u8>>> {
            match p {
                None => Ok(None),
                Some(p) => Ok(Some(
                    codec::payload_in(p, Encoding::Json)
                        .map_err(codec_err)?
                        .into_owned(),
                )),
            }
        };
        let commands = self.lock().router.list_commands();
        commands
            .into_iter()
            .map(|c| {
                let (req, resp) = match &c.schema {
                    None => (None, None),
                    Some(s) => (json(&s.request)?, json(&s.response)?),
                };
                Ok((c.id, c.description, req, resp))
            })
            .collect()
    }

    /// Declares channel `channel` a member of pool `pool` (`None`: of none).
    #[pyo3(signature = (channel, pool))]
    fn set_pool(&self, channel: &str, pool: Option<&str>) {
        self.lock().router.set_pool(channel, pool);
    }

    fn route_of(&self, command_id: &str) -> Option<String> {
        self.lock().router.route_of(command_id)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock().router.stats();
        let d = PyDict::new(py);
        let channels = PyDict::new(py);
        for (name, c) in &s.channels {
            let cd = PyDict::new(py);
            cd.set_item("sent", c.sent)?;
            cd.set_item("received", c.received)?;
            cd.set_item("requests", c.requests)?;
            cd.set_item("in_flight", c.in_flight)?;
            cd.set_item("dropped", c.dropped)?;
            if let Some((now, peak)) = self.inner.outbox_bytes(name) {
                cd.set_item("outbox", now)?;
                cd.set_item("outbox_peak", peak)?;
            }
            channels.set_item(&**name, cd)?;
        }
        d.set_item("channels", channels)?;
        d.set_item("forwarded", s.forwarded)?;
        d.set_item("pending", s.pending)?;
        d.set_item("pending_forwards", s.pending_forwards)?;
        d.set_item("dropped", s.dropped)?;
        d.set_item("dedup_entries", s.dedup_entries)?;
        d.set_item("jobs", s.jobs)?;
        Ok(d)
    }
}

/// Creates a shared-memory segment (a memfd) for a shm channel with two rings of
/// `ring_capacity` bytes, sealed against resizing; returns its descriptor, owned by the
/// caller.
#[pyfunction]
#[pyo3(signature = (ring_capacity=1_048_576))]
fn create_segment(ring_capacity: usize) -> PyResult<i32> {
    use std::os::fd::IntoRawFd;
    Ok(cmd_ipc_native::transport::create_segment(ring_capacity)?.into_raw_fd())
}

/// Decodes `data` as one message in `source` encoding (enforcing the limits) and encodes it in
/// `target` encoding.
#[pyfunction]
#[pyo3(signature = (data, source, target, *, max_message_size=67_108_864, max_depth=64))]
fn transcode<'py>(
    py: Python<'py>,
    data: &[u8],
    source: &str,
    target: &str,
    max_message_size: usize,
    max_depth: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let limits = Limits {
        max_message_size,
        max_depth,
    };
    let msg = codec::decode(data, encoding(source)?, &limits).map_err(codec_err)?;
    let out = codec::encode(&msg, encoding(target)?).map_err(codec_err)?;
    Ok(PyBytes::new(py, &out))
}

/// Checks that `data` is one valid message in `encoding` (enforcing the limits) and returns
/// its `(type, id, thid)` (`thid` is `None` for a request or an event).
#[pyfunction]
#[pyo3(signature = (data, encoding, *, max_message_size=67_108_864, max_depth=64))]
fn inspect_message(
    data: &[u8],
    encoding: &str,
    max_message_size: usize,
    max_depth: usize,
) -> PyResult<(&'static str, String, Option<String>)> {
    let limits = Limits {
        max_message_size,
        max_depth,
    };
    let msg = codec::decode(data, self::encoding(encoding)?, &limits).map_err(codec_err)?;
    let thid = match &msg {
        Message::RegisterResponse { thid, .. }
        | Message::ListResponse { thid, .. }
        | Message::ExecuteResponse { thid, .. } => Some(thid.clone()),
        _ => None,
    };
    Ok((msg.type_name(), msg.id().to_string(), thid))
}

/// `data`, one valid execute request in `encoding` (enforcing the limits), with its command id
/// replaced by `command_id`, encoded again; any other message is returned unchanged.
#[pyfunction]
#[pyo3(signature = (data, encoding, command_id, *, max_message_size=67_108_864, max_depth=64))]
fn with_command_id<'py>(
    py: Python<'py>,
    data: &[u8],
    encoding: &str,
    command_id: &str,
    max_message_size: usize,
    max_depth: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let limits = Limits {
        max_message_size,
        max_depth,
    };
    let enc = self::encoding(encoding)?;
    let mut msg = codec::decode(data, enc, &limits).map_err(codec_err)?;
    let Message::ExecuteRequest { command_id: c, .. } = &mut msg else {
        return Ok(PyBytes::new(py, data));
    };
    command_id.clone_into(c);
    Ok(PyBytes::new(
        py,
        &codec::encode(&msg, enc).map_err(codec_err)?,
    ))
}

/// The msgpack encoding of a plain value (see the `convert` module), or `None` when the
/// value is not plain (then encode it in Python).
#[pyfunction]
fn encode_plain<'py>(py: Python<'py>, value: &Bound<'py, PyAny>) -> Option<Bound<'py, PyBytes>> {
    convert::encode(value).map(|d| PyBytes::new(py, &d))
}

/// The value of msgpack `data` when it holds plain values only, else `default` (then decode
/// it in Python).
#[pyfunction]
fn decode_plain<'py>(
    py: Python<'py>,
    data: &[u8],
    default: Bound<'py, PyAny>,
) -> Bound<'py, PyAny> {
    convert::decode(py, data).unwrap_or(default)
}

/// Reads the monotonic clock in a tight loop for `seconds` (GIL released) and returns how
/// many times two readings were more than `threshold_us` apart, and the longest gap in µs:
/// the pauses the machine imposes on this thread (interrupts, the hypervisor).
#[pyfunction]
fn clock_gaps(py: Python<'_>, seconds: f64, threshold_us: f64) -> (u64, f64) {
    let limit = to_micros(threshold_us / 1e6).max(1) * 1000;
    let span = (seconds.max(0.0) * 1e9) as u64;
    py.detach(|| {
        let start = std::time::Instant::now();
        let (mut gaps, mut longest) = (0u64, 0u64);
        let mut last = 0u64;
        loop {
            let t = start.elapsed().as_nanos() as u64;
            let d = t - last;
            if d > limit {
                gaps += 1;
                longest = longest.max(d);
            }
            last = t;
            if t >= span {
                break;
            }
        }
        (gaps, longest as f64 / 1000.0)
    })
}

/// A fresh UUIDv4 string.
#[pyfunction]
fn new_id() -> String {
    ids::random_id()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Node>()?;
    m.add_function(wrap_pyfunction!(create_segment, m)?)?;
    m.add_function(wrap_pyfunction!(transcode, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_message, m)?)?;
    m.add_function(wrap_pyfunction!(with_command_id, m)?)?;
    m.add_function(wrap_pyfunction!(new_id, m)?)?;
    m.add_function(wrap_pyfunction!(clock_gaps, m)?)?;
    m.add_function(wrap_pyfunction!(encode_plain, m)?)?;
    m.add_function(wrap_pyfunction!(decode_plain, m)?)?;
    seam::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
