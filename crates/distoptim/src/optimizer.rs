//! [`ShardedOptimizer`]: one optimizer step over a group of data-parallel ranks.
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
//!    until [`gather_params`](ShardedOptimizer::gather_params).
//!
//! Guarantee: whatever the strategy and world size, the parameters after each step are
//! those of one process stepping with the reduced gradient (to the bit on the embedded
//! backends), and every rank holds the same values.
//!
//! **Mixed precision** ([`Precision`]): parameters and gradients come in a working type
//! (bf16, f16 or f32); the optimizer keeps an f32 master copy of exactly its range and
//! f32 state, reduces in `reduce_dtype` chunk by chunk (ZeRO: reduce-scatter, so no rank
//! holds a full f32 gradient), unscales and checks for overflow under loss scaling,
//! clips on f32 values, steps the master and rounds it back (see [`crate::precision`]).

use crate::buckets::GradBuckets;
use crate::config::{StepConfig, StepReport, Strategy};
use crate::dist_clip::{self, TensorParallel};
use crate::error::{DistError, Result};
use crate::grad_sync;
use crate::precision::{round_into, widen_into, Flat, FlatMut, FloatDtype, LossScaler, Precision, Working};
use crate::scheduled::Scheduled;
use crate::transforms::{self, TransformPlan};
use distoptim_collective::exact::{ExactSum, ReproducibleSum};
use distoptim_collective::{shard_range, Communicator, ReduceOp, SharedBuf};
use distoptim_optim::clip::{self, NormType};
use distoptim_optim::{Layout, OptimizerConfig, OptimizerStateDict, ParamGroup, Schedule};
use std::ops::Range;

/// The widest margin [`ShardedOptimizer::fetch_halo`] fetches (elements per side): past
/// it, snapped ranges take the staged path.
const HALO_MAX: usize = 1 << 16;

/// How far `ranges` (one per rank, over `n` elements) reach past the balanced ones, when
/// the all-f32 step of `strategy` can fetch that margin after its reduce-scatter; `None`
/// when it cannot (see `ShardedOptimizer::halo`).
pub(crate) fn halo(ranges: &[Range<usize>], n: usize, strategy: Strategy) -> Option<usize> {
    let size = ranges.len();
    let bal: Vec<Range<usize>> = (0..size).map(|r| shard_range(n, size, r)).collect();
    if ranges == bal.as_slice() || !matches!(strategy, Strategy::Zero2 | Strategy::Zero3) {
        return Some(0);
    }
    let h = ranges.iter().zip(&bal).map(|(o, b)| b.start.saturating_sub(o.start).max(o.end.saturating_sub(b.end))).max()?;
    let fits = h <= bal.iter().map(|b| b.len()).min()?
        && ranges.iter().enumerate().all(|(r, o)| {
            let lo = if r > 0 { bal[r - 1].end - h } else { 0 };
            let hi = if r + 1 < size { bal[r + 1].start + h } else { n };
            lo <= o.start && o.end <= hi
        });
    (fits && h <= HALO_MAX).then_some(h)
}

/// DDP and ZeRO-1/2/3 over one flat buffer (see the module docs): what Megatron-LM calls
/// its distributed optimizer. Named apart from torch's RPC `DistributedOptimizer`, which
/// is `distoptim_ps::DistributedOptimizer`.
pub struct ShardedOptimizer {
    comm: Communicator,
    config: StepConfig,
    /// The elements whose optimizer state this rank keeps (everything for DDP).
    owned: Range<usize>,
    opt: Scheduled,
    steps: u64,
    /// Tensor parallelism: the tp group and each parameter's placement (for the clip).
    tp: Option<TensorParallel>,
    /// The f32 master weights over `owned`, when the working type is 16-bit (filled from
    /// the first step's parameters unless set by [`set_master`](Self::set_master)).
    master: Option<Vec<f32>>,
    /// Dynamic loss scaling, when the policy asks for it.
    scaler: Option<LossScaler>,
    /// The mixed-precision reduction's staging buffers (shared memory).
    staging: grad_sync::Staging,
    /// The reduced f32 gradient over `owned` of a mixed-precision step (kept between
    /// steps except under ZeRO-3).
    reduced: Vec<f32>,
    /// Every rank's range (ZeRO; `owned` is this rank's): the balanced ranges, snapped to
    /// parameter boundaries where a whole-parameter rule (Adafactor) would be cut.
    ranges: Vec<Range<usize>>,
    /// Who runs each whole-matrix transform (Muon's Newton–Schulz) and whether the step
    /// exchanges them (see [`transforms`]).
    transforms: TransformPlan,
}

/// The bytes one rank holds, by what they are for: what `train` prints beside the peak
/// RSS and `distoptim estimate` predicts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryLedger {
    /// The working-type parameter buffer the step reads and writes: all of it, or the
    /// shard under ZeRO-3 (whose full buffer, the all-gather's destination, the caller
    /// needs only while it copies the parameters into its model).
    pub working_params: u64,
    /// The working-type gradient buffer.
    pub grads: u64,
    /// The f32 master weights (only with a 16-bit working type).
    pub master: u64,
    /// Optimizer state (Adam's moments, SGD's momentum) over the owned range.
    pub optimizer_state: u64,
    /// The reduced f32 gradient of the owned range and the collectives' staging buffers
    /// of a mixed-precision step (ZeRO-3 frees the former after each step).
    pub comm_buffers: u64,
}

impl MemoryLedger {
    /// Everything together.
    pub fn total(&self) -> u64 {
        self.working_params + self.grads + self.master + self.optimizer_state + self.comm_buffers
    }
}

impl ShardedOptimizer {
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
        config.precision.validate()?;
        let (ranges, transforms) = Self::ranges_for(&config, &layout, &groups, comm.size());
        let owned = ranges[comm.rank()].clone();
        let opt = Scheduled::new(layout, groups, owned.clone(), schedule)?;
        let scaler = config.precision.loss_scale.map(LossScaler::new);
        Ok(ShardedOptimizer {
            comm,
            config,
            owned,
            opt,
            steps: 0,
            tp: None,
            master: None,
            scaler,
            staging: Default::default(),
            reduced: Vec::new(),
            ranges,
            transforms,
        })
    }

    /// Every rank's range and where the whole-matrix transforms run: the whole buffer
    /// and every transform on every rank for DDP (no exchange), else
    /// [`transforms::shard`]. What `estimate` plans with too.
    pub(crate) fn ranges_for(
        config: &StepConfig,
        layout: &Layout,
        groups: &[ParamGroup],
        size: usize,
    ) -> (Vec<Range<usize>>, TransformPlan) {
        if config.strategy.shards_state() {
            transforms::shard(layout, groups, size)
        } else {
            (vec![0..layout.numel(); size], TransformPlan::default())
        }
    }

    /// Whether the ranges are the balanced ones the collectives partition by (no
    /// whole-matrix parameter cut), so reduce-scatter and all-gather apply directly and
    /// checkpoint files (written in those ranges) hold exactly each rank's part.
    pub(crate) fn balanced(&self) -> bool {
        !self.config.strategy.shards_state()
            || self.ranges.iter().enumerate().all(|(r, range)| *range == shard_range(self.layout().numel(), self.comm.size(), r))
    }

    /// All-gathers a buffer of which every rank holds its range.
    fn all_gather_owned<T: Working>(&self, buf: &mut [T]) -> Result<()> {
        if self.balanced() {
            self.comm.all_gather(buf)?;
        } else {
            grad_sync::all_gather_ranges(&self.comm, buf, &self.ranges)?;
        }
        Ok(())
    }

    /// The optimizer over this rank's range (for snapshots).
    pub(crate) fn inner_optimizer(&self) -> &distoptim_optim::Optimizer {
        self.opt.optimizer()
    }

    /// The precision policy.
    pub fn precision(&self) -> Precision {
        self.config.precision
    }

    /// Sets the f32 master weights from the full f32 parameters `full` (the values the
    /// model was initialised with, before rounding to the working type). Without this
    /// the first step takes the master from the working parameters, widened.
    pub fn set_master(&mut self, full: &[f32]) -> Result<()> {
        let numel = self.layout().numel();
        if full.len() != numel {
            return Err(DistError::Invalid(format!("master has {} elements, the layout has {numel}", full.len())));
        }
        if self.config.precision.has_master() {
            self.master = Some(full[self.owned.clone()].to_vec());
        }
        Ok(())
    }

    /// The f32 master weights over [`owned`](Self::owned), once they exist (16-bit
    /// working types only).
    pub fn master(&self) -> Option<&[f32]> {
        self.master.as_deref()
    }

    /// The full f32 master weights, all-gathered from every rank's range (collective):
    /// `None` when the working type is f32 (the parameters are the master) or before the
    /// master exists.
    pub fn gather_master(&self) -> Result<Option<Vec<f32>>> {
        let mut has = [i32::from(self.master.is_some())];
        self.comm.all_reduce(&mut has, ReduceOp::Min)?;
        let Some(master) = self.master.as_ref().filter(|_| has[0] == 1) else { return Ok(None) };
        let mut full = vec![0.0f32; self.layout().numel()];
        full[self.owned.clone()].copy_from_slice(master);
        if self.config.strategy.shards_state() {
            self.all_gather_owned(&mut full)?;
        }
        Ok(Some(full))
    }

    /// The loss scaler's state, under loss scaling: multiply the loss by `scale` before
    /// the backward pass.
    pub fn loss_scaler(&self) -> Option<&LossScaler> {
        self.scaler.as_ref()
    }

    /// The scale to multiply the loss by (1 without loss scaling).
    pub fn loss_scale(&self) -> f32 {
        self.scaler.map_or(1.0, |s| s.scale)
    }

    /// Restores a loss scaler's state (from a checkpoint).
    pub(crate) fn set_loss_scaler(&mut self, scale: f32, growth_tracker: u64) {
        if let Some(s) = self.scaler.as_mut() {
            s.scale = scale;
            s.growth_tracker = growth_tracker;
        }
    }

    /// The bytes this rank holds by category, for parameters and gradients of the
    /// policy's working type.
    pub fn memory(&self) -> MemoryLedger {
        let numel = self.layout().numel() as u64;
        let working = self.config.precision.param_dtype.size() as u64;
        let state: u64 = self.opt.optimizer().state_bytes();
        let master = self.master.as_ref().map_or(0, |m| m.len() as u64 * 4);
        // A mixed-precision step: the staging chunk and the reduced f32 gradient of the
        // owned range (ZeRO-3 frees the latter after each step).
        let transient = if self.mixed() {
            grad_sync::staging_bytes(&self.config, self.comm.size(), self.layout().numel()) + self.owned.len() as u64 * 4
        } else {
            0
        };
        let kept = self.param_shard().map_or(numel, |r| r.len() as u64);
        let comm_buffers = transient + self.transforms.exchange_bytes();
        MemoryLedger { working_params: kept * working, grads: numel * working, master, optimizer_state: state, comm_buffers }
    }

    /// Whether steps take the mixed-precision path: anything but the all-f32 policy, or
    /// ranges the all-f32 step cannot serve (far from the balanced ones).
    fn mixed(&self) -> bool {
        let p = &self.config.precision;
        p.param_dtype != FloatDtype::F32 || p.reduce_dtype != FloatDtype::F32 || self.scaler.is_some() || self.halo().is_none()
    }

    /// How far the ranges reach past the balanced ones the collectives reduce-scatter
    /// into, when the all-f32 step can fetch that margin from the neighbours after the
    /// reduce-scatter ([`fetch_halo`](Self::fetch_halo)): 0 for balanced ranges and under
    /// ZeRO-1 (its all-reduce leaves every element everywhere); `None` when some range
    /// reaches past a neighbour's first or last `halo` elements (whole matrices moved
    /// across ranks), which the staged path serves instead. Ranges snapped to 8-bit
    /// quantization blocks move by less than a block.
    fn halo(&self) -> Option<usize> {
        halo(&self.ranges, self.layout().numel(), self.config.strategy)
    }

    /// After a balanced reduce-scatter of `grads`, brings in the reduced elements of this
    /// rank's range that lie in its neighbours' balanced ranges: every rank contributes the
    /// first and last `halo` elements of its balanced range to one small all-gather.
    fn fetch_halo(&self, grads: &mut [f32]) -> Result<()> {
        let Some(h) = self.halo().filter(|&h| h > 0) else { return Ok(()) };
        let (n, size, me) = (grads.len(), self.comm.size(), self.comm.rank());
        let bal: Vec<Range<usize>> = (0..size).map(|r| shard_range(n, size, r)).collect();
        let mut slab = vec![0f32; size * 2 * h];
        let b = &bal[me];
        slab[me * 2 * h..me * 2 * h + h].copy_from_slice(&grads[b.start..b.start + h]);
        slab[me * 2 * h + h..(me + 1) * 2 * h].copy_from_slice(&grads[b.end - h..b.end]);
        self.comm.all_gather(&mut slab)?;
        let owned = self.owned.clone();
        for (r, b) in bal.iter().enumerate().filter(|(r, _)| *r != me) {
            let o = owned.start.max(b.start)..owned.end.min(b.end);
            if o.is_empty() {
                continue;
            }
            // Within r's first h elements (r follows this rank) or its last h (r precedes).
            let from = if r > me { r * 2 * h + (o.start - b.start) } else { r * 2 * h + h + (o.start - (b.end - h)) };
            grads[o.clone()].copy_from_slice(&slab[from..from + o.len()]);
        }
        Ok(())
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

    /// The group it runs on.
    pub fn comm(&self) -> &Communicator {
        &self.comm
    }

    /// The flat layout of the parameters.
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

    /// Every group's current learning rate.
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
    /// written, and `params` may be just that range, [`param_shard`](Self::param_shard)),
    /// of the policy's `param_dtype`. `grads` is of the same type, or f32
    /// (gradients accumulated in f32, Megatron's `accumulate_allreduce_grads_in_fp32`).
    /// Every rank of the group must call it.
    pub fn step<P: Working, G: Working>(&mut self, params: &mut [P], grads: &mut [G], batch_size: usize) -> Result<StepReport> {
        let numel = self.opt.optimizer().layout().numel();
        if grads.len() != numel {
            return Err(DistError::Invalid(format!("grads has {} elements, the layout has {numel}", grads.len())));
        }
        if params.len() != numel && !(self.param_shard().is_some() && params.len() == self.owned.len()) {
            return Err(DistError::Invalid(format!(
                "params has {} elements, the layout has {numel}{}",
                params.len(),
                if self.param_shard().is_some() { format!(" (or this rank's shard, {})", self.owned.len()) } else { String::new() }
            )));
        }
        let param_dtype = self.config.precision.param_dtype;
        if <P as Working>::DTYPE != param_dtype {
            return Err(DistError::Invalid(format!(
                "params are {}, the precision policy's param_dtype is {param_dtype}",
                <P as Working>::DTYPE
            )));
        }
        if ![param_dtype, FloatDtype::F32].contains(&<G as Working>::DTYPE) {
            return Err(DistError::Invalid(format!(
                "grads are {}: they must be of param_dtype ({param_dtype}) or f32",
                <G as Working>::DTYPE
            )));
        }
        if self.mixed() {
            return self.step_mixed(params, grads, batch_size);
        }
        match (P::as_f32_mut(params), G::as_f32_mut(grads)) {
            (Some(p), Some(g)) => self.step_f32(p, g, batch_size),
            _ => Err(DistError::Invalid("the all-f32 step needs f32 buffers".into())),
        }
    }

    /// The all-f32 step: the parameters are their own master.
    fn step_f32(&mut self, params: &mut [f32], grads: &mut [f32], batch_size: usize) -> Result<StepReport> {
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
            self.fetch_halo(grads)?;
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
        let owned = self.owned.clone();
        let report = self.clip_and_step(self.owned_params(params), &mut grads[owned], divisor, measured)?;
        if matches!(self.config.strategy, Strategy::Zero1 | Strategy::Zero2) {
            self.all_gather_owned(params)?;
        }
        Ok(report)
    }

    /// Finishes the owned elements: divides, measures, clips (the clip coefficient is
    /// applied by the optimizer as it reads each gradient) and steps `params` (the owned
    /// range, f32).
    fn clip_and_step(&mut self, params: &mut [f32], mine: &mut [f32], divisor: f32, measured: Option<f64>) -> Result<StepReport> {
        let owned = self.owned.clone();
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
        self.step_owned(params, mine, grad_norm, scale)
    }

    /// Steps the owned range with the reduced, divided gradient and the clip coefficient.
    fn step_owned(&mut self, params: &mut [f32], mine: &mut [f32], grad_norm: Option<f32>, scale: f32) -> Result<StepReport> {
        let report = StepReport { lrs: self.opt.lrs(), grad_norm, skipped: false };
        let exchange = self.transforms.exchanges().then_some((&mut self.transforms, &self.comm));
        self.opt.step_with(params, mine, scale, exchange)?;
        self.steps += 1;
        Ok(report)
    }

    /// The step of deterministic mode: the same parameter bits at any world size, on any
    /// backend, given the same terms in `sum`.
    ///
    /// Each rank has added its terms to `sum` (a training loop adds the gradient of each
    /// of its micro-shards of a global batch, cut the same way at any world size, each
    /// scaled by its share of the batch, so the terms add up to the batch's mean
    /// gradient). The terms are summed exactly ([`ReproducibleSum::reduce`]), the clip's norm is
    /// an exact sum too ([`ExactSum`]), and the update is elementwise, so nothing depends
    /// on how the ranks split the work. No division follows: the terms are already
    /// weighted. Not with loss scaling (f16) or tensor parallelism; `sum` is cleared.
    pub fn step_deterministic<P: Working>(&mut self, params: &mut [P], sum: &mut ReproducibleSum) -> Result<StepReport> {
        let numel = self.layout().numel();
        if sum.len() != numel {
            return Err(DistError::Invalid(format!("the sum has {} elements, the layout has {numel}", sum.len())));
        }
        if params.len() != numel && !(self.param_shard().is_some() && params.len() == self.owned.len()) {
            return Err(DistError::Invalid(format!("params has {} elements, the layout has {numel}", params.len())));
        }
        if <P as Working>::DTYPE != self.config.precision.param_dtype {
            return Err(DistError::Invalid(format!(
                "params are {}, the precision policy's param_dtype is {}",
                <P as Working>::DTYPE,
                self.config.precision.param_dtype
            )));
        }
        if self.scaler.is_some() || self.tp.is_some() {
            return Err(DistError::Invalid(
                "deterministic mode has no loss scaling (f16) and no tensor parallelism: use f32 or bf16".into(),
            ));
        }
        let owned = self.owned.clone();
        // Reduce-scatter when the ranks own the collective's balanced ranges; else the
        // whole sum to every rank, each keeping its range.
        // The integer sums are reduce-scattered over the balanced ranges and rounded there;
        // ZeRO ranks own exactly those, DDP ranks all-gather the rounded f32 (half the
        // bytes of gathering the i64 sums). Ranges snapped to whole matrices take the
        // whole sum instead.
        let mut reduced = std::mem::take(&mut self.reduced);
        reduced.resize(owned.len(), 0.0);
        if self.balanced() && owned.len() < numel {
            sum.reduce(&self.comm, true, &mut reduced)?;
        } else if self.balanced() {
            let mine = shard_range(numel, self.comm.size(), self.comm.rank());
            sum.reduce(&self.comm, true, &mut reduced[mine])?;
            self.comm.all_gather(&mut reduced)?;
        } else {
            let mut full = vec![0f32; numel];
            sum.reduce(&self.comm, false, &mut full)?;
            reduced.copy_from_slice(&full[owned.clone()]);
        }
        let (grad_norm, scale) = match &self.config.clip {
            None => (None, 1.0),
            Some(c) => {
                // Each element counted once: by its owner, or under DDP by the rank whose
                // balanced range holds it.
                let measured = if self.config.strategy.shards_state() {
                    0..reduced.len()
                } else {
                    shard_range(numel, self.comm.size(), self.comm.rank())
                };
                let total = exact_norm(&self.comm, &reduced[measured], c.norm)?;
                clip::check_finite(total, c.error_if_nonfinite)?;
                (Some(total), clip::clip_coefficient(c.max_norm, total))
            }
        };
        self.step_on_reduced(params, reduced, |opt, mine, grads| opt.step_owned(mine, grads, grad_norm, scale))
    }

    /// The mixed-precision step (see the module docs).
    fn step_mixed<T: Working, G: Working>(&mut self, params: &mut [T], grads: &mut [G], batch_size: usize) -> Result<StepReport> {
        if self.tp.is_some() {
            return Err(DistError::Invalid("mixed precision is not supported with tensor parallelism".into()));
        }
        let owned = self.owned.clone();
        // Kept between steps (page-faulting a fresh buffer in costs more than the
        // reduction), except under ZeRO-3, which keeps nothing but its shards: there it
        // is freed after the step, so the backward pass that follows does not find it
        // resident.
        let mut reduced = std::mem::take(&mut self.reduced);
        reduced.resize(owned.len(), 0.0);
        let sharded = self.config.strategy.shards_state();
        // The clip's norm is measured on each chunk as the reduction finishes it (not under
        // loss scaling, which unscales after the reduction).
        let mut measure = match (&self.config.clip, &self.scaler) {
            (Some(c), None) => Some(clip::NormAccumulator::new(c.norm)),
            _ => None,
        };
        let mut observe = |piece: &[f32]| {
            if let Some(m) = measure.as_mut() {
                m.add(piece);
            }
        };
        let observed = grad_sync::reduce_working(
            &self.comm,
            grads,
            &self.config,
            &self.ranges,
            batch_size,
            &mut self.staging,
            &mut reduced,
            &mut observe,
        )?;
        let measured = measure.filter(|_| observed).map(clip::NormAccumulator::finish);
        if let Some(scaler) = self.scaler.as_mut() {
            // GradScaler.unscale_: multiply by the f32 reciprocal, then look for inf/NaN
            // over the whole gradient (every rank's range).
            let inv = scaler.inv_scale();
            let mut found = [i32::from(reduced.iter_mut().fold(false, |bad, g| {
                *g *= inv;
                bad | !g.is_finite()
            }))];
            if sharded {
                self.comm.all_reduce(&mut found, ReduceOp::Max)?;
            }
            if found[0] != 0 {
                scaler.update(true);
                self.keep_reduced(reduced);
                return Ok(StepReport { lrs: self.opt.lrs(), grad_norm: None, skipped: true });
            }
            scaler.update(false);
        }
        self.step_on_reduced(params, reduced, |opt, mine, grads| opt.clip_and_step(mine, grads, 1.0, measured))
    }

    /// Steps the owned range with the reduced gradient `reduced` by `step` (on the f32
    /// master under a 16-bit working type, rounded back into `params`; else on `params`
    /// themselves), keeps the buffer for the next step and all-gathers the parameters
    /// where the strategy needs them complete.
    fn step_on_reduced<T: Working>(
        &mut self,
        params: &mut [T],
        mut reduced: Vec<f32>,
        step: impl FnOnce(&mut Self, &mut [f32], &mut [f32]) -> Result<StepReport>,
    ) -> Result<StepReport> {
        let owned = self.owned.clone();
        let report = if self.config.precision.has_master() {
            let mut master = match self.master.take() {
                Some(m) => m,
                None => {
                    let mut m = vec![0.0f32; owned.len()];
                    widen_into(self.owned_params(params), &mut m);
                    m
                }
            };
            let report = step(self, &mut master, &mut reduced);
            round_into(&master, self.owned_params(params));
            self.master = Some(master);
            report
        } else {
            let full = T::as_f32_mut(params).ok_or_else(|| DistError::Invalid("f32 parameters expected".into()))?;
            let mine = if full.len() == self.layout().numel() { &mut full[owned] } else { full };
            step(self, mine, &mut reduced)
        };
        self.keep_reduced(reduced);
        let report = report?;
        if matches!(self.config.strategy, Strategy::Zero1 | Strategy::Zero2) {
            self.all_gather_owned(params)?;
        }
        Ok(report)
    }

    /// All-gathers the parameters every rank owns into `params` (ZeRO-3's on-demand
    /// gather before a forward pass; a no-op for the others, whose params are complete).
    /// Under mixed precision ZeRO-3 takes its range from the master (rounded), so the
    /// buffer may be a fresh one: between steps a rank need hold only its shard.
    pub fn gather_params<T: Working>(&self, params: &mut [T]) -> Result<()> {
        if self.config.strategy == Strategy::Zero3 {
            if let Some(master) = &self.master {
                round_into(master, &mut params[self.owned.clone()]);
            }
            self.all_gather_owned(params)?;
        }
        Ok(())
    }

    /// [`DataParallel::eval_params`](crate::DataParallel::eval_params): this rank's range
    /// of the evaluation view, from the f32 master where there is one (else from the
    /// parameters, widened), rounded into `out` and all-gathered.
    fn eval_view<T: Working>(&self, params: &[T], out: &mut [T]) -> Result<()> {
        let numel = self.layout().numel();
        if params.len() != numel || out.len() != numel {
            return Err(DistError::Invalid(format!("eval_params needs full buffers of {numel} elements")));
        }
        let owned = self.owned.clone();
        match (&self.master, T::as_f32(params), T::as_f32_mut(out)) {
            (None, Some(y), Some(x)) => self.opt.optimizer().eval_params(&y[owned.clone()], &mut x[owned])?,
            (master, _, _) => {
                let mut widened = Vec::new();
                let y = match master {
                    Some(m) => m.as_slice(),
                    None => {
                        widened.resize(owned.len(), 0f32);
                        widen_into(&params[owned.clone()], &mut widened);
                        &widened
                    }
                };
                let mut x = vec![0f32; owned.len()];
                self.opt.optimizer().eval_params(y, &mut x)?;
                round_into(&x, &mut out[owned]);
            }
        }
        if self.config.strategy.shards_state() {
            self.all_gather_owned(out)?;
        }
        Ok(())
    }

    /// ZeRO-3: the range of the parameters this rank keeps between steps (a step may be
    /// given just that range; [`gather_params`](Self::gather_params) makes a full buffer
    /// from it). `None` for the others, which step the full buffer.
    pub fn param_shard(&self) -> Option<Range<usize>> {
        (self.config.strategy == Strategy::Zero3).then(|| self.owned.clone())
    }

    /// Keeps the reduction buffer for the next step (not under ZeRO-3).
    fn keep_reduced(&mut self, reduced: Vec<f32>) {
        if self.config.strategy != Strategy::Zero3 {
            self.reduced = reduced;
        }
    }

    /// The owned range of `params`: `params` itself when it is the shard.
    fn owned_params<'a, T>(&self, params: &'a mut [T]) -> &'a mut [T] {
        if params.len() == self.owned.len() && self.param_shard().is_some() {
            params
        } else {
            &mut params[self.owned.clone()]
        }
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
    pub(crate) fn gather_state(&self) -> Result<OptimizerStateDict> {
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
            self.all_gather_owned(&mut full)?;
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
        let (ranges, transforms) = Self::ranges_for(&self.config, &full.layout, &full.groups, self.comm.size());
        let owned = ranges[self.comm.rank()].clone();
        self.opt.regrow(&full.restrict(owned.clone())?)?;
        self.transforms = transforms;
        self.owned = owned;
        self.ranges = ranges;
        Ok(added)
    }

    /// Restores from a full (consolidated) state dict, or from this rank's own shard of
    /// one: a run can resume on a different number of ranks or with another strategy.
    pub fn load_state_dict(&mut self, sd: &OptimizerStateDict) -> Result<()> {
        let part = if sd.shard == self.owned { sd.clone() } else { sd.restrict(self.owned.clone())? };
        self.opt.load_state_dict(&part)?;
        Ok(())
    }

    /// DDP or the ZeRO stage.
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

/// The global norm of a gradient of which each rank measures the part `mine`, summed
/// exactly (the same bits however the parts are cut): in parallel over fixed pieces,
/// whose exact partial sums add up exactly.
fn exact_norm(comm: &Communicator, mine: &[f32], norm: NormType) -> Result<f32> {
    use rayon::prelude::*;
    if let NormType::Inf = norm {
        // NaN propagates, as in torch (f32::max would drop it).
        let mut max = [mine.iter().fold(0f32, |m, g| if g.is_nan() || m.is_nan() { f32::NAN } else { m.max(g.abs()) })];
        comm.all_reduce(&mut max, ReduceOp::Max)?;
        return Ok(max[0]);
    }
    let mut total = mine
        .par_chunks(1 << 16)
        .map(|c| {
            let mut s = ExactSum::new();
            match norm {
                NormType::P(2.0) => s.add_squares(c),
                NormType::P(1.0) => s.add_abs(c),
                _ => s.add_all(c, |g| norm.term(g)),
            }
            s
        })
        .reduce(ExactSum::new, |mut a, b| {
            a.merge(&b);
            a
        });
    total.all_reduce(comm)?;
    Ok(norm.total(total.value()))
}

/// Runs `$body` with `$v` bound to the typed slice inside a [`FlatMut`].
macro_rules! with_flat {
    ($flat:expr, $v:ident => $body:expr) => {
        match $flat {
            FlatMut::F32($v) => $body,
            FlatMut::Bf16($v) => $body,
            FlatMut::F16($v) => $body,
        }
    };
}

impl crate::DataParallel for ShardedOptimizer {
    fn strategy(&self) -> Strategy {
        self.config.strategy
    }

    fn comm(&self) -> &Communicator {
        &self.comm
    }

    fn layout(&self) -> &Layout {
        self.opt.optimizer().layout()
    }

    fn step(&mut self, params: FlatMut<'_>, grads: FlatMut<'_>, batch_size: usize) -> Result<StepReport> {
        with_flat!(params, p => with_flat!(grads, g => ShardedOptimizer::step(self, p, g, batch_size)))
    }

    fn step_deterministic(&mut self, params: FlatMut<'_>, sum: &mut ReproducibleSum) -> Result<StepReport> {
        with_flat!(params, p => ShardedOptimizer::step_deterministic(self, p, sum))
    }

    fn gather(&self, params: FlatMut<'_>) -> Result<()> {
        with_flat!(params, p => self.gather_params(p))
    }

    fn snapshot(
        &self,
        snapshots: &mut crate::elastic::Snapshots,
        step: u64,
        params: Flat<'_>,
        counters: &std::collections::BTreeMap<String, u64>,
    ) -> Result<()> {
        match params {
            Flat::F32(p) => ShardedOptimizer::snapshot(self, snapshots, step, p, counters),
            Flat::Bf16(p) => ShardedOptimizer::snapshot(self, snapshots, step, p, counters),
            Flat::F16(p) => ShardedOptimizer::snapshot(self, snapshots, step, p, counters),
        }
    }

    fn restore(&mut self, snapshots: &crate::elastic::Snapshots, params: FlatMut<'_>) -> Result<Option<crate::checkpoint::Manifest>> {
        with_flat!(params, p => ShardedOptimizer::restore(self, snapshots, p))
    }

    fn param_shard(&self) -> Option<Range<usize>> {
        ShardedOptimizer::param_shard(self)
    }

    fn params_in_sync(&self) -> bool {
        true
    }

    fn finish(&mut self, params: FlatMut<'_>) -> Result<()> {
        with_flat!(params, p => self.gather_params(p))
    }

    fn save(
        &self,
        root: &std::path::Path,
        params: Flat<'_>,
        counters: std::collections::BTreeMap<String, u64>,
        options: &crate::checkpoint::SaveOptions,
    ) -> Result<(crate::checkpoint::Manifest, std::path::PathBuf)> {
        match params {
            Flat::F32(p) => crate::checkpoint::save(root, self, p, &counters, options),
            Flat::Bf16(p) => crate::checkpoint::save(root, self, p, &counters, options),
            Flat::F16(p) => crate::checkpoint::save(root, self, p, &counters, options),
        }
    }

    fn load(&mut self, path: &std::path::Path, params: FlatMut<'_>) -> Result<crate::checkpoint::Manifest> {
        with_flat!(params, p => crate::checkpoint::load(path, self, p))
    }

    fn memory(&self) -> MemoryLedger {
        ShardedOptimizer::memory(self)
    }

    fn gather_master(&self) -> Result<Option<Vec<f32>>> {
        ShardedOptimizer::gather_master(self)
    }

    fn state_range(&self) -> Range<usize> {
        self.owned()
    }

    fn eval_params(&self, params: Flat<'_>, out: FlatMut<'_>) -> Result<()> {
        match (params, out) {
            (Flat::F32(p), FlatMut::F32(o)) => self.eval_view(p, o),
            (Flat::Bf16(p), FlatMut::Bf16(o)) => self.eval_view(p, o),
            (Flat::F16(p), FlatMut::F16(o)) => self.eval_view(p, o),
            (p, o) => Err(DistError::Invalid(format!("eval_params: {} parameters into a buffer of {}", p.dtype(), o.dtype()))),
        }
    }

    fn loss_scale(&self) -> f32 {
        ShardedOptimizer::loss_scale(self)
    }
}
