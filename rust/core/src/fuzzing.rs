//! Fuzz target bodies, shared by the cargo-fuzz targets (`rust/core/fuzz`) and by the
//! corpus replay test (`tests/fuzz_corpus.rs`), so every input a fuzzer ever kept is also an
//! ordinary `cargo test` case.
//!
//! Each function panics when an invariant breaks: no panic inside the core, decode/encode
//! round trips stable, every message the router emits decodes again (our decoders enforce the
//! spec schemas' shapes: required fields, no extra fields, error codes), and the router's
//! tables stay within their configured bounds.

use crate::codec::{self, Limits};
use crate::frame::{encode_frame, FrameDecoder};
use crate::ids::SeededIds;
use crate::message::{CommandDef, Encoding, ErrorCode, ExecError, Message, Payload};
use crate::router::{Action, Config, Router};

fn small_limits() -> Limits {
    Limits {
        max_message_size: 1 << 20,
        max_depth: 32,
    }
}

/// Decodes arbitrary bytes as a JSON message; a success must re-encode to an equal message.
pub fn json_decode(data: &[u8]) {
    let limits = small_limits();
    if let Ok(m) = codec::decode_json(data, &limits) {
        let again = codec::encode_json(&m).expect("a decoded message re-encodes");
        let m2 = codec::decode_json(&again, &limits).expect("our own encoding decodes");
        assert_eq!(m, m2);
        // And through msgpack, unless a value cannot be carried there (reported, not lost).
        if let Ok(mp) = codec::encode_msgpack(&m) {
            codec::decode_msgpack(
                &mp,
                &Limits {
                    max_message_size: usize::MAX,
                    ..limits
                },
            )
            .expect("our msgpack decodes");
        }
    }
}

/// Decodes arbitrary bytes as a msgpack message; a success must re-encode to an equal message.
pub fn msgpack_decode(data: &[u8]) {
    let limits = small_limits();
    let _ = codec::check_msgpack(data, limits.max_depth);
    if let Ok(m) = codec::decode_msgpack(data, &limits) {
        let again = codec::encode_msgpack(&m).expect("a decoded message re-encodes");
        let m2 = codec::decode_msgpack(&again, &limits).expect("our own encoding decodes");
        assert_eq!(m, m2);
        if let Ok(js) = codec::encode_json(&m) {
            codec::decode_json(
                &js,
                &Limits {
                    max_message_size: usize::MAX,
                    ..limits
                },
            )
            .expect("our JSON decodes");
        }
    }
}

/// Frames decoded from a stream are the same whether it arrives whole, byte by byte, or
/// split at any position; a declared length over the limit is an error, never an allocation.
pub fn frame_decode(data: &[u8]) {
    let max = 4096;
    let run = |parts: &[&[u8]]| -> (Vec<Vec<u8>>, bool) {
        let mut d = FrameDecoder::new(max);
        let mut frames = Vec::new();
        for p in parts {
            d.push(p);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => {
                        assert!(f.len() <= max);
                        frames.push(f);
                    }
                    Ok(None) => break,
                    Err(_) => return (frames, true),
                }
            }
        }
        (frames, false)
    };
    let whole = run(&[data]);
    let bytes: Vec<&[u8]> = data.chunks(1).collect();
    assert_eq!(run(&bytes), whole, "byte by byte");
    let step = (data.len() / 64).max(1);
    for split in (0..=data.len()).step_by(step) {
        assert_eq!(
            run(&[&data[..split], &data[split..]]),
            whole,
            "split at {split}"
        );
    }
    // Re-framing what came out gives the same frames back.
    if !whole.1 {
        let mut stream = Vec::new();
        for f in &whole.0 {
            stream.extend_from_slice(&encode_frame(f));
        }
        assert_eq!(run(&[&stream]).0, whole.0);
    }
}

const CHANNELS: [&str; 4] = ["c0", "c1", "c2", "up"];
const COMMANDS: [&str; 5] = ["a.x", "a.y", "b.z", "_p.q", "up.cmd"];

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn pick<'s>(&mut self, from: &[&'s str]) -> Option<&'s str> {
        Some(from[self.byte()? as usize % from.len()])
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, rest) = self.0.split_at(n);
        self.0 = rest;
        a
    }
}

/// Drives a router with a sequence of operations read from `data`; checks outputs and bounds.
pub fn router_ops(data: &[u8]) {
    let mut config = Config::new("fuzz");
    config.router_channel = Some("up".to_string());
    config.max_pending = 16;
    config.max_dedup = 8;
    config.request_ttl = 1_000;
    config.event_ttl = 500;
    config.limits = small_limits();
    // Seeded: a failing input replays exactly.
    let mut r = Router::new(config, Box::new(SeededIds::new(0)));
    let mut now = 0u64;
    let mut jobs: Vec<u64> = Vec::new();
    let mut ids: Vec<String> = vec!["id-0".into()];
    let mut input = Bytes(data);
    while let Some(op) = input.byte() {
        match op % 10 {
            0 => {
                if let Some(c) = input.pick(&CHANNELS) {
                    let enc = if input.byte().unwrap_or(0) % 2 == 0 {
                        Encoding::Json
                    } else {
                        Encoding::Msgpack
                    };
                    let _ = r.add_channel(c, enc);
                }
            }
            1 => {
                if let Some(c) = input.pick(&CHANNELS) {
                    let _ = r.close_channel(c);
                }
            }
            2 => {
                // A raw frame.
                let (Some(c), Some(n)) = (input.pick(&CHANNELS), input.byte()) else {
                    break;
                };
                let frame = input.take(n as usize).to_vec();
                let _ = r.handle_frame(c, &frame, now);
            }
            3 => {
                // A well-formed message built from the input.
                let (Some(c), Some(kind)) = (input.pick(&CHANNELS), input.byte()) else {
                    break;
                };
                let id = ids[input.byte().unwrap_or(0) as usize % ids.len()].clone();
                let cmd = input.pick(&COMMANDS).unwrap_or("a.x").to_string();
                let m = match kind % 7 {
                    0 => Message::RegisterRequest {
                        id,
                        command: CommandDef::new(cmd),
                    },
                    1 => Message::RegisterResponse {
                        id: "r".into(),
                        thid: id,
                        response: Ok(()),
                    },
                    2 => Message::ListRequest { id },
                    3 => Message::ListResponse {
                        id: "l".into(),
                        thid: id,
                        commands: vec![CommandDef::new(cmd)],
                    },
                    4 => Message::ExecuteRequest {
                        id,
                        command_id: cmd,
                        request: Some(Payload::json("{\"k\":1}")),
                    },
                    5 => Message::ExecuteResponse {
                        id: "e".into(),
                        thid: id,
                        response: if kind % 2 == 0 {
                            Ok(Some(Payload::json("[1,2]")))
                        } else {
                            Err(ExecError::new(ErrorCode::Timeout, "t"))
                        },
                    },
                    _ => Message::Event {
                        id,
                        event_id: cmd,
                        payload: None,
                    },
                };
                let _ = r.handle_message(c, m, now);
            }
            4 => {
                let cmd = input.pick(&COMMANDS).unwrap_or("a.x");
                r.execute(cmd, Some(Payload::json("{}")), None, now);
            }
            5 => {
                let cmd = input.pick(&COMMANDS).unwrap_or("a.x");
                r.register_local(CommandDef::new(cmd), 1, now);
            }
            6 => {
                let ev = input.pick(&COMMANDS).unwrap_or("a.x");
                r.emit_event(ev, None, now);
            }
            7 => {
                now += u64::from(input.byte().unwrap_or(1)) * 10;
                r.tick(now);
            }
            8 => {
                if let Some(job) = jobs.pop() {
                    let _ = r.complete_job(job, Ok(Some(Payload::json("1"))));
                }
            }
            _ => {
                let id = String::from_utf8_lossy(input.take(4)).into_owned();
                if !id.is_empty() {
                    ids.push(id);
                }
            }
        }
        for a in r.take_actions() {
            match a {
                Action::Send { message, .. } => {
                    // Remember ids so that later responses can match them.
                    ids.push(message.id().to_string());
                    let js = codec::encode_json(&message).expect("router output encodes");
                    codec::decode_json(&js, &Limits::default())
                        .expect("router output is a valid spec message");
                    let mp = codec::encode_msgpack(&message).expect("router output encodes");
                    codec::decode_msgpack(&mp, &Limits::default())
                        .expect("router output is a valid msgpack message");
                }
                Action::RunHandler { job, .. } => jobs.push(job),
                _ => {}
            }
        }
        if ids.len() > 64 {
            ids.drain(1..33);
        }
        let s = r.stats();
        assert!(
            s.pending + s.pending_forwards <= 16 + s.jobs,
            "pending over the cap: {s:?}"
        );
        assert!(s.jobs <= 16, "jobs over the cap: {s:?}");
        assert!(s.dedup_entries <= 8, "dedup table over the cap: {s:?}");
    }
}
