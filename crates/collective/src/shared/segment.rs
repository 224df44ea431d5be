//! Layout of a group's segment: a header, one control block per rank (each counter on
//! its own cache line, so spinning ranks do not share lines) and two data slots per rank
//! (one per round parity, so a fast rank can fill the next round's slot while a slow
//! one still reads the previous round).
//!
//! ```text
//! [header 4 KiB][control rank 0]…[control rank n-1][slots: rank 0 p0, rank 0 p1, rank 1 p0, …]
//! ```

use super::memory::{ProcessId, Region};
use crate::error::{CommError, Result};
use crate::fingerprint::{Fingerprint, WORDS};
use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: u64 = 0x6469_7374_6f70_7431; // "distopt1"
const VERSION: u64 = 1;
const HEADER: usize = 4096;
const LINE: usize = 128;
/// Control block: arrive line, state line, two announcement lines.
const CONTROL: usize = 4 * LINE;
/// Words of an announcement: fingerprint, then registered-buffer id and byte offset.
pub(crate) const ANNOUNCE_WORDS: usize = WORDS + 2;

/// Rank states in the control block.
pub(crate) const STATE_EMPTY: u64 = 0;
pub(crate) const STATE_JOINED: u64 = 1;
pub(crate) const STATE_LEFT: u64 = 2;
/// A process has claimed the slot and is writing its identity into it.
pub(crate) const STATE_CLAIMING: u64 = 3;

/// What a rank announces at the start of a call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Announcement {
    pub fp: Fingerprint,
    /// Registered buffer id (0: none) and the byte offset of the call's slice in it.
    pub buffer: u64,
    pub offset: u64,
}

pub(crate) struct Segment {
    region: Region,
    pub size: usize,
    pub slot_bytes: usize,
}

impl Segment {
    pub(crate) fn bytes_needed(size: usize, slot_bytes: usize) -> usize {
        Segment::data_start(size) + 2 * size * slot_bytes
    }

    fn data_start(size: usize) -> usize {
        (HEADER + size * CONTROL).div_ceil(4096) * 4096
    }

    /// Writes the header of a fresh segment.
    pub(crate) fn init(region: &Region, size: usize, slot_bytes: usize, token_hash: u64) {
        let words = [MAGIC, VERSION, size as u64, slot_bytes as u64, token_hash];
        for (i, w) in words.iter().enumerate() {
            // SAFETY: the header lies inside the region (bytes_needed > HEADER).
            unsafe { atomic(region.ptr().add(i * 8)).store(*w, Ordering::Release) };
        }
    }

    /// Checks the header of an opened segment against what this rank expects.
    pub(crate) fn open(region: Region, name: &str, size: usize, slot_bytes: usize, token_hash: u64) -> Result<Segment> {
        if region.len() < HEADER {
            return Err(CommError::Join(format!("{name} is too small to be a distoptim segment")));
        }
        // SAFETY: inside the header.
        let word = |i: usize| unsafe { atomic(region.ptr().add(i * 8)).load(Ordering::Acquire) };
        if word(0) != MAGIC || word(1) != VERSION {
            return Err(CommError::Join(format!("{name} is not a distoptim segment of this version")));
        }
        if word(4) != token_hash {
            return Err(CommError::Join(format!("{name} belongs to another job: the job token does not match")));
        }
        if word(2) != size as u64 || word(3) != slot_bytes as u64 {
            return Err(CommError::Join(format!(
                "{name} was made for {} ranks with {}-byte slots, this rank expects {size} ranks with {slot_bytes}-byte slots",
                word(2),
                word(3)
            )));
        }
        if region.len() < Segment::bytes_needed(size, slot_bytes) {
            return Err(CommError::Join(format!("{name} is truncated")));
        }
        Ok(Segment { region, size, slot_bytes })
    }

    fn control(&self, rank: usize, line: usize, word: usize) -> &AtomicU64 {
        debug_assert!(rank < self.size && word < LINE / 8);
        // SAFETY: inside the control block of `rank`, 8-byte aligned.
        unsafe { atomic(self.region.ptr().add(HEADER + rank * CONTROL + line * LINE + word * 8)) }
    }

    /// How many barriers `rank` has arrived at.
    pub(crate) fn arrived(&self, rank: usize) -> &AtomicU64 {
        self.control(rank, 0, 0)
    }

    pub(crate) fn state(&self, rank: usize) -> &AtomicU64 {
        self.control(rank, 1, 0)
    }

    pub(crate) fn set_process(&self, rank: usize, id: ProcessId) {
        self.control(rank, 1, 1).store(id.pid, Ordering::Relaxed);
        self.control(rank, 1, 2).store(id.start_time, Ordering::Relaxed);
    }

    pub(crate) fn process(&self, rank: usize) -> ProcessId {
        ProcessId { pid: self.control(rank, 1, 1).load(Ordering::Relaxed), start_time: self.control(rank, 1, 2).load(Ordering::Relaxed) }
    }

    /// Writes `rank`'s announcement for calls of this parity (published by the next arrive).
    pub(crate) fn announce(&self, rank: usize, parity: usize, a: &Announcement) {
        let mut words = [0u64; ANNOUNCE_WORDS];
        words[..WORDS].copy_from_slice(&a.fp.to_words());
        words[WORDS] = a.buffer;
        words[WORDS + 1] = a.offset;
        for (i, w) in words.iter().enumerate() {
            self.control(rank, 2 + parity, i).store(*w, Ordering::Relaxed);
        }
    }

    /// Reads `rank`'s announcement; `None` if it is not a valid one.
    pub(crate) fn announcement(&self, rank: usize, parity: usize) -> Option<Announcement> {
        let mut words = [0u64; ANNOUNCE_WORDS];
        for (i, w) in words.iter_mut().enumerate() {
            *w = self.control(rank, 2 + parity, i).load(Ordering::Relaxed);
        }
        let mut fp = [0u64; WORDS];
        fp.copy_from_slice(&words[..WORDS]);
        Some(Announcement { fp: Fingerprint::from_words(fp)?, buffer: words[WORDS], offset: words[WORDS + 1] })
    }

    /// Start of `rank`'s data slot for rounds of this parity.
    pub(crate) fn slot(&self, rank: usize, parity: usize) -> *mut u8 {
        // SAFETY: inside the region (checked against bytes_needed at open/create).
        unsafe { self.region.ptr().add(Segment::data_start(self.size) + (2 * rank + parity) * self.slot_bytes) }
    }
}

/// # Safety
/// `ptr` must be 8-byte aligned and point into a live mapping.
unsafe fn atomic<'a>(ptr: *mut u8) -> &'a AtomicU64 {
    // SAFETY: the caller guarantees alignment and a live mapping; AtomicU64 has the
    // layout of u64 and any bit pattern is valid.
    unsafe { &*(ptr as *const AtomicU64) }
}

/// 64-bit FNV-1a of the job token: the header stores the hash, never the token.
pub(crate) fn token_hash(token: &str) -> u64 {
    token.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
