//! JSON and msgpack codecs for spec-v1 messages, with size and depth limits.
//!
//! * JSON is the spec wire format: one object per message, field names as in the schemas.
//! * msgpack (between our own processes) is a map with the same field names; every application
//!   value (`request`, `result`, `payload`, `schema.request`, `schema.response`) is a msgpack
//!   `bin` holding that value's own msgpack encoding, so a forwarding registry copies it
//!   without parsing it.
//!
//! Both decoders check the frame size before parsing anything and the nesting depth before
//! building anything, and return a [`CodecError`] (never panic) on any input.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::CodecError;
use crate::message::{
    CommandDef, CommandSchema, Encoding, ErrorCode, ExecError, Message, Payload, RegisterError,
};

/// Size and depth limits applied when decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Maximum size of one encoded message, in bytes.
    pub max_message_size: usize,
    /// Maximum nesting of a message, counting the message object itself as level 1.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 64 * 1024 * 1024,
            max_depth: 64,
        }
    }
}

impl Limits {
    fn check_size(&self, len: usize) -> Result<(), CodecError> {
        if len > self.max_message_size {
            return Err(CodecError::TooLarge {
                size: len,
                limit: self.max_message_size,
            });
        }
        Ok(())
    }
}

/// Decodes one message in `encoding`.
pub fn decode(data: &[u8], encoding: Encoding, limits: &Limits) -> Result<Message, CodecError> {
    match encoding {
        Encoding::Json => decode_json(data, limits),
        Encoding::Msgpack => decode_msgpack(data, limits),
    }
}

/// Encodes one message in `encoding`, transcoding payloads that are in the other encoding.
pub fn encode(msg: &Message, encoding: Encoding) -> Result<Vec<u8>, CodecError> {
    match encoding {
        Encoding::Json => encode_json(msg),
        Encoding::Msgpack => encode_msgpack(msg),
    }
}

/// Encodes one message for sending and checks the whole encoded message as a receiver with
/// the same `limits` checks it ([`decode`]): its size, then its nesting depth (the message
/// object is level 1; each application value is checked at the level it sits at, as the
/// decoders do). What this returns is never dropped by such a receiver as too large or too
/// deep; what it refuses would have been.
///
/// Cheap for the common message: the size is a comparison, and a value of `n` bytes nests
/// at most `n` levels, so a value shorter than the depth it may have is not walked.
pub fn encode_checked(
    msg: &Message,
    encoding: Encoding,
    limits: &Limits,
) -> Result<Vec<u8>, CodecError> {
    let frame = encode(msg, encoding)?;
    limits.check_size(frame.len())?;
    match encoding {
        // The receiver scans the whole text (`decode_json`): so does this.
        Encoding::Json if frame.len() > limits.max_depth => {
            check_json_depth(&frame, limits.max_depth)?
        }
        Encoding::Json => {}
        Encoding::Msgpack => {
            // The envelope this codec writes nests at most 4 levels (a list response's
            // schemas); the receiver walks it first (`decode_msgpack_general`).
            if limits.max_depth < 4 {
                check_msgpack(&frame, limits.max_depth)?;
            }
            for_each_payload(msg, &mut |level, p| payload_depth_ok(p, level, limits))?;
        }
    }
    Ok(frame)
}

/// Calls `f(level, payload)` for every application value of `msg`, with the level the
/// decoders check it at (see [`mp_payload`]'s callers).
fn for_each_payload(
    msg: &Message,
    f: &mut dyn FnMut(usize, &Payload) -> Result<(), CodecError>,
) -> Result<(), CodecError> {
    fn schema(
        level: usize,
        c: &CommandDef,
        f: &mut dyn FnMut(usize, &Payload) -> Result<(), CodecError>,
    ) -> Result<(), CodecError> {
        if let Some(s) = &c.schema {
            for p in [&s.request, &s.response].into_iter().flatten() {
                f(level + 2, p)?;
            }
        }
        Ok(())
    }
    match msg {
        Message::ExecuteRequest {
            request: Some(p), ..
        }
        | Message::Event {
            payload: Some(p), ..
        } => f(1, p),
        Message::ExecuteResponse {
            response: Ok(Some(p)),
            ..
        } => f(2, p),
        Message::RegisterRequest { command, .. } => schema(1, command, f),
        Message::ListResponse { commands, .. } => commands.iter().try_for_each(|c| schema(2, c, f)),
        _ => Ok(()),
    }
}

/// Whether a value nests at most the levels a message leaves it at `level` (the check the
/// decoders make, in either encoding: transcoding keeps the nesting).
fn payload_depth_ok(p: &Payload, level: usize, limits: &Limits) -> Result<(), CodecError> {
    let room = limits.max_depth.saturating_sub(level);
    if p.data.len() <= room {
        return Ok(()); // every level takes a byte at least
    }
    let checked = match p.encoding {
        Encoding::Msgpack => check_msgpack(&p.data, room),
        Encoding::Json => check_json_depth(&p.data, room),
    };
    checked.map_err(|e| match e {
        CodecError::TooDeep { .. } => CodecError::TooDeep {
            limit: limits.max_depth,
        },
        other => other,
    })
}

// ---------------------------------------------------------------------------------------------
// Payload validation and transcoding
// ---------------------------------------------------------------------------------------------

/// Checks a JSON text's nesting (at most `max_depth` levels), its `\u` escapes (no lone
/// surrogates: Python's `json` would accept them and then fail to encode them elsewhere,
/// so they are refused here, where every JSON message enters) and its numbers (none that
/// no peer can carry: see [`check_json_number`]).
///
/// A linear scan that allocates nothing; it runs before serde so that a hostile depth never
/// reaches a recursive parser.
pub fn check_json_depth(data: &[u8], max_depth: usize) -> Result<(), CodecError> {
    fn hex4(data: &[u8], at: usize) -> Option<u32> {
        let s = data.get(at..at + 4)?;
        u32::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
    }
    let lone = || CodecError::Malformed {
        encoding: "json",
        detail: "lone UTF-16 surrogate in a \\u escape".to_string(),
    };
    let mut depth = 0usize;
    let mut in_string = false;
    let mut i = 0usize;
    while i < data.len() {
        let b = data[i];
        if in_string {
            if b == b'\\' {
                if data.get(i + 1) == Some(&b'u') {
                    if let Some(cp) = hex4(data, i + 2) {
                        if (0xDC00..0xE000).contains(&cp) {
                            return Err(lone());
                        }
                        if (0xD800..0xDC00).contains(&cp) {
                            let low = (data.get(i + 6) == Some(&b'\\')
                                && data.get(i + 7) == Some(&b'u'))
                            .then(|| hex4(data, i + 8))
                            .flatten();
                            match low {
                                Some(l) if (0xDC00..0xE000).contains(&l) => i += 6,
                                _ => return Err(lone()),
                            }
                        }
                    }
                    i += 6;
                    continue;
                }
                i += 2;
                continue;
            }
            if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(CodecError::TooDeep { limit: max_depth });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < data.len()
                    && matches!(data[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                check_json_number(&data[start..i])?;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Refuses a JSON number no peer of the protocol can carry: an integer outside the 64-bit
/// range msgpack holds (-2^63 .. 2^64-1), or a float that overflows a double (`1e400`, which
/// Python would read as infinity). Short tokens, the common case, are not parsed.
fn check_json_number(token: &[u8]) -> Result<(), CodecError> {
    let float = token.iter().any(|b| matches!(b, b'.' | b'e' | b'E'));
    let out_of_range = |what: &str| {
        let shown = String::from_utf8_lossy(&token[..token.len().min(40)]).into_owned();
        CodecError::InvalidMessage(format!("number {shown} is out of range ({what})"))
    };
    // Without an exponent a float needs over 300 digits to overflow; 18 digits fit i64.
    let exp_at = token.iter().position(|b| matches!(b, b'e' | b'E'));
    if float {
        let finite = match exp_at {
            None => token.len() < 300,
            // `1e-05`, `2.5E+12`: a short exponent and mantissa cannot overflow a double.
            Some(at) => {
                let exp = &token[at + 1..];
                let digits = exp.iter().filter(|b| b.is_ascii_digit()).count();
                at < 290 && digits <= 2
            }
        };
        if finite {
            return Ok(());
        }
        let Ok(text) = std::str::from_utf8(token) else {
            return Ok(()); // the parser reports it
        };
        return match text.parse::<f64>() {
            Ok(v) if !v.is_finite() => Err(out_of_range("beyond a 64-bit float")),
            _ => Ok(()),
        };
    }
    if token.len() <= 18 {
        return Ok(());
    }
    let Ok(text) = std::str::from_utf8(token) else {
        return Ok(());
    };
    if text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok() {
        return Ok(());
    }
    let digits = text.strip_prefix('-').unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(out_of_range("integers are -2^63 .. 2^64-1"));
    }
    Ok(()) // not a number at all: the parser reports it
}

/// Prepares JSON text for transcoding to msgpack: integer literals must fit 64 bits (serde
/// would silently turn larger ones into floats), and `-0` becomes `0` (an integer, as every
/// JSON reader in Python sees it, not the float `-0.0`). Returns the text to transcode.
fn json_for_msgpack(data: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, CodecError> {
    use std::borrow::Cow;
    let mut minus_zero: Vec<usize> = Vec::new();
    let mut in_string = false;
    let mut i = 0usize;
    while i < data.len() {
        let b = data[i];
        if in_string {
            match b {
                b'\\' => i += 2,
                b'"' => {
                    in_string = false;
                    i += 1;
                }
                _ => i += 1,
            }
            continue;
        }
        if b == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        if b == b'-' || b.is_ascii_digit() {
            let start = i;
            i += 1;
            while i < data.len()
                && matches!(data[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
            {
                i += 1;
            }
            let tok = &data[start..i];
            if !tok.iter().any(|c| matches!(c, b'.' | b'e' | b'E')) {
                let text = std::str::from_utf8(tok).unwrap_or("");
                if text == "-0" {
                    minus_zero.push(start);
                } else if text.parse::<i64>().is_err() && text.parse::<u64>().is_err() {
                    return Err(CodecError::Unencodable(format!(
                        "integer {text} is outside the 64-bit range msgpack carries"
                    )));
                }
            }
            continue;
        }
        i += 1;
    }
    if minus_zero.is_empty() {
        return Ok(Cow::Borrowed(data));
    }
    let mut out = Vec::with_capacity(data.len());
    let mut last = 0;
    for pos in minus_zero {
        out.extend_from_slice(&data[last..pos]);
        last = pos + 1; // drop the '-'
    }
    out.extend_from_slice(&data[last..]);
    Ok(Cow::Owned(out))
}

/// Walks exactly one msgpack value covering all of `data`, without allocating per element.
///
/// Rejects truncated input, trailing bytes, reserved markers, nesting deeper than `max_depth`,
/// and containers that declare more elements than there are bytes left (the "bomb" shape).
pub fn check_msgpack(data: &[u8], max_depth: usize) -> Result<(), CodecError> {
    walk_msgpack(data, max_depth, false)
}

/// Like [`check_msgpack`], and also refuses what JSON cannot carry unchanged: `bin` and `ext`
/// values, non-finite floats, and map keys that are not strings.
pub fn check_msgpack_json_safe(data: &[u8], max_depth: usize) -> Result<(), CodecError> {
    walk_msgpack(data, max_depth, true)
}

fn walk_msgpack(data: &[u8], max_depth: usize, json_safe: bool) -> Result<(), CodecError> {
    fn malformed(detail: &str) -> CodecError {
        CodecError::Malformed {
            encoding: "msgpack",
            detail: detail.to_string(),
        }
    }
    fn not_json(what: &str) -> CodecError {
        CodecError::Unencodable(format!("{what} cannot be carried over a JSON channel"))
    }
    let mut pos = 0usize;
    // (items still to read, is a map) for each open container; bounded by max_depth.
    let mut open: Vec<(u64, bool)> = Vec::with_capacity(8);
    let mut pending: u64 = 1;
    let mut in_map = false;
    let take = |pos: &mut usize, n: usize| -> Result<usize, CodecError> {
        let start = *pos;
        let end = start
            .checked_add(n)
            .filter(|e| *e <= data.len())
            .ok_or_else(|| malformed("truncated value"))?;
        *pos = end;
        Ok(start)
    };
    let read_uint = |pos: &mut usize, n: usize| -> Result<u64, CodecError> {
        let s = take(pos, n)?;
        Ok(data[s..s + n]
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    };
    loop {
        if pending == 0 {
            match open.pop() {
                Some((p, m)) => {
                    pending = p;
                    in_map = m;
                    continue;
                }
                None => break,
            }
        }
        // In a map of 2n items, items at even remaining counts are keys.
        let is_key = in_map && pending % 2 == 0;
        pending -= 1;
        let m = data[take(&mut pos, 1)?];
        if json_safe {
            let is_str = matches!(m, 0xa0..=0xbf | 0xd9..=0xdb);
            if is_key && !is_str {
                return Err(not_json("a map key that is not a string"));
            }
            match m {
                0xc4..=0xc6 => return Err(not_json("a bytes value")),
                0xc7..=0xc9 | 0xd4..=0xd8 => return Err(not_json("a msgpack ext value")),
                0xca => {
                    let s = pos;
                    if data.len() >= s + 4 {
                        let v =
                            f32::from_be_bytes([data[s], data[s + 1], data[s + 2], data[s + 3]]);
                        if !v.is_finite() {
                            return Err(not_json("a NaN or infinite float"));
                        }
                    }
                }
                0xcb => {
                    let s = pos;
                    if let Some(b) = data.get(s..s + 8) {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(b);
                        if !f64::from_be_bytes(a).is_finite() {
                            return Err(not_json("a NaN or infinite float"));
                        }
                    }
                }
                _ => {}
            }
        }
        let (skip, container): (u64, Option<(u64, bool)>) = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, None),
            0x80..=0x8f => (0, Some((2 * u64::from(m & 0x0f), true))),
            0x90..=0x9f => (0, Some((u64::from(m & 0x0f), false))),
            0xa0..=0xbf => (u64::from(m & 0x1f), None),
            0xc1 => return Err(malformed("reserved marker 0xc1")),
            0xc4 | 0xd9 => (read_uint(&mut pos, 1)?, None),
            0xc5 | 0xda => (read_uint(&mut pos, 2)?, None),
            0xc6 | 0xdb => (read_uint(&mut pos, 4)?, None),
            0xc7 => (read_uint(&mut pos, 1)? + 1, None),
            0xc8 => (read_uint(&mut pos, 2)? + 1, None),
            0xc9 => (read_uint(&mut pos, 4)? + 1, None),
            0xca => (4, None),
            0xcb => (8, None),
            0xcc | 0xd0 => (1, None),
            0xcd | 0xd1 => (2, None),
            0xce | 0xd2 => (4, None),
            0xcf | 0xd3 => (8, None),
            0xd4 => (2, None),
            0xd5 => (3, None),
            0xd6 => (5, None),
            0xd7 => (9, None),
            0xd8 => (17, None),
            0xdc => (0, Some((read_uint(&mut pos, 2)?, false))),
            0xdd => (0, Some((read_uint(&mut pos, 4)?, false))),
            0xde => (0, Some((2 * read_uint(&mut pos, 2)?, true))),
            0xdf => (0, Some((2 * read_uint(&mut pos, 4)?, true))),
        };
        let skip = usize::try_from(skip).map_err(|_| malformed("length overflows"))?;
        take(&mut pos, skip)?;
        if let Some((items, is_map)) = container {
            // Every element takes at least one byte: refuse impossible counts up front.
            if items > (data.len() - pos) as u64 {
                return Err(malformed(
                    "container declares more elements than bytes remain",
                ));
            }
            if open.len() + 1 > max_depth {
                return Err(CodecError::TooDeep { limit: max_depth });
            }
            open.push((pending, in_map));
            pending = items;
            in_map = is_map;
        }
    }
    if pos != data.len() {
        return Err(malformed("trailing bytes after value"));
    }
    Ok(())
}

/// Levels above an application value in the messages that carry it (the message object is
/// level 1): a request or an event payload sits at level 1, a result at 2, a command's
/// schemas at 4 (in a list response; 3 in a registration).
pub mod level {
    /// `request` of an execute request, `payload` of an event.
    pub const REQUEST: usize = 1;
    /// `response.result` of an execute response.
    pub const RESULT: usize = 2;
    /// `commands[i].schema.request|response` of a list response (the deepest a schema goes).
    pub const SCHEMA: usize = 4;
}

/// Validates an application value received from the local driver (Python), in its encoding,
/// for a message that carries it at `level` (see [`level`]): it may nest `max_depth -
/// level` levels, as the receiver of that message allows.
pub fn validate_payload(p: &Payload, limits: &Limits, level: usize) -> Result<(), CodecError> {
    limits.check_size(p.data.len())?;
    let room = limits.max_depth.saturating_sub(level);
    let deep = |e: CodecError| match e {
        CodecError::TooDeep { .. } => CodecError::TooDeep {
            limit: limits.max_depth,
        },
        other => other,
    };
    match p.encoding {
        Encoding::Json => {
            check_json_depth(&p.data, room).map_err(deep)?;
            serde_json::from_slice::<serde::de::IgnoredAny>(&p.data).map_err(json_malformed)?;
            Ok(())
        }
        Encoding::Msgpack => check_msgpack(&p.data, room).map_err(deep),
    }
}

/// Returns the payload's bytes in `target` encoding (borrowed when no transcoding is needed).
pub fn payload_in(p: &Payload, target: Encoding) -> Result<std::borrow::Cow<'_, [u8]>, CodecError> {
    use std::borrow::Cow;
    if p.encoding == target {
        return Ok(Cow::Borrowed(&p.data));
    }
    let mut out = Vec::with_capacity(p.data.len() + 16);
    match (p.encoding, target) {
        (Encoding::Json, Encoding::Msgpack) => {
            let text = json_for_msgpack(&p.data)?;
            let mut de = serde_json::Deserializer::from_slice(&text);
            let mut ser = rmp_serde::Serializer::new(&mut out);
            serde_transcode::transcode(&mut de, &mut ser)
                .map_err(|e| CodecError::Unencodable(e.to_string()))?;
        }
        (Encoding::Msgpack, Encoding::Json) => {
            check_msgpack_json_safe(&p.data, usize::MAX)?;
            let mut de = rmp_serde::Deserializer::from_read_ref(&p.data[..]);
            let mut ser = serde_json::Serializer::new(&mut out);
            serde_transcode::transcode(&mut de, &mut ser)
                .map_err(|e| CodecError::Unencodable(e.to_string()))?;
        }
        _ => unreachable!("same encodings handled above"),
    }
    Ok(Cow::Owned(out))
}

// ---------------------------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------------------------

fn json_malformed(e: serde_json::Error) -> CodecError {
    if e.to_string().contains("recursion limit") {
        return CodecError::TooDeep { limit: 128 };
    }
    match e.classify() {
        serde_json::error::Category::Data => CodecError::InvalidMessage(e.to_string()),
        _ => CodecError::Malformed {
            encoding: "json",
            detail: e.to_string(),
        },
    }
}

/// A present field whose value is kept raw (a JSON `null` stays `Some("null")`).
fn some_raw<'de, D>(d: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonMessage<'a> {
    id: Option<String>,
    #[serde(rename = "type")]
    ty: String,
    #[serde(rename = "commandId")]
    command_id: Option<String>,
    #[serde(rename = "eventId")]
    event_id: Option<String>,
    thid: Option<String>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    request: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    payload: Option<&'a RawValue>,
    #[serde(default, borrow)]
    response: Option<JsonResponse<'a>>,
    #[serde(default, borrow)]
    command: Option<JsonCommand<'a>>,
    #[serde(default, borrow)]
    commands: Option<Vec<JsonCommand<'a>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonResponse<'a> {
    ok: bool,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    result: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonCommand<'a> {
    id: String,
    description: Option<String>,
    #[serde(default, borrow)]
    schema: Option<JsonSchema<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSchema<'a> {
    #[serde(default, borrow, deserialize_with = "some_raw")]
    request: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "some_raw")]
    response: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonExecError {
    code: String,
    message: String,
}

fn raw_payload(r: Option<&RawValue>) -> Option<Payload> {
    r.map(|r| Payload::json(r.get()))
}

/// Decodes one JSON message.
pub fn decode_json(data: &[u8], limits: &Limits) -> Result<Message, CodecError> {
    limits.check_size(data.len())?;
    check_json_depth(data, limits.max_depth)?;
    let m: JsonMessage<'_> = serde_json::from_slice(data).map_err(json_malformed)?;
    let env = Envelope {
        id: m.id,
        ty: m.ty,
        command_id: m.command_id,
        event_id: m.event_id,
        thid: m.thid,
        request: raw_payload(m.request),
        payload: raw_payload(m.payload),
        response: match m.response {
            None => None,
            Some(r) => Some(EnvResponse {
                ok: r.ok,
                result: raw_payload(r.result),
                error: match r.error {
                    None => None,
                    Some(raw) => Some(parse_json_error(raw)?),
                },
            }),
        },
        command: m.command.map(json_command),
        commands: m
            .commands
            .map(|cs| cs.into_iter().map(json_command).collect()),
    };
    env.into_message()
}

fn parse_json_error(raw: &RawValue) -> Result<EnvError, CodecError> {
    let text = raw.get();
    if text.starts_with('"') {
        let s: String = serde_json::from_str(text).map_err(json_malformed)?;
        return Ok(EnvError::Name(s));
    }
    let e: JsonExecError = serde_json::from_str(text)
        .map_err(|e| CodecError::InvalidMessage(format!("response.error: {e}")))?;
    Ok(EnvError::Object {
        code: e.code,
        message: e.message,
    })
}

fn json_command(c: JsonCommand<'_>) -> CommandDef {
    CommandDef {
        id: c.id,
        description: c.description,
        schema: c.schema.map(|s| CommandSchema {
            request: raw_payload(s.request),
            response: raw_payload(s.response),
        }),
    }
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn push_json_field_str(out: &mut Vec<u8>, key: &str, value: &str) {
    out.push(b',');
    push_json_str(out, key);
    out.push(b':');
    push_json_str(out, value);
}

fn push_json_field_payload(out: &mut Vec<u8>, key: &str, p: &Payload) -> Result<(), CodecError> {
    out.push(b',');
    push_json_str(out, key);
    out.push(b':');
    out.extend_from_slice(&payload_in(p, Encoding::Json)?);
    Ok(())
}

fn push_json_command(out: &mut Vec<u8>, c: &CommandDef) -> Result<(), CodecError> {
    out.extend_from_slice(b"{\"id\":");
    push_json_str(out, &c.id);
    if let Some(d) = &c.description {
        push_json_field_str(out, "description", d);
    }
    if let Some(s) = &c.schema {
        out.extend_from_slice(b",\"schema\":{");
        let mut first = true;
        for (k, v) in [("request", &s.request), ("response", &s.response)] {
            if let Some(p) = v {
                if !first {
                    out.push(b',');
                }
                first = false;
                push_json_str(out, k);
                out.push(b':');
                out.extend_from_slice(&payload_in(p, Encoding::Json)?);
            }
        }
        out.push(b'}');
    }
    out.push(b'}');
    Ok(())
}

/// Encodes one message as JSON text.
pub fn encode_json(msg: &Message) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"{\"id\":");
    push_json_str(&mut out, msg.id());
    push_json_field_str(&mut out, "type", msg.type_name());
    match msg {
        Message::RegisterRequest { command, .. } => {
            out.extend_from_slice(b",\"command\":");
            push_json_command(&mut out, command)?;
        }
        Message::RegisterResponse { thid, response, .. } => {
            push_json_field_str(&mut out, "thid", thid);
            match response {
                Ok(()) => out.extend_from_slice(b",\"response\":{\"ok\":true}"),
                Err(RegisterError::DuplicateCommand) => out.extend_from_slice(
                    b",\"response\":{\"ok\":false,\"error\":\"duplicate_command\"}",
                ),
            }
        }
        Message::ListRequest { .. } => {}
        Message::ListResponse { thid, commands, .. } => {
            push_json_field_str(&mut out, "thid", thid);
            out.extend_from_slice(b",\"commands\":[");
            for (i, c) in commands.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_json_command(&mut out, c)?;
            }
            out.push(b']');
        }
        Message::ExecuteRequest {
            command_id,
            request,
            ..
        } => {
            push_json_field_str(&mut out, "commandId", command_id);
            if let Some(r) = request {
                push_json_field_payload(&mut out, "request", r)?;
            }
        }
        Message::ExecuteResponse { thid, response, .. } => {
            push_json_field_str(&mut out, "thid", thid);
            match response {
                Ok(result) => {
                    out.extend_from_slice(b",\"response\":{\"ok\":true");
                    if let Some(r) = result {
                        push_json_field_payload(&mut out, "result", r)?;
                    }
                    out.push(b'}');
                }
                Err(e) => {
                    out.extend_from_slice(b",\"response\":{\"ok\":false,\"error\":{\"code\":");
                    push_json_str(&mut out, e.code.on_wire().as_str());
                    push_json_field_str(&mut out, "message", &e.message);
                    out.extend_from_slice(b"}}");
                }
            }
        }
        Message::Event {
            event_id, payload, ..
        } => {
            push_json_field_str(&mut out, "eventId", event_id);
            if let Some(p) = payload {
                push_json_field_payload(&mut out, "payload", p)?;
            }
        }
    }
    out.push(b'}');
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// msgpack
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MpMessage<'a> {
    id: Option<String>,
    #[serde(rename = "type")]
    ty: String,
    #[serde(rename = "commandId")]
    command_id: Option<String>,
    #[serde(rename = "eventId")]
    event_id: Option<String>,
    thid: Option<String>,
    #[serde(default, borrow)]
    request: Option<&'a serde_bytes::Bytes>,
    #[serde(default, borrow)]
    payload: Option<&'a serde_bytes::Bytes>,
    #[serde(default, borrow)]
    response: Option<MpResponse<'a>>,
    #[serde(default, borrow)]
    command: Option<MpCommand<'a>>,
    #[serde(default, borrow)]
    commands: Option<Vec<MpCommand<'a>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MpResponse<'a> {
    ok: bool,
    #[serde(default, borrow)]
    result: Option<&'a serde_bytes::Bytes>,
    #[serde(default)]
    error: Option<MpError>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MpError {
    Name(String),
    Object { code: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MpCommand<'a> {
    id: String,
    description: Option<String>,
    #[serde(default, borrow)]
    schema: Option<MpSchema<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MpSchema<'a> {
    #[serde(default, borrow)]
    request: Option<&'a serde_bytes::Bytes>,
    #[serde(default, borrow)]
    response: Option<&'a serde_bytes::Bytes>,
}

fn mp_payload(
    b: Option<&serde_bytes::Bytes>,
    level: usize,
    limits: &Limits,
) -> Result<Option<Payload>, CodecError> {
    match b {
        None => Ok(None),
        Some(b) => {
            check_msgpack(b, limits.max_depth.saturating_sub(level)).map_err(|e| match e {
                CodecError::TooDeep { .. } => CodecError::TooDeep {
                    limit: limits.max_depth,
                },
                other => other,
            })?;
            Ok(Some(Payload::new(Encoding::Msgpack, b.to_vec())))
        }
    }
}

fn mp_command(c: MpCommand<'_>, level: usize, limits: &Limits) -> Result<CommandDef, CodecError> {
    Ok(CommandDef {
        id: c.id,
        description: c.description,
        schema: match c.schema {
            None => None,
            Some(s) => Some(CommandSchema {
                request: mp_payload(s.request, level + 2, limits)?,
                response: mp_payload(s.response, level + 2, limits)?,
            }),
        },
    })
}

/// Decodes one msgpack message.
pub fn decode_msgpack(data: &[u8], limits: &Limits) -> Result<Message, CodecError> {
    limits.check_size(data.len())?;
    match fast::decode(data, limits) {
        Some(m) => Ok(m),
        None => decode_msgpack_general(data, limits),
    }
}

/// [`decode_msgpack`] without its fast path for the messages of a call.
fn decode_msgpack_general(data: &[u8], limits: &Limits) -> Result<Message, CodecError> {
    // Structure, depth and declared sizes first: serde never sees an impossible length.
    check_msgpack(data, limits.max_depth)?;
    let m: MpMessage<'_> = rmp_serde::from_slice(data).map_err(|e| match e {
        rmp_serde::decode::Error::Syntax(_) => CodecError::InvalidMessage(e.to_string()),
        _ => CodecError::InvalidMessage(e.to_string()),
    })?;
    let env = Envelope {
        id: m.id,
        ty: m.ty,
        command_id: m.command_id,
        event_id: m.event_id,
        thid: m.thid,
        request: mp_payload(m.request, 1, limits)?,
        payload: mp_payload(m.payload, 1, limits)?,
        response: match m.response {
            None => None,
            Some(r) => Some(EnvResponse {
                ok: r.ok,
                result: mp_payload(r.result, 2, limits)?,
                error: r.error.map(|e| match e {
                    MpError::Name(n) => EnvError::Name(n),
                    MpError::Object { code, message } => EnvError::Object { code, message },
                }),
            }),
        },
        command: m.command.map(|c| mp_command(c, 1, limits)).transpose()?,
        commands: match m.commands {
            None => None,
            Some(cs) => Some(
                cs.into_iter()
                    .map(|c| mp_command(c, 2, limits))
                    .collect::<Result<_, _>>()?,
            ),
        },
    };
    env.into_message()
}

/// The two messages of a call, as this codec writes them (an execute request, and an
/// execute response with `ok: true`), decoded without serde. Anything else, or anything
/// unusual in them (a duplicate or unknown key, another value type, an empty id, a payload
/// that fails its checks...), returns `None`, and the general decoder decides: so this
/// accepts a subset of what it accepts, with the same result (a test compares the two).
mod fast {
    use super::*;
    use rmp::Marker;

    use crate::mpread::Cursor;

    fn fixmap_len(c: &mut Cursor<'_>) -> Option<usize> {
        match c.marker()? {
            Marker::FixMap(n) => Some(n as usize),
            _ => None,
        }
    }

    fn non_empty<'a>(c: &mut Cursor<'a>) -> Option<&'a str> {
        c.str().filter(|s| !s.is_empty())
    }

    /// Sets a field read once; a second occurrence gives up.
    fn once<T>(slot: &mut Option<T>, v: Option<T>) -> Option<()> {
        if slot.is_some() {
            return None;
        }
        *slot = Some(v?);
        Some(())
    }

    /// A payload that passes the checks the general decoder makes at this level.
    fn payload(b: &[u8], level: usize, limits: &Limits) -> Option<Payload> {
        mp_payload(Some(serde_bytes::Bytes::new(b)), level, limits).ok()?
    }

    pub(super) fn decode(data: &[u8], limits: &Limits) -> Option<Message> {
        if limits.max_depth < 3 {
            return None;
        }
        let mut c = Cursor::new(data);
        let (mut id, mut ty, mut command_id, mut thid) = (None, None, None, None);
        let (mut request, mut response) = (None, None);
        for _ in 0..fixmap_len(&mut c)? {
            match c.str()? {
                "id" => once(&mut id, non_empty(&mut c))?,
                "type" => once(&mut ty, c.str())?,
                "commandId" => once(&mut command_id, non_empty(&mut c))?,
                "thid" => once(&mut thid, non_empty(&mut c))?,
                "request" => once(&mut request, c.bin())?,
                "response" => {
                    let (mut ok, mut result) = (None, None);
                    for _ in 0..fixmap_len(&mut c)? {
                        match c.str()? {
                            "ok" => once(&mut ok, (c.marker()? == Marker::True).then_some(()))?,
                            "result" => once(&mut result, c.bin())?,
                            _ => return None,
                        }
                    }
                    ok?;
                    once(&mut response, Some(result))?;
                }
                _ => return None,
            }
        }
        if c.remaining() != 0 {
            return None;
        }
        let id = id?.to_string();
        match ty? {
            "execute.command.request" if thid.is_none() && response.is_none() => {
                let request = match request {
                    None => None,
                    Some(b) => Some(payload(b, 1, limits).filter(Payload::is_object)?),
                };
                Some(Message::ExecuteRequest {
                    id,
                    command_id: command_id?.to_string(),
                    request,
                })
            }
            "execute.command.response" if command_id.is_none() && request.is_none() => {
                let result = match response? {
                    None => None,
                    Some(b) => Some(payload(b, 2, limits)?),
                };
                Some(Message::ExecuteResponse {
                    id,
                    thid: thid?.to_string(),
                    response: Ok(result),
                })
            }
            _ => None,
        }
    }
}

fn mp_str(out: &mut Vec<u8>, s: &str) {
    // Writes into a Vec cannot fail.
    let _ = rmp::encode::write_str(out, s);
}

fn mp_payload_field(out: &mut Vec<u8>, key: &str, p: &Payload) -> Result<(), CodecError> {
    mp_str(out, key);
    let bytes = payload_in(p, Encoding::Msgpack)?;
    let _ = rmp::encode::write_bin(out, &bytes);
    Ok(())
}

fn mp_command_def(out: &mut Vec<u8>, c: &CommandDef) -> Result<(), CodecError> {
    let n = 1 + u32::from(c.description.is_some()) + u32::from(c.schema.is_some());
    let _ = rmp::encode::write_map_len(out, n);
    mp_str(out, "id");
    mp_str(out, &c.id);
    if let Some(d) = &c.description {
        mp_str(out, "description");
        mp_str(out, d);
    }
    if let Some(s) = &c.schema {
        mp_str(out, "schema");
        let n = u32::from(s.request.is_some()) + u32::from(s.response.is_some());
        let _ = rmp::encode::write_map_len(out, n);
        if let Some(p) = &s.request {
            mp_payload_field(out, "request", p)?;
        }
        if let Some(p) = &s.response {
            mp_payload_field(out, "response", p)?;
        }
    }
    Ok(())
}

/// Encodes one message as msgpack.
pub fn encode_msgpack(msg: &Message) -> Result<Vec<u8>, CodecError> {
    // Room for the keys, two ids, the type and a command id, plus the payload: one
    // allocation for the common messages.
    let payload = match msg {
        Message::ExecuteRequest {
            request: Some(p), ..
        } => p.data.len(),
        Message::ExecuteResponse {
            response: Ok(Some(p)),
            ..
        } => p.data.len(),
        Message::Event {
            payload: Some(p), ..
        } => p.data.len(),
        _ => 0,
    };
    let mut out = Vec::with_capacity(192 + payload);
    let fields: u32 = match msg {
        Message::ListRequest { .. } => 2,
        Message::RegisterRequest { .. } => 3,
        Message::RegisterResponse { .. }
        | Message::ListResponse { .. }
        | Message::ExecuteResponse { .. } => 4,
        Message::ExecuteRequest { request, .. } => 3 + u32::from(request.is_some()),
        Message::Event { payload, .. } => 3 + u32::from(payload.is_some()),
    };
    let _ = rmp::encode::write_map_len(&mut out, fields);
    mp_str(&mut out, "id");
    mp_str(&mut out, msg.id());
    mp_str(&mut out, "type");
    mp_str(&mut out, msg.type_name());
    match msg {
        Message::RegisterRequest { command, .. } => {
            mp_str(&mut out, "command");
            mp_command_def(&mut out, command)?;
        }
        Message::RegisterResponse { thid, response, .. } => {
            mp_str(&mut out, "thid");
            mp_str(&mut out, thid);
            mp_str(&mut out, "response");
            match response {
                Ok(()) => {
                    let _ = rmp::encode::write_map_len(&mut out, 1);
                    mp_str(&mut out, "ok");
                    let _ = rmp::encode::write_bool(&mut out, true);
                }
                Err(RegisterError::DuplicateCommand) => {
                    let _ = rmp::encode::write_map_len(&mut out, 2);
                    mp_str(&mut out, "ok");
                    let _ = rmp::encode::write_bool(&mut out, false);
                    mp_str(&mut out, "error");
                    mp_str(&mut out, "duplicate_command");
                }
            }
        }
        Message::ListRequest { .. } => {}
        Message::ListResponse { thid, commands, .. } => {
            mp_str(&mut out, "thid");
            mp_str(&mut out, thid);
            mp_str(&mut out, "commands");
            let len = u32::try_from(commands.len())
                .map_err(|_| CodecError::Unencodable("too many commands".into()))?;
            let _ = rmp::encode::write_array_len(&mut out, len);
            for c in commands {
                mp_command_def(&mut out, c)?;
            }
        }
        Message::ExecuteRequest {
            command_id,
            request,
            ..
        } => {
            mp_str(&mut out, "commandId");
            mp_str(&mut out, command_id);
            if let Some(r) = request {
                mp_payload_field(&mut out, "request", r)?;
            }
        }
        Message::ExecuteResponse { thid, response, .. } => {
            mp_str(&mut out, "thid");
            mp_str(&mut out, thid);
            mp_str(&mut out, "response");
            match response {
                Ok(result) => {
                    let _ = rmp::encode::write_map_len(&mut out, 1 + u32::from(result.is_some()));
                    mp_str(&mut out, "ok");
                    let _ = rmp::encode::write_bool(&mut out, true);
                    if let Some(r) = result {
                        mp_payload_field(&mut out, "result", r)?;
                    }
                }
                Err(e) => {
                    let _ = rmp::encode::write_map_len(&mut out, 2);
                    mp_str(&mut out, "ok");
                    let _ = rmp::encode::write_bool(&mut out, false);
                    mp_str(&mut out, "error");
                    let _ = rmp::encode::write_map_len(&mut out, 2);
                    mp_str(&mut out, "code");
                    mp_str(&mut out, e.code.on_wire().as_str());
                    mp_str(&mut out, "message");
                    mp_str(&mut out, &e.message);
                }
            }
        }
        Message::Event {
            event_id, payload, ..
        } => {
            mp_str(&mut out, "eventId");
            mp_str(&mut out, event_id);
            if let Some(p) = payload {
                mp_payload_field(&mut out, "payload", p)?;
            }
        }
    }
    Ok(out)
}

/// For a frame that failed to decode, the id of the execute request it evidently was, so the
/// sender can be answered `invalid_request` instead of waiting for its timeout.
pub fn sniff_execute_request(data: &[u8], encoding: Encoding, err: &CodecError) -> Option<String> {
    #[derive(Deserialize)]
    struct Sniff {
        id: String,
        #[serde(rename = "type")]
        ty: String,
    }
    let sniff: Sniff = match (encoding, err) {
        (_, CodecError::TooLarge { .. }) => return None,
        (Encoding::Json, _) => serde_json::from_slice(data).ok()?,
        // Only a structurally sound msgpack envelope is read again (its payloads are `bin`,
        // so a too-deep payload does not make the envelope deep).
        (Encoding::Msgpack, _) => {
            check_msgpack(data, 16).ok()?;
            rmp_serde::from_slice(data).ok()?
        }
    };
    (sniff.ty == "execute.command.request" && !sniff.id.is_empty()).then_some(sniff.id)
}

/// The `thid` of a frame that failed to decode but is recognisably an execute response (a
/// result holding a number no peer can carry, say), so that the call or forward waiting for
/// it fails at once instead of at its timeout. `None` otherwise, and for a frame over the
/// size limit (never read again).
pub fn sniff_execute_response(data: &[u8], encoding: Encoding, err: &CodecError) -> Option<String> {
    #[derive(Deserialize)]
    struct Sniff {
        thid: String,
        #[serde(rename = "type")]
        ty: String,
    }
    let sniff: Sniff = match (encoding, err) {
        (_, CodecError::TooLarge { .. }) => return None,
        (Encoding::Json, _) => serde_json::from_slice(data).ok()?,
        (Encoding::Msgpack, _) => {
            check_msgpack(data, 16).ok()?;
            rmp_serde::from_slice(data).ok()?
        }
    };
    (sniff.ty == "execute.command.response" && !sniff.thid.is_empty()).then_some(sniff.thid)
}

// ---------------------------------------------------------------------------------------------
// Shared envelope validation: which fields each type requires and allows.
// ---------------------------------------------------------------------------------------------

enum EnvError {
    Name(String),
    Object { code: String, message: String },
}

struct EnvResponse {
    ok: bool,
    result: Option<Payload>,
    error: Option<EnvError>,
}

struct Envelope {
    id: Option<String>,
    ty: String,
    command_id: Option<String>,
    event_id: Option<String>,
    thid: Option<String>,
    request: Option<Payload>,
    payload: Option<Payload>,
    response: Option<EnvResponse>,
    command: Option<CommandDef>,
    commands: Option<Vec<CommandDef>>,
}

fn invalid(msg: impl Into<String>) -> CodecError {
    CodecError::InvalidMessage(msg.into())
}

fn non_empty(field: &str, v: Option<String>) -> Result<String, CodecError> {
    match v {
        Some(s) if !s.is_empty() => Ok(s),
        Some(_) => Err(invalid(format!("'{field}' must be a non-empty string"))),
        None => Err(invalid(format!("missing field '{field}'"))),
    }
}

fn check_command(c: &CommandDef) -> Result<(), CodecError> {
    if c.id.is_empty() {
        return Err(invalid("command 'id' must be a non-empty string"));
    }
    Ok(())
}

impl Envelope {
    fn into_message(self) -> Result<Message, CodecError> {
        let id = non_empty("id", self.id)?;
        let ty = self.ty;
        // Fields each type may carry (besides id/type); anything else present is an error,
        // as the schemas say `additionalProperties: false`.
        let present = [
            ("commandId", self.command_id.is_some()),
            ("eventId", self.event_id.is_some()),
            ("thid", self.thid.is_some()),
            ("request", self.request.is_some()),
            ("payload", self.payload.is_some()),
            ("response", self.response.is_some()),
            ("command", self.command.is_some()),
            ("commands", self.commands.is_some()),
        ];
        let allowed: &[&str] = match ty.as_str() {
            "register.command.request" => &["command"],
            "register.command.response" => &["thid", "response"],
            "list.commands.request" => &[],
            "list.commands.response" => &["thid", "commands"],
            "execute.command.request" => &["commandId", "request"],
            "execute.command.response" => &["thid", "response"],
            "event" => &["eventId", "payload"],
            other => return Err(invalid(format!("unknown message type {other:?}"))),
        };
        if let Some((name, _)) = present
            .iter()
            .find(|(name, here)| *here && !allowed.contains(name))
        {
            return Err(invalid(format!("field '{name}' is not allowed in {ty}")));
        }
        Ok(match ty.as_str() {
            "register.command.request" => {
                let command = self
                    .command
                    .ok_or_else(|| invalid("missing field 'command'"))?;
                check_command(&command)?;
                Message::RegisterRequest { id, command }
            }
            "register.command.response" => {
                let thid = non_empty("thid", self.thid)?;
                let r = self
                    .response
                    .ok_or_else(|| invalid("missing field 'response'"))?;
                if r.result.is_some() {
                    return Err(invalid("register response cannot carry 'result'"));
                }
                let response = match (r.ok, r.error) {
                    (true, None) => Ok(()),
                    (false, Some(EnvError::Name(n))) if n == "duplicate_command" => {
                        Err(RegisterError::DuplicateCommand)
                    }
                    _ => {
                        return Err(invalid(
                            "register response must be {ok:true} or {ok:false, error:'duplicate_command'}",
                        ))
                    }
                };
                Message::RegisterResponse { id, thid, response }
            }
            "list.commands.request" => Message::ListRequest { id },
            "list.commands.response" => {
                let thid = non_empty("thid", self.thid)?;
                let commands = self
                    .commands
                    .ok_or_else(|| invalid("missing field 'commands'"))?;
                commands.iter().try_for_each(check_command)?;
                Message::ListResponse { id, thid, commands }
            }
            "execute.command.request" => {
                let command_id = non_empty("commandId", self.command_id)?;
                if let Some(r) = &self.request {
                    if !r.is_object() {
                        return Err(invalid("'request' must be an object"));
                    }
                }
                Message::ExecuteRequest {
                    id,
                    command_id,
                    request: self.request,
                }
            }
            "execute.command.response" => {
                let thid = non_empty("thid", self.thid)?;
                let r = self
                    .response
                    .ok_or_else(|| invalid("missing field 'response'"))?;
                let response = match (r.ok, r.result, r.error) {
                    (true, result, None) => Ok(result),
                    (false, None, Some(EnvError::Object { code, message })) => {
                        let code = ErrorCode::from_wire(&code)
                            .ok_or_else(|| invalid(format!("unknown error code {code:?}")))?;
                        Err(ExecError { code, message })
                    }
                    _ => {
                        return Err(invalid(
                            "execute response must be {ok:true, result?} or {ok:false, error:{code, message}}",
                        ))
                    }
                };
                Message::ExecuteResponse { id, thid, response }
            }
            "event" => Message::Event {
                id,
                event_id: non_empty("eventId", self.event_id)?,
                payload: self.payload,
            },
            _ => unreachable!("type checked above"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_numbers_no_peer_can_carry_are_refused() {
        let limits = Limits::default();
        let msg = |n: &str| {
            format!(
                r#"{{"id":"r1","type":"execute.command.request","commandId":"c","request":{{"a":{n}}}}}"#
            )
        };
        for bad in [
            "1e400",
            "-1e400",
            "18446744073709551616",
            "-9223372036854775809",
            "1E309",
        ] {
            let err = decode_json(msg(bad).as_bytes(), &limits).unwrap_err();
            assert_eq!(err.code(), "invalid_message", "{bad}: {err}");
            assert!(err.to_string().contains("out of range"), "{err}");
            // Recognisably an execute request: answered invalid_request, not just dropped.
            assert_eq!(
                sniff_execute_request(msg(bad).as_bytes(), Encoding::Json, &err).as_deref(),
                Some("r1")
            );
            let local = Payload::json(format!(r#"{{"a":{bad}}}"#));
            assert!(validate_payload(&local, &limits, 0).is_err(), "{bad}");
        }
        for good in [
            "1e300",
            "-1.5",
            "0",
            "-0",
            "18446744073709551615",
            "-9223372036854775808",
            "123456789012345678",
            "1.000000000000000000000001",
        ] {
            decode_json(msg(good).as_bytes(), &limits).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        // Digits inside strings are not numbers.
        decode_json(msg(r#""99999999999999999999999""#).as_bytes(), &limits).unwrap();
    }

    #[test]
    fn fast_msgpack_path_agrees_with_the_general_decoder() {
        let lim = lim();
        let p = |b: &[u8]| Some(Payload::new(Encoding::Msgpack, b.to_vec()));
        let messages = [
            Message::ExecuteRequest {
                id: "r1".into(),
                command_id: "calc.add".into(),
                request: p(b"\x82\xa1a\x01\xa1b\x02"),
            },
            Message::ExecuteRequest {
                id: "r2".into(),
                command_id: "x".into(),
                request: None,
            },
            Message::ExecuteResponse {
                id: "s1".into(),
                thid: "r1".into(),
                response: Ok(p(b"\x03")),
            },
            Message::ExecuteResponse {
                id: "s2".into(),
                thid: "r2".into(),
                response: Ok(None),
            },
            Message::ExecuteResponse {
                id: "s3".into(),
                thid: "r3".into(),
                response: Err(ExecError::new(ErrorCode::NotFound, "nope")),
            },
        ];
        let mut taken = 0;
        for m in &messages {
            let data = encode_msgpack(m).unwrap();
            if let Some(fast) = fast::decode(&data, &lim) {
                assert_eq!(&fast, m);
                taken += 1;
            }
            // Every truncation and every single-byte change: the fast path either gives
            // up or decodes exactly what the general decoder does.
            let mut variants: Vec<Vec<u8>> = (0..data.len()).map(|n| data[..n].to_vec()).collect();
            for i in 0..data.len() {
                for v in [
                    0x00, 0x01, 0x7f, 0x80, 0x81, 0x90, 0xa0, 0xc0, 0xc2, 0xc3, 0xc4, 0xd9, 0xff,
                ] {
                    let mut d = data.clone();
                    d[i] = v;
                    variants.push(d);
                }
            }
            for v in variants {
                if let Some(fast) = fast::decode(&v, &lim) {
                    assert_eq!(decode_msgpack_general(&v, &lim).ok(), Some(fast), "{v:?}");
                }
            }
        }
        assert_eq!(
            taken, 4,
            "the error response is left to the general decoder"
        );
        // Duplicate and unknown keys, a payload that is not an object or is too deep.
        let tiny = Limits {
            max_depth: 3,
            ..lim
        };
        let deep = encode_msgpack(&Message::ExecuteRequest {
            id: "r".into(),
            command_id: "c".into(),
            request: p(b"\x81\xa1a\x91\x91\x91\x01"),
        })
        .unwrap();
        assert!(fast::decode(&deep, &tiny).is_none());
        assert!(decode_msgpack(&deep, &tiny).is_err());
        let not_object = encode_msgpack(&Message::ExecuteRequest {
            id: "r".into(),
            command_id: "c".into(),
            request: p(b"\x01"),
        })
        .unwrap();
        assert!(fast::decode(&not_object, &lim).is_none());
        assert!(decode_msgpack(&not_object, &lim).is_err());
    }

    fn lim() -> Limits {
        Limits::default()
    }

    #[test]
    fn json_round_trip_keeps_payload_bytes() {
        let text = br#"{"id":"x","type":"execute.command.request","commandId":"a.b","request":{"a": [1, 2.5, "s"]}}"#;
        let m = decode_json(text, &lim()).unwrap();
        match &m {
            Message::ExecuteRequest { request, .. } => {
                assert_eq!(request.as_ref().unwrap().data, br#"{"a": [1, 2.5, "s"]}"#);
            }
            other => panic!("unexpected {other:?}"),
        }
        let again = decode_json(&encode_json(&m).unwrap(), &lim()).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn msgpack_round_trip_and_transcoding() {
        let text = br#"{"id":"x","type":"event","eventId":"e","payload":{"k":[1,null,true,"v"]}}"#;
        let m = decode_json(text, &lim()).unwrap();
        let mp = encode_msgpack(&m).unwrap();
        let back = decode_msgpack(&mp, &lim()).unwrap();
        let json_again = encode_json(&back).unwrap();
        let v1: serde_json::Value = serde_json::from_slice(text).unwrap();
        let v2: serde_json::Value = serde_json::from_slice(&json_again).unwrap();
        assert_eq!(v1, v2);
    }

    #[test]
    fn null_payload_is_kept() {
        let text = br#"{"id":"x","type":"event","eventId":"e","payload":null}"#;
        let m = decode_json(text, &lim()).unwrap();
        let out = encode_json(&m).unwrap();
        assert_eq!(out, text.to_vec());
    }

    #[test]
    fn rejects_oversize_before_parsing() {
        let l = Limits {
            max_message_size: 10,
            max_depth: 8,
        };
        let err = decode_json(b"not even json but long", &l).unwrap_err();
        assert_eq!(err.code(), "message_too_large");
        let err = decode_msgpack(&[0xc1; 11], &l).unwrap_err();
        assert_eq!(err.code(), "message_too_large");
    }

    #[test]
    fn rejects_deep_nesting() {
        let mut s = String::from(r#"{"id":"x","type":"event","eventId":"e","payload":"#);
        s.push_str(&"[".repeat(100_000));
        s.push_str(&"]".repeat(100_000));
        s.push('}');
        assert_eq!(
            decode_json(s.as_bytes(), &lim()).unwrap_err().code(),
            "message_too_deep"
        );
        let mut deep = vec![0x91u8; 100_000];
        deep.push(0xc0);
        assert_eq!(
            check_msgpack(&deep, 64).unwrap_err().code(),
            "message_too_deep"
        );
    }

    #[test]
    fn msgpack_bomb_is_refused_without_allocating() {
        // array16 declaring 65535 elements, each an array16 declaring 65535, ...
        let mut bomb = Vec::new();
        for _ in 0..24_000 {
            bomb.extend_from_slice(&[0xdc, 0xff, 0xff]);
        }
        let err = check_msgpack(&bomb, 64).unwrap_err();
        assert!(matches!(
            err,
            CodecError::Malformed { .. } | CodecError::TooDeep { .. }
        ));
    }

    #[test]
    fn malformed_inputs_are_typed_errors() {
        for bad in [
            &b"{"[..],
            b"[]",
            b"{\"id\":\"x\"}",
            b"{\"id\":\"\",\"type\":\"list.commands.request\"}",
            b"{\"id\":\"x\",\"type\":\"nope\"}",
            b"{\"id\":\"x\",\"type\":\"list.commands.request\",\"extra\":1}",
            b"{\"id\":\"x\",\"type\":\"event\",\"eventId\":\"e\",\"commandId\":\"c\"}",
            b"{\"id\":\"x\",\"type\":\"execute.command.request\",\"commandId\":\"c\",\"request\":[1]}",
            b"{\"id\":\"x\",\"type\":\"execute.command.response\",\"thid\":\"t\",\"response\":{\"ok\":false}}",
            b"{\"id\":\"x\",\"type\":\"execute.command.response\",\"thid\":\"t\",\"response\":{\"ok\":false,\"error\":{\"code\":\"weird\",\"message\":\"m\"}}}",
            b"{\"id\":\"x\",\"id\":\"y\",\"type\":\"list.commands.request\"}",
            b"\xff\xfe",
        ] {
            let e = decode_json(bad, &lim()).unwrap_err();
            assert!(
                matches!(
                    e,
                    CodecError::Malformed { .. } | CodecError::InvalidMessage(_)
                ),
                "{e:?}"
            );
        }
        for bad in [
            &[0xc1u8][..],
            &[0x81, 0xa2],
            &[0x92, 0x01],
            &[0x01, 0x02],
            &[],
        ] {
            assert!(decode_msgpack(bad, &lim()).is_err());
        }
    }

    #[test]
    fn msgpack_to_json_refuses_what_json_cannot_carry() {
        let cases: [&[u8]; 4] = [
            &[0x81, 0x01, 0x02],                   // {1: 2}
            &[0x91, 0xc4, 0x01, 0x00],             // [b"\0"]
            &[0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0], // NaN
            &[0x91, 0xd4, 0x01, 0x02],             // [ext]
        ];
        for c in cases {
            let p = Payload::new(Encoding::Msgpack, c.to_vec());
            assert!(check_msgpack(c, 8).is_ok());
            let e = payload_in(&p, Encoding::Json).unwrap_err();
            assert_eq!(e.code(), "unencodable_value", "{c:?}");
        }
        let nested = Payload::new(
            Encoding::Msgpack,
            vec![0x81, 0xa1, b'k', 0x92, 0x01, 0xa1, b'x'],
        );
        assert_eq!(
            &*payload_in(&nested, Encoding::Json).unwrap(),
            br#"{"k":[1,"x"]}"#
        );
    }

    #[test]
    fn json_edge_values_are_handled_one_way() {
        // Lone surrogates are refused; a valid pair is fine.
        for bad in [r#""\ud800""#, r#""a\udfffb""#, r#"{"\ud800":1}"#] {
            assert_eq!(
                check_json_depth(bad.as_bytes(), 8).unwrap_err().code(),
                "malformed_message"
            );
        }
        assert!(check_json_depth(br#""\ud83d\ude00""#, 8).is_ok());
        // Integers outside 64 bits cannot go to msgpack; -0 becomes the integer 0.
        let big = Payload::json(r#"{"n":18446744073709551616}"#);
        assert_eq!(
            payload_in(&big, Encoding::Msgpack).unwrap_err().code(),
            "unencodable_value"
        );
        let edge = Payload::json(
            r#"{"a":18446744073709551615,"b":-9223372036854775808,"s":"-0 1e999999999999999999999","z":-0,"f":-0.0}"#,
        );
        let mp = payload_in(&edge, Encoding::Msgpack).unwrap().into_owned();
        let mp = Payload::new(Encoding::Msgpack, mp);
        let back = payload_in(&mp, Encoding::Json).unwrap();
        assert_eq!(
            std::str::from_utf8(&back).unwrap(),
            r#"{"a":18446744073709551615,"b":-9223372036854775808,"s":"-0 1e999999999999999999999","z":0,"f":-0.0}"#
        );
        // Doubles survive JSON -> msgpack -> JSON exactly.
        let f = Payload::json("2.7715077941825975e-163");
        let mp = payload_in(&f, Encoding::Msgpack).unwrap().into_owned();
        let mp = Payload::new(Encoding::Msgpack, mp);
        let back = payload_in(&mp, Encoding::Json).unwrap();
        assert_eq!(&*back, b"2.7715077941825975e-163");
    }

    #[test]
    fn message_ids_may_be_any_non_empty_string() {
        let m = decode_json(
            br#"{"id":"not-a-uuid","type":"list.commands.request"}"#,
            &lim(),
        )
        .unwrap();
        assert_eq!(m.id(), "not-a-uuid");
    }

    #[test]
    fn encode_checked_refuses_what_the_receiver_would_drop_and_nothing_else() {
        let limits = Limits {
            max_message_size: 1000,
            max_depth: 8,
        };
        // `{"a":{"a":...{}}}`, n objects deep (a request must be an object).
        let objects = |n: usize| r#"{"a":"#.repeat(n - 1) + "{}" + &"}".repeat(n - 1);
        let request = |p: Payload| Message::ExecuteRequest {
            id: "r".into(),
            command_id: "c".into(),
            request: Some(p),
        };
        let response = |p: Payload| Message::ExecuteResponse {
            id: "s".into(),
            thid: "r".into(),
            response: Ok(Some(p)),
        };
        let to_mp = |p: Payload| {
            let data = payload_in(&p, Encoding::Msgpack).unwrap().into_owned();
            Payload::new(Encoding::Msgpack, data)
        };
        let shapes: [(&dyn Fn(Payload) -> Message, usize); 2] = [(&request, 7), (&response, 6)];
        for enc in [Encoding::Json, Encoding::Msgpack] {
            // A request may nest max_depth - 1 levels, a result max_depth - 2.
            for (shape, room) in shapes {
                for n in [room, room + 1] {
                    let json = Payload::json(objects(n));
                    for p in [json.clone(), to_mp(json)] {
                        let m = shape(p);
                        let checked = encode_checked(&m, enc, &limits);
                        // The receiver's own verdict on the same message.
                        let received = decode(&encode(&m, enc).unwrap(), enc, &limits);
                        assert_eq!(checked.is_ok(), received.is_ok(), "{enc} {m:?}");
                        assert_eq!(checked.is_err(), n > room, "{enc} nesting {n}: {checked:?}");
                        if let Err(e) = checked {
                            assert_eq!(e.code(), "message_too_deep");
                        }
                    }
                }
            }
            // Size: of the whole message, not of its payload alone.
            let p = Payload::json(format!(r#"{{"s":"{}"}}"#, "x".repeat(980)));
            assert!(p.data.len() < limits.max_message_size);
            let e = encode_checked(&request(p), enc, &limits).unwrap_err();
            assert_eq!(e.code(), "message_too_large");
        }
    }
}
