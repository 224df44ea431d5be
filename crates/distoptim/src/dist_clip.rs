//! Clipping by the global norm when each rank holds only part of the gradient.
//!
//! Each rank computes the partial norm of the elements it owns (Σ|g|^p, or max|g|), the
//! partials are all-reduced (SUM, or MAX for inf) in f64, and every rank applies torch's
//! coefficient `min(max_norm / (total + 1e-6), 1)` to its own elements. Every element is
//! counted once: a replicated gradient is counted by one owner, not once per replica.

use crate::config::ClipConfig;
use crate::error::Result;
use distoptim_collective::{Communicator, ReduceOp};
use distoptim_optim::clip::{self, NormType};

/// The total norm of the gradient whose owned part is `owned`, summed over `group`
/// (`None`: this rank owns all of it).
pub fn global_norm(owned: &[f32], norm: NormType, group: Option<&Communicator>) -> Result<f32> {
    let mut partial = [clip::partial_norm(owned, norm)];
    if let Some(comm) = group {
        let op = if matches!(norm, NormType::Inf) { ReduceOp::Max } else { ReduceOp::Sum };
        comm.all_reduce(&mut partial, op)?;
    }
    Ok(norm.total(partial[0]))
}

/// Clips the owned part by the global norm; returns the norm before clipping.
pub fn clip_owned(owned: &mut [f32], config: &ClipConfig, group: Option<&Communicator>) -> Result<f32> {
    let total = global_norm(owned, config.norm, group)?;
    clip::check_finite(total, config.error_if_nonfinite)?;
    clip::clip_with_norm(owned, config.max_norm, total);
    Ok(total)
}
