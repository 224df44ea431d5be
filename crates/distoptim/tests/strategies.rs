//! The distributed step on real collectives (one thread per rank) against one process.

use distoptim::{verify_replicas, ClipConfig, ReduceMode, ShardedOptimizer, StepConfig, Strategy};
use distoptim_collective::{CommConfig, Communicator};
use distoptim_optim::clip::{self, NormType};
use distoptim_optim::kernels::Adamw8bitConfig;
use distoptim_optim::{
    AdafactorConfig, AdamConfig, Layout, LionConfig, LrScheduler, MuonConfig, Optimizer, OptimizerConfig, ParamGroup, Schedule,
    ScheduleFreeConfig, SgdConfig,
};

fn layout() -> Layout {
    Layout::new([("w", vec![7, 3]), ("b", vec![5]), ("tiny", vec![1])]).unwrap()
}

fn groups(layout: &Layout) -> Vec<ParamGroup> {
    rules(layout, 0)
}

/// The rule sets the property tests run: 0 AdamW (amsgrad for the vectors), 1 SGD with
/// Nesterov momentum, 2 Muon for the matrix + AdamW, 3 Adafactor, 4 Lion, 5 Schedule-Free
/// AdamW, 6 8-bit AdamW in blocks of 2 (ZeRO cuts the matrix only between blocks).
const RULES: usize = 7;

fn rules(layout: &Layout, which: usize) -> Vec<ParamGroup> {
    let all = |config: OptimizerConfig| vec![ParamGroup { params: (0..layout.len()).collect(), config }];
    let adamw = |lr: f64, amsgrad: bool| OptimizerConfig::Adam(AdamConfig { lr, amsgrad, ..AdamConfig::adamw() });
    match which {
        1 => all(OptimizerConfig::Sgd(SgdConfig { lr: 0.05, momentum: 0.9, nesterov: true, weight_decay: 0.01, ..Default::default() })),
        2 => vec![
            ParamGroup { params: vec![0], config: OptimizerConfig::Muon(MuonConfig { lr: 0.02, ..MuonConfig::default() }) },
            ParamGroup { params: (1..layout.len()).collect(), config: adamw(0.05, false) },
        ],
        3 => all(OptimizerConfig::Adafactor(AdafactorConfig { lr: 0.05, ..AdafactorConfig::default() })),
        4 => all(OptimizerConfig::Lion(LionConfig { lr: 0.01, weight_decay: 0.1, ..LionConfig::default() })),
        5 => all(OptimizerConfig::ScheduleFreeAdamw(ScheduleFreeConfig { lr: 0.01, warmup_steps: 2, ..ScheduleFreeConfig::default() })),
        6 => all(OptimizerConfig::Adamw8bit(Adamw8bitConfig { lr: 0.01, block_size: 2, ..Adamw8bitConfig::default() })),
        _ => vec![ParamGroup { params: vec![0], config: adamw(0.01, false) }, ParamGroup { params: vec![1, 2], config: adamw(0.05, true) }]
            .into_iter()
            .filter(|g| g.params.iter().all(|&i| i < layout.len()))
            .collect(),
    }
}

/// Rank r's gradient at step t.
fn grad(numel: usize, r: usize, t: usize) -> Vec<f32> {
    (0..numel).map(|i| ((i * 31 + r * 17 + t * 7) % 23) as f32 * 0.1 - 1.1).collect()
}

/// One process: reduce as the mode says, clip, step.
fn reference(steps: usize, w: usize, batch: &[usize], mode: ReduceMode, clip: Option<ClipConfig>) -> Vec<f32> {
    reference_with(0, steps, w, batch, mode, clip)
}

fn reference_with(which: usize, steps: usize, w: usize, batch: &[usize], mode: ReduceMode, clip: Option<ClipConfig>) -> Vec<f32> {
    let layout = layout();
    let n = layout.numel();
    let mut params: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
    let mut opt = Optimizer::with_groups(layout.clone(), rules(&layout, which), 0..n).unwrap();
    for t in 0..steps {
        let mut total = vec![0f32; n];
        for (r, &batch_size) in batch.iter().enumerate().take(w) {
            let b = if mode == ReduceMode::BatchWeighted { batch_size as f32 } else { 1.0 };
            total.iter_mut().zip(grad(n, r, t)).for_each(|(a, g)| *a += b * g);
        }
        let d = match mode {
            ReduceMode::Mean => w as f32,
            ReduceMode::Sum => 1.0,
            ReduceMode::BatchWeighted => batch.iter().sum::<usize>() as f32,
        };
        total.iter_mut().for_each(|g| *g /= d);
        if let Some(c) = clip {
            clip::clip_grad_norm(&mut total, c.max_norm, c.norm, false).unwrap();
        }
        opt.step(&mut params, &total).unwrap();
    }
    params
}

fn distributed(strategy: Strategy, steps: usize, w: usize, batch: &[usize], mode: ReduceMode, clip: Option<ClipConfig>) -> Vec<Vec<f32>> {
    distributed_with(0, strategy, steps, w, batch, mode, clip)
}

fn distributed_with(
    which: usize,
    strategy: Strategy,
    steps: usize,
    w: usize,
    batch: &[usize],
    mode: ReduceMode,
    clip: Option<ClipConfig>,
) -> Vec<Vec<f32>> {
    let config = CommConfig::default().with_timeout(std::time::Duration::from_secs(30)).with_slot_bytes(4096);
    Communicator::run_threads(w, &config, |comm| {
        let layout = layout();
        let n = layout.numel();
        let r = comm.rank();
        let step_config = StepConfig { reduce: mode, clip, bucket_cap_mb: 16.0 * 4.0 / 1048576.0, ..StepConfig::new(strategy) };
        let mut opt = ShardedOptimizer::new(comm.clone(), layout.clone(), rules(&layout, which), None, step_config).unwrap();
        let mut params: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
        for t in 0..steps {
            // Gradient accumulation: two micro-batches (halves, so the sum is exact) summed
            // locally, one synchronisation.
            let mut g = vec![0f32; n];
            for _ in 0..2 {
                g.iter_mut().zip(grad(n, r, t)).for_each(|(a, x)| *a += x * 0.5);
            }
            opt.step(&mut params, &mut g, batch[r]).unwrap();
        }
        opt.gather_params(&mut params).unwrap();
        verify_replicas(&comm, &layout, &params).unwrap();
        params
    })
    .unwrap()
}

/// Every rule, every strategy, W = 1..5 with a rank of batch 0, gradient accumulation and
/// every reduce mode: the bits of one process (Muon too: the rank that runs a matrix's
/// Newton–Schulz assembles the same input U from the ranks' pieces).
#[test]
fn every_strategy_and_reduce_mode_equals_one_process_to_the_bit() {
    for which in 0..RULES {
        for w in [1, 2, 3, 4, 5] {
            let batch: Vec<usize> = (0..w).map(|r| [3, 0, 5, 1, 2][r]).collect();
            for mode in [ReduceMode::Mean, ReduceMode::Sum, ReduceMode::BatchWeighted] {
                let batch = if mode == ReduceMode::BatchWeighted && w == 1 { vec![4] } else { batch.clone() };
                let want = reference_with(which, 4, w, &batch, mode, None);
                for strategy in [Strategy::Ddp, Strategy::Zero1, Strategy::Zero2, Strategy::Zero3] {
                    for (r, got) in distributed_with(which, strategy, 4, w, &batch, mode, None).iter().enumerate() {
                        assert!(
                            got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "rules {which} {strategy:?} {mode:?} w={w} rank {r}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn clipping_across_shards_counts_every_element_once() {
    for norm in [NormType::P(1.0), NormType::P(2.0), NormType::Inf, NormType::P(3.0)] {
        let clip = Some(ClipConfig { max_norm: 0.5, norm, error_if_nonfinite: true });
        let want = reference(3, 4, &[1; 4], ReduceMode::Mean, clip);
        for strategy in [Strategy::Ddp, Strategy::Zero1, Strategy::Zero2, Strategy::Zero3] {
            for got in distributed(strategy, 3, 4, &[1; 4], ReduceMode::Mean, clip) {
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{strategy:?} {norm:?}: {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn zero_shards_state_in_balanced_ranges_and_reloads_at_another_world_size() {
    let layout = layout();
    let n = layout.numel();
    let config = CommConfig::default().with_timeout(std::time::Duration::from_secs(30));
    let sgd = vec![ParamGroup {
        params: vec![0, 1, 2],
        config: OptimizerConfig::Sgd(SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() }),
    }];
    // Three steps on 3 ranks, consolidate, two more on 2 ranks; versus five on 1 rank.
    let first = Communicator::run_threads(3, &config, |comm| {
        let r = comm.rank();
        let mut opt = ShardedOptimizer::new(comm, layout.clone(), sgd.clone(), None, StepConfig::new(Strategy::Zero2)).unwrap();
        let mut p = vec![1f32; n];
        for t in 0..3 {
            opt.step(&mut p, &mut grad(n, r, t), 1).unwrap();
        }
        (opt.state_elems(), p, opt.consolidate_state_dict(0).unwrap())
    })
    .unwrap();
    let elems: Vec<usize> = first.iter().map(|f| f.0).collect();
    assert_eq!(elems.iter().sum::<usize>(), n);
    assert!(elems.iter().max().unwrap() - elems.iter().min().unwrap() <= 1, "{elems:?}");
    let (params, state) = (first[0].1.clone(), first[0].2.clone().unwrap());
    assert!(first[1].2.is_none());
    let second = Communicator::run_threads(2, &config, |comm| {
        let mut opt = ShardedOptimizer::new(comm, layout.clone(), sgd.clone(), None, StepConfig::new(Strategy::Zero1)).unwrap();
        opt.load_state_dict(&state).unwrap();
        let mut p = params.clone();
        for t in 3..5 {
            // The same total gradient as three ranks would have reduced (mean of 3).
            let mut g: Vec<f32> = (0..n).map(|i| (0..3).map(|q| grad(n, q, t)[i]).sum::<f32>() / 3.0).collect();
            opt.step(&mut p, &mut g, 1).unwrap();
        }
        p
    })
    .unwrap();
    let mut opt = Optimizer::with_groups(layout.clone(), sgd.clone(), 0..n).unwrap();
    let mut p = vec![1f32; n];
    for t in 0..5 {
        let g: Vec<f32> = (0..n).map(|i| (0..3).map(|q| grad(n, q, t)[i]).sum::<f32>() / 3.0).collect();
        opt.step(&mut p, &g).unwrap();
    }
    for got in second {
        for (a, b) in got.iter().zip(&p) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{a} vs {b}");
        }
    }
}

/// torch's `add_param_group` mid-run: ZeRO re-balances its ranges over the grown buffer
/// and every strategy goes on exactly as one process that added the group at that step.
#[test]
fn add_param_group_repartitions_and_continues_like_one_process() {
    let schedule = Schedule::LinearWithWarmup { warmup: 2, total: 10 };
    let head = || vec![("head.w".to_string(), vec![4, 3]), ("head.b".to_string(), vec![3])];
    let head_config = OptimizerConfig::Adam(AdamConfig { lr: 0.02, ..AdamConfig::adamw() });
    let mean =
        |n: usize, w: usize, t: usize| -> Vec<f32> { (0..n).map(|i| (0..w).map(|q| grad(n, q, t)[i]).sum::<f32>() / w as f32).collect() };
    for w in [1, 2, 3, 4] {
        // One process: core optimizer and scheduler by hand.
        let layout = layout();
        let n = layout.numel();
        let mut opt = Optimizer::with_groups(layout.clone(), groups(&layout), 0..n).unwrap();
        let mut sched = LrScheduler::new(schedule.clone(), opt.lrs());
        opt.set_lrs(&sched.lrs()).unwrap();
        let mut want: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
        let mut want_lrs = Vec::new();
        for t in 0..5 {
            if t == 2 {
                opt.add_param_group(head(), head_config.clone()).unwrap();
                sched.base_lrs.push(0.02);
                opt.set_lrs(&sched.lrs()).unwrap();
                want.extend((0..15).map(|i| 0.3 - i as f32 * 0.02));
            }
            want_lrs.push(opt.lrs());
            let g = mean(want.len(), w, t);
            opt.step(&mut want, &g).unwrap();
            opt.set_lrs(&sched.advance()).unwrap();
        }
        for strategy in [Strategy::Ddp, Strategy::Zero1, Strategy::Zero2, Strategy::Zero3] {
            let got = Communicator::run_threads(w, &CommConfig::default(), |comm| {
                let r = comm.rank();
                let layout = layout.clone();
                let mut opt =
                    ShardedOptimizer::new(comm, layout.clone(), groups(&layout), Some(schedule.clone()), StepConfig::new(strategy))
                        .unwrap();
                let mut p: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
                let mut lrs = Vec::new();
                for t in 0..5 {
                    if t == 2 {
                        opt.gather_params(&mut p).unwrap();
                        assert_eq!(opt.add_param_group(head(), head_config.clone()).unwrap(), vec![3, 4]);
                        p.extend((0..15).map(|i| 0.3 - i as f32 * 0.02));
                        let grown = opt.layout().numel();
                        let expected = if strategy == Strategy::Ddp { 0..grown } else { distoptim_collective::shard_range(grown, w, r) };
                        assert_eq!(opt.owned(), expected);
                    }
                    let mut g = grad(p.len(), r, t);
                    let report = opt.step(&mut p, &mut g, 1).unwrap();
                    lrs.push(report.lrs);
                }
                opt.gather_params(&mut p).unwrap();
                (p, lrs)
            })
            .unwrap();
            for (r, (p, lrs)) in got.iter().enumerate() {
                assert_eq!(lrs, &want_lrs, "{strategy:?} w={w}");
                for (a, b) in p.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{strategy:?} w={w} rank {r}: {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn verify_replicas_names_the_parameter_and_the_ranks_that_differ() {
    let layout = layout();
    let errors = Communicator::run_threads(3, &CommConfig::default(), |comm| {
        let mut p = vec![0.5f32; layout.numel()];
        if comm.rank() == 2 {
            p[layout.param(1).range().start] = 0.5000001;
        }
        verify_replicas(&comm, &layout, &p).unwrap_err().to_string()
    })
    .unwrap();
    for e in errors {
        assert_eq!(e, "replicas differ: parameter 'b' on rank(s) [2] is not the same as on rank 0");
    }
}

/// Rosenbrock split into per-rank sums of terms: LBFGS with the closure reduced over the
/// ranks follows one process on the whole function, with the same number of evaluations.
#[test]
fn lbfgs_across_ranks_takes_identical_decisions_on_every_rank() {
    use distoptim_optim::lbfgs::BoxError;
    use distoptim_optim::{LbfgsConfig, LineSearch};
    let n = 6;
    let rosen = |x: &[f32], g: &mut [f32], terms: &mut dyn Iterator<Item = usize>| -> Result<f32, BoxError> {
        g.fill(0.0);
        let mut f = 0.0f32;
        for i in terms {
            let (a, b) = (x[i + 1] - x[i] * x[i], 1.0 - x[i]);
            f += 100.0 * a * a + b * b;
            g[i] += -400.0 * a * x[i] - 2.0 * b;
            g[i + 1] += 200.0 * a;
        }
        Ok(f)
    };
    let config = LbfgsConfig { line_search: LineSearch::StrongWolfe, ..LbfgsConfig::default() };
    let mut single = distoptim_optim::Lbfgs::new(n, config.clone()).unwrap();
    let mut x = vec![-1.2f32, 1.0, -1.2, 1.0, 0.5, 0.5];
    let mut evals = 0;
    for _ in 0..3 {
        single
            .step(&mut x, |p, g| {
                evals += 1;
                rosen(p, g, &mut (0..n - 1))
            })
            .unwrap();
    }
    let ranks = Communicator::run_threads(2, &CommConfig::default(), |comm| {
        let r = comm.rank();
        let mut lbfgs = distoptim_optim::Lbfgs::new(n, config.clone()).unwrap();
        let mut p = vec![-1.2f32, 1.0, -1.2, 1.0, 0.5, 0.5];
        let mut evals = 0;
        for _ in 0..3 {
            distoptim::step_lbfgs(&comm, &mut lbfgs, &mut p, ReduceMode::Sum, |x, g| {
                evals += 1;
                rosen(x, g, &mut (0..n - 1).filter(|i| i % 2 == r))
            })
            .unwrap();
        }
        (p, evals)
    })
    .unwrap();
    assert_eq!(ranks[0], ranks[1], "ranks diverged");
    assert_eq!(ranks[0].1, evals, "evaluation counts differ from one process");
    for (a, b) in ranks[0].0.iter().zip(&x) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
}
