use crate::protocol::FrameError;
use std::time::Duration;

/// What a parameter-server call can fail with. Every error about a worker names it (its
/// address), so a failed step says which worker to look at.
#[derive(Debug, thiserror::Error)]
pub enum PsError {
    /// The worker answered with an error (bad token, unknown parameter, shape mismatch…);
    /// it changed nothing.
    #[error("worker {worker}: {message}")]
    Refused {
        /// The worker's address.
        worker: String,
        /// Its error message.
        message: String,
    },
    #[error("worker {worker} is unreachable: {source}")]
    /// The worker cannot be connected to.
    Unreachable {
        /// The worker's address.
        worker: String,
        /// The connection error.
        source: std::io::Error,
    },
    #[error("worker {worker} did not answer within {timeout:?}")]
    /// The worker did not answer in time (it may have applied the request).
    Timeout {
        /// The worker's address.
        worker: String,
        /// How long the client waited.
        timeout: Duration,
    },
    #[error("worker {worker}: {source}")]
    /// The worker's reply could not be read.
    Protocol {
        /// The worker's address.
        worker: String,
        /// What was wrong with the frame.
        source: FrameError,
    },
    /// Some workers of a step failed; the others applied the context (see
    /// [`DistributedOptimizer::step`](crate::DistributedOptimizer::step)).
    #[error("step of context {context} failed on {} of {total} workers: {}", failures.len(), failures.join("; "))]
    Step {
        /// The step's context id.
        context: u64,
        /// Workers the step went to.
        total: usize,
        /// Each failed worker's error.
        failures: Vec<String>,
    },
    #[error("{0}")]
    /// A call's arguments do not fit (shapes, names, groups).
    Invalid(String),
    #[error("checkpoint: {0}")]
    /// A worker checkpoint is missing, damaged or of another model.
    Checkpoint(String),
    #[error("{what}: {source}")]
    /// A local file or socket operation failed.
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A parameter-server call's result.
pub type Result<T, E = PsError> = std::result::Result<T, E>;
