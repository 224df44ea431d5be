//! The distributed algorithm behind `--strategy`: one of distoptim's synchronous steps
//! (DDP, ZeRO-1/2/3) or a periodic-averaging one (post-local SGD, DiLoCo), behind the
//! few calls the training loop needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use distoptim::checkpoint::{self, Manifest, ReplicaState, SaveOptions};
use distoptim::{
    ClipConfig, Diloco, DilocoConfig, DistributedOptimizer, LocalSgdConfig, PostLocalSgd, ReduceMode, StepConfig, StepReport, Strategy,
};
use distoptim_collective::Communicator;
use distoptim_optim::{Layout, ParamGroup, Schedule};

pub enum Algorithm {
    Synced(DistributedOptimizer),
    LocalSgd(PostLocalSgd),
    Diloco(Diloco),
}

/// What `--strategy` needs besides the optimizer.
pub struct AlgorithmConfig {
    pub strategy: String,
    pub clip: Option<ClipConfig>,
    pub local_sgd: LocalSgdConfig,
    pub diloco: DilocoConfig,
}

pub const STRATEGIES: &str = "ddp, zero1, zero2, zero3, post_local_sgd, diloco";

impl Algorithm {
    /// `init`: the initial parameters, the same on every rank.
    pub fn new(
        comm: Communicator,
        layout: Layout,
        groups: Vec<ParamGroup>,
        schedule: Option<Schedule>,
        config: &AlgorithmConfig,
        init: &[f32],
    ) -> Result<Algorithm> {
        // Batch-weighted: the uneven last batch of an epoch (and a rank with no sample
        // of it) count by their sizes, so every world size takes the same step.
        let synced = |strategy| {
            let step = StepConfig { reduce: ReduceMode::BatchWeighted, clip: config.clip, ..StepConfig::new(strategy) };
            DistributedOptimizer::new(comm.clone(), layout.clone(), groups.clone(), schedule.clone(), step)
        };
        Ok(match config.strategy.as_str() {
            "ddp" => Algorithm::Synced(synced(Strategy::Ddp)?),
            "zero1" => Algorithm::Synced(synced(Strategy::Zero1)?),
            "zero2" => Algorithm::Synced(synced(Strategy::Zero2)?),
            "zero3" => Algorithm::Synced(synced(Strategy::Zero3)?),
            "post_local_sgd" => Algorithm::LocalSgd(PostLocalSgd::new(
                comm,
                layout,
                groups,
                schedule,
                config.clip,
                ReduceMode::BatchWeighted,
                config.local_sgd,
            )?),
            "diloco" => Algorithm::Diloco(Diloco::new(comm, layout, groups, schedule, config.clip, config.diloco, init)?),
            other => bail!("unknown --strategy {other:?} (one of {STRATEGIES})"),
        })
    }

    /// Saves a checkpoint (collective): ranges of the shared model and state for the
    /// synchronous strategies (reloadable at any world size and strategy), every rank's
    /// own model and state for the periodic-averaging ones (same world size only).
    pub fn save(
        &self,
        dir: &Path,
        comm: &Communicator,
        params: &[f32],
        counters: BTreeMap<String, u64>,
        options: &SaveOptions,
    ) -> Result<(Manifest, PathBuf)> {
        let replica = |name: &str, mut state: ReplicaState| {
            state.counters.extend(counters.clone());
            checkpoint::save_replicas(dir, comm, name, params, &state, options)
        };
        Ok(match self {
            Algorithm::Synced(opt) => checkpoint::save(dir, opt, params, &counters, options)?,
            Algorithm::LocalSgd(opt) => replica("post_local_sgd", opt.replica_state())?,
            Algorithm::Diloco(opt) => replica("diloco", opt.replica_state())?,
        })
    }

    /// Restores a checkpoint written by [`Self::save`] (collective).
    pub fn load(&mut self, dir: &Path, comm: &Communicator, layout: &Layout, params: &mut [f32]) -> Result<Manifest> {
        let replica = |name: &str, params: &mut [f32]| -> Result<(Manifest, ReplicaState)> {
            let (m, state) = checkpoint::load_replicas(dir, comm, layout, params)?;
            if m.strategy != name {
                bail!("{} holds a {} run; resume it with --strategy {}", dir.display(), m.strategy, m.strategy);
            }
            Ok((m, state))
        };
        Ok(match self {
            Algorithm::Synced(opt) => checkpoint::load(dir, opt, params)?,
            Algorithm::LocalSgd(opt) => {
                let (m, state) = replica("post_local_sgd", params)?;
                opt.load_replica_state(&state)?;
                m
            }
            Algorithm::Diloco(opt) => {
                let (m, state) = replica("diloco", params)?;
                opt.load_replica_state(&state)?;
                m
            }
        })
    }

    /// Makes `params` complete on this rank (ZeRO-3 all-gathers the shards; the others
    /// already hold every element).
    pub fn gather(&self, params: &mut [f32]) -> Result<()> {
        if let Algorithm::Synced(opt) = self {
            opt.gather_params(params)?;
        }
        Ok(())
    }

    /// One step with this rank's gradient of its `batch_size` samples.
    pub fn step(&mut self, params: &mut [f32], grads: &mut [f32], batch_size: usize) -> Result<StepReport> {
        Ok(match self {
            Algorithm::Synced(opt) => opt.step(params, grads, batch_size)?,
            Algorithm::LocalSgd(opt) => opt.step(params, grads, batch_size)?,
            // DiLoCo's inner steps are local and unweighted; a rank without samples
            // steps with a zero gradient, as torch's join would have it do.
            Algorithm::Diloco(opt) => opt.step(params, grads)?,
        })
    }

    /// Whether every rank should now hold identical parameters.
    pub fn params_in_sync(&self) -> bool {
        match self {
            Algorithm::Synced(_) => true,
            Algorithm::LocalSgd(opt) => opt.params_in_sync(),
            Algorithm::Diloco(opt) => opt.params_in_sync(),
        }
    }

    /// Brings the replicas together at the end of training: post-local SGD averages once
    /// more, DiLoCo takes the global parameters Γ of its last outer step.
    pub fn finish(&mut self, params: &mut [f32]) -> Result<()> {
        match self {
            Algorithm::Synced(opt) => opt.gather_params(params)?,
            Algorithm::LocalSgd(opt) => {
                if !opt.params_in_sync() {
                    opt.average_params(params)?;
                }
            }
            Algorithm::Diloco(opt) => params.copy_from_slice(opt.global_params()),
        }
        Ok(())
    }
}
