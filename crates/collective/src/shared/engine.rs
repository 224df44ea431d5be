//! The shared-memory collectives, used by the threads and shm backends alike.
//!
//! Every rank can read every peer's slot, so no message passing is needed:
//! - **small messages** (≤ 32 KiB): each rank copies its data into its slot, one barrier,
//!   then every rank reduces all slots itself, in rank order (so all ranks get the same
//!   bits). One barrier per call.
//! - **large messages**, in slot-sized rounds: copy in, barrier, each rank reduces its
//!   own balanced range of the round across all slots (reduce-scatter by direct reads)
//!   and leaves the result in its slot, barrier, each rank copies every range out
//!   (all-gather by direct reads). Slots alternate by round parity, so a rank fills the
//!   next round while slower peers still read the previous one.
//! - **registered buffers** (from [`SharedEngine::alloc`]): the same two phases read the
//!   peers' buffers in place; nothing is copied in or out.
//!
//! Before any data moves, each call's first barrier carries the rank's fingerprint; every
//! rank compares all of them, so a mismatch fails everywhere, naming both sides.
//! Waiting spins briefly, then yields, then sleeps, checking the clock, peers that left
//! and (shm) peers whose process died.

use super::buffer::{SharedAlloc, SharedBuf};
use super::memory::Memory;
use super::segment::{Announcement, Segment, STATE_CLAIMING, STATE_EMPTY, STATE_JOINED, STATE_LEFT};
use crate::element::{Element, ReduceOp};
use crate::error::{CommError, Result};
use crate::fingerprint::{Fingerprint, OpKind};
use crate::partition::{intersect, shard_range};
use crate::reduce::{reduce_raw, reduce_raw_observed};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Largest group the shared backends accept (pointer tables live on the stack).
pub const MAX_RANKS: usize = 512;
/// Messages up to this size take the one-barrier path.
const SMALL_BYTES: usize = 32 * 1024;
/// Busy-waiting time before a waiting rank yields its core (when every rank has one).
const SPIN_FOR: Duration = Duration::from_millis(5);
/// How often a waiting rank checks whether peers' processes are alive.
const LIVENESS_EVERY: Duration = Duration::from_millis(100);

/// Everything needed to join (or create) a group's segment.
#[derive(Clone)]
pub(crate) struct GroupSpec {
    pub memory: Arc<dyn Memory>,
    pub name: String,
    pub rank: usize,
    pub size: usize,
    pub token_hash: u64,
    pub slot_bytes: usize,
    pub timeout: Duration,
}

pub(crate) struct SharedEngine {
    spec: GroupSpec,
    seg: Segment,
    /// Calls made, barriers passed, data rounds done, buffers allocated, splits made.
    seq: u64,
    arrivals: u64,
    rounds: u64,
    allocs: u64,
    splits: u64,
    buffers: Vec<Weak<SharedAlloc>>,
    /// Peers' announcements of the current call (reused: no allocation per call).
    announced: Vec<Option<Announcement>>,
    poisoned: Option<String>,
    /// How long to busy-wait before yielding: none when ranks outnumber cores, since a
    /// spinning rank would take the core a peer needs.
    spin_for: Duration,
}

impl SharedEngine {
    /// Creates (rank `creator`) or opens the segment, claims this rank and waits for all
    /// ranks to do the same.
    pub(crate) fn join(spec: GroupSpec, creator: bool) -> Result<SharedEngine> {
        let memory = spec.memory.clone();
        let name = spec.name.clone();
        let engine = SharedEngine::attach(spec, creator);
        let joined = engine.and_then(|mut e| {
            let fp = Fingerprint { seq: 0, kind: OpKind::Barrier, dtype: None, count: 0, root: 0 };
            e.arrive_and_wait(&fp)?;
            Ok(e)
        });
        if creator {
            // Everyone has mapped it (or given up): the name is no longer needed, and the
            // memory goes away with the last mapping, also if a rank crashes later.
            memory.unlink(&name);
        }
        joined
    }

    /// Creates or opens the segment and claims this rank, without waiting for the others
    /// (the threads backend creates every rank itself).
    pub(crate) fn attach(spec: GroupSpec, creator: bool) -> Result<SharedEngine> {
        let GroupSpec { ref memory, ref name, rank, size, token_hash, slot_bytes, timeout } = spec;
        if size == 0 || size > MAX_RANKS {
            return Err(CommError::Join(format!("group size {size} is outside 1..={MAX_RANKS}")));
        }
        if rank >= size {
            return Err(CommError::Join(format!("rank {rank} is outside a group of {size}")));
        }
        if slot_bytes == 0 || slot_bytes % 4096 != 0 {
            return Err(CommError::Join(format!("slot size {slot_bytes} must be a positive multiple of 4096")));
        }
        let bytes = Segment::bytes_needed(size, slot_bytes);
        let region = if creator {
            memory.create(name, bytes, &|r| Segment::init(r, size, slot_bytes, token_hash))?
        } else {
            memory.open(name, Instant::now() + timeout)?
        };
        let seg = Segment::open(region, name, size, slot_bytes, token_hash)?;
        // Claim the slot first, and only then write our pid into it: a second process
        // with the same RANK must not overwrite the first one's identity (its peers
        // would then declare the real rank dead when the impostor exits).
        if seg.state(rank).compare_exchange(STATE_EMPTY, STATE_CLAIMING, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Err(CommError::Join(format!("rank {rank} of {name} has already joined (two processes with the same RANK?)")));
        }
        seg.set_process(rank, memory.me());
        // Peers check a rank's liveness only once it is JOINED, so they see its pid.
        seg.state(rank).store(STATE_JOINED, Ordering::Release);
        Ok(SharedEngine {
            seg,
            seq: 0,
            arrivals: 0,
            rounds: 0,
            allocs: 0,
            splits: 0,
            buffers: Vec::new(),
            announced: vec![None; size],
            poisoned: None,
            spin_for: if size <= std::thread::available_parallelism().map_or(1, |c| c.get()) { SPIN_FOR } else { Duration::ZERO },
            spec,
        })
    }

    pub(crate) fn rank(&self) -> usize {
        self.spec.rank
    }

    pub(crate) fn size(&self) -> usize {
        self.spec.size
    }

    pub(crate) fn set_timeout(&mut self, timeout: Duration) {
        self.spec.timeout = timeout;
    }

    fn begin(&mut self, kind: OpKind, dtype: Option<crate::Dtype>, count: usize, root: usize) -> Result<Fingerprint> {
        if let Some(reason) = &self.poisoned {
            return Err(CommError::Poisoned(reason.clone()));
        }
        self.seq += 1;
        Ok(Fingerprint { seq: self.seq, kind, dtype, count: count as u64, root: root as u64 })
    }

    /// Numbers the call; `None` when the group is a single rank (nothing to exchange).
    fn open_call(&mut self, kind: OpKind, dtype: Option<crate::Dtype>, count: usize, root: usize) -> Result<Option<Fingerprint>> {
        let fp = self.begin(kind, dtype, count, root)?;
        Ok((self.spec.size > 1).then_some(fp))
    }

    /// Runs one call's body, poisoning the engine if it fails in a way that leaves the
    /// ranks out of step.
    fn guard<R>(&mut self, body: impl FnOnce(&mut SharedEngine) -> Result<R>) -> Result<R> {
        let result = body(self);
        if let Err(e) = &result {
            if e.poisons() && self.poisoned.is_none() {
                self.poisoned = Some(e.to_string());
            }
        }
        result
    }

    /// Arrives at the next barrier and waits for every peer to arrive too.
    fn arrive_and_wait(&mut self, fp: &Fingerprint) -> Result<()> {
        self.arrivals += 1;
        let target = self.arrivals;
        let (me, n) = (self.spec.rank, self.spec.size);
        self.seg.arrived(me).store(target, Ordering::Release);
        let start = Instant::now();
        let mut next_liveness = start + LIVENESS_EVERY;
        let mut spins = 0u32;
        let mut peer = 0;
        loop {
            while peer < n && (peer == me || self.seg.arrived(peer).load(Ordering::Acquire) >= target) {
                peer += 1;
            }
            if peer == n {
                return Ok(());
            }
            spins += 1;
            // Reading the clock costs more than a spin: do it every 256 spins while spinning.
            if !spins.is_multiple_of(256) && !self.spin_for.is_zero() {
                std::hint::spin_loop();
                continue;
            }
            // A peer may arrive, finish the call and leave between two of our checks: it
            // left *this* call only if it has not arrived (its arrival is ordered before
            // its leaving, so reading the count after the state sees it).
            if self.seg.state(peer).load(Ordering::Acquire) == STATE_LEFT && self.seg.arrived(peer).load(Ordering::Acquire) < target {
                return Err(CommError::PeerLeft { rank: peer, op: *fp });
            }
            let now = Instant::now();
            let waited = now - start;
            if now >= next_liveness {
                next_liveness = now + LIVENESS_EVERY;
                for r in peer..n {
                    let missing = r != me && self.seg.arrived(r).load(Ordering::Acquire) < target;
                    if missing && self.seg.state(r).load(Ordering::Acquire) == STATE_JOINED {
                        let id = self.seg.process(r);
                        if !self.spec.memory.alive(id) {
                            return Err(CommError::PeerDied { rank: r, pid: id.pid, op: *fp });
                        }
                    }
                }
            }
            if waited > self.spec.timeout {
                let missing = (0..n).filter(|&r| r != me && self.seg.arrived(r).load(Ordering::Acquire) < target).collect();
                return Err(CommError::Timeout { op: *fp, missing, waited });
            }
            if waited < self.spin_for {
                std::hint::spin_loop();
            } else if waited < self.spin_for + Duration::from_millis(2) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// The first barrier of a call: announce, wait, compare every peer's fingerprint.
    fn announce_and_check(&mut self, fp: Fingerprint, buffer: Option<(u64, u64)>) -> Result<()> {
        let (me, n) = (self.spec.rank, self.spec.size);
        let parity = (fp.seq % 2) as usize;
        let (buffer, offset) = buffer.unwrap_or((0, 0));
        self.seg.announce(me, parity, &Announcement { fp, buffer, offset });
        self.arrive_and_wait(&fp)?;
        for r in 0..n {
            let theirs = self.seg.announcement(r, parity);
            self.announced[r] = theirs;
            let agrees = theirs.is_some_and(|a| a.fp.agrees(&fp));
            if !agrees {
                let theirs = theirs.map(|a| a.fp).unwrap_or(Fingerprint { seq: 0, kind: OpKind::Barrier, dtype: None, count: 0, root: 0 });
                return Err(CommError::Mismatch { rank: me, mine: fp, peer: r, theirs });
            }
        }
        Ok(())
    }

    fn next_parity(&mut self) -> usize {
        self.rounds += 1;
        (self.rounds % 2) as usize
    }

    fn slot<T>(&self, rank: usize, parity: usize) -> *mut T {
        self.seg.slot(rank, parity) as *mut T
    }

    /// Copies `src[part]` into this rank's slot of `parity`, which holds the round's
    /// `window` of the buffer (so at `part.start - window.start`). Slots of a parity are
    /// free when the round begins (round invariant).
    fn stage<T: Element>(&self, src: &[T], part: Range<usize>, window: &Range<usize>, parity: usize) {
        if part.is_empty() {
            return;
        }
        assert!(window.start <= part.start && part.end <= window.end.min(src.len()) && window.len() <= self.chunk_elems::<T>());
        // SAFETY: the part lies in `src` and in the window, which fits a slot (asserted).
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr().add(part.start),
                self.slot::<T>(self.spec.rank, parity).add(part.start - window.start),
                part.len(),
            )
        };
    }

    fn chunk_elems<T>(&self) -> usize {
        (self.spec.slot_bytes / std::mem::size_of::<T>()).max(1)
    }

    fn is_small<T>(&self, len: usize) -> bool {
        let bytes = len * std::mem::size_of::<T>();
        bytes <= SMALL_BYTES && bytes <= self.spec.slot_bytes
    }

    /// The registered buffer (id, byte offset) that `buf` lies in, if any.
    fn lookup<T>(&mut self, buf: &[T]) -> Option<(u64, u64)> {
        self.buffers.retain(|w| w.strong_count() > 0);
        let (start, bytes) = (buf.as_ptr() as usize, std::mem::size_of_val(buf));
        self.buffers.iter().filter_map(Weak::upgrade).find_map(|a| {
            let region = &a.regions[a.rank];
            let base = region.ptr() as usize;
            (start >= base && start + bytes <= base + region.len()).then(|| (a.id, (start - base) as u64))
        })
    }

    /// After the announcement: the peers' copies of a registered buffer when every rank
    /// passed one from the same allocation, as `ptrs[r]` (this rank's entry is `mine`).
    fn registered_views<T>(&self, mine: *mut T, len: usize, ptrs: &mut [*mut T; MAX_RANKS]) -> bool {
        let Some(Some(my)) = self.announced.get(self.spec.rank) else { return false };
        if my.buffer == 0 || self.spec.size == 1 {
            return false;
        }
        let Some(alloc) = self.buffers.iter().filter_map(Weak::upgrade).find(|a| a.id == my.buffer) else { return false };
        let bytes = (len * std::mem::size_of::<T>()) as u64;
        for (r, slot) in ptrs.iter_mut().enumerate().take(self.spec.size) {
            let Some(a) = self.announced[r] else { return false };
            if a.buffer != my.buffer || a.offset + bytes > alloc.regions[r].len() as u64 {
                return false;
            }
            // SAFETY: in bounds of the peer's region, checked just above.
            *slot = if r == self.spec.rank { mine } else { unsafe { alloc.regions[r].ptr().add(a.offset as usize) as *mut T } };
        }
        true
    }

    /// After the announcement: every rank's send buffer of an `all_to_all`, `lens[r]`
    /// elements, when every rank passed one from the same registered allocation (read
    /// in place, no slot copies); this rank's entry is `mine`.
    fn send_views<T>(&self, mine: *const T, lens: &[usize]) -> Option<[*const T; MAX_RANKS]> {
        let my = self.announced.get(self.spec.rank).copied().flatten()?;
        if my.buffer == 0 || self.spec.size == 1 {
            return None;
        }
        let alloc = self.buffers.iter().filter_map(Weak::upgrade).find(|a| a.id == my.buffer)?;
        let mut ptrs = [std::ptr::null(); MAX_RANKS];
        for (r, ptr) in ptrs.iter_mut().enumerate().take(self.spec.size) {
            let a = self.announced[r]?;
            let bytes = lens[r].checked_mul(std::mem::size_of::<T>())? as u64;
            if a.buffer != my.buffer || a.offset.checked_add(bytes)? > alloc.regions[r].len() as u64 {
                return None;
            }
            // SAFETY: in bounds of the peer's region, checked just above.
            *ptr = if r == self.spec.rank { mine } else { unsafe { alloc.regions[r].ptr().add(a.offset as usize) as *const T } };
        }
        Some(ptrs)
    }

    /// Checks that every rank is making the same call, moving no data (for engines that
    /// use this group only to rendezvous, like NCCL's).
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn agree(&mut self, kind: OpKind, dtype: Option<crate::Dtype>, count: usize, root: usize) -> Result<()> {
        self.guard(|e| {
            let Some(fp) = e.open_call(kind, dtype, count, root)? else { return Ok(()) };
            e.announce_and_check(fp, None)
        })
    }

    pub(crate) fn barrier(&mut self) -> Result<()> {
        self.guard(|e| {
            let fp = e.begin(OpKind::Barrier, None, 0, 0)?;
            e.announce_and_check(fp, None)
        })
    }

    pub(crate) fn all_reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.all_reduce_observed(buf, op, &mut |_| {})
    }

    /// All-reduce that hands this rank's part `shard_range(len, size, rank)` of the result
    /// to `observe`, in order, each piece once it is final (see
    /// `Communicator::all_reduce_observed`).
    pub(crate) fn all_reduce_observed<T: Element>(&mut self, buf: &mut [T], op: ReduceOp, observe: &mut dyn FnMut(&[T])) -> Result<()> {
        self.guard(|e| {
            let (me, n, len) = (e.spec.rank, e.spec.size, buf.len());
            let mine = shard_range(len, n, me);
            let Some(fp) = e.open_call(OpKind::AllReduce(op), Some(T::DTYPE), len, 0)? else {
                observe(&buf[mine]);
                return Ok(());
            };
            if e.is_small::<T>(len) {
                e.reduce_small(buf, op, fp, None)?;
                observe(&buf[mine]);
                return Ok(());
            }
            let reg = e.lookup(buf);
            e.announce_and_check(fp, reg)?;
            let mut views = [std::ptr::null_mut(); MAX_RANKS];
            if e.registered_views(buf.as_mut_ptr(), len, &mut views) {
                let srcs = offset_ptrs(&views, n, mine.start);
                // SAFETY: peers read only their own ranges of our buffer until the next barrier.
                unsafe { reduce_raw_observed(views[me].add(mine.start), &srcs[..n], mine.len(), op, n, observe) };
                e.arrive_and_wait(&fp)?;
                e.copy_shards(&views, 0, buf, true, |r| shard_range(len, n, r));
                return e.arrive_and_wait(&fp);
            }
            // The rounds reduce slot-sized windows, not this rank's part: observe after.
            e.reduce_rounds(buf, op, &fp, None)?;
            observe(&buf[mine]);
            Ok(())
        })
    }

    /// One-barrier reduction through the slots: every rank (or only `to`) reduces all
    /// slots itself, in rank order.
    fn reduce_small<T: Element>(&mut self, buf: &mut [T], op: ReduceOp, fp: Fingerprint, to: Option<usize>) -> Result<()> {
        let (me, n, len) = (self.spec.rank, self.spec.size, buf.len());
        let p = self.next_parity();
        // SAFETY: len fits the slot (is_small); slots of this parity are free (round invariant).
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.slot::<T>(me, p), len) };
        self.announce_and_check(fp, None)?;
        if to.is_none_or(|root| root == me) {
            let srcs = self.slot_ptrs::<T>(p, 0);
            // SAFETY: every slot holds len elements of this round; nobody writes them now.
            unsafe { reduce_raw(buf.as_mut_ptr(), &srcs[..n], len, op, n) };
        }
        Ok(())
    }

    /// Slot-sized rounds of reduce-scatter by direct reads, then all-gather by direct
    /// reads into every rank's `buf` (or only `to`'s), after the announcement.
    fn reduce_rounds<T: Element>(&mut self, buf: &mut [T], op: ReduceOp, fp: &Fingerprint, to: Option<usize>) -> Result<()> {
        let (me, n) = (self.spec.rank, self.spec.size);
        for window in windows(buf.len(), self.chunk_elems::<T>()) {
            let p = self.next_parity();
            let w = window.len();
            // SAFETY: w ≤ chunk elements; slots of this parity are free (round invariant).
            unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr().add(window.start), self.slot::<T>(me, p), w) };
            self.arrive_and_wait(fp)?;
            let mine = shard_range(w, n, me);
            let srcs = self.slot_ptrs::<T>(p, mine.start);
            // SAFETY: our range of every slot is read only by us in this phase.
            unsafe { reduce_raw(self.slot::<T>(me, p).add(mine.start), &srcs[..n], mine.len(), op, n) };
            self.arrive_and_wait(fp)?;
            if to.is_none_or(|root| root == me) {
                let slots = self.slot_ptrs_mut::<T>(p);
                self.copy_shards(&slots, window.start, buf, false, |r| shift(shard_range(w, n, r), window.start));
            }
        }
        Ok(())
    }

    pub(crate) fn reduce_scatter<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.reduce_scatter_observed(buf, op, &mut |_| {})
    }

    /// Reduce-scatter that hands this rank's part of the result to `observe`, in order,
    /// each piece as it is written.
    pub(crate) fn reduce_scatter_observed<T: Element>(&mut self, buf: &mut [T], op: ReduceOp, observe: &mut dyn FnMut(&[T])) -> Result<()> {
        self.guard(|e| {
            let (me, n, len) = (e.spec.rank, e.spec.size, buf.len());
            let mine = shard_range(len, n, me);
            let Some(fp) = e.open_call(OpKind::ReduceScatter(op), Some(T::DTYPE), len, 0)? else {
                observe(&buf[mine]);
                return Ok(());
            };
            if e.is_small::<T>(len) {
                let p = e.next_parity();
                // SAFETY: as in all_reduce's small path.
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), e.slot::<T>(me, p), len) };
                e.announce_and_check(fp, None)?;
                let srcs = e.slot_ptrs::<T>(p, mine.start);
                // SAFETY: every slot holds len elements of this round; we write only our buffer.
                unsafe { reduce_raw_observed(buf.as_mut_ptr().add(mine.start), &srcs[..n], mine.len(), op, n, observe) };
                return Ok(());
            }
            let reg = e.lookup(buf);
            e.announce_and_check(fp, reg)?;
            let mut views = [std::ptr::null_mut(); MAX_RANKS];
            if e.registered_views(buf.as_mut_ptr(), len, &mut views) {
                let srcs = offset_ptrs(&views, n, mine.start);
                // SAFETY: peers read only their own ranges of our buffer.
                unsafe { reduce_raw_observed(views[me].add(mine.start), &srcs[..n], mine.len(), op, n, observe) };
                return e.arrive_and_wait(&fp);
            }
            for window in windows(len, e.chunk_elems::<T>()) {
                let p = e.next_parity();
                // SAFETY: the window fits a slot; slots of this parity are free (round invariant).
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr().add(window.start), e.slot::<T>(me, p), window.len()) };
                e.arrive_and_wait(&fp)?;
                let part = intersect(&mine, &window);
                let srcs = e.slot_ptrs::<T>(p, part.start - window.start);
                // SAFETY: reading slots of this round, writing our own buffer.
                unsafe { reduce_raw_observed(buf.as_mut_ptr().add(part.start), &srcs[..n], part.len(), op, n, observe) };
            }
            Ok(())
        })
    }

    pub(crate) fn all_gather<T: Element>(&mut self, buf: &mut [T]) -> Result<()> {
        self.guard(|e| {
            let Some(fp) = e.open_call(OpKind::AllGather, Some(T::DTYPE), buf.len(), 0)? else { return Ok(()) };
            let (me, n, len) = (e.spec.rank, e.spec.size, buf.len());
            let mine = shard_range(len, n, me);
            if e.is_small::<T>(len) {
                let p = e.next_parity();
                // SAFETY: len fits the slot (is_small); slots of this parity are free (round invariant).
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr().add(mine.start), e.slot::<T>(me, p).add(mine.start), mine.len()) };
                e.announce_and_check(fp, None)?;
                let slots = e.slot_ptrs_mut::<T>(p);
                e.copy_shards(&slots, 0, buf, true, |r| shard_range(len, n, r));
                return Ok(());
            }
            let reg = e.lookup(buf);
            e.announce_and_check(fp, reg)?;
            let mut views = [std::ptr::null_mut(); MAX_RANKS];
            if e.registered_views(buf.as_mut_ptr(), len, &mut views) {
                e.copy_shards(&views, 0, buf, true, |r| shard_range(len, n, r));
                return e.arrive_and_wait(&fp);
            }
            for window in windows(len, e.chunk_elems::<T>()) {
                let p = e.next_parity();
                e.stage(buf, intersect(&mine, &window), &window, p);
                e.arrive_and_wait(&fp)?;
                let slots = e.slot_ptrs_mut::<T>(p);
                e.copy_shards(&slots, window.start, buf, true, |r| intersect(&shard_range(len, n, r), &window));
            }
            Ok(())
        })
    }

    /// [`Communicator::all_to_all`](crate::Communicator::all_to_all): first every rank's
    /// counts through the slots (so every rank checks the same matrix), then the data in
    /// slot-sized windows of the senders' buffers, each rank copying out only the pieces
    /// addressed to it.
    pub(crate) fn all_to_all<T: Element>(
        &mut self,
        send: &[T],
        send_counts: &[usize],
        recv: &mut [T],
        recv_counts: &[usize],
    ) -> Result<()> {
        self.guard(|e| {
            let (me, n) = (e.spec.rank, e.spec.size);
            let Some(fp) = e.open_call(OpKind::AllToAll, Some(T::DTYPE), n, 0)? else {
                recv.copy_from_slice(send);
                return Ok(());
            };
            if 2 * n * 8 > e.spec.slot_bytes {
                return Err(CommError::invalid("all_to_all", format!("{n} ranks' counts do not fit a {}-byte slot", e.spec.slot_bytes)));
            }
            let p = e.next_parity();
            let counts: Vec<u64> = send_counts.iter().chain(recv_counts).map(|&c| c as u64).collect();
            // SAFETY: 2n u64 fit the slot (checked above); slots of this parity are free.
            unsafe { std::ptr::copy_nonoverlapping(counts.as_ptr(), e.slot::<u64>(me, p), 2 * n) };
            let reg = e.lookup(send);
            e.announce_and_check(fp, reg)?;
            let (mut sends, mut recvs) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for r in 0..n {
                // SAFETY: rank r wrote 2n u64 into its slot of this round before the barrier.
                let theirs = unsafe { std::slice::from_raw_parts(e.slot::<u64>(r, p) as *const u64, 2 * n) };
                sends.push(theirs[..n].iter().map(|&c| c as usize).collect::<Vec<_>>());
                recvs.push(theirs[n..].iter().map(|&c| c as usize).collect::<Vec<_>>());
            }
            CommError::check_counts(&sends, &recvs)?;
            // Where each sender's piece for this rank starts in its buffer, and in ours.
            let from: Vec<usize> = sends.iter().map(|c| c[..me].iter().sum()).collect();
            let to: Vec<usize> = (0..n).map(|r| recv_counts[..r].iter().sum()).collect();
            let totals: Vec<usize> = sends.iter().map(|c| c.iter().sum()).collect();
            if let Some(views) = e.send_views(send.as_ptr(), &totals) {
                for (r, view) in views.iter().enumerate().take(n) {
                    // SAFETY: rank r's send buffer holds its totals[r] elements at `view`
                    // (checked against its region), its piece for us at from[r]; it does
                    // not change before the barrier below. Our piece goes to to[r].
                    unsafe { std::ptr::copy_nonoverlapping(view.add(from[r]), recv.as_mut_ptr().add(to[r]), sends[r][me]) };
                }
                // No rank may write its send buffer before every peer has read it.
                return e.arrive_and_wait(&fp);
            }
            let chunk = e.chunk_elems::<T>();
            let rounds = totals.iter().map(|t| t.div_ceil(chunk)).max().unwrap_or(0);
            // Our own piece goes straight across; the slots carry only the others'.
            let own = from[me]..from[me] + sends[me][me];
            recv[to[me]..to[me] + own.len()].copy_from_slice(&send[own.clone()]);
            for k in 0..rounds {
                let window = k * chunk..(k + 1) * chunk;
                let p = e.next_parity();
                let whole = intersect(&(0..send.len()), &window);
                let parts = [whole.start..own.start.clamp(whole.start, whole.end), own.end.clamp(whole.start, whole.end)..whole.end];
                for part in parts {
                    e.stage(send, part, &window, p);
                }
                e.arrive_and_wait(&fp)?;
                for r in (0..n).filter(|&r| r != me) {
                    let piece = from[r]..from[r] + sends[r][me];
                    let part = intersect(&piece, &window);
                    if part.is_empty() {
                        continue;
                    }
                    // SAFETY: rank r's slot holds its buffer's window this round and the
                    // part lies in it; in our buffer the piece starts at to[r], and the
                    // checked counts make it fit.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            e.slot::<T>(r, p).add(part.start - window.start) as *const T,
                            recv.as_mut_ptr().add(to[r] + part.start - piece.start),
                            part.len(),
                        )
                    };
                }
            }
            Ok(())
        })
    }

    pub(crate) fn broadcast<T: Element>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_root("broadcast", root)?;
        self.guard(|e| {
            let Some(fp) = e.open_call(OpKind::Broadcast, Some(T::DTYPE), buf.len(), root)? else { return Ok(()) };
            let (me, len) = (e.spec.rank, buf.len());
            if e.is_small::<T>(len) {
                let p = e.next_parity();
                if me == root {
                    // SAFETY: len fits the slot (is_small); slots of this parity are free.
                    unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), e.slot::<T>(me, p), len) };
                }
                e.announce_and_check(fp, None)?;
                if me != root {
                    // SAFETY: the root's slot holds len elements of this round and nobody writes it now.
                    unsafe { std::ptr::copy_nonoverlapping(e.slot::<T>(root, p), buf.as_mut_ptr(), len) };
                }
                return Ok(());
            }
            let reg = e.lookup(buf);
            e.announce_and_check(fp, reg)?;
            let mut views = [std::ptr::null_mut(); MAX_RANKS];
            if e.registered_views(buf.as_mut_ptr(), len, &mut views) {
                if me != root {
                    // SAFETY: the root does not write its buffer until the closing barrier.
                    unsafe { std::ptr::copy_nonoverlapping(views[root], buf.as_mut_ptr(), len) };
                }
                return e.arrive_and_wait(&fp);
            }
            for window in windows(len, e.chunk_elems::<T>()) {
                let p = e.next_parity();
                if me == root {
                    // SAFETY: the window fits a slot; slots of this parity are free (round invariant).
                    unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr().add(window.start), e.slot::<T>(me, p), window.len()) };
                }
                e.arrive_and_wait(&fp)?;
                if me != root {
                    // SAFETY: the root's slot holds this window after the barrier; nobody writes it now.
                    unsafe { std::ptr::copy_nonoverlapping(e.slot::<T>(root, p), buf.as_mut_ptr().add(window.start), window.len()) };
                }
            }
            Ok(())
        })
    }

    pub(crate) fn reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.check_root("reduce", root)?;
        self.guard(|e| {
            let Some(fp) = e.open_call(OpKind::Reduce(op), Some(T::DTYPE), buf.len(), root)? else { return Ok(()) };
            if e.is_small::<T>(buf.len()) {
                return e.reduce_small(buf, op, fp, Some(root));
            }
            e.announce_and_check(fp, None)?;
            e.reduce_rounds(buf, op, &fp, Some(root))
        })
    }

    fn check_root(&self, op: &'static str, root: usize) -> Result<()> {
        if root >= self.spec.size {
            return Err(CommError::invalid(op, format!("root {root} is outside a group of {}", self.spec.size)));
        }
        Ok(())
    }

    /// For every rank `r`, copies the buffer range `shard_of(r)` from `views[r]` (which
    /// holds buffer element `origin` at its index 0) into `buf`; `skip_me` when this
    /// rank's range is already in place.
    fn copy_shards<T: Element>(
        &self,
        views: &[*mut T; MAX_RANKS],
        origin: usize,
        buf: &mut [T],
        skip_me: bool,
        shard_of: impl Fn(usize) -> Range<usize>,
    ) {
        for (r, view) in views.iter().enumerate().take(self.spec.size) {
            if skip_me && r == self.spec.rank {
                continue;
            }
            let shard = shard_of(r);
            // SAFETY: the shard lies inside buf and inside the view (a slot holding the
            // round's window, or a peer's buffer as long as ours); its owner does not
            // write it before the next barrier.
            unsafe { std::ptr::copy_nonoverlapping(view.add(shard.start - origin), buf.as_mut_ptr().add(shard.start), shard.len()) };
        }
    }

    fn slot_ptrs<T>(&self, parity: usize, offset: usize) -> [*const T; MAX_RANKS] {
        let mut ptrs = [std::ptr::null(); MAX_RANKS];
        for (r, p) in ptrs.iter_mut().enumerate().take(self.spec.size) {
            // SAFETY: offset < chunk elements.
            *p = unsafe { self.slot::<T>(r, parity).add(offset) };
        }
        ptrs
    }

    fn slot_ptrs_mut<T>(&self, parity: usize) -> [*mut T; MAX_RANKS] {
        let mut ptrs = [std::ptr::null_mut(); MAX_RANKS];
        for (r, p) in ptrs.iter_mut().enumerate().take(self.spec.size) {
            *p = self.slot::<T>(r, parity);
        }
        ptrs
    }

    /// Collectively allocates a buffer of `len` elements in shared memory.
    pub(crate) fn alloc<T: Element>(&mut self, len: usize) -> Result<SharedBuf<T>> {
        let bytes =
            len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| CommError::invalid("alloc", format!("{len} elements overflow")))?;
        self.guard(|e| {
            let fp = e.begin(OpKind::Alloc, Some(T::DTYPE), len, 0)?;
            e.allocs += 1;
            let id = e.allocs;
            let (me, n) = (e.spec.rank, e.spec.size);
            let prefix = e.spec.name.clone();
            let name = |r: usize| format!("{prefix}.a{id}r{r}");
            let mine = e.spec.memory.create(&name(me), bytes, &|_| {})?;
            e.announce_and_check(fp, None)?;
            let deadline = Instant::now() + e.spec.timeout;
            let regions =
                (0..n).map(|r| if r == me { Ok(mine.clone()) } else { e.spec.memory.open(&name(r), deadline) }).collect::<Result<Vec<_>>>();
            let opened = e.arrive_and_wait(&fp);
            e.spec.memory.unlink(&name(me));
            let regions = regions?;
            opened?;
            let alloc = Arc::new(SharedAlloc { id, rank: me, regions });
            e.buffers.push(Arc::downgrade(&alloc));
            Ok(SharedBuf::new(alloc, len))
        })
    }

    /// MPI's `comm_split`: ranks with the same `color` form a group, ordered by `key`
    /// (then by rank); `None` joins no group. Collective over this group.
    pub(crate) fn split(&mut self, color: Option<u32>, key: i64) -> Result<Option<SharedEngine>> {
        let n = self.spec.size;
        let mut table = vec![0i64; 2 * n];
        table[2 * self.spec.rank] = color.map_or(-1, i64::from);
        table[2 * self.spec.rank + 1] = key;
        self.all_gather(&mut table)?;
        self.splits += 1;
        let Some(color) = color else { return Ok(None) };
        let mut members: Vec<usize> = (0..n).filter(|&r| table[2 * r] == i64::from(color)).collect();
        members.sort_by_key(|&r| (table[2 * r + 1], r));
        let rank = members.iter().position(|&r| r == self.spec.rank).unwrap_or(0);
        let spec =
            GroupSpec { name: format!("{}.s{}c{color}", self.spec.name, self.splits), rank, size: members.len(), ..self.spec.clone() };
        self.guard(|_| SharedEngine::join(spec, rank == 0)).map(Some)
    }
}

impl Drop for SharedEngine {
    fn drop(&mut self) {
        // Peers waiting for this rank fail at once instead of timing out.
        self.seg.state(self.spec.rank).store(STATE_LEFT, Ordering::Release);
    }
}

/// `len` split into consecutive windows of at most `chunk` elements (none when empty).
fn windows(len: usize, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    (0..len).step_by(chunk).map(move |s| s..(s + chunk).min(len))
}

fn shift(r: Range<usize>, by: usize) -> Range<usize> {
    r.start + by..r.end + by
}

fn offset_ptrs<T>(views: &[*mut T; MAX_RANKS], n: usize, offset: usize) -> [*const T; MAX_RANKS] {
    let mut ptrs = [std::ptr::null(); MAX_RANKS];
    for (p, v) in ptrs.iter_mut().zip(views).take(n) {
        *p = v.wrapping_add(offset).cast_const();
    }
    ptrs
}
