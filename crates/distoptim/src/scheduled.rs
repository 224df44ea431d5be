//! An optimizer with its LR schedule: the pair every strategy steps (the schedule
//! advances after each optimizer step, as torch's `LambdaLR.step()` does).

use std::collections::BTreeMap;

use crate::checkpoint::ReplicaState;
use crate::config::{ClipConfig, StepReport};
use crate::dist_clip;
use crate::error::Result;
use crate::transforms::TransformPlan;
use distoptim_collective::Communicator;
use distoptim_optim::{Layout, LrScheduler, OptimError, Optimizer, OptimizerStateDict, ParamGroup, Schedule, Transforms};
use std::ops::Range;

pub(crate) struct Scheduled {
    opt: Optimizer,
    sched: Option<LrScheduler>,
}

impl Scheduled {
    /// An optimizer over `shard`, with the schedule's first lr applied.
    pub(crate) fn new(layout: Layout, groups: Vec<ParamGroup>, shard: Range<usize>, schedule: Option<Schedule>) -> Result<Scheduled> {
        let mut opt = Optimizer::with_groups(layout, groups, shard)?;
        let sched = schedule.map(|s| LrScheduler::new(s, opt.lrs()));
        if let Some(s) = &sched {
            opt.set_lrs(&s.lrs())?;
        }
        Ok(Scheduled { opt, sched })
    }

    pub(crate) fn optimizer(&self) -> &Optimizer {
        &self.opt
    }

    pub(crate) fn lrs(&self) -> Vec<f64> {
        self.opt.lrs()
    }

    /// An optimizer step, then a schedule step.
    pub(crate) fn step(&mut self, params: &mut [f32], grads: &[f32]) -> Result<()> {
        self.step_scaled(params, grads, 1.0)
    }

    /// [`step`](Self::step) with the gradients multiplied by `scale` as they are read.
    pub(crate) fn step_scaled(&mut self, params: &mut [f32], grads: &[f32], scale: f32) -> Result<()> {
        self.step_with(params, grads, scale, None)
    }

    /// [`step_scaled`](Self::step_scaled) with the whole-matrix transforms exchanged by
    /// `plan` over `comm` (collective), when given; else run here.
    pub(crate) fn step_with(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        scale: f32,
        exchange: Option<(&mut TransformPlan, &Communicator)>,
    ) -> Result<()> {
        match exchange {
            Some((plan, comm)) => {
                // The exchange's own error (a peer died, a timeout), not the core's wrapper.
                let mut failed = None;
                let stepped = self.opt.step_with(params, grads, scale, &mut |t: &mut Transforms<'_>| {
                    plan.exchange(comm, t).map_err(|e| {
                        let wrapped = OptimError::Closure(e.to_string().into());
                        failed = Some(e);
                        wrapped
                    })
                });
                if let Some(e) = failed {
                    return Err(e);
                }
                stepped?;
            }
            None => self.opt.step_scaled(params, grads, scale)?,
        }
        if let Some(s) = &mut self.sched {
            let lrs = s.advance();
            self.opt.set_lrs(&lrs)?;
        }
        Ok(())
    }

    /// A rank stepping alone: clip its own gradient, record the lrs, step.
    pub(crate) fn step_local(&mut self, params: &mut [f32], grads: &mut [f32], clip: Option<&ClipConfig>) -> Result<StepReport> {
        let grad_norm = clip.map(|c| dist_clip::clip_owned(grads, c, None)).transpose()?;
        let report = StepReport { lrs: self.lrs(), grad_norm, skipped: false };
        self.step(params, grads)?;
        Ok(report)
    }

    /// Swaps in an optimizer over `part`, a state dict whose layout and groups extend this
    /// one's (after `add_param_group`), keeping the schedule's position. Added groups join
    /// the schedule with their configured lr as base lr (torch's LambdaLR would leave them
    /// unscheduled, having no lambda for them).
    pub(crate) fn regrow(&mut self, part: &OptimizerStateDict) -> Result<()> {
        let mut opt = Optimizer::with_groups(part.layout.clone(), part.groups.clone(), part.shard.clone())?;
        opt.load_state_dict(part)?;
        if let Some(s) = &mut self.sched {
            s.base_lrs.extend(part.groups.iter().skip(s.base_lrs.len()).map(|g| g.config.lr()));
            opt.set_lrs(&s.lrs())?;
        }
        self.opt = opt;
        Ok(())
    }

    pub(crate) fn load_state_dict(&mut self, sd: &OptimizerStateDict) -> Result<()> {
        Ok(self.opt.load_state_dict(sd)?)
    }

    pub(crate) fn schedule_step(&self) -> Option<u64> {
        self.sched.as_ref().map(|s| s.step)
    }

    /// Continues the schedule from `step` (after loading a state dict).
    pub(crate) fn set_schedule_step(&mut self, step: u64) -> Result<()> {
        if let Some(s) = &mut self.sched {
            s.step = step;
            let lrs = s.lrs();
            self.opt.set_lrs(&lrs)?;
        }
        Ok(())
    }

    /// This optimizer's part of a per-rank checkpoint, with the caller's extras.
    pub(crate) fn replica_state(&self, extra: BTreeMap<String, Vec<f32>>, counters: BTreeMap<String, u64>) -> ReplicaState {
        ReplicaState { optimizer: self.opt.state_dict(), schedule_step: self.schedule_step(), extra, counters }
    }

    /// Restores the optimizer state and schedule position of a per-rank checkpoint.
    pub(crate) fn load_replica(&mut self, state: &ReplicaState) -> Result<()> {
        self.load_state_dict(&state.optimizer)?;
        if let Some(step) = state.schedule_step {
            self.set_schedule_step(step)?;
        }
        Ok(())
    }
}
