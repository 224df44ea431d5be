//! The one error type of the optimizer core.

use thiserror::Error;

/// Everything that can go wrong in the optimizer core. Each message names the offending
/// parameter, group or value, so a caller can report it as it is.
#[derive(Debug, Error)]
pub enum OptimError {
    /// A hyperparameter that torch or HF would reject (negative lr, betas outside [0, 1)...).
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// A buffer, shape or state whose size does not match the layout.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// `error_if_nonfinite` was set and the total gradient norm is NaN or infinite.
    #[error("nonfinite: the total gradient norm is {0}")]
    NonFinite(f32),
    /// A state dict that does not belong to this optimizer (other layout, algorithm or shard).
    #[error("incompatible state dict: {0}")]
    StateDict(String),
    /// The user's closure (LBFGS) or the caller's whole-matrix transform
    /// ([`Optimizer::step_with`](crate::Optimizer::step_with)) failed.
    #[error("closure failed: {0}")]
    Closure(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The optimizer core's result.
pub type Result<T, E = OptimError> = std::result::Result<T, E>;
