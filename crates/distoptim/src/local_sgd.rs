//! Periodic model averaging: torch's `PostLocalSGDOptimizer` with a
//! `PeriodicModelAverager(period, warmup_steps)`.
//!
//! For the first `warmup_steps` steps the ranks step with the reduced gradient (plain
//! data parallelism); afterwards each rank steps with its own gradient and, every
//! `period` steps starting with the first local one, every parameter is replaced by its
//! mean over the ranks (torch's order: divide by W, then all-reduce the sum). Optimizer
//! state and schedules stay per rank and are never averaged.

use crate::config::{ClipConfig, ReduceMode, StepReport};
use std::collections::BTreeMap;

use crate::checkpoint::ReplicaState;
use crate::error::{DistError, Result};
use crate::grad_sync;
use crate::optimizer::MemoryLedger;
use crate::precision::{Flat, FlatMut};
use crate::scheduled::Scheduled;
use distoptim_collective::{Communicator, ReduceOp};
use distoptim_optim::{Layout, ParamGroup, Schedule};

/// The averager's step counter in checkpoints.
const STEPS: &str = "post_local_sgd.steps";

/// Warm-up length and averaging period (torch's `PostLocalSGDState` and
/// `PeriodicModelAverager`): `LocalSgdConfig::default().with_period(8)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalSgdConfig {
    /// Synchronous (all-reduced) steps before local SGD starts (torch's `start_localSGD_iter`).
    pub warmup_steps: u64,
    /// Local steps between parameter averagings, at least 1.
    pub period: u64,
}

impl Default for LocalSgdConfig {
    /// 50 warm-up steps, averaging every 4.
    fn default() -> Self {
        LocalSgdConfig { warmup_steps: 50, period: 4 }
    }
}

impl LocalSgdConfig {
    /// With this warm-up length.
    pub fn with_warmup_steps(mut self, warmup_steps: u64) -> Self {
        self.warmup_steps = warmup_steps;
        self
    }

    /// With this averaging period.
    pub fn with_period(mut self, period: u64) -> Self {
        self.period = period;
        self
    }
}

/// torch's post-local SGD: synchronous steps during the warm-up, then local steps with
/// the parameters averaged every `period` steps.
pub struct PostLocalSgd {
    comm: Communicator,
    opt: Scheduled,
    clip: Option<ClipConfig>,
    reduce: ReduceMode,
    averaging: LocalSgdConfig,
    /// Steps taken: the averager's counter, kept in checkpoints so a resume does not
    /// replay the warm-up.
    steps: u64,
}

impl PostLocalSgd {
    /// Post-local SGD on `comm` with `config`'s reduction (of the warm-up's gradients),
    /// clipping (of each rank's own gradient) and averaging schedule.
    pub fn new(
        comm: Communicator,
        layout: Layout,
        groups: Vec<ParamGroup>,
        schedule: Option<Schedule>,
        config: &crate::DataParallelConfig,
    ) -> Result<Self> {
        let (clip, reduce, averaging) = (config.clip, config.reduce, config.local_sgd);
        if averaging.period == 0 {
            return Err(crate::DistError::Invalid("local SGD period must be at least 1".into()));
        }
        let numel = layout.numel();
        let opt = Scheduled::new(layout, groups, 0..numel, schedule)?;
        Ok(PostLocalSgd { comm, opt, clip, reduce, averaging, steps: 0 })
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One step with this rank's gradient (overwritten); the report's norm is this rank's.
    pub fn step(&mut self, params: &mut [f32], grads: &mut [f32], batch_size: usize) -> Result<StepReport> {
        let t = self.steps;
        let local = t >= self.averaging.warmup_steps;
        if !local {
            let divisor = grad_sync::weigh(&self.comm, grads, self.reduce, batch_size)?;
            grad_sync::all_reduce(&self.comm, grads, grads.len().max(1), ReduceOp::Sum)?;
            grad_sync::divide(grads, divisor);
        }
        let report = self.opt.step_local(params, grads, self.clip.as_ref())?;
        self.steps += 1;
        if local && (t - self.averaging.warmup_steps).is_multiple_of(self.averaging.period) {
            average(&self.comm, params)?;
        }
        Ok(report)
    }

    /// Whether every rank holds the same parameters after the last step (a warm-up
    /// step, or one that averaged), so a replica check may run.
    pub fn params_in_sync(&self) -> bool {
        let w = self.averaging.warmup_steps;
        self.steps <= w || (self.steps - 1 - w).is_multiple_of(self.averaging.period)
    }

    /// This rank's optimizer state, schedule position and the averager's counter, for
    /// [`crate::checkpoint::save_replicas`].
    pub fn replica_state(&self) -> ReplicaState {
        self.opt.replica_state(BTreeMap::new(), BTreeMap::from([(STEPS.to_string(), self.steps)]))
    }

    /// Restores what [`Self::replica_state`] returned: the resume continues where the
    /// saved run was, past its warm-up.
    pub fn load_replica_state(&mut self, state: &ReplicaState) -> Result<()> {
        self.opt.load_replica(state)?;
        self.steps = state.counters.get(STEPS).copied().ok_or_else(|| DistError::Checkpoint(format!("no '{STEPS}' counter")))?;
        Ok(())
    }

    /// Averages the parameters now (collective), e.g. once more at the end of training
    /// so every rank leaves with the same model.
    pub fn average_params(&self, params: &mut [f32]) -> Result<()> {
        average(&self.comm, params)
    }
}

/// Replaces `params` by their mean over the group, in torch's order (÷W, then Σ).
pub(crate) fn average(comm: &Communicator, params: &mut [f32]) -> Result<()> {
    let w = comm.size() as f32;
    params.iter_mut().for_each(|p| *p /= w);
    comm.all_reduce(params, ReduceOp::Sum)?;
    Ok(())
}

const STRATEGY: crate::Strategy = crate::Strategy::PostLocalSgd;

impl crate::DataParallel for PostLocalSgd {
    fn strategy(&self) -> crate::Strategy {
        STRATEGY
    }

    fn comm(&self) -> &Communicator {
        &self.comm
    }

    fn layout(&self) -> &Layout {
        self.opt.optimizer().layout()
    }

    fn step(&mut self, params: FlatMut<'_>, grads: FlatMut<'_>, batch_size: usize) -> Result<StepReport> {
        let (params, grads) = (params.into_f32(STRATEGY.name())?, grads.into_f32(STRATEGY.name())?);
        PostLocalSgd::step(self, params, grads, batch_size)
    }

    fn params_in_sync(&self) -> bool {
        PostLocalSgd::params_in_sync(self)
    }

    /// This rank's own evaluation view: from its parameters and its inner optimizer's
    /// state, which is never averaged.
    fn eval_params(&self, params: Flat<'_>, out: FlatMut<'_>) -> Result<()> {
        let (params, out) = (params.into_f32(STRATEGY.name())?, out.into_f32(STRATEGY.name())?);
        Ok(self.opt.optimizer().eval_params(params, out)?)
    }

    fn finish(&mut self, params: FlatMut<'_>) -> Result<()> {
        let params = params.into_f32(STRATEGY.name())?;
        if !PostLocalSgd::params_in_sync(self) {
            self.average_params(params)?;
        }
        Ok(())
    }

    fn save(
        &self,
        root: &std::path::Path,
        params: Flat<'_>,
        counters: BTreeMap<String, u64>,
        options: &crate::checkpoint::SaveOptions,
    ) -> Result<(crate::checkpoint::Manifest, std::path::PathBuf)> {
        crate::checkpoint::save_per_rank(self, root, params, counters, options)
    }

    fn load(&mut self, path: &std::path::Path, params: FlatMut<'_>) -> Result<crate::checkpoint::Manifest> {
        crate::checkpoint::load_per_rank(self, path, params)
    }

    fn memory(&self) -> MemoryLedger {
        let numel = self.opt.optimizer().layout().numel() as u64;
        let state = self.opt.optimizer().state_bytes();
        MemoryLedger { working_params: numel * 4, grads: numel * 4, master: 0, optimizer_state: state, comm_buffers: 0 }
    }
}

impl crate::checkpoint::PerRank for PostLocalSgd {
    const STRATEGY: crate::Strategy = STRATEGY;

    fn replica_state(&self) -> ReplicaState {
        PostLocalSgd::replica_state(self)
    }

    fn load_replica_state(&mut self, state: &ReplicaState) -> Result<()> {
        PostLocalSgd::load_replica_state(self, state)
    }
}
