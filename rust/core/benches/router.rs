//! Router decision rate: `cargo bench -p cmd-ipc-core` (or `make bench-rust`).
//!
//! A middle registry forwards requests from channel `a` to the owner `b` and routes each
//! response back: two routing decisions per round trip. Reported as decisions per second,
//! on decoded messages (the router alone) and on msgpack frames (decode + route + encode).
//! A plain `HashMap` insert/remove of the same keys is measured in the same run as the
//! baseline, and the ratio printed.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use cmd_ipc_core::codec::{self, Limits};
use cmd_ipc_core::ids::{IdSource, SeededIds};
use cmd_ipc_core::message::{CommandDef, Encoding, Message, Payload};
use cmd_ipc_core::router::{Action, Config, Router};

thread_local! {
    /// Ids of the inputs (the peers' ids), from the generator the router uses itself.
    static IDS: std::cell::RefCell<SeededIds> = std::cell::RefCell::new(SeededIds::new(2));
}

fn new_id() -> String {
    IDS.with(|ids| ids.borrow_mut().next_id())
}

fn setup() -> Router {
    let mut r = Router::new(Config::new("mid"), Box::new(SeededIds::new(1)));
    r.add_channel("a", Encoding::Msgpack).unwrap();
    r.add_channel("b", Encoding::Msgpack).unwrap();
    r.handle_message(
        "b",
        Message::RegisterRequest {
            id: new_id(),
            command: CommandDef::new("calc.add"),
        },
        0,
    )
    .unwrap();
    r.take_actions();
    r
}

fn request_payload() -> Payload {
    // {"a": 1, "b": 2} in msgpack
    Payload::new(
        Encoding::Msgpack,
        vec![0x82, 0xa1, b'a', 0x01, 0xa1, b'b', 0x02],
    )
}

/// Runs `f` (which performs `per_iter` decisions) for about `budget`; returns decisions/s.
fn rate(budget: Duration, per_iter: u64, mut f: impl FnMut()) -> f64 {
    for _ in 0..10_000 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..1000 {
            f();
        }
        n += 1000;
    }
    (n * per_iter) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let budget = Duration::from_millis(
        std::env::var("BENCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000),
    );

    // Router only: decoded messages in, actions out.
    let mut r = setup();
    let payload = request_payload();
    let mut actions = Vec::with_capacity(8);
    let decisions = rate(budget, 2, || {
        r.handle_message(
            "a",
            Message::ExecuteRequest {
                id: new_id(),
                command_id: "calc.add".to_string(),
                request: Some(payload.clone()),
            },
            0,
        )
        .unwrap();
        r.drain_actions_into(&mut actions);
        let fwd_id = match actions.pop() {
            Some(Action::Send { message, .. }) => message.id().to_string(),
            other => panic!("unexpected {other:?}"),
        };
        r.handle_message(
            "b",
            Message::ExecuteResponse {
                id: new_id(),
                thid: fwd_id,
                response: Ok(Some(Payload::new(Encoding::Msgpack, vec![0x03]))),
            },
            0,
        )
        .unwrap();
        r.drain_actions_into(&mut actions);
        black_box(actions.pop());
    });

    // Frames: decode + route + encode, both directions.
    let mut r = setup();
    let limits = Limits::default();
    let mut actions = Vec::with_capacity(8);
    let frames = rate(budget, 2, || {
        let req = codec::encode_msgpack(&Message::ExecuteRequest {
            id: new_id(),
            command_id: "calc.add".to_string(),
            request: Some(payload.clone()),
        })
        .unwrap();
        r.handle_frame("a", &req, 0).unwrap();
        r.drain_actions_into(&mut actions);
        let out = match actions.pop() {
            Some(Action::Send { message, .. }) => codec::encode_msgpack(&message).unwrap(),
            other => panic!("unexpected {other:?}"),
        };
        let fwd = codec::decode_msgpack(&out, &limits).unwrap();
        let resp = codec::encode_msgpack(&Message::ExecuteResponse {
            id: new_id(),
            thid: fwd.id().to_string(),
            response: Ok(Some(Payload::new(Encoding::Msgpack, vec![0x03]))),
        })
        .unwrap();
        r.handle_frame("b", &resp, 0).unwrap();
        r.drain_actions_into(&mut actions);
        if let Some(Action::Send { message, .. }) = actions.pop() {
            black_box(codec::encode_msgpack(&message).unwrap());
        }
    });

    // Baseline: the bare table work of a forward (insert then remove a fresh id).
    let mut table: HashMap<String, u64> = HashMap::new();
    let baseline = rate(budget, 2, || {
        let k = new_id();
        table.insert(k.clone(), 1);
        black_box(table.remove(&k));
    });

    println!(
        "router forward decisions (decoded):  {:>12.0} /s",
        decisions
    );
    println!(
        "router forward decisions (msgpack frames, incl. codec): {:>12.0} /s",
        frames
    );
    println!(
        "baseline id+HashMap insert/remove:    {:>12.0} /s  (router at {:.2}x of baseline)",
        baseline,
        decisions / baseline
    );
    println!(
        "target >= 2,000,000 decisions/s: {}",
        if decisions >= 2e6 { "met" } else { "NOT met" }
    );
}
