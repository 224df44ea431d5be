//! DiLoCo: local inner steps, an outer Nesterov SGD on the averaged parameter delta.
//!
//! Global parameters Γ are owned by an outer SGD (lr `outer_lr`, momentum
//! `outer_momentum`, optionally nesterov, no dampening). Each rank runs its own inner
//! optimizer and schedule on its own parameters P_r with its own gradients (no gradient
//! reduction, only its own clip). Every `inner_steps` steps: the outer gradient is
//! Γ − (Σ_r P_r)/W, the outer optimizer steps Γ, and every P_r becomes Γ. One
//! all-reduce of the parameters per round is all the communication.

use std::collections::BTreeMap;

use crate::checkpoint::ReplicaState;
use crate::config::{ClipConfig, StepReport};
use crate::error::{DistError, Result};
use crate::optimizer::MemoryLedger;
use crate::precision::{Flat, FlatMut};
use crate::scheduled::Scheduled;
use distoptim_collective::{Communicator, ReduceOp};
use distoptim_optim::{Layout, Optimizer, OptimizerConfig, ParamGroup, Schedule, SgdConfig};

/// Counters in checkpoints: inner steps, and outer steps taken.
const STEPS: &str = "diloco.steps";
const OUTER_STEPS: &str = "diloco.outer_steps";

/// DiLoCo's schedule and outer optimizer (Douillard et al. 2023):
/// `DilocoConfig::default().with_inner_steps(500)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DilocoConfig {
    /// Local (inner) steps between outer steps, at least 1 (the paper's H).
    pub inner_steps: u64,
    /// The outer SGD's learning rate.
    pub outer_lr: f64,
    /// The outer SGD's momentum.
    pub outer_momentum: f64,
    /// Whether the outer momentum is Nesterov's (the paper's choice).
    pub nesterov: bool,
}

impl Default for DilocoConfig {
    /// 10 inner steps; outer Nesterov SGD with lr 0.7 and momentum 0.9 (the paper's).
    fn default() -> Self {
        DilocoConfig { inner_steps: 10, outer_lr: 0.7, outer_momentum: 0.9, nesterov: true }
    }
}

impl DilocoConfig {
    /// With this many inner steps per outer step.
    pub fn with_inner_steps(mut self, inner_steps: u64) -> Self {
        self.inner_steps = inner_steps;
        self
    }

    /// With this outer optimizer: SGD with `lr`, `momentum` and Nesterov or not.
    pub fn with_outer(mut self, lr: f64, momentum: f64, nesterov: bool) -> Self {
        (self.outer_lr, self.outer_momentum, self.nesterov) = (lr, momentum, nesterov);
        self
    }
}

/// DiLoCo: every rank takes `inner_steps` local steps, then the ranks average their
/// parameter deltas and an outer Nesterov SGD steps the global parameters Γ with them.
pub struct Diloco {
    comm: Communicator,
    inner: Scheduled,
    clip: Option<ClipConfig>,
    outer: Optimizer,
    global: Vec<f32>,
    inner_steps: u64,
    /// Inner steps taken (kept in checkpoints with the outer state).
    steps: u64,
    scratch: Vec<f32>,
}

impl Diloco {
    /// DiLoCo on `comm` with `config`'s clipping (of each rank's gradient) and DiLoCo
    /// settings; `init` is Γ at the start (every rank's P_r starts equal to it).
    pub fn new(
        comm: Communicator,
        layout: Layout,
        groups: Vec<ParamGroup>,
        schedule: Option<Schedule>,
        config: &crate::DataParallelConfig,
        init: &[f32],
    ) -> Result<Self> {
        let (clip, config) = (config.clip, config.diloco);
        if config.inner_steps == 0 {
            return Err(DistError::Invalid("diloco inner_steps must be at least 1".into()));
        }
        let numel = layout.numel();
        if init.len() != numel {
            return Err(DistError::Invalid(format!("initial params have {} elements, the layout has {numel}", init.len())));
        }
        let outer_config = OptimizerConfig::Sgd(SgdConfig {
            lr: config.outer_lr,
            momentum: config.outer_momentum,
            nesterov: config.nesterov,
            ..SgdConfig::default()
        });
        let outer = Optimizer::new(layout.clone(), outer_config)?;
        let inner = Scheduled::new(layout, groups, 0..numel, schedule)?;
        Ok(Diloco { comm, inner, clip, outer, global: init.to_vec(), inner_steps: config.inner_steps, steps: 0, scratch: vec![0.0; numel] })
    }

    /// Inner steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Γ, the global parameters.
    pub fn global_params(&self) -> &[f32] {
        &self.global
    }

    /// This rank's inner optimizer state and schedule position, the global parameters Γ
    /// and the outer optimizer's state, for [`crate::checkpoint::save_replicas`].
    pub fn replica_state(&self) -> ReplicaState {
        let outer = self.outer.state_dict();
        let mut extra: BTreeMap<String, Vec<f32>> = outer.buffers.into_iter().map(|(b, v)| (format!("outer_{b}"), v)).collect();
        extra.insert("global".into(), self.global.clone());
        let outer_steps = outer.steps.iter().copied().max().unwrap_or(0);
        self.inner.replica_state(extra, BTreeMap::from([(STEPS.to_string(), self.steps), (OUTER_STEPS.to_string(), outer_steps)]))
    }

    /// Restores what [`Self::replica_state`] returned.
    pub fn load_replica_state(&mut self, state: &ReplicaState) -> Result<()> {
        let counter = |name: &str| state.counters.get(name).copied().ok_or_else(|| DistError::Checkpoint(format!("no '{name}' counter")));
        let global = state
            .extra
            .get("global")
            .filter(|g| g.len() == self.global.len())
            .ok_or_else(|| DistError::Checkpoint("no global parameters".into()))?;
        let mut outer = self.outer.state_dict();
        let outer_steps = counter(OUTER_STEPS)?;
        outer.steps = vec![outer_steps; outer.steps.len()];
        outer.buffers = state.extra.iter().filter_map(|(k, v)| Some((k.strip_prefix("outer_")?.to_string(), v.clone()))).collect();
        self.outer.load_state_dict(&outer)?;
        self.inner.load_replica(state)?;
        self.global.copy_from_slice(global);
        self.steps = counter(STEPS)?;
        Ok(())
    }

    /// Whether the last step ended with an outer step, so every rank's parameters are Γ.
    pub fn params_in_sync(&self) -> bool {
        self.steps.is_multiple_of(self.inner_steps)
    }

    /// One inner step on this rank's `params` with its own gradient; every
    /// `inner_steps` steps also the outer step (collective).
    pub fn step(&mut self, params: &mut [f32], grads: &mut [f32]) -> Result<StepReport> {
        let report = self.inner.step_local(params, grads, self.clip.as_ref())?;
        self.steps += 1;
        if self.steps.is_multiple_of(self.inner_steps) {
            self.scratch.copy_from_slice(params);
            self.comm.all_reduce(&mut self.scratch, ReduceOp::Sum)?;
            let w = self.comm.size() as f32;
            for (s, g) in self.scratch.iter_mut().zip(&self.global) {
                *s = g - *s / w;
            }
            self.outer.step(&mut self.global, &self.scratch)?;
            params.copy_from_slice(&self.global);
        }
        Ok(report)
    }
}

const STRATEGY: crate::Strategy = crate::Strategy::Diloco;

impl crate::DataParallel for Diloco {
    fn strategy(&self) -> crate::Strategy {
        STRATEGY
    }

    fn comm(&self) -> &Communicator {
        &self.comm
    }

    fn layout(&self) -> &Layout {
        self.inner.optimizer().layout()
    }

    /// DiLoCo's inner steps are local and unweighted: `batch_size` is not used, and a
    /// rank without samples steps with a zero gradient, as torch's join would have it do.
    fn step(&mut self, params: FlatMut<'_>, grads: FlatMut<'_>, _batch_size: usize) -> Result<StepReport> {
        let (params, grads) = (params.into_f32(STRATEGY.name())?, grads.into_f32(STRATEGY.name())?);
        Diloco::step(self, params, grads)
    }

    fn params_in_sync(&self) -> bool {
        Diloco::params_in_sync(self)
    }

    /// This rank's own evaluation view: from its parameters and its inner optimizer's
    /// state, which is never averaged.
    fn eval_params(&self, params: Flat<'_>, out: FlatMut<'_>) -> Result<()> {
        let (params, out) = (params.into_f32(STRATEGY.name())?, out.into_f32(STRATEGY.name())?);
        Ok(self.inner.optimizer().eval_params(params, out)?)
    }

    fn finish(&mut self, params: FlatMut<'_>) -> Result<()> {
        let params = params.into_f32(STRATEGY.name())?;
        params.copy_from_slice(self.global_params());
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
        let numel = self.global.len() as u64;
        let inner: u64 = self.inner.optimizer().state_bytes();
        let outer: u64 = self.outer.state_bytes();
        // Γ (the global parameters) is DiLoCo's master copy; the scratch buffer averages.
        MemoryLedger {
            working_params: numel * 4,
            grads: numel * 4,
            master: numel * 4,
            optimizer_state: inner + outer,
            comm_buffers: self.scratch.capacity() as u64 * 4,
        }
    }
}

impl crate::checkpoint::PerRank for Diloco {
    const STRATEGY: crate::Strategy = STRATEGY;

    fn replica_state(&self) -> ReplicaState {
        Diloco::replica_state(self)
    }

    fn load_replica_state(&mut self, state: &ReplicaState) -> Result<()> {
        Diloco::load_replica_state(self, state)
    }
}
