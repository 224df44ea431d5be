//! [`DistributedOptimizer`]: one optimizer step over a group of data-parallel ranks.
//!
//! The flat layout is split into contiguous, balanced ranges ([`shard_range`], Megatron's
//! layout): rank r owns elements `shard_range(numel, W, r)`. Per step:
//!
//! 1. **weigh**: `batch_weighted` multiplies the local gradient by the local batch size
//!    and all-reduces the batch sizes;
//! 2. **reduce**: DDP and ZeRO-1 all-reduce the whole gradient (DDP in `bucket_cap_mb`
//!    buckets, in the same order on every rank); ZeRO-2/3 reduce-scatter it, so a rank
//!    only ever holds its own range of the reduced gradient;
//! 3. **clip** by the global norm: DDP computes it locally (every rank holds the whole
//!    reduced gradient); ZeRO all-reduces the partial norms of the owned ranges;
//! 4. **step**: DDP steps everything; ZeRO steps its range with state for that range only;
//! 5. **gather**: ZeRO-1/2 all-gather the updated parameters; ZeRO-3 keeps them sharded
//!    until [`gather_params`](DistributedOptimizer::gather_params).
//!
//! Guarantee: whatever the strategy and world size, the parameters after each step are
//! those of one process stepping with the reduced gradient (to the bit on the embedded
//! backends), and every rank holds the same values.

use crate::config::{StepConfig, StepReport, Strategy};
use crate::dist_clip::{self, TensorParallel};
use crate::error::{DistError, Result};
use crate::grad_sync;
use crate::scheduled::Scheduled;
use distoptim_collective::{shard_range, Communicator, ReduceOp, SharedBuf};
use distoptim_optim::clip;
use distoptim_optim::{Layout, OptimizerStateDict, ParamGroup, Schedule};
use std::ops::Range;

pub struct DistributedOptimizer {
    comm: Communicator,
    config: StepConfig,
    /// The elements whose optimizer state this rank keeps (everything for DDP).
    owned: Range<usize>,
    opt: Scheduled,
    steps: u64,
    /// Tensor parallelism: the tp group and each parameter's placement (for the clip).
    tp: Option<TensorParallel>,
}

impl DistributedOptimizer {
    /// Collective only in the sense that every rank must build one with the same layout,
    /// groups and config (no communication happens here).
    pub fn new(
        comm: Communicator,
        layout: Layout,
        groups: Vec<ParamGroup>,
        schedule: Option<Schedule>,
        config: StepConfig,
    ) -> Result<Self> {
        if let Some(c) = &config.clip {
            if !(c.max_norm.is_finite() && c.max_norm >= 0.0) {
                return Err(DistError::Invalid(format!("clip max_norm must be finite and >= 0, got {}", c.max_norm)));
            }
        }
        if config.bucket_cap_mb.is_nan() || config.bucket_cap_mb <= 0.0 {
            return Err(DistError::Invalid(format!("bucket_cap_mb must be > 0, got {}", config.bucket_cap_mb)));
        }
        let numel = layout.numel();
        let owned = if config.strategy.shards_state() { shard_range(numel, comm.size(), comm.rank()) } else { 0..numel };
        let opt = Scheduled::new(layout, groups, owned.clone(), schedule)?;
        Ok(DistributedOptimizer { comm, config, owned, opt, steps: 0, tp: None })
    }

    /// For 3-D parallelism: this optimizer's group is the data-parallel one (dp×cp) and its
    /// layout this tp rank's local parameters; `sharded[i]` says whether parameter i is a
    /// shard of a parameter split over `tp_group` (else a replica). Gradients are then
    /// synchronised over dp×cp only, and the clip counts sharded parameters over tp and
    /// replicated ones once.
    pub fn with_tensor_parallel(mut self, tp_group: Communicator, sharded: Vec<bool>) -> Result<Self> {
        let params = self.opt.optimizer().layout().len();
        if sharded.len() != params {
            return Err(DistError::Invalid(format!("{} placements for {params} parameters", sharded.len())));
        }
        self.tp = Some(TensorParallel { group: tp_group, sharded });
        Ok(self)
    }

    /// A zeroed gradient buffer for this layout, allocated from the communicator
    /// (collective). On the shared-memory backends the reduction then reads peers'
    /// gradients in place instead of copying them through the group's slots.
    pub fn alloc_grads(&self) -> Result<SharedBuf<f32>> {
        Ok(self.comm.alloc::<f32>(self.opt.optimizer().layout().numel())?)
    }

    pub fn comm(&self) -> &Communicator {
        &self.comm
    }

    pub fn layout(&self) -> &Layout {
        self.opt.optimizer().layout()
    }

    /// The elements this rank updates and keeps state for.
    pub fn owned(&self) -> Range<usize> {
        self.owned.clone()
    }

    /// Elements of optimizer state this rank holds (per state buffer).
    pub fn state_elems(&self) -> usize {
        self.owned.len()
    }

    /// The param groups, with their current hyperparameters.
    pub fn groups(&self) -> &[ParamGroup] {
        self.opt.optimizer().groups()
    }

    pub fn lrs(&self) -> Vec<f64> {
        self.opt.lrs()
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One step. `grads` is this rank's local gradient (micro-batches already summed:
    /// accumulate locally and call `step` once, DDP's `no_sync`); it is overwritten.
    /// `params` is the full parameter buffer (ZeRO-3: only the owned range is read and
    /// written). Every rank of the group must call it.
    pub fn step(&mut self, params: &mut [f32], grads: &mut [f32], batch_size: usize) -> Result<StepReport> {
        let numel = self.opt.optimizer().layout().numel();
        for (what, len) in [("params", params.len()), ("grads", grads.len())] {
            if len != numel {
                return Err(DistError::Invalid(format!("{what} has {len} elements, the layout has {numel}")));
            }
        }
        let divisor = grad_sync::weigh(&self.comm, grads, self.config.reduce, batch_size)?;
        if matches!(self.config.strategy, Strategy::Zero2 | Strategy::Zero3) {
            self.comm.reduce_scatter(grads, ReduceOp::Sum)?;
        } else {
            grad_sync::all_reduce(&self.comm, grads, self.config.bucket_elems())?;
        }
        // Only the owned elements are finished: divided, measured, clipped (the clip
        // coefficient is applied by the optimizer as it reads each gradient).
        let owned = self.owned.clone();
        let mine = &mut grads[owned.clone()];
        // DDP owns everything and needs no reduction of the norm; ZeRO reduces over its shards.
        let shards = self.config.strategy.shards_state().then_some(&self.comm);
        let (grad_norm, scale) = match &self.config.clip {
            None => {
                grad_sync::divide(mine, divisor);
                (None, 1.0)
            }
            Some(c) => {
                let total = match &self.tp {
                    None => dist_clip::total_norm(clip::divide_and_partial_norm(mine, divisor, c.norm), c.norm, shards)?,
                    Some(tp) => {
                        grad_sync::divide(mine, divisor);
                        let partial = dist_clip::placed_partial(mine, owned.clone(), self.opt.optimizer().layout(), c.norm, tp);
                        dist_clip::total_norm(partial, c.norm, shards.into_iter().chain([&tp.group]))?
                    }
                };
                clip::check_finite(total, c.error_if_nonfinite)?;
                (Some(total), clip::clip_coefficient(c.max_norm, total))
            }
        };
        let report = StepReport { lrs: self.opt.lrs(), grad_norm };
        self.opt.step_scaled(&mut params[owned], mine, scale)?;
        self.steps += 1;
        if matches!(self.config.strategy, Strategy::Zero1 | Strategy::Zero2) {
            self.comm.all_gather(params)?;
        }
        Ok(report)
    }

    /// All-gathers the parameters every rank owns into `params` (ZeRO-3's on-demand
    /// gather before a forward pass; a no-op for the others, whose params are complete).
    pub fn gather_params(&self, params: &mut [f32]) -> Result<()> {
        if self.config.strategy == Strategy::Zero3 {
            self.comm.all_gather(params)?;
        }
        Ok(())
    }

    /// This rank's optimizer state (its range only, for ZeRO).
    pub fn state_dict(&self) -> OptimizerStateDict {
        self.opt.optimizer().state_dict()
    }

    /// Gathers every rank's state into one full state dict on rank `to` (torch's
    /// `consolidate_state_dict`); other ranks get `None`. Collective.
    pub fn consolidate_state_dict(&self, to: usize) -> Result<Option<OptimizerStateDict>> {
        if !self.config.strategy.shards_state() {
            return Ok((self.comm.rank() == to).then(|| self.opt.optimizer().state_dict()));
        }
        let mine = self.opt.optimizer().state_dict();
        let names: Vec<String> = mine.buffers.keys().cloned().collect();
        let numel = self.opt.optimizer().layout().numel();
        // Each buffer and the step counts, all-gathered over the balanced ranges.
        let mut buffers = std::collections::BTreeMap::new();
        for name in &names {
            let mut full = vec![0f32; numel];
            full[self.owned.clone()].copy_from_slice(&mine.buffers[name]);
            self.comm.all_gather(&mut full)?;
            buffers.insert(name.clone(), full);
        }
        let mut steps: Vec<i64> = mine.steps.iter().map(|&s| s as i64).collect();
        self.comm.all_reduce(&mut steps, distoptim_collective::ReduceOp::Max)?;
        if self.comm.rank() != to {
            return Ok(None);
        }
        Ok(Some(OptimizerStateDict { shard: 0..numel, steps: steps.into_iter().map(|s| s as u64).collect(), buffers, ..mine }))
    }

    /// Restores from a full (consolidated) state dict, or from this rank's own shard of
    /// one: a run can resume on a different number of ranks or with another strategy.
    pub fn load_state_dict(&mut self, sd: &OptimizerStateDict) -> Result<()> {
        let part = if sd.shard == self.owned { sd.clone() } else { sd.restrict(self.owned.clone())? };
        self.opt.load_state_dict(&part)?;
        Ok(())
    }

    pub fn strategy(&self) -> Strategy {
        self.config.strategy
    }

    /// Sets the step and schedule counters a checkpoint recorded.
    pub(crate) fn restore_counters(&mut self, steps: u64, schedule_step: Option<u64>) -> Result<()> {
        self.steps = steps;
        if let Some(s) = schedule_step {
            self.opt.set_schedule_step(s)?;
        }
        Ok(())
    }

    /// The scheduler's position (steps taken), for checkpoints.
    pub fn schedule_step(&self) -> Option<u64> {
        self.opt.schedule_step()
    }

    /// Continues the schedule from `step` (after loading a state dict).
    pub fn set_schedule_step(&mut self, step: u64) -> Result<()> {
        self.opt.set_schedule_step(step)
    }
}
