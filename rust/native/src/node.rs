//! A registry's native half: the [`Router`] behind a lock, plus the native channel
//! [`Endpoint`]s whose traffic is carried out here, in Rust, by whichever thread reads.
//!
//! * Every input goes through the router; actions that send on a native channel are
//!   performed here (encode, write to the ring or socket). A request passing from one native
//!   channel to another is therefore forwarded without Python.
//! * Actions that need the driver (run a handler, complete an async caller, deliver an
//!   event, send on a channel the driver writes, a native channel closed or waiting to be
//!   writable: [`NodeAction`]) are returned to the caller, or, when produced by a thread
//!   other than the event loop's (a blocking caller reading its reply), queued and the loop
//!   woken through [`Node::wake_fd`].
//! * A blocking caller ([`Node::call_sync`]) writes its request and reads its own reply from
//!   the channel (spinning, then parking on the ring's futex, or in `poll()` on the socket of
//!   a stream channel), with no hand-off to another thread unless the loop thread happened
//!   to be reading at that moment. While it holds a channel's reading role the loop steps
//!   aside ([`Poll::busy`]).
//!
//! Lock order: endpoint reader role, then the state lock, then an endpoint's writer lock.
//! Nothing here ever waits for Python. The tests (`tests/node.rs`) drive two nodes over a
//! real channel from several threads.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use cmd_ipc_core::codec;
use cmd_ipc_core::ids::IdSource;
use cmd_ipc_core::message::Message;
use cmd_ipc_core::message::{ErrorCode, ExecError, ExecResult, Payload};
use cmd_ipc_core::router::{
    Action, ChannelId, Config, DropKind, InboundError, Micros, Refusal, Router,
};
use cmd_ipc_core::{CodecError, UsageError};

use crate::transport::{self, Endpoint, Reader, Sent};

/// Tables keyed by this process's own tokens and channel names (aHash, randomly keyed).
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

/// What a node hands its driver: a router action it does not carry out itself, or news of a
/// native channel.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeAction {
    /// A router action for the driver: a send on a channel the driver writes, a handler to
    /// run, an async caller or registration to complete, an event to deliver, a drop to log.
    Router(Action),
    /// A native channel closed and was detached. Its descriptor `fd` stays open (shut
    /// down: the peer saw end-of-file) until [`Node::release_endpoint`], so that the driver
    /// can stop watching it first: a descriptor closed while an event loop watches it (for
    /// writing, say) makes the loop's next change to that watch fail (`EBADF`), or apply to
    /// whatever reused the number.
    Closed {
        /// The channel.
        channel: ChannelId,
        /// Why.
        reason: String,
        /// Its socket's descriptor, to release once unwatched.
        fd: RawFd,
    },
    /// An encoded message for a channel the driver writes (a [`Action::Send`] carried out
    /// up to the bytes: encoded with the channel's encoding and checked against the limits
    /// as its receiver checks it).
    Frame {
        /// The channel.
        channel: ChannelId,
        /// The encoded message.
        frame: Vec<u8>,
        /// Its type (`execute.command.request`...).
        kind: &'static str,
        /// Its id.
        id: String,
        /// What it refers to ([`Message::reference`]).
        reference: Option<String>,
    },
    /// A native stream channel has unsent bytes: wait for its socket to be writable, then
    /// call [`Node::flush_endpoint`].
    WantWrite {
        /// The channel.
        channel: ChannelId,
    },
}

impl From<Action> for NodeAction {
    fn from(a: Action) -> Self {
        NodeAction::Router(a)
    }
}

/// The router and what is shared between threads.
pub struct State {
    /// The protocol state machine.
    pub router: Router,
    queued: Vec<NodeAction>,
    sync_calls: HashMap<u64, SyncSlot>,
    /// Finished calls of blocking batches ([`Node::call_many_sync`]), by batch: (index, result).
    batch_done: HashMap<u64, Vec<(usize, ExecResult)>>,
    next_batch: u64,
    /// The deadline the loop's timer is armed for (None: not armed).
    armed: Option<Micros>,
}

struct SyncSlot {
    result: Option<ExecResult>,
    waker: RawFd,
    ep: Arc<Endpoint>,
    /// The waiting thread: it needs a wake-up only when another thread completes the slot.
    thread: std::thread::ThreadId,
    /// Part of a batch: (batch, index in it); the result goes to `State::batch_done`.
    batch: Option<(u64, usize)>,
    /// The caller stopped waiting (interrupted): the result, when it comes (the reply, or
    /// the router's timeout), is dropped here. The router keeps the call pending until then,
    /// as the peer is still running it.
    abandoned: bool,
}

impl SyncSlot {
    /// The slot of a call the current thread waits for.
    fn new(waker: RawFd, ep: &Arc<Endpoint>, batch: Option<(u64, usize)>) -> SyncSlot {
        SyncSlot {
            result: None,
            waker,
            ep: ep.clone(),
            thread: std::thread::current().id(),
            batch,
            abandoned: false,
        }
    }
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
    /// Actions for Python (a [`NodeAction::Closed`] among them if the channel closed).
    pub actions: Vec<NodeAction>,
    /// Stopped early to hand work to Python: poll again after carrying it out.
    pub again: bool,
    /// Unsent bytes remain (stream transport): wait for the socket to be writable.
    pub want_write: bool,
    /// A blocking caller holds the reading role: stop watching this channel for a moment
    /// (a level-triggered watch would spin) and look again later.
    pub busy: bool,
}

/// What a blocking caller's step decided (see [`Node::drive`]).
enum Step {
    Done,
    /// Keep reading; the earliest deadline of what is awaited.
    Wait(Micros),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Got,
    Progressed,
    Empty,
    Closed,
}

thread_local! {
    static THREAD_WAKER: OwnedFd = transport::eventfd().expect("eventfd for a blocking caller");
}

/// See the module documentation.
pub struct Node {
    state: Mutex<State>,
    endpoints: RwLock<HashMap<Arc<str>, Arc<Endpoint>>>,
    /// Endpoints detached but not yet released by the driver (see [`NodeAction::Closed`]).
    retired: Mutex<Vec<Arc<Endpoint>>>,
    waker: OwnedFd,
    /// Microseconds a reader spins on an empty ring before parking.
    pub spin_us: u64,
    /// The most bytes a native channel's outbox may hold (applies to channels attached
    /// after it is set): beyond it, messages to that peer are refused (see
    /// [`Router::send_refused`]).
    pub max_outbox: usize,
    /// Microseconds a native channel's outbox may stay full before the channel is closed
    /// (`slow_consumer`).
    pub slow_consumer_us: Micros,
    /// The earliest time an outbox that is full may have been full for `slow_consumer_us`
    /// (0: none is full): when [`Node::tick`] looks at the outboxes.
    slow_deadline: AtomicU64,
}

impl Node {
    /// A node around a fresh router whose message ids and hash keys come from `ids`
    /// ([`crate::ids::RandomIds`] in production).
    pub fn new(config: Config, ids: Box<dyn IdSource>) -> io::Result<Node> {
        Ok(Node {
            state: Mutex::new(State {
                router: Router::new(config, ids),
                queued: Vec::new(),
                sync_calls: HashMap::default(),
                batch_done: HashMap::default(),
                next_batch: 0,
                armed: None,
            }),
            endpoints: RwLock::new(HashMap::default()),
            retired: Mutex::new(Vec::new()),
            waker: transport::eventfd()?,
            spin_us: 50,
            max_outbox: 64 * 1024 * 1024,
            slow_consumer_us: 10_000_000,
            slow_deadline: AtomicU64::new(0),
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

    /// Runs `f` on the router and carries out the resulting actions; returns `f`'s value
    /// and the actions Python must carry out.
    pub fn with_router<R>(&self, f: impl FnOnce(&mut Router) -> R) -> (R, Vec<NodeAction>) {
        let mut st = self.lock();
        let r = f(&mut st.router);
        let mut py = Vec::new();
        self.dispatch(&mut st, &mut py);
        (r, py)
    }

    /// Carries out the router's queued actions: sends encoded here (and written here for
    /// native channels), sync completions to their waiters, the rest into `py`.
    fn dispatch(&self, st: &mut State, py: &mut Vec<NodeAction>) {
        let mut dead: Vec<(String, String)> = Vec::new();
        let limits = st.router.config().limits;
        loop {
            let actions = st.router.take_actions();
            if actions.is_empty() {
                break;
            }
            for a in actions {
                match a {
                    Action::Send { channel, message } => {
                        self.send(st, &limits, channel, message, py, &mut dead)
                    }
                    Action::CallDone { call, result } => match st.sync_calls.get_mut(&call) {
                        Some(slot) if slot.abandoned => {
                            st.sync_calls.remove(&call);
                        }
                        Some(slot) => {
                            // The waiting thread reading its own reply is awake: no signal.
                            if slot.thread != std::thread::current().id() {
                                transport::eventfd_signal(slot.waker);
                                slot.ep.wake_local_waiter();
                            }
                            if let Some((batch, index)) = slot.batch {
                                st.sync_calls.remove(&call);
                                st.batch_done
                                    .entry(batch)
                                    .or_default()
                                    .push((index, result));
                            } else {
                                slot.result = Some(result);
                            }
                        }
                        None => py.push(Action::CallDone { call, result }.into()),
                    },
                    other => py.push(other.into()),
                }
            }
            for (id, reason) in dead.drain(..) {
                if let Some(ep) = self.detach(&id) {
                    ep.close();
                    let _ = st.router.close_channel(&id);
                    py.push(NodeAction::Closed {
                        channel: Arc::from(id.as_str()),
                        reason,
                        fd: ep.fd(),
                    });
                }
            }
        }
    }

    /// Carries out one send: encodes `message` for `channel` and checks it as its receiver
    /// will (size, depth); writes it to a native channel, or hands the bytes to the driver.
    /// What cannot be sent (over the limits, or a native outbox that is full) goes back to
    /// the router ([`Router::send_refused`]), whose answers the dispatch loop carries out.
    fn send(
        &self,
        st: &mut State,
        limits: &cmd_ipc_core::codec::Limits,
        channel: ChannelId,
        message: Message,
        py: &mut Vec<NodeAction>,
        dead: &mut Vec<(String, String)>,
    ) {
        let ep = self.endpoint(&channel);
        let encoding = match &ep {
            Some(ep) => ep.encoding(),
            None => match st.router.channel_encoding(&channel) {
                Some(e) => e,
                None => return, // detached meanwhile: what waited on it failed with it
            },
        };
        let frame = match codec::encode_checked(&message, encoding, limits) {
            Ok(frame) => frame,
            Err(e) => return st.router.send_refused(&channel, message, Refusal::Codec(e)),
        };
        let Some(ep) = ep else {
            py.push(NodeAction::Frame {
                kind: message.type_name(),
                id: message.id().to_string(),
                reference: message.reference().map(str::to_string),
                channel,
                frame,
            });
            return;
        };
        match ep.send_frame(&frame) {
            Err(e) => dead.push((channel.to_string(), send_failure(&e))),
            Ok(Sent::Done) => {}
            Ok(Sent::Pending) => {
                if ep.kind() == transport::Kind::Stream
                    && !py
                        .iter()
                        .any(|a| matches!(a, NodeAction::WantWrite { channel: c } if *c == channel))
                {
                    py.push(NodeAction::WantWrite { channel });
                }
            }
            Ok(Sent::Full { since, first }) => {
                let max = ep.max_outbox();
                let secs = self.slow_consumer_us as f64 / 1e6;
                if first {
                    self.note_slow(since.saturating_add(self.slow_consumer_us));
                    py.push(
                        Action::Dropped {
                            channel: Some(channel.clone()),
                            kind: DropKind::OutboxFull,
                            reason: format!(
                                "the outbox to '{channel}' is full (max_outbox = {max} bytes): \
                                 its peer is not reading; messages to it are refused and \
                                 counted until it reads, and it is disconnected if it does \
                                 not within {secs}s"
                            ),
                        }
                        .into(),
                    );
                }
                let why = Refusal::OutboxFull(format!(
                    "registry '{}': the outbox to '{channel}' is full (max_outbox = {max} \
                     bytes): its peer is not reading",
                    st.router.config().id
                ));
                st.router.send_refused(&channel, message, why);
            }
        }
    }

    /// An outbox became full: [`Node::tick`] looks at the outboxes at `deadline` at the
    /// latest.
    fn note_slow(&self, deadline: Micros) {
        let deadline = deadline.max(1);
        let _ = self
            .slow_deadline
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d == 0 || deadline < d).then_some(deadline)
            });
    }

    /// The earliest deadline of the router and of the outboxes.
    fn deadline(&self, st: &mut State) -> Option<Micros> {
        let router = st.router.next_deadline();
        match (router, self.slow_deadline.load(Ordering::Acquire)) {
            (r, 0) => r,
            (None, s) => Some(s),
            (Some(r), s) => Some(r.min(s)),
        }
    }

    /// Fires the router's deadlines at or before `now`, and closes the native channels whose
    /// outbox has been full for `slow_consumer_us` (reason `slow_consumer`: their waiting
    /// calls fail with `channel_disconnected`).
    pub fn tick(&self, now: Micros) -> Vec<NodeAction> {
        let mut st = self.lock();
        st.router.tick(now);
        let mut py = Vec::new();
        self.dispatch(&mut st, &mut py);
        let due = self.slow_deadline.load(Ordering::Acquire);
        if due != 0 && now >= due {
            self.slow_deadline.store(0, Ordering::Release);
            let eps: Vec<(Arc<str>, Arc<Endpoint>)> = self
                .endpoints
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect();
            for (id, ep) in eps {
                let Some(since) = ep.over_since() else {
                    continue;
                };
                let at = since.saturating_add(self.slow_consumer_us);
                if now < at {
                    self.note_slow(at);
                    continue;
                }
                let reason = format!(
                    "[slow_consumer] its outbox stayed full (max_outbox = {} bytes) for {}s: \
                     the peer is not reading",
                    ep.max_outbox(),
                    self.slow_consumer_us as f64 / 1e6
                );
                self.close_detached(&mut st, &id, &ep, reason, &mut py);
            }
        }
        py
    }

    /// Closes a native channel this thread found broken (the caller holds the state lock):
    /// detached, shut down, its router channel closed (failing what waited on it).
    fn close_detached(
        &self,
        st: &mut State,
        id: &str,
        ep: &Endpoint,
        reason: String,
        py: &mut Vec<NodeAction>,
    ) {
        self.detach(id);
        ep.close();
        let _ = st.router.close_channel(id);
        self.dispatch(st, py);
        py.push(NodeAction::Closed {
            channel: Arc::from(id),
            reason,
            fd: ep.fd(),
        });
    }

    /// Bytes waiting in a native channel's outbox now, and the most that ever waited there.
    pub fn outbox_bytes(&self, id: &str) -> Option<(usize, usize)> {
        self.endpoint(id).map(|ep| ep.outbox_bytes())
    }

    /// Lets go of a closed native channel's descriptor (see [`NodeAction::Closed`]), once
    /// the driver stopped watching it.
    pub fn release_endpoint(&self, fd: RawFd) {
        let gone: Vec<Arc<Endpoint>> = {
            let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            let (gone, kept) = std::mem::take(&mut *retired)
                .into_iter()
                .partition(|ep| ep.fd() == fd);
            *retired = kept;
            gone
        };
        drop(gone); // the descriptor closes here (unless a reader still holds the endpoint)
    }

    /// Detaches a native channel; its endpoint is kept (its descriptor open) until
    /// [`Node::release_endpoint`].
    fn detach(&self, id: &str) -> Option<Arc<Endpoint>> {
        let ep = self
            .endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)?;
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ep.clone());
        Some(ep)
    }

    /// Attaches a native endpoint as channel `id` (its hello was sent when it opened).
    pub fn add_endpoint(&self, id: &str, ep: Endpoint) -> Result<Vec<NodeAction>, UsageError> {
        let mut st = self.lock();
        st.router.add_channel(id, ep.encoding())?;
        let ep = ep.with_max_outbox(self.max_outbox);
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
    pub fn close_endpoint(&self, id: &str) -> Vec<NodeAction> {
        let mut py = Vec::new();
        if let Some(ep) = self.detach(id) {
            ep.close();
            let mut st = self.lock();
            let _ = st.router.close_channel(id);
            self.dispatch(&mut st, &mut py);
            py.push(NodeAction::Closed {
                channel: Arc::from(id),
                reason: "closed locally".to_string(),
                fd: ep.fd(),
            });
        }
        py
    }

    /// Reads and routes one received batch of an endpoint (the caller holds its reader
    /// role); Python actions go to `py`. Closes the channel on end-of-file, a broken stream
    /// or garbage.
    fn read_route(
        &self,
        id: &str,
        ep: &Endpoint,
        reader: &mut Reader,
        py: &mut Vec<NodeAction>,
    ) -> Pass {
        self.read_route_with(id, ep, reader, py, true)
    }

    /// [`Node::read_route`]; with `socket` false an shm channel's socket is not read (see
    /// [`Endpoint::read_ring`]).
    fn read_route_with(
        &self,
        id: &str,
        ep: &Endpoint,
        reader: &mut Reader,
        py: &mut Vec<NodeAction>,
        socket: bool,
    ) -> Pass {
        if ep.is_closed() {
            // Closed already (by an earlier read or locally): what that did is not redone,
            // and the id may name a new channel by now.
            return Pass::Closed;
        }
        let pass = if socket {
            ep.read(reader)
        } else {
            ep.read_ring(reader)
        };
        let got = !pass.frames.is_empty();
        if got || pass.eof || pass.fatal.is_some() {
            let mut st = self.lock();
            let now = transport::monotonic_micros();
            let garbage = route_frames(&mut st.router, id, reader, &pass.frames, now);
            let reason = match (&pass.fatal, pass.eof, garbage) {
                (Some(e), _, _) => Some(format!("[{}] {e}", e.code())),
                (None, _, Some(g)) => Some(g),
                (None, true, None) => Some("peer closed the channel".to_string()),
                _ => None,
            };
            if let Some(reason) = reason {
                self.close_detached(&mut st, id, ep, reason, py);
                return Pass::Closed;
            }
            self.dispatch(&mut st, py);
        }
        if got {
            Pass::Got
        } else if pass.progressed {
            Pass::Progressed
        } else {
            Pass::Empty
        }
    }

    /// The shared-memory channels other than `except`.
    fn shm_endpoints(&self, except: &str) -> Vec<(Arc<str>, Arc<Endpoint>)> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(k, e)| e.kind() == transport::Kind::Shm && &***k != except)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    /// Reads and routes everything waiting on a native channel; then, if `spin_us` > 0,
    /// spins that long over every shared-memory channel (a reply to a request just forwarded
    /// arrives on another one) before arming the doorbells. Once a frame was read, the spin
    /// lasts at least `follow_us` from the last one (the next request, or the reply to one
    /// just forwarded, usually follows within microseconds), so a bare doorbell costs no
    /// spin while a busy channel is read without wake-ups. Returns at once, with `busy`, if
    /// a blocking caller holds this channel's reading role. `socket_first`: also read the
    /// channel's socket on the first pass (do, after a wake-up on [`Node::endpoint_fd`]: it
    /// drains the doorbell and sees a hang-up; a caller polling again at once need not).
    pub fn poll_endpoint(
        &self,
        id: &str,
        spin_us: u64,
        follow_us: u64,
        socket_first: bool,
    ) -> Poll {
        let mut out = Poll::default();
        let Some(ep) = self.endpoint(id) else {
            return out;
        };
        let Some(mut reader) = ep.try_reader() else {
            out.busy = true;
            return out;
        };
        let mut spin_us = spin_us;
        // The other shared-memory channels, looked at once this read spins (built then: a
        // read that finds one frame and parks never needs them).
        let mut others: Option<Vec<(Arc<str>, Arc<Endpoint>)>> = None;
        let mut touched: Vec<usize> = Vec::new();
        let mut spin_start: Option<Micros> = None;
        let entered = transport::monotonic_micros();
        let mut closed = false;
        // The socket (doorbells, hang-up) is read on the first pass only if asked: the
        // caller asks after a wake-up; passes that follow, and spins, look at the ring alone.
        let mut socket = socket_first;
        loop {
            let read = self.read_route_with(id, &ep, &mut reader, &mut out.actions, socket);
            socket = false;
            match read {
                Pass::Closed => {
                    // The channels read on its behalf are still re-armed below.
                    closed = true;
                    break;
                }
                Pass::Got => {
                    spin_start = None;
                    spin_us = spin_us.max(follow_us);
                    if !out.actions.is_empty() || Self::read_long(entered) {
                        // Python has work (or the loop has waited long enough: frames
                        // forwarded without Python keep coming): hand over, poll again.
                        out.again = true;
                        break;
                    }
                    continue;
                }
                Pass::Progressed => continue,
                Pass::Empty => {}
            }
            if spin_us == 0 {
                if ep.prepare_park() {
                    break;
                }
                continue;
            }
            let others = others.get_or_insert_with(|| self.shm_endpoints(id));
            // Other shared-memory channels with bytes waiting (replies to what we forwarded).
            let mut other_got = false;
            for (i, (oid, oep)) in others.iter().enumerate() {
                if !oep.has_data() {
                    continue;
                }
                if let Some(mut r) = oep.try_reader() {
                    if self.read_route(oid, oep, &mut r, &mut out.actions) == Pass::Got {
                        other_got = true;
                    }
                    if !touched.contains(&i) {
                        touched.push(i);
                    }
                }
            }
            if other_got {
                spin_start = None;
                spin_us = spin_us.max(follow_us);
                if !out.actions.is_empty() || Self::read_long(entered) {
                    out.again = true;
                    break;
                }
                continue;
            }
            if ep.kind() == transport::Kind::Shm {
                let now = transport::monotonic_micros();
                let start = *spin_start.get_or_insert(now);
                if now.saturating_sub(start) < spin_us {
                    spin_wait(&ep, others);
                    continue;
                }
            }
            if ep.prepare_park() {
                break;
            }
        }
        drop(reader);
        // Channels read here must be re-armed, or their next bytes would wake nobody.
        if let Some(others) = &others {
            for &i in &touched {
                let (oid, oep) = &others[i];
                if let Some(mut r) = oep.try_reader() {
                    self.rearm(oid, oep, &mut r, &mut out.actions);
                }
            }
        }
        if closed {
            return out;
        }
        match ep.flush() {
            Ok(more) => out.want_write = more && ep.kind() == transport::Kind::Stream,
            Err(e) => self.close_if_corrupt(id, &ep, &e, &mut out.actions),
        }
        out
    }

    /// Whether a read that entered at `entered` has kept the loop long enough: it then
    /// returns with `again` even if every frame it read was forwarded without Python, so
    /// that timers, tasks and other channels get their turn under a steady stream.
    fn read_long(entered: Micros) -> bool {
        transport::monotonic_micros().saturating_sub(entered) >= MAX_READ_US
    }

    /// After a flush failed because the peer left an impossible index in the ring: closes
    /// the channel as a read pass would (`corrupt_ring`). Other flush failures are left to
    /// the next read (a broken socket reads as end-of-file).
    fn close_if_corrupt(&self, id: &str, ep: &Endpoint, e: &io::Error, py: &mut Vec<NodeAction>) {
        if transport::CorruptRing::of(e).is_none() || ep.is_closed() {
            return;
        }
        let mut st = self.lock();
        self.close_detached(&mut st, id, ep, send_failure(e), py);
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
    pub fn take_queued(&self) -> Vec<NodeAction> {
        transport::eventfd_drain(self.waker.as_raw_fd());
        std::mem::take(&mut self.lock().queued)
    }

    /// The next router deadline, remembered as the one the loop's timer is armed for.
    pub fn next_deadline(&self) -> Option<Micros> {
        let mut st = self.lock();
        let d = self.deadline(&mut st);
        st.armed = d;
        d
    }

    /// Queues Python actions produced off the loop thread and wakes the loop if needed.
    fn hand_to_loop(&self, st: &mut State, py: Vec<NodeAction>) {
        let earlier = match (self.deadline(st), st.armed) {
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
    /// native channel, writes the request and waits for the reply on that channel itself
    /// (spinning `spin_us`, then parking on the ring's futex, or on the socket for the pipe
    /// transport), reading and routing whatever else arrives meanwhile.
    pub fn call_sync(
        &self,
        command_id: &str,
        request: Option<Payload>,
        ttl: Option<Micros>,
    ) -> SyncOutcome {
        match self.call_sync_until(command_id, request, ttl, &mut || false) {
            Ok(outcome) => outcome,
            Err(Stopped) => unreachable!("never asked to stop"),
        }
    }

    /// [`Node::call_sync`] that gives up when `stop()` says so (a Python signal handler
    /// raised: Ctrl-C). `stop` is asked only off the fast path: after a park that brought no
    /// bytes (at most every [`IDLE_CHECK_US`]), and every [`BUSY_CHECK_US`] while bytes keep
    /// coming. A call given up is forgotten here; its late reply is dropped quietly and the
    /// channel stays usable.
    pub fn call_sync_until(
        &self,
        command_id: &str,
        request: Option<Payload>,
        ttl: Option<Micros>,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<SyncOutcome, Stopped> {
        // A stale signal on this thread's waker (a reply another thread completed earlier)
        // only ends a park early; the park path drains it.
        let waker = THREAD_WAKER.with(|w| w.as_raw_fd());
        let (call, id, ep, deadline, now) = {
            let mut st = self.lock();
            let Some(target) = st.router.route_of(command_id) else {
                return Ok(SyncOutcome::Fallback);
            };
            let Some(ep) = self.endpoint(&target) else {
                return Ok(SyncOutcome::Fallback);
            };
            // From here until hand_back, this thread reads the channel: the reply must not
            // ring the event loop's doorbell.
            ep.claim();
            let now = transport::monotonic_micros();
            let ttl = ttl.unwrap_or(st.router.config().request_ttl);
            let call = st.router.execute(command_id, request, Some(ttl), now);
            st.sync_calls.insert(call, SyncSlot::new(waker, &ep, None));
            let mut py = Vec::new();
            self.dispatch(&mut st, &mut py);
            // This call's deadline is kept by this thread (`sync_result`), not by the event
            // loop's timer: wake the loop only for actions it must carry out. Timers of calls
            // already answered are pruned here, so they do not pile up.
            let _ = st.router.next_deadline();
            if !py.is_empty() {
                st.queued.extend(py);
                transport::eventfd_signal(self.waker.as_raw_fd());
            }
            (call, target, ep, now.saturating_add(ttl), now)
        };
        let mut stop = Stop::new(stop, now);
        let result = self.wait_sync(call, &id, &ep, deadline, waker, &mut stop);
        if result.is_none() {
            self.abandon(|c, _| c == call);
        }
        self.hand_back(&id, &ep);
        result.map(SyncOutcome::Done).ok_or(Stopped)
    }

    /// Forgets the blocking calls `which(call, slot)` selects, whose caller stopped waiting
    /// (see `SyncSlot::abandoned`).
    fn abandon(&self, which: impl Fn(u64, &SyncSlot) -> bool) {
        let mut st = self.lock();
        for (call, slot) in st.sync_calls.iter_mut() {
            if which(*call, slot) {
                slot.abandoned = true;
                slot.batch = None;
            }
        }
        // Their results may have come already.
        st.sync_calls
            .retain(|_, slot| !(slot.abandoned && slot.result.is_some()));
        // Their deadlines were kept by the caller's thread: the loop's timer takes them over.
        self.hand_to_loop(&mut st, Vec::new());
    }

    /// Blocking calls of one command with many requests, pipelined: when the command is
    /// reached through a native channel, this thread writes up to `window` requests ahead
    /// of their replies and reads the replies itself, as [`Node::call_sync`] does for one.
    /// Results come back in request order; `None` when the command is not reached through a
    /// native channel (use the event loop instead).
    pub fn call_many_sync(
        &self,
        command_id: &str,
        requests: Vec<Option<Payload>>,
        ttl: Option<Micros>,
        window: usize,
    ) -> Option<Vec<ExecResult>> {
        match self.call_many_sync_until(command_id, requests, ttl, window, &mut || false) {
            Ok(results) => results,
            Err(Stopped) => unreachable!("never asked to stop"),
        }
    }

    /// [`Node::call_many_sync`] that gives up when `stop()` says so, as
    /// [`Node::call_sync_until`] does: the batch's calls still in flight are forgotten, the
    /// results already in are dropped.
    pub fn call_many_sync_until(
        &self,
        command_id: &str,
        requests: Vec<Option<Payload>>,
        ttl: Option<Micros>,
        window: usize,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<Option<Vec<ExecResult>>, Stopped> {
        let waker = THREAD_WAKER.with(|w| w.as_raw_fd());
        let n = requests.len();
        let window = window.max(1);
        let (batch, target, ep, ttl) = {
            let mut st = self.lock();
            // One thread reads one channel: a pool's members answer on several, so its
            // batches go through the event loop, which reads them all.
            if st.router.is_pooled(command_id) {
                return Ok(None);
            }
            let Some(target) = st.router.route_of(command_id) else {
                return Ok(None);
            };
            let Some(ep) = self.endpoint(&target) else {
                return Ok(None);
            };
            ep.claim();
            st.next_batch += 1;
            let ttl = ttl.unwrap_or(st.router.config().request_ttl);
            (st.next_batch, target, ep, ttl)
        };
        let mut results: Vec<Option<ExecResult>> =
            std::iter::repeat_with(|| None).take(n).collect();
        let mut requests = requests.into_iter().enumerate();
        let (mut sent, mut done) = (0usize, 0usize);
        let mut stop = Stop::new(stop, transport::monotonic_micros());
        let finished = self.drive(&target, &ep, waker, &mut stop, || {
            let mut st = self.lock();
            let mut py = Vec::new();
            let now = transport::monotonic_micros();
            // Results first: each one finished makes room in the window for the next send.
            done += collect_batch(&mut st, batch, &mut results);
            if sent < n && sent - done < window {
                while sent < n && sent - done < window {
                    let Some((index, request)) = requests.next() else {
                        break;
                    };
                    let call = st.router.execute(command_id, request, Some(ttl), now);
                    st.sync_calls
                        .insert(call, SyncSlot::new(waker, &ep, Some((batch, index))));
                    sent += 1;
                }
                self.dispatch(&mut st, &mut py);
            }
            // Timers of this batch (and of anything else) that are due fire here.
            let next = st.router.next_deadline();
            if next.is_some_and(|d| now >= d) {
                st.router.tick(now);
                self.dispatch(&mut st, &mut py);
            }
            if !py.is_empty() {
                self.hand_to_loop(&mut st, py);
            }
            // Calls that failed at once (no route) or timed out just now.
            done += collect_batch(&mut st, batch, &mut results);
            if done == n {
                st.batch_done.remove(&batch);
                return Step::Done;
            }
            Step::Wait(next.unwrap_or(now.saturating_add(ttl)))
        });
        if !finished {
            self.abandon(|_, slot| slot.batch.is_some_and(|(b, _)| b == batch));
            self.lock().batch_done.remove(&batch);
        }
        self.hand_back(&target, &ep);
        if !finished {
            return Err(Stopped);
        }
        Ok(Some(
            results
                .into_iter()
                .map(|r| r.unwrap_or_else(call_lost))
                .collect(),
        ))
    }

    /// Waits for one blocking call's result; `None` if `stop` ended the wait first.
    fn wait_sync(
        &self,
        call: u64,
        id: &str,
        ep: &Arc<Endpoint>,
        deadline: Micros,
        waker: RawFd,
        stop: &mut Stop<'_>,
    ) -> Option<ExecResult> {
        let mut out = None;
        let finished = self.drive(id, ep, waker, stop, || {
            match self.sync_result(call, deadline) {
                Some(r) => {
                    out = Some(r);
                    Step::Done
                }
                None => Step::Wait(deadline),
            }
        });
        finished.then(|| out.unwrap_or_else(call_lost))
    }

    /// Reads channel `id` on behalf of a blocking caller until `step` says it is done:
    /// `step` runs before each read, and may send more. Returns false if `stop` ended the
    /// wait first (asked only after `step` said to keep waiting).
    fn drive(
        &self,
        id: &str,
        ep: &Arc<Endpoint>,
        waker: RawFd,
        stop: &mut Stop<'_>,
        step: impl FnMut() -> Step,
    ) -> bool {
        if ep.kind() == transport::Kind::Shm {
            self.drive_shm(id, ep, waker, stop, step)
        } else {
            self.drive_stream(id, ep, waker, stop, step)
        }
    }

    fn drive_shm(
        &self,
        id: &str,
        ep: &Arc<Endpoint>,
        waker: RawFd,
        stop: &mut Stop<'_>,
        mut step: impl FnMut() -> Step,
    ) -> bool {
        let mut spin_start: Option<Micros> = None;
        // After an empty spin round, while this thread alone reads the channel, nothing can
        // have finished its calls: `step` (the state lock) is skipped until bytes come, the
        // channel closes, or the deadline passes.
        let mut deadline = 0;
        let mut idle_spin = false;
        // The last pass ended in a park (or a wait) that brought nothing.
        let mut parked = false;
        loop {
            let stepped = !idle_spin;
            if stepped {
                let Step::Wait(d) = step() else {
                    return true;
                };
                deadline = d;
            }
            idle_spin = false;
            let now = transport::monotonic_micros();
            if stepped && stop.due(now, parked) {
                return false;
            }
            parked = false;
            if ep.is_closed() {
                wait_elsewhere(waker, deadline, now);
                parked = true;
                continue;
            }
            // Read the channel ourselves unless another thread is (then just wait for it).
            let spun_out = spin_start.is_some_and(|s| now.saturating_sub(s) >= self.spin_us);
            let mut busy = false;
            // Bytes in the ring are seen without a system call; the socket (the peer's
            // hang-up) is read once the spin is over.
            if ep.has_data() || spun_out {
                match ep.try_reader() {
                    Some(mut reader) => {
                        let pass = self.read_for_caller(id, ep, &mut reader);
                        drop(reader);
                        match pass {
                            Pass::Closed => continue, // the slots hold channel_disconnected
                            Pass::Got | Pass::Progressed => {
                                spin_start = None;
                                continue;
                            }
                            Pass::Empty => {}
                        }
                    }
                    None => busy = true,
                }
            }
            if ep.has_data() {
                spin_start = None;
                continue;
            }
            let start = *spin_start.get_or_insert(now);
            if busy || now.saturating_sub(start) < self.spin_us {
                spin_wait(ep, &[]);
                idle_spin = !busy && now < deadline;
                continue;
            }
            // Park until bytes arrive, another thread completes us, or the deadline (at most
            // 20 ms, so that a peer's death is noticed by the next read).
            let left = deadline.saturating_sub(now);
            let ms = (left / 1000 + 1).min(20) as i32;
            ep.park_blocking(waker, ms);
            transport::eventfd_drain(waker);
            spin_start = None;
            parked = !ep.has_data();
        }
    }

    /// Takes a finished sync call's result out of its slot, or fires its deadline.
    fn sync_result(&self, call: u64, deadline: Micros) -> Option<ExecResult> {
        let mut st = self.lock();
        let Some(slot) = st.sync_calls.get_mut(&call) else {
            return Some(call_lost());
        };
        if let Some(result) = slot.result.take() {
            st.sync_calls.remove(&call);
            return Some(result);
        }
        let now = transport::monotonic_micros();
        if now >= deadline {
            // The router's own timer for this call fires (CallDone lands in the slot).
            st.router.tick(now);
            let mut py = Vec::new();
            self.dispatch(&mut st, &mut py);
            self.hand_to_loop(&mut st, py);
            if let Some(result) = st.sync_calls.get_mut(&call).and_then(|s| s.result.take()) {
                st.sync_calls.remove(&call);
                return Some(result);
            }
        }
        None
    }

    /// The pipe transport: the reply comes through the socket, so the caller keeps the
    /// reading role while it waits in `poll()` on it; the event loop, finding the role
    /// taken, steps aside instead of racing for the same bytes.
    fn drive_stream(
        &self,
        id: &str,
        ep: &Arc<Endpoint>,
        waker: RawFd,
        stop: &mut Stop<'_>,
        mut step: impl FnMut() -> Step,
    ) -> bool {
        // The last pass ended in a wait (a park, or the loop thread's turn to read).
        let mut parked = false;
        loop {
            let Step::Wait(deadline) = step() else {
                return true;
            };
            let now = transport::monotonic_micros();
            if stop.due(now, parked) {
                return false;
            }
            if ep.is_closed() {
                wait_elsewhere(waker, deadline, now);
                parked = true;
                continue;
            }
            match ep.try_reader() {
                Some(mut reader) => loop {
                    let pass = self.read_for_caller(id, ep, &mut reader);
                    let Step::Wait(deadline) = step() else {
                        return true;
                    };
                    let now = transport::monotonic_micros();
                    if stop.due(now, parked && pass == Pass::Empty) {
                        return false;
                    }
                    parked = false;
                    if pass == Pass::Closed {
                        break;
                    }
                    if pass == Pass::Empty {
                        // At most STREAM_PARK_MS, so that a signal delivered to another
                        // thread of this process is still noticed soon (see `Stop`).
                        let left = deadline.saturating_sub(now);
                        let ms = (left / 1000 + 1).min(STREAM_PARK_MS) as i32;
                        ep.park_blocking(waker, ms);
                        transport::eventfd_drain(waker);
                        parked = true;
                    }
                },
                None => {
                    // The loop thread is reading: it completes our slots and signals us.
                    let _ = transport::wait_readable(&[waker], 1);
                    transport::eventfd_drain(waker);
                    parked = true;
                }
            }
        }
    }

    /// After a blocking call: leaves the channel armed for the event loop (frames that came
    /// meanwhile are routed, the doorbell is set). A loop that stepped aside resumes its
    /// watch by itself (it re-checks on a short timer rather than being woken here, so that
    /// back-to-back blocking calls do not wake the loop thread each time).
    fn hand_back(&self, id: &str, ep: &Arc<Endpoint>) {
        if let Some(mut reader) = ep.try_reader() {
            let mut py = Vec::new();
            self.rearm(id, ep, &mut reader, &mut py);
            drop(reader);
            if !py.is_empty() {
                let mut st = self.lock();
                self.hand_to_loop(&mut st, py);
            }
        }
    }

    /// Sets a channel's doorbell for the event loop, routing what arrived before it was set.
    fn rearm(&self, id: &str, ep: &Endpoint, reader: &mut Reader, py: &mut Vec<NodeAction>) {
        while !ep.prepare_park() {
            if self.read_route(id, ep, reader, py) == Pass::Closed {
                break;
            }
        }
    }

    /// A blocking caller's read: routes what arrived, hands Python's share to the loop,
    /// flushes what routing queued.
    fn read_for_caller(&self, id: &str, ep: &Endpoint, reader: &mut Reader) -> Pass {
        let mut py = Vec::new();
        let pass = self.read_route(id, ep, reader, &mut py);
        if let Err(e) = ep.flush() {
            self.close_if_corrupt(id, ep, &e, &mut py);
        }
        if !py.is_empty() {
            let mut st = self.lock();
            self.hand_to_loop(&mut st, py);
        }
        pass
    }

    /// Whether a blocking caller holds the reading role of a native channel now.
    pub fn endpoint_busy(&self, id: &str) -> bool {
        self.endpoint(id)
            .is_some_and(|ep| ep.try_reader().is_none())
    }

    /// Closes every native channel (for shutdown).
    pub fn close_all(&self) -> Vec<NodeAction> {
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
fn route_frames(
    router: &mut Router,
    id: &str,
    reader: &Reader,
    frames: &[std::ops::Range<usize>],
    now: Micros,
) -> Option<String> {
    for f in frames {
        if let Err(InboundError::Codec(e @ CodecError::Malformed { .. })) =
            router.handle_frame(id, reader.frame(f.clone()), now)
        {
            return Some(format!("[{}] {e}", e.code()));
        }
    }
    None
}

/// Moves a batch's finished calls into `results`; returns how many.
fn collect_batch(st: &mut State, batch: u64, results: &mut [Option<ExecResult>]) -> usize {
    let Some(finished) = st.batch_done.get_mut(&batch) else {
        return 0;
    };
    let n = finished.len();
    for (index, result) in finished.drain(..) {
        results[index] = Some(result);
    }
    n
}

/// The result of a blocking call whose slot is gone (never expected).
fn call_lost() -> ExecResult {
    Err(ExecError::new(ErrorCode::InternalError, "call lost"))
}

/// Microseconds between two checks of a blocking caller's `stop` while it waits with nothing
/// arriving (each check may take the GIL: never on the path of a reply).
pub const IDLE_CHECK_US: Micros = 2_000;
/// How long one [`Node::poll_endpoint`] may keep reading frames that need no Python before
/// it returns (`again`) to let the event loop run.
const MAX_READ_US: Micros = 2_000;
/// Microseconds between two checks while bytes keep arriving (a long pipelined batch).
pub const BUSY_CHECK_US: Micros = 100_000;
/// The longest park of a blocking caller on a stream channel, in milliseconds.
const STREAM_PARK_MS: u64 = 100;

/// A blocking caller gave up waiting because its `stop` said so (see
/// [`Node::call_sync_until`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// A blocking caller's `stop`, asked at most every [`IDLE_CHECK_US`] after an empty wait,
/// or every [`BUSY_CHECK_US`] otherwise, and only after `step` said the call goes on (so a
/// reply is never held up by it). A signal that reaches the caller's thread ends its futex
/// or `poll()` wait at once (EINTR) and is checked then; one that another thread of the
/// process receives is seen when the wait times out (at most 20 ms on a ring,
/// `STREAM_PARK_MS` on a socket).
struct Stop<'a> {
    ask: &'a mut dyn FnMut() -> bool,
    last: Micros,
}

impl<'a> Stop<'a> {
    fn new(ask: &'a mut dyn FnMut() -> bool, now: Micros) -> Stop<'a> {
        Stop { ask, last: now }
    }

    /// Whether to stop, asked if the interval for an idle (`parked`) or busy caller passed.
    fn due(&mut self, now: Micros, parked: bool) -> bool {
        let every = if parked { IDLE_CHECK_US } else { BUSY_CHECK_US };
        if now.saturating_sub(self.last) < every {
            return false;
        }
        self.last = now;
        (self.ask)()
    }
}

/// Why a native channel closes after a failed send.
fn send_failure(e: &io::Error) -> String {
    match transport::CorruptRing::of(e) {
        Some(c) => format!("[corrupt_ring] {c}"),
        None => format!("send failed: {e}"),
    }
}

/// A blocking caller whose channel closed: its calls there have failed; calls still open
/// went elsewhere and are completed by other threads, which signal `waker`.
fn wait_elsewhere(waker: RawFd, deadline: Micros, now: Micros) {
    let ms = (deadline.saturating_sub(now) / 1000 + 1).min(20) as i32;
    let _ = transport::wait_readable(&[waker], ms);
    transport::eventfd_drain(waker);
}

/// One short spin on empty rings (about a microsecond of pause instructions, returning as
/// soon as bytes arrive on `ep` or on one of `others`), then a yield, so that a peer sharing
/// this CPU gets to run (spinning alone would only delay it).
fn spin_wait(ep: &Endpoint, others: &[(Arc<str>, Arc<Endpoint>)]) {
    for _ in 0..256 {
        if ep.has_data() || others.iter().any(|(_, o)| o.has_data()) {
            return;
        }
        std::hint::spin_loop();
    }
    // SAFETY: sched_yield has no preconditions.
    unsafe {
        libc::sched_yield();
    }
}
