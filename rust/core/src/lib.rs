//! Protocol core of cmd-ipc for Python: the spec-v1 message model, the JSON and msgpack
//! codecs with their limits, the stream framing, and the sans-I/O [`router::Router`].
//!
//! Sans-I/O: this crate owns no descriptor, thread, lock or clock (time is an input, ids come
//! from an injected [`ids::IdSource`]), so every protocol rule is tested here with `cargo
//! test` alone and a router run replays from its inputs. The native channels (shared-memory
//! rings, sockets) and the threaded `Node` driving a router over them live in the
//! `cmd-ipc-native` crate; this crate knows nothing of Python either (`rust/py` binds both).
#![deny(missing_docs)]

extern crate alloc;

pub mod codec;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod message;
pub mod mpread;
pub mod router;

pub use codec::Limits;
pub use error::{CodecError, UsageError};
pub use ids::{IdSource, SeededIds};
pub use message::{CommandDef, CommandSchema, Encoding, ErrorCode, ExecError, Message, Payload};
pub use router::{Action, Config, Router};
