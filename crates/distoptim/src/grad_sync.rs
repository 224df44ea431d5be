//! Gradient synchronisation: weighting, the reduction over the group, the division.
//!
//! All modes use one SUM reduction of the (weighted) gradients, plus for
//! `batch_weighted` one of the batch sizes, so the result equals the sequential
//! Σ_r w_r·g_r / d to the bit on the embedded backends (they sum in rank order). `mean`
//! lets the collective divide as it writes each reduced element (AVG: the f32 sum, then
//! one division by the group size, the same bits as dividing afterwards), which saves a
//! pass over memory; for `batch_weighted` the division is left to the caller, which fuses
//! it with the clip's norm pass over the elements it owns.

use crate::config::ReduceMode;
use crate::error::{DistError, Result};
use distoptim_collective::{Communicator, ReduceOp};

/// Multiplies the local gradient by its weight; returns the divisor once the group's
/// weights are known.
pub(crate) fn weigh(comm: &Communicator, grads: &mut [f32], mode: ReduceMode, batch_size: usize) -> Result<f32> {
    let w = local_weight(mode, batch_size);
    if w != 1.0 {
        grads.iter_mut().for_each(|g| *g *= w);
    }
    divisor(comm, mode, batch_size)
}

/// What this rank's gradient is multiplied by before the SUM: its batch size under
/// `batch_weighted`, else 1.
pub(crate) fn local_weight(mode: ReduceMode, batch_size: usize) -> f32 {
    match mode {
        ReduceMode::BatchWeighted => batch_size as f32,
        ReduceMode::Sum | ReduceMode::Mean => 1.0,
    }
}

/// What the SUM is divided by: 1, the group size, or the group's total batch size (one
/// all-reduce of the counts).
pub(crate) fn divisor(comm: &Communicator, mode: ReduceMode, batch_size: usize) -> Result<f32> {
    match mode {
        ReduceMode::Sum => Ok(1.0),
        ReduceMode::Mean => Ok(comm.size() as f32),
        ReduceMode::BatchWeighted => {
            let mut total = [batch_size as f64];
            comm.all_reduce(&mut total, ReduceOp::Sum)?;
            if total[0] <= 0.0 {
                return Err(DistError::Invalid("batch_weighted reduction: every rank reported batch size 0".into()));
            }
            Ok(total[0] as f32)
        }
    }
}

/// The collective's operator for `mode` and what is left to divide by afterwards: AVG
/// and 1 for `mean` (the collective divides), SUM and `divisor` otherwise.
pub(crate) fn reduction(mode: ReduceMode, divisor: f32) -> (ReduceOp, f32) {
    match mode {
        ReduceMode::Mean => (ReduceOp::Avg, 1.0),
        ReduceMode::Sum | ReduceMode::BatchWeighted => (ReduceOp::Sum, divisor),
    }
}

/// All-reduces `grads` with `op` in buckets of `bucket` elements, in the same order on
/// every rank.
pub(crate) fn all_reduce(comm: &Communicator, grads: &mut [f32], bucket: usize, op: ReduceOp) -> Result<()> {
    all_reduce_observed(comm, grads, bucket, op, &mut |_| {})
}

/// [`all_reduce`] handing this rank's part of each bucket's result to `observe`.
pub(crate) fn all_reduce_observed(
    comm: &Communicator,
    grads: &mut [f32],
    bucket: usize,
    op: ReduceOp,
    observe: &mut dyn FnMut(&[f32]),
) -> Result<()> {
    for chunk in grads.chunks_mut(bucket) {
        comm.all_reduce_observed(chunk, op, observe)?;
    }
    Ok(())
}

/// Divides by the reduction's divisor (a no-op for SUM).
pub(crate) fn divide(grads: &mut [f32], divisor: f32) {
    if divisor != 1.0 {
        grads.iter_mut().for_each(|g| *g /= divisor);
    }
}
