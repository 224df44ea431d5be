//! Collectives for data-parallel training: the communication layer of distoptim.
//!
//! - [`Communicator`]: a process group with `all_reduce`, `reduce_scatter`,
//!   `all_gather`, `broadcast`, `reduce`, `barrier` (in place, blocking or returning a
//!   [`Work`]), `split` into sub-groups, and buffers allocated from the group
//!   ([`SharedBuf`]) that the shared-memory backends reduce without copying.
//! - [`DeviceMesh`]: named dimensions over a group (`dp`, `tp`, `cp`) and the group
//!   along any of them.
//! - Backends ([`Backend`]): `threads` (ranks are threads; tests and `replay`), `shm`
//!   (processes on one host over /dev/shm; the embedded default), `mpi` and `nccl`
//!   behind cargo features.
//! - Safety: every call carries a [`Fingerprint`] checked across ranks, waits time out
//!   naming the missing ranks, and a dead peer is reported within a fraction of a second.
//!
//! ```
//! use distoptim_collective::{CommConfig, Communicator, ReduceOp};
//! let sums = Communicator::run_threads(3, &CommConfig::default(), |comm| {
//!     let mut x = vec![comm.rank() as f32 + 1.0; 4];
//!     comm.all_reduce(&mut x, ReduceOp::Sum).unwrap();
//!     x
//! })
//! .unwrap();
//! assert!(sums.iter().all(|x| x == &vec![6.0; 4]));
//! ```

// Every public item says what it is for (the docs are the API's contract).
#![deny(missing_docs)]

mod comm;
mod config;
pub mod conformance;
mod element;
mod env;
mod error;
pub mod exact;
mod fingerprint;
mod mesh;
mod partition;
mod reduce;
mod shared;

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;

pub use comm::{Backend, Communicator, Work};
pub use config::CommConfig;
pub use element::{reference_reduce, Dtype, Element, ReduceOp};
pub use env::backend_from_env;
pub use error::{CommError, Result};
pub use fingerprint::{Fingerprint, OpKind};
pub use half::{bf16, f16};
pub use mesh::{DeviceMesh, MeshDims};
pub use partition::shard_range;
pub use shared::buffer::SharedBuf;
pub use shared::engine::MAX_RANKS;
