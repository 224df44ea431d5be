//! Recycled gradient buffers. A fresh large allocation is page-faulted in 4 KiB at a time
//! as the socket fills it (about 21 ms for 64 MiB on the 2-core machine, against 2 ms to
//! refill a buffer already mapped), so the worker keeps the buffers of applied contexts
//! for the next ones.

use std::sync::{Mutex, PoisonError};

/// Buffers under this size are cheap to allocate and are not kept.
const MIN_BYTES: usize = 1 << 20;
/// At most this much is kept idle.
const MAX_IDLE_BYTES: usize = 1 << 30;

#[derive(Default)]
pub(crate) struct BufferPool {
    idle: Mutex<Vec<Vec<f32>>>,
}

impl BufferPool {
    /// A buffer of `len` elements with unspecified contents (the caller overwrites them):
    /// a recycled one of at most twice the size if there is one, else a new one.
    pub fn take(&self, len: usize) -> Vec<f32> {
        if len * 4 >= MIN_BYTES {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            let best = idle.iter().enumerate().filter(|(_, b)| b.len() >= len && b.len() / 2 <= len).min_by_key(|(_, b)| b.len());
            if let Some((i, _)) = best {
                let mut buf = idle.swap_remove(i);
                buf.truncate(len);
                return buf;
            }
        }
        vec![0.0; len]
    }

    /// Keeps `buf` for a later [`take`](Self::take) if it is large and there is room.
    pub fn give(&self, buf: Vec<f32>) {
        if buf.len() * 4 < MIN_BYTES {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let held: usize = idle.iter().map(|b| b.len() * 4).sum();
        if held + buf.len() * 4 <= MAX_IDLE_BYTES {
            idle.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_come_back_small_ones_do_not() {
        let pool = BufferPool::default();
        let big = pool.take(1 << 20);
        let ptr = big.as_ptr();
        pool.give(big);
        pool.give(vec![0.0; 10]);
        let again = pool.take(3 << 18);
        assert_eq!((again.as_ptr(), again.len()), (ptr, 3 << 18), "recycled, cut to size");
        let other = pool.take(1 << 20);
        assert_ne!(other.as_ptr(), ptr, "in use: a new one");
        assert_eq!(pool.take(10).len(), 10);
    }
}
