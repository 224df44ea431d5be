//! `distoptim replay`: the conformance interface (see `tests/conformance/FORMAT.md`).
//!
//! A case is a JSON file generated with PyTorch: initial parameters, an optimizer, a
//! schedule, clipping, a strategy and the gradients of every rank at every step. Replaying
//! it runs the same steps through distoptim and reports parameters, learning rates and
//! norms, which the checker compares with PyTorch's within float tolerance.
//!
//! - [`case`]: parsing and validation, each problem mapped to FORMAT.md's error classes;
//! - [`run`]: the strategies (today: `single` and LBFGS; the distributed ones are not yet
//!   supported and say so);
//! - [`objective`]: closures for LBFGS cases;
//! - [`check`]: the checker's comparison rules, so tests can compare in-process.

pub mod case;
pub mod check;
pub mod error;
pub mod objective;
pub mod run;

pub use case::Case;
pub use error::{ErrorClass, ReplayError};
pub use run::{run, Output};

/// Parses and runs a case given as JSON text.
pub fn replay_json(text: &str) -> Result<Output, ReplayError> {
    run(&Case::from_json(text)?)
}
