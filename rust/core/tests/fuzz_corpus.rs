//! Replays every fuzz corpus input (`rust/core/fuzz/corpus/<target>/*`) as an ordinary test,
//! so that every crash a fuzzer ever found stays fixed.

use std::path::PathBuf;

use cmd_ipc_core::fuzzing;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
        .join(target);
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} missing: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| f(&data));
        assert!(result.is_ok(), "{target}: input {} fails", path.display());
        n += 1;
    }
    assert!(n > 0, "corpus {target} is empty");
}

#[test]
fn replay_json_decode() {
    replay("json_decode", fuzzing::json_decode);
}

#[test]
fn replay_msgpack_decode() {
    replay("msgpack_decode", fuzzing::msgpack_decode);
}

#[test]
fn replay_frame_decode() {
    replay("frame_decode", fuzzing::frame_decode);
}

#[test]
fn replay_router_ops() {
    replay("router_ops", fuzzing::router_ops);
}
