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
    len: usize,
    _elem: PhantomData<T>,
}

impl<T: Element> SharedBuf<T> {
    pub(crate) fn new(alloc: Arc<SharedAlloc>, len: usize) -> SharedBuf<T> {
        SharedBuf { alloc, len, _elem: PhantomData }
    }
}

impl<T: Element> Deref for SharedBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the region holds at least len elements, is page aligned and zeroed at
        // creation (a valid bit pattern for every Element); peers only read it.
        unsafe { std::slice::from_raw_parts(self.alloc.regions[self.alloc.rank].ptr() as *const T, self.len) }
    }
}

impl<T: Element> DerefMut for SharedBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above; this rank is the only writer of its own region.
        unsafe { std::slice::from_raw_parts_mut(self.alloc.regions[self.alloc.rank].ptr() as *mut T, self.len) }
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
        f.debug_struct("SharedBuf").field("id", &self.alloc.id).field("len", &self.len).finish()
    }
}
