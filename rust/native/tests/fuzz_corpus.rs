//! Replays every fuzz corpus input of this crate (`rust/native/fuzz/corpus/<target>/*`) as an
//! ordinary test, so that every state a fuzzer ever found interesting stays handled.

use std::path::PathBuf;

use cmd_ipc_native::fuzzing;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
        .join(target);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} missing: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    let mut n = 0;
    for path in entries {
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| f(&data));
        assert!(result.is_ok(), "{target}: input {} fails", path.display());
        n += 1;
    }
    assert!(n > 0, "corpus {target} is empty");
}

#[test]
fn replay_ring_state() {
    replay("ring_state", fuzzing::ring_state);
}

/// The corpus inputs mutated by a seeded generator (a few thousand states, well under a
/// second): a poor man's fuzzing pass in every `cargo test`, reproducible by its seed.
#[test]
fn mutated_ring_states() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/ring_state");
    let seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for _ in 0..3000 {
        let mut data = seeds[next() as usize % seeds.len()].clone();
        for _ in 0..1 + next() % 8 {
            let r = next();
            match r % 3 {
                0 if !data.is_empty() => {
                    let i = (r >> 8) as usize % data.len();
                    data[i] = (r >> 32) as u8;
                }
                1 => data.push((r >> 16) as u8),
                _ => {
                    let i = (r >> 8) as usize % (data.len() + 1);
                    data.insert(i, (r >> 40) as u8);
                }
            }
        }
        fuzzing::ring_state(&data);
    }
}
