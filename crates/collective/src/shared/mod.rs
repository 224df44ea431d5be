//! The embedded backends: ranks that share memory, as threads of one process (heap
//! regions) or as processes on one host (files in /dev/shm). One engine serves both.

pub(crate) mod buffer;
pub(crate) mod engine;
pub(crate) mod memory;
pub(crate) mod segment;
