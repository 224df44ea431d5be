//! Choosing an optimizer: the same ZeRO-2 run with AdamW, 8-bit AdamW, Adafactor, Lion,
//! and Muon for the weight matrix with AdamW for the bias (several rules in one
//! optimizer, as param groups). Each prints its final loss and the optimizer state one
//! rank keeps, from the memory ledger.
//!
//! The regression's 16 weights are laid out as a 4×4 matrix, so Muon and Adafactor's
//! factored statistics have a matrix to work on; the flat buffer is the same either way.
//!
//! ```sh
//! cargo run --release -p distoptim --example optimizers
//! ```

use distoptim::{data_parallel, DataParallel, DataParallelConfig, ReduceMode, Strategy};
use distoptim_collective::{CommConfig, Communicator};
use distoptim_optim::kernels::Adamw8bitConfig;
use distoptim_optim::{AdafactorConfig, AdamConfig, AdjustLr, Layout, LionConfig, MuonConfig, OptimizerConfig, ParamGroup};

#[path = "common/regression.rs"]
mod regression;
use regression::{accumulate, data, FEATURES, SAMPLES};

const RANKS: usize = 2;
const STEPS: usize = 200;

/// The param groups of each choice: the matrix (parameter 0) and the bias (parameter 1).
fn choices() -> Vec<(&'static str, Vec<ParamGroup>)> {
    let all = |config: OptimizerConfig| vec![ParamGroup { params: vec![0, 1], config }];
    let adamw = AdamConfig { lr: 0.05, ..AdamConfig::adamw() };
    vec![
        ("adamw", all(adamw.clone().into())),
        ("adamw8bit", all(Adamw8bitConfig { lr: 0.05, ..Adamw8bitConfig::default() }.into())),
        ("adafactor", all(AdafactorConfig { lr: 0.05, ..AdafactorConfig::default() }.into())),
        ("lion", all(LionConfig { lr: 0.01, ..LionConfig::default() }.into())),
        (
            "muon+adamw",
            vec![
                ParamGroup {
                    params: vec![0],
                    config: MuonConfig { lr: 0.05, adjust_lr: AdjustLr::MatchRmsAdamw, ..MuonConfig::default() }.into(),
                },
                ParamGroup { params: vec![1], config: adamw.into() },
            ],
        ),
    ]
}

fn main() -> anyhow::Result<()> {
    for (name, groups) in choices() {
        let comms = Communicator::threads(RANKS, &CommConfig::default())?;
        let results: Vec<(f32, u64)> = std::thread::scope(|s| {
            let handles: Vec<_> = comms.into_iter().map(|comm| s.spawn(|| train(comm, groups.clone()))).collect();
            handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))?).collect::<anyhow::Result<_>>()
        })?;
        let (loss, state) = results[0];
        println!("{name:<11} final loss {loss:.2e}, optimizer state on rank 0: {state} bytes");
        anyhow::ensure!(loss < 0.05, "{name} did not fit the regression (loss {loss})");
    }
    Ok(())
}

/// Trains on the whole data set each step (each rank half of it); returns the loss of
/// the final parameters and this rank's optimizer state in bytes.
fn train(comm: Communicator, groups: Vec<ParamGroup>) -> anyhow::Result<(f32, u64)> {
    let (xs, ys) = data();
    let (rank, world) = (comm.rank(), comm.size());
    let layout = Layout::new([("w", vec![4, FEATURES / 4]), ("b", vec![1])])?;
    let init = vec![0.0f32; layout.numel()];
    let config = DataParallelConfig::new().with_reduce(ReduceMode::BatchWeighted);
    let mut dp = data_parallel(Strategy::Zero2, comm, layout, groups, None, &config, &init)?;
    let mine: Vec<usize> = (rank..SAMPLES).step_by(world).collect();
    let all: Vec<usize> = (0..SAMPLES).collect();
    let mut params = init;
    let mut grads = vec![0.0f32; params.len()];
    for _ in 0..STEPS {
        grads.fill(0.0);
        accumulate(&params, &xs, &ys, &mine, 1.0, &mut grads);
        dp.step((&mut params).into(), (&mut grads).into(), mine.len())?;
    }
    dp.finish((&mut params).into())?;
    let mut unused = vec![0.0f32; params.len()];
    let loss = accumulate(&params, &xs, &ys, &all, 1.0, &mut unused) / SAMPLES as f32;
    Ok((loss, DataParallel::memory(&*dp).optimizer_state))
}
