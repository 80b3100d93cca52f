//! Where a router's unpredictable values come from: the ids of the messages it creates and
//! the keys of its hash tables.
//!
//! The router reads no randomness of its own: the driver injects an [`IdSource`]. A run is
//! therefore a pure function of its inputs and of that source, and a router given a
//! [`SeededIds`] replays exactly (tests, fuzzing, a recorded session). A registry in
//! production injects a random source (the `cmd-ipc-native` crate's UUIDv4 generator),
//! because ids must be unique across every registry a message may reach: events are
//! deduplicated by id, and a restarted process must not repeat its predecessor's ids.

/// The source of a router's message ids and hash-table keys.
pub trait IdSource: Send {
    /// A fresh message id (UUID-shaped by convention; peers treat it as an opaque string).
    fn next_id(&mut self) -> String;

    /// Keys for the router's hash tables, asked once when the router is built. Peers choose
    /// the ids those tables hold, so a production source gives unpredictable keys (a peer
    /// cannot aim collisions at them); a seeded source gives keys derived from its seed.
    fn hash_keys(&mut self) -> [u64; 4];
}

/// A deterministic [`IdSource`]: UUIDv4-shaped ids from a splitmix64 stream of `seed`.
///
/// Two sources of the same seed give the same ids in the same order. Not for production:
/// two registries seeded alike would emit the same ids.
///
/// ```
/// use cmd_ipc_core::ids::{IdSource, SeededIds};
/// let (mut a, mut b) = (SeededIds::new(7), SeededIds::new(7));
/// let id = a.next_id();
/// assert_eq!(id, b.next_id());
/// assert_eq!((id.len(), &id[14..15]), (36, "4"));
/// ```
#[derive(Clone, Debug)]
pub struct SeededIds {
    state: u64,
}

impl SeededIds {
    /// A stream starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SeededIds { state: seed }
    }

    /// The next splitmix64 output.
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl IdSource for SeededIds {
    fn next_id(&mut self) -> String {
        uuid_string(self.next_u64(), self.next_u64())
    }

    fn hash_keys(&mut self) -> [u64; 4] {
        [
            self.next_u64(),
            self.next_u64(),
            self.next_u64(),
            self.next_u64(),
        ]
    }
}

/// Formats 128 bits as an RFC 4122 version-4 UUID string (version and variant bits set),
/// lower-case, `8-4-4-4-12`.
pub fn uuid_string(hi: u64, lo: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hi = (hi & !0xf000) | 0x4000; // version 4 (bits 12..16 of the third group)
    let lo = (lo & !(0b11 << 62)) | (0b10 << 62); // variant 10xx
    let bits = (u128::from(hi) << 64) | u128::from(lo);
    let mut out = String::with_capacity(36);
    for i in 0..32 {
        if matches!(i, 8 | 12 | 16 | 20) {
            out.push('-');
        }
        let nibble = (bits >> (124 - 4 * i)) & 0xf;
        out.push(HEX[nibble as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_ids_repeat_per_seed_and_differ_across_seeds() {
        let take = |seed| {
            let mut s = SeededIds::new(seed);
            (0..100).map(|_| s.next_id()).collect::<Vec<_>>()
        };
        assert_eq!(take(1), take(1));
        assert_ne!(take(1), take(2));
        let ids = take(3);
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn ids_are_uuid_v4_shaped() {
        let mut s = SeededIds::new(0);
        for _ in 0..100 {
            let id = s.next_id();
            let groups: Vec<usize> = id.split('-').map(str::len).collect();
            assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
            assert!(id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
            assert_eq!(&id[14..15], "4");
            assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        }
        assert_eq!(
            uuid_string(u64::MAX, u64::MAX),
            "ffffffff-ffff-4fff-bfff-ffffffffffff"
        );
        assert_eq!(uuid_string(0, 0), "00000000-0000-4000-8000-000000000000");
    }
}
