//! The production id source: random RFC 4122 version-4 UUIDs and random hash keys.

use cmd_ipc_core::ids::IdSource;

/// An [`IdSource`] of random UUIDv4 strings (the `uuid` crate's fast thread-local generator),
/// unique across processes and restarts, as the protocol needs (events are deduplicated by id).
#[derive(Clone, Copy, Debug, Default)]
pub struct RandomIds;

impl IdSource for RandomIds {
    fn next_id(&mut self) -> String {
        random_id()
    }

    fn hash_keys(&mut self) -> [u64; 4] {
        let (k0, k1) = uuid::Uuid::new_v4().as_u64_pair();
        let (k2, k3) = uuid::Uuid::new_v4().as_u64_pair();
        [k0, k1, k2, k3]
    }
}

/// A fresh random UUIDv4 string.
pub fn random_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_uuid_v4_and_distinct() {
        let mut ids = RandomIds;
        let (a, b) = (ids.next_id(), ids.next_id());
        assert_ne!(a, b);
        let u = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(u.get_version_num(), 4);
        assert_ne!(ids.hash_keys(), ids.hash_keys());
    }
}
