//! Where shared regions come from. The algorithms only need "a region every rank can
//! map by name", so the threads backend (heap blocks in one process) and the shm backend
//! (files in /dev/shm, mapped by several processes) differ only here.

use crate::error::{CommError, Result};
use std::any::Any;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A mapped region; clones share the mapping, which lives as long as any clone.
#[derive(Clone)]
pub(crate) struct Region {
    ptr: *mut u8,
    len: usize,
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the region is plain shared memory; every access goes through raw pointers
// and atomics under the protocol of the engine.
unsafe impl Send for Region {}
// SAFETY: as for Send: no access bypasses the engine's protocol.
unsafe impl Sync for Region {}

impl Region {
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// Identity of a rank's process, to tell a live peer from a dead one (or a reused pid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcessId {
    pub pid: u64,
    pub start_time: u64,
}

pub(crate) trait Memory: Send + Sync {
    /// Creates a zeroed region of `len` bytes, runs `init` on it, then publishes it
    /// under `name` (atomically: nobody can open it half-initialised).
    fn create(&self, name: &str, len: usize, init: &dyn Fn(&Region)) -> Result<Region>;
    /// Opens a published region, waiting until `deadline` for it to appear.
    fn open(&self, name: &str, deadline: Instant) -> Result<Region>;
    /// Removes the name; mappings stay valid.
    fn unlink(&self, name: &str);
    fn me(&self) -> ProcessId;
    /// Whether the process is still running (never true for a zombie).
    fn alive(&self, id: ProcessId) -> bool;
}

const PAGE: usize = 4096;

fn round_up(len: usize) -> usize {
    len.max(1).div_ceil(PAGE) * PAGE
}

/// Heap blocks in one process, for the threads backend.
#[derive(Default)]
pub(crate) struct HeapMemory {
    published: Mutex<HashMap<String, Region>>,
}

struct HeapBlock {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: a HeapBlock owns its allocation (freed once, in Drop); the memory is shared by
// the threads of one group only through the engine's protocol, like a Region.
unsafe impl Send for HeapBlock {}
// SAFETY: as for Send.
unsafe impl Sync for HeapBlock {}

impl Drop for HeapBlock {
    fn drop(&mut self) {
        // SAFETY: allocated in `create` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

impl Memory for HeapMemory {
    fn create(&self, name: &str, len: usize, init: &dyn Fn(&Region)) -> Result<Region> {
        let len = round_up(len);
        let layout = std::alloc::Layout::from_size_align(len, PAGE).map_err(|e| CommError::invalid("alloc", e.to_string()))?;
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(CommError::invalid("alloc", format!("out of memory allocating {len} bytes")));
        }
        let region = Region { ptr, len, _owner: Arc::new(HeapBlock { ptr, layout }) };
        init(&region);
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        if published.contains_key(name) {
            return Err(CommError::Join(format!("region {name} already exists")));
        }
        published.insert(name.to_string(), region.clone());
        Ok(region)
    }

    fn open(&self, name: &str, deadline: Instant) -> Result<Region> {
        loop {
            if let Some(r) = self.published.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
                return Ok(r.clone());
            }
            if Instant::now() > deadline {
                return Err(CommError::Join(format!("region {name} did not appear in time")));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn unlink(&self, name: &str) {
        self.published.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }

    fn me(&self) -> ProcessId {
        ProcessId { pid: u64::from(std::process::id()), start_time: 0 }
    }

    fn alive(&self, _id: ProcessId) -> bool {
        // Threads die with their process; a thread that unwinds marks itself as left.
        true
    }
}

/// Files in a tmpfs directory (`/dev/shm`), for ranks in separate processes.
pub(crate) struct FileMemory {
    dir: PathBuf,
}

impl FileMemory {
    /// `DISTOPTIM_SHM_DIR` overrides `/dev/shm` (which must be a tmpfs for speed).
    pub(crate) fn new() -> FileMemory {
        let dir = std::env::var_os("DISTOPTIM_SHM_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/dev/shm"));
        FileMemory { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn map(file: &File, path: &std::path::Path) -> Result<Region> {
        // SAFETY: the file is private to the job (0600, unguessable name) and only ever
        // accessed through the engine's protocol.
        let map = unsafe { memmap2::MmapMut::map_mut(file) }.map_err(|e| CommError::io(path.display().to_string(), e))?;
        let mut map = map;
        let (ptr, len) = (map.as_mut_ptr(), map.len());
        Ok(Region { ptr, len, _owner: Arc::new(map) })
    }
}

impl Memory for FileMemory {
    fn create(&self, name: &str, len: usize, init: &dyn Fn(&Region)) -> Result<Region> {
        let len = round_up(len);
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.{}", std::process::id()));
        let shown = tmp.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| CommError::io(shown.clone(), e))?;
        // Reserve the pages now: a sparse file on a full tmpfs would SIGBUS on first touch.
        // SAFETY: valid fd, in-range arguments.
        let rc = unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, len as libc::off_t) };
        if rc != 0 {
            let _ = std::fs::remove_file(&tmp);
            let err = std::io::Error::from_raw_os_error(rc);
            return Err(CommError::io(format!("{shown} (reserving {len} bytes in {})", self.dir.display()), err));
        }
        let region = FileMemory::map(&file, &tmp)?;
        init(&region);
        if path.exists() {
            let _ = std::fs::remove_file(&tmp);
            return Err(CommError::Join(format!("{} already exists (another job with the same id?)", path.display())));
        }
        std::fs::rename(&tmp, &path).map_err(|e| CommError::io(path.display().to_string(), e))?;
        Ok(region)
    }

    fn open(&self, name: &str, deadline: Instant) -> Result<Region> {
        let path = self.path(name);
        loop {
            match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(file) => return FileMemory::map(&file, &path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if Instant::now() > deadline {
                        return Err(CommError::Join(format!("{} did not appear in time (is rank 0 running?)", path.display())));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(CommError::io(path.display().to_string(), e)),
            }
        }
    }

    fn unlink(&self, name: &str) {
        let _ = std::fs::remove_file(self.path(name));
    }

    fn me(&self) -> ProcessId {
        let pid = u64::from(std::process::id());
        ProcessId { pid, start_time: proc_stat(pid).map_or(0, |s| s.1) }
    }

    fn alive(&self, id: ProcessId) -> bool {
        match proc_stat(id.pid) {
            Some((state, start)) => !matches!(state, 'Z' | 'X' | 'x') && (id.start_time == 0 || start == id.start_time),
            None => false,
        }
    }
}

/// State letter and start time (in clock ticks since boot) of a process, from
/// `/proc/PID/stat`; `None` when it no longer exists.
fn proc_stat(pid: u64) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3 (state); starttime is field 22.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_sees_this_process_and_not_a_missing_one() {
        let m = FileMemory::new();
        let me = m.me();
        assert!(me.start_time > 0);
        assert!(m.alive(me));
        assert!(!m.alive(ProcessId { pid: me.pid, start_time: me.start_time + 1 }));
        assert!(!m.alive(ProcessId { pid: u64::from(u32::MAX), start_time: 0 }));
    }
}
