//! A blocking caller against a broken peer or an impatient user: an impossible ring index
//! from the peer fails the waiting call with `channel_disconnected` (the channel closes,
//! `corrupt_ring`) instead of spinning; a caller whose `stop` says so (Ctrl-C in Python)
//! gives up its wait, and the channel answers the next call right.
//!
//! Node `a` calls (router channel `b`); node `b` runs `echo` on a thread of its own, holding
//! every job until the test releases it. Every test runs under a watchdog.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use cmd_ipc_core::ids::SeededIds;
use cmd_ipc_core::message::{CommandDef, Encoding, ErrorCode, Payload};
use cmd_ipc_core::router::{Action, Config};
use cmd_ipc_native::node::{Node, NodeAction, Stopped, SyncOutcome};
use cmd_ipc_native::transport::{self, Endpoint, Kind};

const ECHO: u64 = 1;
const SEC: u64 = 1_000_000;

fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let r = f();
        let _ = tx.send(());
        r
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("the test did not finish in {secs} s"),
    }
}

fn request(i: u8) -> Option<Payload> {
    Some(Payload::new(Encoding::Msgpack, vec![0x81, 0xa1, b'i', i]))
}

/// `a` and `b` over `kind`, and (shm) the segment's descriptor.
fn connect(kind: Kind) -> (Arc<Node>, Arc<Node>, Option<OwnedFd>) {
    let mut config = Config::new("a");
    config.router_channel = Some("b".into());
    let a = Node::new(config, Box::new(SeededIds::new(1))).unwrap();
    let b = Node::new(Config::new("b"), Box::new(SeededIds::new(2))).unwrap();
    b.with_router(|r| r.register_local(CommandDef::new("echo"), ECHO, 0));
    let (sa, sb) = transport::socketpair().unwrap();
    let seg = (kind == Kind::Shm).then(|| transport::create_segment(4096).unwrap());
    let open = |fd: i32, side: u8| {
        let shm = seg.as_ref().map(|s| (s.as_raw_fd(), side));
        Endpoint::open(fd, shm, Encoding::Msgpack, 1 << 20).unwrap()
    };
    a.add_endpoint("b", open(sa.as_raw_fd(), 0)).unwrap();
    b.add_endpoint("a", open(sb.as_raw_fd(), 1)).unwrap();
    (Arc::new(a), Arc::new(b), seg)
}

/// Serves `b` like an event loop; every `echo` job is held until [`Server::release`].
struct Server {
    stop: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
    started: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(b: Arc<Node>) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let release = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicU64::new(0));
        let (flag, free, count) = (stop.clone(), release.clone(), started.clone());
        let thread = thread::spawn(move || {
            let held: Mutex<Vec<(u64, Option<Payload>)>> = Mutex::new(Vec::new());
            while !flag.load(Ordering::Relaxed) {
                let poll = b.poll_endpoint("a", 0, 0, true);
                for act in poll.actions {
                    if let NodeAction::Router(Action::RunHandler { job, request, .. }) = act {
                        held.lock().unwrap().push((job, request));
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                }
                if free.load(Ordering::SeqCst) {
                    for (job, req) in held.lock().unwrap().drain(..) {
                        let _ = b.with_router(|r| r.complete_job(job, Ok(req)));
                    }
                }
                if let Some(fd) = b.endpoint_fd("a") {
                    let _ = transport::wait_readable(&[fd], 1);
                }
            }
        });
        Server {
            stop,
            release,
            started,
            thread: Some(thread),
        }
    }

    fn wait_started(&self, n: u64) {
        let deadline = transport::monotonic_micros() + 10 * SEC;
        while self.started.load(Ordering::SeqCst) < n {
            assert!(
                transport::monotonic_micros() < deadline,
                "jobs never started"
            );
            thread::sleep(Duration::from_millis(1));
        }
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

/// A `stop` that says yes once the server holds `n` jobs (the calls are surely parked).
fn stop_once_started(server: &Server, n: u64) -> impl FnMut() -> bool {
    let started = server.started.clone();
    move || started.load(Ordering::SeqCst) >= n
}

#[test]
fn a_stopped_blocking_call_is_forgotten_and_the_channel_stays_usable() {
    for kind in [Kind::Shm, Kind::Stream] {
        within(30, move || {
            let (a, b, _seg) = connect(kind);
            let server = Server::start(b);
            let mut stop = stop_once_started(&server, 1);
            let r = a.call_sync_until("echo", request(1), Some(60 * SEC), &mut stop);
            assert_eq!(r.err(), Some(Stopped), "{kind:?}");
            // The late reply comes now; the next call gets its own answer, not that one.
            server.release.store(true, Ordering::SeqCst);
            for i in 2..5 {
                match a.call_sync("echo", request(i), Some(10 * SEC)) {
                    SyncOutcome::Done(r) => assert_eq!(r, Ok(request(i)), "{kind:?}"),
                    SyncOutcome::Fallback => panic!("echo is behind a native channel"),
                }
            }
        });
    }
}

#[test]
fn a_stopped_batch_is_forgotten_and_the_channel_stays_usable() {
    for kind in [Kind::Shm, Kind::Stream] {
        within(30, move || {
            let (a, b, _seg) = connect(kind);
            let server = Server::start(b);
            let mut stop = stop_once_started(&server, 3);
            let requests = (0..3).map(request).collect();
            let r = a.call_many_sync_until("echo", requests, Some(60 * SEC), 3, &mut stop);
            assert_eq!(r.err(), Some(Stopped), "{kind:?}");
            server.release.store(true, Ordering::SeqCst);
            let requests: Vec<_> = (10..14).map(request).collect();
            let results = a
                .call_many_sync("echo", requests.clone(), Some(10 * SEC), 2)
                .unwrap();
            let expected: Vec<_> = requests.into_iter().map(Ok).collect();
            assert_eq!(results, expected, "{kind:?}");
        });
    }
}

#[test]
fn an_impossible_head_fails_a_parked_blocking_call_at_once() {
    within(30, || {
        let (a, b, seg) = connect(Kind::Shm);
        let server = Server::start(b);
        let seg = seg.unwrap();
        let caller = {
            let a = a.clone();
            thread::spawn(move || a.call_sync("echo", request(1), Some(60 * SEC)))
        };
        server.wait_started(1);
        // The peer's view of the segment: it writes a head capacity + 1 past a's tail into
        // the ring a reads (ring 1: a is side 0). Layout: rust/native/src/transport.rs.
        let len = 4096 + 2 * 4096;
        // SAFETY: mapping the test's own segment descriptor, unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                seg.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        // SAFETY: 8-byte aligned words inside the mapping.
        unsafe {
            let head = &*((base as *mut u8).add(320) as *const AtomicU64);
            let tail = &*((base as *mut u8).add(320 + 64) as *const AtomicU64);
            // Far beyond the capacity: impossible whatever the reader consumed meanwhile.
            head.store(tail.load(Ordering::SeqCst) + (1 << 40), Ordering::SeqCst);
        }
        let started = transport::monotonic_micros();
        let outcome = caller.join().unwrap();
        // SAFETY: our mapping, once.
        unsafe { libc::munmap(base, len) };
        let SyncOutcome::Done(Err(e)) = outcome else {
            panic!("expected a failure, got {outcome:?}");
        };
        assert_eq!(e.code, ErrorCode::ChannelDisconnected);
        assert!(transport::monotonic_micros() - started < 10 * SEC);
        // The channel is gone: the next call has no route.
        assert!(matches!(
            a.call_sync("echo", request(2), Some(SEC)),
            SyncOutcome::Fallback | SyncOutcome::Done(Err(_))
        ));
        // The close was reported to the loop with its reason.
        let queued = a.take_queued();
        assert!(
            queued.iter().any(|x| matches!(
                x,
                NodeAction::Closed { reason, .. } if reason.starts_with("[corrupt_ring]")
            )),
            "{queued:?}"
        );
    });
}
