//! Checkpoints that survive crashes and reload at another world size.
//!
//! A checkpoint is a directory:
//! - `rank-0000R.safetensors`, one per rank, holding the rank's balanced range
//!   `shard_range(numel, W, R)` of the parameters (`fc.weight`) and of every optimizer
//!   state buffer (`exp_avg/fc.weight`, `momentum_buffer/fc.weight`, …), with
//!   `offset/<param>` metadata where a range starts inside a parameter. DDP ranks write
//!   their range of the replicated state, so every strategy writes in parallel and the
//!   files look the same;
//! - `manifest.json`: format version, world size, strategy, layout, param groups, step,
//!   schedule position, algorithm counters, and the size and FNV-64 checksum of each file.
//!
//! Crash safety: everything is written into `DIR.partial` (each file through a temporary
//! name, fsync, rename), the manifest last, and then the directory is renamed into place,
//! so `DIR` is either the previous checkpoint or the complete new one. Loading verifies
//! every file's checksum and reassembles whatever range the loading rank owns, so a run
//! resumes on any number of ranks and with any strategy.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use distoptim_collective::{shard_range, Communicator, ReduceOp};
use distoptim_optim::{Layout, OptimizerStateDict, ParamGroup};
use serde::{Deserialize, Serialize};

use crate::error::{DistError, Result};
use crate::optimizer::DistributedOptimizer;
use crate::safetensors;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub rank: usize,
    /// Elements `[start, end)` of the flat layout this file holds.
    pub range: [usize; 2],
    pub bytes: u64,
    /// FNV-1a 64 of the file's bytes, hex.
    pub fnv64: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub world_size: usize,
    pub strategy: String,
    pub layout: Layout,
    pub groups: Vec<ParamGroup>,
    /// Optimizer steps taken.
    pub step: u64,
    pub schedule_step: Option<u64>,
    /// Counters of the surrounding algorithm (the trainer's epoch, post-local SGD's step…).
    pub counters: BTreeMap<String, u64>,
    /// Each rank's file holds that rank's whole model and state ([`save_replicas`])
    /// instead of its range of a shared one.
    #[serde(default)]
    pub per_rank: bool,
    pub files: Vec<FileEntry>,
}

fn io(path: &Path, e: std::io::Error) -> DistError {
    DistError::Checkpoint(format!("{}: {e}", path.display()))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Continues an FNV-1a 64 checksum over more bytes (start from [`fnv64`]`(&[])`).
pub fn fnv64_update(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// FNV-1a 64, the checksum of checkpoint files.
pub fn fnv64(bytes: &[u8]) -> u64 {
    fnv64_update(FNV_OFFSET, bytes)
}

fn mismatch(path: &Path) -> DistError {
    DistError::Checkpoint(format!("{}: size or checksum does not match the manifest (corrupt file?)", path.display()))
}

/// Checks a file against its manifest entry, reading it in blocks (memory stays small
/// whatever the file's size).
pub(crate) fn verify_file(dir: &Path, entry: &FileEntry) -> Result<PathBuf> {
    use std::io::Read;
    let path = dir.join(&entry.name);
    let mut file = fs::File::open(&path).map_err(|e| io(&path, e))?;
    let (mut hash, mut len, mut block) = (FNV_OFFSET, 0u64, vec![0u8; 1 << 20]);
    loop {
        let n = file.read(&mut block).map_err(|e| io(&path, e))?;
        if n == 0 {
            break;
        }
        hash = fnv64_update(hash, &block[..n]);
        len += n as u64;
    }
    if len != entry.bytes || format!("{hash:016x}") != entry.fnv64 {
        return Err(mismatch(&path));
    }
    Ok(path)
}

/// Writes `bytes` to `path` through a temporary name, fsynced: never half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    // The rename itself is durable once the directory is synced.
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::File::open(parent).and_then(|d| d.sync_all()).map_err(|e| io(parent, e))?;
    }
    Ok(())
}

/// Every rank learns whether every rank's part succeeded; the failing rank keeps its
/// own error, the others get one naming it.
fn all_ok<T>(comm: &Communicator, local: Result<T>, what: &str) -> Result<T> {
    let mut failed = vec![0i32; comm.size()];
    failed[comm.rank()] = i32::from(local.is_err());
    comm.all_reduce(&mut failed, ReduceOp::Max)?;
    match (local, failed.iter().position(|&f| f != 0)) {
        (Err(e), _) => Err(e),
        (Ok(_), Some(r)) => Err(DistError::Checkpoint(format!("rank {r} failed to {what}"))),
        (Ok(v), None) => Ok(v),
    }
}

fn staging(dir: &Path) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Saves `params` (the full buffer; ZeRO-3: gather first) and the optimizer into `dir`.
/// Collective over the optimizer's group.
pub fn save(dir: &Path, opt: &DistributedOptimizer, params: &[f32], counters: &BTreeMap<String, u64>) -> Result<Manifest> {
    let comm = opt.comm();
    let numel = opt.layout().numel();
    let range = shard_range(numel, comm.size(), comm.rank());
    let state = opt.state_dict();
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
        files: Vec::new(),
    };
    write(dir, comm, spec, params, part, &BTreeMap::new())
}

/// What a rank of an algorithm whose ranks hold different models (post-local SGD
/// between averagings, DiLoCo's inner models) needs to resume besides its parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaState {
    /// The rank's optimizer state over the whole layout.
    pub optimizer: OptimizerStateDict,
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
pub fn save_replicas(dir: &Path, comm: &Communicator, strategy: &str, params: &[f32], state: &ReplicaState) -> Result<Manifest> {
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
        files: Vec::new(),
        layout,
    };
    write(dir, comm, spec, params, Ok(state.optimizer.clone()), &state.extra)
}

/// The part of the file of one rank: its range of the parameters, of the optimizer
/// state (`state` covers the range) and of the extra buffers (which cover the layout).
fn encode_part(
    layout: &Layout,
    range: Range<usize>,
    params: &[f32],
    state: &OptimizerStateDict,
    extra: &BTreeMap<String, Vec<f32>>,
) -> Result<Vec<u8>> {
    let numel = layout.numel();
    if params.len() != numel || extra.values().any(|v| v.len() != numel) {
        return Err(DistError::Invalid(format!("params and extra buffers must have the layout's {numel} elements")));
    }
    let mut tensors: Vec<(String, &[f32])> = Vec::new();
    let mut metadata = BTreeMap::from([("range".to_string(), format!("{},{}", range.start, range.end))]);
    metadata.insert("steps".into(), serde_json::to_string(&state.steps).unwrap_or_default());
    if !extra.is_empty() {
        metadata.insert("extra".into(), serde_json::to_string(&extra.keys().collect::<Vec<_>>()).unwrap_or_default());
    }
    for (i, piece) in layout.overlapping(range.clone()) {
        let p = layout.param(i);
        tensors.push((p.name.clone(), &params[piece.clone()]));
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

/// Writes every rank's file into the staging directory, then rank 0 writes the manifest
/// (`spec` with the files filled in) and swaps the directory into place.
fn write(
    dir: &Path,
    comm: &Communicator,
    mut spec: Manifest,
    params: &[f32],
    state: Result<OptimizerStateDict>,
    extra: &BTreeMap<String, Vec<f32>>,
) -> Result<Manifest> {
    let (me, n) = (comm.rank(), comm.size());
    let numel = spec.layout.numel();
    let range_of = |r: usize| if spec.per_rank { 0..numel } else { shard_range(numel, n, r) };
    let stage = staging(dir);
    let prepared = if me == 0 {
        let _ = fs::remove_dir_all(&stage);
        fs::create_dir_all(&stage).map_err(|e| io(&stage, e))
    } else {
        Ok(())
    };
    all_ok(comm, prepared, &format!("create {}", stage.display()))?;

    let written = state.and_then(|state| encode_part(&spec.layout, range_of(me), params, &state, extra)).and_then(|bytes| {
        write_atomic(&stage.join(format!("rank-{me:05}.safetensors")), &bytes)?;
        Ok((bytes.len() as u64, fnv64(&bytes)))
    });
    let (bytes, sum) = all_ok(comm, written, "write its checkpoint file")?;

    let mut sums = vec![0i64; 2 * n];
    sums[2 * me] = bytes as i64;
    sums[2 * me + 1] = sum as i64;
    comm.all_gather(&mut sums)?;
    spec.files = (0..n)
        .map(|r| {
            let range = range_of(r);
            FileEntry {
                name: format!("rank-{r:05}.safetensors"),
                rank: r,
                range: [range.start, range.end],
                bytes: sums[2 * r] as u64,
                fnv64: format!("{:016x}", sums[2 * r + 1] as u64),
            }
        })
        .collect();
    let manifest = spec;
    let published = if me == 0 {
        (|| {
            let text = serde_json::to_vec_pretty(&manifest).map_err(|e| DistError::Checkpoint(e.to_string()))?;
            write_atomic(&stage.join("manifest.json"), &text)?;
            // Swap in: the old checkpoint goes only once the new one is complete.
            let old = dir.with_extension("old");
            if dir.exists() {
                let _ = fs::remove_dir_all(&old);
                fs::rename(dir, &old).map_err(|e| io(dir, e))?;
            }
            fs::rename(&stage, dir).map_err(|e| io(dir, e))?;
            let _ = fs::remove_dir_all(&old);
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                let _ = fs::File::open(parent).and_then(|d| d.sync_all());
            }
            Ok(())
        })()
    } else {
        Ok(())
    };
    all_ok(comm, published, &format!("publish {}", dir.display()))?;
    Ok(manifest)
}

/// Reads and checks the manifest of a checkpoint.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = fs::read(&path).map_err(|e| io(&path, e))?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| DistError::Checkpoint(format!("{}: {e}", path.display())))?;
    if m.format_version != FORMAT_VERSION {
        return Err(DistError::Checkpoint(format!(
            "{}: format version {} (this build reads {FORMAT_VERSION})",
            path.display(),
            m.format_version
        )));
    }
    if m.per_rank {
        let whole = [0, m.layout.numel()];
        if m.files.len() != m.world_size || m.files.iter().enumerate().any(|(r, f)| f.rank != r || f.range != whole || f.name.contains('/'))
        {
            return Err(DistError::Checkpoint(format!("{}: a per-rank checkpoint needs one whole-layout file per rank", path.display())));
        }
        return Ok(m);
    }
    let mut next = 0;
    for f in &m.files {
        if f.range[0] != next || f.range[1] < f.range[0] || f.name.contains('/') {
            return Err(DistError::Checkpoint(format!("{}: file {} does not continue the ranges", path.display(), f.name)));
        }
        next = f.range[1];
    }
    if next != m.layout.numel() {
        return Err(DistError::Checkpoint(format!("{}: files cover {next} of {} elements", path.display(), m.layout.numel())));
    }
    Ok(m)
}

/// Loads a checkpoint written by [`save`] on any number of ranks into `params` (the full
/// buffer) and `opt` (its own range of the state), whatever its strategy and group size.
/// Every rank calls it; nothing is changed unless everything checks out.
pub fn load(dir: &Path, opt: &mut DistributedOptimizer, params: &mut [f32]) -> Result<Manifest> {
    let loaded = load_local(dir, opt, params);
    all_ok(opt.comm(), loaded, &format!("load {}", dir.display()))
}

fn load_local(dir: &Path, opt: &mut DistributedOptimizer, params: &mut [f32]) -> Result<Manifest> {
    let m = read_manifest(dir)?;
    if m.per_rank {
        return Err(DistError::Checkpoint(format!("{} holds per-rank models ({}); load it with load_replicas", dir.display(), m.strategy)));
    }
    let layout = opt.layout().clone();
    if m.layout != layout {
        return Err(DistError::Checkpoint(format!("{} was saved for another parameter layout", dir.display())));
    }
    if params.len() != layout.numel() {
        return Err(DistError::Invalid(format!("params has {} elements, the layout has {}", params.len(), layout.numel())));
    }
    let owned = opt.owned();
    let mut full = vec![0f32; layout.numel()];
    let mut buffers: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut steps = vec![0u64; layout.len()];
    for f in &m.files {
        let path = dir.join(&f.name);
        let bytes = fs::read(&path).map_err(|e| io(&path, e))?;
        if bytes.len() as u64 != f.bytes || format!("{:016x}", fnv64(&bytes)) != f.fnv64 {
            return Err(mismatch(&path));
        }
        let d = safetensors::decode(&bytes).map_err(|e| DistError::Checkpoint(format!("{}: {e}", path.display())))?;
        let file_steps: Vec<u64> = d.metadata.get("steps").and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
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
    params.copy_from_slice(&full);
    Ok(m)
}

/// Loads what [`save_replicas`] wrote: this rank's file into `params` and the returned
/// state. The world size and layout must be those that saved. Collective over `comm`;
/// nothing is returned unless every rank's file checks out.
pub fn load_replicas(dir: &Path, comm: &Communicator, layout: &Layout, params: &mut [f32]) -> Result<(Manifest, ReplicaState)> {
    let loaded = (|| {
        let m = read_manifest(dir)?;
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
        if &m.layout != layout || params.len() != layout.numel() {
            return Err(DistError::Checkpoint(format!("{} was saved for another parameter layout", dir.display())));
        }
        let path = verify_file(dir, &m.files[comm.rank()])?;
        let bytes = fs::read(&path).map_err(|e| io(&path, e))?;
        let d = safetensors::decode(&bytes).map_err(|e| DistError::Checkpoint(format!("{}: {e}", path.display())))?;
        let extra_names: Vec<String> = d.metadata.get("extra").and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
        let steps: Vec<u64> = d.metadata.get("steps").and_then(|s| serde_json::from_str(s).ok()).unwrap_or_else(|| vec![0; layout.len()]);
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
    let (m, state, full) = all_ok(comm, loaded, &format!("load {}", dir.display()))?;
    params.copy_from_slice(&full);
    Ok((m, state))
}
