//! Replay errors, each with the class FORMAT.md names for it.

use std::fmt;

use distoptim_optim::OptimError;
use thiserror::Error;

/// FORMAT.md's error classes, plus `unsupported` for valid cases beyond this replay's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// `invalid_world_size`.
    InvalidWorldSize,
    /// `unknown_optimizer`.
    UnknownOptimizer,
    /// `unknown_scheduler`.
    UnknownScheduler,
    /// `shape_mismatch`.
    ShapeMismatch,
    /// `nonfinite`.
    NonFinite,
    /// `invalid_config`.
    InvalidConfig,
    /// `unsupported`: valid by FORMAT.md, beyond this replay (limits, combinations).
    Unsupported,
}

impl ErrorClass {
    /// The class's name in FORMAT.md.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::InvalidWorldSize => "invalid_world_size",
            ErrorClass::UnknownOptimizer => "unknown_optimizer",
            ErrorClass::UnknownScheduler => "unknown_scheduler",
            ErrorClass::ShapeMismatch => "shape_mismatch",
            ErrorClass::NonFinite => "nonfinite",
            ErrorClass::InvalidConfig => "invalid_config",
            ErrorClass::Unsupported => "unsupported",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a case cannot be replayed; displays as `class: message`.
#[derive(Debug, Error)]
#[error("{class}: {message}")]
pub struct ReplayError {
    /// The class.
    pub class: ErrorClass,
    /// What is wrong, naming the field.
    pub message: String,
}

impl ReplayError {
    /// An error of `class`.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        ReplayError { class, message: message.into() }
    }
}

impl From<OptimError> for ReplayError {
    fn from(e: OptimError) -> Self {
        let class = match &e {
            OptimError::InvalidConfig(_) => ErrorClass::InvalidConfig,
            OptimError::ShapeMismatch(_) | OptimError::StateDict(_) => ErrorClass::ShapeMismatch,
            OptimError::NonFinite(_) => ErrorClass::NonFinite,
            OptimError::Closure(_) => ErrorClass::InvalidConfig,
        };
        // The optimizer's own message already starts with its kind; keep only the detail.
        let text = e.to_string();
        let message = text.split_once(": ").map(|(_, m)| m.to_string()).unwrap_or(text);
        ReplayError { class, message }
    }
}
