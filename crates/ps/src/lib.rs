//! A parameter server: torch's RPC `DistributedOptimizer`, without TorchScript.
//!
//! Parameters live on the workers that own them ([`Worker`], `distoptim ps serve`).
//! Trainers hold [`RemoteParam`] handles, record gradients under a [`ContextId`]
//! ([`send_grads`]) and call [`DistributedOptimizer::step`], which makes every owning
//! worker apply that context's gradients with its local optimizer (any core optimizer,
//! with param groups and a schedule). See [`optimizer`] for the concurrency guarantees.
//!
//! - [`protocol`]: versioned, length-prefixed frames over TCP (JSON header, raw f32 data).
//! - [`worker`]: the server, one thread per connection, and what it refuses.
//! - [`client`]: connections to workers, remote parameters, contexts.
//! - [`optimizer`]: the distributed step.
//! - checkpoints: a worker saves parameters and optimizer state to one safetensors
//!   file atomically and restarts from it ([`WorkerConfig::checkpoint_dir`]).

// Every public item says what it is for (the docs are the API's contract).
#![deny(missing_docs)]

pub mod client;
mod error;
pub mod optimizer;
mod persist;
mod pool;
pub mod protocol;
mod state;
pub mod worker;

pub use client::{send_grads, ClientConfig, ContextId, RemoteParam, WorkerClient};
pub use error::{PsError, Result};
pub use optimizer::DistributedOptimizer;
pub use protocol::Stats;
pub use worker::{RunningWorker, Worker, WorkerConfig};
