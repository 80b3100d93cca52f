//! Protocol core of cmd-ipc for Python: the spec-v1 message model, the JSON and msgpack
//! codecs with their limits, and the sans-I/O [`router::Router`].
//!
//! This crate knows nothing of Python; the `_core` extension module is a thin binding over it.
#![deny(missing_docs)]

pub mod codec;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod message;
pub mod mpread;
pub mod node;
pub mod router;
pub mod transport;

pub use codec::Limits;
pub use error::{CodecError, UsageError};
pub use message::{CommandDef, CommandSchema, Encoding, ErrorCode, ExecError, Message, Payload};
pub use router::{Action, Config, Router};
