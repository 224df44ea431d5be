//! Checkpoints on disk: resume at another world size and strategy, corruption detected,
//! never half a checkpoint.

use std::collections::BTreeMap;
use std::path::PathBuf;

use distoptim::checkpoint;
use distoptim::{ReduceMode, ShardedOptimizer, StepConfig, Strategy};
use distoptim_collective::{CommConfig, Communicator};
use distoptim_optim::{AdamConfig, Layout, OptimizerConfig, ParamGroup, Schedule};

fn layout() -> Layout {
    Layout::new([("w", vec![5, 3]), ("b", vec![4]), ("c", vec![2])]).unwrap()
}

fn groups() -> Vec<ParamGroup> {
    vec![ParamGroup { params: vec![0, 1, 2], config: OptimizerConfig::Adam(AdamConfig { lr: 0.02, amsgrad: true, ..AdamConfig::adamw() }) }]
}

/// The three "workers'" gradients at step t.
fn grad(n: usize, q: usize, t: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 13 + q * 7 + t * 3) % 11) as f32 * 0.2 - 1.0).collect()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("distoptim-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn optimizer(comm: Communicator, strategy: Strategy) -> ShardedOptimizer {
    let config = StepConfig { reduce: ReduceMode::Sum, ..StepConfig::new(strategy) };
    let schedule = Schedule::LinearWithWarmup { warmup: 2, total: 10 };
    ShardedOptimizer::new(comm, layout(), groups(), Some(schedule), config).unwrap()
}

/// Steps `steps` on `w` ranks; the three workers' gradients are split among the ranks
/// (rank r sums workers r, r+w, …), so with SUM the reduced gradient is the same for
/// any w ≤ 3, added in the same order.
fn run(w: usize, strategy: Strategy, steps: std::ops::Range<usize>, resume: Option<&PathBuf>, save: Option<&PathBuf>) -> Vec<Vec<f32>> {
    let n = layout().numel();
    Communicator::run_threads(w, &CommConfig::default(), |comm| {
        let r = comm.rank();
        let mut opt = optimizer(comm, strategy);
        let mut params = vec![0.5f32; n];
        if let Some(dir) = resume {
            let m = checkpoint::load(dir, &mut opt, &mut params).unwrap();
            assert_eq!(m.counters["epoch"], 7);
        }
        for t in steps.clone() {
            let mut g = vec![0f32; n];
            for q in (r..3).step_by(w) {
                g.iter_mut().zip(grad(n, q, t)).for_each(|(a, b)| *a += b);
            }
            opt.step(&mut params, &mut g, 1).unwrap();
        }
        opt.gather_params(&mut params).unwrap();
        if let Some(dir) = save {
            checkpoint::save(dir, &opt, &params, &BTreeMap::from([("epoch".to_string(), 7)]), &checkpoint::SaveOptions::new()).unwrap();
        }
        params
    })
    .unwrap()
}

#[test]
fn resume_on_another_world_size_and_strategy_continues_the_same_run() {
    let want = run(3, Strategy::Zero2, 0..5, None, None);
    for (first, second) in [
        ((3, Strategy::Zero2), (2, Strategy::Ddp)),
        ((1, Strategy::Ddp), (3, Strategy::Zero3)),
        ((2, Strategy::Zero1), (1, Strategy::Zero2)),
    ] {
        let dir = tmp(&format!("resume-{}-{}", first.0, second.0));
        run(first.0, first.1, 0..3, None, Some(&dir));
        let manifest = checkpoint::read_manifest(&dir).unwrap();
        assert_eq!((manifest.world_size, manifest.step, manifest.schedule_step), (first.0, 3, Some(3)));
        let got = run(second.0, second.1, 3..5, Some(&dir), None);
        for g in got {
            assert_eq!(g, want[0], "{first:?} -> {second:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn corrupt_or_missing_files_are_refused_and_change_nothing() {
    let dir = tmp("corrupt");
    run(2, Strategy::Zero2, 0..2, None, Some(&dir));
    let file = checkpoint::resolve(&dir).unwrap().0.join("rank-00001.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let errors = Communicator::run_threads(2, &CommConfig::default(), |comm| {
        let mut opt = optimizer(comm, Strategy::Ddp);
        let mut params = vec![9f32; layout().numel()];
        let err = checkpoint::load(&dir, &mut opt, &mut params).unwrap_err().to_string();
        assert!(params.iter().all(|&p| p == 9.0), "params changed by a failed load");
        err
    })
    .unwrap();
    assert!(errors[0].contains("rank-00001.safetensors: size or checksum does not match"), "{}", errors[0]);
    std::fs::remove_file(&file).unwrap();
    let err = checkpoint::read_manifest(&dir.join("nope")).unwrap_err().to_string();
    assert!(err.contains("no such checkpoint directory"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn files_are_safetensors_with_readable_names_and_saving_again_replaces_atomically() {
    let dir = tmp("names");
    run(2, Strategy::Zero1, 0..1, None, Some(&dir));
    let bytes = std::fs::read(checkpoint::resolve(&dir).unwrap().0.join("rank-00000.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    for name in ["w", "exp_avg/w", "exp_avg_sq/w", "max_exp_avg_sq/w"] {
        assert_eq!(header[name]["dtype"], "F32", "{name} in {header}");
    }
    // A dead save's staging directory is removed, the user's files are not, and the
    // newer checkpoint becomes the latest.
    std::fs::create_dir_all(dir.join(".staging-0000000001-00000000000000aa")).unwrap();
    std::fs::create_dir_all(dir.join("ckpt.old")).unwrap();
    std::fs::write(dir.join("ckpt.old/precious.txt"), "keep").unwrap();
    run(3, Strategy::Zero2, 0..2, None, Some(&dir));
    let m = checkpoint::read_manifest(&dir).unwrap();
    assert_eq!((m.world_size, m.files.len(), m.step), (3, 3, 2));
    assert!(!dir.join(".staging-0000000001-00000000000000aa").exists());
    assert_eq!(std::fs::read_to_string(dir.join("ckpt.old/precious.txt")).unwrap(), "keep");
    assert!(dir.join("step-0000000001").join("manifest.json").exists(), "the older checkpoint is kept");
    let _ = std::fs::remove_dir_all(&dir);
}
