//! The native half of cmd-ipc: what the sans-I/O core (`cmd-ipc-core`) leaves to a driver
//! with descriptors, threads, locks and a clock.
//!
//! * [`transport`]: native channel endpoints, framed messages over a Unix stream socket or
//!   over shared-memory rings (memfd, futex parking, doorbells on the socket).
//! * [`node`]: a registry's native half, the core's router behind a lock plus the native
//!   endpoints, whose traffic (forwarding between them included) is carried out here by
//!   whichever thread reads; blocking callers read their own replies.
//! * [`ids`]: the production [`cmd_ipc_core::ids::IdSource`], random UUIDv4 ids.
//! * [`fuzzing`]: fuzz target bodies (the shm rings against a hostile peer), replayed by
//!   `cargo test` from `fuzz/corpus`.
//!
//! Nothing here knows Python; `rust/py` binds it.
#![deny(missing_docs)]

pub mod fuzzing;
pub mod ids;
pub mod node;
pub mod transport;

pub use ids::RandomIds;
pub use node::{Node, NodeAction, SyncOutcome};
