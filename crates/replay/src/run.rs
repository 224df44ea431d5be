//! Running a case and reporting what FORMAT.md's output asks for.

use std::collections::BTreeMap;

use distoptim_optim::clip;
use distoptim_optim::{Lbfgs, LrScheduler, Optimizer, OptimizerConfig};
use serde::Serialize;

use crate::case::{Case, Objective, Step};
use crate::error::ReplayError;
use crate::objective;
use distoptim::FloatDtype;
use distoptim::ReduceMode;

/// One entry of `per_step`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StepReport {
    /// The lr of every group used by this step.
    pub lr: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The total norm before clipping (clipping cases).
    pub grad_norm: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Each rank's own norm (post_local_sgd, diloco).
    pub grad_norm_per_rank: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The objective's value (LBFGS cases).
    pub loss: Option<f64>,
}

/// The replay's answer, printed as one JSON object.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Output {
    /// The final parameters by name (the f32 master under mixed precision).
    pub params: BTreeMap<String, Vec<f32>>,
    /// With `precision`: the model's copy, the master rounded to `param_dtype`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_params: Option<BTreeMap<String, Vec<f32>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Each rank's parameters (post_local_sgd, diloco).
    pub params_per_rank: Option<Vec<BTreeMap<String, Vec<f32>>>>,
    /// One entry per step.
    pub per_step: Vec<StepReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Elements each rank holds optimizer state for (ZeRO).
    pub optimizer_state_elems_per_rank: Option<Vec<usize>>,
}

type Result<T> = std::result::Result<T, ReplayError>;

/// How to run a case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayOptions {
    /// Deterministic mode: the synchronous strategies step with
    /// `DataParallel::step_deterministic`, each rank's gradient a term scaled by its
    /// weight in the reduction (1/W, 1, or b_r / Σb), the terms summed exactly. Cases it
    /// does not cover run as usual: one process, post-local SGD and DiLoCo, f16 loss
    /// scaling, and bf16 reduction (whose rounding is the case's point).
    pub deterministic: bool,
}

impl ReplayOptions {
    /// With deterministic mode on or off.
    pub fn with_deterministic(mut self, deterministic: bool) -> Self {
        self.deterministic = deterministic;
        self
    }
}

/// Runs a validated case.
pub fn run(case: &Case) -> Result<Output> {
    run_with(case, &ReplayOptions::default())
}

/// Runs a validated case with `options`.
pub fn run_with(case: &Case, options: &ReplayOptions) -> Result<Output> {
    match (case.strategy, &case.optimizer) {
        (None, OptimizerConfig::Lbfgs(_)) => run_lbfgs(case),
        (None, _) => run_reference(case),
        (Some(strategy), _) => crate::distributed::run_distributed(case, strategy, options),
    }
}

/// The gradient the optimizer steps with: the ranks' gradients reduced as FORMAT.md says
/// (sequentially, in rank order: the one-process reference).
pub fn reduced_grad(case: &Case, step: &Step) -> Vec<f32> {
    match case.precision {
        Some(p) if p.reduce_dtype == FloatDtype::Bf16 => reduced_grad_bf16(case, step),
        _ => reduced_grad_f32(case, step),
    }
}

/// DDP's `bf16_compress_hook` done sequentially: c_r = bf(g_r), pre-divided by W (mean)
/// or multiplied by b_r (batch_weighted) and rounded; s = bf(s + c_r) in rank order.
fn reduced_grad_bf16(case: &Case, step: &Step) -> Vec<f32> {
    let n = case.layout.numel();
    let w = step.world_size();
    let bf = |x: f32| FloatDtype::Bf16.round(x);
    let mut total: Option<Vec<f32>> = None;
    let mut weight_sum = 0.0f32;
    for r in 0..w {
        let b = match (case.grad_reduce, &step.batch_sizes) {
            (ReduceMode::BatchWeighted, Some(b)) => b[r] as f32,
            _ => 1.0,
        };
        weight_sum += b;
        let c: Vec<f32> = step
            .rank_grad(r, n)
            .into_iter()
            .map(|g| match case.grad_reduce {
                ReduceMode::Mean => bf(bf(g) / w as f32),
                ReduceMode::BatchWeighted => bf(bf(g) * b),
                ReduceMode::Sum => bf(g),
            })
            .collect();
        total = Some(match total {
            None => c,
            Some(mut s) => {
                s.iter_mut().zip(&c).for_each(|(s, c)| *s = bf(*s + c));
                s
            }
        });
    }
    let mut total = total.unwrap_or_else(|| vec![0.0; n]);
    if case.grad_reduce == ReduceMode::BatchWeighted {
        total.iter_mut().for_each(|t| *t /= weight_sum);
    }
    total
}

fn reduced_grad_f32(case: &Case, step: &Step) -> Vec<f32> {
    let n = case.layout.numel();
    let w = step.world_size();
    let mut total = vec![0.0f32; n];
    let mut weight_sum = 0.0f32;
    for r in 0..w {
        let g = step.rank_grad(r, n);
        let b = match (case.grad_reduce, &step.batch_sizes) {
            (ReduceMode::BatchWeighted, Some(b)) => b[r] as f32,
            _ => 1.0,
        };
        weight_sum += b;
        total.iter_mut().zip(&g).for_each(|(t, g)| *t += b * g); // 1·g is exact for unweighted modes
    }
    let divisor = match case.grad_reduce {
        ReduceMode::Sum => 1.0,
        ReduceMode::Mean => w as f32,
        ReduceMode::BatchWeighted => weight_sum,
    };
    if divisor != 1.0 {
        total.iter_mut().for_each(|t| *t /= divisor);
    }
    total
}

/// The clip of a case on one buffer: returns the pre-clip norm.
fn clip_grads(case: &Case, grads: &mut [f32], t: usize) -> Result<Option<f32>> {
    let Some(c) = &case.clip else { return Ok(None) };
    clip::clip_grad_norm(grads, c.max_norm, c.norm, c.error_if_nonfinite).map(Some).map_err(|e| {
        let mut e = ReplayError::from(e);
        e.message = format!("{} at step {t}", e.message);
        e
    })
}

pub(crate) fn named(case: &Case, flat: &[f32]) -> BTreeMap<String, Vec<f32>> {
    case.layout.params().iter().map(|p| (p.name.clone(), flat[p.range()].to_vec())).collect()
}

fn scheduler(case: &Case, base_lrs: Vec<f64>) -> Option<LrScheduler> {
    case.schedule.clone().map(|s| LrScheduler::new(s, base_lrs))
}

/// The one-process reference: at every step, reduce all ranks' gradients sequentially,
/// clip, step, schedule. This is `single`, and what every reducing strategy (ddp, zero*)
/// must equal whatever its world size; tests use it as their oracle.
pub fn run_reference(case: &Case) -> Result<Output> {
    let mut params = case.init.clone();
    let mut opt = Optimizer::with_groups(case.layout.clone(), case.groups.clone(), 0..case.layout.numel())?;
    let mut sched = scheduler(case, opt.lrs());
    if let Some(s) = &sched {
        opt.set_lrs(&s.lrs())?;
    }
    let mut per_step = Vec::with_capacity(case.steps.len());
    for (t, step) in case.steps.iter().enumerate() {
        let mut g = reduced_grad(case, step);
        let grad_norm = clip_grads(case, &mut g, t)?;
        per_step.push(StepReport { lr: opt.lrs(), grad_norm, ..Default::default() });
        opt.step(&mut params, &g)?;
        if let Some(s) = &mut sched {
            opt.set_lrs(&s.advance())?;
        }
    }
    Ok(Output { params: named(case, &params), model_params: model_params(case, &params), per_step, ..Default::default() })
}

/// With `precision`: the model's copy of the final master, q(params).
pub(crate) fn model_params(case: &Case, master: &[f32]) -> Option<BTreeMap<String, Vec<f32>>> {
    let p = case.precision?;
    let q: Vec<f32> = master.iter().map(|&x| p.param_dtype.round(x)).collect();
    Some(named(case, &q))
}

/// LBFGS: `num_steps` calls of `step(closure)` on the case's objective.
fn run_lbfgs(case: &Case) -> Result<Output> {
    let OptimizerConfig::Lbfgs(cfg) = &case.groups[0].config else { unreachable!("run() dispatches LBFGS cases only here") };
    let mut params = case.init.clone();
    let mut opt = Lbfgs::new(params.len(), cfg.clone())?;
    let mut sched = scheduler(case, vec![opt.lr()]);
    if let Some(s) = &sched {
        opt.set_lr(s.lrs()[0]);
    }
    let closure = match case.objective {
        Some(Objective::Rosenbrock) | None => objective::rosenbrock,
    };
    let mut per_step = Vec::new(); // num_steps is user input: no capacity from it
    for _ in 0..case.num_steps {
        let lr = opt.lr();
        let loss = opt.step(&mut params, closure)?;
        per_step.push(StepReport { lr: vec![lr], loss: Some(loss as f64), ..Default::default() });
        if let Some(s) = &mut sched {
            opt.set_lr(s.advance()[0]);
        }
    }
    Ok(Output { params: named(case, &params), per_step, ..Default::default() })
}
