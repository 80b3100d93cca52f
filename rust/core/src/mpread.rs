//! A bounds-checked reader over msgpack bytes, for the decoders written by hand (the fast
//! path of the codec, the binding's conversion to Python values). Every read returns `None`
//! past the end of the input or on a value of another type; nothing here panics.

use rmp::Marker;

/// A position in a msgpack input.
pub struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    /// The next byte.
    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    /// The next `N` bytes as an array (for big-endian numbers).
    pub fn be<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).map(|b| b.try_into().expect("length checked"))
    }

    /// A big-endian length of 1, 2 or 4 bytes.
    pub fn len(&mut self, bytes: usize) -> Option<usize> {
        Some(match bytes {
            1 => self.u8()? as usize,
            2 => u16::from_be_bytes(self.be()?) as usize,
            _ => u32::from_be_bytes(self.be()?) as usize,
        })
    }

    /// The next marker, without moving.
    pub fn peek_marker(&self) -> Option<Marker> {
        self.data.get(self.pos).map(|&b| Marker::from_u8(b))
    }

    /// The next marker.
    pub fn marker(&mut self) -> Option<Marker> {
        self.u8().map(Marker::from_u8)
    }

    /// The length (bytes of a str or bin, items of an array, entries of a map) that follows
    /// marker `m`, already read; `None` for a marker without one.
    pub fn length(&mut self, m: Marker) -> Option<usize> {
        use Marker::*;
        match m {
            FixStr(n) | FixArray(n) | FixMap(n) => Some(n as usize),
            Str8 | Bin8 => self.len(1),
            Str16 | Bin16 | Array16 | Map16 => self.len(2),
            Str32 | Bin32 | Array32 | Map32 => self.len(4),
            _ => None,
        }
    }

    /// The next `n` bytes as UTF-8.
    pub fn utf8(&mut self, n: usize) -> Option<&'a str> {
        std::str::from_utf8(self.take(n)?).ok()
    }

    /// A UTF-8 string value.
    pub fn str(&mut self) -> Option<&'a str> {
        let n = match self.marker()? {
            m @ (Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32) => {
                self.length(m)?
            }
            _ => return None,
        };
        self.utf8(n)
    }

    /// A bin value.
    pub fn bin(&mut self) -> Option<&'a [u8]> {
        let n = match self.marker()? {
            m @ (Marker::Bin8 | Marker::Bin16 | Marker::Bin32) => self.length(m)?,
            _ => return None,
        };
        self.take(n)
    }
}
