//! Gradient accumulation on any data-parallel strategy, through the one interface.
//!
//! A linear regression (16 features) trained on 512 synthetic samples in global batches
//! of 64. Each rank takes its part of every global batch from the distributed sampler
//! and cuts it into micro-batches of 8; each micro-batch's gradient is scaled by its
//! share of the rank's samples, so the accumulated gradient is the mean over the rank's
//! samples, and `ReduceMode::BatchWeighted` with the rank's sample count makes the
//! reduced gradient the mean over the global batch. The run therefore follows one
//! process on the whole batch at any world size: rank 0 checks it at the end (for every
//! strategy but DiLoCo, whose ranks step locally between averagings).
//!
//! ```sh
//! cargo build --release --examples
//! target/release/distoptim launch --nproc 3 -- target/release/examples/accumulation zero2
//! ```

use distoptim::sampler::DistributedSampler;
use distoptim::{data_parallel, DataParallelConfig, ReduceMode, Strategy};
use distoptim_collective::{CommConfig, Communicator};
use distoptim_optim::{AdamConfig, Layout, Optimizer, OptimizerConfig, ParamGroup};

#[path = "common/regression.rs"]
mod regression;
use regression::{accumulate, data, FEATURES, SAMPLES};

const GLOBAL_BATCH: usize = 64;
const MICRO_BATCH: usize = 8;
const STEPS: u64 = 40;

fn main() -> anyhow::Result<()> {
    let strategy: Strategy = std::env::args().nth(1).as_deref().unwrap_or("zero2").parse()?;
    // Under `distoptim launch` (or torchrun) this process is one rank of the job; alone,
    // it runs 2 ranks as threads of itself.
    let comms = if std::env::var_os("RANK").is_some() {
        vec![Communicator::from_env()?]
    } else {
        Communicator::threads(2, &CommConfig::default())?
    };
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = comms.into_iter().map(|comm| s.spawn(move || train(comm, strategy))).collect();
        handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))?).collect::<anyhow::Result<Vec<()>>>()
    });
    results.map(|_| ())
}

fn train(comm: Communicator, strategy: Strategy) -> anyhow::Result<()> {
    let (xs, ys) = data();
    let (rank, world) = (comm.rank(), comm.size());
    let layout = Layout::new([("w", vec![FEATURES]), ("b", vec![1])])?;
    let adamw = OptimizerConfig::Adam(AdamConfig { lr: 0.05, ..AdamConfig::adamw() });
    let groups = vec![ParamGroup { params: vec![0, 1], config: adamw.clone() }];
    let init = vec![0.0f32; layout.numel()];
    let config = DataParallelConfig::new().with_reduce(ReduceMode::BatchWeighted);
    let mut dp = data_parallel(strategy, comm, layout.clone(), groups, None, &config, &init)?;
    let sampler = DistributedSampler::new(SAMPLES, GLOBAL_BATCH, 1)?;
    let mut params = init.clone();
    let mut grads = vec![0.0f32; params.len()];
    for step in 0..STEPS {
        dp.gather((&mut params).into())?; // ZeRO-3: the full parameters before the forward
        let (_, mine) = sampler.local_batch(step, world, rank);
        grads.fill(0.0);
        let mut loss = 0.0;
        for micro in mine.chunks(MICRO_BATCH) {
            // This micro-batch's share of the rank's samples: the accumulated gradient is
            // then the mean over all of them.
            let share = micro.len() as f32 / mine.len() as f32;
            loss += accumulate(&params, &xs, &ys, micro, share, &mut grads);
        }
        dp.step((&mut params).into(), (&mut grads).into(), mine.len())?;
        if rank == 0 && step % 10 == 0 {
            println!("step {step:>3}  rank-0 loss {:.5}", loss / mine.len().max(1) as f32);
        }
    }
    dp.finish((&mut params).into())?;

    if rank == 0 && strategy == Strategy::Diloco {
        println!("diloco takes local inner steps between averagings: not one process's numbers, nothing to check");
    } else if rank == 0 {
        // One process on every global batch, no accumulation: what the run must equal.
        let mut reference = init;
        let mut opt = Optimizer::new(layout, adamw)?;
        for step in 0..STEPS {
            let (_, batch) = sampler.local_batch(step, 1, 0);
            let mut g = vec![0.0f32; reference.len()];
            accumulate(&reference, &xs, &ys, &batch, 1.0, &mut g);
            opt.step(&mut reference, &g)?;
        }
        let diff = params.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        println!("{strategy} on {world} ranks, micro-batches of {MICRO_BATCH}: max |param - one-process param| = {diff:.2e}");
        anyhow::ensure!(diff < 1e-4, "accumulation diverged from the one-process run by {diff}");
        println!("accumulation matches one process");
    }
    Ok(())
}
