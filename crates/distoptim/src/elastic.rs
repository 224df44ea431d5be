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
