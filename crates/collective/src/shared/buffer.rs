//! Buffers allocated from the communicator ("registered", as NCCL calls it): each rank's
//! buffer lives in shared memory that every peer has mapped, so a collective on a slice
//! of it reads peers' data where it lies and copies nothing in or out.

use super::memory::Region;
use crate::element::Element;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

/// One collective allocation: this rank's region and its mappings of every peer's.
pub(crate) struct SharedAlloc {
    pub id: u64,
    pub rank: usize,
    pub regions: Vec<Region>,
}

/// A buffer of `len` elements that collectives can use without copying (see
/// [`Communicator::alloc`](crate::Communicator::alloc)). Dereferences to a slice; a
/// collective on any sub-slice of it takes the zero-copy path when every rank passes a
/// slice of its own buffer from the same allocation.
pub struct SharedBuf<T: Element> {
    alloc: Arc<SharedAlloc>,
    /// Where this buffer starts in its allocation, in elements (non-zero after a split).
    offset: usize,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T: Element> SharedBuf<T> {
    pub(crate) fn new(alloc: Arc<SharedAlloc>, len: usize) -> SharedBuf<T> {
        SharedBuf { alloc, offset: 0, len, _elem: PhantomData }
    }

    fn ptr(&self) -> *mut T {
        // SAFETY: offset <= the allocation's element count (new and split_off keep it so).
        unsafe { (self.alloc.regions[self.alloc.rank].ptr() as *mut T).add(self.offset) }
    }

    /// Splits off the elements `at..` into a buffer of their own (like `Vec::split_off`,
    /// without copying). Both halves stay registered, so each can be handed to a
    /// non-blocking collective while the other is still being written: DDP's buckets.
    /// `at` is clamped to the length.
    pub fn split_off(&mut self, at: usize) -> SharedBuf<T> {
        let at = at.min(self.len);
        let tail = SharedBuf { alloc: self.alloc.clone(), offset: self.offset + at, len: self.len - at, _elem: PhantomData };
        self.len = at;
        tail
    }

    /// Joins `next` back onto the end of this buffer when it is the part that directly
    /// follows it in the same allocation (the inverse of [`split_off`](Self::split_off));
    /// otherwise gives it back unchanged.
    pub fn unsplit(&mut self, next: SharedBuf<T>) -> std::result::Result<(), SharedBuf<T>> {
        if Arc::ptr_eq(&self.alloc, &next.alloc) && self.offset + self.len == next.offset {
            self.len += next.len;
            Ok(())
        } else {
            Err(next)
        }
    }
}

impl<T: Element> Deref for SharedBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the region holds at least offset + len elements, is page aligned and zeroed
        // at creation (a valid bit pattern for every Element); peers only read it.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len) }
    }
}

impl<T: Element> DerefMut for SharedBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above; this rank is the only writer of its own region, and split
        // buffers cover disjoint ranges of it, so no two `&mut` slices overlap.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.len) }
    }
}

impl<T: Element> AsRef<[T]> for SharedBuf<T> {
    fn as_ref(&self) -> &[T] {
        self
    }
}

impl<T: Element> AsMut<[T]> for SharedBuf<T> {
    fn as_mut(&mut self) -> &mut [T] {
        self
    }
}

impl<T: Element> std::fmt::Debug for SharedBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuf").field("id", &self.alloc.id).field("offset", &self.offset).field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use crate::{CommConfig, Communicator, ReduceOp};

    #[test]
    fn split_buffers_reduce_in_place_concurrently_and_join_back() {
        let out = Communicator::run_threads(3, &CommConfig::default(), |c| {
            let mut buf = c.alloc::<f32>(10_000).unwrap();
            buf.iter_mut().enumerate().for_each(|(i, x)| *x = (i * (c.rank() + 1)) as f32);
            let mut tail = buf.split_off(6_000);
            let far = tail.split_off(3_000);
            assert_eq!((buf.len(), tail.len(), far.len()), (6_000, 3_000, 1_000));
            // Issued last part first, as a backward pass produces them.
            let works = [c.all_reduce_async(far, ReduceOp::Sum), c.all_reduce_async(tail, ReduceOp::Sum)];
            c.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
            let [far, tail] = works.map(|w| w.wait().unwrap());
            // Out of order is refused and hands the part back.
            let far = buf.unsplit(far).unwrap_err();
            buf.unsplit(tail).unwrap();
            buf.unsplit(far).unwrap();
            buf.to_vec()
        })
        .unwrap();
        let want: Vec<f32> = (0..10_000).map(|i| (i * 6) as f32).collect();
        assert!(out.iter().all(|b| *b == want));
    }
}
