//! The seven spec-v1 message types.
//!
//! Values that belong to the application (a request, a result, an event payload, a command's
//! schemas) are kept as [`Payload`]: the encoded bytes exactly as they arrived, tagged with their
//! encoding. A registry that only forwards a message never parses them; they are decoded by the
//! Python side when a handler, caller or listener needs them, and transcoded only when a message
//! crosses from a JSON channel to a msgpack channel or back.

use std::fmt;

/// How a payload (or a whole frame) is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// UTF-8 JSON text (the spec-v1 wire format, used with peers in other languages).
    Json,
    /// MessagePack (used between our own processes; carries `bytes` natively).
    Msgpack,
}

impl Encoding {
    /// The stable lower-case name (`"json"` / `"msgpack"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Msgpack => "msgpack",
        }
    }

    /// Parses a name produced by [`Encoding::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "json" => Some(Encoding::Json),
            "msgpack" => Some(Encoding::Msgpack),
            _ => None,
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An application value, kept encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload {
    /// How `data` is encoded.
    pub encoding: Encoding,
    /// One complete, already validated value in `encoding`.
    pub data: Vec<u8>,
}

impl Payload {
    /// Wraps bytes that the caller guarantees to be one valid value in `encoding`.
    pub fn new(encoding: Encoding, data: Vec<u8>) -> Self {
        Payload { encoding, data }
    }

    /// A JSON payload from JSON text.
    pub fn json(text: impl Into<String>) -> Self {
        Payload::new(Encoding::Json, text.into().into_bytes())
    }

    /// The JSON `null` value.
    pub fn null() -> Self {
        Payload::json("null")
    }

    /// True when the value is an object/map (the spec requires `request` to be one).
    pub fn is_object(&self) -> bool {
        match self.encoding {
            Encoding::Json => self
                .data
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|b| *b == b'{'),
            Encoding::Msgpack => matches!(
                self.data.first(),
                Some(0x80..=0x8f) | Some(0xde) | Some(0xdf)
            ),
        }
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.encoding {
            Encoding::Json => write!(f, "Json({})", String::from_utf8_lossy(&self.data)),
            Encoding::Msgpack => write!(f, "Msgpack({} bytes)", self.data.len()),
        }
    }
}

/// `schema` of a command definition: JSON Schemas for its request and response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandSchema {
    /// Schema of the request object.
    pub request: Option<Payload>,
    /// Schema of the result.
    pub response: Option<Payload>,
}

/// A command as carried in register and list messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandDef {
    /// Command id (`calc.add`). Ids starting with `_` are private.
    pub id: String,
    /// Human description.
    pub description: Option<String>,
    /// Request/response schemas.
    pub schema: Option<CommandSchema>,
}

impl CommandDef {
    /// A definition with only an id.
    pub fn new(id: impl Into<String>) -> Self {
        CommandDef {
            id: id.into(),
            description: None,
            schema: None,
        }
    }
}

/// True for ids that must never be advertised, escalated or broadcast.
pub fn is_private(id: &str) -> bool {
    id.starts_with('_')
}

/// The error codes an `execute.command.response` may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No registry on the path knows the command.
    NotFound,
    /// The request was malformed or rejected by the handler's validation.
    InvalidRequest,
    /// The handler failed.
    InternalError,
    /// No answer within the request TTL.
    Timeout,
    /// The channel the call depended on went away.
    ChannelDisconnected,
    /// A second owner for a command id (registration only; never in an execute response).
    DuplicateCommand,
}

impl ErrorCode {
    /// The codes an `execute.command.response` may carry (the five of the spec; not
    /// `duplicate_command`).
    pub const EXECUTE: [ErrorCode; 5] = [
        ErrorCode::NotFound,
        ErrorCode::InvalidRequest,
        ErrorCode::InternalError,
        ErrorCode::Timeout,
        ErrorCode::ChannelDisconnected,
    ];

    /// The stable wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::Timeout => "timeout",
            ErrorCode::ChannelDisconnected => "channel_disconnected",
            ErrorCode::DuplicateCommand => "duplicate_command",
        }
    }

    /// The code to put on the wire: `duplicate_command` is not an execute error in the spec,
    /// so it travels as `internal_error`.
    pub fn on_wire(self) -> Self {
        match self {
            ErrorCode::DuplicateCommand => ErrorCode::InternalError,
            other => other,
        }
    }

    /// Parses any code, including `duplicate_command`.
    pub fn parse(code: &str) -> Option<Self> {
        if code == "duplicate_command" {
            return Some(ErrorCode::DuplicateCommand);
        }
        Self::from_wire(code)
    }

    /// Parses a code allowed in an `execute.command.response` (the five of the spec).
    pub fn from_wire(code: &str) -> Option<Self> {
        Self::EXECUTE.into_iter().find(|c| c.as_str() == code)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error object of a failed execute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecError {
    /// Stable code.
    pub code: ErrorCode,
    /// Human message.
    pub message: String,
}

impl ExecError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ExecError {
            code,
            message: message.into(),
        }
    }
}

/// Outcome of an execute: a result (absent means `undefined`/no result) or an error.
pub type ExecResult = Result<Option<Payload>, ExecError>;

/// Outcome of a registration; the only error the spec defines is `duplicate_command`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// Another owner already holds the id.
    DuplicateCommand,
}

/// One spec-v1 message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// `register.command.request`
    RegisterRequest {
        /// Message id.
        id: String,
        /// The command being registered.
        command: CommandDef,
    },
    /// `register.command.response`
    RegisterResponse {
        /// Message id.
        id: String,
        /// Id of the request answered.
        thid: String,
        /// Outcome.
        response: Result<(), RegisterError>,
    },
    /// `list.commands.request`
    ListRequest {
        /// Message id.
        id: String,
    },
    /// `list.commands.response`
    ListResponse {
        /// Message id.
        id: String,
        /// Id of the request answered.
        thid: String,
        /// Public commands the sender can execute.
        commands: Vec<CommandDef>,
    },
    /// `execute.command.request`
    ExecuteRequest {
        /// Message id.
        id: String,
        /// Command to run.
        command_id: String,
        /// Request object.
        request: Option<Payload>,
    },
    /// `execute.command.response`
    ExecuteResponse {
        /// Message id.
        id: String,
        /// Id of the request answered.
        thid: String,
        /// Outcome.
        response: ExecResult,
    },
    /// `event`
    Event {
        /// Message id (dedup key).
        id: String,
        /// Event name.
        event_id: String,
        /// Payload.
        payload: Option<Payload>,
    },
}

impl Message {
    /// The message id.
    pub fn id(&self) -> &str {
        match self {
            Message::RegisterRequest { id, .. }
            | Message::RegisterResponse { id, .. }
            | Message::ListRequest { id }
            | Message::ListResponse { id, .. }
            | Message::ExecuteRequest { id, .. }
            | Message::ExecuteResponse { id, .. }
            | Message::Event { id, .. } => id,
        }
    }

    /// What the message is about, besides its own id: the request answered (`thid`) of a
    /// response, the command of an execute or register request, the event id of an event;
    /// `None` for a list request. (Lets a channel route a frame without decoding it again.)
    pub fn reference(&self) -> Option<&str> {
        match self {
            Message::RegisterResponse { thid, .. }
            | Message::ListResponse { thid, .. }
            | Message::ExecuteResponse { thid, .. } => Some(thid),
            Message::ExecuteRequest { command_id, .. } => Some(command_id),
            Message::RegisterRequest { command, .. } => Some(&command.id),
            Message::Event { event_id, .. } => Some(event_id),
            Message::ListRequest { .. } => None,
        }
    }

    /// The spec `type` string.
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::RegisterRequest { .. } => "register.command.request",
            Message::RegisterResponse { .. } => "register.command.response",
            Message::ListRequest { .. } => "list.commands.request",
            Message::ListResponse { .. } => "list.commands.response",
            Message::ExecuteRequest { .. } => "execute.command.request",
            Message::ExecuteResponse { .. } => "execute.command.response",
            Message::Event { .. } => "event",
        }
    }
}
