//! Elastic recovery on one host: what a program started by `distoptim launch --elastic`
//! needs to survive a dead rank.
//!
//! The launcher owns a snapshot directory in shared memory (`/dev/shm`), so it outlives
//! every rank, and names it in `DISTOPTIM_SNAPSHOT_DIR`. A rank saves the state it
//! needs there every few steps with [`crate::DataParallel::save`] (its shard of the
//! master weights and optimizer state, and the counters the program adds: the step,
//! the sampler's position). A save is one step directory published by an atomic
//! `latest` pointer after every rank has written its part, so a snapshot holds a step
//! wholly or not at all, and a rank killed in the middle of one leaves the previous
//! snapshot in place. When a rank dies, the launcher stops the others and starts the
//! job again, on the survivors or on as many ranks; the program finds the snapshot
//! again with [`snapshot_dir`] and reloads it with [`crate::DataParallel::load`], which
//! reshards it onto the new world size. No file on disk is written.
//!
//! ```no_run
//! # fn main() -> distoptim::Result<()> {
//! if let Some(dir) = distoptim::elastic::snapshot_dir() {
//!     if distoptim::checkpoint::resolve(&dir).is_ok() {
//!         // algorithm.load(&dir, params) and continue from its `step` counter
//!     }
//! }
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::checkpoint::Manifest;
use crate::error::{DistError, Result};

/// The launcher's snapshot directory, when this process runs under
/// `distoptim launch --elastic`.
pub fn snapshot_dir() -> Option<PathBuf> {
    std::env::var_os("DISTOPTIM_SNAPSHOT_DIR").filter(|d| !d.is_empty()).map(PathBuf::from)
}

/// How many times the launcher has restarted the job (0 on the first start).
pub fn restart_count() -> u64 {
    std::env::var("DISTOPTIM_RESTART_COUNT").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Time since the death that caused this restart, as the launcher recorded it.
pub fn since_failure() -> Option<Duration> {
    let ns: u64 = std::env::var("DISTOPTIM_FAILED_AT_NS").ok()?.parse().ok()?;
    SystemTime::now().duration_since(UNIX_EPOCH + Duration::from_nanos(ns)).ok()
}

/// Bytes of a slot header (padded to a cache line).
const HEADER: usize = 64;
/// The header's first word: the format, so a stray file is never read as a snapshot.
const MAGIC: u64 = u64::from_le_bytes(*b"DOSNAP01");
/// A slot's state word.
const WRITING: u64 = 1;
const COMPLETE: u64 = 2;
/// Room kept in a slot for its JSON metadata to grow (counters with more digits).
const SLACK: usize = 64 << 10;
/// The most bytes a snapshot's JSON metadata may have when read back.
const MAX_META: u64 = 64 << 20;

/// The in-memory snapshots of one rank of an elastic job: its state every few steps,
/// in a file of the launcher's shared-memory directory that outlives the rank.
///
/// The file of rank `r` in the `g`-th start of the job is `gen-g/rank-r`: two slots, each
/// a 64-byte header (magic, state, step, lengths) then JSON metadata and the raw f32
/// data. Step `s` goes to slot `s % 2`: its state word turns WRITING, the bytes are
/// copied in, then it turns COMPLETE, so a rank killed mid-copy leaves the slot
/// unusable and the other slot (step `s - 1`) intact. A step's collectives make every
/// rank finish snapshot `s - 1` before any rank starts step `s`'s, so step `s - 1` or
/// `s` is complete on every rank whatever the moment of a death. A snapshot costs one
/// copy of the rank's state into pages that stay mapped between steps.
pub struct Snapshots {
    root: PathBuf,
    generation: u64,
    rank: usize,
    world: usize,
    /// This rank's file, mapped, and the bytes of each slot's payload.
    file: Option<(memmap2::MmapMut, usize)>,
    /// Snapshots written in this start (the old starts' files go after the second).
    written: u64,
}

/// Where the newest complete snapshot is: the start that wrote it, its world size and
/// step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The start of the job (restart count) that wrote it.
    pub generation: u64,
    /// Ranks that wrote it.
    pub world: usize,
    /// The step it holds.
    pub step: u64,
}

/// One rank's part of a snapshot, as its metadata records it.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct PartMeta {
    /// The elements the part covers.
    pub range: [usize; 2],
    /// Per-parameter optimizer step counts.
    pub steps: Vec<u64>,
    /// The state buffers stored after the values, in order.
    pub buffers: Vec<String>,
    /// Rank 0 only: the manifest (layout, groups, counters, precision; no files).
    pub manifest: Option<Manifest>,
}

fn io_err(path: &std::path::Path, e: std::io::Error) -> DistError {
    DistError::Checkpoint(format!("snapshot {}: {e}", path.display()))
}

impl Snapshots {
    /// The snapshots of this process under an elastic launcher (`None` outside one).
    pub fn from_env(rank: usize, world: usize) -> Option<Snapshots> {
        Some(Snapshots { root: snapshot_dir()?, generation: restart_count(), rank, world, file: None, written: 0 })
    }

    /// The snapshots in `root` for this start (`generation`) of a job, as `rank` of `world`.
    pub fn new(root: PathBuf, generation: u64, rank: usize, world: usize) -> Snapshots {
        Snapshots { root, generation, rank, world, file: None, written: 0 }
    }

    fn file_path(&self, generation: u64, rank: usize) -> PathBuf {
        self.root.join(format!("gen-{generation:04}")).join(format!("rank-{rank:05}"))
    }

    /// Writes one snapshot of step `step` (not collective): `meta` and the f32 `data`
    /// slices, in order, into slot `step % 2`.
    pub(crate) fn write(&mut self, step: u64, meta: &PartMeta, data: &[&[f32]]) -> Result<()> {
        let meta = serde_json::to_vec(meta).map_err(|e| DistError::Checkpoint(format!("snapshot metadata: {e}")))?;
        let bytes: usize = meta.len() + data.iter().map(|d| d.len() * 4).sum::<usize>();
        if self.file.as_ref().is_none_or(|(_, cap)| *cap < bytes) {
            self.file = Some(self.create(bytes + SLACK, self.file.as_ref())?);
        }
        let Some((map, cap)) = self.file.as_mut() else { unreachable!("created above") };
        let slot = (step % 2) as usize;
        let (headers, payloads) = map.split_at_mut(2 * HEADER);
        let header = &mut headers[slot * HEADER..(slot + 1) * HEADER];
        let payload = &mut payloads[slot * *cap..slot * *cap + bytes];
        fault("snapshot slot about to be marked WRITING");
        set_state(header, WRITING);
        let fields = [MAGIC, WRITING, step, self.world as u64, self.rank as u64, meta.len() as u64, bytes as u64];
        for (i, f) in fields.iter().enumerate().filter(|&(i, _)| i != 1) {
            header[8 * i..8 * i + 8].copy_from_slice(&f.to_le_bytes());
        }
        payload[..meta.len()].copy_from_slice(&meta);
        fault("snapshot metadata written, no data yet");
        let mut at = meta.len();
        for d in data {
            payload[at..at + d.len() * 4].copy_from_slice(&le_bytes(d));
            at += d.len() * 4;
        }
        fault("snapshot data written, not yet complete");
        set_state(header, COMPLETE);
        fault("snapshot complete");
        self.written += 1;
        if self.written == 2 && self.rank == 0 {
            // Every rank has completed a snapshot of this start (the step between the two
            // synchronised them): the earlier starts' files are no longer needed.
            self.remove_older();
        }
        Ok(())
    }

    /// Creates this rank's file with two slots of `cap` bytes each, mapped. A file that
    /// grows (its metadata outgrew the slack) is built beside the old one with both old
    /// slots copied in, then renamed over it: the older snapshot survives the growth.
    fn create(&self, cap: usize, old: Option<&(memmap2::MmapMut, usize)>) -> Result<(memmap2::MmapMut, usize)> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let path = self.file_path(self.generation, self.rank);
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| io_err(dir, e))?;
        }
        let fresh = path.with_extension("grow");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&fresh)
            .map_err(|e| io_err(&fresh, e))?;
        file.set_len((2 * HEADER + 2 * cap) as u64).map_err(|e| io_err(&fresh, e))?;
        // SAFETY: the file is this rank's own, created just now; no other process writes
        // it while this one lives (the launcher starts a new job only after this one ends).
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.map_err(|e| io_err(&fresh, e))?;
        if let Some((before, old_cap)) = old {
            map[..2 * HEADER].copy_from_slice(&before[..2 * HEADER]);
            for slot in 0..2 {
                let from = 2 * HEADER + slot * old_cap;
                map[2 * HEADER + slot * cap..][..*old_cap].copy_from_slice(&before[from..from + old_cap]);
            }
        }
        std::fs::rename(&fresh, &path).map_err(|e| io_err(&path, e))?;
        Ok((map, cap))
    }

    fn remove_older(&self) {
        for g in 0..self.generation {
            let _ = std::fs::remove_dir_all(self.root.join(format!("gen-{g:04}")));
        }
    }

    /// The newest step that every rank of some earlier start completed (read-only; the
    /// same answer on every rank).
    pub fn latest(&self) -> Option<Found> {
        let mut best: Option<Found> = None;
        for g in (0..self.generation).rev() {
            let Some(world) = self.world_of(g) else { continue };
            for slot in 0..2 {
                let Some(step) = self.slot_step(g, 0, slot) else { continue };
                if best.as_ref().is_some_and(|b| b.step >= step) {
                    continue;
                }
                if (1..world).all(|r| self.slot_step(g, r, slot) == Some(step)) {
                    best = Some(Found { generation: g, world, step });
                }
            }
        }
        best
    }

    /// The world size rank 0 of start `g` recorded.
    fn world_of(&self, g: u64) -> Option<usize> {
        let map = self.open(g, 0).ok()?;
        (0..2).filter_map(|s| read_header(&map, s)).map(|h| h.world as usize).find(|&w| (1..=1 << 20).contains(&w))
    }

    /// The step in slot `slot` of rank `rank` of start `g`, if complete.
    fn slot_step(&self, g: u64, rank: usize, slot: usize) -> Option<u64> {
        let map = self.open(g, rank).ok()?;
        read_header(&map, slot).filter(|h| h.rank == rank as u64).map(|h| h.step)
    }

    fn open(&self, g: u64, rank: usize) -> Result<memmap2::Mmap> {
        let path = self.file_path(g, rank);
        let (file, _) = crate::checkpoint::store::open_regular(&path)?;
        // SAFETY: the file is read only after every process that wrote it has exited.
        unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(&path, e))
    }

    /// Reads rank `rank`'s part of the snapshot `found`: its metadata and data, checked.
    pub(crate) fn read_part(&self, found: &Found, rank: usize) -> Result<(PartMeta, memmap2::Mmap, std::ops::Range<usize>)> {
        let path = self.file_path(found.generation, rank);
        let map = self.open(found.generation, rank)?;
        let bad = |what: &str| DistError::Checkpoint(format!("snapshot {}: {what}", path.display()));
        let slot = (found.step % 2) as usize;
        let h = read_header(&map, slot).filter(|h| h.step == found.step).ok_or_else(|| bad("the slot no longer holds the step"))?;
        let cap = (map.len().checked_sub(2 * HEADER).ok_or_else(|| bad("shorter than its headers"))?) / 2;
        if h.meta > MAX_META || h.bytes > cap as u64 || h.meta > h.bytes {
            return Err(bad("lengths past the slot"));
        }
        let start = 2 * HEADER + slot * cap;
        let meta: PartMeta = serde_json::from_slice(&map[start..start + h.meta as usize]).map_err(|e| bad(&e.to_string()))?;
        let data = start + h.meta as usize..start + h.bytes as usize;
        Ok((meta, map, data))
    }
}

/// `values` as little-endian bytes: the memory itself on a little-endian machine (one
/// memcpy), converted elsewhere.
fn le_bytes(values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: f32 has no padding and every byte of it may be read as u8; the slice
        // covers exactly the values' memory and borrows them.
        std::borrow::Cow::Borrowed(unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) })
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// Reads little-endian f32 `bytes` into `out` (as many as `out` holds).
fn read_le(bytes: &[u8], out: &mut [f32]) {
    if cfg!(target_endian = "little") {
        let src = &bytes[..out.len() * 4];
        // SAFETY: every bit pattern is a valid f32; the destination is exactly `out`'s
        // memory, the source as long (checked by the slice index) and not overlapping it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), out.as_mut_ptr().cast::<u8>(), src.len()) };
    } else {
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
}

/// A slot header as read back.
struct Header {
    step: u64,
    world: u64,
    rank: u64,
    meta: u64,
    bytes: u64,
}

/// Slot `slot`'s header when it is a complete snapshot.
fn read_header(map: &[u8], slot: usize) -> Option<Header> {
    let h = map.get(slot * HEADER..(slot + 1) * HEADER)?;
    let word = |i: usize| u64::from_le_bytes(h[8 * i..8 * i + 8].try_into().unwrap_or_default());
    (word(0) == MAGIC && word(1) == COMPLETE).then(|| Header {
        step: word(2),
        world: word(3),
        rank: word(4),
        meta: word(5),
        bytes: word(6),
    })
}

/// Sets a slot's state word with release ordering: the bytes before it are in memory
/// first, so a COMPLETE slot is whole even if the process dies right after.
fn set_state(header: &mut [u8], state: u64) {
    // SAFETY: the header starts a 64-byte-aligned slot of a page-aligned mapping, so its
    // second word is 8-byte aligned; the mapping outlives the reference.
    let word = unsafe { &*(header.as_mut_ptr().add(8) as *const std::sync::atomic::AtomicU64) };
    word.store(state, std::sync::atomic::Ordering::Release);
}

/// The fault-injection point of the snapshots (see [`crate::checkpoint::store`]).
fn fault(what: &str) {
    crate::checkpoint::store::fault_point(what, std::path::Path::new("(in-memory snapshot)"));
}

impl crate::ShardedOptimizer {
    /// Writes this rank's state for step `step` into its snapshot slot (not collective):
    /// its range of the master (or f32 parameters) and of every optimizer state buffer,
    /// the per-parameter step counts, and on rank 0 the manifest with `counters`.
    /// `params`: the full buffer, or under ZeRO-3 the rank's shard.
    pub(crate) fn snapshot<T: crate::Working>(
        &self,
        snapshots: &mut Snapshots,
        step: u64,
        params: &[T],
        counters: &std::collections::BTreeMap<String, u64>,
    ) -> Result<()> {
        let (comm, layout) = (self.comm(), self.layout());
        let numel = layout.numel();
        let owned = self.owned();
        let range =
            if self.strategy().shards_state() { owned.clone() } else { distoptim_collective::shard_range(numel, comm.size(), comm.rank()) };
        let local = range.start - owned.start..range.end - owned.start;
        let from_params = || -> Result<&[T]> {
            match params.len() {
                n if n == numel => Ok(&params[range.clone()]),
                n if n == owned.len() => Ok(&params[local.clone()]),
                n => Err(DistError::Invalid(format!("params has {n} elements: the layout has {numel}, this rank's shard {}", owned.len()))),
            }
        };
        let widened: Vec<f32>;
        let values: &[f32] = match (self.master(), T::as_f32(from_params()?)) {
            (Some(master), _) => &master[local.clone()],
            (None, Some(p)) => p,
            (None, None) => {
                widened = from_params()?.iter().map(|v| v.to_f32()).collect();
                &widened
            }
        };
        let optimizer = self.inner_optimizer();
        // Borrowed for f32 state; an 8-bit buffer is dequantized (a state dict's form).
        let (names, buffers): (Vec<String>, Vec<std::borrow::Cow<'_, [f32]>>) =
            optimizer.buffers().map(|(n, b)| (n.to_string(), b)).unzip();
        let mut data: Vec<&[f32]> = buffers.iter().map(|b| &b[local.clone()]).collect();
        data.insert(0, values);
        let manifest = (comm.rank() == 0).then(|| Manifest {
            format_version: crate::checkpoint::FORMAT_VERSION,
            world_size: comm.size(),
            strategy: self.strategy().name().into(),
            layout: layout.clone(),
            groups: self.groups().to_vec(),
            step: self.steps(),
            schedule_step: self.schedule_step(),
            counters: counters.clone(),
            per_rank: false,
            precision: (self.precision() != crate::Precision::f32()).then(|| crate::checkpoint::PrecisionRecord {
                param_dtype: self.precision().param_dtype.name().into(),
                reduce_dtype: self.precision().reduce_dtype.name().into(),
                loss_scale: self.loss_scaler().map(|s| s.scale),
                growth_tracker: self.loss_scaler().map_or(0, |s| s.growth_tracker),
            }),
            files: Vec::new(),
            checksum: String::new(),
        });
        let steps = (0..layout.len()).map(|i| optimizer.param_step(i)).collect();
        let meta = PartMeta { range: [range.start, range.end], steps, buffers: names, manifest };
        snapshots.write(step, &meta, &data)
    }

    /// Restores the newest snapshot every rank of an earlier start completed, resharded
    /// onto this group, into `params` (full) and the optimizer (collective). `None` when
    /// there is none.
    pub(crate) fn restore<T: crate::Working>(&mut self, snapshots: &Snapshots, params: &mut [T]) -> Result<Option<Manifest>> {
        let local = self.restore_local(snapshots, params);
        crate::checkpoint::all_ok(self.comm(), local, "restore the elastic snapshot")
    }

    fn restore_local<T: crate::Working>(&mut self, snapshots: &Snapshots, params: &mut [T]) -> Result<Option<Manifest>> {
        let Some(found) = snapshots.latest() else { return Ok(None) };
        let layout = self.layout().clone();
        let numel = layout.numel();
        if params.len() != numel {
            return Err(DistError::Invalid(format!("params has {} elements, the layout has {numel}", params.len())));
        }
        let owned = self.owned();
        let mut full = vec![0f32; numel];
        let mut buffers: std::collections::BTreeMap<String, Vec<f32>> = Default::default();
        let mut steps = vec![0u64; layout.len()];
        let mut manifest = None;
        for r in 0..found.world {
            let (meta, map, data) = snapshots.read_part(&found, r)?;
            let bad = |what: String| DistError::Checkpoint(format!("snapshot of step {} rank {r}: {what}", found.step));
            let range = meta.range[0]..meta.range[1];
            if range.start > range.end || range.end > numel || meta.steps.len() != layout.len() {
                return Err(bad(format!("range {range:?} or {} step counts do not fit this model", meta.steps.len())));
            }
            if data.len() != (1 + meta.buffers.len()) * range.len() * 4 {
                return Err(bad(format!(
                    "{} bytes of data for {} buffers of {} elements",
                    data.len(),
                    1 + meta.buffers.len(),
                    range.len()
                )));
            }
            let bytes = &map[data];
            let read = |k: usize, out: &mut [f32], from: usize| read_le(&bytes[(k * range.len() + from) * 4..], out);
            read(0, &mut full[range.clone()], 0);
            let (lo, hi) = (range.start.max(owned.start), range.end.min(owned.end));
            for (k, name) in meta.buffers.iter().enumerate() {
                let mine = buffers.entry(name.clone()).or_insert_with(|| vec![0f32; owned.len()]);
                if lo < hi {
                    read(k + 1, &mut mine[lo - owned.start..hi - owned.start], lo - range.start);
                }
            }
            for (s, t) in steps.iter_mut().zip(&meta.steps) {
                *s = (*s).max(*t);
            }
            if r == 0 {
                manifest = meta.manifest;
            }
        }
        let m = manifest.ok_or_else(|| DistError::Checkpoint(format!("snapshot of step {}: rank 0 holds no manifest", found.step)))?;
        crate::checkpoint::same_layout(&snapshots.root, &m.layout, &layout)?;
        let sd = distoptim_optim::OptimizerStateDict { layout, shard: owned, groups: m.groups.clone(), steps, buffers };
        self.load_state_dict(&sd)?;
        self.restore_counters(m.step, m.schedule_step)?;
        self.set_master(&full)?;
        if let Some(scale) = m.precision.as_ref().and_then(|p| p.loss_scale) {
            self.set_loss_scaler(scale, m.precision.as_ref().map_or(0, |p| p.growth_tracker));
        }
        crate::precision::round_into(&full, params);
        Ok(Some(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DataParallel, ReduceMode, ShardedOptimizer, StepConfig, Strategy};
    use distoptim_collective::{CommConfig, Communicator};
    use distoptim_optim::{AdamConfig, Layout, OptimizerConfig, ParamGroup};

    fn layout() -> Layout {
        Layout::new([("w", vec![7, 5]), ("b", vec![7])]).unwrap()
    }

    fn groups() -> Vec<ParamGroup> {
        vec![ParamGroup { params: vec![0, 1], config: OptimizerConfig::Adam(AdamConfig::adamw()) }]
    }

    /// Runs `steps` steps of `strategy` on `world` ranks, snapshotting after each into
    /// start `generation` of `root` (rank `skip_last_on` skips the last step's snapshot,
    /// as if it died first); returns rank 0's parameters and full optimizer state.
    fn run(
        root: &std::path::Path,
        generation: u64,
        strategy: Strategy,
        world: usize,
        steps: u64,
        skip_last_on: Option<usize>,
    ) -> (Vec<f32>, Vec<u32>) {
        let n = layout().numel();
        let out = Communicator::run_threads(world, &CommConfig::default(), |comm| {
            let r = comm.rank();
            let init: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let config = StepConfig::new(strategy).with_reduce(ReduceMode::BatchWeighted);
            let mut dp = ShardedOptimizer::new(comm.clone(), layout(), groups(), None, config).unwrap();
            let mut snaps = Snapshots::new(root.to_path_buf(), generation, r, world);
            let mut params = init.clone();
            let mut first = 0;
            if let Some(m) = DataParallel::restore(&mut dp, &snaps, (&mut params).into()).unwrap() {
                first = m.counters["train_step"];
            }
            for step in first + 1..=steps {
                let mut g: Vec<f32> = (0..n).map(|i| ((i + r) as f32 * 0.11 + step as f32).cos() * 0.1).collect();
                dp.step(&mut params, &mut g, 1).unwrap();
                if step == steps && skip_last_on == Some(r) {
                    continue;
                }
                let counters = std::collections::BTreeMap::from([("train_step".to_string(), step)]);
                DataParallel::snapshot(&dp, &mut snaps, step, (&params).into(), &counters).unwrap();
            }
            dp.gather_params(&mut params).unwrap();
            let state = dp.gather_state().unwrap();
            let bits = state.buffers.values().flatten().map(|x| x.to_bits()).chain(state.steps.iter().map(|&s| s as u32)).collect();
            (params, bits)
        })
        .unwrap();
        out[0].clone()
    }

    #[test]
    fn a_snapshot_restores_bit_exactly_at_another_world_size_and_strategy() {
        let root = std::env::temp_dir().join(format!("distoptim-snap-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // Start 0: 3 ranks of ZeRO-2, 4 steps, all snapshotted.
        let (p3, s3) = run(&root, 0, Strategy::Zero2, 3, 4, None);
        let found = Snapshots::new(root.clone(), 1, 0, 2).latest().unwrap();
        assert_eq!(found, Found { generation: 0, world: 3, step: 4 });
        // Start 1 on 2 ranks of DDP restores step 4 and takes no step: the same bits.
        let (p2, s2) = run(&root, 1, Strategy::Ddp, 2, 4, None);
        assert_eq!(p2.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), p3.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert_eq!(s2, s3, "optimizer state");
        // Start 2 on 2 ranks: step 5 is snapshotted by rank 0 only (rank 1 "died" first),
        // so the newest complete step stays 4 (start 1 restored and wrote none).
        let _ = run(&root, 2, Strategy::Zero1, 2, 5, Some(1));
        let found = Snapshots::new(root.clone(), 3, 0, 2).latest().unwrap();
        assert_eq!(found.step, 4, "{found:?}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_slot_file_that_grows_keeps_the_older_snapshot() {
        let root = std::env::temp_dir().join(format!("distoptim-snap-grow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        Communicator::run_threads(1, &CommConfig::default(), |comm| {
            let n = layout().numel();
            let init = vec![0.5f32; n];
            let mut dp = ShardedOptimizer::new(comm, layout(), groups(), None, StepConfig::new(Strategy::Zero1)).unwrap();
            let mut snaps = Snapshots::new(root.clone(), 0, 0, 1);
            let mut params = init.clone();
            let mut g = vec![0.1f32; n];
            dp.step(&mut params, &mut g, 1).unwrap();
            DataParallel::snapshot(&dp, &mut snaps, 1, (&params).into(), &Default::default()).unwrap();
            // Counters past the slot's slack make the file grow at step 2.
            let big: std::collections::BTreeMap<String, u64> = (0..8000).map(|i| (format!("counter-{i:06}"), i)).collect();
            DataParallel::snapshot(&dp, &mut snaps, 2, (&params).into(), &big).unwrap();
            let later = Snapshots::new(root.clone(), 1, 0, 1);
            assert_eq!(later.slot_step(0, 0, 1), Some(1), "step 1 survived the growth");
            assert_eq!(later.latest().map(|f| f.step), Some(2));
        })
        .unwrap();
        let _ = std::fs::remove_dir_all(&root);
    }
}
