//! LBFGS across ranks (a torch pain point, pytorch/pytorch#30439): each rank evaluates
//! the objective on its own data, and the loss and gradient are all-reduced *inside*
//! the closure, so every rank sees the same values, takes the same line-search
//! decisions, evaluates the closure the same number of times and ends with the same
//! parameters. With `ReduceMode::Mean` the loss and gradient are averaged over ranks;
//! with `Sum` they are added (a loss split into per-rank parts).

use distoptim_collective::{Communicator, ReduceOp};
use distoptim_optim::lbfgs::BoxError;
use distoptim_optim::Lbfgs;

use crate::config::ReduceMode;
use crate::error::{DistError, Result};

/// One `lbfgs.step(closure)` where `closure(params, grad) -> loss` computes this rank's
/// part; returns the (reduced) loss of the first evaluation. Collective over `comm`.
pub fn step_lbfgs<C>(comm: &Communicator, lbfgs: &mut Lbfgs, params: &mut [f32], mode: ReduceMode, mut closure: C) -> Result<f32>
where
    C: FnMut(&[f32], &mut [f32]) -> std::result::Result<f32, BoxError>,
{
    if mode == ReduceMode::BatchWeighted {
        return Err(DistError::Invalid("LBFGS across ranks reduces with mean or sum, not batch_weighted".into()));
    }
    let w = comm.size() as f32;
    let reduced = |x: &[f32], g: &mut [f32]| -> std::result::Result<f32, BoxError> {
        let loss = closure(x, g)?;
        let mut l = [loss];
        comm.all_reduce(&mut l, ReduceOp::Sum)?;
        comm.all_reduce(g, ReduceOp::Sum)?;
        if mode == ReduceMode::Mean {
            g.iter_mut().for_each(|v| *v /= w);
            l[0] /= w;
        }
        Ok(l[0])
    };
    Ok(lbfgs.step(params, reduced)?)
}
