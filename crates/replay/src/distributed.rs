//! Multi-rank cases on real collectives: every rank of a case is a thread of the
//! threads backend, running the same distributed step a training job runs, through the
//! one data-parallel interface ([`DataParallel`], built by [`data_parallel`]) and nothing
//! else.
//!
//! `reshard` runs the steps before `after_step` on W ranks, saves a checkpoint (the real
//! on-disk format, in a temporary directory) and loads it on W2 ranks for the rest.

use std::time::Duration;

use distoptim::{
    checkpoint, data_parallel, ClipConfig, DataParallel, DataParallelConfig, DilocoConfig, DistError, LocalSgdConfig, Strategy,
};
use distoptim_collective::{CommConfig, Communicator};

use crate::case::Case;
use crate::error::{ErrorClass, ReplayError};
use crate::run::{model_params, named, Output, ReplayOptions, StepReport};
use distoptim::{FloatDtype, Working};
use distoptim::{ReduceMode, ReproducibleSum};
use distoptim_collective::{bf16, f16};

type Result<T> = std::result::Result<T, ReplayError>;

/// One rank's part of the answer.
struct RankOut {
    params: Vec<f32>,
    reports: Vec<distoptim::StepReport>,
    state_elems: usize,
    /// DiLoCo's Γ.
    global: Option<Vec<f32>>,
}

fn config() -> CommConfig {
    CommConfig::default().with_timeout(Duration::from_secs(120)).with_slot_bytes(1 << 20)
}

fn clip(case: &Case) -> Option<ClipConfig> {
    case.clip.as_ref().map(|c| ClipConfig::new(c.max_norm).with_norm(c.norm).with_error_if_nonfinite(c.error_if_nonfinite))
}

/// Everything the case sets besides the strategy and the optimizer.
fn dp_config(case: &Case) -> DataParallelConfig {
    let mut config = DataParallelConfig::new().with_reduce(case.grad_reduce).with_clip(clip(case));
    if let Some(p) = case.precision {
        config = config.with_precision(p);
    }
    if let Some(l) = &case.local_sgd {
        config = config.with_local_sgd(LocalSgdConfig { warmup_steps: l.warmup_steps, period: l.period });
    }
    if let Some(d) = &case.diloco {
        config = config.with_diloco(DilocoConfig {
            inner_steps: d.inner_steps,
            outer_lr: d.outer_lr,
            outer_momentum: d.outer_momentum,
            nesterov: d.nesterov,
        });
    }
    config
}

/// The algorithm of the case on this rank.
fn build(case: &Case, strategy: Strategy, comm: Communicator) -> std::result::Result<Box<dyn DataParallel>, DistError> {
    data_parallel(strategy, comm, case.layout.clone(), case.groups.clone(), case.schedule.clone(), &dp_config(case), &case.init)
}

/// Rank `r`'s gradient and batch size at step `t`.
fn local(case: &Case, t: usize, r: usize) -> (Vec<f32>, usize) {
    (case.steps[t].rank_grad(r, case.layout.numel()), local_batch(case, t, r))
}

/// Rank `r`'s batch size at step `t`.
fn local_batch(case: &Case, t: usize, r: usize) -> usize {
    case.steps[t].batch_sizes.as_ref().and_then(|b| b.get(r)).map_or(1, |&b| b as usize)
}

/// The error to report when ranks fail: a rank's own error (e.g. a non-finite norm)
/// rather than the "peer left" its failure caused on the others.
fn first_error(results: Vec<std::result::Result<RankOut, (usize, DistError)>>) -> Result<Vec<RankOut>> {
    let mut outs = Vec::with_capacity(results.len());
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(o) => outs.push(o),
            Err(e) => errors.push(e),
        }
    }
    errors.sort_by_key(|(t, e)| (matches!(e, DistError::Comm(_)), *t));
    match errors.into_iter().next() {
        None => Ok(outs),
        Some((t, DistError::Optim(e))) => {
            let mut e = ReplayError::from(e);
            e.message = format!("{} at step {t}", e.message);
            Err(e)
        }
        Some((t, e)) => Err(ReplayError::new(ErrorClass::InvalidConfig, format!("{e} at step {t}"))),
    }
}

/// Runs `body` on `w` threads; each returns its output or (step, error).
fn on_ranks(w: usize, body: impl Fn(Communicator) -> std::result::Result<RankOut, (usize, DistError)> + Sync) -> Result<Vec<RankOut>> {
    let results = Communicator::run_threads(w, &config(), body)
        .map_err(|e| ReplayError::new(ErrorClass::InvalidConfig, format!("starting {w} ranks: {e}")))?;
    first_error(results)
}

/// ddp, zero1, zero2, zero3 (with an optional reshard).
fn run_synchronous(case: &Case, strategy: Strategy, deterministic: bool) -> Result<Output> {
    let total = case.steps.len();
    let phases = match &case.reshard {
        Some(r) => vec![(0..r.after_step.min(total), case.world_size), (r.after_step.min(total)..total, r.world_size)],
        None => vec![(0..total, case.world_size)],
    };
    let dir = std::env::temp_dir().join(format!("distoptim-replay-{}-{:x}", std::process::id(), std::ptr::from_ref(case) as usize));
    let outcome = (|| -> Result<(Vec<StepReport>, Vec<RankOut>)> {
        let mut per_step = Vec::with_capacity(total);
        let mut last = Vec::new();
        let count = phases.len();
        for (phase, (steps, w)) in phases.into_iter().enumerate() {
            let (resume, save) = (phase > 0, phase + 1 < count);
            let outs = on_ranks(w, |comm| {
                let ctx = Phase { case, strategy, steps: steps.clone(), resume, save, dir: &dir, deterministic };
                match case.precision.map_or(FloatDtype::F32, |p| p.param_dtype) {
                    FloatDtype::F32 => run_phase::<f32>(comm, &ctx),
                    FloatDtype::Bf16 => run_phase::<bf16>(comm, &ctx),
                    FloatDtype::F16 => run_phase::<f16>(comm, &ctx),
                }
            })?;
            per_step.extend(outs[0].reports.iter().map(|r| StepReport { lr: r.lrs.clone(), grad_norm: r.grad_norm, ..Default::default() }));
            last = outs;
        }
        Ok((per_step, last))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let (per_step, last) = outcome?;
    let params = last.first().map(|o| o.params.clone()).unwrap_or_else(|| case.init.clone());
    let state_elems = strategy.shards_state().then(|| last.iter().map(|o| o.state_elems).collect());
    Ok(Output {
        params: named(case, &params),
        model_params: model_params(case, &params),
        per_step,
        optimizer_state_elems_per_rank: state_elems,
        ..Default::default()
    })
}

/// One phase (the steps between reshards) of a synchronous case, on one rank.
struct Phase<'a> {
    case: &'a Case,
    strategy: Strategy,
    steps: std::ops::Range<usize>,
    resume: bool,
    save: bool,
    dir: &'a std::path::Path,
    /// Step with the exact sum of deterministic mode.
    deterministic: bool,
}

/// Runs a phase on this rank with parameters of the working type `P`: the master starts
/// at the case's f32 values, the model holds them rounded, gradients arrive in f32
/// (micro-batches summed in f32). Returns the final master as `params`.
fn run_phase<P: Working>(comm: Communicator, ctx: &Phase<'_>) -> std::result::Result<RankOut, (usize, DistError)> {
    let case = ctx.case;
    let at = |e: DistError| (ctx.steps.start, e);
    let r = comm.rank();
    let mut dp = build(case, ctx.strategy, comm).map_err(at)?;
    let mut params: Vec<P> = case.init.iter().map(|&x| P::from_f32(x)).collect();
    if ctx.resume {
        dp.load(ctx.dir, (&mut params).into()).map_err(at)?;
    }
    let mut reports = Vec::with_capacity(ctx.steps.len());
    let w = dp.comm().size();
    let mut sum = ctx.deterministic.then(|| ReproducibleSum::new(case.layout.numel(), w)).transpose().map_err(|e| at(e.into()))?;
    for t in ctx.steps.clone() {
        let (mut g, b) = local(case, t, r);
        let report = match sum.as_mut() {
            None => dp.step((&mut params).into(), (&mut g).into(), b),
            Some(sum) => {
                // This rank's term: its gradient times its weight in the reduction.
                let weight = match case.grad_reduce {
                    ReduceMode::Mean => 1.0 / w as f32,
                    ReduceMode::Sum => 1.0,
                    ReduceMode::BatchWeighted => {
                        let total: usize = (0..w).map(|q| local_batch(case, t, q)).sum();
                        if total == 0 {
                            0.0
                        } else {
                            b as f32 / total as f32
                        }
                    }
                };
                g.iter_mut().for_each(|x| *x *= weight);
                sum.add(&g).map_err(DistError::from).and_then(|()| dp.step_deterministic((&mut params).into(), sum))
            }
        };
        reports.push(report.map_err(|e| (t, e))?);
    }
    dp.gather((&mut params).into()).map_err(at)?;
    if ctx.save {
        let options = checkpoint::SaveOptions::new();
        dp.save(ctx.dir, (&params).into(), Default::default(), &options).map_err(|e| (ctx.steps.end, e))?;
    }
    let master = match dp.gather_master().map_err(at)? {
        Some(m) => m,
        None => params.iter().map(|p| p.to_f32()).collect(),
    };
    Ok(RankOut { params: master, reports, state_elems: dp.state_range().len(), global: None })
}

/// post_local_sgd and diloco: each rank keeps its own parameters.
fn run_local(case: &Case, strategy: Strategy) -> Result<Output> {
    let outs = on_ranks(case.world_size, |comm| {
        let r = comm.rank();
        let mut dp = build(case, strategy, comm).map_err(|e| (0, e))?;
        let mut params = case.init.clone();
        let mut reports = Vec::with_capacity(case.steps.len());
        for t in 0..case.steps.len() {
            let (mut g, b) = local(case, t, r);
            reports.push(dp.step((&mut params).into(), (&mut g).into(), b).map_err(|e| (t, e))?);
        }
        // DiLoCo's answer is also Γ, the global parameters of its last outer step, which
        // `finish` gives; post-local SGD's is each rank's own parameters as they are.
        let global = if strategy == Strategy::Diloco {
            let mut global = params.clone();
            dp.finish((&mut global).into()).map_err(|e| (case.steps.len(), e))?;
            Some(global)
        } else {
            None
        };
        Ok(RankOut { params, reports, global, state_elems: 0 })
    })?;
    let per_step = (0..case.steps.len())
        .map(|t| {
            let norms: Option<Vec<f32>> = outs.iter().map(|o| o.reports[t].grad_norm).collect();
            StepReport { lr: outs[0].reports[t].lrs.clone(), grad_norm_per_rank: norms, ..Default::default() }
        })
        .collect();
    let params = outs[0].global.clone().unwrap_or_else(|| outs[0].params.clone());
    Ok(Output {
        params: named(case, &params),
        params_per_rank: Some(outs.iter().map(|o| named(case, &o.params)).collect()),
        per_step,
        ..Default::default()
    })
}

/// Runs a multi-rank case on the threads backend.
pub fn run_distributed(case: &Case, strategy: Strategy, options: &ReplayOptions) -> Result<Output> {
    if strategy.is_synchronous() {
        let p = case.precision.unwrap_or_else(distoptim::Precision::f32);
        let deterministic = options.deterministic && p.loss_scale.is_none() && p.reduce_dtype == FloatDtype::F32;
        run_synchronous(case, strategy, deterministic)
    } else {
        run_local(case, strategy)
    }
}
