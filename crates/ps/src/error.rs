use crate::protocol::FrameError;
use std::time::Duration;

/// What a parameter-server call can fail with. Every error about a worker names it (its
/// address), so a failed step says which worker to look at.
#[derive(Debug, thiserror::Error)]
pub enum PsError {
    /// The worker answered with an error (bad token, unknown parameter, shape mismatch…);
    /// it changed nothing.
    #[error("worker {worker}: {message}")]
    Refused { worker: String, message: String },
    #[error("worker {worker} is unreachable: {source}")]
    Unreachable { worker: String, source: std::io::Error },
    #[error("worker {worker} did not answer within {timeout:?}")]
    Timeout { worker: String, timeout: Duration },
    #[error("worker {worker}: {source}")]
    Protocol { worker: String, source: FrameError },
    /// Some workers of a step failed; the others applied the context (see
    /// [`DistributedOptimizer::step`](crate::DistributedOptimizer::step)).
    #[error("step of context {context} failed on {} of {total} workers: {}", failures.len(), failures.join("; "))]
    Step { context: u64, total: usize, failures: Vec<String> },
    #[error("{0}")]
    Invalid(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

pub type Result<T, E = PsError> = std::result::Result<T, E>;
