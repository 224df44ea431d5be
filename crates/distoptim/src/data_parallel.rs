//! One interface over the data-parallel algorithms: the synchronous sharded optimizer
//! (DDP, ZeRO-1/2/3), post-local SGD and DiLoCo. A training loop written against
//! [`DataParallel`] runs any of them, chosen by a [`Strategy`] at run time:
//!
//! ```no_run
//! # fn main() -> distoptim::Result<()> {
//! use distoptim::{data_parallel, DataParallelConfig, Strategy};
//! use distoptim_collective::Communicator;
//! use distoptim_optim::{AdamConfig, Layout, OptimizerConfig, ParamGroup};
//!
//! let comm = Communicator::from_env()?;
//! let layout = Layout::new([("w", vec![4, 4]), ("b", vec![4])])?;
//! let groups = vec![ParamGroup { params: vec![0, 1], config: OptimizerConfig::Adam(AdamConfig::adamw()) }];
//! let mut params = vec![0.1f32; layout.numel()];
//! let strategy: Strategy = "zero2".parse()?;
//! let mut dp = data_parallel(strategy, comm, layout, groups, None, &DataParallelConfig::new(), &params)?;
//! let mut grads = vec![0.01f32; params.len()];
//! dp.gather((&mut params).into())?; // complete parameters before the forward pass (ZeRO-3)
//! let report = dp.step((&mut params).into(), (&mut grads).into(), 32)?;
//! dp.finish((&mut params).into())?; // the replicas brought together
//! # let _ = report; Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use distoptim_collective::exact::ReproducibleSum;
use distoptim_collective::Communicator;
use distoptim_optim::{Layout, ParamGroup, Schedule};

use crate::checkpoint::{Manifest, SaveOptions};
use crate::config::{ClipConfig, ReduceMode, StepConfig, StepReport, Strategy};
use crate::diloco::{Diloco, DilocoConfig};
use crate::elastic::Snapshots;
use crate::error::Result;
use crate::local_sgd::{LocalSgdConfig, PostLocalSgd};
use crate::optimizer::{MemoryLedger, ShardedOptimizer};
use crate::precision::{Flat, FlatMut, Precision};

/// A data-parallel training algorithm: what a training loop calls, whichever algorithm
/// runs. Every method is collective over the algorithm's group unless it says otherwise.
pub trait DataParallel: Send {
    /// The strategy this is.
    fn strategy(&self) -> Strategy;

    /// The group the algorithm runs on (not collective).
    fn comm(&self) -> &Communicator;

    /// The flat layout of the parameters (not collective).
    fn layout(&self) -> &Layout;

    /// One optimizer step with this rank's gradient (overwritten) of its `batch_size`
    /// samples; `params` is this rank's full parameter buffer. Both are of the working
    /// type of the precision policy (`&mut Vec<f32>` and friends convert with `.into()`).
    fn step(&mut self, params: FlatMut<'_>, grads: FlatMut<'_>, batch_size: usize) -> Result<StepReport>;

    /// Deterministic mode's step: the same parameter bits at any world size and on any
    /// backend. Each rank has added to `sum` its terms of the global batch's mean
    /// gradient (the gradients of its micro-shards, each scaled by its share of the
    /// batch); they are summed exactly. Only the synchronous strategies have one (see
    /// [`ShardedOptimizer::step_deterministic`]); post-local SGD and DiLoCo depend on
    /// the world size by design and refuse.
    fn step_deterministic(&mut self, _params: FlatMut<'_>, _sum: &mut ReproducibleSum) -> Result<StepReport> {
        Err(crate::DistError::Invalid(format!(
            "{} has no deterministic mode (its result depends on the world size by design): use ddp or zero1/2/3",
            self.strategy()
        )))
    }

    /// Elastic recovery: writes this rank's state after step `step` into its in-memory
    /// snapshot slot (see [`Snapshots`]; not collective, no file on disk). `params` is
    /// what the rank keeps: the full buffer, or under ZeRO-3 its shard. Only the
    /// synchronous strategies have one; the others refuse.
    fn snapshot(&self, _snapshots: &mut Snapshots, _step: u64, _params: Flat<'_>, _counters: &BTreeMap<String, u64>) -> Result<()> {
        Err(crate::DistError::Invalid(format!("{} has no elastic snapshots: use ddp or zero1/2/3", self.strategy())))
    }

    /// Restores the newest snapshot that every rank of an earlier start of the job
    /// completed, resharded onto this group, into `params` (the full buffer) and the
    /// algorithm's state (collective). `None`: there is none, start from scratch.
    fn restore(&mut self, _snapshots: &Snapshots, _params: FlatMut<'_>) -> Result<Option<Manifest>> {
        Err(crate::DistError::Invalid(format!("{} has no elastic snapshots: use ddp or zero1/2/3", self.strategy())))
    }

    /// Makes `params` complete on this rank before a forward pass (ZeRO-3 all-gathers its
    /// shards; the others hold every element already and do nothing, the default).
    fn gather(&self, _params: FlatMut<'_>) -> Result<()> {
        Ok(())
    }

    /// ZeRO-3: the range of the parameters a rank needs to keep between steps; `step`
    /// takes just that range and `gather` fills a full buffer from it (not collective).
    /// `None`: every rank keeps and steps the full buffer.
    fn param_shard(&self) -> Option<std::ops::Range<usize>> {
        None
    }

    /// Whether every rank now holds the same parameters (not collective): always for the
    /// synchronous strategies, only right after an averaging for the periodic ones.
    fn params_in_sync(&self) -> bool;

    /// Brings the replicas together at the end of training: post-local SGD averages
    /// once more, DiLoCo takes the global parameters of its last outer step.
    fn finish(&mut self, params: FlatMut<'_>) -> Result<()>;

    /// Saves a checkpoint into the checkpoint root `root` (see [`crate::checkpoint`]),
    /// with the caller's `counters`. Returns the manifest and the step directory. Under
    /// mixed precision the f32 master is saved, not the rounded parameters.
    fn save(&self, root: &Path, params: Flat<'_>, counters: BTreeMap<String, u64>, options: &SaveOptions) -> Result<(Manifest, PathBuf)>;

    /// Restores a checkpoint written by [`save`](Self::save) into `params` and the
    /// algorithm's state. The synchronous strategies reload at any world size and from
    /// one another; the periodic ones only at the world size and strategy that saved.
    fn load(&mut self, path: &Path, params: FlatMut<'_>) -> Result<Manifest>;

    /// The parameters to evaluate and ship, from this rank's full `params` into `out`
    /// (both of the working type): a copy, except for Schedule-Free AdamW, whose buffer
    /// holds the gradient point y and whose averaged iterate x is what to evaluate
    /// (collective under ZeRO). Under mixed precision x comes from the f32 master and is
    /// rounded once, as the step rounds the parameters.
    fn eval_params(&self, params: Flat<'_>, mut out: FlatMut<'_>) -> Result<()> {
        out.copy_from(params)
    }

    /// The full f32 master weights under a 16-bit working type, `None` when the
    /// parameters are their own master (collective).
    fn gather_master(&self) -> Result<Option<Vec<f32>>> {
        Ok(None)
    }

    /// The elements this rank holds optimizer state for: its range under ZeRO, every
    /// element otherwise (not collective).
    fn state_range(&self) -> std::ops::Range<usize> {
        0..self.layout().numel()
    }

    /// The bytes this rank holds, by category (not collective).
    fn memory(&self) -> MemoryLedger;

    /// What to multiply the loss by before the backward pass: the loss scale under
    /// dynamic loss scaling, else 1 (not collective).
    fn loss_scale(&self) -> f32 {
        1.0
    }
}

/// What the algorithms need besides the optimizer, with defaults:
/// `DataParallelConfig::new().with_clip(…)`.
#[derive(Clone, Debug, PartialEq)]
pub struct DataParallelConfig {
    /// How the ranks' gradients are combined (default: batch-weighted, so the step does
    /// not depend on how a global batch is split).
    pub reduce: ReduceMode,
    /// Clipping by the global norm (default: none).
    pub clip: Option<ClipConfig>,
    /// Post-local SGD's warm-up and period (default: 50 and 4).
    pub local_sgd: LocalSgdConfig,
    /// DiLoCo's inner steps and outer optimizer (default: 10, Nesterov lr 0.7 momentum 0.9).
    pub diloco: DilocoConfig,
    /// Working and reduction types (default: all f32). DDP and ZeRO only.
    pub precision: Precision,
}

impl Default for DataParallelConfig {
    fn default() -> Self {
        DataParallelConfig {
            reduce: ReduceMode::BatchWeighted,
            clip: None,
            local_sgd: LocalSgdConfig::default(),
            diloco: DilocoConfig::default(),
            precision: Precision::f32(),
        }
    }
}

impl DataParallelConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// With this reduction.
    pub fn with_reduce(mut self, reduce: ReduceMode) -> Self {
        self.reduce = reduce;
        self
    }

    /// With clipping.
    pub fn with_clip(mut self, clip: Option<ClipConfig>) -> Self {
        self.clip = clip;
        self
    }

    /// With post-local SGD's warm-up and period.
    pub fn with_local_sgd(mut self, local_sgd: LocalSgdConfig) -> Self {
        self.local_sgd = local_sgd;
        self
    }

    /// With this precision policy (DDP and ZeRO only).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// With DiLoCo's settings.
    pub fn with_diloco(mut self, diloco: DilocoConfig) -> Self {
        self.diloco = diloco;
        self
    }
}

/// The algorithm `strategy` names, on `comm`. `init`: the initial parameters in f32, the
/// same on every rank (DiLoCo's first global parameters; the f32 master under mixed
/// precision).
pub fn data_parallel(
    strategy: Strategy,
    comm: Communicator,
    layout: Layout,
    groups: Vec<ParamGroup>,
    schedule: Option<Schedule>,
    config: &DataParallelConfig,
    init: &[f32],
) -> Result<Box<dyn DataParallel>> {
    Ok(match strategy {
        Strategy::Ddp | Strategy::Zero1 | Strategy::Zero2 | Strategy::Zero3 => {
            let step = StepConfig::new(strategy).with_reduce(config.reduce).with_clip(config.clip).with_precision(config.precision);
            let mut opt = ShardedOptimizer::new(comm, layout, groups, schedule, step)?;
            // The master starts at the f32 values, not at their rounding.
            opt.set_master(init)?;
            Box::new(opt)
        }
        _ if config.precision != Precision::f32() => {
            return Err(crate::DistError::Invalid(format!(
                "{strategy} keeps a model per rank in f32: mixed precision needs ddp or zero1/2/3"
            )))
        }
        Strategy::PostLocalSgd => Box::new(PostLocalSgd::new(comm, layout, groups, schedule, config)?),
        Strategy::Diloco => Box::new(Diloco::new(comm, layout, groups, schedule, config, init)?),
    })
}
