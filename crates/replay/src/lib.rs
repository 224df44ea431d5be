//! `distoptim replay`: the conformance interface (see `tests/conformance/FORMAT.md`).
//!
//! A case is a JSON file generated with PyTorch: initial parameters, an optimizer, a
//! schedule, clipping, a strategy and the gradients of every rank at every step. Replaying
//! it runs the same steps through distoptim and reports parameters, learning rates and
//! norms, which the checker compares with PyTorch's within float tolerance.
//!
//! - [`case`]: parsing and validation, each problem mapped to FORMAT.md's error classes;
//! - [`mod@run`]: `single` (the one-process reference) and LBFGS cases;
//! - `distributed`: every multi-rank case, one thread per rank on real collectives,
//!   through the one data-parallel interface (`DataParallel`), with reshards through
//!   real checkpoints;
//! - [`objective`]: closures for LBFGS cases;
//! - [`check`]: the checker's comparison rules, so tests can compare in-process.
//!
//! ```
//! let case = r#"{"world_size": 1, "strategy": "single",
//!   "params": [{"name": "w", "shape": [2], "data": [1.0, 2.0]}],
//!   "optimizer": {"name": "sgd", "lr": 0.5},
//!   "steps": [{"grads": [{"w": [1.0, -1.0]}]}]}"#;
//! let out = distoptim_replay::replay_json(case)?;
//! assert_eq!(out.params["w"], vec![0.5, 2.5]);
//! assert_eq!(out.per_step[0].lr, vec![0.5]);
//!
//! let bad = case.replace("sgd", "adagrad");
//! let err = distoptim_replay::replay_json(&bad).unwrap_err();
//! assert!(err.to_string().starts_with("unknown_optimizer"));
//! # Ok::<(), distoptim_replay::ReplayError>(())
//! ```

// Every public item says what it is for (the docs are the API's contract).
#![deny(missing_docs)]

pub mod case;
pub mod check;
mod distributed;
pub mod error;
pub mod objective;
pub mod run;

pub use case::Case;
pub use error::{ErrorClass, ReplayError};
pub use run::{run, run_with, Output, ReplayOptions};

/// Parses and runs a case given as JSON text.
pub fn replay_json(text: &str) -> Result<Output, ReplayError> {
    run(&Case::from_json(text)?)
}

/// [`replay_json`] with options (deterministic mode).
pub fn replay_json_with(text: &str, options: &ReplayOptions) -> Result<Output, ReplayError> {
    run_with(&Case::from_json(text)?, options)
}
