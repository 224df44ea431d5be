use distoptim_collective::CommError;
use distoptim_optim::OptimError;

/// What a distributed step can fail with: the optimizer's errors (bad config, shapes,
/// a non-finite gradient norm) and the collectives' (a peer died, a mismatch, a timeout).
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("{0}")]
    Invalid(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}

pub type Result<T, E = DistError> = std::result::Result<T, E>;
