//! Errors of the core, each with a stable snake_case code.

use thiserror::Error;

/// Why a frame could not be decoded (or a value could not be encoded).
///
/// Every variant is peer misbehaviour except [`CodecError::Unencodable`], which is raised when a
/// local value cannot be carried by the target encoding. All of them map to the wire error code
/// `invalid_request` when a caller has to be answered.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// The frame is larger than the configured maximum (checked before parsing or allocating).
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the offending frame.
        size: usize,
        /// Configured maximum.
        limit: usize,
    },
    /// The value nests deeper than the configured maximum.
    #[error("message nesting exceeds the limit of {limit} levels")]
    TooDeep {
        /// Configured maximum.
        limit: usize,
    },
    /// Not valid JSON / msgpack at all.
    #[error("malformed {encoding}: {detail}")]
    Malformed {
        /// `json` or `msgpack`.
        encoding: &'static str,
        /// Parser's explanation.
        detail: String,
    },
    /// Well-formed, but not a spec-v1 message (missing field, wrong type, unknown type...).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// A local value that the target encoding cannot represent.
    #[error("cannot encode value: {0}")]
    Unencodable(String),
}

impl CodecError {
    /// Stable code, for logs, metrics and the Python exception's `code`.
    pub fn code(&self) -> &'static str {
        match self {
            CodecError::TooLarge { .. } => "message_too_large",
            CodecError::TooDeep { .. } => "message_too_deep",
            CodecError::Malformed { .. } => "malformed_message",
            CodecError::InvalidMessage(_) => "invalid_message",
            CodecError::Unencodable(_) => "unencodable_value",
        }
    }
}

/// Misuse of the router API by the local driver (never caused by a peer).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UsageError {
    /// An id that must be a non-empty string was empty.
    #[error("{0} must be a non-empty string")]
    EmptyId(&'static str),
    /// A channel with this id is already attached.
    #[error("a channel named {0:?} is already registered")]
    DuplicateChannel(String),
    /// No channel with this id is attached.
    #[error("no channel named {0:?}")]
    UnknownChannel(String),
    /// A job id the router does not know (already completed, or never issued).
    #[error("unknown job {0}")]
    UnknownJob(u64),
    /// A request that is not an object.
    #[error("a request must be an object (a dict), or absent")]
    RequestNotObject,
}

impl UsageError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            UsageError::EmptyId(_) => "empty_id",
            UsageError::DuplicateChannel(_) => "duplicate_channel",
            UsageError::UnknownChannel(_) => "unknown_channel",
            UsageError::UnknownJob(_) => "unknown_job",
            UsageError::RequestNotObject => "request_not_object",
        }
    }
}
