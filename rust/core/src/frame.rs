//! Length-prefixed frames over a byte stream (Unix sockets, shared-memory rings).
//!
//! A frame is a 4-byte little-endian length followed by that many bytes (one encoded
//! message). The decoder refuses a length above its maximum as soon as the 4 header bytes
//! are in, before buffering or allocating anything for the body; "not enough bytes yet" is
//! the normal `Ok(None)`.
//!
//! The first frame each side sends on a native channel is a [`Hello`], in JSON, so both ends
//! agree on the protocol version and the encoding before any message flows.

use crate::message::Encoding;

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// The protocol version spoken in [`Hello`] frames.
pub const PROTOCOL_VERSION: u32 = 1;

/// Why the byte stream cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the configured maximum.
    #[error("frame of {size} bytes announced, the limit is {limit} bytes")]
    TooLarge {
        /// Announced size.
        size: u64,
        /// Configured maximum.
        limit: usize,
    },
    /// The peer's hello is missing, malformed or incompatible.
    #[error("handshake failed: {0}")]
    Handshake(String),
}

impl FrameError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "frame_too_large",
            FrameError::Handshake(_) => "handshake_failed",
        }
    }
}

/// The 4-byte header of a frame of `len` bytes.
pub fn header(len: usize) -> [u8; HEADER_LEN] {
    (len as u32).to_le_bytes()
}

/// A whole frame: header then body.
pub fn encode_frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&header(body.len()));
    out.extend_from_slice(body);
    out
}

/// Incremental frame decoder: push bytes as they arrive, take whole frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max_frame: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames larger than `max_frame` bytes (at most 4 GiB - 1).
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            max_frame: max_frame.min(u32::MAX as usize),
        }
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.append_with(|buf| buf.extend_from_slice(data));
    }

    /// Lets `fill` append received bytes to the buffer itself (no intermediate copy); it
    /// must only append. Ranges from [`FrameDecoder::next_frame_range`] are invalid after.
    pub fn append_with<R>(&mut self, fill: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        fill(&mut self.buf)
    }

    /// The announced length of the next frame, once its header is in; checked against the
    /// limit.
    fn next_len(&self) -> Result<Option<usize>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                size: len as u64,
                limit: self.max_frame,
            });
        }
        Ok(Some(len))
    }

    /// How many more bytes the current frame needs (0 when a frame is ready or unknown).
    pub fn wanted(&self) -> Result<usize, FrameError> {
        Ok(match self.next_len()? {
            None => 0,
            Some(len) => (HEADER_LEN + len).saturating_sub(self.buffered()),
        })
    }

    /// The next complete frame's body, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        Ok(self.next_frame_range()?.map(|r| self.buf[r].to_vec()))
    }

    /// Like [`FrameDecoder::next_frame`], but the body stays in the buffer: read it with
    /// [`FrameDecoder::frame`] before the next append.
    pub fn next_frame_range(&mut self) -> Result<Option<std::ops::Range<usize>>, FrameError> {
        let Some(len) = self.next_len()? else {
            return Ok(None);
        };
        if self.buffered() < HEADER_LEN + len {
            return Ok(None);
        }
        let body_start = self.start + HEADER_LEN;
        self.start = body_start + len;
        Ok(Some(body_start..body_start + len))
    }

    /// The body of a frame returned by [`FrameDecoder::next_frame_range`].
    pub fn frame(&self, range: std::ops::Range<usize>) -> &[u8] {
        &self.buf[range]
    }
}

/// The first frame on a native channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    pub version: u32,
    /// Encoding of every following frame in this direction.
    pub encoding: Encoding,
}

impl Hello {
    /// Encodes the hello body (JSON, so any implementation can read it).
    pub fn encode(&self) -> Vec<u8> {
        format!(
            r#"{{"cmd-ipc":{},"encoding":"{}"}}"#,
            self.version,
            self.encoding.as_str()
        )
        .into_bytes()
    }

    /// Parses a peer's hello and checks it against ours.
    pub fn check(body: &[u8], ours: &Hello) -> Result<Hello, FrameError> {
        #[derive(serde::Deserialize)]
        struct Wire {
            #[serde(rename = "cmd-ipc")]
            version: u32,
            encoding: String,
        }
        let w: Wire = serde_json::from_slice(body)
            .map_err(|e| FrameError::Handshake(format!("not a hello frame ({e})")))?;
        let encoding = Encoding::parse(&w.encoding)
            .ok_or_else(|| FrameError::Handshake(format!("unknown encoding {:?}", w.encoding)))?;
        if w.version != ours.version {
            return Err(FrameError::Handshake(format!(
                "peer speaks protocol version {}, we speak {}",
                w.version, ours.version
            )));
        }
        if encoding != ours.encoding {
            return Err(FrameError::Handshake(format!(
                "peer sends {encoding}, this end was configured for {}",
                ours.encoding
            )));
        }
        Ok(Hello {
            version: w.version,
            encoding,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_at_every_position() {
        let mut stream = Vec::new();
        let bodies: Vec<Vec<u8>> = vec![b"a".to_vec(), vec![], vec![7u8; 300], b"xyz".to_vec()];
        for b in &bodies {
            stream.extend_from_slice(&encode_frame(b));
        }
        for split in 0..=stream.len() {
            let mut d = FrameDecoder::new(1024);
            let mut got = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                d.push(part);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, bodies, "split at {split}");
            assert_eq!(d.buffered(), 0);
        }
        // Byte by byte.
        let mut d = FrameDecoder::new(1024);
        let mut got = Vec::new();
        for b in &stream {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, bodies);
    }

    #[test]
    fn huge_length_refused_before_buffering() {
        let mut d = FrameDecoder::new(1 << 20);
        d.push(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(d.next_frame().unwrap_err().code(), "frame_too_large");
        let mut d = FrameDecoder::new(1 << 20);
        d.push(&[0x00, 0x00]);
        assert_eq!(d.next_frame().unwrap(), None);
    }

    #[test]
    fn hello_agreement() {
        let ours = Hello {
            version: PROTOCOL_VERSION,
            encoding: Encoding::Msgpack,
        };
        assert_eq!(Hello::check(&ours.encode(), &ours).unwrap(), ours);
        let json = Hello {
            version: PROTOCOL_VERSION,
            encoding: Encoding::Json,
        };
        assert!(Hello::check(&json.encode(), &ours).is_err());
        assert!(Hello::check(br#"{"cmd-ipc":2,"encoding":"msgpack"}"#, &ours).is_err());
        assert!(Hello::check(b"garbage", &ours).is_err());
    }
}
