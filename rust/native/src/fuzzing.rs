//! Fuzz target bodies of the native crate, shared by the cargo-fuzz targets
//! (`rust/native/fuzz`) and by the corpus replay test (`tests/fuzz_corpus.rs`), so every
//! input a fuzzer ever kept is also an ordinary `cargo test` case.
//!
//! [`ring_state`]: one side of a shm channel (the reader of one ring, the writer of the
//! other) against a peer that may write anything into the shared memory at any moment. The
//! rings live in an ordinary buffer here (the same layout as a segment), with guard bytes
//! around it. Each function panics when an invariant breaks.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use cmd_ipc_core::frame::FrameDecoder;

use crate::transport::fuzz_ring::{RingView, DATA_OFFSET};

/// Ring capacity in the fuzzed segment (the smallest a real segment has).
pub const RING_CAP: usize = 4096;
/// The largest frame the fuzzed reader accepts.
const MAX_FRAME: usize = 2 * RING_CAP;
/// Guard bytes before and after the segment (must be intact at the end).
const GUARD: usize = 4096;
const GUARD_BYTE: u8 = 0xA5;
/// Operations per input, at most (each is bounded: no input can make a run long).
const MAX_OPS: usize = 512;

/// Byte offsets of ring `r`'s shared header words, from the segment's start.
fn header(r: usize) -> (usize, usize, usize, usize) {
    let h = [64, 320][r];
    (h, h + 64, h + 128, h + 132)
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, rest) = self.0.split_at(n);
        self.0 = rest;
        a
    }
    fn u16(&mut self) -> u16 {
        let b = self.take(2);
        b.iter().rev().fold(0, |acc, x| (acc << 8) | u16::from(*x))
    }
    fn u64(&mut self) -> u64 {
        let b = self.take(8);
        b.iter().rev().fold(0, |acc, x| (acc << 8) | u64::from(*x))
    }
    /// A value for an index: mostly near `around` (the interesting edge: one past the
    /// capacity, just behind), sometimes anything.
    fn index_near(&mut self, around: u64) -> u64 {
        match self.byte().unwrap_or(0) % 4 {
            0 => self.u64(),
            1 => around.wrapping_add(u64::from(self.u16())),
            2 => around.wrapping_sub(u64::from(self.u16())),
            _ => around.wrapping_add(RING_CAP as u64 + u64::from(self.byte().unwrap_or(0))),
        }
    }
}

/// The segment buffer with its guards, 8-byte aligned. Every access goes through the one
/// raw pointer taken at creation (the ring views hold pointers into the same memory).
struct Mem {
    _words: Vec<u64>,
    ptr: *mut u8,
    len: usize,
}

impl Mem {
    fn new() -> Mem {
        let len = GUARD + DATA_OFFSET + 2 * RING_CAP + GUARD;
        let mut words = vec![0u64; len / 8];
        let ptr = words.as_mut_ptr() as *mut u8;
        let end = GUARD + DATA_OFFSET + 2 * RING_CAP;
        // SAFETY: both ranges are inside the buffer.
        unsafe {
            std::ptr::write_bytes(ptr, GUARD_BYTE, GUARD);
            std::ptr::write_bytes(ptr.add(end), GUARD_BYTE, len - end);
        }
        Mem {
            _words: words,
            ptr,
            len,
        }
    }
    fn base(&self) -> *mut u8 {
        // SAFETY: GUARD is inside the buffer and a multiple of 8.
        unsafe { self.ptr.add(GUARD) }
    }
    fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(offset % 8 == 0 && GUARD + offset + 8 <= self.len);
        // SAFETY: in bounds and aligned (checked above); the buffer outlives the reference.
        unsafe { AtomicU64::from_ptr(self.base().add(offset) as *mut u64) }
    }
    /// The peer's store of a header word.
    fn poke_u64(&self, offset: usize, v: u64) {
        self.word(offset).store(v, Ordering::SeqCst);
    }
    fn peek_u64(&self, offset: usize) -> u64 {
        self.word(offset).load(Ordering::SeqCst)
    }
    fn poke_u32(&self, offset: usize, v: u32) {
        assert!(offset % 4 == 0 && GUARD + offset + 4 <= self.len);
        // SAFETY: in bounds and aligned (checked above).
        unsafe { AtomicU32::from_ptr(self.base().add(offset) as *mut u32) }
            .store(v, Ordering::SeqCst);
    }
    /// The peer scribbles `bytes` over ring data at `at` (cut at the end of the data).
    fn scribble(&self, at: usize, bytes: &[u8]) {
        let at = at % (2 * RING_CAP);
        let n = bytes.len().min(2 * RING_CAP - at);
        // SAFETY: [DATA_OFFSET + at, + n) is inside the two rings' data.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base().add(DATA_OFFSET + at), n)
        };
    }
    fn guards_intact(&self) -> bool {
        let end = GUARD + DATA_OFFSET + 2 * RING_CAP;
        // SAFETY: the whole buffer, read once no ring view is left.
        let b = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        b[..GUARD].iter().all(|x| *x == GUARD_BYTE) && b[end..].iter().all(|x| *x == GUARD_BYTE)
    }
}

/// One side of a shm channel against a peer that writes arbitrary values into the segment:
/// every read either returns exactly the bytes a valid `head` announces or reports the ring
/// corrupt (never more than the capacity, never out of bounds, never a panic); every write
/// either fits in the space a valid `tail` leaves or reports the ring corrupt; the frame
/// decoder fed by the reads never panics and never yields a frame over its limit; the
/// buffer's guard bytes stay intact. The operations come from `data`.
pub fn ring_state(data: &[u8]) {
    let mut input = Input(data);
    let mem = Mem::new();
    // This side reads ring `rx` and writes ring `tx`.
    let rx = usize::from(input.byte().unwrap_or(0) & 1);
    let tx = 1 - rx;
    let (rx_head, rx_tail, rx_parked, rx_waiting) = header(rx);
    let (tx_head, tx_tail, tx_parked, _) = header(tx);
    // An arbitrary starting state: the peer may have written anything before we attach.
    for off in [rx_head, rx_tail, tx_head, tx_tail] {
        let v = input.u64();
        mem.poke_u64(off, v);
    }
    let base = mem.base();
    // SAFETY: `base` points at DATA_OFFSET + 2 * RING_CAP bytes of `mem`, 8-byte aligned,
    // which outlive both views (dropped before `mem`).
    let (reader, writer) = unsafe {
        (
            RingView::at(base, rx, RING_CAP, false),
            RingView::at(base, tx, RING_CAP, true),
        )
    };
    let mut decoder = FrameDecoder::new(MAX_FRAME);
    for _ in 0..MAX_OPS {
        let Some(op) = input.byte() else { break };
        match op % 10 {
            // The peer moves the head of the ring we read (anything, near our tail, past it).
            0 => {
                let v = input.index_near(reader.own());
                mem.poke_u64(rx_head, v);
            }
            // The peer overwrites our own published tail: we must not care.
            1 => {
                let v = input.u64();
                mem.poke_u64(rx_tail, v);
            }
            // The peer moves the tail of the ring we write.
            2 => {
                let v = input.index_near(writer.own());
                mem.poke_u64(tx_tail, v);
            }
            // The peer overwrites our own published head: we must not care.
            3 => {
                let v = input.u64();
                mem.poke_u64(tx_head, v);
            }
            // The peer scribbles over ring data (any ring) or the flag words.
            4 => {
                let at = usize::from(input.u16());
                let n = usize::from(input.byte().unwrap_or(0));
                mem.scribble(at, input.take(n));
            }
            5 => {
                let v = u32::from(input.byte().unwrap_or(0));
                let word = [rx_parked, rx_waiting, tx_parked][usize::from(v as u8) % 3];
                mem.poke_u32(word, v);
            }
            // We read.
            6 | 7 => {
                let tail = reader.own();
                let head = mem.peek_u64(rx_head);
                let announced = head.wrapping_sub(tail);
                let mut out = Vec::new();
                match reader.read(&mut out) {
                    Ok(n) => {
                        assert!(announced <= RING_CAP as u64, "read past an impossible head");
                        assert_eq!(n as u64, announced, "read what the head announces");
                        assert_eq!(out.len(), n);
                        assert_eq!(reader.own(), head, "our tail follows what we read");
                        if n > 0 {
                            assert_eq!(mem.peek_u64(rx_tail), head, "our tail is published");
                        }
                        decoder.push(&out);
                        loop {
                            match decoder.next_frame() {
                                Ok(Some(f)) => assert!(f.len() <= MAX_FRAME),
                                Ok(None) => break,
                                Err(_) => {
                                    // A broken stream closes a real channel; start afresh.
                                    decoder = FrameDecoder::new(MAX_FRAME);
                                    break;
                                }
                            }
                        }
                    }
                    Err(_) => {
                        assert!(announced > RING_CAP as u64, "a valid head reported corrupt");
                        assert_eq!(reader.own(), tail, "nothing consumed from a corrupt ring");
                    }
                }
                // Whether bytes wait is exactly whether the head moved from our tail.
                assert_eq!(reader.has_data(), mem.peek_u64(rx_head) != reader.own());
            }
            // We write (a plain write, or a frame's header and body at once).
            8 | 9 => {
                let head = writer.own();
                let tail = mem.peek_u64(tx_tail);
                let used = head.wrapping_sub(tail);
                let n = usize::from(input.u16()) % (2 * RING_CAP);
                let bytes = vec![op; n];
                if op % 10 == 8 {
                    match writer.write(&bytes) {
                        Ok(wrote) => {
                            assert!(used <= RING_CAP as u64, "wrote past an impossible tail");
                            assert_eq!(wrote as u64, (RING_CAP as u64 - used).min(n as u64));
                            assert_eq!(writer.own(), head.wrapping_add(wrote as u64));
                            if wrote > 0 {
                                assert_eq!(mem.peek_u64(tx_head), writer.own(), "published");
                            }
                        }
                        Err(_) => {
                            assert!(used > RING_CAP as u64, "a valid tail reported corrupt");
                            assert_eq!(writer.own(), head, "nothing written to a corrupt ring");
                        }
                    }
                } else {
                    let (a, b) = bytes.split_at(n.min(4));
                    let fits = used <= RING_CAP as u64 && RING_CAP as u64 - used >= n as u64;
                    assert_eq!(writer.write_both(a, b), fits);
                    let moved = if fits { n as u64 } else { 0 };
                    assert_eq!(writer.own(), head.wrapping_add(moved));
                }
            }
            _ => unreachable!(),
        }
    }
    // The views hold no resources: the guards can be read with them still in scope.
    let _ = (&reader, &writer);
    assert!(
        mem.guards_intact(),
        "a ring access went outside the segment"
    );
}
