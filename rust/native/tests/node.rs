//! The parking and locking logic of [`Node`]: blocking callers that read their own replies
//! while other threads serve, read or close the same channels.
//!
//! Two nodes are joined by a native channel (a socket pair, with or without a shared-memory
//! segment). Node `a` is the caller (its router channel is `b`, so every command routes
//! there); node `b` serves `echo` on a thread of its own, which answers each request with its
//! request unless the test says otherwise. Every test runs under a watchdog: a hang fails it.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use cmd_ipc_core::ids::SeededIds;
use cmd_ipc_core::message::{CommandDef, Encoding, ErrorCode, ExecResult, Payload};
use cmd_ipc_core::router::{Action, Config, DropKind};
use cmd_ipc_native::node::{Node, NodeAction, SyncOutcome};
use cmd_ipc_native::transport::{self, Endpoint, Kind};

const ECHO: u64 = 1;
const SEC: u64 = 1_000_000;

/// Runs `f` on a thread and fails the test if it takes longer than `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let r = f();
        let _ = tx.send(());
        r
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => h.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("the test did not finish in {secs} s"),
    }
}

/// `{"i": i}` in msgpack.
fn request(i: u8) -> Option<Payload> {
    assert!(i < 128);
    Some(Payload::new(Encoding::Msgpack, vec![0x81, 0xa1, b'i', i]))
}

fn endpoints(kind: Kind) -> (Endpoint, Endpoint) {
    let (a, b) = transport::socketpair().unwrap();
    let open = |fd: i32, shm: Option<(i32, u8)>| {
        Endpoint::open(fd, shm, Encoding::Msgpack, 1 << 20).unwrap()
    };
    // The endpoints hold duplicates: the originals close here, so that closing an endpoint
    // (or dropping its node) is the peer's end-of-file.
    match kind {
        Kind::Stream => (open(a.as_raw_fd(), None), open(b.as_raw_fd(), None)),
        Kind::Shm => {
            let seg = transport::create_segment(4096).unwrap();
            (
                open(a.as_raw_fd(), Some((seg.as_raw_fd(), 0))),
                open(b.as_raw_fd(), Some((seg.as_raw_fd(), 1))),
            )
        }
    }
}

/// The caller `a` (router channel `b`) and the server `b` (serving `echo`), connected.
fn connect(kind: Kind) -> (Arc<Node>, Arc<Node>) {
    let mut config = Config::new("a");
    config.router_channel = Some("b".into());
    let a = Node::new(config, Box::new(SeededIds::new(1))).unwrap();
    let b = Node::new(Config::new("b"), Box::new(SeededIds::new(2))).unwrap();
    b.with_router(|r| r.register_local(CommandDef::new("echo"), ECHO, 0));
    let (ea, eb) = endpoints(kind);
    a.add_endpoint("b", ea).unwrap();
    b.add_endpoint("a", eb).unwrap();
    (Arc::new(a), Arc::new(b))
}

/// Completes a handler job of `node` with `result`.
fn complete(node: &Node, job: u64, result: ExecResult) {
    let ((), py) = node.with_router(|r| r.complete_job(job, result).unwrap());
    assert!(
        py.is_empty(),
        "a reply to a native channel is sent in Rust: {py:?}"
    );
}

/// A thread serving node `b`'s channel `a` the way the event loop does: poll, carry out the
/// handler runs (`on_run`), wait on the channel's descriptor. Stops when dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(
        node: Arc<Node>,
        on_run: impl FnMut(&Node, u64, Option<Payload>) + Send + 'static,
    ) -> Server {
        Server::on(node, "a", on_run)
    }

    /// Serves `node`'s channel `channel`.
    fn on(
        node: Arc<Node>,
        channel: &'static str,
        mut on_run: impl FnMut(&Node, u64, Option<Payload>) + Send + 'static,
    ) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let poll = node.poll_endpoint(channel, 0, 0, true);
                for a in poll.actions {
                    match a {
                        NodeAction::Router(Action::RunHandler { job, request, .. }) => {
                            on_run(&node, job, request)
                        }
                        NodeAction::Closed { .. } => return,
                        _ => {}
                    }
                }
                if !poll.again {
                    let Some(fd) = node.endpoint_fd(channel) else {
                        return;
                    };
                    let _ = transport::wait_readable(&[fd], 10);
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }

    fn echo(node: Arc<Node>) -> Server {
        Server::start(node, |node, job, request| complete(node, job, Ok(request)))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn call(node: &Node, request: Option<Payload>, ttl: u64) -> ExecResult {
    match node.call_sync("echo", request, Some(ttl)) {
        SyncOutcome::Done(r) => r,
        SyncOutcome::Fallback => panic!("echo is behind a native channel"),
    }
}

const KINDS: [Kind; 2] = [Kind::Stream, Kind::Shm];

#[test]
fn a_blocking_call_is_answered_by_a_thread_serving_the_peer() {
    for kind in KINDS {
        within(20, move || {
            let (a, b) = connect(kind);
            let _server = Server::echo(b);
            for i in 0..100 {
                let got = call(&a, request(i), 10 * SEC);
                assert_eq!(got, Ok(request(i)), "{kind:?} call {i}");
            }
        });
    }
}

#[test]
fn a_command_not_behind_a_native_channel_falls_back() {
    within(10, || {
        let node = Node::new(Config::new("alone"), Box::new(SeededIds::new(3))).unwrap();
        assert!(matches!(
            node.call_sync("echo", None, Some(SEC)),
            SyncOutcome::Fallback
        ));
        assert!(node.call_many_sync("echo", vec![None], None, 4).is_none());
    });
}

#[test]
fn the_loop_steps_aside_while_a_blocking_caller_reads_a_stream_channel() {
    within(20, || {
        let (a, b) = connect(Kind::Stream);
        let (arrived_tx, arrived) = mpsc::channel::<()>();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let _server = Server::start(b, move |node, job, request| {
            arrived_tx.send(()).unwrap();
            // Holds the reply until the test has looked at the caller's side.
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
            complete(node, job, Ok(request));
        });
        let caller = {
            let a = a.clone();
            thread::spawn(move || call(&a, request(7), 10 * SEC))
        };
        arrived.recv_timeout(Duration::from_secs(10)).unwrap();
        // The caller waits in poll() on the socket holding the reading role: the event loop
        // finds the channel busy and must not read (it would race for the reply's bytes).
        // (The request may reach the server before the caller takes that role.)
        let deadline = transport::monotonic_micros() + 10 * SEC;
        while !a.endpoint_busy("b") {
            assert!(
                transport::monotonic_micros() < deadline,
                "the caller never read"
            );
            thread::yield_now();
        }
        let poll = a.poll_endpoint("b", 0, 0, true);
        assert!(poll.busy && poll.actions.is_empty(), "{poll:?}");
        release.send(()).unwrap();
        assert_eq!(caller.join().unwrap(), Ok(request(7)));
        // Handed back: the loop reads the channel again.
        assert!(!a.endpoint_busy("b"));
        assert!(!a.poll_endpoint("b", 0, 0, true).busy);
    });
}

#[test]
fn replies_read_by_another_thread_complete_the_blocking_caller() {
    // A "loop" thread keeps reading `a`'s channel (spinning over it) while blocking calls run
    // on two other threads: whichever thread reads a reply, the caller gets it (woken through
    // its eventfd and futex when it was not the reader).
    for kind in KINDS {
        within(30, move || {
            let (a, b) = connect(kind);
            let _server = Server::echo(b);
            let stop = Arc::new(AtomicBool::new(false));
            let looper = {
                let (a, stop) = (a.clone(), stop.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let poll = a.poll_endpoint("b", 20, 0, true);
                        if poll.busy || !poll.again {
                            let fd = a.endpoint_fd("b").unwrap();
                            let _ = transport::wait_readable(&[fd, a.wake_fd()], 1);
                            let _ = a.take_queued();
                        }
                    }
                })
            };
            let callers: Vec<_> = (0..2u8)
                .map(|t| {
                    let a = a.clone();
                    thread::spawn(move || {
                        for i in 0..100u8 {
                            let n = (t * 100 + i) % 128;
                            assert_eq!(call(&a, request(n), 10 * SEC), Ok(request(n)));
                        }
                    })
                })
                .collect();
            for c in callers {
                c.join().unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            looper.join().unwrap();
        });
    }
}

#[test]
fn actions_for_the_loop_are_queued_and_ring_the_wake_fd() {
    for kind in KINDS {
        within(20, move || {
            let (a, b) = connect(kind);
            let _server = Server::start(b, |node, job, request| {
                // An event reaches the caller's node before the reply: the blocking
                // caller reads it, and must leave it to the loop.
                let (_, py) = node.with_router(|r| r.emit_event("ping", None, 0));
                assert!(py
                    .iter()
                    .all(|a| matches!(a, NodeAction::Router(Action::DeliverEvent { .. }))));
                complete(node, job, Ok(request));
            });
            assert_eq!(call(&a, request(1), 10 * SEC), Ok(request(1)));
            assert!(
                transport::wait_readable(&[a.wake_fd()], 5000).unwrap(),
                "{kind:?}: the loop was not woken"
            );
            let queued = a.take_queued();
            assert!(
                queued.iter().any(|q| matches!(
                    q,
                    NodeAction::Router(Action::DeliverEvent { event_id, .. }) if event_id == "ping"
                )),
                "{kind:?}: {queued:?}"
            );
            // Taking the queue drains the doorbell: an idle loop is not woken again.
            assert!(!transport::wait_readable(&[a.wake_fd()], 0).unwrap());
            assert!(a.take_queued().is_empty());
        });
    }
}

#[test]
fn a_peer_closing_turns_a_waiting_blocking_call_into_channel_disconnected() {
    for kind in KINDS {
        within(20, move || {
            let (a, b) = connect(kind);
            let _server = Server::start(b, |node, _job, _request| {
                node.close_endpoint("a");
            });
            // The TTL is far away: only the close can end this call within the watchdog.
            let err = call(&a, request(1), 3600 * SEC).unwrap_err();
            assert_eq!(
                err.code,
                ErrorCode::ChannelDisconnected,
                "{kind:?}: {err:?}"
            );
            let queued = a.take_queued();
            assert!(
                queued.iter().any(|q| matches!(
                    q,
                    NodeAction::Closed { channel, .. } if &**channel == "b"
                )),
                "{kind:?}: the loop learns of the close: {queued:?}"
            );
            assert!(a.endpoint_fd("b").is_none());
        });
    }
}

#[test]
fn a_peer_dying_turns_a_waiting_blocking_call_into_channel_disconnected() {
    for kind in KINDS {
        within(20, move || {
            let (a, b) = connect(kind);
            let (arrived_tx, arrived) = mpsc::channel::<()>();
            let server = Server::start(b.clone(), move |_node, _job, _request| {
                let _ = arrived_tx.send(());
            });
            let caller = {
                let a = a.clone();
                thread::spawn(move || call(&a, request(1), 3600 * SEC))
            };
            arrived.recv_timeout(Duration::from_secs(10)).unwrap();
            // The peer process dies: its descriptors close with its last reference.
            drop(server);
            drop(b);
            let err = caller.join().unwrap().unwrap_err();
            assert_eq!(
                err.code,
                ErrorCode::ChannelDisconnected,
                "{kind:?}: {err:?}"
            );
        });
    }
}

#[test]
fn a_blocking_call_times_out_at_its_ttl() {
    for kind in KINDS {
        within(20, move || {
            let (a, b) = connect(kind);
            let _server = Server::start(b, |_node, _job, _request| {});
            let err = call(&a, request(1), SEC / 10).unwrap_err();
            assert_eq!(err.code, ErrorCode::Timeout, "{kind:?}: {err:?}");
            // The channel stays usable.
            assert!(a.endpoint_fd("b").is_some());
        });
    }
}

#[test]
fn call_many_sync_keeps_at_most_window_calls_in_flight() {
    for kind in KINDS {
        within(20, move || {
            let (a, b) = connect(kind);
            let (n, window) = (10usize, 3usize);
            let most = Arc::new(Mutex::new(0usize));
            let seen = most.clone();
            let (mut held, mut answered) = (Vec::new(), 0usize);
            // The server holds requests until a full window (or the rest) has arrived, then
            // answers them together: the caller must never have more than `window` out.
            let _server = Server::start(b, move |node, job, request| {
                held.push((job, request));
                let mut most = seen.lock().unwrap();
                *most = (*most).max(held.len());
                if held.len() >= window.min(n - answered) {
                    answered += held.len();
                    for (job, request) in held.drain(..) {
                        complete(node, job, Ok(request));
                    }
                }
            });
            let requests: Vec<_> = (0..n as u8).map(request).collect();
            let results = a
                .call_many_sync("echo", requests.clone(), Some(10 * SEC), window)
                .expect("echo is behind a native channel");
            let expected: Vec<ExecResult> = requests.into_iter().map(Ok).collect();
            assert_eq!(results, expected, "{kind:?}: results in request order");
            assert_eq!(*most.lock().unwrap(), window, "{kind:?}");
        });
    }
}

#[test]
fn a_read_that_forwarded_a_request_spins_on_for_the_reply() {
    // a -> m -> c over shared memory: `m` forwards natively (no action for its loop). One
    // poll of `m` with a follow-on spin reads the request, forwards it, and forwards c's
    // reply back too, so the caller is answered without `m` waiting for a doorbell; with no
    // follow-on spin the reply would sit in m's ring until m's next wake-up.
    within(20, || {
        let mut config = Config::new("a");
        config.router_channel = Some("m".into());
        let a = Arc::new(Node::new(config, Box::new(SeededIds::new(1))).unwrap());
        let m = Arc::new(Node::new(Config::new("m"), Box::new(SeededIds::new(2))).unwrap());
        let mut config = Config::new("c");
        config.router_channel = Some("m".into());
        let c = Arc::new(Node::new(config, Box::new(SeededIds::new(3))).unwrap());
        let (am, ma) = endpoints(Kind::Shm);
        let (cm, mc) = endpoints(Kind::Shm);
        a.add_endpoint("m", am).unwrap();
        m.add_endpoint("a", ma).unwrap();
        c.add_endpoint("m", cm).unwrap();
        m.add_endpoint("c", mc).unwrap();
        // c registers `echo` upward; m learns the route (and acknowledges).
        c.with_router(|r| r.register_local(CommandDef::new("echo"), ECHO, 0));
        // c's list answer is taken too, so that m's reads below see only the call.
        let deadline = transport::monotonic_micros() + 10 * SEC;
        let mut listed = false;
        while !listed || m.with_router(|r| r.route_of("echo")).0.as_deref() != Some("c") {
            assert!(
                transport::monotonic_micros() < deadline,
                "echo never registered"
            );
            let _ = c.poll_endpoint("m", 0, 0, true);
            let poll = m.poll_endpoint("c", 0, 0, true);
            listed |= poll
                .actions
                .iter()
                .any(|x| matches!(x, NodeAction::Router(Action::Listed { .. })));
            thread::sleep(Duration::from_millis(1));
        }
        let _server = Server::on(c, "m", |node, job, request| {
            complete(node, job, Ok(request))
        });
        // The list exchange of attach: a answers m's list request, m takes a's answer.
        let deadline = transport::monotonic_micros() + 10 * SEC;
        loop {
            let _ = a.poll_endpoint("m", 0, 0, true);
            let poll = m.poll_endpoint("a", 0, 0, true);
            if poll
                .actions
                .iter()
                .any(|x| matches!(x, NodeAction::Router(Action::Listed { .. })))
            {
                break;
            }
            assert!(transport::monotonic_micros() < deadline, "a never listed");
            thread::sleep(Duration::from_millis(1));
        }
        // m parks on "a" (nothing there now), so a's request rings m's doorbell.
        assert!(m.poll_endpoint("a", 0, 0, true).actions.is_empty());
        let (done_tx, done) = mpsc::channel();
        let caller = {
            let a = a.clone();
            thread::spawn(move || done_tx.send(call(&a, request(9), 10 * SEC)).unwrap())
        };
        // Wait for the request's doorbell, then poll m once.
        let fd = m.endpoint_fd("a").unwrap();
        transport::wait_readable(&[fd], 10_000).unwrap();
        // One read burst: polls that say `again` (a read returns after a while to let the
        // loop run) and nothing else; no doorbell is waited for.
        let mut first = true;
        loop {
            let poll = m.poll_endpoint("a", 0, 300_000, first);
            first = false;
            assert!(poll.actions.is_empty(), "{poll:?}");
            if !poll.again {
                break;
            }
        }
        let got = done.recv_timeout(Duration::from_secs(5));
        assert_eq!(
            got,
            Ok(Ok(request(9))),
            "the reply was not forwarded by that one poll"
        );
        caller.join().unwrap();
    });
}

/// A peer that reads nothing: its outbox here fills to `max_outbox`, then events are
/// refused (reported once), a call fails at once, and the channel closes as a slow consumer
/// at the first tick `slow_consumer_us` after the first refusal, failing the call that
/// waited on it; its descriptor stays open until released.
#[test]
fn a_peer_that_reads_nothing_gets_a_bounded_outbox_then_is_disconnected() {
    for kind in [Kind::Stream, Kind::Shm] {
        let mut config = Config::new("a");
        config.router_channel = Some("b".into());
        let mut a = Node::new(config, Box::new(SeededIds::new(1))).unwrap();
        a.max_outbox = 64 * 1024;
        a.slow_consumer_us = 5 * SEC;
        let (ea, _eb) = endpoints(kind); // `_eb` is never read
        a.add_endpoint("b", ea).unwrap();
        let now = transport::monotonic_micros();
        let (waiting, _) = a.with_router(|r| r.execute("x", request(1), Some(60 * SEC), now));
        let event = Some(Payload::new(
            Encoding::Msgpack,
            vec![0xc4, 0xff].into_iter().chain([7; 255]).collect(),
        ));
        let mut reported = 0;
        for _ in 0..2_000 {
            let (_, py) = a.with_router(|r| r.emit_event("e", event.clone(), now));
            reported += py
                .iter()
                .filter(|x| {
                    matches!(
                        x,
                        NodeAction::Router(Action::Dropped {
                            kind: DropKind::OutboxFull,
                            ..
                        })
                    )
                })
                .count();
        }
        assert_eq!(reported, 1, "{kind:?}: a full outbox is reported once");
        let (unsent, peak) = a.outbox_bytes("b").unwrap();
        assert!(
            unsent <= 64 * 1024 && peak <= 64 * 1024,
            "{kind:?}: {unsent} / {peak}"
        );
        let stats = a.lock().router.stats();
        assert!(stats.channels[0].1.dropped > 1_000, "{stats:?}");
        let (call, py) = a.with_router(|r| r.execute("x", request(2), None, now));
        let err = py
            .iter()
            .find_map(|x| match x {
                NodeAction::Router(Action::CallDone {
                    call: c,
                    result: Err(e),
                }) if *c == call => Some(e.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{kind:?}: no failure at once: {py:?}"));
        assert_eq!(err.code, ErrorCode::InternalError);
        assert!(err.message.contains("max_outbox"), "{err:?}");
        // Not yet: the outbox has not been full for slow_consumer_us.
        let deadline = a.next_deadline().unwrap();
        assert!(a.tick(now + SEC).is_empty());
        let py = a.tick(deadline.max(now + 5 * SEC));
        let fd = py
            .iter()
            .find_map(|x| match x {
                NodeAction::Closed { reason, fd, .. } if reason.starts_with("[slow_consumer]") => {
                    Some(*fd)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("{kind:?}: not closed: {py:?}"));
        assert!(py.iter().any(|x| matches!(
            x,
            NodeAction::Router(Action::CallDone { call, result: Err(e) })
                if *call == waiting && e.code == ErrorCode::ChannelDisconnected
        )));
        // Shut down but open until released (an event loop may still watch it).
        // SAFETY: fcntl(F_GETFD) only queries the descriptor.
        assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
        a.release_endpoint(fd); // (closed now: the number may be reused at once)
    }
}
