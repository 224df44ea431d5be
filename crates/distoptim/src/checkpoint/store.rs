//! The checkpoint directory: step directories, an atomically replaced `latest` pointer,
//! retention, and the file operations underneath, each of them a fault-injection point.
//!
//! ```text
//! ROOT/                      the user's --checkpoint-dir (anything else in it is left alone)
//!   step-0000000100/         one complete checkpoint: rank files + manifest.json
//!   step-0000000200/
//!   latest                   "step-0000000200\n", replaced by rename
//!   .lock                    flock(2)-ed by the job's rank 0 while it saves into ROOT
//!   .staging-…/ .trash-…/    a save in progress, a step directory being deleted
//! ```
//!
//! A save writes into a fresh `.staging-*` directory, renames it to its `step-*` name
//! (one atomic rename inside ROOT), then replaces `latest`, then deletes step
//! directories beyond the retention count (each first renamed to `.trash-*`, so a
//! half-deleted one never looks like a checkpoint). A crash between any two of these
//! operations leaves `latest` naming a complete checkpoint, or, before the first
//! pointer, a complete `step-*` directory that [`resolve`] finds by scanning. Only names
//! of those four shapes are ever renamed or deleted: the store never touches a path it
//! did not create, whatever ROOT is called.
//!
//! Fault injection: every file operation of a save first calls [`fault_point`]. With
//! `DISTOPTIM_FAULT_AT=N` in the environment (and `DISTOPTIM_FAULT_RANK=R` matching
//! `RANK`, if given), the N-th such point of the process kills it with SIGKILL, as a crash
//! would; `DISTOPTIM_FAULT_TRACE=1` prints each point to stderr. The fault-injection
//! tests count the points of a run this way and then kill it at every one of them.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::error::{DistError, Result};

/// The pointer file inside the checkpoint root.
pub const LATEST: &str = "latest";
const LOCK: &str = ".lock";
const STAGING: &str = ".staging-";
const TRASH: &str = ".trash-";
/// `latest` holds one directory name: anything longer is damage.
const MAX_POINTER_BYTES: u64 = 256;

pub(crate) fn io(path: &Path, e: std::io::Error) -> DistError {
    DistError::Checkpoint(format!("{}: {e}", path.display()))
}

struct FaultPlan {
    at: Option<u64>,
    trace: bool,
}

static FAULT_COUNT: AtomicU64 = AtomicU64::new(0);

fn fault_plan() -> &'static FaultPlan {
    static PLAN: OnceLock<FaultPlan> = OnceLock::new();
    PLAN.get_or_init(|| {
        let rank_matches = match std::env::var("DISTOPTIM_FAULT_RANK") {
            Ok(r) => std::env::var("RANK").is_ok_and(|mine| mine == r),
            Err(_) => true,
        };
        // Under an elastic launcher: only in the start DISTOPTIM_FAULT_RESTART names (the
        // first by default), so a restarted job does not meet the same fault again.
        let wanted = std::env::var("DISTOPTIM_FAULT_RESTART").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let rank_matches = rank_matches && crate::elastic::restart_count() == wanted;
        let at = std::env::var("DISTOPTIM_FAULT_AT").ok().and_then(|s| s.parse().ok()).filter(|_| rank_matches);
        let trace = std::env::var_os("DISTOPTIM_FAULT_TRACE").is_some() && rank_matches;
        FaultPlan { at, trace }
    })
}

/// Called before every file operation of a save (see the module docs): the process dies
/// here when this is the point named by `DISTOPTIM_FAULT_AT`.
pub fn fault_point(what: &str, path: &Path) {
    let plan = fault_plan();
    if plan.at.is_none() && !plan.trace {
        return;
    }
    let n = FAULT_COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    if plan.trace {
        eprintln!("fault point {n}: {what} {}", path.display());
    }
    if plan.at == Some(n) {
        eprintln!("fault injection: killing this process at point {n} ({what} {})", path.display());
        // SAFETY: raise(2) on our own process; SIGKILL cannot be caught, as in a crash.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

/// Opens `path` for reading only if it is a regular file: a FIFO, device or symbolic
/// link is refused before any read can block or run forever.
pub fn open_regular(path: &Path) -> Result<(fs::File, u64)> {
    let meta = fs::symlink_metadata(path).map_err(|e| io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(DistError::Checkpoint(format!("{}: not a regular file (a link, FIFO or device is never read)", path.display())));
    }
    let file = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(|e| io(path, e))?;
    // Checked again on the open file: the path may have been swapped in between.
    let meta = file.metadata().map_err(|e| io(path, e))?;
    if !meta.is_file() {
        return Err(DistError::Checkpoint(format!("{}: not a regular file", path.display())));
    }
    Ok((file, meta.len()))
}

/// Reads a whole regular file of at most `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    if len > limit {
        return Err(DistError::Checkpoint(format!("{}: {len} bytes, over the limit of {limit}", path.display())));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(DistError::Checkpoint(format!("{}: grew past the limit of {limit} bytes while read", path.display())));
    }
    Ok(bytes)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fault_point("fsync directory", dir);
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))
}

fn parent_of(path: &Path) -> Option<&Path> {
    path.parent().filter(|p| !p.as_os_str().is_empty())
}

/// Writes `bytes` to `path` through a temporary name, fsynced, renamed, and the
/// directory fsynced: the file is either absent, the old one, or the whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fault_point("create", &tmp);
    let mut f = fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    fault_point("write and fsync", &tmp);
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| io(&tmp, e))?;
    fault_point("rename", path);
    fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    match parent_of(path) {
        Some(parent) => sync_dir(parent),
        None => sync_dir(Path::new(".")),
    }
}

/// A step directory's name: `step-` and ten digits, then `.K` when a checkpoint of the
/// same step was already published.
pub fn step_dir_name(step: u64, again: u32) -> String {
    if again == 0 {
        format!("step-{step:010}")
    } else {
        format!("step-{step:010}.{again}")
    }
}

/// `(step, K)` of a step directory's name; `None` for any other name.
pub fn parse_step_dir(name: &str) -> Option<(u64, u32)> {
    let rest = name.strip_prefix("step-")?;
    let (digits, again) = match rest.split_once('.') {
        Some((d, k)) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) && !k.starts_with('0') => (d, k.parse().ok()?),
        Some(_) => return None,
        None => (rest, 0),
    };
    if digits.len() < 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step = digits.parse().ok()?;
    // Only the one spelling this module writes.
    (step_dir_name(step, again) == name).then_some((step, again))
}

/// The step directories in `root`, newest first.
fn step_dirs(root: &Path) -> Result<Vec<(u64, u32, String)>> {
    let mut dirs = Vec::new();
    for entry in fs::read_dir(root).map_err(|e| io(root, e))? {
        let entry = entry.map_err(|e| io(root, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        if let Some((step, again)) = parse_step_dir(&name) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push((step, again, name));
            }
        }
    }
    dirs.sort_unstable_by_key(|d| std::cmp::Reverse((d.0, d.1)));
    Ok(dirs)
}

/// The locks this process holds, by root: a job's rank 0 keeps its root's lock until
/// it exits, so a second job cannot save into the same root meanwhile (the kernel drops
/// the lock when the process dies, however it dies).
fn held_locks() -> &'static Mutex<HashMap<PathBuf, fs::File>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, fs::File>>> = OnceLock::new();
    LOCKS.get_or_init(Mutex::default)
}

fn lock_root(root: &Path) -> Result<()> {
    let key = fs::canonicalize(root).map_err(|e| io(root, e))?;
    let mut held = held_locks().lock().unwrap_or_else(PoisonError::into_inner);
    if held.contains_key(&key) {
        return Ok(());
    }
    let path = root.join(LOCK);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut owner = String::new();
        let _ = file.read_to_string(&mut owner);
        return Err(DistError::Checkpoint(format!(
            "{} is in use by another job ({}): give each job its own checkpoint directory",
            root.display(),
            owner.trim()
        )));
    }
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let _ = file.set_len(0).and_then(|_| write!(file, "pid {} on {}", std::process::id(), host.trim()));
    held.insert(key, file);
    Ok(())
}

/// Rank 0's first part of a save: makes sure `root` is a directory this job may save
/// into, locks it, removes what crashed saves left, and creates a fresh staging
/// directory. Returns its name.
pub fn begin(root: &Path, step: u64, nonce: u64) -> Result<String> {
    if root.join("manifest.json").exists() {
        return Err(DistError::Checkpoint(format!(
            "{} is itself a checkpoint (an older layout): save into another directory; it can still be resumed from",
            root.display()
        )));
    }
    fs::create_dir_all(root).map_err(|e| io(root, e))?;
    lock_root(root)?;
    for entry in fs::read_dir(root).map_err(|e| io(root, e))?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Under the lock, a staging or trash directory is a dead save's: ours to remove.
        if name.starts_with(STAGING) || name.starts_with(TRASH) {
            fault_point("remove stale", &entry.path());
            fs::remove_dir_all(entry.path()).map_err(|e| io(&entry.path(), e))?;
        }
    }
    let name = format!("{STAGING}{step:010}-{nonce:016x}");
    let stage = root.join(&name);
    fault_point("create staging", &stage);
    fs::create_dir(&stage).map_err(|e| io(&stage, e))?;
    Ok(name)
}

/// The staging directory of a save, as every rank names it.
pub fn staging_dir(root: &Path, step: u64, nonce: u64) -> PathBuf {
    root.join(format!("{STAGING}{step:010}-{nonce:016x}"))
}

/// Removes a failed save's staging directory (best effort: the next save removes it too).
pub fn abandon(stage: &Path) {
    let _ = fs::remove_dir_all(stage);
}

/// Rank 0's last part of a save: publishes the complete staging directory as the step
/// directory, points `latest` at it, and keeps the newest `keep` step directories.
/// Returns the published directory's suffix (see [`step_dir_name`]).
pub fn publish(root: &Path, stage: &Path, step: u64, keep: Option<usize>) -> Result<u32> {
    let mut again = 0;
    let target = loop {
        let candidate = root.join(step_dir_name(step, again));
        if fs::symlink_metadata(&candidate).is_err() {
            break candidate;
        }
        again += 1;
    };
    fault_point("publish", &target);
    fs::rename(stage, &target).map_err(|e| io(&target, e))?;
    sync_dir(root)?;
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    write_atomic(&root.join(LATEST), format!("{name}\n").as_bytes())?;
    if let Some(keep) = keep {
        for (_, _, old) in step_dirs(root)?.into_iter().filter(|(_, _, n)| *n != name).skip(keep.saturating_sub(1)) {
            let doomed = root.join(&old);
            let trash = root.join(format!("{TRASH}{old}"));
            fault_point("retire", &doomed);
            fs::rename(&doomed, &trash).map_err(|e| io(&doomed, e))?;
            fault_point("delete", &trash);
            fs::remove_dir_all(&trash).map_err(|e| io(&trash, e))?;
        }
    }
    Ok(again)
}

/// How [`resolve`] found the checkpoint it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// The path is a checkpoint itself (a step directory, or an older single directory).
    Direct,
    /// Through the `latest` pointer.
    Latest,
    /// By scanning: `latest` was missing or damaged, and this is the newest complete
    /// step directory.
    Scan,
}

/// The checkpoint that `path` names: `path` itself if it holds a manifest, else the step
/// directory `path/latest` points to, else the newest complete step directory in `path`.
/// `open` reads a candidate directory and fails unless it is a whole checkpoint; its value
/// for the chosen directory is returned, so nothing is read twice.
pub fn resolve<T>(path: &Path, open: impl Fn(&Path) -> Result<T>) -> Result<(PathBuf, T, Found)> {
    if fs::symlink_metadata(path.join("manifest.json")).is_ok() {
        return Ok((path.to_path_buf(), open(path)?, Found::Direct));
    }
    if !path.is_dir() {
        return Err(DistError::Checkpoint(format!("{}: no such checkpoint directory", path.display())));
    }
    let pointer = read_bounded(&path.join(LATEST), MAX_POINTER_BYTES).ok().and_then(|bytes| {
        let name = String::from_utf8(bytes).ok()?;
        let name = name.trim_end_matches('\n');
        parse_step_dir(name).map(|_| path.join(name))
    });
    if let Some(dir) = pointer {
        if let Ok(value) = open(&dir) {
            return Ok((dir, value, Found::Latest));
        }
    }
    let mut reasons = Vec::new();
    for (_, _, name) in step_dirs(path)? {
        let dir = path.join(&name);
        match open(&dir) {
            Ok(value) => return Ok((dir, value, Found::Scan)),
            Err(e) => reasons.push(e.to_string()),
        }
    }
    Err(DistError::Checkpoint(format!(
        "{}: no complete checkpoint (no manifest.json, no valid '{LATEST}' pointer, no complete step-* directory{}{})",
        path.display(),
        if reasons.is_empty() { "" } else { "; " },
        reasons.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_round_trip_and_nothing_else_parses() {
        assert_eq!(parse_step_dir(&step_dir_name(42, 0)), Some((42, 0)));
        assert_eq!(parse_step_dir(&step_dir_name(u64::MAX / 10, 3)), Some((u64::MAX / 10, 3)));
        for name in [
            "step-1",
            "step-00000000001",
            "step-0012345678901",
            "step-000000000a",
            "step-0000000001.",
            "step-0000000001.01",
            "ckpt.old",
            "latest",
            ".staging-x",
        ] {
            assert_eq!(parse_step_dir(name), None, "{name}");
        }
    }

    #[test]
    fn only_regular_files_are_opened() {
        let dir = std::env::temp_dir().join(format!("distoptim-store-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let link = dir.join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        for (path, what) in [(&fifo, "fifo"), (&link, "link"), (&PathBuf::from("/dev/zero"), "device")] {
            let e = read_bounded(path, 1 << 20).unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{what}: {e}");
        }
        fs::write(dir.join("big"), vec![0u8; 100]).unwrap();
        assert!(read_bounded(&dir.join("big"), 99).unwrap_err().to_string().contains("over the limit"));
        let _ = fs::remove_dir_all(&dir);
    }
}
