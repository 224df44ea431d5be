//! Deterministic mode and elastic recovery in a program of your own.
//!
//! The linear regression of `accumulation.rs`, trained in deterministic mode: every
//! global batch of 64 is cut into 8 fixed micro-shards, each rank computes the gradients
//! of its micro-shards (each scaled by its share of the batch) straight into a
//! [`ReproducibleSum`], and `step_deterministic` sums them exactly. The parameters are the
//! same bits at any world size up to 8.
//!
//! Under `distoptim launch --elastic` the program also snapshots its state after every
//! step into the launcher's shared memory ([`Snapshots`]) and, when the launcher
//! restarts it after a rank died, restores the newest complete snapshot, resharded onto
//! however many ranks are left. Rank 0 prints a hash of the final parameters: a run that
//! loses a rank prints the uninterrupted run's hash.
//!
//! ```sh
//! cargo build --release --examples
//! target/release/distoptim launch --nproc 3 -- target/release/examples/elastic
//! # rank 1 killed in its 9th snapshot (fault injection), the job shrinks to 2 ranks:
//! DISTOPTIM_FAULT_AT=9 DISTOPTIM_FAULT_RANK=1 \
//!     target/release/distoptim launch --elastic --shrink --nproc 3 -- target/release/examples/elastic
//! ```

use std::collections::BTreeMap;

use distoptim::elastic::Snapshots;
use distoptim::sampler::DistributedSampler;
use distoptim::{data_parallel, DataParallelConfig, ReproducibleSum, Strategy};
use distoptim_collective::Communicator;
use distoptim_optim::{AdamConfig, Layout, OptimizerConfig, ParamGroup};

#[path = "common/regression.rs"]
mod regression;
use regression::{accumulate, data, FEATURES};

const SAMPLES: usize = regression::SAMPLES;
const GLOBAL_BATCH: usize = 64;
const MICRO_SHARDS: usize = 8;
const STEPS: u64 = 40;

fn main() -> anyhow::Result<()> {
    let comm = Communicator::from_env()?;
    let (rank, world) = (comm.rank(), comm.size());
    let (xs, ys) = data();
    let layout = Layout::new([("w", vec![FEATURES]), ("b", vec![1])])?;
    let adamw = OptimizerConfig::Adam(AdamConfig { lr: 0.05, ..AdamConfig::adamw() });
    let groups = vec![ParamGroup { params: vec![0, 1], config: adamw }];
    let init = vec![0.0f32; layout.numel()];
    let mut dp = data_parallel(Strategy::Zero2, comm, layout.clone(), groups, None, &DataParallelConfig::new(), &init)?;
    let sampler = DistributedSampler::new(SAMPLES, GLOBAL_BATCH, 1)?;
    let mut params = init;
    let mut sum = ReproducibleSum::new(layout.numel(), MICRO_SHARDS)?;

    // Under an elastic launcher: continue from the newest snapshot of an earlier start.
    let mut snapshots = Snapshots::from_env(rank, world);
    let mut first = 0;
    if let Some(s) = &snapshots {
        if let Some(m) = dp.restore(s, (&mut params).into())? {
            first = m.counters.get("step").copied().unwrap_or(0);
            if rank == 0 {
                println!("restored step {first} (written by {} ranks) on {world} ranks", m.world_size);
            }
        }
    }
    for step in first..STEPS {
        let (_, batch) = sampler.global_batch(step);
        for piece in DistributedSampler::micro_shards(batch.len(), MICRO_SHARDS, world, rank) {
            let share = piece.len() as f32 / batch.len() as f32;
            let grad = sum.next_term()?;
            grad.fill(0.0);
            accumulate(&params, &xs, &ys, &batch[piece], share, grad);
        }
        dp.step_deterministic((&mut params).into(), &mut sum)?;
        if let Some(s) = snapshots.as_mut() {
            dp.snapshot(s, step + 1, (&params).into(), &BTreeMap::from([("step".to_string(), step + 1)]))?;
        }
    }
    dp.finish((&mut params).into())?;
    if rank == 0 {
        let hash = params
            .iter()
            .flat_map(|p| p.to_bits().to_le_bytes())
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        println!("parameter hash {hash:016x} after {STEPS} steps on {world} ranks");
    }
    Ok(())
}
