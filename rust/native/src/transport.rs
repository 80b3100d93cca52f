//! Native channel endpoints: framed messages over a Unix stream socket ("pipe" transport),
//! or over two single-producer/single-consumer rings in a shared-memory segment with the
//! socket kept as doorbell and liveness signal ("shm" transport).
//!
//! Shared-memory segment (a `memfd`, so nothing is ever left in /dev/shm, even after a crash:
//! the kernel frees it with the last descriptor or mapping):
//!
//! ```text
//! 0      magic u64 | capacity u64
//! 64     ring 0 header: head u64 (own cache line) | tail u64 (own line) | reader_parked u32
//!        | writer_waiting u32
//! 320    ring 1 header
//! 4096   ring 0 data (capacity bytes, a power of two), then ring 1 data
//! ```
//!
//! Side 0 (the creator) writes ring 0 and reads ring 1; side 1 the reverse. The rings carry a
//! byte stream of length-prefixed frames ([`cmd_ipc_core::frame`]), so a frame larger than a ring
//! simply crosses it in pieces: the writer keeps what does not fit in a local outbox and the
//! reader, after consuming, rings the doorbell if the writer said it is waiting for space.
//! Neither side ever blocks on a full ring, so two peers sending large frames to each other
//! cannot deadlock.
//!
//! Parking: a reader that finds its ring empty sets `reader_parked`, re-checks the ring, and
//! sleeps: the event loop in `poll()`/epoll on its socket (`reader_parked` = 1), a blocking
//! caller on a futex on the `reader_parked` word itself (= 2), so that a reply meant for a
//! blocked caller never wakes the event loop thread. A writer that publishes bytes swaps the
//! word to 0 and, if it was set, writes one doorbell byte to the socket (1) or wakes the
//! futex (2). An idle channel costs no CPU, and a
//! busy one issues no system call at all. Peer death closes the peer's socket: the reader
//! sees end-of-file at once.
//!
//! A peer is never trusted with this process's memory safety or liveness:
//!
//! * The segment is sealed (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) before it is handed
//!   over, and a segment without the first two seals is refused on attach: a peer that could
//!   truncate it would kill this process with SIGBUS on its next access to a ring.
//! * Each side keeps its own index (`head` of the ring it writes, `tail` of the ring it reads)
//!   in process memory; the shared copy is only published for the peer. Every index read from
//!   the segment is checked against it before use: a peer's `head` more than `capacity` ahead
//!   of our `tail` (or behind it), or a `tail` more than `capacity` behind our `head` (or
//!   ahead of it), is impossible, and the endpoint reports [`ReadError::CorruptRing`] (the
//!   node closes the channel, `corrupt_ring`) instead of reading or writing out of bounds or
//!   spinning on a ring that can never be read. Frame lengths are checked by the frame
//!   decoder (`frame_too_large`). The capacity is read once, at attach.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use cmd_ipc_core::frame::{self, FrameDecoder, FrameError, Hello, HEADER_LEN, PROTOCOL_VERSION};
use cmd_ipc_core::message::Encoding;

/// The seals every segment carries: its size can never change (and no seal can be added).
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
/// The seals an attaching side requires: without them a peer could truncate the segment.
const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// A peer wrote an impossible value into a ring's shared header: the channel is unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRing(pub String);

impl std::fmt::Display for CorruptRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "corrupt shared-memory ring: {}", self.0)
    }
}

impl std::error::Error for CorruptRing {}

impl CorruptRing {
    fn io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self)
    }

    /// The corruption an I/O error of a shm endpoint reports, if that is what it is.
    pub fn of(e: &io::Error) -> Option<&CorruptRing> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<CorruptRing>())
    }
}

/// Why a read pass found the channel unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The byte stream is broken (oversized frame, bad hello).
    Frame(FrameError),
    /// The peer wrote an impossible index into the shared memory.
    CorruptRing(CorruptRing),
}

impl ReadError {
    /// Stable code (`frame_too_large`, `handshake_failed`, `corrupt_ring`).
    pub fn code(&self) -> &'static str {
        match self {
            ReadError::Frame(e) => e.code(),
            ReadError::CorruptRing(_) => "corrupt_ring",
        }
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Frame(e) => e.fmt(f),
            ReadError::CorruptRing(e) => e.fmt(f),
        }
    }
}

impl From<FrameError> for ReadError {
    fn from(e: FrameError) -> Self {
        ReadError::Frame(e)
    }
}

const MAGIC: u64 = 0x3130_4350_4944_4d43; // "CMDIPC01" little-endian
const DATA_OFFSET: usize = 4096;
const RING_HEADER_OFFSET: [usize; 2] = [64, 320];

/// Smallest and largest ring capacity accepted.
pub const MIN_RING: usize = 4096;
/// Largest ring capacity accepted (1 GiB).
pub const MAX_RING: usize = 1 << 30;

fn os_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Creates a shared-memory segment for a shm channel with two rings of `capacity` bytes
/// (rounded up to a power of two) and returns its descriptor (close-on-exec). The segment is
/// sealed against resizing before anyone else can see it (see the module documentation).
pub fn create_segment(capacity: usize) -> io::Result<OwnedFd> {
    let capacity = capacity.clamp(MIN_RING, MAX_RING).next_power_of_two();
    let size = DATA_OFFSET + 2 * capacity;
    // SAFETY: plain system calls on a fresh descriptor we own.
    unsafe {
        let fd = libc::memfd_create(
            c"cmd-ipc".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        );
        if fd < 0 {
            return Err(os_err("memfd_create"));
        }
        let fd = OwnedFd::from_raw_fd(fd);
        if libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) != 0 {
            return Err(os_err("ftruncate"));
        }
        // Allocate the pages now: a ring page touched for the first time costs a page
        // fault (and the zeroing of the page), several microseconds, in the middle of a
        // call. Where the file system cannot, the pages come on first touch as before.
        let _ = libc::fallocate(fd.as_raw_fd(), 0, 0, size as libc::off_t);
        // Sealed before the descriptor leaves this function: no process it is handed to can
        // shrink it (SIGBUS in every process mapping it) or grow it.
        if libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) != 0 {
            return Err(os_err("sealing the shm segment (F_ADD_SEALS)"));
        }
        let seg = Segment::map(fd.as_raw_fd(), size)?;
        // A fresh memfd is zero-filled: only the header needs writing.
        (seg.ptr as *mut u64).write(MAGIC);
        (seg.ptr as *mut u64).add(1).write(capacity as u64);
        drop(seg);
        Ok(fd)
    }
}

struct Segment {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics (headers) and under the
// single-producer/single-consumer discipline (data), which the endpoint's locks enforce
// within this process.
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

impl Segment {
    fn map(fd: RawFd, len: usize) -> io::Result<Segment> {
        // SAFETY: mapping a descriptor we were given, with its own size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                // Page tables filled now, for the same reason (each process maps it).
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os_err("mmap"));
        }
        Ok(Segment {
            ptr: ptr as *mut u8,
            len,
        })
    }

    /// Maps a segment made by [`create_segment`], checking its seals, header and size.
    fn open(fd: RawFd) -> io::Result<(Segment, usize)> {
        // Seals first: once present they can never be removed, so the size checked below
        // stays the size of the mapping for its whole life.
        // SAFETY: F_GET_SEALS on a descriptor the caller vouches for (EINVAL if not a memfd).
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        if seals < 0 || seals & REQUIRED_SEALS != REQUIRED_SEALS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "shm segment is not sealed against resizing (F_SEAL_SHRINK | F_SEAL_GROW): \
                 refused, a peer could truncate it under this process",
            ));
        }
        // SAFETY: fstat into a zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(os_err("fstat"));
        }
        let len = st.st_size as usize;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "not a cmd-ipc shm segment");
        if len < DATA_OFFSET + 2 * MIN_RING {
            return Err(bad());
        }
        let seg = Segment::map(fd, len)?;
        // SAFETY: the mapping is at least DATA_OFFSET bytes long.
        let (magic, cap) = unsafe {
            (
                (seg.ptr as *const u64).read(),
                (seg.ptr as *const u64).add(1).read() as usize,
            )
        };
        if magic != MAGIC || !cap.is_power_of_two() || DATA_OFFSET + 2 * cap != len {
            return Err(bad());
        }
        Ok((seg, cap))
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

/// One ring inside a mapped segment.
struct Ring {
    head: *const AtomicU64,
    tail: *const AtomicU64,
    reader_parked: *const AtomicU32,
    writer_waiting: *const AtomicU32,
    data: *mut u8,
    cap: u64,
    /// This side's own index, in process memory: `head` for the ring it writes, `tail` for
    /// the ring it reads. The shared copy is published for the peer and never read back
    /// (the peer could have changed it). Only the side's writer (under the endpoint's writer
    /// lock) or reader (under the reader role) stores it, so Relaxed suffices: those locks
    /// order it between threads of this process.
    own: AtomicU64,
}

// SAFETY: see Segment; the pointers stay valid while the owning Endpoint keeps the Segment.
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

impl Ring {
    /// The ring `index` of a mapped segment of rings of `cap` bytes.
    ///
    /// SAFETY: `base` points at a live mapping of at least `DATA_OFFSET + 2 * cap` bytes,
    /// 8-byte aligned, that outlives the ring.
    unsafe fn at(base: *mut u8, index: usize, cap: usize, producer: bool) -> Ring {
        let h = RING_HEADER_OFFSET[index];
        // SAFETY: offsets are inside the mapping and 8-byte aligned (see above).
        let ring = unsafe {
            Ring {
                head: base.add(h) as *const AtomicU64,
                tail: base.add(h + 64) as *const AtomicU64,
                reader_parked: base.add(h + 128) as *const AtomicU32,
                writer_waiting: base.add(h + 132) as *const AtomicU32,
                data: base.add(DATA_OFFSET + index * cap),
                cap: cap as u64,
                own: AtomicU64::new(0),
            }
        };
        // Our index starts where the shared copy stands at attach (0 on a fresh segment; a
        // peer that already moved it only misleads itself).
        let start = if producer { ring.head() } else { ring.tail() };
        ring.own
            .store(start.load(Ordering::Acquire), Ordering::Relaxed);
        ring
    }

    fn new(seg: &Segment, index: usize, cap: usize, producer: bool) -> Ring {
        // SAFETY: the segment was checked to hold two rings of `cap` bytes after the header
        // (Segment::open), and the Endpoint keeps it mapped as long as its rings.
        unsafe { Ring::at(seg.ptr, index, cap, producer) }
    }

    fn head(&self) -> &AtomicU64 {
        // SAFETY: valid for the segment's lifetime.
        unsafe { &*self.head }
    }
    fn tail(&self) -> &AtomicU64 {
        // SAFETY: as above.
        unsafe { &*self.tail }
    }
    fn reader_parked(&self) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*self.reader_parked }
    }
    fn writer_waiting(&self) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*self.writer_waiting }
    }

    /// Producer: (head, free bytes), or the corruption when the peer's `tail` is impossible
    /// (behind our head by more than the capacity, or ahead of it): then nothing is written.
    fn free(&self) -> Result<(u64, u64), CorruptRing> {
        let head = self.own.load(Ordering::Relaxed);
        // Acquire pairs with the consumer's Release store of `tail`: the space it freed is
        // no longer being read.
        let tail = self.tail().load(Ordering::Acquire);
        let used = head.wrapping_sub(tail);
        if used > self.cap {
            return Err(CorruptRing(format!(
                "the peer's tail {tail} is impossible for head {head} (capacity {})",
                self.cap
            )));
        }
        Ok((head, self.cap - used))
    }

    /// Producer: copies `bytes` at ring position `at`, wrapping around.
    ///
    /// SAFETY: the caller checked that `bytes.len()` bytes are free from `at` on; the
    /// consumer does not read them until `head` is published past them.
    unsafe fn copy_at(&self, at: u64, bytes: &[u8]) {
        let pos = (at % self.cap) as usize;
        let first = bytes.len().min(self.cap as usize - pos);
        // SAFETY: pos + first <= cap, and the rest (<= pos) goes to the start.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data.add(pos), first);
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr().add(first),
                self.data,
                bytes.len() - first,
            );
        }
    }

    /// Producer: publishes the bytes written up to `head`. SeqCst (a Release store plus a
    /// full fence) publishes them to the consumer's Acquire load of `head`, and orders this
    /// store before our load of `reader_parked` (Dekker pairing with the reader's park).
    fn publish(&self, head: u64) {
        self.own.store(head, Ordering::Relaxed);
        self.head().store(head, Ordering::SeqCst);
    }

    /// Producer: copies `a` then `b` if both fit whole, publishing them at once (one frame's
    /// header and body); returns whether it did (never on a corrupt ring: [`Ring::write`]
    /// reports it).
    fn write_both(&self, a: &[u8], b: &[u8]) -> bool {
        let Ok((head, free)) = self.free() else {
            return false;
        };
        if free < (a.len() + b.len()) as u64 {
            return false;
        }
        // SAFETY: both fit in the free space.
        unsafe {
            self.copy_at(head, a);
            self.copy_at(head.wrapping_add(a.len() as u64), b);
        }
        self.publish(head.wrapping_add((a.len() + b.len()) as u64));
        true
    }

    /// Producer: copies as much of `bytes` as fits; returns the count.
    fn write(&self, bytes: &[u8]) -> Result<usize, CorruptRing> {
        let (head, free) = self.free()?;
        let n = free.min(bytes.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: n bytes are free.
        unsafe { self.copy_at(head, &bytes[..n]) };
        self.publish(head.wrapping_add(n as u64));
        Ok(n)
    }

    /// Consumer: appends everything available to `out`; returns the count, or the
    /// corruption when the peer's `head` is impossible (more than the capacity ahead of our
    /// tail, or behind it): then nothing is read.
    fn read(&self, out: &mut Vec<u8>) -> Result<usize, CorruptRing> {
        let tail = self.own.load(Ordering::Relaxed);
        // Acquire pairs with the producer's publishing store of `head`.
        let head = self.head().load(Ordering::Acquire);
        let avail = head.wrapping_sub(tail);
        if avail == 0 {
            return Ok(0);
        }
        if avail > self.cap {
            return Err(CorruptRing(format!(
                "the peer's head {head} is impossible for tail {tail} (capacity {})",
                self.cap
            )));
        }
        let n = avail as usize;
        let pos = (tail % self.cap) as usize;
        let first = n.min(self.cap as usize - pos);
        out.reserve(n);
        // SAFETY: the producer published these n bytes (n <= cap, checked above) and will
        // not overwrite them until `tail` moves past them below.
        unsafe {
            out.extend_from_slice(std::slice::from_raw_parts(self.data.add(pos), first));
            out.extend_from_slice(std::slice::from_raw_parts(self.data, n - first));
        }
        let tail = tail.wrapping_add(n as u64);
        self.own.store(tail, Ordering::Relaxed);
        // Release pairs with the producer's Acquire load of `tail`: we are done with the
        // bytes. SeqCst also orders it before our load of `writer_waiting`.
        self.tail().store(tail, Ordering::SeqCst);
        Ok(n)
    }

    /// Consumer: whether the peer published bytes we have not read (or an impossible head,
    /// which the next [`Ring::read`] reports).
    fn has_data(&self) -> bool {
        self.head().load(Ordering::Acquire) != self.own.load(Ordering::Relaxed)
    }
}

/// The ring code over any memory, for the fuzz target ([`crate::fuzzing::ring_state`]):
/// not an API.
#[doc(hidden)]
pub mod fuzz_ring {
    use super::{CorruptRing, Ring};

    /// Offset of the first ring's data in a segment.
    pub const DATA_OFFSET: usize = super::DATA_OFFSET;

    /// One ring of a segment laid out at some address.
    pub struct RingView(Ring);

    impl RingView {
        /// Ring `index` (0 or 1) of rings of `cap` bytes (a power of two) at `base`, seen by
        /// its writer (`producer`) or its reader.
        ///
        /// # Safety
        ///
        /// `base` points at `DATA_OFFSET + 2 * cap` bytes, 8-byte aligned, that outlive the
        /// view.
        pub unsafe fn at(base: *mut u8, index: usize, cap: usize, producer: bool) -> RingView {
            // SAFETY: the caller's promise, as `Ring::at` needs it.
            RingView(unsafe { Ring::at(base, index, cap, producer) })
        }
        /// Reader: everything available, or the corruption.
        pub fn read(&self, out: &mut Vec<u8>) -> Result<usize, CorruptRing> {
            self.0.read(out)
        }
        /// Writer: as much of `bytes` as fits, or the corruption.
        pub fn write(&self, bytes: &[u8]) -> Result<usize, CorruptRing> {
            self.0.write(bytes)
        }
        /// Writer: `a` then `b` if both fit whole.
        pub fn write_both(&self, a: &[u8], b: &[u8]) -> bool {
            self.0.write_both(a, b)
        }
        /// Reader: whether the head moved from our tail.
        pub fn has_data(&self) -> bool {
            self.0.has_data()
        }
        /// This side's own index (head of a written ring, tail of a read one).
        pub fn own(&self) -> u64 {
            self.0.own.load(std::sync::atomic::Ordering::Relaxed)
        }
    }
}

struct Shm {
    _seg: Segment,
    tx: Ring,
    rx: Ring,
}

/// Which transport an endpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Frames over the socket.
    Stream,
    /// Frames over shared-memory rings; the socket is doorbell and liveness signal.
    Shm,
}

/// Bytes of frames the transport did not take yet (a full socket buffer or ring), kept for
/// [`Endpoint::flush`]; at most `max_outbox` of them (see [`Endpoint::send_frame`]).
struct Outbox {
    pending: Vec<u8>,
    sent: usize,
    /// The most bytes ever waiting here at once.
    peak: usize,
    /// Since when (monotonic microseconds) sends are refused for want of room: set by the
    /// first refusal, cleared once the outbox has drained to half of its bound (the peer is
    /// reading again).
    over_since: Option<u64>,
}

impl Outbox {
    fn unsent(&self) -> usize {
        self.pending.len() - self.sent
    }
}

/// What [`Endpoint::send_frame`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// The transport took all of it.
    Done,
    /// Part of it (or of earlier frames) waits in the outbox: flush when writable.
    Pending,
    /// Refused: the outbox holds `max_outbox` bytes already (its peer is not reading).
    /// `since` is when the outbox first refused a frame in this episode; `first` is true
    /// for that first refusal.
    Full {
        /// Monotonic microseconds of the episode's first refusal.
        since: u64,
        /// Whether this refusal began the episode.
        first: bool,
    },
}

/// The reading state of an endpoint; hold it (via [`Endpoint::try_reader`]) to read.
pub struct Reader {
    decoder: FrameDecoder,
    /// Receives a shm channel's doorbell bytes (the stream transport receives into the
    /// decoder itself).
    sockbuf: [u8; 64],
    hello_seen: bool,
    eof: bool,
}

impl Reader {
    /// The body of a frame of the last [`ReadPass`].
    pub fn frame(&self, range: std::ops::Range<usize>) -> &[u8] {
        self.decoder.frame(range)
    }
}

/// What one read pass found.
#[derive(Debug, Default)]
pub struct ReadPass {
    /// Whole frames (hello already checked and removed), as ranges of the reader's buffer:
    /// read them with [`Reader::frame`] before the next read.
    pub frames: Vec<std::ops::Range<usize>>,
    /// Bytes were received (frames may still be incomplete).
    pub progressed: bool,
    /// The peer is gone (after the last frame it sent).
    pub eof: bool,
    /// The channel is unusable (oversized frame, bad hello, corrupt ring): it must close.
    pub fatal: Option<ReadError>,
}

/// One end of a native channel.
pub struct Endpoint {
    sock: OwnedFd,
    shm: Option<Shm>,
    kind: Kind,
    encoding: Encoding,
    writer: Mutex<Outbox>,
    /// The most bytes the outbox may hold (see [`Endpoint::send_frame`]).
    max_outbox: usize,
    reader: Mutex<Reader>,
    closed: AtomicBool,
    /// Set when the writer found the peer's index impossible; the next read pass reports it
    /// (the reader may be another thread).
    broken: std::sync::OnceLock<CorruptRing>,
}

fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller vouches for.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if n < 0 {
        return Err(os_err("dup"));
    }
    // SAFETY: n is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

impl Endpoint {
    /// Opens an endpoint over a connected Unix stream socket (duplicated: the caller keeps
    /// its descriptor) and, for the shm transport, a segment from [`create_segment`]
    /// (`side` 0 for the creator's end, 1 for the other). Sends our hello at once.
    pub fn open(
        sock_fd: RawFd,
        shm: Option<(RawFd, u8)>,
        encoding: Encoding,
        max_frame: usize,
    ) -> io::Result<Endpoint> {
        let sock = dup(sock_fd)?;
        // SAFETY: setting O_NONBLOCK on our own descriptor.
        unsafe {
            let flags = libc::fcntl(sock.as_raw_fd(), libc::F_GETFL);
            if flags < 0
                || libc::fcntl(sock.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
            {
                return Err(os_err("fcntl"));
            }
        }
        let (shm, kind) = match shm {
            None => (None, Kind::Stream),
            Some((mem_fd, side)) => {
                if side > 1 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "shm side must be 0 or 1",
                    ));
                }
                let (seg, cap) = Segment::open(mem_fd)?;
                let (txi, rxi) = if side == 0 { (0, 1) } else { (1, 0) };
                let tx = Ring::new(&seg, txi, cap, true);
                let rx = Ring::new(&seg, rxi, cap, false);
                (Some(Shm { _seg: seg, tx, rx }), Kind::Shm)
            }
        };
        let ep = Endpoint {
            sock,
            shm,
            kind,
            encoding,
            writer: Mutex::new(Outbox {
                pending: Vec::new(),
                sent: 0,
                peak: 0,
                over_since: None,
            }),
            max_outbox: usize::MAX,
            reader: Mutex::new(Reader {
                decoder: FrameDecoder::new(max_frame),
                sockbuf: [0u8; 64],
                hello_seen: false,
                eof: false,
            }),
            closed: AtomicBool::new(false),
            broken: std::sync::OnceLock::new(),
        };
        let hello = Hello {
            version: PROTOCOL_VERSION,
            encoding,
        };
        ep.send_frame(&hello.encode())?;
        Ok(ep)
    }

    /// Bounds the outbox at `bytes` (unbounded when opened; see [`Endpoint::send_frame`]).
    pub fn with_max_outbox(mut self, bytes: usize) -> Endpoint {
        self.max_outbox = bytes.max(1);
        self
    }

    /// The outbox's bound in bytes.
    pub fn max_outbox(&self) -> usize {
        self.max_outbox
    }

    /// Bytes waiting in the outbox now, and the most that ever waited there.
    pub fn outbox_bytes(&self) -> (usize, usize) {
        let out = self.lock_writer();
        (out.unsent(), out.peak)
    }

    /// Since when sends are refused for want of room, if they are (see [`Sent::Full`]).
    pub fn over_since(&self) -> Option<u64> {
        self.lock_writer().over_since
    }

    /// The socket's descriptor: readable when there is something to read (doorbell or data)
    /// or the peer is gone.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// The transport.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The frame encoding agreed in the hello.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Whether [`Endpoint::close`] ran or the peer was found gone.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the reading role if nobody holds it.
    pub fn try_reader(&self) -> Option<std::sync::MutexGuard<'_, Reader>> {
        match self.reader.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn doorbell(&self) {
        let b = [1u8];
        // SAFETY: a non-blocking send of one byte; a full socket buffer already holds
        // doorbells, so EAGAIN is fine to ignore.
        unsafe {
            libc::send(
                self.sock.as_raw_fd(),
                b.as_ptr() as *const libc::c_void,
                1,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
        }
    }

    /// Writes raw bytes to the transport without blocking; returns how many were taken.
    fn write_bytes(&self, bytes: &[u8]) -> io::Result<usize> {
        match &self.shm {
            Some(shm) => shm.tx.write(bytes).map_err(|c| {
                let _ = self.broken.set(c.clone());
                c.io()
            }),
            None => {
                // SAFETY: non-blocking send from a valid buffer.
                let n = unsafe {
                    libc::send(
                        self.sock.as_raw_fd(),
                        bytes.as_ptr() as *const libc::c_void,
                        bytes.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                taken(n)
            }
        }
    }

    /// Stream transport: sends `a` then `b` in one non-blocking system call; returns how
    /// many bytes were taken.
    fn send_both(&self, a: &[u8], b: &[u8]) -> io::Result<usize> {
        let iov = [
            libc::iovec {
                iov_base: a.as_ptr() as *mut libc::c_void,
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            },
        ];
        // SAFETY: a zeroed msghdr is valid; it points at two live buffers the kernel only
        // reads.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = iov.len() as _;
            libc::sendmsg(
                self.sock.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        taken(n)
    }

    fn wake_reader(&self) {
        if let Some(shm) = &self.shm {
            // Pairs with the reader's SeqCst store of `reader_parked` then load of `head`:
            // either it sees our bytes, or we see it parked and wake it.
            let word = shm.tx.reader_parked();
            if word.load(Ordering::SeqCst) != PARK_NONE {
                match word.swap(PARK_NONE, Ordering::SeqCst) {
                    PARK_SOCKET => self.doorbell(),
                    PARK_FUTEX => futex_wake(word),
                    _ => {}
                }
            }
        }
    }

    /// Wakes a blocking caller of this process parked on our own ring's futex (used when
    /// another thread completed its call).
    pub fn wake_local_waiter(&self) {
        if let Some(shm) = &self.shm {
            futex_wake(shm.rx.reader_parked());
        }
    }

    /// A blocking caller takes over reading: disarms the event loop's doorbell (set by
    /// [`Endpoint::prepare_park`]) so that the reply it waits for wakes nobody else; it
    /// reads everything itself and re-arms the doorbell when done.
    pub fn claim(&self) {
        if let Some(shm) = &self.shm {
            let _ = shm.rx.reader_parked().compare_exchange(
                PARK_SOCKET,
                PARK_NONE,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
    }

    /// A blocking caller's park: announces itself on the futex word and sleeps until a
    /// writer publishes bytes, another thread wakes it, or `timeout_ms` passes. Returns at
    /// once if bytes arrived meanwhile. For the stream transport, waits on the socket and on
    /// `extra` instead.
    pub fn park_blocking(&self, extra: RawFd, timeout_ms: i32) {
        match &self.shm {
            Some(shm) => {
                let word = shm.rx.reader_parked();
                word.store(PARK_FUTEX, Ordering::SeqCst);
                if !shm.rx.has_data() {
                    futex_wait(word, PARK_FUTEX, timeout_ms);
                }
                // Leave no stale futex mark behind: the next writer would wake nobody.
                let _ = word.compare_exchange(
                    PARK_FUTEX,
                    PARK_NONE,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            }
            None => {
                let _ = wait_readable(&[self.fd(), extra], timeout_ms);
            }
        }
    }

    /// Queues one frame (header added here) and writes as much as the transport takes now;
    /// says whether bytes still wait in the outbox (see [`Endpoint::flush`]).
    ///
    /// The outbox is bounded: a frame that would take it past `max_outbox` bytes is refused
    /// whole ([`Sent::Full`]), so a peer that stopped reading costs this process at most that
    /// much (plus the ring of a shm channel); from that first refusal until the outbox has
    /// drained to half of the bound, every frame is refused. A frame is always taken when the
    /// outbox is empty, so a message larger than the bound still goes. Nothing of this is on
    /// the path of a frame the ring or socket takes at once.
    pub fn send_frame(&self, body: &[u8]) -> io::Result<Sent> {
        if self.is_closed() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "channel is closed",
            ));
        }
        let mut out = self.lock_writer();
        let hdr = frame::header(body.len());
        if out.pending.len() == out.sent {
            out.pending.clear();
            out.sent = 0;
            if self
                .shm
                .as_ref()
                .is_some_and(|shm| shm.tx.write_both(&hdr, body))
            {
                drop(out);
                self.wake_reader();
                return Ok(Sent::Done);
            }
            let n = match &self.shm {
                // Header and body together where they fit (one `head` update, or one system
                // call), else what the transport takes of them.
                Some(_) => {
                    let n = self.write_bytes(&hdr)?;
                    if n == HEADER_LEN {
                        n + self.write_bytes(body)?
                    } else {
                        n
                    }
                }
                None => self.send_both(&hdr, body)?,
            };
            if n < HEADER_LEN {
                out.pending.extend_from_slice(&hdr[n..]);
                out.pending.extend_from_slice(body);
            } else if n - HEADER_LEN < body.len() {
                out.pending.extend_from_slice(&body[n - HEADER_LEN..]);
            }
        } else {
            // Over the bound: a frame that does not fit, or any frame while the outbox has
            // not drained to half of it since it first refused one (a small call has no
            // business going to a peer that does not read its events either).
            let over = |out: &Outbox| {
                out.unsent() > 0
                    && (out.unsent().saturating_add(HEADER_LEN + body.len()) > self.max_outbox
                        || (out.over_since.is_some() && out.unsent() > self.max_outbox / 2))
            };
            if over(&out) {
                // Try to make room first: the peer may have read since the last flush.
                self.flush_locked(&mut out)?;
                if over(&out) {
                    let first = out.over_since.is_none();
                    let since = *out.over_since.get_or_insert_with(monotonic_micros);
                    drop(out);
                    return Ok(Sent::Full { since, first });
                }
                out.over_since = None;
            }
            out.pending.extend_from_slice(&hdr);
            out.pending.extend_from_slice(body);
        }
        let more = self.flush_locked(&mut out)?;
        let unsent = out.unsent();
        out.peak = out.peak.max(unsent);
        if out.over_since.is_some() && unsent <= self.max_outbox / 2 {
            out.over_since = None;
        }
        drop(out);
        self.wake_reader();
        Ok(if more { Sent::Pending } else { Sent::Done })
    }

    fn flush_locked(&self, out: &mut Outbox) -> io::Result<bool> {
        loop {
            if out.sent < out.pending.len() {
                let n = self.write_bytes(&out.pending[out.sent..])?;
                out.sent += n;
                if n > 0 {
                    continue;
                }
            }
            if out.sent == out.pending.len() {
                out.pending.clear();
                out.sent = 0;
                return Ok(false);
            }
            let Some(shm) = &self.shm else {
                return Ok(true); // the driver waits for the socket to become writable
            };
            // Tell the reader we wait for space, then look again (it may have just read).
            shm.tx.writer_waiting().store(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let n = self.write_bytes(&out.pending[out.sent..])?;
            out.sent += n;
            if n == 0 {
                return Ok(true);
            }
        }
    }

    /// Writes what the outbox still holds; returns whether some remains (for the stream
    /// transport the driver should then wait for the socket to be writable).
    pub fn flush(&self) -> io::Result<bool> {
        let mut out = self.lock_writer();
        let before = out.sent;
        if before == out.pending.len() {
            return Ok(false); // nothing pending: no doorbell (an idle channel stays silent)
        }
        let more = self.flush_locked(&mut out)?;
        if out.over_since.is_some() && out.unsent() <= self.max_outbox / 2 {
            out.over_since = None; // the peer reads again
        }
        let wrote = out.sent != before || !more;
        drop(out);
        if wrote {
            self.wake_reader();
        }
        Ok(more)
    }

    /// Whether unsent bytes wait in the outbox.
    pub fn has_pending_output(&self) -> bool {
        let out = self.lock_writer();
        out.sent < out.pending.len()
    }

    /// Whether frames (or doorbells) may be waiting, without a system call for shm.
    pub fn has_data(&self) -> bool {
        match &self.shm {
            Some(shm) => shm.rx.has_data(),
            None => false,
        }
    }

    /// Reads everything available now (the caller holds the reader role).
    pub fn read(&self, r: &mut Reader) -> ReadPass {
        self.read_inner(r, true)
    }

    /// Like [`Endpoint::read`], but for shm looks only at the ring, never at the socket:
    /// for a reader spinning on a ring between frames. Doorbells only come to a parked
    /// reader, and a hang-up is seen by the next full read (the parked reader's wait on
    /// [`Endpoint::fd`] ends on it), so neither is missed; the system call is saved.
    pub fn read_ring(&self, r: &mut Reader) -> ReadPass {
        self.read_inner(r, self.shm.is_none())
    }

    fn read_inner(&self, r: &mut Reader, socket: bool) -> ReadPass {
        let mut pass = ReadPass::default();
        if r.eof {
            pass.eof = true;
            return pass;
        }
        // Socket: doorbells (shm) or data (stream); 0 bytes means the peer closed. With shm
        // and bytes already in the ring, skip the system call: doorbells are only sent to a
        // parked reader, and a peer's death is seen on the next pass that finds the ring
        // empty (a parked reader is woken by the hang-up).
        let skip_socket = !socket || self.shm.as_ref().is_some_and(|shm| shm.rx.has_data());
        loop {
            if skip_socket {
                break;
            }
            let sock = self.sock.as_raw_fd();
            let n = if self.shm.is_some() {
                // Doorbells: read and dropped.
                // SAFETY: non-blocking recv into the reader's own buffer.
                unsafe {
                    libc::recv(
                        sock,
                        r.sockbuf.as_mut_ptr() as *mut libc::c_void,
                        r.sockbuf.len(),
                        libc::MSG_DONTWAIT,
                    )
                }
            } else {
                // Data: received straight into the decoder's buffer.
                r.decoder.append_with(|buf| {
                    buf.reserve(STREAM_READ);
                    let spare = buf.spare_capacity_mut();
                    // SAFETY: non-blocking recv into the Vec's spare capacity; the bytes it
                    // wrote are initialised, and only those are added to the length.
                    unsafe {
                        let n = libc::recv(
                            sock,
                            spare.as_mut_ptr() as *mut libc::c_void,
                            spare.len(),
                            libc::MSG_DONTWAIT,
                        );
                        if n > 0 {
                            buf.set_len(buf.len() + n as usize);
                        }
                        n
                    }
                })
            };
            if n > 0 {
                if self.shm.is_none() {
                    pass.progressed = true;
                    if r.decoder.buffered() > (1 << 20) {
                        break; // let frames out before reading more
                    }
                }
                continue;
            }
            if n == 0 {
                r.eof = true;
            } else {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if e.kind() != io::ErrorKind::WouldBlock {
                    r.eof = true;
                }
            }
            break;
        }
        if let Some(shm) = &self.shm {
            // Stored only when set: the writer reads this word on every send, and a store
            // would take its cache line away each time.
            if shm.rx.reader_parked().load(Ordering::Relaxed) != PARK_NONE {
                shm.rx.reader_parked().store(PARK_NONE, Ordering::Relaxed);
            }
            if let Some(c) = self.broken.get() {
                pass.fatal = Some(ReadError::CorruptRing(c.clone()));
                return pass;
            }
            match r.decoder.append_with(|buf| shm.rx.read(buf)) {
                Ok(0) => {}
                Ok(_) => {
                    pass.progressed = true;
                    // Pairs with the writer's store of `writer_waiting` then retry.
                    if shm.rx.writer_waiting().load(Ordering::SeqCst) == 1
                        && shm.rx.writer_waiting().swap(0, Ordering::SeqCst) == 1
                    {
                        self.doorbell();
                    }
                }
                Err(c) => {
                    // Nothing more can be read from this ring, ever: frames already whole
                    // are not delivered either (the peer is broken).
                    pass.fatal = Some(ReadError::CorruptRing(c));
                    return pass;
                }
            }
        }
        loop {
            match r.decoder.next_frame_range() {
                Ok(Some(f)) => {
                    if !r.hello_seen {
                        let ours = Hello {
                            version: PROTOCOL_VERSION,
                            encoding: self.encoding,
                        };
                        if let Err(e) = Hello::check(r.decoder.frame(f), &ours) {
                            pass.fatal = Some(e.into());
                            break;
                        }
                        r.hello_seen = true;
                        continue;
                    }
                    pass.frames.push(f);
                }
                Ok(None) => break,
                Err(e) => {
                    pass.fatal = Some(e.into());
                    break;
                }
            }
        }
        if r.eof && !pass.frames.is_empty() {
            // Deliver the last frames first; EOF is reported on the next pass.
            return pass;
        }
        pass.eof = r.eof;
        pass
    }

    /// Before sleeping on [`Endpoint::fd`]: announces the reader is parked; returns false if
    /// data arrived meanwhile (then do not sleep).
    pub fn prepare_park(&self) -> bool {
        match &self.shm {
            Some(shm) => {
                // Dekker pairing with the writer's SeqCst `head` store then `reader_parked`
                // load: one of us sees the other.
                shm.rx.reader_parked().store(PARK_SOCKET, Ordering::SeqCst);
                if shm.rx.has_data() {
                    shm.rx.reader_parked().store(PARK_NONE, Ordering::SeqCst);
                    return false;
                }
                true
            }
            None => true,
        }
    }

    /// Shuts the socket down (the peer sees end-of-file) and refuses further sends.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            // SAFETY: shutdown of our own socket; the descriptor stays valid until drop.
            unsafe {
                libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
    }
}

/// A non-blocking send's outcome: bytes taken (0 when the socket buffer is full), or the
/// error.
fn taken(n: isize) -> io::Result<usize> {
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(0)
    } else {
        Err(e)
    }
}

/// Room made in the decoder's buffer for one receive on the stream transport.
const STREAM_READ: usize = 16384;

const PARK_NONE: u32 = 0;
const PARK_SOCKET: u32 = 1;
const PARK_FUTEX: u32 = 2;

/// FUTEX_WAIT on a word of the shared mapping (not PRIVATE: the waker is another process).
fn futex_wait(word: &AtomicU32, expected: u32, timeout_ms: i32) {
    let ts = libc::timespec {
        tv_sec: (timeout_ms / 1000) as libc::time_t,
        tv_nsec: ((timeout_ms % 1000) as libc::c_long) * 1_000_000,
    };
    // SAFETY: the word lives in a mapping that outlives this call; the kernel only reads it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// FUTEX_WAKE of every waiter on a shared word.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: as above.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// Waits until one of `fds` is readable (or hung up) or `timeout_ms` passes (-1: forever).
pub fn wait_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: poll over a valid array.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(n > 0)
}

/// A connected pair of Unix stream sockets (close-on-exec), for tests and for spawning.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair into a local array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(os_err("socketpair"));
    }
    // SAFETY: two fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A non-blocking eventfd, used to wake a thread parked in [`wait_readable`].
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: creating a descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(os_err("eventfd"));
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Increments an eventfd (wakes its waiter).
pub fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: an 8-byte write to an eventfd; failure (overflow) still leaves it readable.
    unsafe {
        libc::write(fd, &one as *const u64 as *const libc::c_void, 8);
    }
}

/// Resets an eventfd.
pub fn eventfd_drain(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: an 8-byte read from a non-blocking eventfd.
    unsafe {
        libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8);
    }
}

/// Microseconds on CLOCK_MONOTONIC (the clock of Python's `time.monotonic()` and asyncio).
pub fn monotonic_micros() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a local struct.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(kind: Kind, ring: usize) -> (Endpoint, Endpoint) {
        let (a, b) = socketpair().unwrap();
        match kind {
            Kind::Stream => (
                Endpoint::open(a.as_raw_fd(), None, Encoding::Msgpack, 1 << 26).unwrap(),
                Endpoint::open(b.as_raw_fd(), None, Encoding::Msgpack, 1 << 26).unwrap(),
            ),
            Kind::Shm => {
                let seg = create_segment(ring).unwrap();
                (
                    Endpoint::open(
                        a.as_raw_fd(),
                        Some((seg.as_raw_fd(), 0)),
                        Encoding::Msgpack,
                        1 << 26,
                    )
                    .unwrap(),
                    Endpoint::open(
                        b.as_raw_fd(),
                        Some((seg.as_raw_fd(), 1)),
                        Encoding::Msgpack,
                        1 << 26,
                    )
                    .unwrap(),
                )
            }
        }
    }

    /// Pumps both ends until `want` frames arrived at `to`.
    fn pump(from: &Endpoint, to: &Endpoint, want: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        for _ in 0..100_000 {
            from.flush().unwrap();
            let mut r = to.try_reader().unwrap();
            let pass = to.read(&mut r);
            assert!(pass.fatal.is_none(), "{:?}", pass.fatal);
            got.extend(pass.frames.into_iter().map(|f| r.frame(f).to_vec()));
            if got.len() >= want {
                return got;
            }
        }
        panic!("only {} of {want} frames arrived", got.len());
    }

    #[test]
    fn the_outbox_is_bounded_until_the_peer_reads_again() {
        const MAX: usize = 64 * 1024;
        for kind in [Kind::Stream, Kind::Shm] {
            let (a, b) = pair(kind, 4096);
            let a = a.with_max_outbox(MAX);
            let body = vec![7u8; 1000];
            let (mut taken, mut since) = (0usize, None);
            for _ in 0..2_000 {
                match a.send_frame(&body).unwrap() {
                    Sent::Full { since: s, first } => {
                        // One episode: its first refusal says so, every later frame is
                        // refused too (the outbox did not drain).
                        assert_eq!(first, since.is_none(), "{kind:?}");
                        assert_eq!(*since.get_or_insert(s), s);
                    }
                    _ => {
                        assert!(since.is_none(), "{kind:?}: a frame taken after a refusal");
                        taken += 1;
                    }
                }
            }
            assert!(
                since.is_some(),
                "{kind:?}: 2 MB went to a peer that reads nothing"
            );
            let (unsent, peak) = a.outbox_bytes();
            assert!(unsent <= MAX && peak <= MAX, "{kind:?}: {unsent} / {peak}");
            assert!(
                unsent > MAX - 1004,
                "{kind:?}: refused with room left ({unsent})"
            );
            assert_eq!(a.over_since(), since);
            // The peer reads everything taken: the episode ends, frames go again.
            pump(&a, &b, taken);
            assert_eq!((a.outbox_bytes().0, a.over_since()), (0, None), "{kind:?}");
            assert!(matches!(
                a.send_frame(&body).unwrap(),
                Sent::Done | Sent::Pending
            ));
        }
    }

    #[test]
    fn frames_cross_both_transports_in_order() {
        for kind in [Kind::Stream, Kind::Shm] {
            let (a, b) = pair(kind, 4096);
            let bodies: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; i as usize * 7]).collect();
            for body in &bodies {
                a.send_frame(body).unwrap();
            }
            assert_eq!(pump(&a, &b, bodies.len()), bodies, "{kind:?}");
        }
    }

    #[test]
    fn frame_larger_than_the_ring_crosses_in_pieces() {
        let (a, b) = pair(Kind::Shm, 4096);
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        a.send_frame(&big).unwrap();
        assert!(a.has_pending_output());
        // Both sides send large frames at once: no deadlock, as nobody blocks.
        b.send_frame(&big).unwrap();
        assert_eq!(pump(&a, &b, 1)[0], big);
        assert_eq!(pump(&b, &a, 1)[0], big);
    }

    #[test]
    fn parked_reader_gets_a_doorbell_and_peer_death_is_eof() {
        let (a, b) = pair(Kind::Shm, 4096);
        {
            let mut r = b.try_reader().unwrap();
            let _ = b.read(&mut r); // consumes the hello
        }
        assert!(b.prepare_park());
        a.send_frame(b"x").unwrap();
        assert!(wait_readable(&[b.fd()], 1000).unwrap(), "no doorbell");
        let mut r = b.try_reader().unwrap();
        let pass = b.read(&mut r);
        assert_eq!(pass.frames.len(), 1);
        assert_eq!(r.frame(pass.frames[0].clone()), b"x");
        drop(r);
        a.close();
        drop(a);
        assert!(wait_readable(&[b.fd()], 1000).unwrap());
        let mut r = b.try_reader().unwrap();
        assert!(b.read(&mut r).eof);
    }

    #[test]
    fn ring_only_reads_leave_the_socket_to_the_next_full_read() {
        let (a, b) = pair(Kind::Shm, 4096);
        let mut r = b.try_reader().unwrap();
        let _ = b.read(&mut r); // consumes the hello
        a.send_frame(b"x").unwrap();
        let pass = b.read_ring(&mut r);
        assert_eq!(pass.frames.len(), 1);
        assert_eq!(r.frame(pass.frames[0].clone()), b"x");
        // A hang-up is not seen by ring-only reads (no system call)...
        a.close();
        drop(a);
        let pass = b.read_ring(&mut r);
        assert!(!pass.eof && pass.frames.is_empty());
        // ...but it stays on the socket, readable, for the next full read.
        assert!(wait_readable(&[b.fd()], 1000).unwrap());
        assert!(b.read(&mut r).eof);
    }

    #[test]
    fn garbage_and_bad_hello_are_fatal() {
        let (a, b) = socketpair().unwrap();
        let ep = Endpoint::open(b.as_raw_fd(), None, Encoding::Msgpack, 1024).unwrap();
        let junk = [0xffu8; 8];
        // SAFETY: test write on our socket.
        unsafe { libc::send(a.as_raw_fd(), junk.as_ptr() as *const _, 8, 0) };
        let mut r = ep.try_reader().unwrap();
        assert_eq!(ep.read(&mut r).fatal.unwrap().code(), "frame_too_large");
        let (a, b) = socketpair().unwrap();
        let ep = Endpoint::open(b.as_raw_fd(), None, Encoding::Msgpack, 1024).unwrap();
        let f = frame::encode_frame(b"{\"cmd-ipc\":1,\"encoding\":\"json\"}");
        // SAFETY: test write on our socket.
        unsafe { libc::send(a.as_raw_fd(), f.as_ptr() as *const _, f.len(), 0) };
        let mut r = ep.try_reader().unwrap();
        assert_eq!(ep.read(&mut r).fatal.unwrap().code(), "handshake_failed");
    }

    fn shm(ep: &Endpoint) -> &Shm {
        ep.shm.as_ref().unwrap()
    }

    /// `b` after it read `a`'s hello: the state of a channel in use.
    fn shm_pair_in_use() -> (Endpoint, Endpoint) {
        let (a, b) = pair(Kind::Shm, 4096);
        assert!(pump(&a, &b, 0).is_empty());
        let mut r = b.try_reader().unwrap();
        let _ = b.read(&mut r);
        drop(r);
        a.send_frame(b"one").unwrap();
        assert_eq!(pump(&a, &b, 1), vec![b"one".to_vec()]);
        (a, b)
    }

    #[test]
    fn an_impossible_head_is_a_corrupt_ring_not_a_spin() {
        let cap = 4096u64;
        type Head = fn(u64, u64) -> u64; // (our tail, capacity) -> the peer's head
        let cases: [(&str, Head); 3] = [
            ("beyond capacity", |tail, cap| tail + cap + 1),
            ("far beyond", |_, _| u64::MAX / 3),
            ("moved backwards", |tail, _| tail - 1),
        ];
        for (what, head) in cases {
            let (a, b) = shm_pair_in_use();
            // The peer (a) writes an impossible head into the ring b reads.
            let tail = shm(&b).rx.own.load(Ordering::Relaxed);
            shm(&a).tx.head().store(head(tail, cap), Ordering::SeqCst);
            // Before: bytes looked available forever while none could be read.
            assert!(b.has_data(), "{what}");
            let mut r = b.try_reader().unwrap();
            let pass = b.read(&mut r);
            let fatal = pass.fatal.expect(what);
            assert_eq!(fatal.code(), "corrupt_ring", "{what}");
            assert!(fatal.to_string().contains("impossible"), "{what}: {fatal}");
            assert!(pass.frames.is_empty());
            // read_ring (the spinning reader's pass) reports it too.
            assert_eq!(b.read_ring(&mut r).fatal.unwrap().code(), "corrupt_ring");
        }
    }

    #[test]
    fn an_impossible_tail_fails_the_writer_and_then_its_reads() {
        type Tail = fn(u64) -> u64; // our head -> the peer's tail
        let cases: [(&str, Tail); 2] = [
            ("ahead of our head", |head| head + 1),
            ("more than capacity behind", |head| head.wrapping_sub(4097)),
        ];
        for (what, tail) in cases {
            let (a, b) = shm_pair_in_use();
            // The peer (b) writes an impossible tail into the ring a writes.
            let head = shm(&a).tx.own.load(Ordering::Relaxed);
            shm(&b).rx.tail().store(tail(head), Ordering::SeqCst);
            let e = a.send_frame(b"two").expect_err(what);
            assert!(CorruptRing::of(&e).is_some(), "{what}: {e}");
            // The next read pass of a (maybe another thread) reports it.
            let mut r = a.try_reader().unwrap();
            assert_eq!(
                a.read(&mut r).fatal.unwrap().code(),
                "corrupt_ring",
                "{what}"
            );
        }
    }

    #[test]
    fn a_peer_rewriting_our_own_published_indexes_changes_nothing_here() {
        let (a, b) = shm_pair_in_use();
        // b's own tail (of the ring it reads) and a's own head (of the ring it writes) are
        // only published for the peer: garbage there is never read back.
        shm(&a).rx.tail().store(u64::MAX, Ordering::SeqCst);
        shm(&b).tx.head().store(12345, Ordering::SeqCst);
        shm(&a)
            .tx
            .head()
            .store(shm(&a).tx.own.load(Ordering::Relaxed), Ordering::SeqCst);
        for i in 0..20u8 {
            a.send_frame(&[i; 700]).unwrap();
            assert_eq!(pump(&a, &b, 1), vec![vec![i; 700]]);
        }
    }

    #[test]
    fn segments_are_sealed_and_an_unsealed_one_is_refused() {
        let seg = create_segment(4096).unwrap();
        let fd = seg.as_raw_fd();
        // SAFETY: test system calls on our own descriptor.
        unsafe {
            let seals = libc::fcntl(fd, libc::F_GET_SEALS);
            assert_eq!(seals & SEALS, SEALS);
            assert_ne!(libc::ftruncate(fd, 0), 0);
            assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
            assert_ne!(libc::ftruncate(fd, 1 << 20), 0);
            assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
        }
        // A segment like ours in every way but the seals.
        // SAFETY: as above.
        let bare = unsafe {
            let fd = libc::memfd_create(c"bare".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            let fd = OwnedFd::from_raw_fd(fd);
            assert_eq!(
                libc::ftruncate(fd.as_raw_fd(), (DATA_OFFSET + 2 * 4096) as _),
                0
            );
            let seg = Segment::map(fd.as_raw_fd(), DATA_OFFSET + 2 * 4096).unwrap();
            (seg.ptr as *mut u64).write(MAGIC);
            (seg.ptr as *mut u64).add(1).write(4096);
            fd
        };
        let (s, _peer) = socketpair().unwrap();
        let e = Endpoint::open(
            s.as_raw_fd(),
            Some((bare.as_raw_fd(), 1)),
            Encoding::Msgpack,
            1024,
        )
        .err()
        .expect("an unsealed segment is refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("not sealed"), "{e}");
    }

    #[test]
    fn corrupt_segment_is_refused() {
        let (a, _b) = socketpair().unwrap();
        let fd = eventfd().unwrap();
        assert!(Endpoint::open(
            a.as_raw_fd(),
            Some((fd.as_raw_fd(), 0)),
            Encoding::Json,
            1024
        )
        .is_err());
    }
}
