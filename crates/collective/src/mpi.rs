//! The MPI backend (feature `mpi`): Open MPI or MPICH through the `mpi` crate's raw
//! bindings, for jobs that outgrow one host (`mpirun -np N` / `srun`).
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED` (the communicator's lock serialises
//! the calls, also those of the non-blocking worker) and finalised when the last
//! communicator is dropped. `MPI_IN_PLACE` is not portable through the bindings, so
//! reductions send from a scratch copy kept between calls. 16-bit floats travel as `f32`
//! (accumulated in f32, as the other backends do). Each call starts with one all-reduce
//! of a fixed-size packet whose user-defined operation compares the ranks' fingerprints,
//! so mismatched calls (another collective, another length, another root) fail with the
//! same error as on shm before any data moves; an all-reduce's first 256 bytes ride in
//! that packet, so a small all-reduce costs one round trip, check included. A rank that dies
//! makes `mpirun` abort the job. A rank that hangs (stopped, deadlocked, livelocked) is
//! caught by the [`watchdog`]: a call that has not completed within the timeout
//! (`DISTOPTIM_TIMEOUT_S`, 600 s by default) prints the stuck call and this rank's last
//! collectives (a flight recorder, as PyTorch's NCCL watchdog does) and ends the process,
//! so `mpirun` stops the whole job instead of leaving it waiting forever.

use crate::comm::{Backend, Communicator, Engine};
use crate::config::CommConfig;
use crate::element::{Dtype, Element, ReduceOp};
use crate::error::{CommError, Result};
use crate::fingerprint::{Fingerprint, OpKind, WORDS};
use crate::partition::shard_range;
use crate::shared::buffer::{SharedAlloc, SharedBuf};
use crate::shared::memory::{HeapMemory, Memory};
use mpi::ffi;
use std::os::raw::{c_int, c_void};
use std::sync::{Arc, Mutex};

/// Keeps MPI initialised while any communicator lives.
struct Universe(#[allow(dead_code)] mpi::environment::Universe);
// SAFETY: MPI runs in SERIALIZED mode and every call goes through a communicator's lock.
unsafe impl Send for Universe {}
// SAFETY: as for Send: no MPI call is made through a shared reference without the lock.
unsafe impl Sync for Universe {}

static INITIALISED: Mutex<bool> = Mutex::new(false);

pub(crate) struct MpiEngine {
    comm: ffi::MPI_Comm,
    owned: bool,
    rank: usize,
    size: usize,
    seq: u64,
    scratch: Vec<u64>,
    wide: Vec<f32>,
    poisoned: Option<String>,
    /// The world communicator's shared-memory + MPI path for all-reduce (see [`Hierarchy`]).
    hierarchy: Option<Box<Hierarchy>>,
    _universe: Arc<Universe>,
}

impl Hierarchy {
    /// The two-level all-reduce. Every host has L ranks, so the AVG of the hosts' AVGs is
    /// the world's AVG.
    fn all_reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.local.reduce_scatter(buf, op)?;
        let piece = shard_range(buf.len(), self.local.size(), self.local.rank());
        if self.cross.size > 1 {
            self.cross.all_reduce(&mut buf[piece], op)?;
        }
        self.local.all_gather(buf)
    }

    /// World rank h·L + l's shard, padded to `m` elements, sits at block `l·H + h` of a
    /// buffer of L·H·m: local rank l's piece of it is then every host's copy of the
    /// shards with local rank l, and cross rank h's piece of that is its own shard.
    fn blocks<T: Element>(&self, buf: &[T], fill: impl Fn(usize) -> bool) -> (Vec<T>, usize) {
        let (l_size, h_size) = (self.local.size(), self.cross.size);
        let w = l_size * h_size;
        let m = buf.len().div_ceil(w);
        let mut tmp = vec![T::default(); w * m];
        for h in 0..h_size {
            for l in 0..l_size {
                if fill(h * l_size + l) {
                    let s = shard_range(buf.len(), w, h * l_size + l);
                    let at = (l * h_size + h) * m;
                    tmp[at..at + s.len()].copy_from_slice(&buf[s]);
                }
            }
        }
        (tmp, m)
    }

    /// The two-level reduce-scatter: a shm reduce-scatter of the blocks by local rank
    /// (each local rank then holds its column of blocks reduced over the host), then an
    /// MPI reduce-scatter of that column across hosts, which leaves each rank its own
    /// shard reduced over the world. Each host sends S·(H−1)/H over the network.
    fn reduce_scatter<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let (l, h, h_size) = (self.local.rank(), self.cross.rank, self.cross.size);
        let (mut tmp, m) = self.blocks(buf, |_| true);
        self.local.reduce_scatter(&mut tmp, op)?;
        if h_size > 1 {
            self.cross.reduce_scatter(&mut tmp[l * h_size * m..(l + 1) * h_size * m], op)?;
        }
        let mine = shard_range(buf.len(), self.local.size() * h_size, h * self.local.size() + l);
        let at = (l * h_size + h) * m;
        let len = mine.len();
        buf[mine].copy_from_slice(&tmp[at..at + len]);
        Ok(())
    }

    /// The two-level broadcast from world rank `root` = h0·L + l0: across hosts among the
    /// ranks with local rank l0, then within every host from its local rank l0, so the
    /// data crosses the network once per host.
    fn broadcast<T: Element>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        let l_size = self.local.size();
        let (h0, l0) = (root / l_size, root % l_size);
        if self.local.rank() == l0 && self.cross.size > 1 {
            self.cross.broadcast(buf, h0)?;
        }
        self.local.broadcast(buf, l0)
    }

    /// The two-level all-gather, the reduce-scatter's steps reversed: an MPI all-gather of
    /// this local rank's column across hosts, then a shm all-gather of the columns.
    fn all_gather<T: Element>(&mut self, buf: &mut [T], me: usize) -> Result<()> {
        let (l, h_size, l_size) = (self.local.rank(), self.cross.size, self.local.size());
        let (mut tmp, m) = self.blocks(buf, |r| r == me);
        if h_size > 1 {
            self.cross.all_gather(&mut tmp[l * h_size * m..(l + 1) * h_size * m])?;
        }
        self.local.all_gather(&mut tmp)?;
        let w = l_size * h_size;
        for h in 0..h_size {
            for l in 0..l_size {
                let s = shard_range(buf.len(), w, h * l_size + l);
                let at = (l * h_size + h) * m;
                let len = s.len();
                buf[s].copy_from_slice(&tmp[at..at + len]);
            }
        }
        Ok(())
    }
}

/// Collectives in two levels when a host runs several ranks (`L` per host, host-major
/// ranks). All-reduce: a reduce-scatter among the host's ranks through the shm engine,
/// an MPI all-reduce of each 1/L piece among the ranks with the same local rank (one per
/// host), and an all-gather through shm; each host then sends 2·S·(H−1)/H over the
/// network, and the ranks of a host meet in shared memory, not in MPI's own path.
/// Reduce-scatter and all-gather compose the same way over a block layout that puts
/// each rank's shard where both levels' even pieces meet it (see [`Hierarchy::blocks`]);
/// broadcast goes across hosts once, then within each host.
struct Hierarchy {
    /// This host's ranks, over /dev/shm.
    local: Communicator,
    /// The ranks with this rank's local rank, one per host.
    cross: MpiEngine,
}

// SAFETY: see Universe.
unsafe impl Send for MpiEngine {}

/// The world communicator of an `mpirun`/`srun` job.
pub(crate) fn world(config: &CommConfig) -> Result<Communicator> {
    let mut done = INITIALISED.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Err(CommError::Backend { backend: "mpi", message: "MPI was already initialised in this process".into() });
    }
    let (universe, level) = mpi::initialize_with_threading(mpi::Threading::Serialized)
        .ok_or_else(|| CommError::Backend { backend: "mpi", message: "MPI_Init_thread failed or MPI was initialised elsewhere".into() })?;
    if level < mpi::Threading::Serialized {
        return Err(CommError::Backend { backend: "mpi", message: format!("the MPI library only offers {level:?} threading") });
    }
    *done = true;
    // SAFETY: MPI is initialised; the world communicator is a constant.
    let comm = unsafe { ffi::RSMPI_COMM_WORLD };
    let mut engine = MpiEngine::new(comm, false, Arc::new(Universe(universe)))?;
    watchdog::start(engine.rank, config.timeout);
    engine.enable_hierarchy(config)?;
    Ok(Communicator::from_engine(Engine::Mpi(engine), Backend::Mpi))
}

fn check(rc: c_int, what: &str) -> Result<()> {
    // SAFETY: reading a constant.
    if rc == ffi::MPI_SUCCESS as c_int {
        Ok(())
    } else {
        Err(CommError::Backend { backend: "mpi", message: format!("{what} failed with MPI error code {rc}") })
    }
}

fn count(n: usize, what: &'static str) -> Result<c_int> {
    c_int::try_from(n).map_err(|_| CommError::invalid(what, format!("{n} elements exceed MPI's int counts")))
}

/// The MPI type and element count a buffer of `T` travels as when nothing is reduced.
fn raw_bytes<T>(len: usize) -> (ffi::MPI_Datatype, usize) {
    // SAFETY: reading a constant.
    (unsafe { ffi::RSMPI_UINT8_T }, len * std::mem::size_of::<T>())
}

fn datatype(d: Dtype) -> ffi::MPI_Datatype {
    // SAFETY: reading constants.
    unsafe {
        match d {
            Dtype::F32 | Dtype::Bf16 | Dtype::F16 => ffi::RSMPI_FLOAT,
            Dtype::F64 => ffi::RSMPI_DOUBLE,
            Dtype::I32 => ffi::RSMPI_INT32_T,
            Dtype::I64 => ffi::RSMPI_INT64_T,
            Dtype::U8 => ffi::RSMPI_UINT8_T,
        }
    }
}

fn mpi_op(op: ReduceOp) -> ffi::MPI_Op {
    // SAFETY: reading constants.
    unsafe {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => ffi::RSMPI_SUM,
            ReduceOp::Max => ffi::RSMPI_MAX,
            ReduceOp::Min => ffi::RSMPI_MIN,
            ReduceOp::Prod => ffi::RSMPI_PROD,
        }
    }
}

impl MpiEngine {
    fn new(comm: ffi::MPI_Comm, owned: bool, universe: Arc<Universe>) -> Result<MpiEngine> {
        let (mut rank, mut size) = (0, 0);
        // SAFETY: valid communicator, out-pointers to locals.
        unsafe {
            check(ffi::MPI_Comm_rank(comm, &mut rank), "MPI_Comm_rank")?;
            check(ffi::MPI_Comm_size(comm, &mut size), "MPI_Comm_size")?;
        }
        Ok(MpiEngine {
            comm,
            owned,
            rank: rank as usize,
            size: size as usize,
            seq: 0,
            scratch: Vec::new(),
            wide: Vec::new(),
            poisoned: None,
            hierarchy: None,
            _universe: universe,
        })
    }

    /// Sets up [`Hierarchy`] on the world communicator when every host runs the same
    /// number L > 1 of ranks, numbered host by host (mpirun's default mapping); otherwise
    /// (or with `DISTOPTIM_MPI_HIERARCHY=0`) every call stays flat MPI. Collective over
    /// the world.
    fn enable_hierarchy(&mut self, config: &CommConfig) -> Result<()> {
        let wanted = std::env::var("DISTOPTIM_MPI_HIERARCHY").map_or(true, |v| v.trim() != "0");
        // SAFETY: reading constants.
        let (shared, info_null, comm_null) = unsafe { (ffi::RSMPI_COMM_TYPE_SHARED, ffi::RSMPI_INFO_NULL, ffi::RSMPI_COMM_NULL) };
        let mut node = comm_null;
        // SAFETY: a live communicator and an out-pointer to a local.
        check(unsafe { ffi::MPI_Comm_split_type(self.comm, shared, self.rank as c_int, info_null, &mut node) }, "MPI_Comm_split_type")?;
        let mut node = MpiEngine::new(node, true, self._universe.clone())?;
        let (l, local_size) = (node.rank, node.size);
        // Regular: the same L everywhere and this host's ranks are rank - l .. rank - l + L.
        let mut first = vec![0i64; local_size];
        first[l] = self.rank as i64 - l as i64;
        node.all_gather(&mut first)?;
        let contiguous = first.iter().all(|&f| f == self.rank as i64 - l as i64);
        let mut shape = [local_size as i64, -(local_size as i64), i64::from(contiguous), i64::from(wanted)];
        self.all_reduce(&mut shape, ReduceOp::Min)?;
        let regular = shape[0] == -shape[1] && shape[2] == 1 && self.size.is_multiple_of(local_size);
        if !regular || shape[3] == 0 || local_size < 2 {
            return Ok(());
        }
        // One job id for every host's shm group, from rank 0.
        let mut job = [0i64; 1];
        if self.rank == 0 {
            // A per-process random key (std seeds RandomState from the OS) and the pid.
            use std::hash::{BuildHasher, Hasher};
            job[0] = std::collections::hash_map::RandomState::new().build_hasher().finish() as i64 ^ i64::from(std::process::id());
        }
        self.broadcast(&mut job, 0)?;
        let host = self.rank / local_size;
        let local =
            Communicator::shm(&format!("mpi{:016x}h{host}", job[0] as u64), &format!("{:016x}", job[0] as u64), l, local_size, config)?;
        let cross = self
            .split(Some(l as u32), self.rank as i64)?
            .ok_or_else(|| CommError::Backend { backend: "mpi", message: "the split by local rank left this rank out".into() })?;
        self.hierarchy = Some(Box::new(Hierarchy { local, cross }));
        Ok(())
    }

    /// How this communicator reduces: `hierarchical (H hosts x L ranks)` or `flat`.
    pub(crate) fn describe(&self) -> String {
        match &self.hierarchy {
            Some(h) => format!("hierarchical ({} hosts x {} ranks: shm within a host, MPI across)", h.cross.size, h.local.size()),
            None => "flat".into(),
        }
    }

    pub(crate) fn rank(&self) -> usize {
        self.rank
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// The watchdog's limit, for every MPI communicator of the process.
    pub(crate) fn set_timeout(&mut self, timeout: std::time::Duration) {
        watchdog::set_timeout(timeout);
    }

    /// Numbers the call, shows it to the watchdog until the returned guard drops, and
    /// checks that every rank makes the same one.
    fn begin(&mut self, kind: OpKind, dtype: Option<Dtype>, count: usize, root: usize) -> Result<watchdog::InFlight> {
        self.begin_inline(kind, dtype, count, root, &[]).map(|(call, _)| call)
    }

    /// [`begin`](Self::begin), carrying `inline` (at most [`INLINE`] bytes: the start of an
    /// all-reduce's data, or a whole small broadcast, all-gather or reduce-scatter) in the
    /// same message: one MPI_Allreduce of a [`Packet`] whose
    /// operation compares the ranks' fingerprints and, when they agree, reduces the
    /// inline data. A small all-reduce then costs one round trip, check included. Every
    /// call of every kind starts with this same fixed-size collective, so a rank making
    /// another call, or the same call with another length, is caught here before any
    /// other data moves. Returns the reduced inline bytes.
    fn begin_inline(
        &mut self,
        kind: OpKind,
        dtype: Option<Dtype>,
        count: usize,
        root: usize,
        inline: &[u8],
    ) -> Result<(watchdog::InFlight, Box<Packet>)> {
        if let Some(reason) = &self.poisoned {
            return Err(CommError::Poisoned(reason.clone()));
        }
        self.seq += 1;
        let fp = Fingerprint { seq: self.seq, kind, dtype, count: count as u64, root: root as u64 };
        let call = watchdog::InFlight::begin(fp);
        let mut send = Packet::new(fp, self.rank, inline);
        let mut recv = Packet::new(fp, self.rank, &[]);
        let (ty, op) = packet_type_and_op()?;
        // SAFETY: both packets are one element of the committed packet type; the user
        // operation reads and writes only packets.
        let rc = unsafe {
            ffi::MPI_Allreduce(&mut *send as *mut Packet as *const c_void, &mut *recv as *mut Packet as *mut c_void, 1, ty, op, self.comm)
        };
        check(rc, "MPI_Allreduce (fingerprint check)")?;
        if recv.mismatch != 0 {
            let first = Fingerprint::from_words(recv.first);
            let second = Fingerprint::from_words(recv.second);
            // Name the side that is not this rank's call.
            let (peer, theirs) = match first {
                Some(f) if f.agrees(&fp) => (recv.second_rank, second),
                _ => (recv.first_rank, first),
            };
            let theirs = theirs.unwrap_or(Fingerprint { seq: 0, kind: OpKind::Barrier, dtype: None, count: 0, root: 0 });
            let err = CommError::Mismatch { rank: self.rank, mine: fp, peer: peer as usize, theirs };
            self.poisoned = Some(err.to_string());
            return Err(err);
        }
        Ok((call, recv))
    }

    /// Copies `buf` into the scratch area (as f32 for 16-bit floats) and returns the
    /// send pointer, the MPI type and whether the result comes back through `wide`.
    fn stage<T: Element>(&mut self, buf: &[T]) -> (*const c_void, ffi::MPI_Datatype, bool) {
        let dtype = T::DTYPE;
        if matches!(dtype, Dtype::Bf16 | Dtype::F16) {
            self.wide.clear();
            self.wide.extend(buf.iter().map(|x| to_f32(*x)));
            self.wide.extend(std::iter::repeat_n(0.0, buf.len()));
            (self.wide.as_ptr() as *const c_void, datatype(dtype), true)
        } else {
            (self.stage_bytes(buf), datatype(dtype), false)
        }
    }

    /// Copies `buf` as it is into the scratch area.
    fn stage_bytes<T: Element>(&mut self, buf: &[T]) -> *const c_void {
        let bytes = std::mem::size_of_val(buf);
        // Never empty: an empty Vec's dangling pointer could read as MPI_IN_PLACE.
        self.scratch.resize(bytes.div_ceil(8).max(1), 0);
        // SAFETY: scratch holds at least `bytes` bytes.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr() as *const u8, self.scratch.as_mut_ptr() as *mut u8, bytes) };
        self.scratch.as_ptr() as *const c_void
    }

    /// Where a reduction writes `len` results that belong at `buf[at..]`.
    fn result_ptr<T>(&mut self, buf: &mut [T], at: usize, wide: bool) -> *mut c_void {
        if wide {
            let half = self.wide.len() / 2;
            self.wide[half + at..].as_mut_ptr() as *mut c_void
        } else {
            buf[at..].as_mut_ptr() as *mut c_void
        }
    }

    /// Finishes a reduction's `range` of `buf`: back from f32 and AVG's division.
    fn finish<T: Element>(&self, buf: &mut [T], range: std::ops::Range<usize>, wide: bool, op: ReduceOp) {
        let n = self.size as f64;
        if wide {
            let half = self.wide.len() / 2;
            for i in range {
                let v = self.wide[half + i];
                buf[i] = from_f32(if op == ReduceOp::Avg { (f64::from(v) / n) as f32 } else { v });
            }
        } else if op == ReduceOp::Avg {
            for x in &mut buf[range] {
                *x = T::from_acc(crate::element::finish(x.to_acc(), op, self.size));
            }
        }
    }

    pub(crate) fn all_reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        if buf.is_empty() || (self.hierarchy.is_some() && !fits_inline::<T>(buf.len())) {
            let _call = self.begin(OpKind::AllReduce(op), Some(T::DTYPE), buf.len(), 0)?;
            return self.all_reduce_checked(buf, op);
        }
        self.all_reduce_flat(buf, op)
    }

    /// The all-reduce after its check: nothing for an empty buffer, else the hierarchy.
    fn all_reduce_checked<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        if buf.is_empty() {
            // Nothing to move (and an empty slice's pointer could read as MPI_IN_PLACE).
            return Ok(());
        }
        if let Some(h) = &mut self.hierarchy {
            if matches!(T::DTYPE, Dtype::Bf16 | Dtype::F16) {
                // Summed in f32 and rounded once, as on every backend: a 16-bit partial
                // sum per host would round before the hosts' values cancel.
                let mut wide: Vec<f32> = buf.iter().map(|x| to_f32(*x)).collect();
                h.all_reduce(&mut wide, op)?;
                buf.iter_mut().zip(&wide).for_each(|(b, &w)| *b = from_f32(w));
            } else {
                h.all_reduce(buf, op)?;
            }
        }
        Ok(())
    }

    /// The flat all-reduce, its check carrying the first [`INLINE`] bytes.
    fn all_reduce_flat<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let len = buf.len();
        let n = count(len, "all_reduce")?;
        let (send, dt, wide) = self.stage(buf);
        let recv = self.result_ptr(buf, 0, wide);
        // The first INLINE bytes travel with the fingerprint check; the rest, if any, after.
        let width = if wide { 4 } else { std::mem::size_of::<T>() };
        let head = len.min(INLINE / width);
        // SAFETY: send holds len elements of `width` bytes (the staged copy).
        let inline = unsafe { std::slice::from_raw_parts(send as *const u8, head * width) };
        let (_call, packet) = self.begin_inline(OpKind::AllReduce(op), Some(T::DTYPE), len, 0, inline)?;
        // SAFETY: recv has room for len elements of `width` bytes; the packet's payload
        // holds head of them; the regions do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(packet.payload.as_ptr() as *const u8, recv as *mut u8, head * width) };
        if head < len {
            let (rest_send, rest_recv) = (send as *const u8 as usize + head * width, recv as *mut u8 as usize + head * width);
            // SAFETY: send and recv hold len elements of dt and do not overlap; both
            // offsets stay inside them.
            let rc = unsafe {
                ffi::MPI_Allreduce(rest_send as *const c_void, rest_recv as *mut c_void, n - head as c_int, dt, mpi_op(op), self.comm)
            };
            check(rc, "MPI_Allreduce")?;
        }
        self.finish(buf, 0..len, wide, op);
        Ok(())
    }

    pub(crate) fn reduce_scatter<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        if !buf.is_empty() && fits_inline::<T>(buf.len()) {
            // Small: the whole buffer is reduced inside the check; this rank keeps its part.
            let len = buf.len();
            let (send, _, wide) = self.stage(buf);
            let width = if wide { 4 } else { std::mem::size_of::<T>() };
            // SAFETY: send holds len staged elements of `width` bytes.
            let inline = unsafe { std::slice::from_raw_parts(send as *const u8, len * width) };
            let (_call, packet) = self.begin_inline(OpKind::ReduceScatter(op), Some(T::DTYPE), len, 0, inline)?;
            let mine = shard_range(len, self.size, self.rank);
            let recv = self.result_ptr(buf, mine.start, wide);
            // SAFETY: the payload holds len reduced elements of `width` bytes; recv has
            // room for this rank's part; the regions do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (packet.payload.as_ptr() as *const u8).add(mine.start * width),
                    recv as *mut u8,
                    mine.len() * width,
                )
            };
            self.finish(buf, mine, wide, op);
            return Ok(());
        }
        let _call = self.begin(OpKind::ReduceScatter(op), Some(T::DTYPE), buf.len(), 0)?;
        if buf.is_empty() {
            // Nothing to move (and an empty slice's pointer could read as MPI_IN_PLACE).
            return Ok(());
        }
        if let Some(h) = &mut self.hierarchy {
            if matches!(T::DTYPE, Dtype::Bf16 | Dtype::F16) {
                // In f32, rounded once (see all_reduce).
                let mut wide: Vec<f32> = buf.iter().map(|x| to_f32(*x)).collect();
                h.reduce_scatter(&mut wide, op)?;
                let mine = shard_range(buf.len(), self.size, self.rank);
                buf[mine.clone()].iter_mut().zip(&wide[mine]).for_each(|(b, &w)| *b = from_f32(w));
            } else {
                h.reduce_scatter(buf, op)?;
            }
            return Ok(());
        }
        let len = buf.len();
        count(len, "reduce_scatter")?;
        let counts: Vec<c_int> = (0..self.size).map(|r| shard_range(len, self.size, r).len() as c_int).collect();
        let mine = shard_range(len, self.size, self.rank);
        let (send, dt, wide) = self.stage(buf);
        let recv = self.result_ptr(buf, mine.start, wide);
        // SAFETY: send holds len elements; recv has room for this rank's count.
        check(unsafe { ffi::MPI_Reduce_scatter(send, recv, counts.as_ptr(), dt, mpi_op(op), self.comm) }, "MPI_Reduce_scatter")?;
        self.finish(buf, mine, wide, op);
        Ok(())
    }

    pub(crate) fn reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.check_root("reduce", root)?;
        let _call = self.begin(OpKind::Reduce(op), Some(T::DTYPE), buf.len(), root)?;
        if buf.is_empty() {
            // Nothing to move (and an empty slice's pointer could read as MPI_IN_PLACE).
            return Ok(());
        }
        let len = buf.len();
        let n = count(len, "reduce")?;
        let (send, dt, wide) = self.stage(buf);
        let recv = self.result_ptr(buf, 0, wide);
        // SAFETY: as in all_reduce; recv is only written on the root.
        check(unsafe { ffi::MPI_Reduce(send, recv, n, dt, mpi_op(op), root as c_int, self.comm) }, "MPI_Reduce")?;
        if self.rank == root {
            self.finish(buf, 0..len, wide, op);
        }
        Ok(())
    }

    pub(crate) fn all_gather<T: Element>(&mut self, buf: &mut [T]) -> Result<()> {
        if !buf.is_empty() && std::mem::size_of_val(buf) <= INLINE {
            // Small: every rank's piece rides in the check, at its place, zeros elsewhere.
            let mine = shard_range(buf.len(), self.size, self.rank);
            let size = std::mem::size_of::<T>();
            let mut inline = [0u8; INLINE];
            // SAFETY: buf holds its elements' bytes; the view covers exactly them.
            let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, std::mem::size_of_val(buf)) };
            inline[mine.start * size..mine.end * size].copy_from_slice(&bytes[mine.start * size..mine.end * size]);
            let (_call, packet) = self.begin_inline(OpKind::AllGather, Some(T::DTYPE), buf.len(), 0, &inline[..bytes.len()])?;
            // SAFETY: the payload holds the whole buffer's bytes; buf has room for them.
            unsafe { std::ptr::copy_nonoverlapping(packet.payload.as_ptr() as *const u8, buf.as_mut_ptr() as *mut u8, bytes.len()) };
            return Ok(());
        }
        let _call = self.begin(OpKind::AllGather, Some(T::DTYPE), buf.len(), 0)?;
        if buf.is_empty() {
            // Nothing to move (and an empty slice's pointer could read as MPI_IN_PLACE).
            return Ok(());
        }
        // On one host MPI's own all-gather beats the block copies (measured: 16 MiB in
        // 6.2 ms flat, 11.3 ms in two levels); across hosts the two levels send half the
        // bytes over the network.
        if let Some(h) = self.hierarchy.as_mut().filter(|h| h.cross.size > 1) {
            return h.all_gather(buf, self.rank);
        }
        let len = buf.len();
        let (dt, _) = raw_bytes::<T>(0);
        let size = std::mem::size_of::<T>();
        let mut counts = Vec::with_capacity(self.size);
        let mut displs = Vec::with_capacity(self.size);
        for r in 0..self.size {
            let s = shard_range(len, self.size, r);
            counts.push(count(s.len() * size, "all_gather")?);
            displs.push(count(s.start * size, "all_gather")?);
        }
        let mine = shard_range(len, self.size, self.rank);
        let send = self.stage_bytes(&buf[mine.clone()]);
        // SAFETY: send holds this rank's shard; recv holds len elements laid out by displs.
        let rc = unsafe {
            ffi::MPI_Allgatherv(
                send,
                counts[self.rank],
                dt,
                buf.as_mut_ptr() as *mut c_void,
                counts.as_ptr(),
                displs.as_ptr(),
                dt,
                self.comm,
            )
        };
        check(rc, "MPI_Allgatherv")
    }

    /// `MPI_Alltoallv` in bytes, after an `MPI_Allgather` of every rank's counts so that
    /// every rank checks the same matrix (MPI itself does not check that they pair up).
    pub(crate) fn all_to_all<T: Element>(
        &mut self,
        send: &[T],
        send_counts: &[usize],
        recv: &mut [T],
        recv_counts: &[usize],
    ) -> Result<()> {
        let n = self.size;
        let _call = self.begin(OpKind::AllToAll, Some(T::DTYPE), n, 0)?;
        let mine: Vec<u64> = send_counts.iter().chain(recv_counts).map(|&c| c as u64).collect();
        let mut all = vec![0u64; 2 * n * n];
        let (dt, _) = raw_bytes::<u8>(0);
        let row = count(2 * n * 8, "all_to_all")?;
        // SAFETY: `mine` holds 2n u64 (row bytes), `all` n rows of them.
        let rc =
            unsafe { ffi::MPI_Allgather(mine.as_ptr() as *const c_void, row, dt, all.as_mut_ptr() as *mut c_void, row, dt, self.comm) };
        check(rc, "MPI_Allgather (all_to_all counts)")?;
        let rows: Vec<&[u64]> = all.chunks_exact(2 * n).collect();
        let sends: Vec<Vec<usize>> = rows.iter().map(|r| r[..n].iter().map(|&c| c as usize).collect()).collect();
        let recvs: Vec<Vec<usize>> = rows.iter().map(|r| r[n..].iter().map(|&c| c as usize).collect()).collect();
        CommError::check_counts(&sends, &recvs)?;
        let size = std::mem::size_of::<T>();
        let bytes = |counts: &[usize]| -> Result<(Vec<c_int>, Vec<c_int>)> {
            let (mut lens, mut starts, mut at) = (Vec::with_capacity(n), Vec::with_capacity(n), 0usize);
            for &c in counts {
                lens.push(count(c * size, "all_to_all")?);
                starts.push(count(at * size, "all_to_all")?);
                at += c;
            }
            Ok((lens, starts))
        };
        let ((send_lens, send_starts), (recv_lens, recv_starts)) = (bytes(send_counts)?, bytes(recv_counts)?);
        // Never an empty slice's dangling pointer: it could read as MPI_IN_PLACE.
        let (spare_send, mut spare_recv) = ([0u8; 1], [0u8; 1]);
        let send_ptr = if send.is_empty() { spare_send.as_ptr() } else { send.as_ptr() as *const u8 };
        let recv_ptr = if recv.is_empty() { spare_recv.as_mut_ptr() } else { recv.as_mut_ptr() as *mut u8 };
        // SAFETY: the counts and displacements lie within `send` and `recv` (their sums
        // are the buffers' lengths, checked by the communicator), or are zero.
        let rc = unsafe {
            ffi::MPI_Alltoallv(
                send_ptr as *const c_void,
                send_lens.as_ptr(),
                send_starts.as_ptr(),
                dt,
                recv_ptr as *mut c_void,
                recv_lens.as_ptr(),
                recv_starts.as_ptr(),
                dt,
                self.comm,
            )
        };
        check(rc, "MPI_Alltoallv")
    }

    pub(crate) fn broadcast<T: Element>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_root("broadcast", root)?;
        if !buf.is_empty() && std::mem::size_of_val(buf) <= INLINE {
            // Small: the root's bytes ride in the check (the others send zeros).
            let bytes = std::mem::size_of_val(buf);
            // SAFETY: buf holds `bytes` bytes.
            let mine = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, bytes) };
            let zeros = [0u8; INLINE];
            let inline = if self.rank == root { mine } else { &zeros[..bytes] };
            let (_call, packet) = self.begin_inline(OpKind::Broadcast, Some(T::DTYPE), buf.len(), root, inline)?;
            // SAFETY: the payload holds the root's `bytes` bytes; buf has room for them.
            unsafe { std::ptr::copy_nonoverlapping(packet.payload.as_ptr() as *const u8, buf.as_mut_ptr() as *mut u8, bytes) };
            return Ok(());
        }
        let _call = self.begin(OpKind::Broadcast, Some(T::DTYPE), buf.len(), root)?;
        if buf.is_empty() {
            // Nothing to move (and an empty slice's pointer could read as MPI_IN_PLACE).
            return Ok(());
        }
        // Across hosts only, as all-gather (one host's MPI path is already direct).
        if let Some(h) = self.hierarchy.as_mut().filter(|h| h.cross.size > 1) {
            return h.broadcast(buf, root);
        }
        let (dt, bytes) = raw_bytes::<T>(buf.len());
        let n = count(bytes, "broadcast")?;
        // SAFETY: buf holds `bytes` bytes.
        check(unsafe { ffi::MPI_Bcast(buf.as_mut_ptr() as *mut c_void, n, dt, root as c_int, self.comm) }, "MPI_Bcast")
    }

    pub(crate) fn barrier(&mut self) -> Result<()> {
        // The check is an all-reduce, which no rank leaves before every rank has entered
        // it: a barrier already.
        self.begin(OpKind::Barrier, None, 0, 0).map(|_| ())
    }

    fn check_root(&self, op: &'static str, root: usize) -> Result<()> {
        if root >= self.size {
            return Err(CommError::invalid(op, format!("root {root} is outside a group of {}", self.size)));
        }
        Ok(())
    }

    /// Buffers are ordinary memory under MPI (nothing to share in place).
    pub(crate) fn alloc<T: Element>(&mut self, len: usize) -> Result<SharedBuf<T>> {
        let _call = self.begin(OpKind::Alloc, Some(T::DTYPE), len, 0)?;
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| CommError::invalid("alloc", "size overflows"))?;
        let region = HeapMemory::default().create("mpi", bytes, &|_| {})?;
        Ok(SharedBuf::new(Arc::new(SharedAlloc { id: 0, rank: 0, regions: vec![region] }), len))
    }

    pub(crate) fn split(&mut self, color: Option<u32>, key: i64) -> Result<Option<MpiEngine>> {
        let _call = self.begin(OpKind::Split, None, 0, 0)?;
        let key = c_int::try_from(key).map_err(|_| CommError::invalid("split", format!("key {key} does not fit MPI's int")))?;
        let color = match color {
            // SAFETY: reading a constant.
            None => unsafe { ffi::RSMPI_UNDEFINED },
            Some(c) => c_int::try_from(c).map_err(|_| CommError::invalid("split", format!("color {c} does not fit MPI's int")))?,
        };
        // SAFETY: reading a constant.
        let mut new = unsafe { ffi::RSMPI_COMM_NULL };
        // SAFETY: a live communicator, and an out-pointer to a local.
        check(unsafe { ffi::MPI_Comm_split(self.comm, color, key, &mut new) }, "MPI_Comm_split")?;
        // SAFETY: reading a constant.
        if color == unsafe { ffi::RSMPI_UNDEFINED } {
            return Ok(None);
        }
        MpiEngine::new(new, true, self._universe.clone()).map(Some)
    }
}

impl Drop for MpiEngine {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: a communicator this engine created; MPI is still initialised (the
            // universe field drops after this body).
            unsafe { ffi::MPI_Comm_free(&mut self.comm) };
        }
    }
}

/// Bytes of data carried inside a call's fingerprint check: an all-reduce's first ones,
/// or the whole of a broadcast, all-gather or reduce-scatter that fits (then the call is
/// one round trip, check included).
const INLINE: usize = 256;

/// Whether a reduction of `len` elements of `T` fits the check's payload (16-bit floats
/// travel as f32).
fn fits_inline<T: Element>(len: usize) -> bool {
    let width = if matches!(T::DTYPE, Dtype::Bf16 | Dtype::F16) { 4 } else { std::mem::size_of::<T>() };
    len.saturating_mul(width) <= INLINE
}

/// The message of every call's check (see [`MpiEngine::begin_inline`]): the sender's
/// fingerprint, the first disagreement seen (both sides), and inline data.
#[repr(C)]
pub(crate) struct Packet {
    words: [u64; WORDS],
    rank: u64,
    mismatch: u64,
    first_rank: u64,
    first: [u64; WORDS],
    second_rank: u64,
    second: [u64; WORDS],
    /// The inline data, 8-byte aligned for any element type.
    payload: [u64; INLINE / 8],
}

impl Packet {
    fn new(fp: Fingerprint, rank: usize, inline: &[u8]) -> Box<Packet> {
        let mut p = Box::new(Packet {
            words: fp.to_words(),
            rank: rank as u64,
            mismatch: 0,
            first_rank: 0,
            first: [0; WORDS],
            second_rank: 0,
            second: [0; WORDS],
            payload: [0; INLINE / 8],
        });
        let n = inline.len().min(INLINE);
        // SAFETY: the payload holds INLINE bytes; n <= INLINE; the regions do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(inline.as_ptr(), p.payload.as_mut_ptr() as *mut u8, n) };
        p
    }

    /// Folds `a` into `self` (MPI's inout side): a disagreement is recorded once and
    /// travels on; agreeing reductions combine their inline data, broadcasts and
    /// all-gathers OR it (each byte is one rank's, the others' are zero).
    fn combine(&mut self, a: &Packet) {
        if self.mismatch != 0 {
            return;
        }
        if a.mismatch != 0 {
            (self.mismatch, self.first_rank, self.first, self.second_rank, self.second) =
                (1, a.first_rank, a.first, a.second_rank, a.second);
            return;
        }
        let agree = match (Fingerprint::from_words(self.words), Fingerprint::from_words(a.words)) {
            (Some(x), Some(y)) => x.agrees(&y),
            _ => false,
        };
        if !agree {
            (self.mismatch, self.first_rank, self.first, self.second_rank, self.second) = (1, self.rank, self.words, a.rank, a.words);
            return;
        }
        let Some(fp) = Fingerprint::from_words(self.words) else { return };
        if matches!(fp.kind, OpKind::Broadcast | OpKind::AllGather) {
            // Each byte comes from one rank (the root's, or the one whose piece it is);
            // every other rank sends zeros there.
            self.payload.iter_mut().zip(&a.payload).for_each(|(m, t)| *m |= t);
            return;
        }
        let (OpKind::AllReduce(op) | OpKind::ReduceScatter(op), Some(dtype)) = (fp.kind, fp.dtype) else { return };
        let bytes = self.payload.as_mut_ptr() as *mut u8;
        let theirs = a.payload.as_ptr() as *const u8;
        // SAFETY: both payloads are INLINE bytes, 8-byte aligned; each view below covers
        // at most that many bytes of its element type.
        unsafe {
            match dtype {
                Dtype::F32 | Dtype::Bf16 | Dtype::F16 => fold::<f32>(bytes, theirs, fp.count, op),
                Dtype::F64 => fold::<f64>(bytes, theirs, fp.count, op),
                Dtype::I32 => fold::<i32>(bytes, theirs, fp.count, op),
                Dtype::I64 => fold::<i64>(bytes, theirs, fp.count, op),
                Dtype::U8 => fold::<u8>(bytes, theirs, fp.count, op),
            }
        }
    }
}

/// `mine[i] = op(theirs[i], mine[i])` over the inline elements of an all-reduce of
/// `count` elements of `T` (AVG sums; the caller divides).
///
/// # Safety
/// Both pointers address INLINE bytes aligned for `T`.
unsafe fn fold<T: Element>(mine: *mut u8, theirs: *const u8, count: u64, op: ReduceOp) {
    let n = (count as usize).min(INLINE / std::mem::size_of::<T>());
    // SAFETY: the caller's promise: n elements of T fit in INLINE aligned bytes.
    let (mine, theirs) = unsafe { (std::slice::from_raw_parts_mut(mine as *mut T, n), std::slice::from_raw_parts(theirs as *const T, n)) };
    for (m, t) in mine.iter_mut().zip(theirs) {
        *m = T::from_acc(crate::element::combine(t.to_acc(), m.to_acc(), op));
    }
}

/// MPI's entry point for the check's operation.
unsafe extern "C" fn combine_packets(invec: *mut c_void, inoutvec: *mut c_void, len: *mut c_int, _ty: *mut ffi::MPI_Datatype) {
    // SAFETY: MPI hands `len` packets of the committed packet type on each side.
    unsafe {
        for k in 0..(*len).max(0) as usize {
            let a = &*(invec as *const Packet).add(k);
            (*(inoutvec as *mut Packet).add(k)).combine(a);
        }
    }
}

/// The packet's MPI type and the check's operation, created once per process after MPI
/// is initialised (and left to MPI_Finalize, which frees them).
fn packet_type_and_op() -> Result<(ffi::MPI_Datatype, ffi::MPI_Op)> {
    struct Handles(ffi::MPI_Datatype, ffi::MPI_Op);
    // SAFETY: MPI handles are plain values, used under the communicator's lock.
    unsafe impl Send for Handles {}
    // SAFETY: as for Send.
    unsafe impl Sync for Handles {}
    static HANDLES: std::sync::OnceLock<std::result::Result<Handles, String>> = std::sync::OnceLock::new();
    let handles = HANDLES.get_or_init(|| {
        // SAFETY: MPI is initialised (an engine exists); out-pointers to locals; the
        // function matches MPI_User_function.
        unsafe {
            let mut ty = ffi::RSMPI_DATATYPE_NULL;
            if ffi::MPI_Type_contiguous(std::mem::size_of::<Packet>() as c_int, ffi::RSMPI_UINT8_T, &mut ty) != ffi::MPI_SUCCESS as c_int
                || ffi::MPI_Type_commit(&mut ty) != ffi::MPI_SUCCESS as c_int
            {
                return Err("MPI_Type_contiguous/MPI_Type_commit for the fingerprint packet failed".to_string());
            }
            let mut op = ffi::RSMPI_SUM;
            // (op starts as any handle; MPI_Op_create overwrites it.)
            if ffi::MPI_Op_create(Some(combine_packets), 1, &mut op) != ffi::MPI_SUCCESS as c_int {
                return Err("MPI_Op_create for the fingerprint check failed".to_string());
            }
            Ok(Handles(ty, op))
        }
    });
    match handles {
        Ok(h) => Ok((h.0, h.1)),
        Err(message) => Err(CommError::Backend { backend: "mpi", message: message.clone() }),
    }
}

fn to_f32<T: Element>(x: T) -> f32 {
    // Only called for the 16-bit floats, whose accumulator is f32.
    let acc = x.to_acc();
    // SAFETY: T::Acc is f32 for bf16 and f16 (checked by the dtype at the call sites).
    unsafe { std::mem::transmute_copy::<T::Acc, f32>(&acc) }
}

fn from_f32<T: Element>(x: f32) -> T {
    // SAFETY: as in to_f32.
    T::from_acc(unsafe { std::mem::transmute_copy::<f32, T::Acc>(&x) })
}

/// The hang detector of the MPI backend (see the module docs): one thread per process,
/// watching the collective in flight on any MPI communicator.
pub(crate) mod watchdog {
    use crate::fingerprint::Fingerprint;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// Completed calls the flight recorder keeps.
    const RECORDED: usize = 16;

    struct State {
        rank: usize,
        timeout: Duration,
        in_flight: Option<(Fingerprint, Instant)>,
        recent: VecDeque<(Fingerprint, Duration)>,
    }

    static STATE: Mutex<Option<State>> = Mutex::new(None);

    fn with<R>(f: impl FnOnce(&mut State) -> R) -> Option<R> {
        STATE.lock().unwrap_or_else(|e| e.into_inner()).as_mut().map(f)
    }

    /// Starts the watchdog thread of this process (once, with the world communicator).
    pub(crate) fn start(rank: usize, timeout: Duration) {
        *STATE.lock().unwrap_or_else(|e| e.into_inner()) = Some(State { rank, timeout, in_flight: None, recent: VecDeque::new() });
        let spawned = std::thread::Builder::new().name("distoptim-mpi-watchdog".into()).spawn(|| loop {
            let period =
                with(|s| (s.timeout / 20).clamp(Duration::from_millis(10), Duration::from_secs(1))).unwrap_or(Duration::from_secs(1));
            std::thread::sleep(period);
            if let Some(Some(report)) = with(expired) {
                eprintln!("{report}");
                // Not MPI_Abort: this thread may not call MPI while another one is inside
                // it (MPI_THREAD_SERIALIZED). A rank that exits is what mpirun stops the
                // job for.
                // SAFETY: _exit ends the process at once; nothing of it is used after.
                unsafe { libc::_exit(124) };
            }
        });
        if let Err(e) = spawned {
            eprintln!("distoptim: mpi watchdog not started ({e}): a hung collective will not be detected");
        }
    }

    /// The report when the call in flight has run past the timeout.
    fn expired(s: &mut State) -> Option<String> {
        let (fp, since) = s.in_flight?;
        if since.elapsed() < s.timeout {
            return None;
        }
        let mut report = format!(
            "distoptim mpi watchdog: rank {}: {fp} has not completed after {:?} (DISTOPTIM_TIMEOUT_S); a peer is stopped, hung or in another call. Last {} completed collectives of this rank, oldest first:",
            s.rank,
            s.timeout,
            s.recent.len()
        );
        for (done, took) in &s.recent {
            report.push_str(&format!("\n  {done}, {took:?}"));
        }
        report.push_str("\nending this rank (exit 124) so that mpirun stops the job");
        Some(report)
    }

    /// Changes the limit.
    pub(crate) fn set_timeout(timeout: Duration) {
        with(|s| s.timeout = timeout);
    }

    /// A collective in flight, shown to the watchdog until dropped.
    pub(crate) struct InFlight;

    impl InFlight {
        /// Marks `fp` as in flight from now.
        pub(crate) fn begin(fp: Fingerprint) -> InFlight {
            with(|s| s.in_flight = Some((fp, Instant::now())));
            InFlight
        }
    }

    impl Drop for InFlight {
        fn drop(&mut self) {
            with(|s| {
                if let Some((fp, since)) = s.in_flight.take() {
                    if s.recent.len() == RECORDED {
                        s.recent.pop_front();
                    }
                    s.recent.push_back((fp, since.elapsed()));
                }
            });
        }
    }
}
