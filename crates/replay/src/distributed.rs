//! Multi-rank cases on real collectives: every rank of a case is a thread of the
//! threads backend, running the same distributed step a training job runs.
//!
//! `reshard` runs the steps before `after_step` on W ranks, saves a checkpoint (the real
//! on-disk format, in a temporary directory) and loads it on W2 ranks for the rest.

use std::time::Duration;

use distoptim::{
    checkpoint, ClipConfig, Diloco, DilocoConfig, DistError, DistributedOptimizer, LocalSgdConfig, PostLocalSgd, ReduceMode, StepConfig,
};
use distoptim_collective::{CommConfig, Communicator};

use crate::case::{Case, GradReduce, Strategy};
use crate::error::{ErrorClass, ReplayError};
use crate::run::{model_params, named, Output, StepReport};
use distoptim::{FloatDtype, Working};
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
    case.clip.as_ref().map(|c| ClipConfig { max_norm: c.max_norm, norm: c.norm, error_if_nonfinite: c.error_if_nonfinite })
}

fn reduce_mode(case: &Case) -> ReduceMode {
    match case.grad_reduce {
        GradReduce::Mean => ReduceMode::Mean,
        GradReduce::Sum => ReduceMode::Sum,
        GradReduce::BatchWeighted => ReduceMode::BatchWeighted,
    }
}

/// Rank `r`'s gradient and batch size at step `t`.
fn local(case: &Case, t: usize, r: usize) -> (Vec<f32>, usize) {
    let step = &case.steps[t];
    let b = step.batch_sizes.as_ref().and_then(|b| b.get(r)).map_or(1, |&b| b as usize);
    (step.rank_grad(r, case.layout.numel()), b)
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
fn run_reducing(case: &Case) -> Result<Output> {
    let strategy = match case.strategy {
        Strategy::Ddp => distoptim::Strategy::Ddp,
        Strategy::Zero1 => distoptim::Strategy::Zero1,
        Strategy::Zero2 => distoptim::Strategy::Zero2,
        _ => distoptim::Strategy::Zero3,
    };
    let step_config = StepConfig {
        reduce: reduce_mode(case),
        clip: clip(case),
        precision: case.precision.unwrap_or_default(),
        ..StepConfig::new(strategy)
    };
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
                let ctx = Phase { case, step_config: &step_config, steps: steps.clone(), resume, save, dir: &dir };
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

/// One phase (the steps between reshards) of a reducing case, on one rank.
struct Phase<'a> {
    case: &'a Case,
    step_config: &'a StepConfig,
    steps: std::ops::Range<usize>,
    resume: bool,
    save: bool,
    dir: &'a std::path::Path,
}

/// Runs a phase on this rank with parameters of the working type `P`: the master starts
/// at the case's f32 values, the model holds them rounded, gradients arrive in f32
/// (micro-batches summed in f32). Returns the final master as `params`.
fn run_phase<P: Working>(comm: Communicator, ctx: &Phase<'_>) -> std::result::Result<RankOut, (usize, DistError)> {
    let case = ctx.case;
    let at = |e: DistError| (ctx.steps.start, e);
    let r = comm.rank();
    let mut opt = DistributedOptimizer::new(comm, case.layout.clone(), case.groups.clone(), case.schedule.clone(), ctx.step_config.clone())
        .map_err(at)?;
    let mut params: Vec<P> = case.init.iter().map(|&x| P::from_f32(x)).collect();
    opt.set_master(&case.init).map_err(at)?;
    if ctx.resume {
        checkpoint::load(ctx.dir, &mut opt, &mut params).map_err(at)?;
    }
    let mut reports = Vec::with_capacity(ctx.steps.len());
    for t in ctx.steps.clone() {
        let (mut g, b) = local(case, t, r);
        reports.push(opt.step(&mut params, &mut g, b).map_err(|e| (t, e))?);
    }
    opt.gather_params(&mut params).map_err(at)?;
    if ctx.save {
        checkpoint::save(ctx.dir, &opt, &params, &Default::default(), &checkpoint::SaveOptions::new()).map_err(|e| (ctx.steps.end, e))?;
    }
    let master = match opt.gather_master().map_err(at)? {
        Some(m) => m,
        None => params.iter().map(|p| p.to_f32()).collect(),
    };
    Ok(RankOut { params: master, reports, state_elems: opt.state_elems(), global: None })
}

/// post_local_sgd and diloco: each rank keeps its own parameters.
fn run_local(case: &Case) -> Result<Output> {
    let w = case.world_size;
    let outs = on_ranks(w, |comm| {
        let at0 = |e: DistError| (0, e);
        let r = comm.rank();
        let mut params = case.init.clone();
        let mut reports = Vec::with_capacity(case.steps.len());
        let mut global = None;
        match (case.strategy, &case.local_sgd, &case.diloco) {
            (Strategy::PostLocalSgd, Some(l), _) => {
                let averaging = LocalSgdConfig { warmup_steps: l.warmup_steps, period: l.period };
                let mut opt = PostLocalSgd::new(
                    comm,
                    case.layout.clone(),
                    case.groups.clone(),
                    case.schedule.clone(),
                    clip(case),
                    reduce_mode(case),
                    averaging,
                )
                .map_err(at0)?;
                for t in 0..case.steps.len() {
                    let (mut g, b) = local(case, t, r);
                    reports.push(opt.step(&mut params, &mut g, b).map_err(|e| (t, e))?);
                }
            }
            (Strategy::Diloco, _, Some(d)) => {
                let config = DilocoConfig {
                    inner_steps: d.inner_steps,
                    outer_lr: d.outer_lr,
                    outer_momentum: d.outer_momentum,
                    nesterov: d.nesterov,
                };
                let mut opt =
                    Diloco::new(comm, case.layout.clone(), case.groups.clone(), case.schedule.clone(), clip(case), config, &case.init)
                        .map_err(at0)?;
                for t in 0..case.steps.len() {
                    let (mut g, _) = local(case, t, r);
                    reports.push(opt.step(&mut params, &mut g).map_err(|e| (t, e))?);
                }
                global = Some(opt.global_params().to_vec());
            }
            _ => return Err(at0(DistError::Invalid(format!("strategy '{}' is missing its settings", case.strategy.name())))),
        }
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
pub fn run_distributed(case: &Case) -> Result<Output> {
    match case.strategy {
        Strategy::PostLocalSgd | Strategy::Diloco => run_local(case),
        _ => run_reducing(case),
    }
}
