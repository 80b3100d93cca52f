//! The sans-I/O router: every protocol rule of a registry, with no I/O, threads or clock.
//!
//! A driver feeds it inputs (a message arrived on a channel, a local call, registration or
//! event, a channel added or closed, the time) and carries out the [`Action`]s it queues (send a
//! message, run a local handler, complete a local caller, deliver an event). Time is a number
//! of microseconds on the driver's monotonic clock; the driver asks [`Router::next_deadline`]
//! when to call [`Router::tick`]. Message ids come from the injected [`IdSource`], so a run
//! is a function of its inputs: replayed with the same source, it gives the same actions.
//!
//! Rules (each has a test below):
//! * routing priority: local handler, then a channel that advertised the command, then the
//!   router channel, else `not_found`;
//! * a local registration with a router channel is escalated and completes on the ack; a
//!   registration arriving from a child is escalated too and acknowledged once the parent acks;
//! * a second owner anywhere in the tree gets `duplicate_command`; the same channel may
//!   re-register (a restarted worker);
//! * `list.commands.request` is sent on every new channel; list responses import remote
//!   commands (first owner wins, a local command is never overwritten; commands learned from
//!   the router channel rank below those advertised by any other channel);
//! * a forwarded request gets a fresh id and a route entry; the response travels back through
//!   it; a response is accepted only from the channel the request went to, and only once;
//! * a request is never forwarded back to the channel it came from;
//! * ids starting with `_` are never advertised, escalated or broadcast; an execute of one
//!   arriving from a channel is `not_found`;
//! * events flood to every channel but the one they came from and are delivered locally once
//!   (dedup by message id for `event_ttl`, in a table of at most `max_dedup` entries);
//! * calls and forwarded requests time out at `request_ttl`;
//! * closing a channel drops its commands and fails every call waiting on it and every request
//!   forwarded through it with `channel_disconnected`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

// A shared, immutable name (an atomic count, no lock): the crate uses nothing of std::sync.
use alloc::sync::Arc;

/// Hash maps keyed by ids that peers choose: aHash is fast, and keyed by the injected
/// [`IdSource`], so a peer cannot aim collisions at it.
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

use crate::codec::{self, Limits};
use crate::error::{CodecError, UsageError};
use crate::ids::IdSource;
use crate::message::{
    is_private, CommandDef, Encoding, ErrorCode, ExecError, ExecResult, Message, Payload,
    RegisterError,
};

/// Microseconds on the driver's monotonic clock.
pub type Micros = u64;

/// A channel's name as this registry knows the peer behind it.
pub type ChannelId = Arc<str>;

/// Configuration of one registry.
#[derive(Clone, Debug)]
pub struct Config {
    /// This registry's id.
    pub id: String,
    /// The channel towards the parent (the root has none).
    pub router_channel: Option<String>,
    /// How long a call or forwarded request may wait for its response.
    pub request_ttl: Micros,
    /// How long an event id is remembered for dedup.
    pub event_ttl: Micros,
    /// Maximum number of requests waiting for a response (local calls plus forwarded).
    pub max_pending: usize,
    /// Maximum number of one channel's requests this registry serves at once (handler runs
    /// plus requests it forwarded for that channel), so that one peer cannot take every
    /// slot of `max_pending` (its timed-out calls whose handlers still run, say).
    pub max_pending_per_channel: usize,
    /// Maximum number of commands one channel may register here.
    pub max_commands_per_channel: usize,
    /// Maximum size in bytes of a command definition a peer registers or lists (its id,
    /// description and schemas, as encoded).
    pub max_command_size: usize,
    /// Maximum number of event ids remembered for dedup.
    pub max_dedup: usize,
    /// Codec limits for inbound frames and local payloads.
    pub limits: Limits,
}

impl Config {
    /// A configuration with the defaults (30 s request TTL, 5 s event TTL).
    pub fn new(id: impl Into<String>) -> Self {
        Config {
            id: id.into(),
            router_channel: None,
            request_ttl: 30_000_000,
            event_ttl: 5_000_000,
            max_pending: 100_000,
            max_pending_per_channel: 50_000,
            max_commands_per_channel: 10_000,
            max_command_size: 256 * 1024,
            max_dedup: 100_000,
            limits: Limits::default(),
        }
    }
}

/// Why the router dropped an inbound message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropKind {
    /// A frame that could not be decoded, or a message that breaks the protocol.
    Invalid,
    /// A response from a channel other than the one the request was sent to.
    Spoofed,
    /// A response whose `thid` is unknown or already answered.
    Unknown,
    /// An event already seen (normal in a mesh).
    DuplicateEvent,
    /// A reply for a channel that has gone away.
    Undeliverable,
    /// A value the target channel's encoding cannot carry (bytes over JSON...).
    Unencodable,
    /// A re-announced command the router rejected or did not acknowledge.
    Rejected,
    /// Not sent: the channel's outbox was full (its peer is not reading).
    OutboxFull,
    /// Not sent: the encoded message breaks the size or depth limit (its receiver would
    /// have dropped it).
    OverLimit,
}

impl DropKind {
    /// Stable code.
    pub fn as_str(self) -> &'static str {
        match self {
            DropKind::Invalid => "invalid",
            DropKind::Spoofed => "spoofed",
            DropKind::Unknown => "unknown_thid",
            DropKind::DuplicateEvent => "duplicate_event",
            DropKind::Undeliverable => "undeliverable",
            DropKind::Unencodable => "unencodable",
            DropKind::Rejected => "rejected",
            DropKind::OutboxFull => "outbox_full",
            DropKind::OverLimit => "over_limit",
        }
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send `message` on `channel`.
    Send {
        /// Target channel.
        channel: ChannelId,
        /// Message to encode with the channel's encoding.
        message: Message,
    },
    /// Run the local handler `handler` for `command_id`, then call [`Router::complete_job`].
    RunHandler {
        /// Job id to complete.
        job: u64,
        /// Handler id given at registration.
        handler: u64,
        /// Command being executed.
        command_id: String,
        /// Request object, still encoded.
        request: Option<Payload>,
    },
    /// A local call (from [`Router::execute`]) finished.
    CallDone {
        /// The call's token.
        call: u64,
        /// Its outcome.
        result: ExecResult,
    },
    /// A local registration (from [`Router::register_local`]) finished.
    RegisterDone {
        /// The registration's token.
        call: u64,
        /// Its outcome (`duplicate_command`, `timeout` or `channel_disconnected` on failure).
        result: Result<(), ExecError>,
    },
    /// Deliver an event to local listeners.
    DeliverEvent {
        /// Event name.
        event_id: String,
        /// Payload, still encoded.
        payload: Option<Payload>,
    },
    /// A channel's peer answered with its command list (its commands are routable now).
    Listed {
        /// The channel.
        channel: ChannelId,
    },
    /// A message was dropped (for logs; already counted in the stats).
    Dropped {
        /// Channel it came from, if any.
        channel: Option<ChannelId>,
        /// Why.
        kind: DropKind,
        /// Human explanation.
        reason: String,
    },
}

/// Counters, as reported by [`Router::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Messages queued for sending on the channel.
    pub sent: u64,
    /// Messages received from the channel (including invalid ones).
    pub received: u64,
    /// Execute requests sent on the channel (this registry's calls and forwards).
    pub requests: u64,
    /// Of those, the ones still waiting for their response.
    pub in_flight: u64,
    /// Messages for the channel that were not sent (see [`Router::send_refused`]): its
    /// outbox was full, or the message broke the limits.
    pub dropped: u64,
}

/// Why the driver could not send a message the router queued (see
/// [`Router::send_refused`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The encoded message breaks the limits (too large or too deep for its receiver), or
    /// cannot be encoded for the channel at all.
    Codec(CodecError),
    /// The channel's outbox holds as many bytes as it may (its peer is not reading): the
    /// driver's explanation, for the caller.
    OutboxFull(String),
}

/// A snapshot of the router's counters and table sizes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Per attached channel.
    pub channels: Vec<(ChannelId, ChannelStats)>,
    /// Requests forwarded for other registries.
    pub forwarded: u64,
    /// Local calls waiting for an answer (remote or local handler).
    pub pending: usize,
    /// Requests forwarded and waiting for an answer.
    pub pending_forwards: usize,
    /// Messages dropped (invalid, spoofed, duplicate, undeliverable).
    pub dropped: u64,
    /// Event ids remembered for dedup.
    pub dedup_entries: usize,
    /// Handler runs not yet completed.
    pub jobs: usize,
}

/// How a command came to be routable through a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Learned {
    /// The channel registered it with us (it is in our subtree).
    Registered,
    /// The channel listed it (a mesh peer, or a child that listed before registering).
    Advertised,
    /// The router channel listed it: the lowest rank, the router is the fallback anyway.
    ViaRouter,
}

#[derive(Clone, Debug)]
enum Owner {
    Local {
        handler: u64,
    },
    Channel {
        channel: ChannelId,
        learned: Learned,
    },
    /// Registered by the members of one pool (replica set), each able to serve it.
    Pool {
        pool: Arc<str>,
        members: Vec<ChannelId>,
        /// Where the round-robin among equally loaded members starts next.
        next: usize,
    },
}

#[derive(Clone, Debug)]
struct Route {
    def: CommandDef,
    owner: Owner,
}

struct ChannelState {
    encoding: Encoding,
    stats: ChannelStats,
}

struct PendingCall {
    call: u64,
    channel: ChannelId,
    deadline: Micros,
}

struct Forward {
    origin: ChannelId,
    origin_id: String,
    target: ChannelId,
    deadline: Micros,
}

enum RegFor {
    Local {
        call: u64,
        handler: u64,
    },
    Child {
        channel: ChannelId,
        request_id: String,
    },
    /// A route this registry already holds, announced again to a router that came back.
    Again,
}

struct PendingReg {
    def: CommandDef,
    for_: RegFor,
    target: ChannelId,
    deadline: Micros,
}

enum Reply {
    Local(u64),
    Channel(ChannelId, String),
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Call,
    LocalCall,
    Forward,
    Registration,
}

/// The router of one registry. See the module documentation for its rules.
pub struct Router {
    config: Config,
    router_channel: Option<ChannelId>,
    channels: HashMap<ChannelId, ChannelState>,
    routes: HashMap<String, Route>,
    calls: HashMap<String, PendingCall>,
    forwards: HashMap<String, Forward>,
    registrations: HashMap<String, PendingReg>,
    jobs: HashMap<u64, Reply>,
    local_jobs: usize,
    /// Deadlines of local calls served by a local handler, by job.
    local_deadlines: HashMap<u64, Micros>,
    /// (deadline, arming order, what, key): the unique arming order settles ties, so the
    /// heap never compares keys.
    timers: BinaryHeap<Reverse<(Micros, u64, TimerKind, String)>>,
    timer_seq: u64,
    seen_events: HashMap<String, Micros>,
    seen_order: VecDeque<(Micros, String)>,
    next_token: u64,
    forwarded: u64,
    dropped: u64,
    actions: Vec<Action>,
    ids: Box<dyn IdSource>,
    /// Pool of each channel declared a pool member (kept across the channel's reconnects).
    pools: HashMap<String, Arc<str>>,
    /// Requests of each channel being served here (handler runs, forwards), while > 0: a
    /// handler may outlive its channel, so this is not in [`ChannelState`].
    serving: HashMap<ChannelId, usize>,
    /// Commands each channel registered here (routes it owns or is a pool member of).
    registered: HashMap<ChannelId, usize>,
    /// Registrations of each channel escalated to the router and not yet answered.
    escalating: HashMap<ChannelId, usize>,
}

impl Router {
    /// A router with no channels and no commands, taking its message ids and hash keys
    /// from `ids` (see [`crate::ids`]): the same config, source and inputs give the same
    /// actions.
    pub fn new(config: Config, mut ids: Box<dyn IdSource>) -> Self {
        let router_channel = config.router_channel.as_deref().map(Arc::from);
        let [k0, k1, k2, k3] = ids.hash_keys();
        let keys = ahash::RandomState::with_seeds(k0, k1, k2, k3);
        Router {
            config,
            router_channel,
            channels: HashMap::with_hasher(keys.clone()),
            routes: HashMap::with_hasher(keys.clone()),
            calls: HashMap::with_hasher(keys.clone()),
            forwards: HashMap::with_hasher(keys.clone()),
            registrations: HashMap::with_hasher(keys.clone()),
            jobs: HashMap::with_hasher(keys.clone()),
            local_jobs: 0,
            local_deadlines: HashMap::with_hasher(keys.clone()),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            seen_events: HashMap::with_hasher(keys.clone()),
            seen_order: VecDeque::new(),
            next_token: 1,
            forwarded: 0,
            dropped: 0,
            actions: Vec::new(),
            ids,
            pools: HashMap::with_hasher(keys.clone()),
            serving: HashMap::with_hasher(keys.clone()),
            registered: HashMap::with_hasher(keys.clone()),
            escalating: HashMap::with_hasher(keys),
        }
    }

    /// A fresh message id from the injected source.
    fn new_id(&mut self) -> String {
        self.ids.next_id()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Takes the actions queued so far, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// Moves the queued actions into `out` (keeps `out`'s allocation for the next round).
    pub fn drain_actions_into(&mut self, out: &mut Vec<Action>) {
        out.append(&mut self.actions);
    }

    /// Encoding of an attached channel.
    pub fn channel_encoding(&self, channel: &str) -> Option<Encoding> {
        self.channels.get(channel).map(|c| c.encoding)
    }

    /// Whether a channel with this name is attached.
    pub fn has_channel(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }

    /// Names of attached channels, sorted.
    pub fn channel_ids(&self) -> Vec<ChannelId> {
        let mut ids: Vec<ChannelId> = self.channels.keys().cloned().collect();
        ids.sort_unstable();
        ids
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn send(&mut self, channel: &ChannelId, message: Message) {
        if let Some(c) = self.channels.get_mut(channel) {
            c.stats.sent += 1;
        }
        self.actions.push(Action::Send {
            channel: channel.clone(),
            message,
        });
    }

    fn drop_msg(&mut self, channel: Option<&ChannelId>, kind: DropKind, reason: String) {
        self.dropped += 1;
        self.actions.push(Action::Dropped {
            channel: channel.cloned(),
            kind,
            reason,
        });
    }

    /// One more request of `channel` is being served here.
    fn serve_start(&mut self, channel: &ChannelId) {
        *self.serving.entry(channel.clone()).or_insert(0) += 1;
    }

    /// A request of `channel` served here ended (answered, timed out, or dropped).
    fn serve_end(&mut self, channel: &ChannelId) {
        if let Some(n) = self.serving.get_mut(channel) {
            *n -= 1;
            if *n == 0 {
                self.serving.remove(channel);
            }
        }
    }

    /// A registration of `channel` was escalated to the router: it holds a slot of the
    /// channel's requests (`max_pending_per_channel`) and counts as one of its commands
    /// (`max_commands_per_channel`) until answered.
    fn escalation_start(&mut self, channel: &ChannelId) {
        self.serve_start(channel);
        *self.escalating.entry(channel.clone()).or_insert(0) += 1;
    }

    /// The router answered (or dropped) an escalated registration of `channel`.
    fn escalation_end(&mut self, channel: &ChannelId) {
        self.serve_end(channel);
        if let Some(n) = self.escalating.get_mut(channel) {
            *n -= 1;
            if *n == 0 {
                self.escalating.remove(channel);
            }
        }
    }

    /// Requests of `channel` being served here.
    pub fn serving(&self, channel: &str) -> usize {
        self.serving.get(channel).copied().unwrap_or(0)
    }

    fn in_flight(&self) -> usize {
        self.calls.len() + self.forwards.len() + self.registrations.len() + self.jobs.len()
    }

    /// Declares channel `channel` a member of pool `pool` (`None`: of no pool). Members of
    /// one pool may all register the same command: the router then chooses among the live
    /// members for each call (fewest requests in flight, ties in turn) and registers the
    /// command upward once. A provider outside the pool is still `duplicate_command`. The
    /// declaration outlives the channel's closes, so a restarted member rejoins.
    pub fn set_pool(&mut self, channel: &str, pool: Option<&str>) {
        match pool {
            Some(p) => {
                self.pools.insert(channel.to_string(), Arc::from(p));
            }
            None => {
                self.pools.remove(channel);
            }
        }
    }

    /// Whether `command_id` is served by a pool here.
    pub fn is_pooled(&self, command_id: &str) -> bool {
        matches!(
            self.routes.get(command_id),
            Some(Route {
                owner: Owner::Pool { .. },
                ..
            })
        )
    }

    /// The pool `channel` was declared a member of.
    pub fn pool_of(&self, channel: &str) -> Option<&str> {
        self.pools.get(channel).map(|p| &**p)
    }

    fn request_sent(&mut self, channel: &ChannelId) {
        if let Some(c) = self.channels.get_mut(channel) {
            c.stats.requests += 1;
            c.stats.in_flight += 1;
        }
    }

    fn request_ended(&mut self, channel: &ChannelId) {
        if let Some(c) = self.channels.get_mut(channel) {
            c.stats.in_flight = c.stats.in_flight.saturating_sub(1);
        }
    }

    /// The member of the pool serving `command_id` that the next call goes to (and its
    /// index): the live member (other than `except`) with the fewest requests in flight,
    /// the first such from the round-robin position on.
    fn peek_member(
        &self,
        command_id: &str,
        except: Option<&ChannelId>,
    ) -> Option<(&ChannelId, usize)> {
        let Some(Route {
            owner: Owner::Pool { members, next, .. },
            ..
        }) = self.routes.get(command_id)
        else {
            return None;
        };
        let n = members.len();
        let mut best: Option<(&ChannelId, usize, u64)> = None;
        for k in 0..n {
            let i = (next + k) % n;
            let m = &members[i];
            if Some(m) == except {
                continue;
            }
            let Some(state) = self.channels.get(m) else {
                continue;
            };
            if best.map_or(true, |(_, _, load)| state.stats.in_flight < load) {
                best = Some((m, i, state.stats.in_flight));
            }
        }
        best.map(|(m, i, _)| (m, i))
    }

    /// [`Router::peek_member`], and the round-robin moves past the chosen member.
    fn pick_member(
        &mut self,
        command_id: &str,
        except: Option<&ChannelId>,
        advance: bool,
    ) -> Option<ChannelId> {
        let (member, index) = self
            .peek_member(command_id, except)
            .map(|(m, i)| (m.clone(), i))?;
        if advance {
            if let Some(Route {
                owner: Owner::Pool { members, next, .. },
                ..
            }) = self.routes.get_mut(command_id)
            {
                *next = (index + 1) % members.len().max(1);
            }
        }
        Some(member)
    }

    fn channel_arc(&self, name: &str) -> Option<ChannelId> {
        self.channels.get_key_value(name).map(|(k, _)| k.clone())
    }

    /// Converts a value to the encoding of the channel it is about to be sent on, so that a
    /// value the channel cannot carry fails the decision now rather than the send later.
    fn adapt(
        &self,
        payload: Option<Payload>,
        channel: &ChannelId,
    ) -> Result<Option<Payload>, CodecError> {
        let (Some(p), Some(c)) = (payload.as_ref(), self.channels.get(channel)) else {
            return Ok(payload);
        };
        if p.encoding == c.encoding {
            return Ok(payload);
        }
        let data = codec::payload_in(p, c.encoding)?.into_owned();
        Ok(Some(Payload::new(c.encoding, data)))
    }

    /// [`Router::adapt`] for a result on its way back: an unencodable result becomes an
    /// `internal_error` for the caller.
    fn adapt_result(&self, result: ExecResult, channel: &ChannelId) -> ExecResult {
        match result {
            Ok(value) => self.adapt(value, channel).map_err(|e| {
                ExecError::new(
                    ErrorCode::InternalError,
                    format!("the result cannot be sent to '{channel}': {e}"),
                )
            }),
            err => err,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Channels
    // -----------------------------------------------------------------------------------------

    /// Attaches a channel and asks the peer for its commands.
    pub fn add_channel(&mut self, name: &str, encoding: Encoding) -> Result<(), UsageError> {
        if name.is_empty() {
            return Err(UsageError::EmptyId("channel id"));
        }
        if self.channels.contains_key(name) {
            return Err(UsageError::DuplicateChannel(name.to_string()));
        }
        let id: ChannelId = Arc::from(name);
        self.channels.insert(
            id.clone(),
            ChannelState {
                encoding,
                stats: ChannelStats::default(),
            },
        );
        let msg_id = self.new_id();
        self.send(&id, Message::ListRequest { id: msg_id });
        Ok(())
    }

    /// Detaches a channel: its commands are dropped and everything waiting on it fails.
    pub fn close_channel(&mut self, name: &str) -> Result<(), UsageError> {
        let Some((id, _)) = self.channels.remove_entry(name) else {
            return Err(UsageError::UnknownChannel(name.to_string()));
        };
        self.registered.remove(&id);
        self.routes.retain(|_, r| match &mut r.owner {
            Owner::Channel { channel, .. } => channel != &id,
            Owner::Local { .. } => true,
            Owner::Pool { members, next, .. } => {
                // Only the calls in flight on this member fail (below); the others serve on.
                members.retain(|m| m != &id);
                *next = 0;
                !members.is_empty()
            }
        });
        let disconnected = |what: &str| {
            ExecError::new(
                ErrorCode::ChannelDisconnected,
                format!("channel '{id}' closed while {what} was in flight"),
            )
        };
        let mut failed_calls: Vec<(String, u64)> = self
            .calls
            .iter()
            .filter(|(_, c)| c.channel == id)
            .map(|(k, c)| (k.clone(), c.call))
            .collect();
        failed_calls.sort_by_key(|(_, call)| *call);
        for (key, call) in failed_calls {
            self.calls.remove(&key);
            self.actions.push(Action::CallDone {
                call,
                result: Err(disconnected("the call")),
            });
        }
        let mut dead_forwards: Vec<String> = self
            .forwards
            .iter()
            .filter(|(_, f)| f.target == id || f.origin == id)
            .map(|(k, _)| k.clone())
            .collect();
        // In a fixed order (the table's order depends on its keys): a run replays exactly.
        dead_forwards.sort_unstable();
        for key in dead_forwards {
            if let Some(f) = self.forwards.remove(&key) {
                self.serve_end(&f.origin);
                if f.target == id && self.channels.contains_key(&f.origin) {
                    let err = disconnected("a forwarded request");
                    let msg_id = self.new_id();
                    self.send(
                        &f.origin,
                        Message::ExecuteResponse {
                            id: msg_id,
                            thid: f.origin_id,
                            response: Err(err),
                        },
                    );
                }
            }
        }
        let mut dead_regs: Vec<String> = self
            .registrations
            .iter()
            .filter(|(_, r)| {
                r.target == id || matches!(&r.for_, RegFor::Child { channel, .. } if channel == &id)
            })
            .map(|(k, _)| k.clone())
            .collect();
        dead_regs.sort_unstable();
        for key in dead_regs {
            if let Some(r) = self.registrations.remove(&key) {
                // A child's registration has no wire error for this case; the child's own
                // request TTL ends it. A local one fails now.
                match r.for_ {
                    RegFor::Local { call, .. } => self.actions.push(Action::RegisterDone {
                        call,
                        result: Err(disconnected("the registration")),
                    }),
                    RegFor::Child { channel, .. } => self.escalation_end(&channel),
                    RegFor::Again => {}
                }
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Local inputs
    // -----------------------------------------------------------------------------------------

    /// Starts a local call; its outcome arrives as [`Action::CallDone`] with the returned token.
    ///
    /// `ttl` overrides the request TTL for this call.
    pub fn execute(
        &mut self,
        command_id: &str,
        request: Option<Payload>,
        ttl: Option<Micros>,
        now: Micros,
    ) -> u64 {
        let call = self.token();
        if command_id.is_empty() {
            self.actions.push(Action::CallDone {
                call,
                result: Err(ExecError::new(
                    ErrorCode::InvalidRequest,
                    "command id must be a non-empty string",
                )),
            });
            return call;
        }
        if let Some(r) = &request {
            let checked = if r.is_object() {
                codec::validate_payload(r, &self.config.limits, codec::level::REQUEST)
                    .map_err(|e| e.to_string())
            } else {
                Err("a request must be an object (a dict), or absent".to_string())
            };
            if let Err(msg) = checked {
                self.actions.push(Action::CallDone {
                    call,
                    result: Err(ExecError::new(ErrorCode::InvalidRequest, msg)),
                });
                return call;
            }
        }
        let target = match self.routes.get(command_id) {
            Some(Route {
                owner: Owner::Local { handler },
                ..
            }) => {
                let handler = *handler;
                if self.in_flight() >= self.config.max_pending {
                    self.actions.push(Action::CallDone {
                        call,
                        result: Err(self.too_busy()),
                    });
                    return call;
                }
                let job = self.token();
                self.jobs.insert(job, Reply::Local(call));
                self.local_jobs += 1;
                let deadline = now.saturating_add(ttl.unwrap_or(self.config.request_ttl));
                self.local_deadlines.insert(job, deadline);
                self.arm(deadline, TimerKind::LocalCall, job.to_string());
                self.actions.push(Action::RunHandler {
                    job,
                    handler,
                    command_id: command_id.to_string(),
                    request,
                });
                return call;
            }
            _ if is_private(command_id) => None,
            Some(Route {
                owner: Owner::Channel { channel, .. },
                ..
            }) => Some(channel.clone()),
            Some(Route {
                owner: Owner::Pool { .. },
                ..
            }) => self.pick_member(command_id, None, true),
            None => self.router_channel.clone(),
        };
        let Some(target) = target else {
            self.actions.push(Action::CallDone {
                call,
                result: Err(self.not_found(command_id)),
            });
            return call;
        };
        if !self.channels.contains_key(&target) {
            self.actions.push(Action::CallDone {
                call,
                result: Err(ExecError::new(
                    ErrorCode::ChannelDisconnected,
                    format!("router channel '{target}' is not connected"),
                )),
            });
            return call;
        }
        if self.in_flight() >= self.config.max_pending {
            self.actions.push(Action::CallDone {
                call,
                result: Err(self.too_busy()),
            });
            return call;
        }
        let request = match self.adapt(request, &target) {
            Ok(r) => r,
            Err(e) => {
                self.actions.push(Action::CallDone {
                    call,
                    result: Err(ExecError::new(
                        ErrorCode::InvalidRequest,
                        format!("request for '{command_id}' cannot be sent to '{target}': {e}"),
                    )),
                });
                return call;
            }
        };
        let id = self.new_id();
        let deadline = now.saturating_add(ttl.unwrap_or(self.config.request_ttl));
        self.arm(deadline, TimerKind::Call, id.clone());
        self.request_sent(&target);
        self.calls.insert(
            id.clone(),
            PendingCall {
                call,
                channel: target.clone(),
                deadline,
            },
        );
        self.send(
            &target,
            Message::ExecuteRequest {
                id,
                command_id: command_id.to_string(),
                request,
            },
        );
        call
    }

    /// Forgets a local call whose caller stopped waiting (cancelled). Its late response, if
    /// any, is dropped as unknown.
    pub fn cancel_call(&mut self, call: u64) {
        let mut answered = Vec::new();
        self.calls.retain(|_, c| {
            let keep = c.call != call;
            if !keep {
                answered.push(c.channel.clone());
            }
            keep
        });
        for channel in answered {
            self.request_ended(&channel);
        }
        let jobs: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, r)| matches!(r, Reply::Local(c) if *c == call))
            .map(|(j, _)| *j)
            .collect();
        for job in jobs {
            self.forget_local_job(job);
        }
    }

    fn forget_local_job(&mut self, job: u64) {
        if let Some(Reply::Local(_)) = self.jobs.remove(&job) {
            self.local_jobs -= 1;
        }
        self.local_deadlines.remove(&job);
    }

    fn not_found(&self, command_id: &str) -> ExecError {
        let mut close: Vec<&str> = self
            .routes
            .keys()
            .filter(|k| !is_private(k) && similar(k, command_id))
            .map(String::as_str)
            .collect();
        close.sort_unstable();
        close.truncate(3);
        let hint = if close.is_empty() {
            String::new()
        } else {
            format!("; did you mean {}?", close.join(", "))
        };
        ExecError::new(
            ErrorCode::NotFound,
            format!(
                "command '{command_id}' is not registered anywhere registry '{}' can reach{hint}",
                self.config.id
            ),
        )
    }

    fn too_busy(&self) -> ExecError {
        ExecError::new(
            ErrorCode::InternalError,
            format!(
                "registry '{}' has {} requests in flight (max_pending); retry later",
                self.config.id, self.config.max_pending
            ),
        )
    }

    /// Reports the outcome of a [`Action::RunHandler`] job.
    pub fn complete_job(&mut self, job: u64, result: ExecResult) -> Result<(), UsageError> {
        let reply = self.jobs.remove(&job).ok_or(UsageError::UnknownJob(job))?;
        match reply {
            Reply::Local(call) => {
                self.local_jobs -= 1;
                self.local_deadlines.remove(&job);
                self.actions.push(Action::CallDone { call, result });
            }
            Reply::Channel(channel, thid) => {
                self.serve_end(&channel);
                if self.channels.contains_key(&channel) {
                    let result = self.adapt_result(result, &channel);
                    let limit = self.config.limits.max_message_size;
                    let result = match result {
                        Ok(Some(p)) if p.data.len() > limit => Err(ExecError::new(
                            ErrorCode::InternalError,
                            format!(
                                "the result ({} bytes) exceeds the message size limit of {limit} bytes",
                                p.data.len()
                            ),
                        )),
                        other => other,
                    };
                    let msg_id = self.new_id();
                    self.send(
                        &channel,
                        Message::ExecuteResponse {
                            id: msg_id,
                            thid,
                            response: result,
                        },
                    );
                } else {
                    self.drop_msg(
                        Some(&channel),
                        DropKind::Undeliverable,
                        format!("reply to '{thid}' dropped: channel '{channel}' has closed"),
                    );
                }
            }
        }
        Ok(())
    }

    fn owner_conflict(&self, command_id: &str, from: Option<&ChannelId>) -> Option<String> {
        match self.routes.get(command_id).map(|r| &r.owner) {
            Some(Owner::Local { .. }) => Some(format!(
                "command '{command_id}' is already registered locally in registry '{}'",
                self.config.id
            )),
            Some(Owner::Channel { channel, learned })
                if *learned != Learned::ViaRouter && Some(channel) != from =>
            {
                Some(format!(
                    "command '{command_id}' is already owned by channel '{channel}' of registry '{}'",
                    self.config.id
                ))
            }
            Some(Owner::Pool { pool, .. })
                if from.and_then(|f| self.pools.get(&**f)) != Some(pool) =>
            {
                Some(format!(
                    "command '{command_id}' is already served by pool '{pool}' of registry '{}'",
                    self.config.id
                ))
            }
            _ => None,
        }
    }

    /// Registers a local command with handler id `handler`; the outcome arrives as
    /// [`Action::RegisterDone`]. With a router channel (and a public id) the registration is
    /// escalated and completes on the router's ack.
    pub fn register_local(&mut self, def: CommandDef, handler: u64, now: Micros) -> u64 {
        let call = self.token();
        if def.id.is_empty() {
            self.actions.push(Action::RegisterDone {
                call,
                result: Err(ExecError::new(
                    ErrorCode::InvalidRequest,
                    "command id must be a non-empty string",
                )),
            });
            return call;
        }
        if let Some(msg) = self.owner_conflict(&def.id, None) {
            self.actions.push(Action::RegisterDone {
                call,
                result: Err(ExecError::new(ErrorCode::DuplicateCommand, msg)),
            });
            return call;
        }
        let router = match &self.router_channel {
            Some(r) if !is_private(&def.id) => r.clone(),
            _ => {
                self.routes.insert(
                    def.id.clone(),
                    Route {
                        def,
                        owner: Owner::Local { handler },
                    },
                );
                self.actions.push(Action::RegisterDone {
                    call,
                    result: Ok(()),
                });
                return call;
            }
        };
        if !self.channels.contains_key(&router) {
            self.actions.push(Action::RegisterDone {
                call,
                result: Err(ExecError::new(
                    ErrorCode::ChannelDisconnected,
                    format!("router channel '{router}' is not connected"),
                )),
            });
            return call;
        }
        self.escalate(def, RegFor::Local { call, handler }, router, now);
        call
    }

    /// Registers again, with the router channel, every public command of this registry's
    /// subtree (its local commands and those its children registered). A driver calls this
    /// when the router channel comes back after a disconnect (a reconnecting WebSocket, say):
    /// the router forgot them when the old channel closed. Returns how many were sent. A
    /// rejection (another registry took the id meanwhile) or a timeout is reported as
    /// [`Action::Dropped`] with [`DropKind::Rejected`]; the local route is kept.
    pub fn reannounce(&mut self, now: Micros) -> usize {
        let Some(router) = self.router_channel.clone() else {
            return 0;
        };
        if !self.channels.contains_key(&router) {
            return 0;
        }
        let defs = self.subtree_except(&router);
        let n = defs.len();
        for def in defs {
            self.escalate(def, RegFor::Again, router.clone(), now);
        }
        n
    }

    fn escalate(&mut self, def: CommandDef, for_: RegFor, router: ChannelId, now: Micros) {
        let id = self.new_id();
        let deadline = now.saturating_add(self.config.request_ttl);
        self.arm(deadline, TimerKind::Registration, id.clone());
        self.send(
            &router,
            Message::RegisterRequest {
                id: id.clone(),
                command: def.clone(),
            },
        );
        self.registrations.insert(
            id,
            PendingReg {
                def,
                for_,
                target: router,
                deadline,
            },
        );
    }

    /// Removes a local command (the spec has no unregister message: peers that learned it
    /// keep routing to this registry, which answers `not_found`).
    pub fn unregister_local(&mut self, command_id: &str) -> bool {
        if matches!(
            self.routes.get(command_id),
            Some(Route {
                owner: Owner::Local { .. },
                ..
            })
        ) {
            self.routes.remove(command_id);
            return true;
        }
        false
    }

    /// Emits an event: delivered locally once, and flooded to every channel unless private.
    /// Returns the message id used.
    pub fn emit_event(&mut self, event_id: &str, payload: Option<Payload>, now: Micros) -> String {
        let id = self.new_id();
        self.remember_event(&id, now);
        self.actions.push(Action::DeliverEvent {
            event_id: event_id.to_string(),
            payload: payload.clone(),
        });
        if !is_private(event_id) {
            self.flood(&id, event_id, payload, None);
        }
        id
    }

    fn flood(&mut self, id: &str, event_id: &str, payload: Option<Payload>, except: Option<&str>) {
        let mut targets: Vec<ChannelId> = self
            .channels
            .keys()
            .filter(|c| Some(&***c) != except)
            .cloned()
            .collect();
        targets.sort();
        for t in targets {
            match self.adapt(payload.clone(), &t) {
                Ok(payload) => self.send(
                    &t,
                    Message::Event {
                        id: id.to_string(),
                        event_id: event_id.to_string(),
                        payload,
                    },
                ),
                Err(e) => self.drop_msg(
                    Some(&t),
                    DropKind::Unencodable,
                    format!("event '{event_id}' not sent to '{t}': {e}"),
                ),
            }
        }
    }

    /// Records an event id; returns false if it was already seen within `event_ttl`.
    fn remember_event(&mut self, id: &str, now: Micros) -> bool {
        self.expire_events(now);
        if self.seen_events.contains_key(id) {
            return false;
        }
        while self.seen_events.len() >= self.config.max_dedup.max(1) {
            match self.seen_order.pop_front() {
                Some((_, old)) => {
                    self.seen_events.remove(&old);
                }
                None => break,
            }
        }
        let expiry = now.saturating_add(self.config.event_ttl);
        self.seen_events.insert(id.to_string(), expiry);
        self.seen_order.push_back((expiry, id.to_string()));
        true
    }

    fn expire_events(&mut self, now: Micros) {
        while let Some((expiry, _)) = self.seen_order.front() {
            if *expiry > now {
                break;
            }
            if let Some((_, id)) = self.seen_order.pop_front() {
                self.seen_events.remove(&id);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Inbound
    // -----------------------------------------------------------------------------------------

    /// Decodes a frame with the channel's encoding and handles it. A frame that cannot be
    /// decoded is dropped (and answered `invalid_request` when it was recognisably an execute
    /// request); the error is returned so the driver may disconnect a misbehaving peer.
    pub fn handle_frame(
        &mut self,
        channel: &str,
        frame: &[u8],
        now: Micros,
    ) -> Result<(), InboundError> {
        let Some(id) = self.channel_arc(channel) else {
            return Err(InboundError::Usage(UsageError::UnknownChannel(
                channel.to_string(),
            )));
        };
        let encoding = self.channels[&id].encoding;
        match codec::decode(frame, encoding, &self.config.limits) {
            Ok(message) => {
                self.handle_message_from(&id, message, now);
                Ok(())
            }
            Err(err) => {
                if let Some(c) = self.channels.get_mut(&id) {
                    c.stats.received += 1;
                }
                if let Some(thid) = codec::sniff_execute_response(frame, encoding, &err) {
                    // Whoever waits for it learns at once that it came and could not be read.
                    let error = ExecError::new(
                        ErrorCode::InternalError,
                        format!("the response from '{id}' could not be read: {err}"),
                    );
                    self.on_execute_response(&id, thid, Err(error));
                }
                if let Some(request_id) = codec::sniff_execute_request(frame, encoding, &err) {
                    let msg_id = self.new_id();
                    self.send(
                        &id,
                        Message::ExecuteResponse {
                            id: msg_id,
                            thid: request_id,
                            response: Err(ExecError::new(
                                ErrorCode::InvalidRequest,
                                format!("request rejected by registry '{}': {err}", self.config.id),
                            )),
                        },
                    );
                }
                self.drop_msg(
                    Some(&id),
                    DropKind::Invalid,
                    format!("[{}] {err}", err.code()),
                );
                Err(InboundError::Codec(err))
            }
        }
    }

    /// Handles a decoded message from an attached channel.
    pub fn handle_message(
        &mut self,
        channel: &str,
        message: Message,
        now: Micros,
    ) -> Result<(), UsageError> {
        let id = self
            .channel_arc(channel)
            .ok_or_else(|| UsageError::UnknownChannel(channel.to_string()))?;
        self.handle_message_from(&id, message, now);
        Ok(())
    }

    fn handle_message_from(&mut self, from: &ChannelId, message: Message, now: Micros) {
        if let Some(c) = self.channels.get_mut(from) {
            c.stats.received += 1;
        }
        match message {
            Message::ExecuteRequest {
                id,
                command_id,
                request,
            } => self.on_execute_request(from, id, command_id, request, now),
            Message::ExecuteResponse { thid, response, .. } => {
                self.on_execute_response(from, thid, response)
            }
            Message::RegisterRequest { id, command } => {
                self.on_register_request(from, id, command, now)
            }
            Message::RegisterResponse { thid, response, .. } => {
                self.on_register_response(from, thid, response)
            }
            Message::ListRequest { id } => self.on_list_request(from, id),
            Message::ListResponse { commands, .. } => self.on_list_response(from, commands),
            Message::Event {
                id,
                event_id,
                payload,
            } => self.on_event(from, id, event_id, payload, now),
        }
    }

    fn reply_error(&mut self, to: &ChannelId, thid: String, err: ExecError) {
        let msg_id = self.new_id();
        self.send(
            to,
            Message::ExecuteResponse {
                id: msg_id,
                thid,
                response: Err(err),
            },
        );
    }

    /// The driver could not send `message`, which the router queued for `channel` (an
    /// [`Action::Send`]), for the reason `why`. Nobody waits in vain for it:
    ///
    /// * an execute request fails its caller at once (`invalid_request` when it breaks the
    ///   limits, `internal_error` when the outbox is full); a forwarded one is answered so
    ///   to the channel it came from;
    /// * an execute response whose result breaks the limits is answered `internal_error`
    ///   instead (what the receiver would have dropped never reaches it); with a full
    ///   outbox it is dropped: the peer is not reading its answers;
    /// * a registration of a local command fails; anything else is dropped.
    ///
    /// Each counts in the channel's `dropped`; what is dropped unanswered also in the
    /// router's. Over a full outbox nothing is reported per message (the driver reports the
    /// outbox once): a stopped peer may be sent thousands of events a second.
    pub fn send_refused(&mut self, channel: &str, message: Message, why: Refusal) {
        let Some(channel) = self.channel_arc(channel) else {
            return; // gone meanwhile: what waited on it failed with the close
        };
        if let Some(c) = self.channels.get_mut(&channel) {
            c.stats.dropped += 1;
        }
        let full = matches!(why, Refusal::OutboxFull(_));
        let reason = match &why {
            Refusal::Codec(e) => format!("[{}] {e}", e.code()),
            Refusal::OutboxFull(r) => r.clone(),
        };
        let what = message.type_name();
        match message {
            Message::ExecuteRequest { id, command_id, .. } => {
                let code = if full {
                    ErrorCode::InternalError
                } else {
                    ErrorCode::InvalidRequest
                };
                let err = ExecError::new(
                    code,
                    format!("request for '{command_id}' not sent to '{channel}': {reason}"),
                );
                if let Some(c) = self.calls.remove(&id) {
                    self.request_ended(&c.channel);
                    self.actions.push(Action::CallDone {
                        call: c.call,
                        result: Err(err),
                    });
                } else if let Some(f) = self.forwards.remove(&id) {
                    self.request_ended(&f.target);
                    self.serve_end(&f.origin);
                    if self.channels.contains_key(&f.origin) {
                        self.reply_error(&f.origin, f.origin_id, err);
                    }
                }
            }
            Message::ExecuteResponse { thid, response, .. } if !full => {
                // The result (or an error's long message) is replaced by a short error; a
                // short error refused again is dropped, so this ends.
                let replace = match &response {
                    Ok(_) => true,
                    Err(e) => e.message.len() > 256,
                };
                if replace {
                    let err = ExecError::new(
                        ErrorCode::InternalError,
                        format!(
                            "registry '{}' could not send the response: {reason}",
                            self.config.id
                        ),
                    );
                    self.reply_error(&channel, thid, err);
                } else {
                    self.drop_msg(
                        Some(&channel),
                        DropKind::OverLimit,
                        format!("{what} to '{channel}' not sent: {reason}"),
                    );
                }
            }
            Message::RegisterRequest { id, .. } => {
                if let Some(r) = self.registrations.remove(&id) {
                    match r.for_ {
                        RegFor::Local { call, .. } => self.actions.push(Action::RegisterDone {
                            call,
                            result: Err(ExecError::new(
                                ErrorCode::InternalError,
                                format!("registration not sent to '{channel}': {reason}"),
                            )),
                        }),
                        // The child's own request TTL ends its wait (spec-v1 has no other
                        // registration error than duplicate_command).
                        RegFor::Child { channel: child, .. } => self.escalation_end(&child),
                        RegFor::Again => {}
                    }
                }
                self.refused_drop(
                    &channel,
                    full,
                    format!("{what} to '{channel}' not sent: {reason}"),
                );
            }
            _ => self.refused_drop(
                &channel,
                full,
                format!("{what} to '{channel}' not sent: {reason}"),
            ),
        }
    }

    /// Counts a message dropped unsent; reported, unless for a full outbox (see
    /// [`Router::send_refused`]).
    fn refused_drop(&mut self, channel: &ChannelId, full: bool, reason: String) {
        if full {
            self.dropped += 1;
        } else {
            self.drop_msg(Some(channel), DropKind::OverLimit, reason);
        }
    }

    fn on_execute_request(
        &mut self,
        from: &ChannelId,
        id: String,
        command_id: String,
        request: Option<Payload>,
        now: Micros,
    ) {
        if is_private(&command_id) {
            // Private commands are reachable only from inside their own registry.
            let err = self.not_found(&command_id);
            return self.reply_error(from, id, err);
        }
        let serving = self.serving(from);
        if serving >= self.config.max_pending_per_channel {
            let err = ExecError::new(
                ErrorCode::InternalError,
                format!(
                    "registry '{}' is serving {serving} requests of channel '{from}' \
                     (max_pending_per_channel); retry later",
                    self.config.id
                ),
            );
            return self.reply_error(from, id, err);
        }
        let target = match self.routes.get(&command_id) {
            Some(Route {
                owner: Owner::Local { handler },
                ..
            }) => {
                let handler = *handler;
                if self.in_flight() >= self.config.max_pending {
                    let err = self.too_busy();
                    return self.reply_error(from, id, err);
                }
                let job = self.token();
                self.jobs.insert(job, Reply::Channel(from.clone(), id));
                self.serve_start(from);
                self.actions.push(Action::RunHandler {
                    job,
                    handler,
                    command_id,
                    request,
                });
                return;
            }
            Some(Route {
                owner: Owner::Channel { channel, .. },
                ..
            }) if channel != from => Some(channel.clone()),
            Some(Route {
                owner: Owner::Pool { .. },
                ..
            }) => self.pick_member(&command_id, Some(from), true),
            // Loop guard: never back to the channel the request came from.
            _ => self.router_channel.clone().filter(|r| r != from),
        };
        let Some(target) = target else {
            let err = self.not_found(&command_id);
            return self.reply_error(from, id, err);
        };
        if !self.channels.contains_key(&target) {
            // The router channel is configured but detached (a reconnecting link): the
            // command may well exist above, so this is not `not_found`.
            let err = ExecError::new(
                ErrorCode::ChannelDisconnected,
                format!("router channel '{target}' is not connected"),
            );
            return self.reply_error(from, id, err);
        }
        if self.in_flight() >= self.config.max_pending {
            let err = self.too_busy();
            return self.reply_error(from, id, err);
        }
        let request = match self.adapt(request, &target) {
            Ok(r) => r,
            Err(e) => {
                let err = ExecError::new(
                    ErrorCode::InvalidRequest,
                    format!("request for '{command_id}' cannot be forwarded to '{target}': {e}"),
                );
                return self.reply_error(from, id, err);
            }
        };
        let out_id = self.new_id();
        let deadline = now.saturating_add(self.config.request_ttl);
        self.arm(deadline, TimerKind::Forward, out_id.clone());
        self.forwards.insert(
            out_id.clone(),
            Forward {
                origin: from.clone(),
                origin_id: id,
                target: target.clone(),
                deadline,
            },
        );
        self.forwarded += 1;
        self.serve_start(from);
        self.request_sent(&target);
        self.send(
            &target,
            Message::ExecuteRequest {
                id: out_id,
                command_id,
                request,
            },
        );
    }

    fn on_execute_response(&mut self, from: &ChannelId, thid: String, response: ExecResult) {
        if let Some(c) = self.calls.get(&thid) {
            if &c.channel != from {
                let reason = format!(
                    "response to '{thid}' from '{from}' ignored: the request went to '{}'",
                    c.channel
                );
                return self.drop_msg(Some(from), DropKind::Spoofed, reason);
            }
            if let Some(c) = self.calls.remove(&thid) {
                self.request_ended(&c.channel);
                self.actions.push(Action::CallDone {
                    call: c.call,
                    result: response,
                });
            }
            return;
        }
        if let Some(f) = self.forwards.get(&thid) {
            if &f.target != from {
                let reason = format!(
                    "response to '{thid}' from '{from}' ignored: the request went to '{}'",
                    f.target
                );
                return self.drop_msg(Some(from), DropKind::Spoofed, reason);
            }
            if let Some(f) = self.forwards.remove(&thid) {
                self.request_ended(&f.target);
                self.serve_end(&f.origin);
                if self.channels.contains_key(&f.origin) {
                    let response = self.adapt_result(response, &f.origin);
                    let msg_id = self.new_id();
                    self.send(
                        &f.origin,
                        Message::ExecuteResponse {
                            id: msg_id,
                            thid: f.origin_id,
                            response,
                        },
                    );
                }
            }
            return;
        }
        self.drop_msg(
            Some(from),
            DropKind::Unknown,
            format!("response to unknown or already answered request '{thid}'"),
        );
    }

    fn on_register_request(
        &mut self,
        from: &ChannelId,
        id: String,
        command: CommandDef,
        now: Micros,
    ) {
        if let Some(reason) = self.over_registration_bounds(from, &command) {
            // spec-v1 has one registration error: the peer is told `duplicate_command`, and
            // the real reason is logged here.
            self.drop_msg(Some(from), DropKind::Rejected, reason);
            return self.answer_registration(from, id, Err(RegisterError::DuplicateCommand));
        }
        if self.owner_conflict(&command.id, Some(from)).is_some() {
            return self.answer_registration(from, id, Err(RegisterError::DuplicateCommand));
        }
        // The same definition again from the channel that holds it: the tree knows it
        // already, so it is acknowledged here (a flood of these escalates nothing).
        let unchanged = self.registered_by(from, &command.id)
            && self
                .routes
                .get(&command.id)
                .is_some_and(|r| r.def == command);
        if unchanged {
            return self.answer_registration(from, id, Ok(()));
        }
        // A pool registers its command upward once: a member joining a pool that already
        // serves the command (or is registering it now) is accepted here.
        let joins = self.pools.get(&**from).is_some_and(|pool| {
            matches!(self.routes.get(&command.id),
                Some(Route { owner: Owner::Pool { pool: p, .. }, .. }) if p == pool)
                || self.registrations.values().any(|r| {
                    r.def.id == command.id
                        && matches!(&r.for_, RegFor::Child { channel, .. }
                            if self.pools.get(&**channel) == Some(pool))
                })
        });
        match self.router_channel.clone() {
            _ if joins => {
                self.accept_child_registration(from, command);
                self.answer_registration(from, id, Ok(()));
            }
            Some(router)
                if &router != from
                    && !is_private(&command.id)
                    && self.channels.contains_key(&router) =>
            {
                let serving = self.serving(from);
                if serving >= self.config.max_pending_per_channel
                    || self.in_flight() >= self.config.max_pending
                {
                    let reason = format!(
                        "registration of '{}' refused: registry '{}' is serving {serving} \
                         requests of channel '{from}' (max_pending_per_channel) or {} in all \
                         (max_pending)",
                        truncated(&command.id),
                        self.config.id,
                        self.in_flight()
                    );
                    self.drop_msg(Some(from), DropKind::Rejected, reason);
                    return self.answer_registration(
                        from,
                        id,
                        Err(RegisterError::DuplicateCommand),
                    );
                }
                self.escalation_start(from);
                self.escalate(
                    command,
                    RegFor::Child {
                        channel: from.clone(),
                        request_id: id,
                    },
                    router,
                    now,
                );
            }
            _ => {
                self.accept_child_registration(from, command);
                self.answer_registration(from, id, Ok(()));
            }
        }
    }

    /// Answers the registration request `thid` of `to`.
    fn answer_registration(
        &mut self,
        to: &ChannelId,
        thid: String,
        response: Result<(), RegisterError>,
    ) {
        let msg_id = self.new_id();
        self.send(
            to,
            Message::RegisterResponse {
                id: msg_id,
                thid,
                response,
            },
        );
    }

    fn accept_child_registration(&mut self, from: &ChannelId, def: CommandDef) {
        if let Some(pool) = self.pools.get(&**from).cloned() {
            if let Some(Route {
                owner: Owner::Pool {
                    pool: p, members, ..
                },
                ..
            }) = self.routes.get_mut(&def.id)
            {
                if *p == pool {
                    if !members.contains(from) {
                        members.push(from.clone());
                        *self.registered.entry(from.clone()).or_insert(0) += 1;
                    }
                    return;
                }
            }
            // A command it registered before it was declared a pool member is counted once.
            if !self.registered_by(from, &def.id) {
                *self.registered.entry(from.clone()).or_insert(0) += 1;
            }
            self.routes.insert(
                def.id.clone(),
                Route {
                    def,
                    owner: Owner::Pool {
                        pool,
                        members: vec![from.clone()],
                        next: 0,
                    },
                },
            );
            return;
        }
        let again = matches!(self.routes.get(&def.id),
            Some(Route { owner: Owner::Channel { channel, learned: Learned::Registered }, .. })
                if channel == from);
        if !again {
            *self.registered.entry(from.clone()).or_insert(0) += 1;
        }
        self.routes.insert(
            def.id.clone(),
            Route {
                def,
                owner: Owner::Channel {
                    channel: from.clone(),
                    learned: Learned::Registered,
                },
            },
        );
    }

    /// Whether `from` registered `command_id` here (it owns the route, or is a member of
    /// the pool serving it). A command it only listed does not count.
    fn registered_by(&self, from: &ChannelId, command_id: &str) -> bool {
        match self.routes.get(command_id).map(|r| &r.owner) {
            Some(Owner::Channel {
                channel,
                learned: Learned::Registered,
            }) => channel == from,
            Some(Owner::Pool { members, .. }) => members.contains(from),
            _ => false,
        }
    }

    /// Why `from` may not register `def` here (too many commands from it, or too big a
    /// definition), if so.
    fn over_registration_bounds(&self, from: &ChannelId, def: &CommandDef) -> Option<String> {
        let size = def_size(def);
        if size > self.config.max_command_size {
            return Some(format!(
                "registration of '{}' refused: its definition is {size} bytes \
                 (max_command_size {})",
                truncated(&def.id),
                self.config.max_command_size
            ));
        }
        let holds_it = self.registered_by(from, &def.id);
        // Commands it holds, and those it is registering now (escalated, not yet answered).
        let held = self.registered.get(from).copied().unwrap_or(0)
            + self.escalating.get(from).copied().unwrap_or(0);
        if !holds_it && held >= self.config.max_commands_per_channel {
            return Some(format!(
                "registration of '{}' refused: channel '{from}' already registered {held} \
                 commands (max_commands_per_channel)",
                truncated(&def.id)
            ));
        }
        None
    }

    fn on_register_response(
        &mut self,
        from: &ChannelId,
        thid: String,
        response: Result<(), RegisterError>,
    ) {
        let Some(reg) = self.registrations.get(&thid) else {
            return self.drop_msg(
                Some(from),
                DropKind::Unknown,
                format!("registration response to unknown or already answered request '{thid}'"),
            );
        };
        if &reg.target != from {
            let reason = format!(
                "registration response to '{thid}' from '{from}' ignored: it went to '{}'",
                reg.target
            );
            return self.drop_msg(Some(from), DropKind::Spoofed, reason);
        }
        let Some(reg) = self.registrations.remove(&thid) else {
            return;
        };
        let child = match &reg.for_ {
            RegFor::Child { channel, .. } => Some(channel.clone()),
            RegFor::Local { .. } | RegFor::Again => None,
        };
        if let Some(c) = &child {
            self.escalation_end(c);
        }
        let rejected = response.is_err();
        // Re-check: another owner may have appeared here while the ack was on its way.
        let conflict = match response {
            Err(RegisterError::DuplicateCommand) => Some(format!(
                "command '{}' is already registered elsewhere in the tree (rejected by '{from}')",
                reg.def.id
            )),
            Ok(()) => self.owner_conflict(&reg.def.id, child.as_ref()),
        };
        match reg.for_ {
            RegFor::Local { call, handler } => {
                let result = match conflict {
                    Some(msg) => Err(ExecError::new(ErrorCode::DuplicateCommand, msg)),
                    None => {
                        self.routes.insert(
                            reg.def.id.clone(),
                            Route {
                                def: reg.def,
                                owner: Owner::Local { handler },
                            },
                        );
                        Ok(())
                    }
                };
                self.actions.push(Action::RegisterDone { call, result });
            }
            RegFor::Again => {
                // The route is this registry's own (or its child's): only the router's
                // answer matters.
                if let (true, Some(msg)) = (rejected, conflict) {
                    let reason = format!("re-announcing '{}' failed: {msg}", reg.def.id);
                    self.drop_msg(Some(from), DropKind::Rejected, reason);
                }
            }
            RegFor::Child {
                channel,
                request_id,
            } => {
                if !self.channels.contains_key(&channel) {
                    return;
                }
                let response = match conflict {
                    Some(_) => Err(RegisterError::DuplicateCommand),
                    None => {
                        self.accept_child_registration(&channel, reg.def);
                        Ok(())
                    }
                };
                self.answer_registration(&channel, request_id, response);
            }
        }
    }

    /// This registry's public subtree, sorted by id: its local commands and those its
    /// children registered, except those that came from `except`.
    fn subtree_except(&self, except: &ChannelId) -> Vec<CommandDef> {
        let mut defs: Vec<CommandDef> = self
            .routes
            .values()
            .filter(|r| !is_private(&r.def.id))
            .filter(|r| match &r.owner {
                Owner::Local { .. } => true,
                Owner::Channel { channel, learned } => {
                    *learned == Learned::Registered && channel != except
                }
                Owner::Pool { members, .. } => !members.contains(except),
            })
            .map(|r| r.def.clone())
            .collect();
        defs.sort_by(|a, b| a.id.cmp(&b.id));
        defs
    }

    fn on_list_request(&mut self, from: &ChannelId, id: String) {
        let commands = self.subtree_except(from);
        let msg_id = self.new_id();
        self.send(
            from,
            Message::ListResponse {
                id: msg_id,
                thid: id,
                commands,
            },
        );
    }

    fn on_list_response(&mut self, from: &ChannelId, commands: Vec<CommandDef>) {
        self.import_list(from, commands);
        self.actions.push(Action::Listed {
            channel: from.clone(),
        });
    }

    /// A list response is the peer's whole answer: routes this channel listed before and
    /// no longer lists are forgotten (the command left the peer's side), then what it lists
    /// now is learned where nothing better is known. Routes it *registered* are kept: those
    /// last until the channel closes.
    fn import_list(&mut self, from: &ChannelId, commands: Vec<CommandDef>) {
        let learned = if self.router_channel.as_ref() == Some(from) {
            Learned::ViaRouter
        } else {
            Learned::Advertised
        };
        let mut listed: Vec<&str> = commands.iter().map(|d| d.id.as_str()).collect();
        listed.sort_unstable();
        self.routes.retain(|id, r| match &r.owner {
            Owner::Channel {
                channel,
                learned: Learned::Advertised | Learned::ViaRouter,
            } if channel == from => listed.binary_search(&id.as_str()).is_ok(),
            _ => true,
        });
        let mut taken = 0usize;
        let mut refused = 0usize;
        for def in commands {
            if is_private(&def.id) {
                continue;
            }
            if taken >= self.config.max_commands_per_channel
                || def_size(&def) > self.config.max_command_size
            {
                refused += 1;
                continue;
            }
            taken += 1;
            let replace = match self.routes.get(&def.id).map(|r| &r.owner) {
                None => true,
                Some(Owner::Channel {
                    learned: Learned::ViaRouter,
                    ..
                }) => learned != Learned::ViaRouter,
                Some(_) => false,
            };
            if replace {
                self.routes.insert(
                    def.id.clone(),
                    Route {
                        def,
                        owner: Owner::Channel {
                            channel: from.clone(),
                            learned,
                        },
                    },
                );
            }
        }
        if refused > 0 {
            let reason = format!(
                "{refused} commands listed by '{from}' ignored: over max_commands_per_channel \
                 ({}) or max_command_size ({} bytes)",
                self.config.max_commands_per_channel, self.config.max_command_size
            );
            self.drop_msg(Some(from), DropKind::Rejected, reason);
        }
    }

    fn on_event(
        &mut self,
        from: &ChannelId,
        id: String,
        event_id: String,
        payload: Option<Payload>,
        now: Micros,
    ) {
        if !self.remember_event(&id, now) {
            return self.drop_msg(
                Some(from),
                DropKind::DuplicateEvent,
                format!("event '{event_id}' ({id}) already delivered"),
            );
        }
        if !is_private(&event_id) {
            self.flood(&id, &event_id, payload.clone(), Some(from));
        }
        self.actions
            .push(Action::DeliverEvent { event_id, payload });
    }

    // -----------------------------------------------------------------------------------------
    // Time
    // -----------------------------------------------------------------------------------------

    /// The earliest time at which [`Router::tick`] has something to do, if any.
    pub fn next_deadline(&mut self) -> Option<Micros> {
        while let Some(Reverse((deadline, _, kind, key))) = self.timers.peek() {
            if self.timer_live(*deadline, *kind, key) {
                return Some(*deadline);
            }
            self.timers.pop();
        }
        None
    }

    fn arm(&mut self, deadline: Micros, kind: TimerKind, key: String) {
        self.timer_seq += 1;
        self.timers
            .push(Reverse((deadline, self.timer_seq, kind, key)));
    }

    fn timer_live(&self, deadline: Micros, kind: TimerKind, key: &str) -> bool {
        match kind {
            TimerKind::Call => self.calls.get(key).is_some_and(|c| c.deadline == deadline),
            TimerKind::LocalCall => key
                .parse::<u64>()
                .is_ok_and(|job| self.local_deadlines.get(&job) == Some(&deadline)),
            TimerKind::Forward => self
                .forwards
                .get(key)
                .is_some_and(|f| f.deadline == deadline),
            TimerKind::Registration => self
                .registrations
                .get(key)
                .is_some_and(|r| r.deadline == deadline),
        }
    }

    /// Fires every deadline at or before `now`.
    pub fn tick(&mut self, now: Micros) {
        self.expire_events(now);
        while let Some(Reverse((deadline, _, _, _))) = self.timers.peek() {
            if *deadline > now {
                break;
            }
            let Some(Reverse((deadline, _, kind, key))) = self.timers.pop() else {
                break;
            };
            if !self.timer_live(deadline, kind, &key) {
                continue;
            }
            let secs = self.config.request_ttl as f64 / 1e6;
            match kind {
                TimerKind::Call => {
                    if let Some(c) = self.calls.remove(&key) {
                        self.request_ended(&c.channel);
                        self.actions.push(Action::CallDone {
                            call: c.call,
                            result: Err(ExecError::new(
                                ErrorCode::Timeout,
                                format!("no response from channel '{}' in time", c.channel),
                            )),
                        });
                    }
                }
                TimerKind::LocalCall => {
                    let Ok(job) = key.parse::<u64>() else {
                        continue;
                    };
                    if let Some(Reply::Local(call)) = self.jobs.get(&job) {
                        let call = *call;
                        self.forget_local_job(job);
                        self.actions.push(Action::CallDone {
                            call,
                            result: Err(ExecError::new(
                                ErrorCode::Timeout,
                                "the local handler did not finish in time",
                            )),
                        });
                    }
                }
                TimerKind::Forward => {
                    if let Some(f) = self.forwards.remove(&key) {
                        self.request_ended(&f.target);
                        self.serve_end(&f.origin);
                        if self.channels.contains_key(&f.origin) {
                            let err = ExecError::new(
                                ErrorCode::Timeout,
                                format!(
                                    "registry '{}' got no response from '{}' within {secs}s",
                                    self.config.id, f.target
                                ),
                            );
                            self.reply_error(&f.origin, f.origin_id, err);
                        }
                    }
                }
                TimerKind::Registration => {
                    if let Some(r) = self.registrations.remove(&key) {
                        let msg = format!(
                            "router '{}' did not acknowledge '{}' within {secs}s",
                            r.target, r.def.id
                        );
                        match r.for_ {
                            RegFor::Local { call, .. } => self.actions.push(Action::RegisterDone {
                                call,
                                result: Err(ExecError::new(ErrorCode::Timeout, msg)),
                            }),
                            RegFor::Again => {
                                let target = r.target.clone();
                                self.drop_msg(Some(&target), DropKind::Rejected, msg);
                            }
                            RegFor::Child { channel, .. } => self.escalation_end(&channel),
                        }
                    }
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Introspection
    // -----------------------------------------------------------------------------------------

    /// Every command this registry can route to (local, registered, advertised, learned from
    /// the router), sorted by id. Private local commands are included: they are callable here.
    pub fn list_commands(&self) -> Vec<CommandDef> {
        let mut v: Vec<CommandDef> = self.routes.values().map(|r| r.def.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Where a command would be routed from here: `"local"`, a channel id, or None.
    pub fn route_of(&self, command_id: &str) -> Option<String> {
        match self.routes.get(command_id).map(|r| &r.owner) {
            Some(Owner::Local { .. }) => Some("local".to_string()),
            Some(Owner::Channel { channel, .. }) => Some(channel.to_string()),
            Some(Owner::Pool { .. }) => self
                .peek_member(command_id, None)
                .map(|(m, _)| m.to_string()),
            None if is_private(command_id) => None,
            None => self.router_channel.as_ref().map(|r| r.to_string()),
        }
    }

    /// Counters and table sizes.
    pub fn stats(&self) -> Stats {
        let mut channels: Vec<(ChannelId, ChannelStats)> = self
            .channels
            .iter()
            .map(|(k, v)| (k.clone(), v.stats.clone()))
            .collect();
        channels.sort_by(|a, b| a.0.cmp(&b.0));
        Stats {
            channels,
            forwarded: self.forwarded,
            pending: self.calls.len() + self.local_jobs,
            pending_forwards: self.forwards.len(),
            dropped: self.dropped,
            dedup_entries: self.seen_events.len(),
            jobs: self.jobs.len(),
        }
    }
}

/// Error of [`Router::handle_frame`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    /// The frame could not be decoded (it was dropped and counted).
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The driver named a channel that is not attached.
    #[error(transparent)]
    Usage(#[from] UsageError),
}

/// The bytes a command definition holds (what its peer makes this registry keep).
fn def_size(def: &CommandDef) -> usize {
    let schema = def.schema.as_ref().map_or(0, |s| {
        s.request.as_ref().map_or(0, |p| p.data.len())
            + s.response.as_ref().map_or(0, |p| p.data.len())
    });
    def.id.len() + def.description.as_ref().map_or(0, String::len) + schema
}

/// At most 80 bytes of a peer-chosen id, for a log line.
fn truncated(id: &str) -> &str {
    let mut end = id.len().min(80);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    &id[..end]
}

/// A cheap "did you mean" test: same namespace, or a small edit distance.
fn similar(candidate: &str, wanted: &str) -> bool {
    let ns = |s: &str| s.split('.').next().unwrap_or("").to_string();
    if candidate.contains('.') && ns(candidate) == ns(wanted) {
        return true;
    }
    edit_distance(candidate, wanted) <= 2
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len().abs_diff(b.len()) > 2 || a.len() > 64 || b.len() > 64 {
        return usize::MAX;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests;
