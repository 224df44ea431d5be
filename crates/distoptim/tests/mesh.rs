//! 3-D parallelism on a 2×2 (dp×tp) mesh: gradients synchronised over dp only, a
//! column-sharded parameter updated shard by shard on the tp ranks, a replicated one
//! kept identical, and the clip counting each element once.

use distoptim::{verify_replicas, ClipConfig, ShardedOptimizer, StepConfig, Strategy};
use distoptim_collective::{CommConfig, Communicator, DeviceMesh};
use distoptim_optim::clip::{self, NormType};
use distoptim_optim::{AdamConfig, Layout, Optimizer, OptimizerConfig, ParamGroup};

const ROWS: usize = 4;
const COLS: usize = 6;
const REP: usize = 5;
const TP: usize = 2;

fn groups() -> Vec<ParamGroup> {
    vec![ParamGroup { params: vec![0, 1], config: OptimizerConfig::Adam(AdamConfig { lr: 0.03, ..AdamConfig::adamw() }) }]
}

/// dp rank d's full gradient at step t: `col` (ROWS×COLS, row-major) then `rep`.
fn grad(d: usize, t: usize) -> Vec<f32> {
    (0..ROWS * COLS + REP).map(|i| ((i * 7 + d * 5 + t * 3) % 13) as f32 * 0.3 - 1.7).collect()
}

/// Columns `t*COLS/TP..` of the `col` part, then all of `rep`.
fn local_of(full: &[f32], t: usize) -> Vec<f32> {
    let w = COLS / TP;
    let mut out: Vec<f32> = (0..ROWS).flat_map(|r| full[r * COLS + t * w..r * COLS + (t + 1) * w].to_vec()).collect();
    out.extend_from_slice(&full[ROWS * COLS..]);
    out
}

fn init() -> Vec<f32> {
    (0..ROWS * COLS + REP).map(|i| (i as f32 * 0.37).sin()).collect()
}

fn clip_config() -> ClipConfig {
    ClipConfig { max_norm: 0.8, norm: NormType::P(2.0), error_if_nonfinite: true }
}

#[test]
fn dp_by_tp_mesh_equals_one_process_on_the_full_parameters() {
    let steps = 4;
    // One process, full parameters, mean over the two dp ranks.
    let layout = Layout::new([("col", vec![ROWS, COLS]), ("rep", vec![REP])]).unwrap();
    let mut want = init();
    let mut opt = Optimizer::with_groups(layout.clone(), groups(), 0..layout.numel()).unwrap();
    let mut norms = Vec::new();
    for t in 0..steps {
        let mut g: Vec<f32> = grad(0, t).iter().zip(grad(1, t)).map(|(a, b)| (a + b) / 2.0).collect();
        let c = clip_config();
        norms.push(clip::clip_grad_norm(&mut g, c.max_norm, c.norm, false).unwrap());
        opt.step(&mut want, &g).unwrap();
    }
    for strategy in [Strategy::Ddp, Strategy::Zero2] {
        let results = Communicator::run_threads(4, &CommConfig::default(), |world| {
            let mesh = DeviceMesh::new(world, &[("dp", 2), ("tp", TP)]).unwrap();
            let (d, t) = (mesh.coordinate("dp").unwrap(), mesh.coordinate("tp").unwrap());
            let (dp, tp) = (mesh.group("dp").unwrap(), mesh.group("tp").unwrap());
            let local = Layout::new([("col", vec![ROWS, COLS / TP]), ("rep", vec![REP])]).unwrap();
            let config = StepConfig { clip: Some(clip_config()), ..StepConfig::new(strategy) };
            let mut opt = ShardedOptimizer::new(dp.clone(), local.clone(), groups(), None, config)
                .unwrap()
                .with_tensor_parallel(tp.clone(), vec![true, false])
                .unwrap();
            let mut params = local_of(&init(), t);
            let mut got_norms = Vec::new();
            for step in 0..steps {
                let mut g = local_of(&grad(d, step), t);
                got_norms.push(opt.step(&mut params, &mut g, 1).unwrap().grad_norm.unwrap());
            }
            // Replicas over dp are identical; the replicated parameter also over tp.
            verify_replicas(&dp, &local, &params).unwrap();
            let rep_only = Layout::new([("rep", vec![REP])]).unwrap();
            verify_replicas(&tp, &rep_only, &params[ROWS * COLS / TP..]).unwrap();
            (t, params, got_norms)
        })
        .unwrap();
        for (t, params, got_norms) in results {
            for (a, b) in got_norms.iter().zip(&norms) {
                assert!((a - b).abs() <= 1e-6 * b, "{strategy:?}: norm {a} vs {b} (a replicated parameter counted twice?)");
            }
            for (a, b) in params.iter().zip(local_of(&want, t)) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{strategy:?} tp rank {t}: {a} vs {b}");
            }
        }
    }
}
