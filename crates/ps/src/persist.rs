//! A worker's checkpoint: one safetensors file, `DIR/worker.safetensors`, written
//! atomically (temporary file, fsync, rename, directory fsync), so a crash leaves the
//! previous checkpoint whole.
//!
//! Tensors: `param/<name>` with its real shape, and every optimizer's state as
//! `opt/<optimizer>/<buffer>/<param>` (torch's buffer names: `exp_avg`,
//! `momentum_buffer`…). `__metadata__` holds the optimizers' groups, schedules, step
//! counts and per-parameter step counts (JSON), and a CRC-32 of the tensors, so a
//! corrupted file is refused instead of loaded.

use crate::error::{PsError, Result};
use crate::protocol::GroupSpec;
use crate::state::{lock, LocalOptimizer, Param, WorkerState};
use distoptim::checkpoint::store::read_bounded;
use distoptim::checkpoint::write_atomic;
use distoptim::safetensors;
use distoptim_optim::{LrScheduler, Optimizer, OptimizerStateDict};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

pub const FILE: &str = "worker.safetensors";
const META_KEY: &str = "distoptim_ps";

#[derive(Serialize, Deserialize)]
struct SavedOptimizer {
    name: String,
    groups: Vec<GroupSpec>,
    schedule: Option<LrScheduler>,
    steps: u64,
    /// Per parameter: its optimizer's state dict, the buffers' values left empty (they
    /// are the tensors `opt/<optimizer>/<buffer>/<param>`).
    params: BTreeMap<String, OptimizerStateDict>,
}

/// CRC-32 over every tensor's name and little-endian values, in name order.
fn checksum(tensors: &BTreeMap<String, Vec<f32>>) -> String {
    let mut hasher = crc32fast::Hasher::new();
    let mut bytes = Vec::with_capacity(1 << 16);
    for (name, values) in tensors {
        hasher.update(name.as_bytes());
        for chunk in values.chunks(1 << 14) {
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
            hasher.update(&bytes);
        }
    }
    format!("{:08x}", hasher.finalize())
}

/// Saves everything; steps wait meanwhile (the snapshot is between two contexts).
pub(crate) fn save(state: &WorkerState, dir: &Path) -> Result<PathBuf> {
    let _no_step = lock(&state.apply);
    let mut tensors: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (name, p) in state.params.read().unwrap_or_else(PoisonError::into_inner).iter() {
        let p = lock(p);
        shapes.insert(format!("param/{name}"), p.shape.clone());
        tensors.insert(format!("param/{name}"), p.values.clone());
    }
    let mut saved = Vec::new();
    for (name, opt) in lock(&state.optimizers).iter() {
        let opt = lock(opt);
        let mut params = BTreeMap::new();
        for (pname, o) in &opt.per_param {
            let mut sd = o.state_dict();
            for (buffer, values) in sd.buffers.iter_mut() {
                tensors.insert(format!("opt/{name}/{buffer}/{pname}"), std::mem::take(values));
            }
            params.insert(pname.clone(), sd);
        }
        saved.push(SavedOptimizer {
            name: name.clone(),
            groups: opt.groups.clone(),
            schedule: opt.schedule.clone(),
            steps: opt.steps,
            params,
        });
    }
    let metadata = BTreeMap::from([
        (META_KEY.to_string(), serde_json::to_string(&saved).map_err(|e| PsError::Checkpoint(e.to_string()))?),
        ("crc32".to_string(), checksum(&tensors)),
    ]);
    // Real shapes for the parameters (Python sees `param/w` as [out, in]); flat state.
    let list: Vec<(String, Vec<usize>)> =
        tensors.iter().map(|(n, v)| (n.clone(), shapes.get(n).cloned().unwrap_or_else(|| vec![v.len()]))).collect();
    let (mut bytes, len) = safetensors::header(&list, distoptim::FloatDtype::F32, &metadata);
    bytes.reserve(len);
    for values in tensors.values() {
        safetensors::push_f32(&mut bytes, values);
    }
    std::fs::create_dir_all(dir).map_err(|e| PsError::Checkpoint(format!("{}: {e}", dir.display())))?;
    let path = dir.join(FILE);
    write_atomic(&path, &bytes).map_err(|e| PsError::Checkpoint(e.to_string()))?;
    Ok(path)
}

/// A worker state from `path` (a checkpoint, or any safetensors file of f32 tensors:
/// those become parameters under their own names, with no optimizer).
pub(crate) fn load(path: &Path) -> Result<WorkerState> {
    let bad = |msg: String| PsError::Checkpoint(format!("{}: {msg}", path.display()));
    // Only a regular file is read (never a FIFO or device), and no more than it holds.
    let bytes = read_bounded(path, u64::MAX >> 1).map_err(|e| bad(e.to_string()))?;
    let decoded = safetensors::decode(&bytes).map_err(bad)?;
    let state = WorkerState::default();
    let Some(meta) = decoded.metadata.get(META_KEY) else {
        // A plain model file: every tensor is a parameter.
        let mut params = state.params.write().unwrap_or_else(PoisonError::into_inner);
        for (name, values) in decoded.tensors {
            let shape = decoded.shapes.get(&name).cloned().unwrap_or_else(|| vec![values.len()]);
            params.insert(name, Arc::new(Mutex::new(Param { shape, values })));
        }
        drop(params);
        return Ok(state);
    };
    if decoded.metadata.get("crc32") != Some(&checksum(&decoded.tensors)) {
        return Err(bad("checksum does not match the tensors (corrupt file?)".into()));
    }
    let saved: Vec<SavedOptimizer> = serde_json::from_str(meta).map_err(|e| bad(format!("metadata: {e}")))?;
    let mut tensors = decoded.tensors;
    {
        let mut params = state.params.write().unwrap_or_else(PoisonError::into_inner);
        let names: Vec<String> = tensors.keys().filter(|k| k.starts_with("param/")).cloned().collect();
        for key in names {
            let values = tensors.remove(&key).unwrap_or_default();
            let shape = decoded.shapes.get(&key).cloned().unwrap_or_else(|| vec![values.len()]);
            params.insert(key["param/".len()..].to_string(), Arc::new(Mutex::new(Param { shape, values })));
        }
    }
    let mut optimizers = lock(&state.optimizers);
    for s in saved {
        let mut per_param = BTreeMap::new();
        for (pname, mut sd) in s.params {
            for (buffer, values) in sd.buffers.iter_mut() {
                let key = format!("opt/{}/{buffer}/{pname}", s.name);
                *values = tensors.remove(&key).ok_or_else(|| bad(format!("tensor '{key}' is missing")))?;
            }
            let mut o = Optimizer::with_groups(sd.layout.clone(), sd.groups.clone(), sd.shard.clone())
                .map_err(|e| bad(format!("'{pname}': {e}")))?;
            o.load_state_dict(&sd).map_err(|e| bad(format!("'{pname}': {e}")))?;
            per_param.insert(pname, o);
        }
        let local = LocalOptimizer { groups: s.groups, schedule: s.schedule, per_param, steps: s.steps };
        optimizers.insert(s.name, Arc::new(Mutex::new(local)));
    }
    drop(optimizers);
    Ok(state)
}
