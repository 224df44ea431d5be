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

use crate::buckets::GradBuckets;
use crate::config::{StepConfig, StepReport, Strategy};
use crate::dist_clip::{self, TensorParallel};
use crate::error::{DistError, Result};
use crate::grad_sync;
use crate::scheduled::Scheduled;
use distoptim_collective::{shard_range, Communicator, ReduceOp, SharedBuf};
use distoptim_optim::clip;
use distoptim_optim::{Layout, OptimizerConfig, OptimizerStateDict, ParamGroup, Schedule};
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
        if !config.strategy.is_synchronous() {
            return Err(DistError::Invalid(format!(
                "{} is not a synchronous strategy: build it with distoptim::data_parallel",
                config.strategy
            )));
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
        let (op, divisor) = grad_sync::reduction(self.config.reduce, divisor);
        // When the collective leaves nothing to divide, the clip's norm is measured on the
        // blocks the collective writes, while they are in cache: each rank measures its
        // part of the result and the partials are summed, so no pass over memory is left
        // between the reduction and the optimizer kernel.
        let mut measure = match (&self.config.clip, &self.tp) {
            (Some(c), None) if divisor == 1.0 => Some(clip::NormAccumulator::new(c.norm)),
            _ => None,
        };
        let mut observe = |piece: &[f32]| {
            if let Some(m) = measure.as_mut() {
                m.add(piece);
            }
        };
        if matches!(self.config.strategy, Strategy::Zero2 | Strategy::Zero3) {
            self.comm.reduce_scatter_observed(grads, op, &mut observe)?;
        } else {
            grad_sync::all_reduce_observed(&self.comm, grads, self.config.bucket_elems(), op, &mut observe)?;
        }
        let measured = measure.map(clip::NormAccumulator::finish);
        self.apply(params, grads, divisor, measured)
    }

    /// Gradient buckets for this optimizer's layout, reduce mode and `bucket_cap_mb`, to
    /// overlap the reduction with a backward pass that produces gradients layer by layer
    /// (see [`GradBuckets`]). Collective: the buffer comes from the communicator.
    pub fn grad_buckets(&self) -> Result<GradBuckets> {
        GradBuckets::new(&self.comm, self.layout(), self.config.reduce, self.config.bucket_elems())
    }

    /// [`step`](Self::step) with gradients already reducing in `buckets`: waits for them
    /// (reducing any bucket not marked ready) and steps. Gives the same parameters as
    /// `step` to the bit. DDP and ZeRO-1 only: ZeRO-2/3 reduce-scatter the whole buffer
    /// over the ranks' ranges, which do not follow bucket boundaries.
    pub fn step_buckets(&mut self, params: &mut [f32], buckets: &mut GradBuckets) -> Result<StepReport> {
        if !matches!(self.config.strategy, Strategy::Ddp | Strategy::Zero1) {
            return Err(DistError::Invalid(format!(
                "step_buckets needs an all-reduce strategy (ddp or zero1), not {}; use step",
                self.config.strategy.name()
            )));
        }
        let numel = self.layout().numel();
        if params.len() != numel || buckets.numel() != numel || buckets.comm().size() != self.comm.size() {
            return Err(DistError::Invalid(format!(
                "params ({}) and buckets ({}) must match the layout's {numel} elements and this group",
                params.len(),
                buckets.numel()
            )));
        }
        let (grads, divisor) = buckets.finish()?;
        self.apply(params, grads, divisor, None)
    }

    /// The step after the reduction: `grads` holds the SUM over the group (at least over
    /// the owned range), to be divided by `divisor`. `measured`: this rank's partial of the
    /// clip's norm, when the collective already measured its part of the result.
    fn apply(&mut self, params: &mut [f32], grads: &mut [f32], divisor: f32, measured: Option<f64>) -> Result<StepReport> {
        // Only the owned elements are finished: divided, measured, clipped (the clip
        // coefficient is applied by the optimizer as it reads each gradient).
        let owned = self.owned.clone();
        let mine = &mut grads[owned.clone()];
        let (grad_norm, scale) = match &self.config.clip {
            None => {
                grad_sync::divide(mine, divisor);
                (None, 1.0)
            }
            Some(c) => {
                let total = match (&self.tp, measured) {
                    (None, Some(partial)) => dist_clip::total_norm(partial, c.norm, [&self.comm])?,
                    (None, None) => {
                        // Each rank measures one balanced range and the partials are
                        // summed: under DDP too, where every rank holds every element,
                        // so no rank reads more than 1/W of the gradient for the norm.
                        let numel = mine.len();
                        let measured = if self.config.strategy.shards_state() {
                            0..numel
                        } else {
                            shard_range(numel, self.comm.size(), self.comm.rank())
                        };
                        grad_sync::divide(&mut mine[..measured.start], divisor);
                        grad_sync::divide(&mut mine[measured.end..], divisor);
                        let partial = clip::divide_and_partial_norm(&mut mine[measured], divisor, c.norm);
                        dist_clip::total_norm(partial, c.norm, [&self.comm])?
                    }
                    (Some(tp), _) => {
                        // DDP owns everything and needs no reduction of the norm over data-parallel ranks.
                        let shards = self.config.strategy.shards_state().then_some(&self.comm);
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
        let full = self.gather_state()?;
        Ok((self.comm.rank() == to).then_some(full))
    }

    /// Every rank's state joined into the full state dict, on every rank (collective).
    fn gather_state(&self) -> Result<OptimizerStateDict> {
        let mine = self.opt.optimizer().state_dict();
        if !self.config.strategy.shards_state() {
            return Ok(mine);
        }
        let numel = self.opt.optimizer().layout().numel();
        // Each buffer and the step counts, all-gathered over the balanced ranges.
        let mut buffers = std::collections::BTreeMap::new();
        for (name, part) in &mine.buffers {
            let mut full = vec![0f32; numel];
            full[self.owned.clone()].copy_from_slice(part);
            self.comm.all_gather(&mut full)?;
            buffers.insert(name.clone(), full);
        }
        let mut steps: Vec<i64> = mine.steps.iter().map(|&s| s as i64).collect();
        self.comm.all_reduce(&mut steps, ReduceOp::Max)?;
        Ok(OptimizerStateDict { shard: 0..numel, steps: steps.into_iter().map(|s| s as u64).collect(), buffers, ..mine })
    }

    /// torch's `add_param_group`, with ZeroRedundancyOptimizer's re-partition: appends
    /// `params` as a new group with `config` (no state yet) and, for ZeRO, re-balances the
    /// ranges over the grown buffer, moving every rank's state to its new owner.
    /// Collective; every rank passes the same arguments. Returns the new parameters'
    /// indices.
    ///
    /// The parameter and gradient buffers of later steps grow by the new elements at the
    /// end. Under ZeRO-3 the parameters must be complete first
    /// ([`gather_params`](Self::gather_params)), because each rank's range moves. The
    /// schedule keeps its position; the new group joins it with its lr as base lr.
    pub fn add_param_group(&mut self, params: Vec<(String, Vec<usize>)>, config: OptimizerConfig) -> Result<Vec<usize>> {
        if self.tp.is_some() {
            return Err(DistError::Invalid("add_param_group is not supported with tensor parallelism (placements are fixed)".into()));
        }
        let mut full = self.gather_state()?;
        let added = full.add_param_group(params, config)?;
        let numel = full.layout.numel();
        let owned = if self.config.strategy.shards_state() { shard_range(numel, self.comm.size(), self.comm.rank()) } else { 0..numel };
        self.opt.regrow(&full.restrict(owned.clone())?)?;
        self.owned = owned;
        Ok(added)
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

impl crate::DataParallel for DistributedOptimizer {
    fn strategy(&self) -> Strategy {
        self.config.strategy
    }

    fn comm(&self) -> &Communicator {
        &self.comm
    }

    fn layout(&self) -> &Layout {
        self.opt.optimizer().layout()
    }

    fn step(&mut self, params: &mut [f32], grads: &mut [f32], batch_size: usize) -> Result<StepReport> {
        DistributedOptimizer::step(self, params, grads, batch_size)
    }

    fn gather(&self, params: &mut [f32]) -> Result<()> {
        self.gather_params(params)
    }

    fn params_in_sync(&self) -> bool {
        true
    }

    fn finish(&mut self, params: &mut [f32]) -> Result<()> {
        self.gather_params(params)
    }

    fn save(
        &self,
        root: &std::path::Path,
        params: &[f32],
        counters: std::collections::BTreeMap<String, u64>,
        options: &crate::checkpoint::SaveOptions,
    ) -> Result<(crate::checkpoint::Manifest, std::path::PathBuf)> {
        crate::checkpoint::save(root, self, params, &counters, options)
    }

    fn load(&mut self, path: &std::path::Path, params: &mut [f32]) -> Result<crate::checkpoint::Manifest> {
        crate::checkpoint::load(path, self, params)
    }
}
