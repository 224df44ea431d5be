//! Distributed optimizer steps on top of the optimizer core (`distoptim-optim`) and the
//! collectives (`distoptim-collective`).
//!
//! - [`DataParallel`]: the one interface over every algorithm below, built from a
//!   [`Strategy`] by [`data_parallel()`].
//! - [`ShardedOptimizer`]: DDP and ZeRO-1/2/3 over balanced contiguous ranges of
//!   one flat buffer, with mean / sum / batch-weighted reduction, gradient accumulation
//!   and clipping by the global norm across shards; Muon's Newton–Schulz on one rank per
//!   matrix, packed by cost ([`transform_loads`]).
//! - [`GradBuckets`]: DDP's buckets, all-reduced while the backward pass still runs.
//! - [`PostLocalSgd`]: torch's post-local SGD with periodic model averaging.
//! - [`Diloco`]: inner steps per rank, an outer Nesterov SGD on the averaged delta.
//! - [`dist_clip`]: the global-norm clip when ranks own parts of the gradient.
//! - [`verify_replicas`]: proof that the ranks hold identical parameters.
//! - [`checkpoint`]: crash-safe safetensors checkpoints that reload at any world size.
//! - [`consolidate()`]: a checkpoint into one `model.safetensors` + `optimizer.safetensors`.
//! - [`safetensors`]: the file format, read and written by hand.
//! - [`sampler`]: the distributed sampler and its batch-weighting rule.
//! - [`precision`]: working types (bf16, f16, f32), the precision policy and loss scaling.
//! - [`estimate`]: memory, bytes sent and step time of a plan, before running it.
//! - [`step_lbfgs`]: LBFGS whose closure is reduced over the ranks.
//! - Deterministic mode: [`DataParallel::step_deterministic`] on a [`ReproducibleSum`] of
//!   fixed micro-shards' gradients gives the same bits at any world size and backend.
//! - [`elastic`]: in-memory snapshots in the launcher's shared memory, restored and
//!   resharded after a rank died (`distoptim launch --elastic`).

// Every public item says what it is for (the docs are the API's contract).
#![deny(missing_docs)]

mod buckets;
pub mod checkpoint;
mod config;
pub mod consolidate;
mod data_parallel;
mod diloco;
pub mod dist_clip;
pub mod elastic;
mod error;
pub mod estimate;
mod grad_sync;
mod lbfgs;
mod local_sgd;
mod optimizer;
pub mod precision;
mod replicas;
pub mod safetensors;
pub mod sampler;
mod scheduled;
mod transforms;

pub use buckets::GradBuckets;
pub use config::{ClipConfig, ReduceMode, StepConfig, StepReport, Strategy};
pub use consolidate::{consolidate, Consolidated};
pub use data_parallel::{data_parallel, DataParallel, DataParallelConfig};
pub use diloco::{Diloco, DilocoConfig};
pub use dist_clip::TensorParallel;
/// The exact per-element sum of deterministic mode (see [`DataParallel::step_deterministic`]).
pub use distoptim_collective::exact::ReproducibleSum;
pub use error::{DistError, Result};
pub use lbfgs::step_lbfgs;
pub use local_sgd::{LocalSgdConfig, PostLocalSgd};
pub use optimizer::{MemoryLedger, ShardedOptimizer};
pub use precision::{FlatMut, FloatDtype, LossScaleConfig, LossScaler, Precision, Working};
pub use replicas::verify_replicas;
pub use transforms::transform_loads;
