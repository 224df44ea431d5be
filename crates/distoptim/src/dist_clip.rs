//! Clipping by the global norm when each rank holds only part of the gradient.
//!
//! Each rank computes the partial norm of the elements it owns (Σ|g|^p, or max|g|), the
//! partials are all-reduced (SUM, or MAX for inf) in f64, and every rank applies torch's
//! coefficient `min(max_norm / (total + 1e-6), 1)` to its own elements. Every element is
//! counted once: a replicated gradient is counted by one owner, not once per replica.
//!
//! With tensor parallelism a parameter's placement decides how it counts: a parameter
//! sharded over the tp group contributes each rank's shard (partials reduced over tp); a
//! parameter replicated over tp is counted on tp rank 0 only, not tp times (the inflated
//! norm Megatron, NeMo and TransformerEngine users keep reporting).

use crate::config::ClipConfig;
use crate::error::Result;
use distoptim_collective::{Communicator, ReduceOp};
use distoptim_optim::clip::{self, NormType};
use distoptim_optim::Layout;
use std::ops::Range;

/// A tensor-parallel group and, per parameter of the local layout, whether it is sharded
/// over that group (else replicated on every tp rank).
#[derive(Clone, Debug)]
pub struct TensorParallel {
    /// The tensor-parallel group.
    pub group: Communicator,
    /// Per parameter of the local layout: sharded over `group` (true) or replicated.
    pub sharded: Vec<bool>,
}

/// The total norm from this rank's partial, combined over `groups` (each reduces the
/// partials of ranks that own different elements).
pub fn total_norm<'a>(partial: f64, norm: NormType, groups: impl IntoIterator<Item = &'a Communicator>) -> Result<f32> {
    let op = if matches!(norm, NormType::Inf) { ReduceOp::Max } else { ReduceOp::Sum };
    let mut partial = [partial];
    for group in groups {
        group.all_reduce(&mut partial, op)?;
    }
    Ok(norm.total(partial[0]))
}

/// The total norm of the gradient whose owned part is `owned`, combined over `group`
/// (`None`: this rank owns all of it).
pub fn global_norm(owned: &[f32], norm: NormType, group: Option<&Communicator>) -> Result<f32> {
    total_norm(clip::partial_norm(owned, norm), norm, group)
}

/// The partial norm of the owned part `grads` (elements `owned` of `layout`) under a
/// tensor-parallel placement: sharded parameters count on every tp rank, replicated
/// ones on tp rank 0 only. Reduce it over the data-parallel shards and then over tp.
pub fn placed_partial(grads: &[f32], owned: Range<usize>, layout: &Layout, norm: NormType, tp: &TensorParallel) -> f64 {
    let mut partial = norm.zero();
    for (i, piece) in layout.overlapping(owned.clone()) {
        if tp.sharded.get(i).copied().unwrap_or(false) || tp.group.rank() == 0 {
            let local = piece.start - owned.start..piece.end - owned.start;
            partial = norm.combine(partial, clip::partial_norm(&grads[local], norm));
        }
    }
    partial
}

/// Clips the owned part by the global norm; returns the norm before clipping.
pub fn clip_owned(owned: &mut [f32], config: &ClipConfig, group: Option<&Communicator>) -> Result<f32> {
    let total = global_norm(owned, config.norm, group)?;
    clip::check_finite(total, config.error_if_nonfinite)?;
    clip::clip_with_norm(owned, config.max_norm, total);
    Ok(total)
}
