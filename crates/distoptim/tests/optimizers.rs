//! Whole-matrix rules (Muon's transform on cut matrices, Adafactor whole), 8-bit AdamW's blocks and several rules in one optimizer, on real
//! collectives (one thread per rank) against one process: every strategy, W = 1..5, with
//! ZeRO ranges that would cut the matrices, and checkpoints that reshard.

use distoptim::checkpoint::{self, SaveOptions};
use distoptim::{ClipConfig, ReduceMode, ShardedOptimizer, StepConfig, Strategy};
use distoptim_collective::{CommConfig, Communicator};
use distoptim_optim::clip::{self, NormType};
use distoptim_optim::kernels::Adamw8bitConfig;
use distoptim_optim::{
    AdafactorConfig, AdamConfig, AdjustLr, Layout, LionConfig, MuonConfig, Optimizer, OptimizerConfig, ParamGroup, Schedule,
    ScheduleFreeConfig,
};

const STRATEGIES: [Strategy; 4] = [Strategy::Ddp, Strategy::Zero1, Strategy::Zero2, Strategy::Zero3];

/// Matrices of several shapes (wide, tall) between vectors, so balanced ranges cut them.
fn layout() -> Layout {
    Layout::new([("a.w", vec![5, 3]), ("a.b", vec![5]), ("b.w", vec![4, 6]), ("b.b", vec![4]), ("c.w", vec![2, 7]), ("s", vec![])]).unwrap()
}

/// 0: Muon for the matrices, AdamW for the rest (the `optimizers` of practice); 1:
/// Adafactor for everything; 2: Lion, 3: Schedule-Free AdamW, for everything (elementwise:
/// ranges stay balanced; Schedule-Free's group counters travel in the checkpoint); 4:
/// 8-bit AdamW in blocks of 4 for the matrices (ranges cut them only between blocks),
/// AdamW for the rest.
fn groups(which: usize) -> Vec<ParamGroup> {
    if which == 4 {
        let q = Adamw8bitConfig { lr: 0.01, block_size: 4, ..Adamw8bitConfig::default() };
        return vec![
            ParamGroup { params: vec![0, 2, 4], config: OptimizerConfig::Adamw8bit(q) },
            ParamGroup { params: vec![1, 3, 5], config: OptimizerConfig::Adam(AdamConfig { lr: 0.01, ..AdamConfig::adamw() }) },
        ];
    }
    if which == 3 {
        let sf = ScheduleFreeConfig { lr: 0.01, weight_decay: 0.01, warmup_steps: 2, ..ScheduleFreeConfig::default() };
        return vec![ParamGroup { params: (0..6).collect(), config: OptimizerConfig::ScheduleFreeAdamw(sf) }];
    }
    if which == 2 {
        let lion = LionConfig { lr: 0.01, weight_decay: 0.1, ..LionConfig::default() };
        return vec![ParamGroup { params: (0..6).collect(), config: OptimizerConfig::Lion(lion) }];
    }
    if which == 0 {
        let muon = MuonConfig { lr: 0.02, adjust_lr: AdjustLr::MatchRmsAdamw, ..MuonConfig::default() };
        vec![
            ParamGroup { params: vec![0, 2, 4], config: OptimizerConfig::Muon(muon) },
            ParamGroup { params: vec![1, 3, 5], config: OptimizerConfig::Adam(AdamConfig { lr: 0.01, ..AdamConfig::adamw() }) },
        ]
    } else {
        let ada = AdafactorConfig { lr: 0.05, weight_decay: 0.01, ..AdafactorConfig::default() };
        vec![ParamGroup { params: (0..6).collect(), config: OptimizerConfig::Adafactor(ada) }]
    }
}

fn init(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.71).sin() * 0.4).collect()
}

fn grad(n: usize, r: usize, t: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 13 + r * 7 + t * 5) % 17) as f32 * 0.03 - 0.25).collect()
}

fn config() -> CommConfig {
    CommConfig::default().with_timeout(std::time::Duration::from_secs(30)).with_slot_bytes(4096)
}

fn reference(which: usize, w: usize, steps: usize, clip: Option<ClipConfig>) -> Vec<f32> {
    let layout = layout();
    let n = layout.numel();
    let mut p = init(n);
    let mut opt = Optimizer::with_groups(layout, groups(which), 0..n).unwrap();
    for t in 0..steps {
        let mut g = vec![0f32; n];
        for r in 0..w {
            g.iter_mut().zip(grad(n, r, t)).for_each(|(a, b)| *a += b);
        }
        g.iter_mut().for_each(|x| *x /= w as f32);
        if let Some(c) = clip {
            clip::clip_grad_norm(&mut g, c.max_norm, c.norm, false).unwrap();
        }
        opt.step(&mut p, &g).unwrap();
    }
    p
}

fn distributed(strategy: Strategy, which: usize, w: usize, steps: usize, clip: Option<ClipConfig>) -> (Vec<f32>, Vec<usize>) {
    let outs = Communicator::run_threads(w, &config(), |comm| {
        let layout = layout();
        let n = layout.numel();
        let r = comm.rank();
        let c = StepConfig { clip, bucket_cap_mb: 64.0 / 1048576.0, ..StepConfig::new(strategy) };
        let mut opt = ShardedOptimizer::new(comm, layout, groups(which), None, c).unwrap();
        let mut p = init(n);
        for t in 0..steps {
            let mut g = grad(n, r, t);
            opt.step(&mut p, &mut g, 1).unwrap();
        }
        opt.gather_params(&mut p).unwrap();
        (p, opt.state_elems())
    })
    .unwrap();
    (outs[0].0.clone(), outs.iter().map(|o| o.1).collect())
}

#[test]
fn whole_matrix_rules_equal_one_process_for_every_strategy_and_world_size() {
    let n = layout().numel();
    let largest = 24;
    for which in [0, 1, 2, 3, 4] {
        for w in 1..=5 {
            let want = reference(which, w, 4, None);
            for strategy in STRATEGIES {
                let (got, elems) = distributed(strategy, which, w, 4, None);
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "rules={which} {strategy} W={w}");
                if strategy.shards_state() {
                    // Each element's state on one rank, each rank within a balanced share
                    // plus the largest parameter (the conformance checker's bound).
                    assert_eq!(elems.iter().sum::<usize>(), n, "{strategy} W={w}: {elems:?}");
                    assert!(elems.iter().all(|&e| e <= n.div_ceil(w) + largest), "{strategy} W={w}: {elems:?}");
                }
            }
        }
    }
}

#[test]
fn clipping_counts_every_element_once_with_snapped_ranges() {
    let clip = Some(ClipConfig { max_norm: 0.3, norm: NormType::P(2.0), error_if_nonfinite: false });
    for which in [0, 1, 2, 3, 4] {
        for w in [2, 3, 4] {
            let want = reference(which, w, 3, clip);
            for strategy in STRATEGIES {
                let (got, _) = distributed(strategy, which, w, 3, clip);
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-2), "rules={which} {strategy} W={w}: {a} vs {b}");
                }
            }
        }
    }
}

/// Rank 0 carries the whole gradient, so the sum is the same at any world size.
#[test]
fn a_checkpoint_at_w3_resumes_at_w2_and_equals_an_uninterrupted_run() {
    let layout = layout();
    let n = layout.numel();
    let sched = Schedule::CosineWithWarmup { warmup: 1, total: 6, cycles: 0.5 };
    for which in [0, 1, 2, 3, 4] {
        let run = |strategy: Strategy, w: usize, steps: std::ops::Range<usize>, root: Option<(&std::path::Path, bool)>| {
            Communicator::run_threads(w, &config(), |comm| {
                let r = comm.rank();
                let c = StepConfig { reduce: ReduceMode::Sum, ..StepConfig::new(strategy) };
                let mut opt = ShardedOptimizer::new(comm, layout.clone(), groups(which), Some(sched.clone()), c).unwrap();
                let mut p = init(n);
                if let Some((dir, false)) = root {
                    checkpoint::load(dir, &mut opt, &mut p).unwrap();
                }
                for t in steps.clone() {
                    let mut g: Vec<f32> = grad(n, 0, t).into_iter().map(|x| if r == 0 { x } else { 0.0 }).collect();
                    opt.step(&mut p, &mut g, 1).unwrap();
                }
                opt.gather_params(&mut p).unwrap();
                if let Some((dir, true)) = root {
                    checkpoint::save(dir, &opt, &p, &Default::default(), &SaveOptions::new()).unwrap();
                }
                p
            })
            .unwrap()
            .remove(0)
        };
        let whole = run(Strategy::Zero2, 3, 0..6, None);
        for second in [Strategy::Zero3, Strategy::Zero1, Strategy::Ddp] {
            let dir = std::env::temp_dir().join(format!("distoptim-optimizers-{}-{which}-{second}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            run(Strategy::Zero2, 3, 0..3, Some((&dir, true)));
            let resumed = run(second, 2, 3..6, Some((&dir, false)));
            let _ = std::fs::remove_dir_all(&dir);
            assert!(resumed.iter().zip(&whole).all(|(a, b)| a.to_bits() == b.to_bits()), "rules={which} zero2 W=3 -> {second} W=2");
        }
    }
}

/// Every strategy evaluates Schedule-Free's averaged iterate x, post-local SGD and DiLoCo
/// from each rank's own parameters and state: at W = 1, where each strategy is one
/// process, x is one process's to the bit (and not the y it steps).
#[test]
fn every_strategy_evaluates_the_schedule_free_iterate() {
    use distoptim::{data_parallel, DataParallelConfig};
    let n = layout().numel();
    let mut y = init(n);
    let mut one = Optimizer::with_groups(layout(), groups(3), 0..n).unwrap();
    for t in 0..3 {
        one.step(&mut y, &grad(n, 0, t)).unwrap();
    }
    let mut want = vec![0f32; n];
    one.eval_params(&y, &mut want).unwrap();
    assert!(want != y, "x and y differ after three steps");
    for strategy in [Strategy::Ddp, Strategy::Zero3, Strategy::PostLocalSgd, Strategy::Diloco] {
        let got = Communicator::run_threads(1, &config(), |comm| {
            let mut params = init(n);
            let mut dp = data_parallel(strategy, comm, layout(), groups(3), None, &DataParallelConfig::new(), &params).unwrap();
            for t in 0..3 {
                dp.gather((&mut params).into()).unwrap();
                dp.step((&mut params).into(), (&mut grad(n, 0, t)).into(), 1).unwrap();
            }
            dp.gather((&mut params).into()).unwrap();
            let mut x = vec![0f32; n];
            dp.eval_params((&params).into(), (&mut x).into()).unwrap();
            x
        })
        .unwrap();
        assert_eq!(got[0], want, "{strategy}");
    }
}

/// Square Muon matrices, largest first, each with an AdamW bias: a layout where the
/// contiguous partition falls well short of LPT at 3 and 4 ranks, so ZeRO exchanges.
fn largest_first() -> (Layout, Vec<ParamGroup>) {
    let mut named = Vec::new();
    for (i, k) in [256usize, 256, 224, 224, 192, 192].into_iter().enumerate() {
        named.push((format!("m{i}.weight"), vec![k, k]));
        named.push((format!("m{i}.bias"), vec![k]));
    }
    let layout = Layout::new(named).unwrap();
    let muon = MuonConfig { lr: 0.02, ..MuonConfig::default() };
    let groups = vec![
        ParamGroup { params: (0..layout.len()).step_by(2).collect(), config: OptimizerConfig::Muon(muon) },
        ParamGroup { params: (1..layout.len()).step_by(2).collect(), config: OptimizerConfig::Adam(AdamConfig::adamw()) },
    ];
    (layout, groups)
}

/// Muon's exchange between ranks (each matrix's Newton–Schulz on one rank, packed by
/// LPT over balanced ranges; taken here at 3 and 4 ranks, where it beats keeping each
/// matrix whole on its range's owner) gives one process's bits at every ZeRO stage, and
/// every rank holds a balanced share of the state.
#[test]
fn muon_exchanged_between_ranks_equals_one_process() {
    let (layout, groups) = largest_first();
    let n = layout.numel();
    for w in [3, 4] {
        let mut want = init(n);
        let mut one = Optimizer::with_groups(layout.clone(), groups.clone(), 0..n).unwrap();
        for t in 0..2 {
            let mut g = vec![0f32; n];
            for r in 0..w {
                g.iter_mut().zip(grad(n, r, t)).for_each(|(a, b)| *a += b);
            }
            g.iter_mut().for_each(|x| *x /= w as f32);
            one.step(&mut want, &g).unwrap();
        }
        for strategy in [Strategy::Zero1, Strategy::Zero2, Strategy::Zero3] {
            let outs = Communicator::run_threads(w, &config(), |comm| {
                let r = comm.rank();
                let mut opt = ShardedOptimizer::new(comm, layout.clone(), groups.clone(), None, StepConfig::new(strategy)).unwrap();
                let mut p = init(n);
                for t in 0..2 {
                    opt.gather_params(&mut p).unwrap();
                    opt.step(&mut p, &mut grad(n, r, t), 1).unwrap();
                }
                opt.gather_params(&mut p).unwrap();
                (p, opt.state_elems())
            })
            .unwrap();
            for (r, (p, elems)) in outs.iter().enumerate() {
                assert!(p.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{strategy} W={w} rank {r}");
                assert_eq!(*elems, distoptim_collective::shard_range(n, w, r).len(), "{strategy} W={w}: balanced ranges");
            }
        }
    }
}

/// A checkpoint of Muon exchanged between 3 ranks resumes on 2 (each matrix whole on its
/// range's owner) and on 4 (exchanged again) and equals an uninterrupted run.
#[test]
fn muon_exchanged_checkpoints_resume_at_another_world_size() {
    let (layout, groups) = largest_first();
    let n = layout.numel();
    // Rank 0 carries the whole gradient (a sum), so every world size sees the same one.
    let run = |w: usize, steps: std::ops::Range<usize>, save: Option<&std::path::Path>, load: Option<&std::path::Path>| {
        Communicator::run_threads(w, &config(), |comm| {
            let r = comm.rank();
            let c = StepConfig { reduce: ReduceMode::Sum, ..StepConfig::new(Strategy::Zero2) };
            let mut opt = ShardedOptimizer::new(comm, layout.clone(), groups.clone(), None, c).unwrap();
            let mut p = init(n);
            if let Some(dir) = load {
                checkpoint::load(dir, &mut opt, &mut p).unwrap();
            }
            for t in steps.clone() {
                let mut g: Vec<f32> = grad(n, 0, t).into_iter().map(|x| if r == 0 { x } else { 0.0 }).collect();
                opt.step(&mut p, &mut g, 1).unwrap();
            }
            if let Some(dir) = save {
                checkpoint::save(dir, &opt, &p, &Default::default(), &SaveOptions::new()).unwrap();
            }
            p
        })
        .unwrap()
        .remove(0)
    };
    let whole = run(3, 0..3, None, None);
    let dir = std::env::temp_dir().join(format!("distoptim-muon-exchanged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    run(3, 0..1, Some(&dir), None);
    for w in [2, 4] {
        let resumed = run(w, 1..3, None, Some(&dir));
        assert!(resumed.iter().zip(&whole).all(|(a, b)| a.to_bits() == b.to_bits()), "W=3 -> W={w}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
