use distoptim_collective::CommError;
use distoptim_optim::OptimError;

/// What a distributed step can fail with: the optimizer's errors (bad config, shapes,
/// a non-finite gradient norm) and the collectives' (a peer died, a mismatch, a timeout).
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error(transparent)]
    /// The optimizer core refused (config, shapes, non-finite norm).
    Optim(#[from] OptimError),
    #[error(transparent)]
    /// A collective failed (a peer died, a mismatch, a timeout).
    Comm(#[from] CommError),
    #[error("{0}")]
    /// A call's arguments do not fit (sizes, strategies, policies).
    Invalid(String),
    #[error("checkpoint: {0}")]
    /// A checkpoint is missing, damaged or of another run.
    Checkpoint(String),
}

/// A distributed step's result.
pub type Result<T, E = DistError> = std::result::Result<T, E>;
