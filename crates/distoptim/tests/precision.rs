//! Mixed precision on real collectives (one thread per rank) against one process that
//! rounds the same way: bf16/f16 working parameters, an f32 master, f32 or bf16
//! reduction, loss scaling, and checkpoints that keep the master.

use distoptim::checkpoint::{self, SaveOptions};
use distoptim::{
    data_parallel, ClipConfig, DataParallelConfig, FloatDtype, LossScaleConfig, Precision, ReduceMode, ShardedOptimizer, StepConfig,
    Strategy, Working,
};
use distoptim_collective::{bf16, f16, CommConfig, Communicator};
use distoptim_optim::clip::NormType;
use distoptim_optim::{AdamConfig, Layout, Optimizer, OptimizerConfig, ParamGroup, Schedule};

const STRATEGIES: [Strategy; 4] = [Strategy::Ddp, Strategy::Zero1, Strategy::Zero2, Strategy::Zero3];

fn layout() -> Layout {
    Layout::new([("w", vec![7, 3]), ("b", vec![5]), ("tiny", vec![1])]).unwrap()
}

fn groups() -> Vec<ParamGroup> {
    vec![
        ParamGroup { params: vec![0], config: OptimizerConfig::Adam(AdamConfig { lr: 0.01, ..AdamConfig::adamw() }) },
        ParamGroup {
            params: vec![1, 2],
            config: OptimizerConfig::Adam(AdamConfig { lr: 0.05, amsgrad: true, weight_decay: 0.0, ..AdamConfig::adamw() }),
        },
    ]
}

fn init(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37).sin() * 0.5 + 0.001 * i as f32).collect()
}

/// Rank r's gradient at step t, as the model produced it (of the working type).
fn grad(dtype: FloatDtype, n: usize, r: usize, t: usize) -> Vec<f32> {
    (0..n).map(|i| dtype.round(((i * 31 + r * 17 + t * 7) % 23) as f32 * 0.0137 - 0.15)).collect()
}

fn config() -> CommConfig {
    CommConfig::default().with_timeout(std::time::Duration::from_secs(30)).with_slot_bytes(4096)
}

/// One process: the ranks' gradients reduced as the policy says (bf16: compressed per
/// rank, summed in f32 in rank order, rounded once, which is what the embedded
/// collective does), then an f32 step of the master. Returns the master after each step.
fn reference(p: Precision, w: usize, batch: &[usize], mode: ReduceMode, steps: usize, clip: Option<ClipConfig>) -> Vec<Vec<f32>> {
    let layout = layout();
    let n = layout.numel();
    let mut master = init(n);
    let mut opt = Optimizer::with_groups(layout, groups(), 0..n).unwrap();
    let bf = |x: f32| FloatDtype::Bf16.round(x);
    let total_batch: f32 = batch.iter().map(|&b| b as f32).sum();
    let mut out = Vec::new();
    for t in 0..steps {
        let mut total = vec![0f32; n];
        for (r, &b) in batch.iter().enumerate().take(w) {
            let weight = if mode == ReduceMode::BatchWeighted { b as f32 } else { 1.0 };
            for (acc, g) in total.iter_mut().zip(grad(p.param_dtype, n, r, t)) {
                *acc += match (p.reduce_dtype, mode) {
                    (FloatDtype::F32, _) => weight * g,
                    (_, ReduceMode::Mean) => bf(bf(g) / w as f32),
                    (_, _) => bf(bf(g) * weight),
                };
            }
        }
        if p.reduce_dtype == FloatDtype::Bf16 {
            total.iter_mut().for_each(|x| *x = bf(*x));
        }
        let d = match (mode, p.reduce_dtype) {
            (ReduceMode::Mean, FloatDtype::F32) => w as f32,
            (ReduceMode::BatchWeighted, _) => total_batch,
            _ => 1.0,
        };
        total.iter_mut().for_each(|x| *x /= d);
        if let Some(c) = clip {
            distoptim_optim::clip::clip_grad_norm(&mut total, c.max_norm, c.norm, false).unwrap();
        }
        opt.step(&mut master, &total).unwrap();
        out.push(master.clone());
    }
    out
}

/// The distributed run with working type `T`: every rank's working parameters and the
/// gathered master after each step.
fn distributed<T: Working>(
    strategy: Strategy,
    p: Precision,
    w: usize,
    batch: &[usize],
    mode: ReduceMode,
    steps: usize,
    clip: Option<ClipConfig>,
) -> Vec<Vec<(Vec<f32>, Vec<f32>)>> {
    Communicator::run_threads(w, &config(), |comm| {
        let layout = layout();
        let n = layout.numel();
        let r = comm.rank();
        // Buckets of 16 elements: the chunked reduction runs several rounds.
        let step_config = StepConfig { reduce: mode, precision: p, clip, bucket_cap_mb: 64.0 / 1048576.0, ..StepConfig::new(strategy) };
        let mut opt = ShardedOptimizer::new(comm.clone(), layout, groups(), None, step_config).unwrap();
        let start = init(n);
        opt.set_master(&start).unwrap();
        let mut params: Vec<T> = start.iter().map(|&x| T::from_f32(x)).collect();
        let mut seen = Vec::new();
        for t in 0..steps {
            let mut g: Vec<T> = grad(p.param_dtype, n, r, t).into_iter().map(T::from_f32).collect();
            let report = opt.step(&mut params, &mut g, batch[r]).unwrap();
            assert!(!report.skipped);
            opt.gather_params(&mut params).unwrap();
            let master = opt.gather_master().unwrap().unwrap_or_else(|| params.iter().map(|x| x.to_f32()).collect());
            seen.push((params.iter().map(|x| x.to_f32()).collect(), master));
        }
        seen
    })
    .unwrap()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn check<T: Working>(p: Precision) {
    for w in 1..=5 {
        let batch: Vec<usize> = (0..w).map(|r| [3, 0, 5, 1, 2][r]).collect();
        for mode in [ReduceMode::Mean, ReduceMode::BatchWeighted, ReduceMode::Sum] {
            let batch = if mode == ReduceMode::BatchWeighted && w == 1 { vec![4] } else { batch.clone() };
            let want = reference(p, w, &batch, mode, 3, None);
            for strategy in STRATEGIES {
                for (r, steps) in distributed::<T>(strategy, p, w, &batch, mode, 3, None).into_iter().enumerate() {
                    for (t, (params, master)) in steps.into_iter().enumerate() {
                        let what = format!("{strategy} {p:?} {mode:?} W={w} rank {r} step {t}");
                        assert!(same_bits(&master, &want[t]), "master differs: {what}");
                        let rounded: Vec<f32> = want[t].iter().map(|&x| p.param_dtype.round(x)).collect();
                        assert!(same_bits(&params, &rounded), "working params are not q(master): {what}");
                    }
                }
            }
        }
    }
}

#[test]
fn clipping_under_mixed_precision_counts_every_element_once() {
    let p = Precision::new(FloatDtype::Bf16);
    for norm in [NormType::P(2.0), NormType::Inf, NormType::P(1.0)] {
        let clip = Some(ClipConfig { max_norm: 0.05, norm, error_if_nonfinite: false });
        for w in [1, 2, 3, 5] {
            for mode in [ReduceMode::Mean, ReduceMode::BatchWeighted] {
                let batch: Vec<usize> = (0..w).map(|r| [3, 0, 5, 1, 2][r]).collect();
                let batch = if mode == ReduceMode::BatchWeighted && w == 1 { vec![4] } else { batch };
                let want = reference(p, w, &batch, mode, 3, clip);
                for strategy in STRATEGIES {
                    for steps in distributed::<bf16>(strategy, p, w, &batch, mode, 3, clip) {
                        for (t, (_, master)) in steps.iter().enumerate() {
                            for (a, b) in master.iter().zip(&want[t]) {
                                assert!(
                                    (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                                    "{strategy} {norm:?} W={w} {mode:?} step {t}: {a} vs {b}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn bf16_steps_equal_one_process_for_every_strategy_and_world_size() {
    check::<bf16>(Precision::new(FloatDtype::Bf16));
}

#[test]
fn bf16_reduction_equals_one_process_with_the_same_rounding() {
    check::<bf16>(Precision::new(FloatDtype::Bf16).with_reduce_dtype(FloatDtype::Bf16));
    check::<f32>(Precision::new(FloatDtype::F32).with_reduce_dtype(FloatDtype::Bf16));
}

#[test]
fn f16_steps_equal_one_process_for_every_strategy_and_world_size() {
    check::<f16>(Precision::new(FloatDtype::F16).with_loss_scale(None));
}

/// f16 with loss scaling through the `DataParallel` interface: steps `grads[t]` (the
/// unscaled gradients; each is scaled by the current loss scale as a backward pass of
/// the scaled loss would produce it; `None`: rank 1 overflows). Returns the final params,
/// the scale and the lrs of the steps taken.
fn scaled_run(strategy: Strategy, grads: &[Option<Vec<f32>>]) -> (Vec<f32>, f32, Vec<Vec<f64>>) {
    let layout = layout();
    let n = layout.numel();
    let scale = LossScaleConfig { init_scale: 1024.0, growth_interval: 100, ..LossScaleConfig::default() };
    let precision = Precision::new(FloatDtype::F16).with_loss_scale(Some(scale));
    let schedule = Schedule::LinearWithWarmup { warmup: 1, total: 10 };
    let outs = Communicator::run_threads(3, &config(), |comm| {
        let r = comm.rank();
        let cfg = DataParallelConfig::new().with_reduce(ReduceMode::Mean).with_precision(precision);
        let start = init(n);
        let mut params: Vec<f16> = start.iter().map(|&x| f16::from_f32(x)).collect();
        let mut dp = data_parallel(strategy, comm.clone(), layout.clone(), groups(), Some(schedule.clone()), &cfg, &start).unwrap();
        let mut lrs = Vec::new();
        for (t, g) in grads.iter().enumerate() {
            let s = dp.loss_scale();
            let mut g16: Vec<f16> = match g {
                // One rank's backward overflowed.
                None if r == 1 => vec![f16::INFINITY; n],
                None => vec![f16::from_f32(0.25 * s); n],
                Some(g) => g.iter().map(|&x| f16::from_f32(x * s)).collect(),
            };
            let report = dp.step((&mut params).into(), (&mut g16).into(), 1).unwrap();
            assert_eq!(report.skipped, g.is_none(), "step {t}");
            if !report.skipped {
                lrs.push(report.lrs);
            }
        }
        dp.gather((&mut params).into()).unwrap();
        (params.iter().map(|x| x.to_f32()).collect::<Vec<f32>>(), dp.loss_scale(), lrs)
    })
    .unwrap();
    outs[0].clone()
}

#[test]
fn loss_scaling_skips_an_overflowing_step_and_changes_nothing_else() {
    let n = layout().numel();
    let g = |t| Some(grad(FloatDtype::F16, n, 0, t));
    for strategy in STRATEGIES {
        let (clean, clean_scale, clean_lrs) = scaled_run(strategy, &[g(0), g(1), g(2)]);
        let (skipped, skipped_scale, skipped_lrs) = scaled_run(strategy, &[g(0), None, g(1), g(2)]);
        assert!(same_bits(&clean, &skipped), "{strategy}: a skipped step changed the parameters");
        assert_eq!(clean_lrs, skipped_lrs, "{strategy}: a skipped step moved the schedule");
        assert_eq!((clean_scale, skipped_scale), (1024.0, 512.0), "{strategy}: the scale backs off once");
    }
}

/// Rank 0 carries the whole gradient (the others zero), so the sum is the same at any
/// world size and a resharded run must equal an uninterrupted one to the bit.
fn resharded(first: (Strategy, usize), second: (Strategy, usize), split: usize, total: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let layout = layout();
    let n = layout.numel();
    let root = std::env::temp_dir().join(format!("distoptim-precision-{}-{split}-{}", std::process::id(), first.1));
    let _ = std::fs::remove_dir_all(&root);
    let precision = Precision::new(FloatDtype::Bf16);
    let sched = Schedule::CosineWithWarmup { warmup: 1, total: total as u64, cycles: 0.5 };
    let phase = |(strategy, w): (Strategy, usize), steps: std::ops::Range<usize>, resume: bool, save: bool| {
        Communicator::run_threads(w, &config(), |comm| {
            let r = comm.rank();
            let step_config = StepConfig { reduce: ReduceMode::Sum, precision, ..StepConfig::new(strategy) };
            let mut opt = ShardedOptimizer::new(comm, layout.clone(), groups(), Some(sched.clone()), step_config).unwrap();
            let start = init(n);
            opt.set_master(&start).unwrap();
            let mut params: Vec<bf16> = start.iter().map(|&x| bf16::from_f32(x)).collect();
            if resume {
                checkpoint::load(&root, &mut opt, &mut params).unwrap();
            }
            let loaded = opt.gather_master().unwrap().unwrap();
            for t in steps.clone() {
                let mut g: Vec<bf16> =
                    grad(FloatDtype::Bf16, n, 0, t).into_iter().map(|x| bf16::from_f32(if r == 0 { x } else { 0.0 })).collect();
                opt.step(&mut params, &mut g, 1).unwrap();
            }
            opt.gather_params(&mut params).unwrap();
            if save {
                checkpoint::save(&root, &opt, &params, &Default::default(), &SaveOptions::new()).unwrap();
            }
            (loaded, opt.gather_master().unwrap().unwrap(), params.iter().map(|x| x.to_f32()).collect::<Vec<f32>>())
        })
        .unwrap()
    };
    let saved = phase(first, 0..split, false, true).remove(0).1;
    let resumed = phase(second, split..total, true, false).remove(0);
    let _ = std::fs::remove_dir_all(&root);
    assert!(same_bits(&resumed.0, &saved), "the master did not reload bit for bit");
    (saved, resumed.1, resumed.2)
}

#[test]
fn a_bf16_checkpoint_at_w3_resumes_at_w2_with_the_same_master() {
    let layout = layout();
    let n = layout.numel();
    // Uninterrupted: 5 steps on 3 ranks.
    let whole = Communicator::run_threads(3, &config(), |comm| {
        let r = comm.rank();
        let precision = Precision::new(FloatDtype::Bf16);
        let sched = Schedule::CosineWithWarmup { warmup: 1, total: 5, cycles: 0.5 };
        let step_config = StepConfig { reduce: ReduceMode::Sum, precision, ..StepConfig::new(Strategy::Zero2) };
        let mut opt = ShardedOptimizer::new(comm, layout.clone(), groups(), Some(sched), step_config).unwrap();
        let start = init(n);
        opt.set_master(&start).unwrap();
        let mut params: Vec<bf16> = start.iter().map(|&x| bf16::from_f32(x)).collect();
        for t in 0..5 {
            let mut g: Vec<bf16> =
                grad(FloatDtype::Bf16, n, 0, t).into_iter().map(|x| bf16::from_f32(if r == 0 { x } else { 0.0 })).collect();
            opt.step(&mut params, &mut g, 1).unwrap();
        }
        (opt.gather_master().unwrap().unwrap(), params.iter().map(|x| x.to_f32()).collect::<Vec<f32>>())
    })
    .unwrap()
    .remove(0);
    for second in [Strategy::Zero1, Strategy::Zero3, Strategy::Ddp] {
        let (_, master, params) = resharded((Strategy::Zero2, 3), (second, 2), 3, 5);
        assert!(same_bits(&master, &whole.0), "zero2 W=3 -> {second} W=2: master differs from the uninterrupted run");
        assert!(same_bits(&params, &whole.1), "zero2 W=3 -> {second} W=2: params differ");
    }
}

#[test]
fn mismatched_types_and_strategies_are_refused_by_name() {
    let layout = layout();
    let n = layout.numel();
    let errs = Communicator::run_threads(1, &config(), |comm| {
        let step_config = StepConfig { precision: Precision::new(FloatDtype::Bf16), ..StepConfig::new(Strategy::Zero1) };
        let mut opt = ShardedOptimizer::new(comm.clone(), layout.clone(), groups(), None, step_config).unwrap();
        let mut p32 = vec![0f32; n];
        let mut g16 = vec![f16::ZERO; n];
        let mut g32 = p32.clone();
        let a = opt.step(&mut p32, &mut g32, 1).unwrap_err().to_string();
        let mut pb = vec![bf16::ZERO; n];
        let b = opt.step(&mut pb, &mut g16, 1).unwrap_err().to_string();
        let cfg = DataParallelConfig::new().with_precision(Precision::new(FloatDtype::Bf16));
        let c = data_parallel(Strategy::Diloco, comm, layout.clone(), groups(), None, &cfg, &vec![0.0; n]).err().unwrap().to_string();
        (a, b, c)
    })
    .unwrap()
    .remove(0);
    assert!(errs.0.contains("params are f32, the precision policy's param_dtype is bf16"), "{}", errs.0);
    assert!(errs.1.contains("grads are f16: they must be of param_dtype (bf16) or f32"), "{}", errs.1);
    assert!(errs.2.contains("diloco keeps a model per rank in f32"), "{}", errs.2);
}
