//! A registry's native half: the [`Router`] behind a lock, plus the native channel
//! [`Endpoint`]s whose traffic is carried out here, in Rust, by whichever thread reads.
//!
//! * Every input goes through the router; actions that send on a native channel are
//!   performed here (encode, write to the ring or socket). A request passing from one native
//!   channel to another is therefore forwarded without Python.
//! * Actions that need Python (run a handler, complete an async caller, deliver an event,
//!   send on a channel written in Python) are returned to the caller, or, when produced by a
//!   thread other than the event loop's (a blocking caller reading its reply), queued and the
//!   loop woken through [`Node::wake_fd`].
//! * A blocking caller ([`Node::call_sync`]) writes its request and reads its own reply from
//!   the channel (spinning, then parking in `poll()`), with no hand-off to another thread
//!   unless the loop thread happened to be reading at that moment.
//!
//! Lock order: endpoint reader role, then the state lock, then an endpoint's writer lock.
//! Nothing here ever waits for Python.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::codec;
use crate::message::{ErrorCode, ExecError, ExecResult, Payload};
use crate::router::{Action, Config, DropKind, Micros, Router};
use crate::transport::{self, Endpoint};

/// The router and what is shared between threads.
pub struct State {
    /// The protocol state machine.
    pub router: Router,
    queued: Vec<Action>,
    sync_calls: HashMap<u64, SyncSlot>,
    /// The deadline the loop's timer is armed for (None: not armed).
    armed: Option<Micros>,
}

struct SyncSlot {
    result: Option<ExecResult>,
    waker: RawFd,
}

/// Outcome of [`Node::call_sync`].
#[derive(Debug)]
pub enum SyncOutcome {
    /// The call finished.
    Done(ExecResult),
    /// The command is not reached through a native channel: use the event loop instead.
    Fallback,
}

/// What [`Node::poll_endpoint`] did.
#[derive(Debug, Default)]
pub struct Poll {
    /// Actions for Python (an [`Action::Closed`] among them if the channel closed).
    pub actions: Vec<Action>,
    /// Stopped early to hand work to Python: poll again after carrying it out.
    pub again: bool,
    /// Unsent bytes remain (stream transport): wait for the socket to be writable.
    pub want_write: bool,
}

thread_local! {
    static THREAD_WAKER: OwnedFd = transport::eventfd().expect("eventfd for a blocking caller");
}

/// See the module documentation.
pub struct Node {
    state: Mutex<State>,
    endpoints: RwLock<HashMap<Arc<str>, Arc<Endpoint>>>,
    waker: OwnedFd,
    /// Microseconds a reader spins on an empty ring before parking.
    pub spin_us: u64,
}

impl Node {
    /// A node around a fresh router.
    pub fn new(config: Config) -> io::Result<Node> {
        Ok(Node {
            state: Mutex::new(State {
                router: Router::new(config),
                queued: Vec::new(),
                sync_calls: HashMap::new(),
                armed: None,
            }),
            endpoints: RwLock::new(HashMap::new()),
            waker: transport::eventfd()?,
            spin_us: 50,
        })
    }

    /// Readable when actions were queued for the loop by another thread.
    pub fn wake_fd(&self) -> RawFd {
        self.waker.as_raw_fd()
    }

    /// Locks the state (poisoning is ignored: the router has no invariants a panic in a
    /// caller could break half-way, and peers must keep being served).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn endpoint(&self, id: &str) -> Option<Arc<Endpoint>> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Whether `id` is a native channel of this node.
    pub fn is_native(&self, id: &str) -> bool {
        self.endpoint(id).is_some()
    }

    /// Runs `f` on the router and carries out the resulting actions; returns `f`'s value
    /// and the actions Python must carry out.
    pub fn with_router<R>(&self, f: impl FnOnce(&mut Router) -> R) -> (R, Vec<Action>) {
        let mut st = self.lock();
        let r = f(&mut st.router);
        let mut py = Vec::new();
        self.dispatch(&mut st, &mut py);
        (r, py)
    }

    /// Carries out the router's queued actions: native sends here, sync completions to their
    /// waiters, the rest into `py`.
    fn dispatch(&self, st: &mut State, py: &mut Vec<Action>) {
        let mut dead: Vec<(String, String)> = Vec::new();
        loop {
            let actions = st.router.take_actions();
            if actions.is_empty() {
                break;
            }
            for a in actions {
                match a {
                    Action::Send { channel, message } => match self.endpoint(&channel) {
                        Some(ep) => {
                            let enc = ep.encoding();
                            match codec::encode(&message, enc) {
                                Ok(frame) => match ep.send_frame(&frame) {
                                    Err(e) => dead
                                        .push((channel.to_string(), format!("send failed: {e}"))),
                                    Ok(()) => {
                                        if ep.kind() == transport::Kind::Stream
                                            && ep.has_pending_output()
                                        {
                                            py.push(Action::WantWrite { channel });
                                        }
                                    }
                                },
                                Err(e) => py.push(Action::Dropped {
                                    channel: Some(channel),
                                    kind: DropKind::Unencodable,
                                    reason: format!(
                                        "could not encode {}: {e}",
                                        message.type_name()
                                    ),
                                }),
                            }
                        }
                        None => py.push(Action::Send { channel, message }),
                    },
                    Action::CallDone { call, result } => match st.sync_calls.get_mut(&call) {
                        Some(slot) => {
                            slot.result = Some(result);
                            transport::eventfd_signal(slot.waker);
                        }
                        None => py.push(Action::CallDone { call, result }),
                    },
                    other => py.push(other),
                }
            }
            for (id, reason) in dead.drain(..) {
                if let Some(ep) = self.detach(&id) {
                    ep.close();
                    let _ = st.router.close_channel(&id);
                    py.push(Action::Closed {
                        channel: Arc::from(id.as_str()),
                        reason,
                    });
                }
            }
        }
    }

    fn detach(&self, id: &str) -> Option<Arc<Endpoint>> {
        self.endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    /// Attaches a native endpoint as channel `id` (its hello was sent when it opened).
    pub fn add_endpoint(&self, id: &str, ep: Endpoint) -> Result<Vec<Action>, crate::UsageError> {
        let mut st = self.lock();
        st.router.add_channel(id, ep.encoding())?;
        self.endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(Arc::from(id), Arc::new(ep));
        let mut py = Vec::new();
        self.dispatch(&mut st, &mut py);
        Ok(py)
    }

    /// The socket descriptor of a native channel.
    pub fn endpoint_fd(&self, id: &str) -> Option<RawFd> {
        self.endpoint(id).map(|e| e.fd())
    }

    /// Closes a native channel: the peer sees end-of-file; calls waiting on it fail.
    pub fn close_endpoint(&self, id: &str) -> Vec<Action> {
        let mut py = Vec::new();
        if let Some(ep) = self.detach(id) {
            ep.close();
            let mut st = self.lock();
            let _ = st.router.close_channel(id);
            self.dispatch(&mut st, &mut py);
            py.push(Action::Closed {
                channel: Arc::from(id),
                reason: "closed locally".to_string(),
            });
        }
        py
    }

    /// Reads and routes everything waiting on a native channel, spinning up to `spin_us`
    /// for more before arming its doorbell. Returns at once if another thread is reading.
    pub fn poll_endpoint(&self, id: &str, spin_us: u64) -> Poll {
        let mut out = Poll::default();
        let Some(ep) = self.endpoint(id) else {
            return out;
        };
        let Some(mut reader) = ep.try_reader() else {
            return out;
        };
        let mut spin_start: Option<Micros> = None;
        loop {
            let pass = ep.read(&mut reader);
            let got = !pass.frames.is_empty();
            if got || pass.eof || pass.fatal.is_some() {
                let mut st = self.lock();
                let now = transport::monotonic_micros();
                let garbage = route_frames(&mut st.router, id, &pass.frames, now);
                let reason = match (&pass.fatal, pass.eof, garbage) {
                    (Some(e), _, _) => Some(format!("[{}] {e}", e.code())),
                    (None, _, Some(g)) => Some(g),
                    (None, true, None) => Some("peer closed the channel".to_string()),
                    _ => None,
                };
                if let Some(reason) = reason {
                    drop(reader);
                    self.detach(id);
                    ep.close();
                    let _ = st.router.close_channel(id);
                    self.dispatch(&mut st, &mut out.actions);
                    out.actions.push(Action::Closed {
                        channel: Arc::from(id),
                        reason,
                    });
                    return out;
                }
                self.dispatch(&mut st, &mut out.actions);
            }
            if got {
                spin_start = None;
                if !out.actions.is_empty() {
                    out.again = true; // Python has work: hand it over, then poll again
                    break;
                }
                continue;
            }
            if pass.progressed {
                continue;
            }
            // Nothing new: spin briefly on the ring before parking.
            if spin_us > 0 && ep.kind() == transport::Kind::Shm {
                let now = transport::monotonic_micros();
                let start = *spin_start.get_or_insert(now);
                if now.saturating_sub(start) < spin_us {
                    spin_wait(&ep);
                    continue;
                }
            }
            if ep.prepare_park() {
                break;
            }
        }
        if let Ok(more) = ep.flush() {
            out.want_write = more && ep.kind() == transport::Kind::Stream;
        }
        out
    }

    /// Flushes a native channel's outbox (when its socket became writable); returns whether
    /// bytes still wait.
    pub fn flush_endpoint(&self, id: &str) -> bool {
        match self.endpoint(id) {
            Some(ep) => ep.flush().unwrap_or(false),
            None => false,
        }
    }

    /// Takes the actions other threads queued for Python.
    pub fn take_queued(&self) -> Vec<Action> {
        transport::eventfd_drain(self.waker.as_raw_fd());
        std::mem::take(&mut self.lock().queued)
    }

    /// The next router deadline, remembered as the one the loop's timer is armed for.
    pub fn next_deadline(&self) -> Option<Micros> {
        let mut st = self.lock();
        let d = st.router.next_deadline();
        st.armed = d;
        d
    }

    /// Queues Python actions produced off the loop thread and wakes the loop if needed.
    fn hand_to_loop(&self, st: &mut State, py: Vec<Action>) {
        let earlier = match (st.router.next_deadline(), st.armed) {
            (Some(d), Some(a)) => d < a,
            (Some(_), None) => true,
            _ => false,
        };
        if !py.is_empty() || earlier {
            st.queued.extend(py);
            transport::eventfd_signal(self.waker.as_raw_fd());
        }
    }

    /// A blocking call from any thread but the loop's: when the command is reached through a
    /// native channel, writes the request and waits for the reply on that channel itself.
    pub fn call_sync(
        &self,
        command_id: &str,
        request: Option<Payload>,
        ttl: Option<Micros>,
    ) -> SyncOutcome {
        let waker = THREAD_WAKER.with(|w| w.as_raw_fd());
        transport::eventfd_drain(waker);
        let (call, ep, deadline) = {
            let mut st = self.lock();
            let Some(target) = st.router.route_of(command_id) else {
                return SyncOutcome::Fallback;
            };
            let Some(ep) = self.endpoint(&target) else {
                return SyncOutcome::Fallback;
            };
            let now = transport::monotonic_micros();
            let ttl = ttl.unwrap_or(st.router.config().request_ttl);
            let call = st.router.execute(command_id, request, Some(ttl), now);
            st.sync_calls.insert(
                call,
                SyncSlot {
                    result: None,
                    waker,
                },
            );
            let mut py = Vec::new();
            self.dispatch(&mut st, &mut py);
            self.hand_to_loop(&mut st, py);
            (call, ep, now.saturating_add(ttl))
        };
        let mut spin_start: Option<Micros> = None;
        loop {
            {
                let mut st = self.lock();
                if let Some(slot) = st.sync_calls.get_mut(&call) {
                    if let Some(result) = slot.result.take() {
                        st.sync_calls.remove(&call);
                        return SyncOutcome::Done(result);
                    }
                } else {
                    return SyncOutcome::Done(Err(ExecError::new(
                        ErrorCode::InternalError,
                        "call lost",
                    )));
                }
                let now = transport::monotonic_micros();
                if now >= deadline {
                    st.router.tick(now);
                    let mut py = Vec::new();
                    self.dispatch(&mut st, &mut py);
                    self.hand_to_loop(&mut st, py);
                    continue;
                }
            }
            // Read the channel ourselves if nobody else is (a system call only when the
            // ring is empty and we are about to park: see Endpoint::read).
            let mut progressed = false;
            let spun_out = spin_start
                .is_some_and(|s| transport::monotonic_micros().saturating_sub(s) >= self.spin_us);
            let reader = if ep.has_data() || spun_out || spin_start.is_none() {
                ep.try_reader()
            } else {
                None
            };
            if let Some(mut reader) = reader {
                let pass = ep.read(&mut reader);
                progressed = pass.progressed || !pass.frames.is_empty();
                if !pass.frames.is_empty() || pass.eof || pass.fatal.is_some() {
                    let id = self.endpoint_id(&ep);
                    let mut st = self.lock();
                    let now = transport::monotonic_micros();
                    let mut py = Vec::new();
                    if let Some(id) = &id {
                        let garbage = route_frames(&mut st.router, id, &pass.frames, now);
                        let reason = match (&pass.fatal, pass.eof, garbage) {
                            (Some(e), _, _) => Some(format!("[{}] {e}", e.code())),
                            (None, _, Some(g)) => Some(g),
                            (None, true, None) => Some("peer closed the channel".to_string()),
                            _ => None,
                        };
                        if let Some(reason) = reason {
                            drop(reader);
                            self.detach(id);
                            ep.close();
                            let _ = st.router.close_channel(id);
                            self.dispatch(&mut st, &mut py);
                            py.push(Action::Closed {
                                channel: Arc::from(id.as_str()),
                                reason,
                            });
                        }
                    }
                    self.dispatch(&mut st, &mut py);
                    self.hand_to_loop(&mut st, py);
                }
                let _ = ep.flush();
            }
            if progressed || ep.has_data() {
                spin_start = None;
                continue;
            }
            let now = transport::monotonic_micros();
            let start = *spin_start.get_or_insert(now);
            if now.saturating_sub(start) < self.spin_us {
                spin_wait(&ep);
                continue;
            }
            // Park until a doorbell, our waker, or the deadline.
            if ep.prepare_park() {
                let left = deadline.saturating_sub(now);
                let ms = (left / 1000 + 1).min(100) as i32;
                let _ = transport::wait_readable(&[ep.fd(), waker], ms);
                transport::eventfd_drain(waker);
            }
            spin_start = None;
        }
    }

    fn endpoint_id(&self, ep: &Arc<Endpoint>) -> Option<String> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, e)| Arc::ptr_eq(e, ep))
            .map(|(k, _)| k.to_string())
    }

    /// Closes every native channel (for shutdown).
    pub fn close_all(&self) -> Vec<Action> {
        let ids: Vec<Arc<str>> = self
            .endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut py = Vec::new();
        for id in ids {
            py.extend(self.close_endpoint(&id));
        }
        py
    }
}

/// Routes received frames; returns a reason to disconnect if one was not even well-formed
/// JSON/msgpack (a peer of ours that sends garbage is broken). Frames that are well-formed
/// but invalid, too large or too deep are only dropped (and answered when possible).
fn route_frames(router: &mut Router, id: &str, frames: &[Vec<u8>], now: Micros) -> Option<String> {
    for f in frames {
        if let Err(crate::router::FrameError::Codec(e @ crate::CodecError::Malformed { .. })) =
            router.handle_frame(id, f, now)
        {
            return Some(format!("[{}] {e}", e.code()));
        }
    }
    None
}

/// One short spin on an empty ring (about a microsecond of pause instructions, returning as
/// soon as bytes arrive), then a yield, so that a peer sharing this CPU gets to run
/// (spinning alone would only delay it).
fn spin_wait(ep: &Endpoint) {
    for _ in 0..256 {
        if ep.has_data() {
            return;
        }
        std::hint::spin_loop();
    }
    // SAFETY: sched_yield has no preconditions.
    unsafe {
        libc::sched_yield();
    }
}
