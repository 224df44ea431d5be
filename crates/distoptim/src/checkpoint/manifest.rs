//! `manifest.json`: what a checkpoint holds, checksummed, and checked field by field
//! before anything is allocated from it.

use std::collections::BTreeMap;
use std::path::Path;

use distoptim_collective::shard_range;
use distoptim_optim::{Layout, ParamGroup};
use serde::{Deserialize, Serialize};

use super::store::{open_regular, read_bounded};
use crate::error::{DistError, Result};

/// The manifest format this build writes and reads (2: CRC-32 checksums, the manifest
/// itself checksummed, step directories).
pub const FORMAT_VERSION: u32 = 2;
/// Largest manifest read (a layout of a million parameters fits).
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// Most ranks a checkpoint may name.
pub const MAX_WORLD_SIZE: usize = 1 << 20;
/// Largest step or counter accepted: 2^53, so every one is exact as a JSON number.
pub const MAX_COUNTER: u64 = 1 << 53;

/// One rank's file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// `rank-RRRRR.safetensors`.
    pub name: String,
    /// The rank that wrote it.
    pub rank: usize,
    /// Elements `[start, end)` of the flat layout this file holds.
    pub range: [usize; 2],
    /// The file's length.
    pub bytes: u64,
    /// CRC-32 (zlib's polynomial, computed by `crc32fast` at memory speed) of the
    /// file's bytes, hex.
    pub crc32: String,
}

/// The mixed-precision part of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrecisionRecord {
    /// `bf16`, `f16` or `f32`: the working type of the run that saved.
    pub param_dtype: String,
    /// `f32` or `bf16`.
    pub reduce_dtype: String,
    /// The loss scale, under dynamic loss scaling.
    pub loss_scale: Option<f32>,
    /// Steps since the scale last changed.
    pub growth_tracker: u64,
}

/// What a checkpoint holds. Written last, so a directory with a valid manifest is whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// Ranks that wrote it.
    pub world_size: usize,
    /// The strategy that wrote it (`ddp`, `zero2`, `post_local_sgd`…).
    pub strategy: String,
    /// The parameters' names, shapes and places in the flat buffer.
    pub layout: Layout,
    /// Param groups with their hyperparameters.
    pub groups: Vec<ParamGroup>,
    /// Optimizer steps taken.
    pub step: u64,
    /// The LR schedule's position, if the run has a schedule.
    pub schedule_step: Option<u64>,
    /// Counters of the surrounding algorithm (the trainer's epoch, post-local SGD's step…).
    pub counters: BTreeMap<String, u64>,
    /// Each rank's file holds that rank's whole model and state
    /// ([`super::save_replicas`]) instead of its range of a shared one.
    #[serde(default)]
    pub per_rank: bool,
    /// The precision policy that wrote it and the loss scaler's state; absent for all-f32
    /// runs. The files hold the f32 master either way, so any policy can resume from any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<PrecisionRecord>,
    /// One entry per rank, in rank order.
    pub files: Vec<FileEntry>,
    /// CRC-32 of this manifest serialised with `checksum` empty, hex: an edited field is
    /// refused, not silently trusted.
    #[serde(default)]
    pub checksum: String,
}

/// CRC-32 of `bytes` as the manifest writes it.
pub fn crc32_hex(bytes: &[u8]) -> String {
    format!("{:08x}", crc32fast::hash(bytes))
}

fn bad(path: &Path, what: impl std::fmt::Display) -> DistError {
    DistError::Checkpoint(format!("{}: {what}", path.display()))
}

impl Manifest {
    fn canonical(&self) -> Result<Vec<u8>> {
        let unsummed = Manifest { checksum: String::new(), ..self.clone() };
        serde_json::to_vec_pretty(&unsummed).map_err(|e| DistError::Checkpoint(e.to_string()))
    }

    /// The manifest's bytes on disk, with its checksum filled in.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let sealed = Manifest { checksum: crc32_hex(&self.canonical()?), ..self.clone() };
        serde_json::to_vec_pretty(&sealed).map_err(|e| DistError::Checkpoint(e.to_string()))
    }

    /// Every field checked against the others, so that nothing read later can be sized
    /// by a number the files do not back.
    fn validate(&self, path: &Path) -> Result<()> {
        if self.format_version != FORMAT_VERSION {
            return Err(bad(path, format!("format version {} (this build reads {FORMAT_VERSION})", self.format_version)));
        }
        if self.checksum != crc32_hex(&self.canonical()?) {
            return Err(bad(path, "the manifest's checksum does not match its contents (edited or corrupt)"));
        }
        let rebuilt = Layout::new(self.layout.params().iter().map(|p| (p.name.clone(), p.shape.clone())))
            .map_err(|e| bad(path, format!("layout: {e}")))?;
        if rebuilt != self.layout {
            return Err(bad(path, "the layout's offsets or element count do not follow from its shapes"));
        }
        let w = self.world_size;
        if !(1..=MAX_WORLD_SIZE).contains(&w) || self.files.len() != w {
            return Err(bad(path, format!("world size {w} with {} files (1..={MAX_WORLD_SIZE}, one file per rank)", self.files.len())));
        }
        for (name, v) in [("step", self.step), ("schedule_step", self.schedule_step.unwrap_or(0))]
            .into_iter()
            .chain(self.counters.iter().map(|(k, v)| (k.as_str(), *v)))
        {
            if v > MAX_COUNTER {
                return Err(bad(path, format!("{name} {v} is over {MAX_COUNTER}")));
            }
        }
        if let Some(p) = &self.precision {
            for d in [&p.param_dtype, &p.reduce_dtype] {
                d.parse::<crate::FloatDtype>().map_err(|e| bad(path, format!("precision: {e}")))?;
            }
            if p.loss_scale.is_some_and(|s| !(s.is_finite() && s > 0.0)) || p.growth_tracker > MAX_COUNTER {
                return Err(bad(
                    path,
                    format!("precision: loss scale {:?} / growth tracker {} out of range", p.loss_scale, p.growth_tracker),
                ));
            }
        }
        for g in &self.groups {
            if let Some(&i) = g.params.iter().find(|&&i| i >= self.layout.len()) {
                return Err(bad(path, format!("a param group names parameter {i} of {}", self.layout.len())));
            }
        }
        let numel = self.layout.numel();
        for (r, f) in self.files.iter().enumerate() {
            let want = if self.per_rank { 0..numel } else { shard_range(numel, w, r) };
            if f.rank != r || f.name != file_name(r) || f.range != [want.start, want.end] {
                return Err(bad(path, format!("file entry {r} ({}, range {:?}) is not rank {r}'s", f.name, f.range)));
            }
            // Every element is stored as 4 bytes at least once: a huge layout needs huge files.
            if f.bytes < 4 * (want.len() as u64) {
                return Err(bad(path, format!("{} has {} bytes, too few for its {} elements", f.name, f.bytes, want.len())));
            }
        }
        Ok(())
    }

    /// Checks that every file the manifest names is a regular file of its recorded size
    /// (the cheap test of a whole checkpoint; the checksums are read when loading).
    pub fn check_files(&self, dir: &Path) -> Result<()> {
        for f in &self.files {
            let (_, len) = open_regular(&dir.join(&f.name))?;
            if len != f.bytes {
                return Err(bad(&dir.join(&f.name), format!("{len} bytes, the manifest says {}", f.bytes)));
            }
        }
        Ok(())
    }
}

/// The name of rank `r`'s file.
pub fn file_name(r: usize) -> String {
    format!("rank-{r:05}.safetensors")
}

/// Reads and checks the manifest of the checkpoint directory `dir` (a step directory).
pub fn read(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = read_bounded(&path, MAX_MANIFEST_BYTES)?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| bad(&path, e))?;
    m.validate(&path)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use distoptim_optim::{AdamConfig, MuonConfig, OptimizerConfig};

    /// The checksum is taken over the manifest serialised again after parsing: every f64
    /// (a scheduled lr) must parse back to the same bits, or a good checkpoint is refused.
    #[test]
    fn every_lr_round_trips_through_json() {
        for lr in [0.013090169943749475, 0.006545084971874737, 1.0 / 3.0, 2.9e-3, 1e-300] {
            let groups = vec![
                ParamGroup { params: vec![0], config: OptimizerConfig::Muon(MuonConfig { lr, ..Default::default() }) },
                ParamGroup { params: vec![1], config: OptimizerConfig::Adam(AdamConfig { lr, ..AdamConfig::adamw() }) },
            ];
            let text = serde_json::to_string(&groups).unwrap();
            let back: Vec<ParamGroup> = serde_json::from_str(&text).unwrap();
            assert_eq!(back, groups, "{lr}");
        }
    }
}
