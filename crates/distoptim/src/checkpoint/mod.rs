//! Checkpoints that survive crashes and reload at another world size.
//!
//! `save(root, …)` writes one checkpoint as a step directory inside `root` (see
//! [`store`] for the layout, the `latest` pointer, retention and crash safety):
//! - `rank-0000R.safetensors`, one per rank, holding the rank's balanced range
//!   `shard_range(numel, W, R)` of the parameters (`fc.weight`) and of every optimizer
//!   state buffer (`exp_avg/fc.weight`, `momentum_buffer/fc.weight`, …), with
//!   `offset/<param>` metadata where a range starts inside a parameter and the
//!   per-parameter step counts in `steps`. DDP ranks write their range of the replicated
//!   state, so every strategy writes in parallel and the files look the same;
//! - `manifest.json` ([`Manifest`]): format version, world size, strategy, layout, param
//!   groups, step, schedule position, algorithm counters, each file's size and CRC-32, and
//!   a checksum of the manifest itself.
//!
//! Loading takes the root (following `latest`, or the newest complete step directory
//! when the pointer is missing or damaged) or a step directory, checks the manifest
//! field by field, reads only regular files, verifies every file's checksum and
//! reassembles whatever range the loading rank owns, so a run resumes on any number of
//! ranks and with any strategy.
//!
//! Ranks on several hosts need `root` on a filesystem that all of them see (NFS, Lustre,
//! a mounted bucket): rank 0 creates the staging directory and every rank writes its own
//! file into it. A rank that cannot see rank 0's directory fails the save with an error
//! that says so, and the previous checkpoint stays the latest.

pub mod manifest;
pub mod store;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use distoptim_collective::{shard_range, Communicator, ReduceOp};
use distoptim_optim::{Layout, OptimizerStateDict};

use crate::error::{DistError, Result};
use crate::optimizer::ShardedOptimizer;
use crate::precision::{round_into, Precision, Working};
use crate::safetensors;
use std::borrow::Cow;

pub use manifest::{FileEntry, Manifest, PrecisionRecord, FORMAT_VERSION};
pub use store::{write_atomic, Found};

use store::io;

/// How a save treats the checkpoints already in its root.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SaveOptions {
    /// Keep only the newest `keep` step directories (at least 1); `None` keeps all.
    pub keep: Option<usize>,
}

impl SaveOptions {
    /// Keeps every checkpoint.
    pub fn new() -> SaveOptions {
        SaveOptions::default()
    }

    /// Keeps the newest `keep` checkpoints (at least 1).
    pub fn with_keep(mut self, keep: usize) -> SaveOptions {
        self.keep = Some(keep.max(1));
        self
    }
}

fn mismatch(path: &Path) -> DistError {
    DistError::Checkpoint(format!("{}: size or checksum does not match the manifest (corrupt file?)", path.display()))
}

/// Reads one rank file whole, after checking that it is a regular file of the size the
/// manifest records (so the allocation is bounded by what is on disk) and that its
/// checksum matches.
pub(crate) fn read_verified(dir: &Path, entry: &FileEntry) -> Result<(PathBuf, Vec<u8>)> {
    let path = dir.join(&entry.name);
    let bytes = store::read_bounded(&path, entry.bytes).map_err(|_| mismatch(&path))?;
    if bytes.len() as u64 != entry.bytes || manifest::crc32_hex(&bytes) != entry.crc32 {
        return Err(mismatch(&path));
    }
    Ok((path, bytes))
}

/// Checks a file against its manifest entry, reading it in blocks (memory stays small
/// whatever the file's size).
pub(crate) fn verify_file(dir: &Path, entry: &FileEntry) -> Result<PathBuf> {
    use std::io::Read;
    let path = dir.join(&entry.name);
    let (mut file, len) = store::open_regular(&path)?;
    if len != entry.bytes {
        return Err(mismatch(&path));
    }
    let (mut hasher, mut read, mut block) = (crc32fast::Hasher::new(), 0u64, vec![0u8; 1 << 20]);
    loop {
        let n = file.read(&mut block).map_err(|e| io(&path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&block[..n]);
        read += n as u64;
    }
    if read != entry.bytes || format!("{:08x}", hasher.finalize()) != entry.crc32 {
        return Err(mismatch(&path));
    }
    Ok(path)
}

/// Every rank learns whether every rank's part succeeded; the failing rank keeps its
/// own error, the others get one naming it and quoting its message (so the cause is
/// reported whichever rank's error the user sees first).
pub(crate) fn all_ok<T>(comm: &Communicator, local: Result<T>, what: &str) -> Result<T> {
    let mut failed = vec![0i32; comm.size()];
    failed[comm.rank()] = i32::from(local.is_err());
    comm.all_reduce(&mut failed, ReduceOp::Max)?;
    let Some(first) = failed.iter().position(|&f| f != 0) else { return local };
    let mut message = [0u8; 1024];
    if let (true, Err(e)) = (comm.rank() == first, &local) {
        let text = e.to_string();
        let n = text.len().min(message.len());
        message[..n].copy_from_slice(&text.as_bytes()[..n]);
    }
    comm.broadcast(&mut message, first)?;
    match local {
        Err(e) => Err(e),
        Ok(_) => {
            let text = String::from_utf8_lossy(&message);
            Err(DistError::Checkpoint(format!("rank {first} failed to {what}: {}", text.trim_end_matches('\0'))))
        }
    }
}

/// The checkpoint `path` names (a root or a step directory), with its checked manifest.
pub fn resolve(path: &Path) -> Result<(PathBuf, Manifest, Found)> {
    store::resolve(path, |dir| {
        let m = manifest::read(dir)?;
        m.check_files(dir)?;
        Ok(m)
    })
}

/// Reads and checks the manifest of the checkpoint `path` names (a root or a step
/// directory).
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    resolve(path).map(|(_, m, _)| m)
}

/// Saves `params` (the full buffer, of the working type; ZeRO-3: gather first) and the
/// optimizer as a new step directory in `root`. Under mixed precision each rank writes
/// its range of the f32 master instead of the rounded parameters. Collective over the
/// optimizer's group. Returns the manifest and the published directory.
pub fn save<T: Working>(
    root: &Path,
    opt: &ShardedOptimizer,
    params: &[T],
    counters: &BTreeMap<String, u64>,
    options: &SaveOptions,
) -> Result<(Manifest, PathBuf)> {
    let comm = opt.comm();
    let numel = opt.layout().numel();
    if params.len() != numel {
        return Err(DistError::Invalid(format!("params has {} elements, the layout has {numel}", params.len())));
    }
    let range = shard_range(numel, comm.size(), comm.rank());
    let owned = opt.owned();
    // Files hold the balanced ranges. A rank whose range was snapped to a whole matrix
    // (Muon, Adafactor) does not hold exactly its file's part: the state and master are
    // gathered whole first (collective; every rank takes the same branch).
    let balanced = opt.balanced();
    let gathered_master = if balanced { None } else { opt.gather_master()? };
    let values: Cow<'_, [f32]> = match (opt.master(), T::as_f32(params)) {
        (Some(_), _) if gathered_master.is_some() => {
            Cow::Owned(gathered_master.as_deref().map_or_else(Vec::new, |m| m[range.clone()].to_vec()))
        }
        (Some(master), _) => Cow::Borrowed(&master[range.start - owned.start..range.end - owned.start]),
        (None, Some(p)) => Cow::Borrowed(&p[range.clone()]),
        (None, None) => Cow::Owned(params[range.clone()].iter().map(|v| v.to_f32()).collect()),
    };
    let precision = opt.precision();
    let record = (precision != Precision::f32()).then(|| PrecisionRecord {
        param_dtype: precision.param_dtype.name().into(),
        reduce_dtype: precision.reduce_dtype.name().into(),
        loss_scale: opt.loss_scaler().map(|s| s.scale),
        growth_tracker: opt.loss_scaler().map_or(0, |s| s.growth_tracker),
    });
    let state = if balanced { opt.state_dict() } else { opt.gather_state()? };
    let part = if state.shard == range { Ok(state) } else { state.restrict(range.clone()).map_err(DistError::from) };
    let spec = Manifest {
        format_version: FORMAT_VERSION,
        world_size: comm.size(),
        strategy: opt.strategy().name().into(),
        layout: opt.layout().clone(),
        groups: opt.groups().to_vec(),
        step: opt.steps(),
        schedule_step: opt.schedule_step(),
        counters: counters.clone(),
        per_rank: false,
        precision: record,
        files: Vec::new(),
        checksum: String::new(),
    };
    write(root, comm, spec, &values, part, &BTreeMap::new(), options)
}

/// What a rank of an algorithm whose ranks hold different models (post-local SGD
/// between averagings, DiLoCo's inner models) needs to resume besides its parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaState {
    /// The rank's optimizer state over the whole layout.
    pub optimizer: OptimizerStateDict,
    /// The schedule's position, when the run has one.
    pub schedule_step: Option<u64>,
    /// Further buffers over the whole layout (DiLoCo's global parameters and outer
    /// momentum), by name.
    pub extra: BTreeMap<String, Vec<f32>>,
    /// The algorithm's counters (post-local SGD's step, so a resume does not replay the
    /// warm-up).
    pub counters: BTreeMap<String, u64>,
}

/// Saves every rank's whole model and state (one file per rank, each covering the
/// whole layout): the checkpoint of post-local SGD and DiLoCo. It reloads at the same
/// world size only, since each rank's state is its own. Collective over `comm`.
pub fn save_replicas(
    root: &Path,
    comm: &Communicator,
    strategy: &str,
    params: &[f32],
    state: &ReplicaState,
    options: &SaveOptions,
) -> Result<(Manifest, PathBuf)> {
    let layout = state.optimizer.layout.clone();
    let spec = Manifest {
        format_version: FORMAT_VERSION,
        world_size: comm.size(),
        strategy: strategy.into(),
        groups: state.optimizer.groups.clone(),
        step: state.optimizer.steps.iter().copied().max().unwrap_or(0),
        schedule_step: state.schedule_step,
        counters: state.counters.clone(),
        per_rank: true,
        precision: None,
        files: Vec::new(),
        checksum: String::new(),
        layout,
    };
    write(root, comm, spec, params, Ok(state.optimizer.clone()), &state.extra, options)
}

/// The part of the file of one rank: its range of the parameters (`params` holds exactly
/// the range), of the optimizer state (`state` covers the range) and of the extra
/// buffers (which cover the layout).
fn encode_part(
    layout: &Layout,
    range: Range<usize>,
    params: &[f32],
    state: &OptimizerStateDict,
    extra: &BTreeMap<String, Vec<f32>>,
) -> Result<Vec<u8>> {
    let numel = layout.numel();
    if params.len() != range.len() || extra.values().any(|v| v.len() != numel) {
        return Err(DistError::Invalid(format!(
            "params must have the range's {} elements and extra buffers the layout's {numel}",
            range.len()
        )));
    }
    let mut tensors: Vec<(String, &[f32])> = Vec::new();
    let mut metadata = BTreeMap::from([("range".to_string(), format!("{},{}", range.start, range.end))]);
    metadata.insert("steps".into(), serde_json::to_string(&state.steps).unwrap_or_default());
    if !extra.is_empty() {
        metadata.insert("extra".into(), serde_json::to_string(&extra.keys().collect::<Vec<_>>()).unwrap_or_default());
    }
    for (i, piece) in layout.overlapping(range.clone()) {
        let p = layout.param(i);
        tensors.push((p.name.clone(), &params[piece.start - range.start..piece.end - range.start]));
        for (buffer, values) in &state.buffers {
            tensors.push((format!("{buffer}/{}", p.name), &values[piece.start - range.start..piece.end - range.start]));
        }
        for (buffer, values) in extra {
            tensors.push((format!("{buffer}/{}", p.name), &values[piece.clone()]));
        }
        if piece.start > p.range().start {
            metadata.insert(format!("offset/{}", p.name), (piece.start - p.range().start).to_string());
        }
    }
    Ok(safetensors::encode(&tensors, &metadata))
}

/// Writes every rank's file into a staging directory that rank 0 created, then rank 0
/// writes the manifest (`spec` with the files filled in) and publishes the directory.
/// `params`: this rank's range of the parameters.
fn write(
    root: &Path,
    comm: &Communicator,
    mut spec: Manifest,
    params: &[f32],
    state: Result<OptimizerStateDict>,
    extra: &BTreeMap<String, Vec<f32>>,
    options: &SaveOptions,
) -> Result<(Manifest, PathBuf)> {
    let (me, n) = (comm.rank(), comm.size());
    let numel = spec.layout.numel();
    let per_rank = spec.per_rank;
    let range_of = |r: usize| if per_rank { 0..numel } else { shard_range(numel, n, r) };
    // Rank 0 names the staging directory with a fresh nonce, so no two saves share one.
    let mut nonce = [0i64];
    let began = if me == 0 {
        nonce[0] = (fresh_nonce() >> 1) as i64;
        store::begin(root, spec.step, nonce[0] as u64).map(|_| ())
    } else {
        Ok(())
    };
    all_ok(comm, began, &format!("start a checkpoint in {}", root.display()))?;
    comm.all_reduce(&mut nonce, ReduceOp::Max)?;
    let stage = store::staging_dir(root, spec.step, nonce[0] as u64);
    let result = (|| {
        let visible = if stage.is_dir() {
            Ok(())
        } else {
            Err(DistError::Checkpoint(format!(
                "rank {me} cannot see {}, which rank 0 created: ranks on several hosts need the checkpoint directory on a filesystem they all share",
                stage.display()
            )))
        };
        all_ok(comm, visible, "see the checkpoint directory")?;

        let written = state.and_then(|state| encode_part(&spec.layout, range_of(me), params, &state, extra)).and_then(|bytes| {
            write_atomic(&stage.join(manifest::file_name(me)), &bytes)?;
            Ok((bytes.len() as u64, crc32fast::hash(&bytes)))
        });
        let (bytes, sum) = all_ok(comm, written, "write its checkpoint file")?;

        let mut sums = vec![0i64; 2 * n];
        sums[2 * me] = bytes as i64;
        sums[2 * me + 1] = i64::from(sum);
        comm.all_gather(&mut sums)?;
        spec.files = (0..n)
            .map(|r| {
                let range = range_of(r);
                FileEntry {
                    name: manifest::file_name(r),
                    rank: r,
                    range: [range.start, range.end],
                    bytes: sums[2 * r] as u64,
                    crc32: format!("{:08x}", sums[2 * r + 1] as u32),
                }
            })
            .collect();
        let published = if me == 0 {
            spec.to_bytes()
                .and_then(|text| write_atomic(&stage.join("manifest.json"), &text))
                .and_then(|()| store::publish(root, &stage, spec.step, options.keep))
        } else {
            Ok(0)
        };
        // Every rank returns the directory rank 0 published: its suffix, if any, is shared.
        let mut again = [i64::from(all_ok(comm, published, &format!("publish a checkpoint in {}", root.display()))?)];
        comm.all_reduce(&mut again, ReduceOp::Max)?;
        Ok(root.join(store::step_dir_name(spec.step, again[0] as u32)))
    })();
    if result.is_err() && me == 0 {
        store::abandon(&stage);
    }
    result.map(|dir| (spec, dir))
}

/// A number no other save of this host picks at the same time: the pid, the clock and a
/// counter, mixed.
fn fresh_nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64's finaliser: spreads every input bit over the output.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Loads a checkpoint written by [`save`] on any number of ranks into `params` (the full
/// buffer) and `opt` (its own range of the state), whatever its strategy and group size.
/// Every rank calls it; nothing is changed unless everything checks out.
/// Under mixed precision the master takes the saved f32 values and `params` (of the
/// working type) their rounding; the loss scaler continues where it was.
pub fn load<T: Working>(dir: &Path, opt: &mut ShardedOptimizer, params: &mut [T]) -> Result<Manifest> {
    let loaded = load_local(dir, opt, params);
    all_ok(opt.comm(), loaded, &format!("load {}", dir.display()))
}

fn load_local<T: Working>(path: &Path, opt: &mut ShardedOptimizer, params: &mut [T]) -> Result<Manifest> {
    let (dir, m, _) = resolve(path)?;
    let dir = dir.as_path();
    if m.per_rank {
        return Err(DistError::Checkpoint(format!("{} holds per-rank models ({}); load it with load_replicas", dir.display(), m.strategy)));
    }
    let layout = opt.layout().clone();
    same_layout(dir, &m.layout, &layout)?;
    if params.len() != layout.numel() {
        return Err(DistError::Invalid(format!("params has {} elements, the layout has {}", params.len(), layout.numel())));
    }
    let owned = opt.owned();
    let mut full = vec![0f32; layout.numel()];
    let mut buffers: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut steps = vec![0u64; layout.len()];
    for f in &m.files {
        let (path, bytes) = read_verified(dir, f)?;
        let d = safetensors::decode(&bytes).map_err(|e| DistError::Checkpoint(format!("{}: {e}", path.display())))?;
        let file_steps = step_counts(&path, &d.metadata, layout.len())?;
        for (s, fs) in steps.iter_mut().zip(file_steps) {
            *s = (*s).max(fs);
        }
        let range = f.range[0]..f.range[1];
        for (i, piece) in layout.overlapping(range) {
            let name = &layout.param(i).name;
            let missing = || DistError::Checkpoint(format!("{}: no tensor '{name}' of {} elements", path.display(), piece.len()));
            let values = d.tensors.get(name).filter(|v| v.len() == piece.len()).ok_or_else(missing)?;
            full[piece.clone()].copy_from_slice(values);
            for (key, values) in &d.tensors {
                // State buffers have plain names (exp_avg, momentum_buffer…).
                let Some(buffer) = key.strip_suffix(&format!("/{name}")).filter(|b| !b.contains('/')) else { continue };
                if values.len() != piece.len() {
                    return Err(missing());
                }
                let mine = buffers.entry(buffer.to_string()).or_insert_with(|| vec![0f32; owned.len()]);
                let (lo, hi) = (piece.start.max(owned.start), piece.end.min(owned.end));
                if lo < hi {
                    mine[lo - owned.start..hi - owned.start].copy_from_slice(&values[lo - piece.start..hi - piece.start]);
                }
            }
        }
    }
    let sd = OptimizerStateDict { layout: layout.clone(), shard: owned.clone(), groups: m.groups.clone(), steps, buffers };
    opt.load_state_dict(&sd)?;
    opt.restore_counters(m.step, m.schedule_step)?;
    opt.set_master(&full)?;
    if let Some(scale) = m.precision.as_ref().and_then(|p| p.loss_scale) {
        opt.set_loss_scaler(scale, m.precision.as_ref().map_or(0, |p| p.growth_tracker));
    }
    round_into(&full, params);
    Ok(m)
}

/// Refuses a checkpoint of another model, naming the first parameter that differs.
pub(crate) fn same_layout(dir: &Path, saved: &Layout, ours: &Layout) -> Result<()> {
    match saved.first_difference(ours) {
        None => Ok(()),
        Some(diff) => Err(DistError::Checkpoint(format!(
            "{} was saved for another model (the checkpoint's layout, then this model's): {diff}",
            dir.display()
        ))),
    }
}

/// The per-parameter step counts a rank file records: required, since a missing one would
/// silently restart Adam's bias correction.
fn step_counts(path: &Path, metadata: &BTreeMap<String, String>, params: usize) -> Result<Vec<u64>> {
    let steps: Vec<u64> = metadata
        .get("steps")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| DistError::Checkpoint(format!("{}: no valid 'steps' metadata (the optimizer's step counts)", path.display())))?;
    if steps.len() != params || steps.iter().any(|&s| s > manifest::MAX_COUNTER) {
        return Err(DistError::Checkpoint(format!(
            "{}: 'steps' metadata has {} counts for {params} parameters, or one too large",
            path.display(),
            steps.len()
        )));
    }
    Ok(steps)
}

/// An algorithm whose ranks hold their own models between synchronisations (post-local
/// SGD, DiLoCo): its checkpoints are every rank's whole model and state, reloaded at the
/// same world size and strategy only.
pub(crate) trait PerRank: crate::DataParallel {
    /// The strategy it is (checked on load).
    const STRATEGY: crate::Strategy;
    /// What the rank needs to continue besides its parameters.
    fn replica_state(&self) -> ReplicaState;
    /// Restores it.
    fn load_replica_state(&mut self, state: &ReplicaState) -> Result<()>;
}

/// `DataParallel::save` of a [`PerRank`] algorithm: its replica state with the caller's
/// counters, through [`save_replicas`] (f32 parameters only).
pub(crate) fn save_per_rank<A: PerRank>(
    a: &A,
    root: &Path,
    params: crate::precision::Flat<'_>,
    counters: BTreeMap<String, u64>,
    options: &SaveOptions,
) -> Result<(Manifest, PathBuf)> {
    let mut state = a.replica_state();
    state.counters.extend(counters);
    save_replicas(root, a.comm(), A::STRATEGY.name(), params.into_f32(A::STRATEGY.name())?, &state, options)
}

/// `DataParallel::load` of a [`PerRank`] algorithm: [`load_replicas`], refusing another
/// strategy's checkpoint by name.
pub(crate) fn load_per_rank<A: PerRank>(a: &mut A, path: &Path, params: crate::precision::FlatMut<'_>) -> Result<Manifest> {
    let strategy = A::STRATEGY;
    let layout = a.layout().clone();
    let (m, state) = load_replicas(path, a.comm(), &layout, params.into_f32(strategy.name())?)?;
    if m.strategy != strategy.name() {
        return Err(DistError::Checkpoint(format!(
            "{} holds a {} run; resume it with --strategy {}",
            path.display(),
            m.strategy,
            m.strategy
        )));
    }
    a.load_replica_state(&state)?;
    Ok(m)
}

/// Loads what [`save_replicas`] wrote: this rank's file into `params` and the returned
/// state. The world size and layout must be those that saved. Collective over `comm`;
/// nothing is returned unless every rank's file checks out.
pub fn load_replicas(path: &Path, comm: &Communicator, layout: &Layout, params: &mut [f32]) -> Result<(Manifest, ReplicaState)> {
    let loaded = (|| {
        let (dir, m, _) = resolve(path)?;
        let dir = dir.as_path();
        if !m.per_rank {
            return Err(DistError::Checkpoint(format!("{} holds a sharded {} checkpoint; load it with load", dir.display(), m.strategy)));
        }
        if m.world_size != comm.size() {
            return Err(DistError::Checkpoint(format!(
                "{} holds the models of {} ranks ({}), this group has {}: resume with the same number of ranks",
                dir.display(),
                m.world_size,
                m.strategy,
                comm.size()
            )));
        }
        same_layout(dir, &m.layout, layout)?;
        if params.len() != layout.numel() {
            return Err(DistError::Invalid(format!("params has {} elements, the layout has {}", params.len(), layout.numel())));
        }
        let (path, bytes) = read_verified(dir, &m.files[comm.rank()])?;
        let d = safetensors::decode(&bytes).map_err(|e| DistError::Checkpoint(format!("{}: {e}", path.display())))?;
        let extra_names: Vec<String> = d.metadata.get("extra").and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
        let steps = step_counts(&path, &d.metadata, layout.len())?;
        let (mut full, mut buffers, mut extra) = (vec![0f32; layout.numel()], BTreeMap::new(), BTreeMap::new());
        for (key, values) in &d.tensors {
            let (buffer, name) = key.split_once('/').map_or((None, key.as_str()), |(b, n)| (Some(b), n));
            let i = layout
                .index_of(name)
                .ok_or_else(|| DistError::Checkpoint(format!("{}: tensor '{key}' is not in the layout", path.display())))?;
            let range = layout.param(i).range();
            if values.len() != range.len() {
                return Err(DistError::Checkpoint(format!(
                    "{}: tensor '{key}' has {} elements, expected {}",
                    path.display(),
                    values.len(),
                    range.len()
                )));
            }
            let target = match buffer {
                None => &mut full,
                Some(b) if extra_names.iter().any(|e| e == b) => extra.entry(b.to_string()).or_insert_with(|| vec![0f32; layout.numel()]),
                Some(b) => buffers.entry(b.to_string()).or_insert_with(|| vec![0f32; layout.numel()]),
            };
            target[range].copy_from_slice(values);
        }
        let optimizer = OptimizerStateDict { layout: layout.clone(), shard: 0..layout.numel(), groups: m.groups.clone(), steps, buffers };
        let state = ReplicaState { optimizer, schedule_step: m.schedule_step, extra, counters: m.counters.clone() };
        Ok((m, state, full))
    })();
    let (m, state, full) = all_ok(comm, loaded, &format!("load {}", path.display()))?;
    params.copy_from_slice(&full);
    Ok((m, state))
}
